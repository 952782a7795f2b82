/* vsockcompat C core: mirrored shared memory, the attacher's side and the streams (mirror_link.py);
 * the creator's side is src/vsc_mirror_serve.c, what both share src/vsc_mirror_core.c. */
#define _GNU_SOURCE
#include "vsc_mirror.h"
#include "vsc_mirror_core.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

#include "vsc_hybrid.h"
#include "vsc_link.h"
#include "vsc_vsock.h"

#define PATH_BUF 4096

/* Streams (mirror_link.py) */

int vsc_mirror_enabled(const vsc_local *t)
{
    /* auto: wherever the transport has no shared memory (vsock, hybrid), as mirror_link.mirrored */
    return t->shm_mode == VSC_SHM_MIRRORED || (t->shm_mode == VSC_SHM_AUTO && t->transport != VSC_TRANSPORT_LOCAL);
}

static void set_timeout(int fd, int opt, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};

    setsockopt(fd, SOL_SOCKET, opt, &tv, sizeof tv);
}

/* mirror_link.connect's codes for a failed connect */
static int connect_error(int e)
{
    switch (e) {
    case ECONNREFUSED:
    case ECONNRESET:
    case ENOENT:
    case ENOTCONN:
    case EPIPE:
    case ENOTDIR:
        return VMCI_ERROR_NOT_FOUND;
    case EHOSTUNREACH:
    case ENODEV:
    case ENETUNREACH:
    case EADDRNOTAVAIL:
        return VMCI_ERROR_DST_UNREACHABLE;
    case EACCES:
    case EPERM:
        return VMCI_ERROR_NO_ACCESS;
    case ETIMEDOUT:
    case EAGAIN:
    case EINPROGRESS:
        return VMCI_ERROR_TIMEOUT;
    case EMFILE:
    case ENFILE:
    case ENOMEM:
    case ENOBUFS:
        return VMCI_ERROR_NO_RESOURCES;
    default:
        return VMCI_ERROR_UNAVAILABLE;
    }
}

static int connect_local(const vsc_local *t, vsc_handle h, int fd)
{
    static unsigned long counter;
    struct sockaddr_un me, peer;
    char cdir[PATH_BUF];
    int rc, e;

    memset(&me, 0, sizeof me);
    memset(&peer, 0, sizeof peer);
    me.sun_family = peer.sun_family = AF_UNIX;
    snprintf(cdir, sizeof cdir, "%s/c%u", t->rundir, (unsigned)t->cid);
    if (vsc_local_makedirs(cdir) != 0)
        return connect_error(errno);
    if ((size_t)snprintf(me.sun_path, sizeof me.sun_path, "%s/.stream-%d-%lu", cdir, (int)getpid(),
                         __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED)) >= sizeof me.sun_path
        || (size_t)snprintf(peer.sun_path, sizeof peer.sun_path, "%s/c%u/%u" VSC_MIRROR_SUFFIX ".sock", t->rundir,
                            (unsigned)h.context, (unsigned)h.resource) >= sizeof peer.sun_path)
        return VMCI_ERROR_NOT_FOUND;
    unlink(me.sun_path);
    /* Bound in our context's directory, so the creator learns our context from the kernel. */
    if (bind(fd, (struct sockaddr *)&me, sizeof me) != 0)
        return connect_error(errno);
    while ((rc = connect(fd, (struct sockaddr *)&peer, sizeof peer)) != 0 && errno == EINTR)
        ;
    e = errno;
    unlink(me.sun_path); /* the kernel keeps the address the peer reads */
    return rc == 0 ? VMCI_SUCCESS : connect_error(e);
}

static int connect_vsock(const vsc_local *t, vsc_handle h, int fd, size_t *piece)
{
    struct sockaddr_vm addr;
    int rc;

    if (h.context == VMCI_HYPERVISOR_CONTEXT_ID || h.context == VMADDR_CID_ANY)
        return VMCI_ERROR_DST_UNREACHABLE;
    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = vsc_vsock_cid_of(t->kcid, h.context);
    addr.svm_port = h.resource;
    *piece = vsc_vsock_piece_between(t->kcid, addr.svm_cid);
    while ((rc = connect(fd, (struct sockaddr *)&addr, sizeof addr)) != 0 && errno == EINTR)
        ;
    return rc == 0 ? VMCI_SUCCESS : connect_error(errno);
}

/* A blocking stream connected to the creator of h, with send and receive timeouts of
 * VSC_MIRROR_CONNECT_MS. A VMCI code. */
