/*
 * no_vsock_shim: an LD_PRELOAD library for the host's tests (tests/test_clib_vsock_guard.py),
 * the C counterpart of tests/test_vsock_selection.py's vsock_refused fixture. On a machine whose
 * AF_VSOCK leads to a foreign hypervisor, a program under it can make no AF_VSOCK socket at all:
 *
 *   socket(AF_VSOCK, type, ...)   recorded ("socket <type>"), fails with EAFNOSUPPORT
 *   connect(fd, AF_VSOCK address) recorded ("connect"), fails with EACCES (never reached:
 *                                 no AF_VSOCK socket exists; kept as a second wall)
 *   open("/dev/vsock", ...)       recorded ("open /dev/vsock"); fails with ENOENT, unless
 *                                 NO_VSOCK_CID=<n> is set: then it opens /dev/null and
 *                                 ioctl(IOCTL_VM_SOCKETS_GET_LOCAL_CID) on that descriptor
 *                                 answers n (recorded "ioctl local cid"), as a kernel with a
 *                                 vsock transport would, without the real device.
 *
 * Records go, one line each, to the file NO_VSOCK_LOG (appended); everything else passes to libc.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "open_mode.h"

#define AF_VSOCK_FAMILY 40
#define LOCAL_CID_IOCTL 1977
#define DEVICE "/dev/vsock"

static int fake_fd = -1; /* the /dev/null descriptor standing for the device */

static void record(const char *what, long value)
{
    const char *path = getenv("NO_VSOCK_LOG");
    char line[96];
    int fd, n;

    if (path == NULL)
        return;
    n = snprintf(line, sizeof line, "%s %ld\n", what, value);
    fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    if (write(fd, line, (size_t)n) != n) {
        /* a short record shows as a malformed line in the test */
    }
    close(fd);
}

int socket(int domain, int type, int protocol)
{
    static int (*real)(int, int, int);

    if (domain == AF_VSOCK_FAMILY) {
        record("socket", type & 0xF);
        errno = EAFNOSUPPORT;
        return -1;
    }
    if (real == NULL)
        real = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
    return real(domain, type, protocol);
}

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    static int (*real)(int, const struct sockaddr *, socklen_t);

    if (addr != NULL && len >= sizeof(sa_family_t) && addr->sa_family == AF_VSOCK_FAMILY) {
        record("connect", fd);
        errno = EACCES;
        return -1;
    }
    if (real == NULL)
        real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    return real(fd, addr, len);
}

/* The device: refused, or faked with /dev/null; -2 for any other path. */
static int device(const char *path, int flags)
{
    const char *cid = getenv("NO_VSOCK_CID");

    if (path == NULL || strcmp(path, DEVICE) != 0)
        return -2;
    record("open", 0);
    if (cid == NULL) {
        errno = ENOENT;
        return -1;
    }
    fake_fd = (int)syscall(SYS_openat, AT_FDCWD, "/dev/null", flags & (O_CLOEXEC | O_RDWR | O_WRONLY), 0);
    return fake_fd;
}

#define OPEN_WRAPPER(name, ...)                                                              \
    int name(const char *path, int flags, ...)                                               \
    {                                                                                        \
        static int (*real)(const char *, int, ...);                                          \
        mode_t mode = 0;                                                                     \
        int fd = device(path, flags);                                                        \
        if (fd != -2)                                                                        \
            return fd;                                                                       \
        OPEN_MODE(flags, mode);                                                              \
        if (real == NULL)                                                                    \
            real = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, #name);                 \
        return real(path, flags, mode);                                                      \
    }

OPEN_WRAPPER(open)
OPEN_WRAPPER(open64)

int openat(int dirfd, const char *path, int flags, ...)
{
    static int (*real)(int, const char *, int, ...);
    mode_t mode = 0;
    int fd = device(path, flags);

    if (fd != -2)
        return fd;
    OPEN_MODE(flags, mode);
    if (real == NULL)
        real = (int (*)(int, const char *, int, ...))dlsym(RTLD_NEXT, "openat");
    return real(dirfd, path, flags, mode);
}

int ioctl(int fd, unsigned long request, ...)
{
    static int (*real)(int, unsigned long, ...);
    va_list ap;
    void *arg;

    va_start(ap, request);
    arg = va_arg(ap, void *);
    va_end(ap);
    if (fd >= 0 && fd == fake_fd && request == LOCAL_CID_IOCTL && arg != NULL) {
        record("ioctl", LOCAL_CID_IOCTL);
        *(unsigned int *)arg = (unsigned int)strtoul(getenv("NO_VSOCK_CID"), NULL, 10);
        return 0;
    }
    if (real == NULL)
        real = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    return real(fd, request, arg);
}
