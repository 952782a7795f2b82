/*
 * vsock_emulation: AF_VSOCK emulated over AF_UNIX, linked INTO a test program (with
 * -rdynamic, so libvmci.so.0's calls resolve to these definitions before libc's), for the
 * host's tests (tests/test_clib_vsock_guard.py): C programs on the vsock transport talk to
 * each other on a machine where real AF_VSOCK must never be used. Linked in, not preloaded:
 * a preload that fails to load is skipped by ld.so with a warning, this cannot be.
 *
 * A kernel of CID $VSOCK_EMU_CID (default 1, vsock_loopback's view): /dev/vsock is /dev/null
 * whose IOCTL_VM_SOCKETS_GET_LOCAL_CID answers that CID. socket(AF_VSOCK, type) is
 * socket(AF_UNIX, type); port P of CID C is the path $VSOCK_EMU_DIR/c<C>p<P> (unset: AF_VSOCK
 * fails with EAFNOSUPPORT); a connector is bound first to its own CID's path of an ephemeral
 * port, so getpeername reports (its CID, port). Processes of different CIDs sharing one
 * directory are kernels that reach each other: guests and their host behind vhost-device-vsock.
 * CID 1 is the own kernel; a kernel of CID 1 reaches only CIDs 1 and 2 (both itself), any other
 * kernel every CID from 2 up; other CIDs fail with ENETUNREACH, a port nobody listens on with
 * ECONNRESET, as vsock_loopback does. With $VSOCK_EMU_SENDS set, the length asked of every
 * send(), sendto(), sendmsg() and write() on an emulated socket is appended to that file, one
 * "send <bytes>" line each. The real AF_VSOCK family is never passed to libc.
 *
 * SOCK_DGRAM (a kernel with VMware's vmci_transport; the C library's dgram mode): only with
 * $VSOCK_EMU_DGRAM=1, else socket() fails with ENODEV as under virtio and vsock_loopback. Port P
 * of CID C is then the AF_UNIX SOCK_DGRAM path $VSOCK_EMU_DIR/c<C>p<P>.d; sendto() of an unbound
 * socket first binds it to an ephemeral port of its CID (the kernel auto-binds), a destination
 * CID is reached as for the other types, and a port nobody holds fails with EHOSTUNREACH
 * (vmci_transport's errno for VMCI_ERROR_INVALID_RESOURCE); recvfrom(), recvmsg() and
 * getsockname() give the (cid, port) behind the paths.
 *
 * setsockopt(AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE) with a 64-bit size on an emulated socket
 * succeeds and bounds nothing (the AF_UNIX socket keeps its own buffers); any other AF_VSOCK
 * option fails with ENOPROTOOPT.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include "open_mode.h"

#include <linux/vm_sockets.h>

#define MAX_FD 65536

static unsigned char emulated[MAX_FD]; /* an emulated AF_VSOCK descriptor: 1, or DGRAM for SOCK_DGRAM */
#define DGRAM 2
static int fake_device = -1;
static unsigned next_ephemeral;

static void mark(int fd, int on)
{
    if (fd >= 0 && fd < MAX_FD)
        emulated[fd] = (unsigned char)on;
}

static int is_emulated(int fd)
{
    return fd >= 0 && fd < MAX_FD && emulated[fd];
}

static int is_dgram(int fd)
{
    return fd >= 0 && fd < MAX_FD && emulated[fd] == DGRAM;
}

#define REAL(ret, name, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (real_##name == NULL) \
        real_##name = (ret (*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name)

/* This kernel's CID: $VSOCK_EMU_CID, else 1. */
static unsigned emu_cid(void)
{
    const char *cid = getenv("VSOCK_EMU_CID");

    return cid != NULL && *cid != '\0' ? (unsigned)strtoul(cid, NULL, 10) : 1u;
}

/* The kernel a connect to cid reaches (0: none, ENETUNREACH). */
static unsigned reach(unsigned cid)
{
    unsigned own = emu_cid();

    if (cid == VMADDR_CID_LOCAL || cid == own)
        return own;
    if (own == VMADDR_CID_LOCAL)
        return cid == VMADDR_CID_HOST ? own : 0;
    return cid >= VMADDR_CID_HOST && cid != VMADDR_CID_ANY ? cid : 0;
}

/* $VSOCK_EMU_DIR/c<cid>p<port>, with ".d" for the DGRAM socket fd; -1 if unset or too long. */
static int port_path(int fd, unsigned cid, unsigned port, struct sockaddr_un *out)
{
    const char *dir = getenv("VSOCK_EMU_DIR");

    memset(out, 0, sizeof *out);
    out->sun_family = AF_UNIX;
    if (dir == NULL || (size_t)snprintf(out->sun_path, sizeof out->sun_path, "%s/c%up%u%s", dir, cid, port,
                                        is_dgram(fd) ? ".d" : "") >= sizeof out->sun_path)
        return -1;
    return 0;
}

