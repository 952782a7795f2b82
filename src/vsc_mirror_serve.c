/* vsockcompat C core: mirrored shared memory, the creator's side (vsockcompat/mirror.py _Server):
 * one thread per region accepts attachers, mirrors the creator's writes to them, applies theirs. */
#define _GNU_SOURCE
#include "vsc_mirror.h"
#include "vsc_mirror_core.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

#include "vsc_acl.h"
#include "vsc_hybrid.h"
#include "vsc_link.h"
#include "vsc_vsock.h"

#define PATH_BUF 4096

typedef struct {
    int fd;               /* -1 once closed */
    vsc_reader reader;
    int attached;
    uint64_t since;       /* ms, CLOCK_MONOTONIC, when accepted */
    uint64_t applied;     /* UPDATE frames of this attacher applied here */
    size_t piece;
} conn;

typedef struct {
    vsc_copy copy;
    const vsc_local *t;   /* the library's transport: fixed once opened */
    vsc_handle handle;
    int listener;         /* non-blocking (hybrid: bound's epoll fd) */
    vsc_bound bound;      /* hybrid: the listening sockets (bound.set), else unused */
    int registered;       /* vsock: in the in-memory access control (vsc_acl.h) */
    int marker_fd;        /* local: holds LOCK_SH on <rid>.mir for the region's life; else -1 */
    char marker[PATH_BUF];
    int wake[2];
    pthread_t thread;
    int detached;         /* atomic: the creator detached; serve until no attacher is left */
    int attached;         /* atomic: attachers connected */
    int released;         /* atomic: the second of the thread's end and an orphaning Detach frees */
    conn **conns;
    size_t nconns, cap;
    vsc_out out;
} server;

static uint64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* The ".mir" kind of the local id space: alive while its creator holds the marker's flock. */
static int stream_alive(const vsc_local *t, const char *marker)
{
    int fd = open(marker, O_RDONLY | O_CLOEXEC), held;

    (void)t;
    if (fd < 0)
        return errno != ENOENT;
    held = flock(fd, LOCK_EX | LOCK_NB) != 0;
    close(fd);
    return held;
}

__attribute__((constructor)) static void vsc_mirror_load(void)
{
    vsc_local_add_kind(VSC_MIRROR_SUFFIX, stream_alive, NULL);
}

/* Listening */

/* mirror_link._listen_local, under the context lock with rid reserved. */
static int listen_at(const vsc_local *t, const char *cdir, uint32_t rid, void *arg)
{
    server *s = arg;
    struct sockaddr_un addr;
    int fd, sock;

    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    snprintf(s->marker, sizeof s->marker, "%s/%u" VSC_MIRROR_SUFFIX, cdir, (unsigned)rid);
    if ((size_t)snprintf(addr.sun_path, sizeof addr.sun_path, "%s.sock", s->marker) >= sizeof addr.sun_path)
        return VMCI_ERROR_NO_RESOURCES;
    if ((fd = open(s->marker, O_RDWR | O_CREAT | O_CLOEXEC, 0644)) < 0)
        return errno == EACCES ? VMCI_ERROR_NO_ACCESS : VMCI_ERROR_NO_RESOURCES;
    sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    unlink(addr.sun_path);
    if (sock < 0 || flock(fd, LOCK_SH) != 0 || bind(sock, (struct sockaddr *)&addr, sizeof addr) != 0
        || listen(sock, SOMAXCONN) != 0) {
        if (sock >= 0)
            close(sock);
        close(fd);
        unlink(addr.sun_path);
        unlink(s->marker);
        return VMCI_ERROR_NO_RESOURCES;
    }
    s->handle.context = t->cid;
    s->handle.resource = rid;
    s->listener = sock;
    s->marker_fd = fd;
    return VMCI_SUCCESS;
}

/* No runtime directory to find the region by (vsock, hybrid): access control learns of it from
 * us (mirror_link.listen). A VMCI code; server_free closes the listener. */
static int own(server *s)
{
    if (vsc_acl_memory_register(s->handle, VSC_KIND_SHAREDMEM, NULL) != 0)
        return VMCI_ERROR_NO_MEM;
    s->registered = 1;
    return VMCI_SUCCESS;
}

