/*
 * vsc_preload.c: libvsockcompat-preload.so, the LD_PRELOAD library that lets
 * binaries built against VMware's own vmci_sockets.h run unchanged on Linux
 * AF_VSOCK (vmci-sdk.md sections 6.1, 10.1, 10.3). `vsockcompat run` preloads it.
 *
 * Those binaries carry the SDK's helpers inline: VMCISock_GetAFValue[Fd]()
 * opens /dev/vsock and asks ioctl 1976 (VMCI_SOCKETS_GET_AF_VALUE) for the
 * address family, which mainline's /dev/vsock does not answer (ENOTTY, so the
 * helper returns -1). Only their system calls can be interposed:
 *
 *   ioctl(fd, 1976, int *af)  on a descriptor of the vsock device: *af = 40
 *                             (AF_VSOCK), 0; EFAULT for a NULL or unwritable
 *                             pointer. Any other request, or 1976 on any other
 *                             descriptor, goes to libc untouched (1977, the
 *                             local CID, is answered by the kernel itself).
 *   getsockopt(fd, 40, SO_VMCI_TRUSTED, int *, len)
 *                             Linux lacks it (ENOPROTOOPT, EOPNOTSUPP on
 *                             datagram sockets): answered on AF_VSOCK sockets,
 *                             1 when the process has CAP_NET_ADMIN (the
 *                             kernel's rule for a trusted vsock socket), else 0.
 *   {get,set}sockopt(fd, 40, 8, ..., len < 16)
 *                             the SDK's SO_VMCI_DISCONNECT_CAUSE (ESX only) is
 *                             Linux's SO_VM_SOCKETS_CONNECT_TIMEOUT_NEW: the
 *                             kernel's EINVAL for a short length becomes the
 *                             ENOPROTOOPT VMware's Linux driver gave.
 *
 * Every other option passes through: 0..2 and 6 have the same numbers and
 * meaning on Linux; 3, 4 and 7 (ESX/VMkernel only) and unknown numbers get the
 * kernel's ENOPROTOOPT, as from VMware's Linux driver. README.rst, "VMCI
 * Sockets binaries", has the table.
 *
 * The device is recognised by identity, not by remembered descriptors: fstat()
 * of the descriptor against stat() of the device path (same st_rdev for
 * character devices, else same st_dev and st_ino). So dup()ed, inherited and
 * re-used descriptors need no bookkeeping, and close() is not interposed.
 *
 * VSOCKCOMPAT_VSOCK_DEVICE=PATH (read once, at load; ignored for setuid
 * programs): open("/dev/vsock") opens PATH instead and PATH is the device to
 * recognise. For tests, which must never open the real device on a machine
 * whose vsock leads to a foreign host. An unusable PATH (longer than PATH_MAX)
 * makes open("/dev/vsock") fail with ENAMETOOLONG: it never falls back to the
 * real device.
 *
 * Cost for everything else: open*() one load and branch when the setting is
 * unset; ioctl() one comparison; {get,set}sockopt() one comparison unless the
 * level is 40. No allocation, no lock; the wrappers use only system calls and
 * are as async-signal-safe as the libc functions they wrap.
 */
#undef _FORTIFY_SOURCE
#undef _FILE_OFFSET_BITS
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/capability.h>

#include "vsc_constants.h"
#include "vmci_sockets.h"     /* VMCI_SOCKETS_DEVICE, VMCI_SOCKETS_GET_AF_VALUE */

#define VSC_EXPORT __attribute__((visibility("default")))

/* The SDK's SO_VMCI_DISCONNECT_CAUSE has Linux's number for the 64-bit timeval
 * connect timeout; a length shorter than that timeval is the SDK's int32. */
#define VSC_SO_VMCI_DISCONNECT_CAUSE VSC_SO_VM_SOCKETS_CONNECT_TIMEOUT_NEW
#define VSC_SOCK_TIMEVAL_SIZE 16
#define VSC_CAP_NET_ADMIN 12