/* Bind fd to an ephemeral port of our CID, so that a peer can name it; 0 or -1 (errno). */
static int bind_ephemeral(int fd)
{
    struct sockaddr_un self;
    int rc;
    REAL(int, bind, int, const struct sockaddr *, socklen_t);

    do {
        unsigned port = 0x40000000u + ((unsigned)getpid() & 0xFFFFu) * 0x1000u
                        + (__atomic_fetch_add(&next_ephemeral, 1u, __ATOMIC_RELAXED) & 0xFFFu);
        if (port_path(fd, emu_cid(), port, &self) != 0) {
            errno = EINVAL;
            return -1;
        }
        rc = real_bind(fd, (struct sockaddr *)&self, sizeof self);
    } while (rc != 0 && errno == EADDRINUSE);
    return rc;
}

/* The vsock address behind a bound AF_UNIX path ((cid, VMADDR_PORT_ANY) if unbound). */
static void to_vsock(const struct sockaddr_un *un, socklen_t len, unsigned cid, struct sockaddr_vm *out)
{
    const char *slash = len > offsetof(struct sockaddr_un, sun_path) ? strrchr(un->sun_path, '/') : NULL;
    unsigned path_cid, port;

    memset(out, 0, sizeof *out);
    out->svm_family = AF_VSOCK;
    out->svm_cid = cid;
    out->svm_port = VMADDR_PORT_ANY;
    if (slash != NULL && sscanf(slash + 1, "c%up%u", &path_cid, &port) == 2) {
        out->svm_cid = cid == VMADDR_CID_ANY ? cid : path_cid;
        out->svm_port = port;
    }
}

/* Append "send <len>" to $VSOCK_EMU_SENDS for a send on an emulated socket. */
static void log_send(int fd, size_t len)
{
    const char *path = getenv("VSOCK_EMU_SENDS");
    char line[64];
    int log, n;

    if (!is_emulated(fd) || path == NULL)
        return;
    n = snprintf(line, sizeof line, "send %zu\n", len);
    log = (int)syscall(SYS_openat, AT_FDCWD, path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (log < 0)
        return;
    if (syscall(SYS_write, log, line, (size_t)n) != n) {
        /* a short log fails the test that reads it */
    }
    close(log);
}

ssize_t send(int fd, const void *buf, size_t len, int flags)
{
    REAL(ssize_t, send, int, const void *, size_t, int);
    log_send(fd, len);
    return real_send(fd, buf, len, flags);
}

/* The path a datagram to the vsock address addr goes to, binding fd first if it is unbound;
 * 0, or -1 (errno). */
static int dgram_target(int fd, const struct sockaddr *addr, socklen_t alen, struct sockaddr_un *out)
{
    const struct sockaddr_vm *vm = (const struct sockaddr_vm *)addr;
    struct sockaddr_un self;
    socklen_t n = sizeof self;
    unsigned peer;
    REAL(int, getsockname, int, struct sockaddr *, socklen_t *);

    if (addr == NULL || alen < sizeof *vm || vm->svm_family != AF_VSOCK) {
        errno = addr == NULL ? EDESTADDRREQ : EINVAL;
        return -1;
    }
    if ((peer = reach(vm->svm_cid)) == 0) {
        errno = ENETUNREACH;
        return -1;
    }
    if (port_path(fd, peer, vm->svm_port, out) != 0) {
        errno = EINVAL;
        return -1;
    }
    memset(&self, 0, sizeof self);
    if (real_getsockname(fd, (struct sockaddr *)&self, &n) != 0)
        return -1;
    return n > offsetof(struct sockaddr_un, sun_path) && self.sun_path[0] != '\0' ? 0 : bind_ephemeral(fd);
}

/* The result of sending a datagram: to a port nobody holds, EHOSTUNREACH. */
static ssize_t dgram_sent(ssize_t rc)
{
    if (rc < 0 && (errno == ENOENT || errno == ECONNREFUSED))
        errno = EHOSTUNREACH;
    return rc;
}

ssize_t sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *addr, socklen_t alen)
{
    struct sockaddr_un to;
    REAL(ssize_t, sendto, int, const void *, size_t, int, const struct sockaddr *, socklen_t);
    log_send(fd, len);
    if (!is_dgram(fd) || (addr == NULL && alen == 0))
        return real_sendto(fd, buf, len, flags, addr, alen);
    if (dgram_target(fd, addr, alen, &to) != 0)
        return -1;
    return dgram_sent(real_sendto(fd, buf, len, flags, (struct sockaddr *)&to, sizeof to));
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    size_t len = 0, i;
    REAL(ssize_t, sendmsg, int, const struct msghdr *, int);

    for (i = 0; msg != NULL && i < msg->msg_iovlen; i++)
        len += msg->msg_iov[i].iov_len;
    log_send(fd, len);
    if (is_dgram(fd) && msg != NULL && msg->msg_name != NULL) {
        struct sockaddr_un to;
        struct msghdr copy = *msg;

        if (dgram_target(fd, msg->msg_name, msg->msg_namelen, &to) != 0)
            return -1;
        copy.msg_name = &to;
        copy.msg_namelen = sizeof to;
        return dgram_sent(real_sendmsg(fd, &copy, flags));
    }
    return real_sendmsg(fd, msg, flags);
}

