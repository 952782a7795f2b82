/* vsockcompat C core: the hybrid transport (the paths and handshake of vsockcompat/transport/hybrid.py). */
#define _GNU_SOURCE
#include "vsc_hybrid.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/epoll.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "vsc_policy.h"
#include "vsc_vsock.h"

#define MAX_VMMS 32
#define FIRST_AUTO_RID (VMCI_RESERVED_RESOURCE_ID_MAX + 1)
#define MAX_PORT 0xFFFFFFFEu
#define DEFAULT_GUEST_CID 3 /* _settings.DEFAULT_HYBRID_CID */
#define LONGEST_SUFFIX "_4294967295" VSC_HYBRID_HOST_SUFFIX
#define SO_ACCEPTCON_FLAG 0x10000 /* /proc/net/unix "Flags" of a listening socket */
#define AUTO_RID_TRIES 65536

struct vsc_hybrid {
    int n;
    struct {
        char uds[VSC_SUN_PATH_MAX + 1]; /* absolute */
        uint32_t cid;
    } vmm[MAX_VMMS];
};

/* The sockets of one endpoint: at <uds>_<rid> of every VMM socket, then at <uds>_<rid>.host. */
struct vsc_hybrid_set {
    int n;
    int fds[2 * MAX_VMMS];
};

static pthread_mutex_t g_rid_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t g_next_rid = FIRST_AUTO_RID; /* under g_rid_lock */

static int is_host_context(uint32_t context)
{
    return context == VMCI_WELL_KNOWN_CONTEXT_ID || context == VMCI_HOST_CONTEXT_ID;
}

/* Opening */

static int parse_u32(const char *p, const char *end, uint32_t *out)
{
    unsigned long long v = 0;

    while (p < end && (*p == ' ' || (*p >= '\t' && *p <= '\r')))
        p++;
    if (p < end && *p == '+')
        p++;
    if (p == end)
        return -1;
    for (; p < end && *p >= '0' && *p <= '9'; p++)
        if ((v = v * 10 + (unsigned)(*p - '0')) > 0xFFFFFFFFull)
            return -1;
    while (p < end && (*p == ' ' || (*p >= '\t' && *p <= '\r')))
        p++;
    if (p != end)
        return -1;
    *out = (uint32_t)v;
    return 0;
}

static int refuse(const char *why, const char *what)
{
    fprintf(stderr, "vsockcompat: %s%s\n", why, what);
    return -1;
}

/* The VMM socket paths of VSOCKCOMPAT_HYBRID_UDS into h (made absolute). */
static int parse_paths(const char *uds, struct vsc_hybrid *h)
{
    const char *p = uds;

    for (;;) {
        const char *colon = strchr(p, ':');
        size_t len = colon ? (size_t)(colon - p) : strlen(p);
        char part[4096];
        char *out = h->vmm[h->n].uds;

        if (len == 0)
            return refuse("VSOCKCOMPAT_HYBRID_UDS has an empty path in ", uds);
        if (h->n == MAX_VMMS)
            return refuse("VSOCKCOMPAT_HYBRID_UDS names too many sockets for libvmci.so.0: ", uds);
        if (len < sizeof part) {
            memcpy(part, p, len);
            part[len] = '\0';
        }
        if (len >= sizeof part || vsc_abspath(part, out, sizeof h->vmm[h->n].uds) != 0
            || strlen(out) + strlen(LONGEST_SUFFIX) > VSC_SUN_PATH_MAX)
            return refuse("the VMM socket path is too long for Unix socket paths with a port suffix: ", uds);
        h->n++;
        if (colon == NULL)
            return 0;
        p = colon + 1;
    }
}

/* The guest CIDs of VSOCKCOMPAT_HYBRID_CID into h (one per path). */
static int parse_cids(const char *cids, struct vsc_hybrid *h)
{
    const char *p = cids;
    int i = 0;

    if (cids == NULL || cids[0] == '\0') {
        if (h->n != 1)
            return refuse("VSOCKCOMPAT_HYBRID_CID must give one guest CID per socket of VSOCKCOMPAT_HYBRID_UDS", "");
        h->vmm[0].cid = DEFAULT_GUEST_CID;
        return 0;
    }
    for (;; i++) {
        const char *colon = strchr(p, ':');
        const char *end = colon ? colon : p + strlen(p);
        uint32_t cid;

        if (parse_u32(p, end, &cid) != 0 || cid <= VMCI_HOST_CONTEXT_ID || cid == VMCI_INVALID_ID)
            return refuse("VSOCKCOMPAT_HYBRID_CID must hold decimal guest CIDs in 3..4294967294, "
                          "separated by ':', not ", cids);
        if (i < h->n)
            h->vmm[i].cid = cid;
        if (colon == NULL)
            break;
        p = colon + 1;
    }
    if (i + 1 != h->n)
        return refuse("VSOCKCOMPAT_HYBRID_CID must give one guest CID per socket of VSOCKCOMPAT_HYBRID_UDS: ", cids);
    return 0;
}