#define DEVICE_ENV "VSOCKCOMPAT_VSOCK_DEVICE"

typedef int (*open_fn)(const char *, int, ...);
typedef int (*openat_fn)(int, const char *, int, ...);
typedef int (*open2_fn)(const char *, int);
typedef int (*openat2_fn)(int, const char *, int);
typedef int (*ioctl_fn)(int, unsigned long, ...);
typedef int (*setsockopt_fn)(int, int, int, const void *, socklen_t);
typedef int (*getsockopt_fn)(int, int, int, void *, socklen_t *);

enum {
   F_OPEN, F_OPEN64, F_OPENAT, F_OPENAT64, F_OPEN_2, F_OPEN64_2, F_OPENAT_2, F_OPENAT64_2,
   F_IOCTL, F_SETSOCKOPT, F_GETSOCKOPT, F_COUNT
};

static const char *const names[F_COUNT] = {
   "open", "open64", "openat", "openat64", "__open_2", "__open64_2", "__openat_2",
   "__openat64_2", "ioctl", "setsockopt", "getsockopt",
};

/* Written once (the constructor, or the first call that comes before it);
 * every writer stores the same value, so relaxed atomics suffice. */
static void *next[F_COUNT];

/* Set by the constructor before main() and never changed again. */
static int redirect;                 /* 0 none, 1 to device_path, -1 unusable */
static char device_path[PATH_MAX];   /* the recognised device (when redirect == 1) */

static void *resolve(int which)
{
   void *fn = __atomic_load_n(&next[which], __ATOMIC_ACQUIRE);

   if (fn == NULL) {
      fn = dlsym(RTLD_NEXT, names[which]);
      __atomic_store_n(&next[which], fn, __ATOMIC_RELEASE);
   }
   return fn;
}

__attribute__((constructor)) static void vsc_preload_init(void)
{
   const char *value = secure_getenv(DEVICE_ENV);
   int i;

   for (i = 0; i < F_COUNT; i++) {
      (void)resolve(i);
   }
   if (value != NULL && value[0] != '\0') {
      size_t len = strlen(value);
      if (len < sizeof device_path) {
         memcpy(device_path, value, len + 1);
         redirect = 1;
      } else {
         redirect = -1;
      }
   }
}

static int missing(void)
{
   errno = ENOSYS;
   return -1;
}

/* The path to open instead of `path`; NULL (errno set) if it must fail. */
static const char *device_redirect(const char *path)
{
   if (redirect == 0 || path == NULL || strcmp(path, VMCI_SOCKETS_DEVICE) != 0) {
      return path;
   }
   if (redirect < 0) {
      errno = ENAMETOOLONG;
      return NULL;
   }
   return device_path;
}

static int needs_mode(int flags)
{
   return (flags & O_CREAT) != 0 || (flags & O_TMPFILE) == O_TMPFILE;
}

/* --- open family: only to apply VSOCKCOMPAT_VSOCK_DEVICE --------------- */

static int open_common(int which, const char *path, int flags, mode_t mode)
{
   open_fn fn = (open_fn)resolve(which);

   if (fn == NULL) {
      return missing();
   }
   path = device_redirect(path);
   if (path == NULL) {
      return -1;
   }
   return needs_mode(flags) ? fn(path, flags, mode) : fn(path, flags);
}

static int openat_common(int which, int dirfd, const char *path, int flags, mode_t mode)
{
   openat_fn fn = (openat_fn)resolve(which);

   if (fn == NULL) {
      return missing();
   }
   path = device_redirect(path);
   if (path == NULL) {
      return -1;
   }
   return needs_mode(flags) ? fn(dirfd, path, flags, mode) : fn(dirfd, path, flags);
}

#define VARIADIC_MODE(flags, mode)                 \
   do {                                            \
      if (needs_mode(flags)) {                     \
         va_list ap;                               \
         va_start(ap, flags);                      \
         mode = (mode_t)va_arg(ap, int);           \
         va_end(ap);                               \
      }                                            \
   } while (0)

