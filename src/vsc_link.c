/* vsockcompat C core: the link machinery of the vsock transport over any connected sockets
 * (hellos, verdicts, link pumps, stream readers; src/vsc_link.h). */
#define _GNU_SOURCE
#include "vsc_link.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define VERDICT_READ (VSC_VERDICT_SIZE * 64) /* stream bytes read at most per receive */

/* Hellos and verdicts are both two little-endian u32: HELLO_FORMAT = VERDICT_FORMAT = "<II". */
_Static_assert(VSC_HELLO_SIZE == 8 && VSC_VERDICT_SIZE == 8, "two u32");

static void encode_words(uint8_t out[8], uint32_t first, uint32_t second)
{
    uint32_t words[2] = {htole32(first), htole32(second)};

    memcpy(out, words, sizeof words);
}

static void decode_words(const uint8_t in[8], uint32_t *first, uint32_t *second)
{
    uint32_t words[2];

    memcpy(words, in, sizeof words);
    *first = le32toh(words[0]);
    *second = le32toh(words[1]);
}

int64_t vsc_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* pthread_timedjoin_np with a relative bound; 0 once joined. */
static int join_within(pthread_t thread, int ms)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return pthread_timedjoin_np(thread, NULL, &ts);
}

/* A private account page with no user-space bound; NULL if out of memory. */
uint8_t *vsc_private_account(void)
{
    uint8_t *acct = mmap(NULL, VSC_ACCT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

    if (acct == MAP_FAILED)
        return NULL;
    if (vsc_acct_init(acct, VSC_UNBOUNDED_ACCOUNT_LIMIT) != 0) {
        munmap(acct, VSC_ACCT_SIZE);
        return NULL;
    }
    return acct;
}

int vsc_send_all(int fd, const uint8_t *buf, size_t len)
{
    return vsc_send_pieces(fd, buf, len, 0);
}

int vsc_send_pieces(int fd, const uint8_t *buf, size_t len, size_t piece)
{
    while (len > 0) {
        ssize_t n = send(fd, buf, piece != 0 && len > piece ? piece : len, MSG_NOSIGNAL);

        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Wire: hellos and verdicts */

void vsc_hello_encode(uint8_t out[VSC_HELLO_SIZE], uint32_t rid, int well_known)
{
    encode_words(out, well_known ? VSC_HELLO_WELL_KNOWN_MAGIC : VSC_HELLO_MAGIC, rid);
}

int vsc_hello_decode(const uint8_t *buf, size_t n, int *well_known, uint32_t *rid)
{
    uint32_t magic, port;

    if (buf == NULL || n != VSC_HELLO_SIZE)
        return -1;
    decode_words(buf, &magic, &port);
    if ((magic != VSC_HELLO_MAGIC && magic != VSC_HELLO_WELL_KNOWN_MAGIC) || port == VSC_VMADDR_PORT_ANY)
        return -1;
    *well_known = magic == VSC_HELLO_WELL_KNOWN_MAGIC;
    *rid = port;
    return 0;
}

void vsc_verdict_encode(uint8_t out[VSC_VERDICT_SIZE], int denied)
{
    encode_words(out, VSC_VERDICT_MAGIC, denied ? VSC_VERDICT_DENIED : VSC_VERDICT_MAY_SEND);
}

int vsc_verdict_decode(const uint8_t *buf, size_t n)
{
    uint32_t magic, word;

    if (buf == NULL || n != VSC_VERDICT_SIZE)
        return -1;
    decode_words(buf, &magic, &word);
    if (magic != VSC_VERDICT_MAGIC || (word != VSC_VERDICT_MAY_SEND && word != VSC_VERDICT_DENIED))
        return -1;
    return word == VSC_VERDICT_DENIED;
}

int vsc_readable_by(int fd, int64_t deadline)
{
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int64_t left = deadline - vsc_now_ms();
        int rc = poll(&p, 1, left > 0 ? (int)left : 0);

        if (rc > 0)
            return 1;
        if (rc == 0 || errno != EINTR)
            return 0;
    }
}

int vsc_hello_read(int fd, int stream, int timeout_ms, int *well_known, uint32_t *rid)
{
    int64_t deadline = vsc_now_ms() + timeout_ms;
    uint8_t buf[VSC_HELLO_SIZE + 1];
    size_t got = 0;

    if (!stream) {
        struct iovec iov = {.iov_base = buf, .iov_len = sizeof buf};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
        ssize_t n;

        if (!vsc_readable_by(fd, deadline))
            return -1;
        do {
            n = recvmsg(fd, &msg, MSG_DONTWAIT);
        } while (n < 0 && errno == EINTR);
        if (n < 0 || (msg.msg_flags & MSG_TRUNC))
            return -1;
        return vsc_hello_decode(buf, (size_t)n, well_known, rid);
    }
    while (got < VSC_HELLO_SIZE) {
        ssize_t n;

        if (!vsc_readable_by(fd, deadline))
            return -1;
        n = recv(fd, buf + got, VSC_HELLO_SIZE - got, MSG_DONTWAIT);
        if (n == 0)
            return -1;
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
                continue;
            return -1;
        }
        got += (size_t)n;
    }
    return vsc_hello_decode(buf, got, well_known, rid);
}

/* Pumps: the sending side of a link */

struct vsc_vsock_pump {
    pthread_t thread;
    int back, vs, stream;
    size_t piece;                    /* stream: bytes per send() at most, 0 for no bound */
    int denied, ended, garbled;      /* atomic: written by the pump, read by the endpoint */
    uint8_t pending[VSC_VERDICT_SIZE]; /* stream: the start of a verdict cut by a receive */
    size_t npending;
    uint8_t *buf;                    /* VMCI_MAX_DG_SIZE + 1 bytes */
};

/* Take the verdict bytes data[0..n) (stream) or one message; 0, or -1 if they are not verdicts. */
static int take_verdicts(struct vsc_vsock_pump *p, const uint8_t *data, size_t n, int truncated)
{
    int verdict = -1;

    if (!p->stream) {
        verdict = truncated ? -1 : vsc_verdict_decode(data, n);
        if (verdict < 0)
            return -1;
    } else {
        while (n > 0) {
            size_t take = VSC_VERDICT_SIZE - p->npending < n ? VSC_VERDICT_SIZE - p->npending : n;

            memcpy(p->pending + p->npending, data, take);
            p->npending += take;
            data += take;
            n -= take;
            if (p->npending == VSC_VERDICT_SIZE) {
                if ((verdict = vsc_verdict_decode(p->pending, VSC_VERDICT_SIZE)) < 0)
                    return -1;
                p->npending = 0;
            }
        }
    }
    if (verdict >= 0)
        __atomic_store_n(&p->denied, verdict, __ATOMIC_RELEASE);
    return 0;
}

/* What vs holds, without blocking; 0 to go on, -1 once the link must end. */
static int receive_verdicts(struct vsc_vsock_pump *p)
{
    uint8_t data[VERDICT_READ];
    struct iovec iov = {.iov_base = data, .iov_len = p->stream ? sizeof data : VSC_VERDICT_SIZE + 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    ssize_t n = recvmsg(p->vs, &msg, MSG_DONTWAIT);

    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
    if (n == 0)
        return -1;
    if (take_verdicts(p, data, (size_t)n, (msg.msg_flags & MSG_TRUNC) != 0) != 0) {
        __atomic_store_n(&p->garbled, 1, __ATOMIC_RELEASE);
        return -1;
    }
    return 0;
}

static void *pump_main(void *arg)
{
    struct vsc_vsock_pump *p = arg;
    struct pollfd fds[2] = {{.fd = p->back, .events = POLLIN}, {.fd = p->vs, .events = POLLIN}};

    for (;;) {
        ssize_t n;

        fds[0].revents = fds[1].revents = 0;
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (fds[1].revents && receive_verdicts(p) != 0)
            break;
        if (!fds[0].revents)
            continue;
        n = recv(p->back, p->buf, VMCI_MAX_DG_SIZE + 1, MSG_DONTWAIT);
        if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
            continue;
        if (n <= 0)
            break; /* the core closed its end */
        if (p->stream ? vsc_send_pieces(p->vs, p->buf, (size_t)n, p->piece) != 0
                      : send(p->vs, p->buf, (size_t)n, MSG_NOSIGNAL) != n) /* blocking: whole or error */
            break;
    }
    __atomic_store_n(&p->ended, 1, __ATOMIC_RELEASE);
    shutdown(p->back, SHUT_RDWR); /* the core's next send sees EPIPE, its stale-link check a hang-up */
    return NULL;
}

int vsc_link_pump_start(int vs, int stream, size_t piece, vsc_conn *out)
{
    struct vsc_vsock_pump *p = calloc(1, sizeof *p);
    int pair[2] = {-1, -1};

    memset(out, 0, sizeof *out);
    out->fd = -1;
    if (p == NULL || (p->buf = malloc(VMCI_MAX_DG_SIZE + 1)) == NULL
        || socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0)
        goto fail;
    if ((out->acct = vsc_private_account()) == NULL)
        goto fail;
    if (fcntl(pair[0], F_SETFL, fcntl(pair[0], F_GETFL) | O_NONBLOCK) != 0)
        goto fail;
    p->back = pair[1];
    p->vs = vs;
    p->stream = stream;
    p->piece = stream ? piece : 0; /* a SEQPACKET message is one packet whatever its size */
    if (pthread_create(&p->thread, NULL, pump_main, p) != 0)
        goto fail;
    out->fd = pair[0];
    out->pump = p;
    return VMCI_SUCCESS;
fail:
    if (out->acct != NULL)
        munmap(out->acct, VSC_ACCT_SIZE);
    out->acct = NULL;
    if (pair[0] >= 0) {
        close(pair[0]);
        close(pair[1]);
    }
    if (p != NULL)
        free(p->buf);
    free(p);
    close(vs);
    return VMCI_ERROR_NO_RESOURCES;
}

static void pump_free(vsc_conn *c)
{
    struct vsc_vsock_pump *p = c->pump;

    close(p->vs);
    close(p->back);
    free(p->buf);
    free(p);
    c->pump = NULL;
    if (c->acct != NULL)
        munmap(c->acct, VSC_ACCT_SIZE);
    c->acct = NULL;
}

void vsc_link_pump_stop(vsc_conn *c)
{
    struct vsc_vsock_pump *p = c->pump;

    if (p == NULL)
        return;
    if (c->fd >= 0)
        close(c->fd); /* the pump forwards what is queued, then sees the end */
    c->fd = -1;
    if (join_within(p->thread, VSC_VSOCK_LINGER_MS) != 0) {
        shutdown(p->vs, SHUT_RDWR); /* wakes a pump blocked in send */
        if (join_within(p->thread, VSC_VSOCK_JOIN_MS) != 0) {
            pthread_detach(p->thread); /* stuck: leave its memory and descriptors to it */
            c->pump = NULL;
            return;
        }
    }
    pump_free(c);
}

void vsc_link_pump_abandon(vsc_conn *c)
{
    if (c->pump == NULL)
        return;
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    pump_free(c); /* our copies only: the parent's pump thread does not exist here */
}

int vsc_link_pump_denied(const vsc_conn *c)
{
    return c->pump != NULL && __atomic_load_n(&c->pump->denied, __ATOMIC_ACQUIRE);
}

int vsc_link_pump_ended(const vsc_conn *c, int *garbled)
{
    if (c->pump == NULL)
        return 0;
    if (garbled != NULL)
        *garbled = __atomic_load_n(&c->pump->garbled, __ATOMIC_ACQUIRE);
    return __atomic_load_n(&c->pump->ended, __ATOMIC_ACQUIRE);
}

/* Stream readers: the receiving side of a stream-mode connection */

struct vsc_vsock_in {
    pthread_t thread;
    int conn, back;
};

/* Fill buf[0..len) from the stream; the bytes read (short only at its end or on an error). */
static size_t recv_exact(int fd, uint8_t *buf, size_t len)
{
    size_t got = 0;

    while (got < len) {
        ssize_t n = recv(fd, buf + got, len - got, 0);

        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    return got;
}


static void *reader_main(void *arg)
{
    struct vsc_vsock_in *in = arg;
    uint8_t *buf = malloc(VMCI_MAX_DG_SIZE);

    while (buf != NULL) {
        size_t got = recv_exact(in->conn, buf, VMCI_DG_HEADERSIZE), end;
        vsc_dg_header h;
        uint64_t size;

        if (got == 0)
            break;
        if (got < VMCI_DG_HEADERSIZE) {
            send(in->back, buf, got, MSG_NOSIGNAL);
            break;
        }
        vsc_dg_decode_header(buf, &h);
        size = h.payload_size;
        if (size > VMCI_MAX_DG_PAYLOAD_SIZE) {
            send(in->back, buf, VMCI_DG_HEADERSIZE, MSG_NOSIGNAL);
            break;
        }
        end = VMCI_DG_HEADERSIZE + (size_t)size;
        got += recv_exact(in->conn, buf + VMCI_DG_HEADERSIZE, (size_t)size);
        /* Blocking: a full pair holds the stream back (flow control). */
        if (send(in->back, buf, got, MSG_NOSIGNAL) != (ssize_t)got || got < end)
            break;
    }
    free(buf);
    shutdown(in->back, SHUT_RDWR); /* the receiver sees the connection end */
    return NULL;
}

int vsc_stream_in_start(int conn, int *rx_fd, vsc_vsock_in **out)
{
    struct vsc_vsock_in *in = calloc(1, sizeof *in);
    int pair[2];

    if (in == NULL || socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
        free(in);
        close(conn);
        return -1;
    }
    in->conn = conn;
    in->back = pair[1];
    if (pthread_create(&in->thread, NULL, reader_main, in) != 0) {
        close(pair[0]);
        close(pair[1]);
        close(conn);
        free(in);
        return -1;
    }
    *rx_fd = pair[0]; /* blocking: the receiver may read it hot */
    *out = in;
    return 0;
}

void vsc_vsock_tell(int fd, const vsc_vsock_in *in, int denied)
{
    uint8_t verdict[VSC_VERDICT_SIZE];

    vsc_verdict_encode(verdict, denied);
    if (send(in != NULL ? in->conn : fd, verdict, sizeof verdict, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
        /* a sender that leaves its buffer full misses it; its datagrams are still dropped */
    }
}

void vsc_vsock_in_release(vsc_vsock_in *in)
{
    if (in == NULL)
        return;
    shutdown(in->conn, SHUT_RDWR); /* wakes the reader blocked in recv; the closed rx end, in send */
    if (join_within(in->thread, VSC_VSOCK_JOIN_MS) != 0) {
        pthread_detach(in->thread); /* stuck: leave its memory and descriptors to it */
        return;
    }
    close(in->conn);
    close(in->back);
    free(in);
}

void vsc_vsock_in_abandon(vsc_vsock_in *in)
{
    if (in == NULL)
        return;
    close(in->conn);
    close(in->back);
    free(in);
}