ssize_t write(int fd, const void *buf, size_t len)
{
    REAL(ssize_t, write, int, const void *, size_t);
    log_send(fd, len);
    return real_write(fd, buf, len);
}

static int dgram_enabled(void)
{
    const char *on = getenv("VSOCK_EMU_DGRAM");

    return on != NULL && strcmp(on, "1") == 0;
}

int socket(int domain, int type, int protocol)
{
    int fd;
    REAL(int, socket, int, int, int);

    if (domain != AF_VSOCK) {
        fd = real_socket(domain, type, protocol);
        mark(fd, 0);
        return fd;
    }
    if (getenv("VSOCK_EMU_DIR") == NULL) {
        errno = EAFNOSUPPORT;
        return -1;
    }
    if ((type & 0xF) == SOCK_DGRAM && !dgram_enabled()) {
        errno = ENODEV; /* af_vsock.c: no transport carries datagrams */
        return -1;
    }
    fd = real_socket(AF_UNIX, type, 0);
    mark(fd, (type & 0xF) == SOCK_DGRAM ? DGRAM : 1);
    return fd;
}

int socketpair(int domain, int type, int protocol, int sv[2])
{
    int rc;
    REAL(int, socketpair, int, int, int, int *);

    if (domain == AF_VSOCK) {
        errno = EOPNOTSUPP;
        return -1;
    }
    rc = real_socketpair(domain, type, protocol, sv);
    if (rc == 0) {
        mark(sv[0], 0);
        mark(sv[1], 0);
    }
    return rc;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    const struct sockaddr_vm *vm = (const struct sockaddr_vm *)addr;
    struct sockaddr_un un;
    REAL(int, bind, int, const struct sockaddr *, socklen_t);

    if (!is_emulated(fd))
        return real_bind(fd, addr, len);
    if (len < sizeof *vm || vm->svm_family != AF_VSOCK || vm->svm_port == VMADDR_PORT_ANY
        || port_path(fd, emu_cid(), vm->svm_port, &un) != 0) {
        errno = EINVAL;
        return -1;
    }
    return real_bind(fd, (struct sockaddr *)&un, sizeof un);
}

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    const struct sockaddr_vm *vm = (const struct sockaddr_vm *)addr;
    struct sockaddr_un un;
    unsigned peer;
    int rc;
    REAL(int, connect, int, const struct sockaddr *, socklen_t);

    if (!is_emulated(fd))
        return real_connect(fd, addr, len);
    if (is_dgram(fd)) {
        errno = EOPNOTSUPP; /* not emulated: the C library never connects a DGRAM socket */
        return -1;
    }
    if (len < sizeof *vm || vm->svm_family != AF_VSOCK) {
        errno = EINVAL;
        return -1;
    }
    if ((peer = reach(vm->svm_cid)) == 0) {
        errno = ENETUNREACH;
        return -1;
    }
    if (port_path(fd, peer, vm->svm_port, &un) != 0) {
        errno = EINVAL;
        return -1;
    }
    if (bind_ephemeral(fd) != 0) /* the connector's own port, so that the peer can name it */
        return -1;
    rc = real_connect(fd, (struct sockaddr *)&un, sizeof un);
    if (rc != 0 && (errno == ENOENT || errno == ECONNREFUSED))
        errno = ECONNRESET; /* vsock_loopback: nobody listens there */
    return rc;
}

static int accepted(int listener, int fd)
{
    mark(fd, fd >= 0 && is_emulated(listener));
    return fd;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    REAL(int, accept, int, struct sockaddr *, socklen_t *);
    return accepted(fd, real_accept(fd, is_emulated(fd) ? NULL : addr, is_emulated(fd) ? NULL : len));
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    REAL(int, accept4, int, struct sockaddr *, socklen_t *, int);
    return accepted(fd, real_accept4(fd, is_emulated(fd) ? NULL : addr, is_emulated(fd) ? NULL : len, flags));
}

