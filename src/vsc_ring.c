/* vsockcompat C core: queue-pair ring index arithmetic and copies (vsc_ring.h). */
#include "vsc_ring.h"

#include <string.h>

/* Index words are naturally aligned u64 in a shared page (little-endian, as VMCI). */
static inline uint64_t *word(uint8_t *queue, size_t off)
{
    return (uint64_t *)(queue + off);
}

static inline uint64_t load_relaxed(const uint8_t *queue, size_t off)
{
    return __atomic_load_n((const uint64_t *)(queue + off), __ATOMIC_RELAXED);
}

static inline uint64_t load_acquire(const uint8_t *queue, size_t off)
{
    return __atomic_load_n((const uint64_t *)(queue + off), __ATOMIC_ACQUIRE);
}

static inline void store_release(uint8_t *queue, size_t off, uint64_t v)
{
    __atomic_store_n(word(queue, off), v, __ATOMIC_RELEASE);
}

/* Free bytes of a queue of `size` given its tail and head; both must be < size. */
static inline int64_t space(uint64_t tail, uint64_t head, uint64_t size)
{
    if (tail >= size || head >= size)
        return VMCI_ERROR_INVALID_SIZE;
    return (int64_t)(tail >= head ? size - (tail - head) - 1 : head - tail - 1);
}

static inline uint64_t advance(uint64_t at, uint64_t n, uint64_t size)
{
    return at >= size - n ? at + n - size : at + n; /* at < size, n < size */
}

/* Copy n bytes into the data area at offset `at`, split at the wrap point. */
static void copy_in(uint8_t *queue, uint64_t size, uint64_t at, const uint8_t *src, size_t n)
{
    uint8_t *data = queue + VSC_QP_DATA_OFFSET;
    size_t first = size - at < n ? (size_t)(size - at) : n;

    memcpy(data + at, src, first);
    if (n > first)
        memcpy(data, src + first, n - first);
}

static void copy_out(const uint8_t *queue, uint64_t size, uint64_t at, uint8_t *dst, size_t n)
{
    const uint8_t *data = queue + VSC_QP_DATA_OFFSET;
    size_t first = size - at < n ? (size_t)(size - at) : n;

    memcpy(dst, data + at, first);
    if (n > first)
        memcpy(dst + first, data, n - first);
}