static int check_vmms(const struct vsc_hybrid *h)
{
    int i, j;

    for (i = 0; i < h->n; i++) {
        char dir[sizeof h->vmm[i].uds];
        struct stat st;

        strcpy(dir, h->vmm[i].uds);
        *strrchr(dir, '/') = '\0';
        if (stat(dir[0] ? dir : "/", &st) != 0 || !S_ISDIR(st.st_mode))
            return refuse("the directory of the VMM socket does not exist: ", h->vmm[i].uds);
        for (j = 0; j < i; j++) {
            if (strcmp(h->vmm[i].uds, h->vmm[j].uds) == 0)
                return refuse("VSOCKCOMPAT_HYBRID_UDS names a socket twice: ", h->vmm[i].uds);
            if (h->vmm[i].cid == h->vmm[j].cid)
                return refuse("VSOCKCOMPAT_HYBRID_CID names a guest CID twice", "");
        }
    }
    return 0;
}

int vsc_hybrid_open(vsc_local *t)
{
    const char *uds = getenv("VSOCKCOMPAT_HYBRID_UDS");
    struct vsc_hybrid *h;

    if (uds == NULL || uds[0] == '\0')
        return refuse("the hybrid transport needs VSOCKCOMPAT_HYBRID_UDS, the path of the VMM's "
                      "hybrid-vsock Unix socket", "");
    if (!is_host_context(t->cid)) {
        fprintf(stderr, "vsockcompat: on the hybrid transport a process is in context 2 (the host) or 1 "
                        "(the discovery service), not in %u\n", (unsigned)t->cid);
        return -1;
    }
    if ((h = calloc(1, sizeof *h)) == NULL)
        return refuse("out of memory", "");
    if (parse_paths(uds, h) != 0 || parse_cids(getenv("VSOCKCOMPAT_HYBRID_CID"), h) != 0 || check_vmms(h) != 0) {
        free(h);
        return -1;
    }
    t->hybrid = h; /* fixed from now on, as the rest of t */
    t->well_known = t->cid == VMCI_WELL_KNOWN_CONTEXT_ID;
    t->vsock_mode = VSC_VSOCK_STREAM; /* the framing of the streams: vsock's stream mode */
    return 0;
}

/* Paths */

static int port_path(const struct vsc_hybrid *h, int i, uint32_t rid, int host, struct sockaddr_un *addr)
{
    memset(addr, 0, sizeof *addr);
    addr->sun_family = AF_UNIX;
    return snprintf(addr->sun_path, sizeof addr->sun_path, "%s_%u%s", h->vmm[i].uds, (unsigned)rid,
                    host ? VSC_HYBRID_HOST_SUFFIX : "") < (int)sizeof addr->sun_path ? 0 : -1;
}

/* The i-th path of an endpoint's set: <uds>_<rid> of every socket, then their .host ones. */
static void set_path(const struct vsc_hybrid *h, int i, uint32_t rid, struct sockaddr_un *addr)
{
    port_path(h, i % h->n, rid, i >= h->n, addr);
}

/* Endpoints */

static int open_error(int e);

/* Whether something listens at addr. Never blocks (it runs under the claim lock): a listener
 * whose backlog is full (EAGAIN) is alive. */
static int listening(const struct sockaddr_un *addr)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0), rc;

    if (fd < 0)
        return 1; /* cannot tell: leave the file alone */
    rc = connect(fd, (const struct sockaddr *)addr, sizeof *addr) == 0 || errno == EAGAIN;
    close(fd);
    return rc;
}

/* The claim lock of transport/hybrid.py ("Claiming a port"): flock on every directory of the VMM
 * sockets, in (device, inode) order, so that a claim in progress (bound, not yet listening) is
 * never taken for a dead one by another process. */