VSC_EXPORT int open(const char *path, int flags, ...)
{
   mode_t mode = 0;
   VARIADIC_MODE(flags, mode);
   return open_common(F_OPEN, path, flags, mode);
}

VSC_EXPORT int open64(const char *path, int flags, ...)
{
   mode_t mode = 0;
   VARIADIC_MODE(flags, mode);
   return open_common(F_OPEN64, path, flags, mode);
}

VSC_EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
   mode_t mode = 0;
   VARIADIC_MODE(flags, mode);
   return openat_common(F_OPENAT, dirfd, path, flags, mode);
}

VSC_EXPORT int openat64(int dirfd, const char *path, int flags, ...)
{
   mode_t mode = 0;
   VARIADIC_MODE(flags, mode);
   return openat_common(F_OPENAT64, dirfd, path, flags, mode);
}

/* _FORTIFY_SOURCE entry points (no mode argument by contract). */
static int open2_common(int which, const char *path, int flags)
{
   open2_fn fn = (open2_fn)resolve(which);

   if (fn == NULL) {
      return missing();
   }
   path = device_redirect(path);
   return path == NULL ? -1 : fn(path, flags);
}

static int openat2_common(int which, int dirfd, const char *path, int flags)
{
   openat2_fn fn = (openat2_fn)resolve(which);

   if (fn == NULL) {
      return missing();
   }
   path = device_redirect(path);
   return path == NULL ? -1 : fn(dirfd, path, flags);
}

VSC_EXPORT int __open_2(const char *path, int flags)
{
   return open2_common(F_OPEN_2, path, flags);
}

VSC_EXPORT int __open64_2(const char *path, int flags)
{
   return open2_common(F_OPEN64_2, path, flags);
}

VSC_EXPORT int __openat_2(int dirfd, const char *path, int flags)
{
   return openat2_common(F_OPENAT_2, dirfd, path, flags);
}

VSC_EXPORT int __openat64_2(int dirfd, const char *path, int flags)
{
   return openat2_common(F_OPENAT64_2, dirfd, path, flags);
}

/* --- user memory, copied like the kernel's copy_{to,from}_user ---------- */

/* Copies n bytes between this process's buffer `mine` and the caller's
 * pointer `user`, failing with EFAULT (and no crash) when `user` is not
 * mapped as needed. The copy itself goes through process_vm_{read,write}v on
 * ourselves; where those are refused (seccomp), NULL is still caught and the
 * copy is plain. A plain copy always follows a successful system call, so
 * tools that do not model it (valgrind) see the bytes as written. */
static int copy_user(void *user, void *mine, size_t n, int to_user)
{
   struct iovec local = { mine, n };
   struct iovec remote = { user, n };
   ssize_t done;

   if (user == NULL) {
      errno = EFAULT;
      return -1;
   }
   done = to_user ? process_vm_writev(getpid(), &local, 1, &remote, 1, 0)
                  : process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
   if (done < 0 && errno != ENOSYS && errno != EPERM) {
      errno = EFAULT;
      return -1;
   }
   if (done >= 0 && (size_t)done != n) {
      errno = EFAULT;
      return -1;
   }
   if (to_user) {
      memcpy(user, mine, n);
   } else {
      memcpy(mine, user, n);
   }
   return 0;
}

/* --- ioctl -------------------------------------------------------------- */

static int same_file(const struct stat *a, const struct stat *b)
{
   if (S_ISCHR(a->st_mode) && S_ISCHR(b->st_mode)) {
      return a->st_rdev == b->st_rdev;
   }
   return a->st_dev == b->st_dev && a->st_ino == b->st_ino;
}

/* Is fd the vsock device (or the file VSOCKCOMPAT_VSOCK_DEVICE names)? */
static int is_vsock_device(int fd)
{
   struct stat of_fd, of_device;
   int saved = errno;
   int yes;

   if (redirect < 0) {
      return 0;
   }
   yes = fstat(fd, &of_fd) == 0
         && stat(redirect ? device_path : VMCI_SOCKETS_DEVICE, &of_device) == 0
         && same_file(&of_fd, &of_device);
   errno = saved;
   return yes;
}