static int mirror_connect(const vsc_local *t, vsc_handle h, int *out, size_t *piece)
{
    int vsock = t->transport == VSC_TRANSPORT_VSOCK, fd, rc;

    *out = -1;
    *piece = 0;
    if (t->transport == VSC_TRANSPORT_HYBRID) {
        /* Through the guest's VMM, or at a host process's .host path; nothing there is NOT_FOUND. */
        rc = vsc_hybrid_connect_stream(t, h, vsc_now_ms() + VSC_MIRROR_CONNECT_MS, &fd);
        if (rc != VMCI_SUCCESS)
            return rc == VMCI_ERROR_INVALID_RESOURCE ? VMCI_ERROR_NOT_FOUND : rc;
        set_timeout(fd, SO_SNDTIMEO, VSC_MIRROR_CONNECT_MS);
        set_timeout(fd, SO_RCVTIMEO, VSC_MIRROR_CONNECT_MS);
        *out = fd;
        return VMCI_SUCCESS;
    }
    if ((fd = socket(vsock ? AF_VSOCK : AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
        return connect_error(errno);
    set_timeout(fd, SO_SNDTIMEO, VSC_MIRROR_CONNECT_MS);
    set_timeout(fd, SO_RCVTIMEO, VSC_MIRROR_CONNECT_MS);
    rc = vsock ? connect_vsock(t, h, fd, piece) : connect_local(t, h, fd);
    if (rc != VMCI_SUCCESS) {
        close(fd);
        return rc;
    }
    *out = fd;
    return VMCI_SUCCESS;
}

/* A blocking read of the next frame within the socket's receive timeout: 1, or a VMCI code
 * (VMCI_ERROR_NOT_FOUND when the creator closed, VMCI_ERROR_TIMEOUT, VMCI_ERROR_GENERIC for
 * something that is not a frame). */
static int read_frame(vsc_reader *r, int fd, vsc_frame *f)
{
    int rc;

    for (;;) {
        rc = vsc_reader_next(r, f);
        if (rc != 0)
            return rc > 0 ? 1 : VMCI_ERROR_GENERIC;
        rc = vsc_reader_fill(r, fd, 0);
        if (rc == VSC_READ_EOF)
            return VMCI_ERROR_NOT_FOUND;
        if (rc == VSC_READ_AGAIN)
            return VMCI_ERROR_TIMEOUT;
        if (rc < 0)
            return errno == ECONNRESET ? VMCI_ERROR_NOT_FOUND : VMCI_ERROR_GENERIC;
    }
}

int vsc_mirror_query(const vsc_local *t, vsc_handle h, uint32_t *size)
{
    vsc_reader r = {0};
    vsc_out o = {0};
    vsc_frame f;
    size_t piece;
    int fd, rc;

    *size = 0;
    if ((rc = mirror_connect(t, h, &fd, &piece)) != VMCI_SUCCESS)
        return rc;
    if (vsc_out_frame(&o, VSC_MIRROR_QUERY, 0, NULL, 0) != 0 || vsc_out_send(&o, fd, piece) != 0)
        rc = errno == EAGAIN ? VMCI_ERROR_TIMEOUT : VMCI_ERROR_NOT_FOUND;
    else if ((rc = read_frame(&r, fd, &f)) == 1)
        rc = f.type != VSC_MIRROR_SIZE || f.arg == 0 ? VMCI_ERROR_GENERIC
             : f.arg > UINT32_MAX                     ? VMCI_ERROR_INVALID_SIZE
                                                      : VMCI_SUCCESS;
    if (rc == VMCI_SUCCESS)
        *size = (uint32_t)f.arg;
    vsc_out_free(&o);
    vsc_reader_free(&r);
    close(fd);
    return rc;
}

/* The attacher */

typedef struct {
    uint64_t n, start, end;   /* our n-th UPDATE covered [start, end) */
} sent_run;

typedef struct {
    vsc_copy copy;
    int sock;                 /* the creator's stream; closed by the thread when it ends */
    int wake[2];              /* pipe: Detach wakes the thread */
    size_t piece;             /* bytes per send() (vsc_vsock_piece_between) */
    pthread_t thread;
    int stopping;             /* atomic: Detach asked the thread to flush, say BYE and end */
    int lost;                 /* atomic: the creator's stream is gone */
    vsc_reader reader;        /* the thread's, after the handshake */
    vsc_out out;
    uint64_t sent;            /* UPDATE frames sent */
    sent_run *unacked;        /* [head, count): sent, not acknowledged by the creator yet */
    size_t head, count, cap;
} attacher;

static int remember_sent(void *arg, size_t start, size_t len)
{
    attacher *a = arg;

    if (a->head > 0 && a->head == a->count)
        a->head = a->count = 0;
    if (a->count == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 64;
        sent_run *grown = realloc(a->unacked, cap * sizeof *grown);

        if (grown == NULL)
            return -1;
        a->unacked = grown;
        a->cap = cap;
    }
    a->unacked[a->count].n = ++a->sent;
    a->unacked[a->count].start = start;
    a->unacked[a->count].end = start + len;
    a->count++;
    return 0;
}

static void flush_changes(attacher *a)
{
    if (vsc_copy_scan(&a->copy, &a->out, remember_sent, a) != 0 || vsc_out_send(&a->out, a->sock, a->piece) != 0)
        __atomic_store_n(&a->lost, 1, __ATOMIC_RELEASE);
}

/* Apply an update except where bytes we sent, not yet applied by the creator, lie: those are
 * applied there after it, so they win here as there (mirror.py _Client._receive). */
static void apply_outside(attacher *a, uint64_t offset, const uint8_t *data, uint64_t len)
{
    uint64_t pos = offset, end = offset + len;
    size_t i;

    while (pos < end) {
        uint64_t stop = end;
        int covered = 0;

        for (i = a->head; i < a->count; i++) {
            const sent_run *s = &a->unacked[i];
            if (s->start <= pos && pos < s->end) {
                pos = s->end;
                covered = 1;
                break;
            }
            if (s->start > pos && s->start < stop)
                stop = s->start;
        }
        if (covered)
            continue;
        vsc_copy_apply(&a->copy, pos, data + (pos - offset), (size_t)(stop - pos));
        pos = stop;
    }
}

/* 0, or -1 when the stream is to be dropped (a frame out of turn or not one). */
static int handle(attacher *a, const vsc_frame *f, int *scanned)
{
    switch (f->type) {
    case VSC_MIRROR_UPDATE:
        if (!vsc_valid_update(f, a->copy.size))
            return -1;
        if (!*scanned) {
            flush_changes(a); /* our pending writes go first */
            *scanned = 1;
        }
        apply_outside(a, f->arg, f->payload, f->len);
        return 0;
    case VSC_MIRROR_ACK:
        if (f->arg > a->sent)
            return -1;
        while (a->head < a->count && a->unacked[a->head].n <= f->arg)
            a->head++;
        return 0;
    case VSC_MIRROR_FLUSH:
        flush_changes(a);
        if (vsc_out_frame(&a->out, VSC_MIRROR_FLUSHED, f->arg, NULL, 0) != 0
            || vsc_out_send(&a->out, a->sock, a->piece) != 0)
            __atomic_store_n(&a->lost, 1, __ATOMIC_RELEASE);
        return 0;
    default:
        return -1;
    }
}

/* Handle the frames received, first reading what the socket has if fill (0: what the handshake
 * left in the reader). The end of the stream or a frame that is not one loses the creator. */
static void receive(attacher *a, int fill)
{
    vsc_frame f;
    int rc = fill ? vsc_reader_fill(&a->reader, a->sock, MSG_DONTWAIT) : 1, scanned = 0;
    int ended = rc == VSC_READ_EOF || rc < 0;

    if (rc == VSC_READ_AGAIN)
        return;
    while (!__atomic_load_n(&a->lost, __ATOMIC_ACQUIRE) && (rc = vsc_reader_next(&a->reader, &f)) != 0)
        if (rc < 0 || handle(a, &f, &scanned) != 0)
            __atomic_store_n(&a->lost, 1, __ATOMIC_RELEASE);
    if (ended)
        __atomic_store_n(&a->lost, 1, __ATOMIC_RELEASE);
}

static void *attacher_main(void *arg)
{
    attacher *a = arg;
    char drain[64];

    receive(a, 0);
    while (!__atomic_load_n(&a->lost, __ATOMIC_ACQUIRE)) {
        struct pollfd p[2] = {{a->sock, POLLIN, 0}, {a->wake[0], POLLIN, 0}};

        if (__atomic_load_n(&a->stopping, __ATOMIC_ACQUIRE)) {
            flush_changes(a);
            if (vsc_out_frame(&a->out, VSC_MIRROR_BYE, 0, NULL, 0) == 0)
                vsc_out_send(&a->out, a->sock, a->piece);
            break;
        }
        if (poll(p, 2, vsc_copy_wait_ms(&a->copy)) < 0 && errno != EINTR)
            break;
        if (p[1].revents)
            while (read(a->wake[0], drain, sizeof drain) > 0)
                ;
        if (p[0].revents)
            receive(a, 1);
        if (!__atomic_load_n(&a->lost, __ATOMIC_ACQUIRE) && vsc_copy_due(&a->copy))
            flush_changes(a);
    }
    __atomic_store_n(&a->lost, 1, __ATOMIC_RELEASE);
    close(a->sock);
    a->sock = -1;
    return NULL;
}

/* The handshake after HELLO: SIZE (checked against asked), the region as UPDATE frames (into a
 * fresh copy), FLUSHED 0. A VMCI code. */
static int welcome(attacher *a, uint32_t asked)
{
    vsc_frame f;
    int rc, sized = 0;

    for (;;) {
        if ((rc = read_frame(&a->reader, a->sock, &f)) != 1)
            return rc;
        if (!sized && f.type == VSC_MIRROR_REFUSE) {
            int64_t code = (int64_t)f.arg;
            return code < 0 && code >= INT32_MIN ? (int)code : VMCI_ERROR_GENERIC;
        }
        if (!sized && f.type == VSC_MIRROR_SIZE && f.arg > 0) {
            if (f.arg > UINT32_MAX || (asked != 0 && f.arg != asked))
                return VMCI_ERROR_INVALID_SIZE;
            if (!vsc_memory_fits(f.arg))
                return VMCI_ERROR_NO_MEM;
            if ((rc = vsc_copy_init(&a->copy, f.arg)) != VMCI_SUCCESS)
                return rc;
            sized = 1;
        } else if (sized && f.type == VSC_MIRROR_UPDATE && vsc_valid_update(&f, a->copy.size)) {
            vsc_copy_apply(&a->copy, f.arg, f.payload, f.len);
        } else if (sized && f.type == VSC_MIRROR_FLUSHED && f.arg == 0) {
            return VMCI_SUCCESS;
        } else {
            return VMCI_ERROR_GENERIC;
        }
    }
}

static void attacher_free(attacher *a, int unmap)
{
    if (a->sock >= 0)
        close(a->sock);
    if (a->wake[0] >= 0) {
        close(a->wake[0]);
        close(a->wake[1]);
    }
    vsc_copy_free(&a->copy, unmap);
    vsc_reader_free(&a->reader);
    vsc_out_free(&a->out);
    free(a->unacked);
    free(a);
}

int vsc_mirror_attach(const vsc_local *t, vsc_handle h, uint32_t size, vsc_region **out)
{
    uint8_t cid[4];
    attacher *a;
    int rc;

    *out = NULL;
    if ((a = calloc(1, sizeof *a)) == NULL)
        return VMCI_ERROR_NO_MEM;
    a->wake[0] = a->wake[1] = -1;
    if ((rc = mirror_connect(t, h, &a->sock, &a->piece)) != VMCI_SUCCESS) {
        attacher_free(a, 1);
        return rc;
    }
    vsc_put_u32(cid, t->cid);
    if (vsc_out_frame(&a->out, VSC_MIRROR_HELLO, size, cid, sizeof cid) != 0)
        rc = VMCI_ERROR_NO_MEM;
    else if (vsc_out_send(&a->out, a->sock, a->piece) != 0)
        rc = errno == EAGAIN ? VMCI_ERROR_TIMEOUT : VMCI_ERROR_NOT_FOUND;
    else
        rc = welcome(a, size);
    if (rc == VMCI_SUCCESS && pipe2(a->wake, O_CLOEXEC | O_NONBLOCK) != 0)
        rc = VMCI_ERROR_NO_RESOURCES;
    if (rc == VMCI_SUCCESS && (*out = calloc(1, sizeof **out)) == NULL)
        rc = VMCI_ERROR_NO_MEM;
    if (rc == VMCI_SUCCESS) {
        set_timeout(a->sock, SO_SNDTIMEO, VSC_MIRROR_SEND_MS);
        rc = vsc_start_thread(&a->thread, attacher_main, a);
    }
    if (rc != VMCI_SUCCESS) {
        free(*out);
        *out = NULL;
        attacher_free(a, 1);
        return rc;
    }
    (*out)->handle = h;
    (*out)->size = (uint32_t)a->copy.size;
    (*out)->backing = a->copy.backing;
    (*out)->lock_fd = -1;
    (*out)->addr = a->copy.map;
    (*out)->mirror = a;
    return VMCI_SUCCESS;
}

int vsc_mirror_detach(vsc_region *r)
{
    attacher *a = r->mirror;

    if (r->created) {
        vsc_mirror_serve_detach(r);
        return VMCI_SUCCESS;
    }
    __atomic_store_n(&a->stopping, 1, __ATOMIC_RELEASE);
    if (write(a->wake[1], "", 1) < 0) {
        /* the pipe is full: the thread is being woken anyway */
    }
    pthread_join(a->thread, NULL);
    attacher_free(a, 1);
    free(r);
    return VMCI_SUCCESS;
}

void vsc_mirror_abandon(vsc_region *r)
{
    attacher *a = r->mirror;

    if (r->created) {
        vsc_mirror_serve_abandon(r);
        return;
    }
    /* The parent's thread does not exist here: close our copies of its descriptors only. */
    if (a->sock >= 0)
        close(a->sock);
    close(a->wake[0]);
    close(a->wake[1]);
    free(r);
}