struct claim_lock {
    int n;
    struct {
        dev_t dev;
        ino_t ino;
        int fd;
    } dirs[MAX_VMMS];
};

static void claim_release(struct claim_lock *lock)
{
    int i;

    for (i = 0; i < lock->n; i++)
        close(lock->dirs[i].fd); /* releases its flock */
    lock->n = 0;
}

static int dir_before(const struct claim_lock *lock, int a, int b)
{
    return lock->dirs[a].dev != lock->dirs[b].dev ? lock->dirs[a].dev < lock->dirs[b].dev
                                                  : lock->dirs[a].ino < lock->dirs[b].ino;
}

/* VMCI_SUCCESS with every lock held, VMCI_ERROR_TIMEOUT after VSC_HYBRID_CLAIM_TIMEOUT_MS, or
 * another VMCI code (nothing held). */
static int claim_acquire(const struct vsc_hybrid *h, struct claim_lock *lock)
{
    char dir[VSC_SUN_PATH_MAX + 1];
    struct timespec pause;
    int64_t deadline = vsc_now_ms() + VSC_HYBRID_CLAIM_TIMEOUT_MS;
    long pause_us;
    int i, j;

    lock->n = 0;
    for (i = 0; i < h->n; i++) {
        struct stat st;
        char *slash;
        int fd;

        memcpy(dir, h->vmm[i].uds, sizeof dir);
        slash = strrchr(dir, '/'); /* the paths are absolute */
        if (slash == dir)
            slash[1] = '\0';
        else if (slash != NULL)
            *slash = '\0';
        if ((fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0 || fstat(fd, &st) != 0) {
            int e = errno;

            if (fd >= 0)
                close(fd);
            claim_release(lock);
            return open_error(e);
        }
        for (j = 0; j < lock->n && !(lock->dirs[j].dev == st.st_dev && lock->dirs[j].ino == st.st_ino); j++)
            ;
        if (j < lock->n) { /* one directory by two names: one lock */
            close(fd);
            continue;
        }
        lock->dirs[lock->n].dev = st.st_dev;
        lock->dirs[lock->n].ino = st.st_ino;
        lock->dirs[lock->n].fd = fd;
        for (j = lock->n++; j > 0 && dir_before(lock, j, j - 1); j--) { /* insertion sort */
            __typeof__(lock->dirs[0]) tmp = lock->dirs[j];

            lock->dirs[j] = lock->dirs[j - 1];
            lock->dirs[j - 1] = tmp;
        }
    }
    for (i = 0; i < lock->n; i++) {
        pause_us = 1000;
        while (flock(lock->dirs[i].fd, LOCK_EX | LOCK_NB) != 0) {
            if ((errno != EWOULDBLOCK && errno != EINTR) || vsc_now_ms() >= deadline) {
                int timed_out = errno == EWOULDBLOCK || errno == EINTR;

                claim_release(lock);
                return timed_out ? VMCI_ERROR_TIMEOUT : VMCI_ERROR_GENERIC;
            }
            pause.tv_sec = 0;
            pause.tv_nsec = pause_us * 1000;
            nanosleep(&pause, NULL);
            pause_us = pause_us * 2 < 50000 ? pause_us * 2 : 50000;
        }
    }
    return VMCI_SUCCESS;
}

/* Bind fd at addr, reclaiming the file of a dead listener: 0, 1 (a live listener holds it), or -1 (errno). */
static int bind_path(int fd, const struct sockaddr_un *addr)
{
    int tries;

    for (tries = 0; tries < 2; tries++) {
        if (bind(fd, (const struct sockaddr *)addr, sizeof *addr) == 0)
            return 0;
        if (errno != EADDRINUSE)
            return -1;
        if (listening(addr))
            return 1;
        unlink(addr->sun_path);
    }
    return 1;
}

static void close_set(struct vsc_hybrid_set *set, int n)
{
    int i;

    for (i = 0; i < n; i++)
        close(set->fds[i]);
}

static int open_error(int e)
{
    if (e == EACCES || e == EPERM)
        return VMCI_ERROR_NO_ACCESS;
    return e == EMFILE || e == ENFILE || e == ENOMEM || e == ENOBUFS ? VMCI_ERROR_NO_RESOURCES : VMCI_ERROR_GENERIC;
}

/* Listening sockets at every path of rid into set: 1, 0 if a live listener holds one, or a VMCI code. */
static int try_bind(const struct vsc_hybrid *h, uint32_t rid, struct vsc_hybrid_set *set)
{
    struct sockaddr_un addr;
    int i, rc = 1, opened = 0, bound = 0;

    set->n = 2 * h->n;
    for (i = 0; i < set->n; i++) {
        set_path(h, i, rid, &addr);
        if ((set->fds[i] = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)) < 0) {
            rc = open_error(errno);
            break;
        }
        opened++;
        if ((rc = bind_path(set->fds[i], &addr)) != 0) {
            rc = rc == 1 ? 0 : open_error(errno);
            break;
        }
        rc = 1;
        bound++;
    }
    if (rc == 1) {
        for (i = 0; i < set->n && listen(set->fds[i], SOMAXCONN) == 0; i++)
            ;
        if (i == set->n)
            return 1;
        rc = VMCI_ERROR_NO_RESOURCES;
    }
    for (i = 0; i < bound; i++) { /* the paths bound so far are ours: give them back */
        set_path(h, i, rid, &addr);
        unlink(addr.sun_path);
    }
    close_set(set, opened);
    return rc;
}