/* mirror_link._listen_vsock: a free port, as the vsock transport's endpoints take them. */
static int listen_vsock(const vsc_local *t, server *s)
{
    uint32_t rid;
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0), rc;

    if (fd < 0)
        return VMCI_ERROR_NO_RESOURCES;
    if ((rc = vsc_vsock_bind_rid(fd, VMCI_INVALID_ID, &rid)) != VMCI_SUCCESS || listen(fd, SOMAXCONN) != 0) {
        close(fd);
        return rc != VMCI_SUCCESS ? rc : VMCI_ERROR_NO_RESOURCES;
    }
    s->handle.context = t->cid;
    s->handle.resource = rid;
    s->listener = fd;
    return own(s);
}

/* mirror_link.listen on hybrid: where every VMM delivers its guest's connections to port rid,
 * and the .host paths, in the id space of the endpoints (src/vsc_hybrid.h). */
static int listen_hybrid(const vsc_local *t, server *s)
{
    int rc = vsc_hybrid_listen(t, VMCI_INVALID_ID, &s->bound);

    if (rc != VMCI_SUCCESS)
        return rc;
    s->handle = s->bound.handle;
    s->listener = s->bound.listener;
    return own(s);
}

/* The context of an accepted attacher claiming claimed, as the kernel says; VMCI_INVALID_ID if
 * the claim is false (mirror_link.peer_context). */
static uint32_t peer_context(const server *s, int fd, uint32_t claimed)
{
    const vsc_local *t = s->t;

    if (t->transport == VSC_TRANSPORT_VSOCK) {
        struct sockaddr_vm addr;
        socklen_t len = sizeof addr;

        if (getpeername(fd, (struct sockaddr *)&addr, &len) != 0)
            return VMCI_INVALID_ID;
        return addr.svm_cid == VMADDR_CID_LOCAL ? t->kcid : addr.svm_cid;
    } else if (t->transport == VSC_TRANSPORT_HYBRID) {
        return vsc_hybrid_stream_peer(t, fd, claimed);
    } else {
        /* Bound in c<claimed>/ by the user who owns that directory (LocalTransport.peer_in_context). */
        struct sockaddr_un addr;
        socklen_t len = sizeof addr;
        struct ucred cred;
        socklen_t clen = sizeof cred;
        char cdir[PATH_BUF];
        const char *slash;
        struct stat st;
        size_t n;

        memset(&addr, 0, sizeof addr);
        if (getpeername(fd, (struct sockaddr *)&addr, &len) != 0 || len <= offsetof(struct sockaddr_un, sun_path))
            return VMCI_INVALID_ID;
        n = strnlen(addr.sun_path, len - offsetof(struct sockaddr_un, sun_path));
        snprintf(cdir, sizeof cdir, "%s/c%u", t->rundir, (unsigned)claimed);
        slash = memrchr(addr.sun_path, '/', n);
        if (slash == NULL || (size_t)(slash - addr.sun_path) != strlen(cdir)
            || memcmp(addr.sun_path, cdir, strlen(cdir)) != 0)
            return VMCI_INVALID_ID;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) != 0 || stat(cdir, &st) != 0
            || cred.uid != st.st_uid)
            return VMCI_INVALID_ID;
        return claimed;
    }
}

/* Connections */

static void close_conn(server *s, conn *c)
{
    if (c->fd < 0)
        return;
    close(c->fd);
    c->fd = -1;
    if (c->attached)
        __atomic_sub_fetch(&s->attached, 1, __ATOMIC_ACQ_REL);
    c->attached = 0;
}

static int send_to(server *s, conn *c, const uint8_t *buf, size_t len)
{
    if (c->fd >= 0 && vsc_send_pieces(c->fd, buf, len, c->piece) != 0) {
        close_conn(s, c); /* gone, or it read nothing for VSC_MIRROR_SEND_MS */
        return -1;
    }
    return 0;
}

static int send_frame(server *s, conn *c, int type, uint64_t arg)
{
    vsc_out o = {0};
    int rc = vsc_out_frame(&o, type, arg, NULL, 0) == 0 ? send_to(s, c, o.buf, o.len) : -1;

    vsc_out_free(&o);
    return rc;
}

/* Send what s->out holds to every attacher but exclude, and empty it. */
static void relay(server *s, const conn *exclude)
{
    size_t i;

    for (i = 0; i < s->nconns; i++)
        if (s->conns[i]->attached && s->conns[i] != exclude)
            send_to(s, s->conns[i], s->out.buf, s->out.len);
    s->out.len = 0;
}

