/* vsockcompat C core: datagram frame codec, queue account, send/recv fast paths. */
#define _GNU_SOURCE
#include "vsc_dgram.h"

#include <errno.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/uio.h>

static inline void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}

static inline uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void put64(uint8_t *p, uint64_t v)
{
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

static inline uint64_t get64(const uint8_t *p)
{
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

/* Account words are naturally aligned 64-bit values in a shared page; on the
 * little-endian machines VMCI ran on, the atomic word is the wire word. */
static inline uint64_t acct_load(const uint8_t *acct, size_t off)
{
    return __atomic_load_n((const uint64_t *)(acct + off), __ATOMIC_ACQUIRE);
}

static inline void acct_store(uint8_t *acct, size_t off, uint64_t v)
{
    __atomic_store_n((uint64_t *)(acct + off), v, __ATOMIC_RELEASE);
}

void vsc_dg_encode_header(uint8_t out[VMCI_DG_HEADERSIZE], const vsc_dg_header *h)
{
    put32(out + VSC_DG_OFF_DST_CONTEXT, h->dst.context);
    put32(out + VSC_DG_OFF_DST_RESOURCE, h->dst.resource);
    put32(out + VSC_DG_OFF_SRC_CONTEXT, h->src.context);
    put32(out + VSC_DG_OFF_SRC_RESOURCE, h->src.resource);
    put64(out + VSC_DG_OFF_PAYLOAD_SIZE, h->payload_size);
}

void vsc_dg_decode_header(const uint8_t in[VMCI_DG_HEADERSIZE], vsc_dg_header *h)
{
    h->dst.context = get32(in + VSC_DG_OFF_DST_CONTEXT);
    h->dst.resource = get32(in + VSC_DG_OFF_DST_RESOURCE);
    h->src.context = get32(in + VSC_DG_OFF_SRC_CONTEXT);
    h->src.resource = get32(in + VSC_DG_OFF_SRC_RESOURCE);
    h->payload_size = get64(in + VSC_DG_OFF_PAYLOAD_SIZE);
}

void vsc_acct_init(uint8_t *acct, uint64_t limit)
{
    memset(acct, 0, VSC_ACCT_SIZE);
    put32(acct + VSC_ACCT_OFF_VERSION, VSC_ACCT_VERSION);
    put64(acct + VSC_ACCT_OFF_LIMIT, limit);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    put32(acct + VSC_ACCT_OFF_MAGIC, VSC_ACCT_MAGIC);
}

void vsc_acct_close(uint8_t *acct)
{
    acct_store(acct, VSC_ACCT_OFF_CLOSED, 1);
}

uint64_t vsc_acct_queued(const uint8_t *acct)
{
    uint64_t consumed = acct_load(acct, VSC_ACCT_OFF_CONSUMED);
    uint64_t produced = acct_load(acct, VSC_ACCT_OFF_PRODUCED);
    return produced > consumed ? produced - consumed : 0;
}

static int lock_account(int fd, int op)
{
    while (flock(fd, op) < 0) {
        if (errno != EINTR)
            return -1;
    }
    return 0;
}

static int send_errno_to_status(int e)
{
    switch (e) {
    case EAGAIN:
#if EWOULDBLOCK != EAGAIN
    case EWOULDBLOCK:
#endif
    case ENOBUFS:
        return VMCI_ERROR_NO_RESOURCES;
    case EPIPE:
    case ECONNRESET:
    case ENOTCONN:
    case ECONNREFUSED:
        return VSC_PEER_GONE;
    case ENOMEM:
        return VMCI_ERROR_NO_MEM;
    case EMSGSIZE:
        return VMCI_ERROR_INVALID_ARGS;
    default:
        return VMCI_ERROR_GENERIC;
    }
}

int vsc_dg_send(int sock_fd, int acct_fd, uint8_t *acct, const vsc_dg_header *h,
                const void *payload, int *sys_errno)
{
    uint8_t hdr[VMCI_DG_HEADERSIZE];
    uint64_t total = VMCI_DG_HEADERSIZE + h->payload_size;
    uint64_t produced, consumed, queued;
    struct iovec iov[2];
    struct msghdr msg;
    ssize_t n;
    int status;

    *sys_errno = 0;
    if (h->payload_size > VMCI_MAX_DG_PAYLOAD_SIZE)
        return VMCI_ERROR_INVALID_ARGS;
    vsc_dg_encode_header(hdr, h);

    if (lock_account(acct_fd, LOCK_EX) < 0) {
        *sys_errno = errno;
        return VMCI_ERROR_GENERIC;
    }
    if (acct_load(acct, VSC_ACCT_OFF_CLOSED)) {
        status = VSC_PEER_GONE;
        goto out;
    }
    produced = acct_load(acct, VSC_ACCT_OFF_PRODUCED);
    consumed = acct_load(acct, VSC_ACCT_OFF_CONSUMED);
    queued = produced > consumed ? produced - consumed : 0;
    if (queued + total >= get64(acct + VSC_ACCT_OFF_LIMIT)) {
        status = VMCI_ERROR_NO_RESOURCES;
        goto out;
    }
    /* Reserve before sending: the receiver may read the frame at once. */
    acct_store(acct, VSC_ACCT_OFF_PRODUCED, produced + total);

    iov[0].iov_base = hdr;
    iov[0].iov_len = sizeof hdr;
    iov[1].iov_base = (void *)payload;
    iov[1].iov_len = (size_t)h->payload_size;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = h->payload_size ? 2 : 1;
    do {
        n = sendmsg(sock_fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        *sys_errno = errno;
        status = send_errno_to_status(errno);
        acct_store(acct, VSC_ACCT_OFF_PRODUCED, produced);
    } else {
        status = (int)total;
    }
out:
    lock_account(acct_fd, LOCK_UN);
    return status;
}

static void release_frame(uint8_t *acct, uint64_t size)
{
    uint64_t *word = (uint64_t *)(acct + VSC_ACCT_OFF_CONSUMED);
    uint64_t old = __atomic_load_n(word, __ATOMIC_ACQUIRE), next;

    do {
        uint64_t produced = acct_load(acct, VSC_ACCT_OFF_PRODUCED);
        next = old + size;
        if (next > produced)
            next = produced > old ? produced : old;
    } while (!__atomic_compare_exchange_n(word, &old, next, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
}

ssize_t vsc_dg_recv(int sock_fd, uint8_t *acct, vsc_dg_header *h, void *buf, size_t buf_len,
                    void *spill, size_t spill_len, int *sys_errno)
{
    uint8_t hdr[VMCI_DG_HEADERSIZE];
    struct iovec iov[3];
    struct msghdr msg;
    ssize_t n;

    *sys_errno = 0;
    iov[0].iov_base = hdr;
    iov[0].iov_len = sizeof hdr;
    iov[1].iov_base = buf;
    iov[1].iov_len = buf_len;
    iov[2].iov_base = spill;
    iov[2].iov_len = spill_len;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = 3;
    do {
        n = recvmsg(sock_fd, &msg, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return VSC_AGAIN;
        *sys_errno = errno;
        return errno == ECONNRESET ? VSC_PEER_GONE : VMCI_ERROR_GENERIC;
    }
    if (n == 0)
        return VSC_PEER_GONE;
    release_frame(acct, (uint64_t)n);
    if (n < VMCI_DG_HEADERSIZE || (msg.msg_flags & MSG_TRUNC))
        return VSC_BAD_FRAME;
    vsc_dg_decode_header(hdr, h);
    if (h->payload_size != (uint64_t)(n - VMCI_DG_HEADERSIZE))
        return VSC_BAD_FRAME;
    return n;
}