static uint32_t next_rid(uint32_t rid)
{
    return rid < MAX_PORT ? rid + 1 : FIRST_AUTO_RID;
}

static int bind_rid_locked(const struct vsc_hybrid *h, uint32_t resource, struct vsc_hybrid_set *set,
                           uint32_t *rid)
{
    int tries, rc;

    if (resource != VMCI_INVALID_ID) {
        *rid = resource;
        rc = try_bind(h, resource, set);
        return rc == 1 ? VMCI_SUCCESS : rc == 0 ? VMCI_ERROR_DUPLICATE_ENTRY : rc;
    }
    pthread_mutex_lock(&g_rid_lock);
    *rid = g_next_rid;
    pthread_mutex_unlock(&g_rid_lock);
    for (tries = 0; tries < AUTO_RID_TRIES; tries++, *rid = next_rid(*rid)) {
        if ((rc = try_bind(h, *rid, set)) == 0)
            continue;
        if (rc == 1) {
            pthread_mutex_lock(&g_rid_lock);
            g_next_rid = next_rid(*rid);
            pthread_mutex_unlock(&g_rid_lock);
            return VMCI_SUCCESS;
        }
        return rc;
    }
    return VMCI_ERROR_NO_RESOURCES;
}

/* Bind set at resource, or at the next free id from the last one given, under the claim lock;
 * a VMCI code. */
static int bind_rid(const struct vsc_hybrid *h, uint32_t resource, struct vsc_hybrid_set *set, uint32_t *rid)
{
    struct claim_lock lock;
    int rc = claim_acquire(h, &lock);

    if (rc != VMCI_SUCCESS)
        return rc;
    rc = bind_rid_locked(h, resource, set, rid);
    claim_release(&lock);
    return rc;
}

static void unlink_paths(const struct vsc_hybrid *h, uint32_t rid)
{
    struct sockaddr_un addr;
    int i;

    for (i = 0; i < 2 * h->n; i++) {
        set_path(h, i, rid, &addr);
        unlink(addr.sun_path);
    }
}

int vsc_hybrid_listen(const vsc_local *t, uint32_t resource, vsc_bound *out)
{
    struct vsc_hybrid_set *set = calloc(1, sizeof *set);
    uint32_t rid = 0;
    int ep = -1, rc, i;

    if (set == NULL)
        return VMCI_ERROR_NO_MEM;
    if ((rc = bind_rid(t->hybrid, resource, set, &rid)) != VMCI_SUCCESS) {
        free(set);
        return rc;
    }
    if ((ep = epoll_create1(EPOLL_CLOEXEC)) < 0)
        goto fail;
    for (i = 0; i < set->n; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = set->fds[i]};

        if (epoll_ctl(ep, EPOLL_CTL_ADD, set->fds[i], &ev) != 0)
            goto fail;
    }
    out->handle.context = t->cid;
    out->handle.resource = rid;
    out->listener = ep;
    out->acct = NULL;
    out->set = set;
    return VMCI_SUCCESS;
fail:
    if (ep >= 0)
        close(ep);
    unlink_paths(t->hybrid, rid);
    close_set(set, set->n);
    free(set);
    return VMCI_ERROR_NO_RESOURCES;
}