static void broadcast_changes(server *s)
{
    if (vsc_copy_scan(&s->copy, &s->out, NULL, NULL) == 0)
        relay(s, NULL);
    s->out.len = 0;
}

static void accept_conn(server *s)
{
    conn *c;
    int fd = s->bound.set != NULL ? vsc_hybrid_accept(&s->bound) : accept4(s->listener, NULL, NULL, SOCK_CLOEXEC);

    if (fd < 0)
        return;
    if (s->nconns == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 8;
        conn **grown = realloc(s->conns, cap * sizeof *grown);
        if (grown == NULL) {
            close(fd);
            return;
        }
        s->conns = grown;
        s->cap = cap;
    }
    if ((c = calloc(1, sizeof *c)) == NULL) {
        close(fd);
        return;
    }
    {
        struct timeval tv = {VSC_MIRROR_SEND_MS / 1000, (VSC_MIRROR_SEND_MS % 1000) * 1000};
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    }
    if (s->t->transport == VSC_TRANSPORT_VSOCK) {
        struct sockaddr_vm addr;
        socklen_t len = sizeof addr;
        if (getpeername(fd, (struct sockaddr *)&addr, &len) == 0)
            c->piece = vsc_vsock_piece_between(s->t->kcid, addr.svm_cid);
    }
    c->fd = fd;
    c->since = now_ms();
    s->conns[s->nconns++] = c;
}

/* HELLO or QUERY from a new connection (mirror.py _Server._greet). */
static void greet(server *s, conn *c, const vsc_frame *f)
{
    uint32_t cid;

    if (f->type == VSC_MIRROR_QUERY && f->len == 0) {
        send_frame(s, c, VSC_MIRROR_SIZE, s->copy.size);
        close_conn(s, c);
        return;
    }
    if (f->type != VSC_MIRROR_HELLO || f->len != 4) {
        close_conn(s, c);
        return;
    }
    if (f->arg != 0 && f->arg != s->copy.size) {
        send_frame(s, c, VSC_MIRROR_REFUSE, (uint64_t)(int64_t)VMCI_ERROR_INVALID_SIZE);
        close_conn(s, c);
        return;
    }
    cid = peer_context(s, c->fd, vsc_get_u32(f->payload));
    if (cid == VMCI_INVALID_ID || !vsc_acl_may_attach(s->t, cid, s->handle)) {
        send_frame(s, c, VSC_MIRROR_REFUSE, (uint64_t)(int64_t)VMCI_ERROR_NO_ACCESS);
        close_conn(s, c);
        return;
    }
    broadcast_changes(s);
    /* SIZE, the whole region (the shadow: what the others have), FLUSHED 0. */
    if (vsc_out_frame(&s->out, VSC_MIRROR_SIZE, s->copy.size, NULL, 0) == 0) {
        size_t off, n;
        int ok = 1;

        for (off = 0; ok && off < s->copy.size; off += n) {
            n = s->copy.size - off < VSC_MIRROR_MAX_PAYLOAD ? s->copy.size - off : VSC_MIRROR_MAX_PAYLOAD;
            ok = vsc_out_frame(&s->out, VSC_MIRROR_UPDATE, off, s->copy.shadow + off, (uint32_t)n) == 0;
        }
        if (ok && vsc_out_frame(&s->out, VSC_MIRROR_FLUSHED, 0, NULL, 0) == 0
            && send_to(s, c, s->out.buf, s->out.len) == 0) {
            c->attached = 1;
            __atomic_add_fetch(&s->attached, 1, __ATOMIC_ACQ_REL);
        }
    }
    s->out.len = 0;
    if (!c->attached)
        close_conn(s, c);
}