static int name_of(int fd, struct sockaddr *addr, socklen_t *len, int peer)
{
    struct sockaddr_un un;
    struct sockaddr_vm vm;
    socklen_t n = sizeof un;
    int rc;
    REAL(int, getpeername, int, struct sockaddr *, socklen_t *);
    REAL(int, getsockname, int, struct sockaddr *, socklen_t *);

    if (!is_emulated(fd))
        return peer ? real_getpeername(fd, addr, len) : real_getsockname(fd, addr, len);
    memset(&un, 0, sizeof un);
    rc = peer ? real_getpeername(fd, (struct sockaddr *)&un, &n) : real_getsockname(fd, (struct sockaddr *)&un, &n);
    if (rc != 0)
        return rc;
    to_vsock(&un, n, peer ? emu_cid() : VMADDR_CID_ANY, &vm);
    memcpy(addr, &vm, *len < sizeof vm ? *len : sizeof vm);
    *len = sizeof vm;
    return 0;
}

/* The vsock address of a datagram's sender, from its AF_UNIX path un. */
static void name_sender(const struct sockaddr_un *un, socklen_t n, void *addr, socklen_t *len)
{
    struct sockaddr_vm vm;

    to_vsock(un, n, emu_cid(), &vm);
    memcpy(addr, &vm, *len < sizeof vm ? *len : sizeof vm);
    *len = sizeof vm;
}

ssize_t recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *addr, socklen_t *alen)
{
    struct sockaddr_un un;
    socklen_t n = sizeof un;
    ssize_t rc;
    REAL(ssize_t, recvfrom, int, void *, size_t, int, struct sockaddr *, socklen_t *);

    if (!is_dgram(fd) || addr == NULL || alen == NULL)
        return real_recvfrom(fd, buf, len, flags, addr, alen);
    memset(&un, 0, sizeof un);
    if ((rc = real_recvfrom(fd, buf, len, flags, (struct sockaddr *)&un, &n)) >= 0)
        name_sender(&un, n, addr, alen);
    return rc;
}

ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
    struct sockaddr_un un;
    void *name;
    socklen_t want;
    ssize_t rc;
    REAL(ssize_t, recvmsg, int, struct msghdr *, int);

    if (!is_dgram(fd) || msg == NULL || msg->msg_name == NULL)
        return real_recvmsg(fd, msg, flags);
    name = msg->msg_name;
    want = msg->msg_namelen;
    memset(&un, 0, sizeof un);
    msg->msg_name = &un;
    msg->msg_namelen = sizeof un;
    rc = real_recvmsg(fd, msg, flags);
    msg->msg_name = name;
    if (rc >= 0) {
        socklen_t n = msg->msg_namelen;

        msg->msg_namelen = want;
        name_sender(&un, n, name, &msg->msg_namelen);
    } else {
        msg->msg_namelen = want;
    }
    return rc;
}

int getpeername(int fd, struct sockaddr *addr, socklen_t *len)
{
    return name_of(fd, addr, len, 1);
}

int getsockname(int fd, struct sockaddr *addr, socklen_t *len)
{
    return name_of(fd, addr, len, 0);
}

static int device(const char *path, int flags)
{
    int fd;

    if (path == NULL || strcmp(path, "/dev/vsock") != 0)
        return -2;
    fd = (int)syscall(SYS_openat, AT_FDCWD, "/dev/null", flags & O_CLOEXEC, 0);
    mark(fd, 0);
    fake_device = fd;
    return fd;
}

int open(const char *path, int flags, ...)
{
    mode_t mode = 0;
    int fd = device(path, flags);
    REAL(int, open, const char *, int, ...);

    if (fd != -2)
        return fd;
    OPEN_MODE(flags, mode);
    return real_open(path, flags, mode);
}

int setsockopt(int fd, int level, int name, const void *value, socklen_t len)
{
    REAL(int, setsockopt, int, int, int, const void *, socklen_t);

    if (!is_emulated(fd) || level != AF_VSOCK)
        return real_setsockopt(fd, level, name, value, len);
    if (name != SO_VM_SOCKETS_BUFFER_SIZE) {
        errno = ENOPROTOOPT;
        return -1;
    }
    if (value == NULL || len != sizeof(unsigned long long)) {
        errno = EINVAL;
        return -1;
    }
    return 0;
}

int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    void *arg;
    REAL(int, ioctl, int, unsigned long, ...);

    va_start(ap, request);
    arg = va_arg(ap, void *);
    va_end(ap);
    if (fd >= 0 && fd == fake_device && request == 1977u /* IOCTL_VM_SOCKETS_GET_LOCAL_CID */ && arg != NULL) {
        *(unsigned *)arg = emu_cid();
        return 0;
    }
    return real_ioctl(fd, request, arg);
}