int vsc_hybrid_bind(const vsc_local *t, uint32_t resource, vsc_bound *out)
{
    int rc = vsc_hybrid_listen(t, resource, out);

    if (rc != VMCI_SUCCESS)
        return rc;
    if ((out->acct = vsc_private_account()) == NULL) {
        vsc_hybrid_unlisten(t, out);
        vsc_hybrid_close_listener(out);
        return VMCI_ERROR_NO_RESOURCES;
    }
    return VMCI_SUCCESS;
}

void vsc_hybrid_unlisten(const vsc_local *t, const vsc_bound *b)
{
    unlink_paths(t->hybrid, b->handle.resource);
}

void vsc_hybrid_unbind(const vsc_local *t, const vsc_bound *b)
{
    vsc_acct_close(b->acct);
    vsc_hybrid_unlisten(t, b);
}

void vsc_hybrid_close_listener(vsc_bound *b)
{
    close(b->listener);
    if (b->set != NULL) {
        close_set(b->set, b->set->n);
        free(b->set);
        b->set = NULL;
    }
}

int vsc_hybrid_accept(const vsc_bound *b)
{
    int i;

    for (i = 0; i < b->set->n; i++) {
        int fd;

        do {
            fd = accept4(b->set->fds[i], NULL, NULL, SOCK_CLOEXEC);
        } while (fd < 0 && (errno == EINTR || errno == ECONNABORTED));
        if (fd >= 0)
            return fd;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return -1;
    }
    errno = EAGAIN;
    return -1;
}

/* Links */

static int find_vmm(const struct vsc_hybrid *h, uint32_t cid)
{
    int i;

    for (i = 0; i < h->n; i++)
        if (h->vmm[i].cid == cid)
            return i;
    return -1;
}

/* connect() bounded by deadline (the kernel's SO_SNDTIMEO bounds a Unix connect to a full backlog):
 * 0, or -1 (errno; EAGAIN when the deadline passed). */
static int connect_by(int fd, const struct sockaddr_un *addr, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - vsc_now_ms();
        struct timeval tv = {left > 0 ? left / 1000 : 0, left > 0 ? (left % 1000) * 1000 : 1};

        if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) != 0)
            return -1;
        if (connect(fd, (const struct sockaddr *)addr, sizeof *addr) == 0)
            return 0;
        if (errno != EINTR)
            return -1;
    }
}

/* Connect fd to the host endpoint rid at the first .host path where one listens: a VMCI code. */
static int connect_host(const struct vsc_hybrid *h, int fd, uint32_t rid, int64_t deadline)
{
    struct sockaddr_un addr;
    int i;

    for (i = 0; i < h->n; i++) {
        port_path(h, i, rid, 1, &addr);
        if (connect_by(fd, &addr, deadline) == 0)
            return VMCI_SUCCESS;
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINPROGRESS)
            return VMCI_ERROR_TIMEOUT;
        if (errno != ENOENT && errno != ECONNREFUSED)
            return vsc_vsock_error(errno);
    }
    return VMCI_ERROR_INVALID_RESOURCE;
}

/* 1 if reply (n bytes) is exactly "OK <1 to 10 decimal digits, at most 4294967295>\n". */
static int reply_ok(const char *reply, size_t n)
{
    uint32_t port;

    if (n < 5 || n > 14 || memcmp(reply, "OK ", 3) != 0 || reply[n - 1] != '\n')
        return 0;
    for (size_t i = 3; i < n - 1; i++)
        if (reply[i] < '0' || reply[i] > '9')
            return 0;
    return parse_u32(reply + 3, reply + n - 1, &port) == 0;
}