/* An attached connection's frame: 0, or -1 to drop it (mirror.py _Server._receive). */
static int serve_frame(server *s, conn *c, const vsc_frame *f, int *scanned)
{
    switch (f->type) {
    case VSC_MIRROR_UPDATE:
        if (!vsc_valid_update(f, s->copy.size))
            return -1;
        if (!*scanned) {
            broadcast_changes(s);
            *scanned = 1;
        }
        vsc_copy_apply(&s->copy, f->arg, f->payload, f->len);
        c->applied++;
        if (vsc_out_frame(&s->out, VSC_MIRROR_UPDATE, f->arg, f->payload, f->len) == 0)
            relay(s, c);
        s->out.len = 0;
        return 0;
    case VSC_MIRROR_FLUSH:
        broadcast_changes(s);
        send_frame(s, c, VSC_MIRROR_FLUSHED, f->arg);
        return 0;
    case VSC_MIRROR_FLUSHED:
        return 0; /* an answer to a FLUSH; this side asks for none */
    case VSC_MIRROR_BYE:
        if (f->len != 0)
            return -1;
        close_conn(s, c);
        return 0;
    default:
        return -1;
    }
}

static void receive(server *s, conn *c)
{
    vsc_frame f;
    uint64_t applied = c->applied;
    int rc = vsc_reader_fill(&c->reader, c->fd, MSG_DONTWAIT), scanned = 0;

    if (rc == VSC_READ_AGAIN)
        return;
    if (rc == VSC_READ_EOF || rc < 0) {
        close_conn(s, c);
        return;
    }
    while (c->fd >= 0 && (rc = vsc_reader_next(&c->reader, &f)) != 0) {
        if (rc < 0)
            close_conn(s, c);
        else if (!c->attached)
            greet(s, c, &f);
        else if (serve_frame(s, c, &f, &scanned) != 0)
            close_conn(s, c);
    }
    /* What we send this attacher from now on reflects its updates so far. */
    if (c->fd >= 0 && c->applied != applied)
        send_frame(s, c, VSC_MIRROR_ACK, c->applied);
}

/* Drop closed connections, and those that said nothing for VSC_MIRROR_HELLO_MS. */
static void sweep(server *s)
{
    size_t i, kept = 0;
    uint64_t now = now_ms();

    for (i = 0; i < s->nconns; i++) {
        conn *c = s->conns[i];

        if (c->fd >= 0 && !c->attached && now - c->since > VSC_MIRROR_HELLO_MS)
            close_conn(s, c);
        if (c->fd >= 0) {
            s->conns[kept++] = c;
        } else {
            vsc_reader_free(&c->reader);
            free(c);
        }
    }
    s->nconns = kept;
}

static void server_free(server *s)
{
    size_t i;

    for (i = 0; i < s->nconns; i++) {
        close_conn(s, s->conns[i]);
        vsc_reader_free(&s->conns[i]->reader);
        free(s->conns[i]);
    }
    free(s->conns);
    if (s->marker_fd >= 0) {
        /* mirror_link.Listener.close: the files go first, so that nobody finds them once the
         * region stops answering. */
        char path[PATH_BUF + 8];

        snprintf(path, sizeof path, "%s.sock", s->marker);
        unlink(path);
        unlink(s->marker);
    }
    if (s->bound.set != NULL) {
        vsc_hybrid_unlisten(s->t, &s->bound); /* the paths go first too */
        vsc_hybrid_close_listener(&s->bound); /* and s->listener, its epoll fd */
        s->listener = -1;
    }
    if (s->registered)
        vsc_acl_memory_unregister(s->handle); /* its privileges die with it */
    if (s->listener >= 0)
        close(s->listener);
    if (s->marker_fd >= 0)
        close(s->marker_fd);
    if (s->wake[0] >= 0) {
        close(s->wake[0]);
        close(s->wake[1]);
    }
    vsc_copy_free(&s->copy, 1);
    vsc_out_free(&s->out);
    free(s);
}

