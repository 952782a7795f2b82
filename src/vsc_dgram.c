/* vsockcompat C core: datagram frame codec, queue account, send/recv fast paths. */
#define _GNU_SOURCE
#include "vsc_dgram.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <unistd.h>

_Static_assert(sizeof(pthread_mutex_t) <= VSC_ACCT_LOCK_SIZE, "account lock does not fit");

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

static pthread_mutex_t *account_lock(uint8_t *acct)
{
    return (pthread_mutex_t *)(acct + VSC_ACCT_OFF_LOCK);
}

int vsc_acct_init(uint8_t *acct, uint64_t limit)
{
    pthread_mutexattr_t attr;
    int rc;

    memset(acct, 0, VSC_ACCT_SIZE);
    put32(acct + VSC_ACCT_OFF_VERSION, VSC_ACCT_VERSION);
    put64(acct + VSC_ACCT_OFF_LIMIT, limit);
    if ((rc = pthread_mutexattr_init(&attr)) != 0)
        return rc;
    rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (rc == 0)
        rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    if (rc == 0)
        rc = pthread_mutex_init(account_lock(acct), &attr);
    pthread_mutexattr_destroy(&attr);
    if (rc != 0)
        return rc;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    put32(acct + VSC_ACCT_OFF_MAGIC, VSC_ACCT_MAGIC);
    return 0;
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

/* A holder that died leaves the lock to the next taker: PRODUCED may then count
 * one frame that was never sent, which only makes the bound stricter. */
static int lock_account(uint8_t *acct)
{
    pthread_mutex_t *m = account_lock(acct);
    int rc = pthread_mutex_lock(m);

    if (rc == EOWNERDEAD)
        rc = pthread_mutex_consistent(m);
    return rc;
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

/* A receiver never writes on a link, so any event on it is a hang-up: a receiver
 * killed with its queue full never marks its account closed. */
static int link_hung_up(int sock_fd)
{
    struct pollfd p = { .fd = sock_fd, .events = POLLIN };

    return poll(&p, 1, 0) == 1;
}

/* Reserve, send, or roll back: the caller holds the account's lock. */
static int send_locked(int sock_fd, uint8_t *acct, const vsc_dg_header *h, const void *payload,
                       int *sys_errno)
{
    uint64_t total = VMCI_DG_HEADERSIZE + h->payload_size;
    uint64_t produced, consumed, queued;
    ssize_t n;

    if (sock_fd < 0 || acct_load(acct, VSC_ACCT_OFF_CLOSED))
        return VSC_PEER_GONE;
    produced = acct_load(acct, VSC_ACCT_OFF_PRODUCED);
    consumed = acct_load(acct, VSC_ACCT_OFF_CONSUMED);
    queued = produced > consumed ? produced - consumed : 0;
    if (queued + total >= get64(acct + VSC_ACCT_OFF_LIMIT))
        return link_hung_up(sock_fd) ? VSC_PEER_GONE : VMCI_ERROR_NO_RESOURCES;
    /* Reserve before sending: the receiver may read the frame at once. */
    acct_store(acct, VSC_ACCT_OFF_PRODUCED, produced + total);

    if (h->payload_size <= VSC_COPY_MAX) {
        /* One contiguous send: cheaper than sendmsg's iovec import up to VSC_COPY_MAX. */
        uint8_t frame[VMCI_DG_HEADERSIZE + VSC_COPY_MAX];

        vsc_dg_encode_header(frame, h);
        if (h->payload_size > 0)
            memcpy(frame + VMCI_DG_HEADERSIZE, payload, (size_t)h->payload_size);
        do {
            n = send(sock_fd, frame, (size_t)total, MSG_DONTWAIT | MSG_NOSIGNAL);
        } while (n < 0 && errno == EINTR);
    } else {
        uint8_t hdr[VMCI_DG_HEADERSIZE];
        struct iovec iov[2];
        struct msghdr msg;

        vsc_dg_encode_header(hdr, h);
        iov[0].iov_base = hdr;
        iov[0].iov_len = sizeof hdr;
        iov[1].iov_base = (void *)payload;
        iov[1].iov_len = (size_t)h->payload_size;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov;
        msg.msg_iovlen = 2;
        do {
            n = sendmsg(sock_fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        } while (n < 0 && errno == EINTR);
    }
    if (n < 0) {
        *sys_errno = errno;
        acct_store(acct, VSC_ACCT_OFF_PRODUCED, produced);
        return send_errno_to_status(errno);
    }
    return (int)total;
}

int vsc_dg_send(int sock_fd, uint8_t *acct, const vsc_dg_header *h, const void *payload,
                int *sys_errno)
{
    int status, rc;

    *sys_errno = 0;
    if (h->payload_size > VMCI_MAX_DG_PAYLOAD_SIZE)
        return VMCI_ERROR_INVALID_ARGS;
    if ((rc = lock_account(acct)) != 0) {
        *sys_errno = rc;
        return VMCI_ERROR_GENERIC;
    }
    status = send_locked(sock_fd, acct, h, payload, sys_errno);
    pthread_mutex_unlock(account_lock(acct));
    return status;
}

void vsc_link_init(vsc_link *link, int fd, uint8_t *acct, vsc_handle dst, vsc_handle src)
{
    link->fd = fd;
    link->acct = acct;
    link->header.dst = dst;
    link->header.src = src;
    link->header.payload_size = 0;
}

void vsc_link_close(vsc_link *link)
{
    int locked = lock_account(link->acct) == 0;

    link->fd = -1;
    if (locked)
        pthread_mutex_unlock(account_lock(link->acct));
}

int vsc_link_send(vsc_link *link, const void *payload, uint64_t length, int *sys_errno)
{
    vsc_dg_header h = link->header;
    int status, rc;

    *sys_errno = 0;
    if (length > VMCI_MAX_DG_PAYLOAD_SIZE)
        return VMCI_ERROR_INVALID_ARGS;
    h.payload_size = length;
    if ((rc = lock_account(link->acct)) != 0) {
        *sys_errno = rc;
        return VMCI_ERROR_GENERIC;
    }
    status = send_locked(link->fd, link->acct, &h, payload, sys_errno);
    pthread_mutex_unlock(account_lock(link->acct));
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

/* A frame of n bytes has been read (header in hdr): release it, then check it. */
static ssize_t check_frame(uint8_t *acct, const uint8_t *hdr, ssize_t n, int msg_flags, vsc_dg_header *h)
{
    if (n == 0)
        return VSC_PEER_GONE;
    release_frame(acct, (uint64_t)n);
    if (n < VMCI_DG_HEADERSIZE || (msg_flags & MSG_TRUNC))
        return VSC_BAD_FRAME;
    vsc_dg_decode_header(hdr, h);
    if (h->payload_size != (uint64_t)(n - VMCI_DG_HEADERSIZE) || h->payload_size > VMCI_MAX_DG_PAYLOAD_SIZE)
        return VSC_BAD_FRAME;
    return n;
}

/* One recvmsg of a frame: header to hdr, payload to buf, then spill. -1 with errno set. */
static ssize_t recv_frame(int sock_fd, uint8_t *hdr, void *buf, size_t buf_len, void *spill,
                          size_t spill_len, int flags, int *msg_flags)
{
    struct iovec iov[3];
    struct msghdr msg;
    ssize_t n;

    iov[0].iov_base = hdr;
    iov[0].iov_len = VMCI_DG_HEADERSIZE;
    iov[1].iov_base = buf;
    iov[1].iov_len = buf_len;
    iov[2].iov_base = spill;
    iov[2].iov_len = spill_len;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = 3;
    n = recvmsg(sock_fd, &msg, flags);
    *msg_flags = msg.msg_flags;
    return n;
}

ssize_t vsc_dg_recv(int sock_fd, uint8_t *acct, vsc_dg_header *h, void *buf, size_t buf_len,
                    void *spill, size_t spill_len, int *sys_errno)
{
    uint8_t hdr[VMCI_DG_HEADERSIZE];
    int flags;
    ssize_t n;

    *sys_errno = 0;
    do {
        n = recv_frame(sock_fd, hdr, buf, buf_len, spill, spill_len, MSG_DONTWAIT, &flags);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return VSC_AGAIN;
        *sys_errno = errno;
        return errno == ECONNRESET ? VSC_PEER_GONE : VMCI_ERROR_GENERIC;
    }
    return check_frame(acct, hdr, n, flags, h);
}

/* Receiver */

#define RX_KEY_WAKE     (-2)
#define RX_KEY_LISTENER (-1)

/* Add fd to the epoll set: 0, or an errno value. */
static int watch(vsc_rx *rx, int fd)
{
    struct epoll_event ev;

    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    return epoll_ctl(rx->epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? errno : 0;
}

int vsc_rx_init(vsc_rx *rx, int listener_fd, int wake_fd, uint8_t *acct, vsc_handle self)
{
    int rc;

    memset(rx, 0, sizeof *rx);
    rx->listener_fd = listener_fd;
    rx->wake_fd = wake_fd;
    rx->acct = acct;
    rx->self = self;
    rx->last_fd = -1;
    rx->hot_fd = -1;
    rx->parked_fd = -1;
    rx->batch_fd = -1;
    rx->pending_fd = -1;
    rx->polled = 1;
    rx->copy_recv = 1;
    rx->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (rx->epfd < 0)
        return errno;
    if ((rc = watch(rx, listener_fd)) != 0 || (rc = watch(rx, wake_fd)) != 0) {
        close(rx->epfd);
        rx->epfd = -1;
        return rc;
    }
    rx->pending_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (rx->pending_fd >= 0 && watch(rx, rx->pending_fd) != 0) {
        close(rx->pending_fd); /* no read-ahead then: one frame per recvmsg */
        rx->pending_fd = -1;
    }
    return 0;
}

void vsc_rx_destroy(vsc_rx *rx)
{
    if (rx->epfd >= 0)
        close(rx->epfd);
    rx->epfd = -1;
    free(rx->conns);
    rx->conns = NULL;
    if (rx->pending_fd >= 0)
        close(rx->pending_fd);
    rx->pending_fd = -1;
    rx->pending_set = 0;
    rx->parked_fd = -1;
    free(rx->batch);
    rx->batch = NULL;
    free(rx->frame);
    rx->frame = NULL;
    rx->batch_next = rx->batch_count = 0;
    rx->batch_fd = -1;
    rx->nconns = 0;
    rx->nready = 0;
}

/* Whether fd blocks and its blocking reads now end after VSC_RX_HOT_MS. */
static int hot_setup(int fd)
{
    struct timeval tv = { .tv_sec = 0, .tv_usec = VSC_RX_HOT_MS * 1000 };
    int fl = fcntl(fd, F_GETFL);

    return fl >= 0 && !(fl & O_NONBLOCK) && setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0;
}

int vsc_rx_add(vsc_rx *rx, int fd, vsc_handle src)
{
    int rc;

    if (fd < 0)
        return EBADF;
    if (fd >= rx->nconns) {
        int n = rx->nconns ? rx->nconns : 64, i;
        vsc_rx_conn *grown;

        while (n <= fd)
            n *= 2;
        grown = realloc(rx->conns, (size_t)n * sizeof *grown);
        if (grown == NULL)
            return ENOMEM;
        for (i = rx->nconns; i < n; i++)
            grown[i].fd = -1;
        rx->conns = grown;
        rx->nconns = n;
    }
    if ((rc = watch(rx, fd)) != 0)
        return rc;
    rx->conns[fd].fd = fd;
    rx->conns[fd].src = src;
    rx->conns[fd].seq = rx->next_seq++;
    rx->conns[fd].hot_ok = hot_setup(fd);
    rx->nlive++;
    rx->only_fd = fd;
    rx->hot_fd = -1; /* not hot: the next wait puts a parked connection back */
    return 0;
}

/* Frames wait in the batch: make epfd readable until it is empty again. */
static void batch_signal(vsc_rx *rx)
{
    uint64_t one = 1;

    if (!rx->pending_set && rx->pending_fd >= 0)
        rx->pending_set = write(rx->pending_fd, &one, sizeof one) == (ssize_t)sizeof one;
}

/* The batch is empty again: epfd no longer claims frames are waiting in it. */
static void batch_done(vsc_rx *rx)
{
    rx->batch_next = rx->batch_count = 0;
    rx->batch_fd = -1;
    if (rx->pending_set) {
        uint64_t count;

        rx->pending_set = 0;
        if (read(rx->pending_fd, &count, sizeof count) < 0) {
            /* EAGAIN only: nothing was pending */
        }
    }
}

/* Frames read ahead but not handed out have left the queue all the same. */
static void batch_discard(vsc_rx *rx)
{
    for (; rx->batch_next < rx->batch_count; rx->batch_next++)
        if (rx->batch_len[rx->batch_next] > 0)
            release_frame(rx->acct, rx->batch_len[rx->batch_next]);
    batch_done(rx);
}

/* Put the parked connection back in the epoll set: 0, or an errno value (it stays out). */
static int rx_unpark(vsc_rx *rx)
{
    int fd = rx->parked_fd, rc;

    if (fd < 0)
        return 0;
    if ((rc = watch(rx, fd)) != 0)
        return rc;
    __atomic_store_n(&rx->parked_fd, -1, __ATOMIC_SEQ_CST);
    return 0;
}

/* Take the hot connection out of the epoll set: while nothing else polls epfd, a frame on
 * it then wakes the reader alone, without an epoll callback. Receiving thread only; needs
 * pending_fd, with which vsc_rx_set_polled makes epfd readable while a connection is out. */
static void rx_park(vsc_rx *rx, int fd)
{
    if (rx->parked_fd == fd || rx->pending_fd < 0 || rx_unpark(rx) != 0
        || epoll_ctl(rx->epfd, EPOLL_CTL_DEL, fd, NULL) < 0)
        return;
    __atomic_store_n(&rx->parked_fd, fd, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&rx->polled, __ATOMIC_SEQ_CST))
        batch_signal(rx); /* vsc_rx_set_polled(1) ran meanwhile: the next receive puts it back */
}

void vsc_rx_remove(vsc_rx *rx, int fd)
{
    int i, j;

    if (fd < 0 || fd >= rx->nconns || rx->conns[fd].fd < 0)
        return;
    if (fd == rx->parked_fd)
        __atomic_store_n(&rx->parked_fd, -1, __ATOMIC_SEQ_CST);
    else
        epoll_ctl(rx->epfd, EPOLL_CTL_DEL, fd, NULL);
    rx->conns[fd].fd = -1;
    if (fd == rx->hot_fd)
        rx->hot_fd = -1;
    if (fd == rx->batch_fd)
        batch_discard(rx);
    if (--rx->nlive == 1) {
        for (i = 0; i < rx->nconns; i++)
            if (rx->conns[i].fd >= 0)
                rx->only_fd = i;
    }
    for (i = j = 0; i < rx->nready; i++)
        if (rx->ready[i] != fd)
            rx->ready[j++] = rx->ready[i];
    rx->nready = j;
}

static int64_t rx_key(const vsc_rx *rx, int fd)
{
    if (fd == rx->wake_fd)
        return RX_KEY_WAKE;
    if (fd == rx->listener_fd)
        return RX_KEY_LISTENER;
    return (int64_t)rx->conns[fd].seq;
}

/* Sort ready so the smallest key is served first (it sits at the end). */
static void rx_order(vsc_rx *rx)
{
    int i, j;

    for (i = 1; i < rx->nready; i++) {
        int fd = rx->ready[i];
        int64_t key = rx_key(rx, fd);

        for (j = i; j > 0 && rx_key(rx, rx->ready[j - 1]) < key; j--)
            rx->ready[j] = rx->ready[j - 1];
        rx->ready[j] = fd;
    }
}

static int rx_wait(vsc_rx *rx, int timeout_ms, int *sys_errno)
{
    struct epoll_event events[VSC_RX_MAX_READY];
    int n, i;

    n = epoll_wait(rx->epfd, events, VSC_RX_MAX_READY, timeout_ms);
    if (n < 0) {
        if (errno == EINTR)
            return VSC_INTR;
        *sys_errno = errno;
        return VMCI_ERROR_GENERIC;
    }
    if (n == 0)
        return VSC_AGAIN;
    rx->nready = 0;
    for (i = 0; i < n; i++) {
        int fd = events[i].data.fd;

        if (fd == rx->pending_fd) {
            /* A signal that outlived its batch (vsc_rx_set_polled racing a receive): the
             * batch is empty whenever we wait, so clear it rather than spin on it. */
            rx->pending_set = 1;
            batch_done(rx);
        } else if (fd == rx->wake_fd || fd == rx->listener_fd
                   || (fd < rx->nconns && rx->conns[fd].fd >= 0)) {
            rx->ready[rx->nready++] = fd;
        }
    }
    if (rx->nready > 1)
        rx_order(rx);
    return 0;
}

/* A whole frame of n bytes read into frame (flags: its recvmsg flags): the payload copied to
 * buf, then spill, exactly as recvmsg would have scattered it; then released and checked. */
static ssize_t copy_out(vsc_rx *rx, const uint8_t *frame, ssize_t n, int flags, vsc_dg_header *h, void *buf,
                        size_t buf_len, void *spill, size_t spill_len)
{
    size_t payload, first;

    if (n > VMCI_DG_HEADERSIZE) {
        payload = (size_t)n - VMCI_DG_HEADERSIZE;
        if (payload > buf_len + spill_len) { /* recvmsg would have truncated it */
            payload = buf_len + spill_len;
            flags |= MSG_TRUNC;
        }
        first = payload < buf_len ? payload : buf_len;
        if (first > 0)
            memcpy(buf, frame + VMCI_DG_HEADERSIZE, first);
        if (payload > first)
            memcpy(spill, frame + VMCI_DG_HEADERSIZE + first, payload - first);
    }
    return check_frame(rx->acct, frame, n, flags, h);
}

/* Hand out the next frame read ahead. */
static ssize_t batch_next(vsc_rx *rx, vsc_dg_header *h, void *buf, size_t buf_len, void *spill,
                          size_t spill_len)
{
    int i = rx->batch_next++;

    rx->last_fd = rx->batch_fd;
    if (rx->batch_next == rx->batch_count)
        batch_done(rx);
    return copy_out(rx, rx->batch + (size_t)i * VSC_RX_SLOT, rx->batch_len[i], rx->batch_flags[i], h, buf, buf_len,
                    spill, spill_len);
}

#define NO_BATCH 1 /* batch_fill: no read-ahead, the caller reads one frame */

/* Read up to VSC_RX_BATCH frames from fd, waiting for the first only with MSG_WAITFORONE
 * (flags, else MSG_DONTWAIT); 0 when some were read, NO_BATCH, VSC_INTR on a signal,
 * else a vsc_dg_recv status. */
static ssize_t batch_fill(vsc_rx *rx, int fd, int flags, int *sys_errno)
{
    struct mmsghdr msgs[VSC_RX_BATCH];
    struct iovec iov[VSC_RX_BATCH];
    int i, n;

    if (rx->pending_fd < 0)
        return NO_BATCH;
    if (rx->batch == NULL && (rx->batch = malloc((size_t)VSC_RX_BATCH * VSC_RX_SLOT)) == NULL)
        return NO_BATCH;
    memset(msgs, 0, sizeof msgs);
    for (i = 0; i < VSC_RX_BATCH; i++) {
        iov[i].iov_base = rx->batch + (size_t)i * VSC_RX_SLOT;
        iov[i].iov_len = VSC_RX_SLOT;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    do {
        n = recvmmsg(fd, msgs, VSC_RX_BATCH, flags, NULL);
    } while (n < 0 && errno == EINTR && (flags & MSG_DONTWAIT));
    if (n < 0) {
        if (errno == EINTR)
            return VSC_INTR;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return VSC_AGAIN;
        *sys_errno = errno;
        return errno == ECONNRESET ? VSC_PEER_GONE : VMCI_ERROR_GENERIC;
    }
    for (i = 0; i < n; i++) {
        rx->batch_len[i] = msgs[i].msg_len;
        rx->batch_flags[i] = msgs[i].msg_hdr.msg_flags;
        if (msgs[i].msg_len == 0) { /* end of stream: the rest repeats it */
            n = i + 1;
            break;
        }
    }
    rx->batch_fd = fd;
    rx->batch_next = 0;
    rx->batch_count = n;
    if (n > 1 && rx->polled)
        batch_signal(rx); /* frames will wait here after this call: keep epfd readable */
    return 0;
}

void vsc_rx_set_polled(vsc_rx *rx, int polled)
{
    __atomic_store_n(&rx->polled, polled != 0, __ATOMIC_SEQ_CST);
    if (polled && (rx->batch_count > rx->batch_next || __atomic_load_n(&rx->parked_fd, __ATOMIC_SEQ_CST) >= 0))
        batch_signal(rx);
}

static ssize_t rx_check_source(const vsc_rx *rx, int fd, const vsc_dg_header *h, ssize_t n)
{
    if (n < 0)
        return n;
    if (h->src.context != rx->conns[fd].src.context || h->src.resource != rx->conns[fd].src.resource
        || h->dst.context != rx->self.context || h->dst.resource != rx->self.resource)
        return VSC_FORGED;
    return n;
}

/* One frame from fd into buf, then spill, with flags MSG_DONTWAIT, or 0 for a hot read (which
 * blocks for at most VSC_RX_HOT_MS): as vsc_dg_recv, or VSC_INTR when a signal interrupted a
 * hot read. While this receiver's frames are small (copy_recv), one recv() into the frame
 * buffer (allocated when first needed), then copied out. */
static ssize_t rx_read(vsc_rx *rx, int fd, int flags, vsc_dg_header *h, void *buf, size_t buf_len,
                       void *spill, size_t spill_len, int *sys_errno)
{
    uint8_t hdr[VMCI_DG_HEADERSIZE];
    int msg_flags = 0, copy;
    ssize_t n;

    if (rx->copy_recv && rx->frame == NULL)
        rx->frame = malloc(VSC_RX_SLOT);
    copy = rx->copy_recv && rx->frame != NULL;
    do {
        n = copy ? recv(fd, rx->frame, VSC_RX_SLOT, flags)
                 : recv_frame(fd, hdr, buf, buf_len, spill, spill_len, flags, &msg_flags);
    } while (n < 0 && errno == EINTR && (flags & MSG_DONTWAIT));
    if (n >= 0) {
        rx->copy_recv = n <= VMCI_DG_HEADERSIZE + VSC_COPY_MAX;
        /* A frame past the buffer was cut short: its header disagrees, check_frame refuses it. */
        return copy ? copy_out(rx, rx->frame, n, 0, h, buf, buf_len, spill, spill_len)
                    : check_frame(rx->acct, hdr, n, msg_flags, h);
    }
    if (errno == EINTR)
        return VSC_INTR;
    if (errno == EAGAIN || errno == EWOULDBLOCK)
        return VSC_AGAIN;
    *sys_errno = errno;
    return errno == ECONNRESET ? VSC_PEER_GONE : VMCI_ERROR_GENERIC;
}

/* A frame came from fd: checked, and while fd is the only connection, it is hot; parked
 * too while nothing else polls epfd, if this receive's caller waits long (long_wait: a
 * hot read is tried for such callers only). */
static ssize_t rx_delivered(vsc_rx *rx, int fd, const vsc_dg_header *h, ssize_t n, int long_wait)
{
    n = rx_check_source(rx, fd, h, n);
    if (n >= 0) {
        rx->hot_fd = rx->nlive == 1 && rx->conns[fd].hot_ok ? fd : -1;
        rx->last_len = (uint64_t)n;
        if (rx->hot_fd >= 0 && long_wait && !__atomic_load_n(&rx->polled, __ATOMIC_SEQ_CST))
            rx_park(rx, fd);
        else
            rx_unpark(rx); /* if that fails, the next wait tries again */
    }
    return n;
}

/* Before waiting: the parked connection back in the epoll set, unless it is still hot and
 * the wait is the bounded look at everything else (hot_poll). 0, or a status for it. */
static int rx_before_wait(vsc_rx *rx, int hot_poll, int *sys_errno)
{
    int fd = rx->parked_fd, rc;

    if (fd < 0 || (hot_poll && fd == rx->hot_fd && !__atomic_load_n(&rx->polled, __ATOMIC_SEQ_CST)))
        return 0;
    if ((rc = rx_unpark(rx)) == 0)
        return 0;
    *sys_errno = rc;
    rx->last_fd = fd; /* it cannot be watched: the caller removes it */
    return VMCI_ERROR_GENERIC;
}

ssize_t vsc_rx_recv(vsc_rx *rx, void *buf, size_t buf_len, void *spill, size_t spill_len,
                    int timeout_ms, int *sys_errno)
{
    vsc_dg_header h;
    ssize_t n;
    int fd, rc, long_wait = timeout_ms < 0 || timeout_ms >= VSC_RX_HOT_MIN_WAIT_MS;

    *sys_errno = 0;
    if (rx->batch_count > 0) {
        fd = rx->batch_fd;
        return rx_delivered(rx, fd, &h, batch_next(rx, &h, buf, buf_len, spill, spill_len), long_wait);
    }
    for (;;) {
        /* One sender, bytes queued (the account says so) or its connection hot: read it
         * without epoll_wait (a hot read may block, briefly), a batch if more bytes are
         * queued than the last frame had (likely more than one frame: a ping-pong's one
         * frame costs a recv, not a recvmmsg). Bounded, so that new connections and
         * wake-ups are still seen. */
        if (rx->nready == 0 && rx->nlive == 1 && rx->skips < VSC_RX_SKIPS) {
            uint64_t bytes = vsc_acct_queued(rx->acct);
            int queued = bytes > 0;
            int hot = rx->hot_fd == rx->only_fd && long_wait;

            if (queued || hot) {
                rx->skips++;
                fd = rx->last_fd = rx->only_fd;
                n = bytes > rx->last_len ? batch_fill(rx, fd, hot ? MSG_WAITFORONE : MSG_DONTWAIT, sys_errno)
                                         : NO_BATCH;
                if (n == 0)
                    return rx_delivered(rx, fd, &h, batch_next(rx, &h, buf, buf_len, spill, spill_len),
                                        long_wait);
                if (n == NO_BATCH)
                    n = rx_read(rx, fd, hot ? 0 : MSG_DONTWAIT, &h, buf, buf_len, spill, spill_len, sys_errno);
                if (n == VSC_AGAIN && hot) {
                    rx->hot_fd = -1; /* nothing came in time: the next call waits on everything */
                    return VSC_INTR;
                }
                if (n == VSC_AGAIN) {
                    rx->skips = VSC_RX_SKIPS; /* the queued bytes are elsewhere: wait properly */
                    continue;
                }
                return n == VSC_INTR ? n : rx_delivered(rx, fd, &h, n, long_wait);
            }
        }
        if (rx->nready == 0) {
            /* The hot connection parked: a look at the rest, without waiting, then read it. */
            int hot_poll = rx->parked_fd >= 0 && rx->nlive == 1 && long_wait;

            if ((rc = rx_before_wait(rx, hot_poll, sys_errno)) != 0)
                return rc;
            hot_poll = hot_poll && rx->parked_fd >= 0;
            rx->skips = 0;
            rc = rx_wait(rx, hot_poll ? 0 : timeout_ms, sys_errno);
            if (rc == VSC_AGAIN && hot_poll)
                continue;
            if (rc != 0)
                return rc;
            if (rx->nready == 0)
                continue;
        }
        fd = rx->ready[--rx->nready];
        if (fd == rx->wake_fd)
            return VSC_WAKE;
        if (fd == rx->listener_fd)
            return VSC_ACCEPT;
        rx->last_fd = fd;
        n = rx_read(rx, fd, MSG_DONTWAIT, &h, buf, buf_len, spill, spill_len, sys_errno);
        if (n == VSC_AGAIN) {
            if (rx->nready == 0)
                return VSC_INTR; /* a spurious wake-up: the caller recomputes its timeout */
            continue;
        }
        return rx_delivered(rx, fd, &h, n, long_wait);
    }
}