VSC_EXPORT int ioctl(int fd, unsigned long request, ...)
{
   ioctl_fn fn;
   void *arg;
   va_list ap;

   va_start(ap, request);
   arg = va_arg(ap, void *);
   va_end(ap);
   if (request == VMCI_SOCKETS_GET_AF_VALUE && is_vsock_device(fd)) {
      int family = VSC_AF_VSOCK;
      return copy_user(arg, &family, sizeof family, 1);
   }
   fn = (ioctl_fn)resolve(F_IOCTL);
   return fn == NULL ? missing() : fn(fd, request, arg);
}

/* --- socket options ----------------------------------------------------- */

static int is_vsock_socket(int fd)
{
   getsockopt_fn fn = (getsockopt_fn)resolve(F_GETSOCKOPT);
   int domain = -1;
   socklen_t len = sizeof domain;
   int saved = errno;
   int yes = fn != NULL && fn(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0
             && domain == VSC_AF_VSOCK;

   errno = saved;
   return yes;
}

static int has_cap_net_admin(void)
{
   struct __user_cap_header_struct header = { _LINUX_CAPABILITY_VERSION_3, 0 };
   struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];

   memset(data, 0, sizeof data);
   if (syscall(SYS_capget, &header, data) != 0) {
      return 0;
   }
   return (data[0].effective & (1u << VSC_CAP_NET_ADMIN)) != 0;
}

/* getsockopt(SO_VMCI_TRUSTED) with the kernel's conventions for an int
 * option: EFAULT for bad pointers, EINVAL for a length below sizeof(int),
 * the length written back as sizeof(int). */
static int get_trusted(void *value, socklen_t *len)
{
   socklen_t have;
   int trusted;

   if (copy_user(len, &have, sizeof have, 0) != 0) {
      return -1;
   }
   if ((int)have < (int)sizeof trusted) {
      errno = EINVAL;
      return -1;
   }
   trusted = has_cap_net_admin();
   have = sizeof trusted;
   if (copy_user(value, &trusted, sizeof trusted, 1) != 0
       || copy_user(len, &have, sizeof have, 1) != 0) {
      return -1;
   }
   return 0;
}

VSC_EXPORT int getsockopt(int fd, int level, int name, void *value, socklen_t *len)
{
   getsockopt_fn fn = (getsockopt_fn)resolve(F_GETSOCKOPT);
   int rc;

   if (fn == NULL) {
      return missing();
   }
   rc = fn(fd, level, name, value, len);
   if (rc == 0 || level != VSC_AF_VSOCK) {
      return rc;
   }
   if (name == VSC_SO_VM_SOCKETS_TRUSTED && (errno == ENOPROTOOPT || errno == EOPNOTSUPP)
       && is_vsock_socket(fd)) {
      return get_trusted(value, len);
   }
   if (name == VSC_SO_VMCI_DISCONNECT_CAUSE && errno == EINVAL && is_vsock_socket(fd)) {
      errno = ENOPROTOOPT;    /* only a length below the timeval's gives EINVAL here */
   }
   return rc;
}

VSC_EXPORT int setsockopt(int fd, int level, int name, const void *value, socklen_t len)
{
   setsockopt_fn fn = (setsockopt_fn)resolve(F_SETSOCKOPT);
   int rc;

   if (fn == NULL) {
      return missing();
   }
   rc = fn(fd, level, name, value, len);
   if (rc != 0 && level == VSC_AF_VSOCK && name == VSC_SO_VMCI_DISCONNECT_CAUSE
       && errno == EINVAL && len < VSC_SOCK_TIMEVAL_SIZE && is_vsock_socket(fd)) {
      errno = ENOPROTOOPT;
   }
   return rc;
}