void vsc_qp_init_header(uint8_t *queue, uint32_t context, uint32_t resource)
{
    memset(queue, 0, VSC_QP_PAGE_SIZE);
    memcpy(queue + VSC_QH_OFF_HANDLE_CONTEXT, &context, 4);
    memcpy(queue + VSC_QH_OFF_HANDLE_RESOURCE, &resource, 4);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

/* Producer side: the tail is ours (relaxed), the peer's head is acquired so
 * its reads of the bytes we are about to overwrite are complete. */
static int64_t produce_space(const vsc_qp *qp, uint64_t *tail)
{
    uint64_t head;

    if (qp->produce_size == 0)
        return 0;
    *tail = load_relaxed(qp->produce_q, VSC_QH_OFF_PRODUCER_TAIL);
    head = load_acquire(qp->consume_q, VSC_QH_OFF_CONSUMER_HEAD);
    return space(*tail, head, qp->produce_size);
}

/* Consumer side: the peer's tail is acquired before any data is read. */
static int64_t consume_ready(const vsc_qp *qp, uint64_t *head)
{
    uint64_t tail;
    int64_t free;

    if (qp->consume_size == 0)
        return 0;
    tail = load_acquire(qp->consume_q, VSC_QH_OFF_PRODUCER_TAIL);
    *head = load_relaxed(qp->produce_q, VSC_QH_OFF_CONSUMER_HEAD);
    free = space(tail, *head, qp->consume_size);
    return free < 0 ? free : (int64_t)qp->consume_size - free - 1;
}

int64_t vsc_qp_free_space(const vsc_qp *qp)
{
    uint64_t tail;
    return produce_space(qp, &tail);
}

int64_t vsc_qp_buf_ready(const vsc_qp *qp)
{
    uint64_t head;
    return consume_ready(qp, &head);
}

int64_t vsc_qp_produce_buf_ready(const vsc_qp *qp)
{
    int64_t free = vsc_qp_free_space(qp);
    if (qp->produce_size == 0 || free < 0)
        return free < 0 ? free : 0;
    return (int64_t)qp->produce_size - free - 1;
}

int64_t vsc_qp_consume_free_space(const vsc_qp *qp)
{
    int64_t ready = vsc_qp_buf_ready(qp);
    if (qp->consume_size == 0 || ready < 0)
        return ready < 0 ? ready : 0;
    return (int64_t)qp->consume_size - ready - 1;
}

int64_t vsc_qp_enqueue(vsc_qp *qp, const void *buf, size_t n)
{
    uint64_t tail;
    int64_t free = produce_space(qp, &tail);

    if (free < 0)
        return free;
    if (free == 0)
        return VMCI_ERROR_QUEUEPAIR_NOSPACE;
    if ((uint64_t)free < n)
        n = (size_t)free;
    if (n == 0)
        return 0;
    copy_in(qp->produce_q, qp->produce_size, tail, buf, n);
    store_release(qp->produce_q, VSC_QH_OFF_PRODUCER_TAIL, advance(tail, n, qp->produce_size));
    return (int64_t)n;
}

int64_t vsc_qp_enqueuev(vsc_qp *qp, const struct iovec *iov, size_t count, size_t *msgs)
{
    uint64_t tail, left, total = 0;
    int64_t free = produce_space(qp, &tail);
    size_t i;

    *msgs = 0;
    if (free < 0)
        return free;
    if (count == 0)
        return 0;
    left = (uint64_t)free;
    for (i = 0; i < count && iov[i].iov_len <= left; i++) {
        if (iov[i].iov_len) {
            copy_in(qp->produce_q, qp->produce_size, tail, iov[i].iov_base, iov[i].iov_len);
            tail = advance(tail, iov[i].iov_len, qp->produce_size);
        }
        left -= iov[i].iov_len;
        total += iov[i].iov_len;
    }
    if (i == 0 || free == 0)
        return VMCI_ERROR_QUEUEPAIR_NOSPACE;
    store_release(qp->produce_q, VSC_QH_OFF_PRODUCER_TAIL, tail);
    *msgs = i;
    return (int64_t)total;
}

static int64_t read_out(const vsc_qp *qp, void *buf, size_t n, uint64_t *head)
{
    int64_t ready = consume_ready(qp, head);

    if (ready < 0)
        return ready;
    if (ready == 0)
        return VMCI_ERROR_QUEUEPAIR_NODATA;
    if ((uint64_t)ready < n)
        n = (size_t)ready;
    if (n)
        copy_out(qp->consume_q, qp->consume_size, *head, buf, n);
    return (int64_t)n;
}

int64_t vsc_qp_dequeue(vsc_qp *qp, void *buf, size_t n)
{
    uint64_t head;
    int64_t got = read_out(qp, buf, n, &head);

    /* Release: our reads are done before the peer may overwrite the bytes. */
    if (got > 0)
        store_release(qp->produce_q, VSC_QH_OFF_CONSUMER_HEAD,
                      advance(head, (uint64_t)got, qp->consume_size));
    return got;
}

int64_t vsc_qp_peek(const vsc_qp *qp, void *buf, size_t n)
{
    uint64_t head;
    return read_out(qp, buf, n, &head);
}

int64_t vsc_qp_peek_span(const vsc_qp *qp, size_t n, uint64_t *offset)
{
    uint64_t head;
    int64_t ready = consume_ready(qp, &head);

    *offset = 0;
    if (ready < 0)
        return ready;
    if (ready == 0)
        return VMCI_ERROR_QUEUEPAIR_NODATA;
    if ((uint64_t)ready > qp->consume_size - head)
        ready = (int64_t)(qp->consume_size - head); /* up to the wrap point */
    if ((uint64_t)ready > n)
        ready = (int64_t)n;
    *offset = head;
    return ready;
}

int64_t vsc_qp_consume(vsc_qp *qp, size_t n)
{
    uint64_t head;
    int64_t ready = consume_ready(qp, &head);

    if (ready < 0)
        return ready;
    if ((uint64_t)ready < n)
        return VMCI_ERROR_INVALID_ARGS;
    /* Release: the caller's reads of the span are done before the peer may overwrite it. */
    if (n)
        store_release(qp->produce_q, VSC_QH_OFF_CONSUMER_HEAD, advance(head, n, qp->consume_size));
    return (int64_t)n;
}

void vsc_qp_produce_indexes(const vsc_qp *qp, uint64_t *tail, uint64_t *head)
{
    *tail = load_acquire(qp->produce_q, VSC_QH_OFF_PRODUCER_TAIL);
    *head = load_acquire(qp->consume_q, VSC_QH_OFF_CONSUMER_HEAD);
}

void vsc_qp_consume_indexes(const vsc_qp *qp, uint64_t *tail, uint64_t *head)
{
    *tail = load_acquire(qp->consume_q, VSC_QH_OFF_PRODUCER_TAIL);
    *head = load_acquire(qp->produce_q, VSC_QH_OFF_CONSUMER_HEAD);
}

/* Store-then-load across the two ends (Dekker): both sides fence in full so a
 * sleeper's bit and a producer's tail cannot both be missed. */
static void store_waiting(vsc_qp *qp, uint64_t value)
{
    __atomic_store_n(word(qp->produce_q, VSC_QP_OFF_WAITING), value, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* The waiting word is ours alone: its count is read back relaxed. */
void vsc_qp_set_waiting(vsc_qp *qp, uint64_t bits)
{
    uint64_t count = load_relaxed(qp->produce_q, VSC_QP_OFF_WAITING) & ~(uint64_t)VSC_QP_WAITING_BITS;
    store_waiting(qp, count | (bits & VSC_QP_WAITING_BITS));
}

int64_t vsc_qp_arm_wait(vsc_qp *qp, uint64_t bits, uint64_t want)
{
    uint64_t count = (load_relaxed(qp->produce_q, VSC_QP_OFF_WAITING) & ~(uint64_t)VSC_QP_WAITING_BITS)
                     + VSC_QP_WAITING_ARM;
    int64_t got;

    store_waiting(qp, count | (bits & VSC_QP_WAITING_BITS));
    got = bits & VSC_QP_WAITING_READ ? vsc_qp_buf_ready(qp) : vsc_qp_free_space(qp);
    if (got < 0 || (uint64_t)got >= want)
        store_release(qp->produce_q, VSC_QP_OFF_WAITING, count);
    return got;
}

uint64_t vsc_qp_peer_waiting(const vsc_qp *qp)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n((const uint64_t *)(qp->consume_q + VSC_QP_OFF_WAITING), __ATOMIC_SEQ_CST);
}