static void *server_main(void *arg)
{
    server *s = arg;
    struct pollfd *p = NULL;
    size_t cap = 0, i, n;
    char drain[64];

    for (;;) {
        if (__atomic_load_n(&s->detached, __ATOMIC_ACQUIRE) && __atomic_load_n(&s->attached, __ATOMIC_ACQUIRE) == 0)
            break;
        if (s->nconns + 2 > cap) {
            struct pollfd *grown = realloc(p, (s->nconns + 2) * 2 * sizeof *p);
            if (grown == NULL)
                break;
            p = grown;
            cap = (s->nconns + 2) * 2;
        }
        p[0].fd = s->wake[0];
        p[1].fd = s->listener;
        for (i = 0; i < s->nconns; i++)
            p[i + 2].fd = s->conns[i]->fd;
        n = s->nconns;
        for (i = 0; i < n + 2; i++)
            p[i].events = POLLIN, p[i].revents = 0;
        /* Alone, the creator has nobody to mirror to: it sleeps until a connection comes. */
        if (poll(p, n + 2, n ? vsc_copy_wait_ms(&s->copy) : -1) < 0 && errno != EINTR)
            break;
        if (p[0].revents)
            while (read(s->wake[0], drain, sizeof drain) > 0)
                ;
        for (i = 0; i < n; i++)
            if (p[i + 2].revents && s->conns[i]->fd >= 0)
                receive(s, s->conns[i]);
        if (p[1].revents)
            accept_conn(s);
        if (s->nconns > 0 && vsc_copy_due(&s->copy))
            broadcast_changes(s);
        sweep(s);
    }
    free(p);
    if (__atomic_exchange_n(&s->released, 1, __ATOMIC_ACQ_REL))
        server_free(s);
    return NULL;
}

int vsc_mirror_create(const vsc_local *t, uint32_t size, vsc_region **out)
{
    server *s;
    int rc;

    *out = NULL;
    if (size == 0)
        return VMCI_ERROR_INVALID_SIZE;
    if (!vsc_memory_fits(size))
        return VMCI_ERROR_NO_MEM;
    if ((s = calloc(1, sizeof *s)) == NULL)
        return VMCI_ERROR_NO_MEM;
    s->t = t;
    s->listener = s->marker_fd = s->wake[0] = s->wake[1] = -1;
    if ((rc = vsc_copy_init(&s->copy, size)) != VMCI_SUCCESS) {
        free(s);
        return rc;
    }
    rc = t->transport == VSC_TRANSPORT_VSOCK    ? listen_vsock(t, s)
         : t->transport == VSC_TRANSPORT_HYBRID ? listen_hybrid(t, s)
                                                : vsc_local_allocate(t, VMCI_INVALID_ID, listen_at, s);
    if (rc == VMCI_SUCCESS && pipe2(s->wake, O_CLOEXEC | O_NONBLOCK) != 0)
        rc = VMCI_ERROR_NO_RESOURCES;
    if (rc == VMCI_SUCCESS && (*out = calloc(1, sizeof **out)) == NULL)
        rc = VMCI_ERROR_NO_MEM;
    if (rc == VMCI_SUCCESS)
        rc = vsc_start_thread(&s->thread, server_main, s);
    if (rc != VMCI_SUCCESS) {
        free(*out);
        *out = NULL;
        server_free(s);
        return rc;
    }
    (*out)->handle = s->handle;
    (*out)->size = size;
    (*out)->backing = s->copy.backing;
    (*out)->lock_fd = -1;
    (*out)->addr = s->copy.map;
    (*out)->mirror = s;
    (*out)->created = 1;
    return VMCI_SUCCESS;
}

void vsc_mirror_serve_detach(vsc_region *r)
{
    server *s = r->mirror;

    free(r);
    __atomic_store_n(&s->detached, 1, __ATOMIC_RELEASE);
    if (write(s->wake[1], "", 1) < 0) {
        /* the pipe is full: the thread is being woken anyway */
    }
    if (__atomic_load_n(&s->attached, __ATOMIC_ACQUIRE) == 0) {
        pthread_join(s->thread, NULL); /* nobody to serve: the region goes now */
        server_free(s);
        return;
    }
    /* The thread serves the attachers until the last one leaves, then frees everything. */
    pthread_detach(s->thread);
    if (__atomic_exchange_n(&s->released, 1, __ATOMIC_ACQ_REL))
        server_free(s);
}

void vsc_mirror_serve_abandon(vsc_region *r)
{
    server *s = r->mirror;
    size_t i;

    /* The parent's thread does not exist here: close our copies of its descriptors only. The
     * marker's flock is shared with the parent's descriptor, so closing ours keeps it held. */
    for (i = 0; i < s->nconns; i++)
        if (s->conns[i]->fd >= 0)
            close(s->conns[i]->fd);
    if (s->bound.set != NULL)
        vsc_hybrid_close_listener(&s->bound); /* its sockets and epoll fd; the paths stay the parent's */
    else
        close(s->listener);
    if (s->marker_fd >= 0)
        close(s->marker_fd);
    close(s->wake[0]);
    close(s->wake[1]);
    free(r);
}