/* "CONNECT <port>\n" through the VMM socket i, its answer read by deadline: a VMCI code. */
static int handshake(const struct vsc_hybrid *h, int i, int fd, uint32_t port, int64_t deadline)
{
    struct sockaddr_un addr;
    char line[32], reply[VSC_HYBRID_MAX_REPLY];
    size_t n = 0;
    int len;

    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path, h->vmm[i].uds, strlen(h->vmm[i].uds));
    if (connect_by(fd, &addr, deadline) != 0) {
        if (errno == ENOENT || errno == ECONNREFUSED)
            return VMCI_ERROR_DST_UNREACHABLE; /* no VMM listens there */
        return errno == EAGAIN || errno == EWOULDBLOCK ? VMCI_ERROR_TIMEOUT : vsc_vsock_error(errno);
    }
    len = snprintf(line, sizeof line, "CONNECT %u\n", (unsigned)port);
    if (vsc_send_all(fd, (const uint8_t *)line, (size_t)len) != 0)
        return errno == EPIPE || errno == ECONNRESET ? VMCI_ERROR_INVALID_RESOURCE : vsc_vsock_error(errno);
    /* Byte by byte: what follows the newline is the guest's. */
    while (n < sizeof reply && (n == 0 || reply[n - 1] != '\n')) {
        ssize_t got;

        if (!vsc_readable_by(fd, deadline))
            return VMCI_ERROR_TIMEOUT;
        got = recv(fd, reply + n, 1, MSG_DONTWAIT);
        if (got < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
            continue;
        if (got <= 0)
            break; /* end of file, or a reset: the VMM closed */
        n++;
    }
    if (n == 0)
        return VMCI_ERROR_INVALID_RESOURCE; /* the VMM closed instead of answering: the guest refused */
    return reply_ok(reply, n) ? VMCI_SUCCESS : VMCI_ERROR_DST_UNREACHABLE;
}

int vsc_hybrid_connect_stream(const vsc_local *t, vsc_handle dst, int64_t deadline, int *out)
{
    const struct vsc_hybrid *h = t->hybrid;
    int host = is_host_context(dst.context), vmm = host ? -1 : find_vmm(h, dst.context), fd, rc;

    *out = -1;
    if (!host && vmm < 0)
        return VMCI_ERROR_DST_UNREACHABLE; /* behind none of our VMM sockets */
    if (dst.resource > MAX_PORT)
        return VMCI_ERROR_INVALID_RESOURCE;
    if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
        return open_error(errno);
    rc = host ? connect_host(h, fd, dst.resource, deadline) : handshake(h, vmm, fd, dst.resource, deadline);
    if (rc != VMCI_SUCCESS) {
        close(fd);
        return rc;
    }
    *out = fd;
    return VMCI_SUCCESS;
}

int vsc_hybrid_connect(const vsc_local *t, vsc_handle src, vsc_handle dst, vsc_conn *out)
{
    struct timeval none = {0, 0};
    uint8_t hello[VSC_HELLO_SIZE];
    int fd, rc = vsc_hybrid_connect_stream(t, dst, vsc_now_ms() + VSC_HYBRID_HANDSHAKE_TIMEOUT_MS, &fd);

    if (rc != VMCI_SUCCESS)
        return rc;
    vsc_hello_encode(hello, src.resource, t->well_known);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &none, sizeof none) != 0 || vsc_send_all(fd, hello, sizeof hello) != 0) {
        rc = vsc_vsock_error(errno);
        close(fd);
        return rc;
    }
    return vsc_link_pump_start(fd, 1, 0, out);
}

/* Identity */

/* The VMM socket whose <uds>_<port> the path name is, or -1. */
static int arrival_vmm(const struct vsc_hybrid *h, const char *name)
{
    const char *sep = strrchr(name, '_');
    const char *p;
    int i;

    if (sep == NULL || sep[1] == '\0')
        return -1;
    for (p = sep + 1; *p; p++)
        if (*p < '0' || *p > '9')
            return -1;
    for (i = 0; i < h->n; i++)
        if (strlen(h->vmm[i].uds) == (size_t)(sep - name) && memcmp(h->vmm[i].uds, name, (size_t)(sep - name)) == 0)
            return i;
    return -1;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);

    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* The context the kernel gives the other end of the accepted fd, before any hello: the guest of
 * the VMM socket whose <uds>_<port> it arrived at, VMCI_HOST_CONTEXT_ID at a .host path for a
 * process of this user (SO_PEERCRED); VMCI_INVALID_ID otherwise. */
