/*
 * vsock_emulation: AF_VSOCK emulated over AF_UNIX, linked INTO a test program (with
 * -rdynamic, so libvmci.so.0's calls resolve to these definitions before libc's), for the
 * host's tests (tests/test_clib_vsock_guard.py): C programs on the vsock transport talk to
 * each other on a machine where real AF_VSOCK must never be used. Linked in, not preloaded:
 * a preload that fails to load is skipped by ld.so with a warning, this cannot be.
 *
 * A kernel of CID 1 (vsock_loopback's view): /dev/vsock is /dev/null whose
 * IOCTL_VM_SOCKETS_GET_LOCAL_CID answers 1. socket(AF_VSOCK, type) is socket(AF_UNIX, type);
 * port P is the path $VSOCK_EMU_DIR/p<P> (unset: AF_VSOCK fails with EAFNOSUPPORT); a connector
 * is bound first to $VSOCK_EMU_DIR/p<an ephemeral port>, so getpeername reports (1, port).
 * Connecting to CIDs other than 1 and 2 fails with ENETUNREACH; to a port nobody listens on,
 * with ECONNRESET, as vsock_loopback does. The real AF_VSOCK family is never passed to libc.
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
#define EMU_CID 1u

static unsigned char emulated[MAX_FD]; /* 1: an emulated AF_VSOCK descriptor */
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

#define REAL(ret, name, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (real_##name == NULL) \
        real_##name = (ret (*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name)

/* $VSOCK_EMU_DIR/p<port>; -1 if unset or too long. */
static int port_path(unsigned port, struct sockaddr_un *out)
{
    const char *dir = getenv("VSOCK_EMU_DIR");

    memset(out, 0, sizeof *out);
    out->sun_family = AF_UNIX;
    if (dir == NULL || (size_t)snprintf(out->sun_path, sizeof out->sun_path, "%s/p%u", dir, port)
                           >= sizeof out->sun_path)
        return -1;
    return 0;
}

/* The vsock address behind a bound AF_UNIX path (VMADDR_PORT_ANY if unbound). */
static void to_vsock(const struct sockaddr_un *un, socklen_t len, unsigned cid, struct sockaddr_vm *out)
{
    const char *slash = len > offsetof(struct sockaddr_un, sun_path) ? strrchr(un->sun_path, '/') : NULL;

    memset(out, 0, sizeof *out);
    out->svm_family = AF_VSOCK;
    out->svm_cid = cid;
    out->svm_port = slash != NULL && slash[1] == 'p' ? (unsigned)strtoul(slash + 2, NULL, 10) : VMADDR_PORT_ANY;
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
    fd = real_socket(AF_UNIX, type, 0);
    mark(fd, 1);
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
        || port_path(vm->svm_port, &un) != 0) {
        errno = EINVAL;
        return -1;
    }
    return real_bind(fd, (struct sockaddr *)&un, sizeof un);
}

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    const struct sockaddr_vm *vm = (const struct sockaddr_vm *)addr;
    struct sockaddr_un un, self;
    int rc;
    REAL(int, connect, int, const struct sockaddr *, socklen_t);
    REAL(int, bind, int, const struct sockaddr *, socklen_t);

    if (!is_emulated(fd))
        return real_connect(fd, addr, len);
    if (len < sizeof *vm || vm->svm_family != AF_VSOCK || port_path(vm->svm_port, &un) != 0) {
        errno = EINVAL;
        return -1;
    }
    if (vm->svm_cid != 1 && vm->svm_cid != 2) {
        errno = ENETUNREACH;
        return -1;
    }
    do { /* the connector's own port, so that the peer can name it */
        unsigned port = 0x40000000u + ((unsigned)getpid() & 0xFFFFu) * 0x1000u
                        + (__atomic_fetch_add(&next_ephemeral, 1u, __ATOMIC_RELAXED) & 0xFFFu);
        if (port_path(port, &self) != 0) {
            errno = EINVAL;
            return -1;
        }
        rc = real_bind(fd, (struct sockaddr *)&self, sizeof self);
    } while (rc != 0 && errno == EADDRINUSE);
    if (rc != 0)
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
    to_vsock(&un, n, peer ? EMU_CID : VMADDR_CID_ANY, &vm);
    memcpy(addr, &vm, *len < sizeof vm ? *len : sizeof vm);
    *len = sizeof vm;
    return 0;
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

int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    void *arg;
    REAL(int, ioctl, int, unsigned long, ...);

    va_start(ap, request);
    arg = va_arg(ap, void *);
    va_end(ap);
    if (fd >= 0 && fd == fake_device && request == 1977u /* IOCTL_VM_SOCKETS_GET_LOCAL_CID */ && arg != NULL) {
        *(unsigned *)arg = EMU_CID;
        return 0;
    }
    return real_ioctl(fd, request, arg);
}