static uint32_t arrival_context(const vsc_local *t, int fd)
{
    struct sockaddr_un self;
    socklen_t len = sizeof self;
    char name[sizeof self.sun_path + 1];
    int vmm;

    memset(&self, 0, sizeof self);
    if (getsockname(fd, (struct sockaddr *)&self, &len) != 0 || self.sun_family != AF_UNIX
        || len <= offsetof(struct sockaddr_un, sun_path))
        return VMCI_INVALID_ID;
    memcpy(name, self.sun_path, len - offsetof(struct sockaddr_un, sun_path));
    name[len - offsetof(struct sockaddr_un, sun_path)] = '\0';
    if (ends_with(name, VSC_HYBRID_HOST_SUFFIX)) { /* a host process, of this user only */
        struct ucred cred;
        socklen_t clen = sizeof cred;

        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) != 0 || cred.uid != getuid())
            return VMCI_INVALID_ID;
        return VMCI_HOST_CONTEXT_ID;
    }
    vmm = arrival_vmm(t->hybrid, name); /* where a VMM delivers: its guest, whatever is claimed */
    return vmm < 0 ? VMCI_INVALID_ID : t->hybrid->vmm[vmm].cid;
}

int vsc_hybrid_identify(const vsc_local *t, int fd, vsc_handle *src, int *rx_fd, vsc_vsock_in **in)
{
    uint32_t context = arrival_context(t, fd), rid, owner;
    int well_known;

    *in = NULL;
    if (context == VMCI_INVALID_ID)
        goto refuse;
    if (vsc_hello_read(fd, 1, VSC_HELLO_TIMEOUT_MS, &well_known, &rid) != 0)
        goto refuse;
    if (well_known) {
        if (context != VMCI_HOST_CONTEXT_ID)
            goto refuse; /* a guest cannot be context 1 */
        context = VMCI_WELL_KNOWN_CONTEXT_ID;
    }
    /* A host peer runs as this user: refused if the policy gives its context to another
     * (datagram.py _identity_allowed; guests have no uid here). */
    if (is_host_context(context) && vsc_policy_uid(t->policy, context, &owner) && owner != getuid())
        goto refuse;
    src->context = context;
    src->resource = rid;
    return vsc_stream_in_start(fd, rx_fd, in);
refuse:
    close(fd);
    return -1;
}

uint32_t vsc_hybrid_stream_peer(const vsc_local *t, int fd, uint32_t claimed)
{
    uint32_t context = arrival_context(t, fd);

    if (context != VMCI_HOST_CONTEXT_ID)
        return context;
    return is_host_context(claimed) ? claimed : VMCI_INVALID_ID;
}

/* Introspection */

static int unix_listening(const char *path)
{
    FILE *f = fopen("/proc/net/unix", "re");
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    int found = 0;

    if (f == NULL)
        return 0;
    while (!found && (n = getline(&line, &cap, f)) > 0) {
        unsigned int flags;
        int at = -1;

        if (line[n - 1] == '\n')
            line[n - 1] = '\0';
        /* Num RefCount Protocol Flags Type St Inode Path; the header line does not scan */
        if (sscanf(line, "%*s %*s %*s %x %*s %*s %*s %n", &flags, &at) == 1 && at > 0)
            found = (flags & SO_ACCEPTCON_FLAG) && strcmp(line + at, path) == 0;
    }
    free(line);
    fclose(f);
    return found;
}

int vsc_hybrid_host_alive(const vsc_local *t, vsc_handle h)
{
    struct sockaddr_un addr;
    int i;

    if (!is_host_context(h.context) || h.resource > MAX_PORT)
        return 0;
    for (i = 0; i < t->hybrid->n; i++)
        if (port_path(t->hybrid, i, h.resource, 1, &addr) == 0 && unix_listening(addr.sun_path))
            return 1;
    return 0;
}

/* "<name>=" then each VMM's field (the path, or the CID) joined by ':'. */
static char *env_join(const vsc_local *t, const char *name, int paths)
{
    size_t size = strlen(name) + 2 + (size_t)t->hybrid->n * (VSC_SUN_PATH_MAX + 2);
    char *s = malloc(size), *p;
    int i;

    if (s == NULL)
        return NULL;
    p = s + sprintf(s, "%s=", name);
    for (i = 0; i < t->hybrid->n; i++) {
        if (paths)
            p += sprintf(p, "%s%s", i ? ":" : "", t->hybrid->vmm[i].uds);
        else
            p += sprintf(p, "%s%u", i ? ":" : "", (unsigned)t->hybrid->vmm[i].cid);
    }
    return s;
}

char *vsc_hybrid_env_uds(const vsc_local *t)
{
    return env_join(t, "VSOCKCOMPAT_HYBRID_UDS", 1);
}

char *vsc_hybrid_env_cids(const vsc_local *t)
{
    return env_join(t, "VSOCKCOMPAT_HYBRID_CID", 0);
}
