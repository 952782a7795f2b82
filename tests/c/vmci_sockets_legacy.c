/*
 * vmci_sockets_legacy.c: a VMCI Sockets program as it was built against
 * VMware's own vmci_sockets.h (2008-2012). That header's helpers were inline,
 * so they are compiled in here too, with the same system calls: the address
 * family comes from ioctl 1976 (VMCI_SOCKETS_GET_AF_VALUE) on /dev/vsock, the
 * CID from ioctl 1977, the version from ioctl 1972; every option is set at
 * level "af value" with the SDK's SO_VMCI_* names. On mainline Linux it gets
 * af -1; under `vsockcompat run` (libvsockcompat-preload.so) it runs.
 *
 *   helpers                 the helpers' answers (af, whether the device fd is
 *                           kept, cid, version)
 *   badinput                ioctl 1976 with NULL and unmapped pointers, on a
 *                           pipe, a dup()ed and a closed descriptor; options at
 *                           level 40 on an AF_UNIX socket pair
 *   options                 every SO_VMCI_* on an AF_VSOCK stream socket, and
 *                           socket(af, SOCK_DGRAM)
 *   server PORT             echo one line on (VMADDR_CID_ANY, PORT)
 *   client CID PORT TEXT    send TEXT, print the echo
 *
 * Each check prints "NAME rc=R errno=E[ value=V]".
 *
 * Built with -DVSC_HOST_ONLY, for a machine whose vsock leads to a foreign
 * host: options, server and client are left out (no AF_VSOCK socket can be
 * made), the program refuses to start unless VSOCKCOMPAT_VSOCK_DEVICE is set
 * (the preload then opens that file for "/dev/vsock"), and it exits 3 before
 * any ioctl on a "/dev/vsock" descriptor that is not a regular file.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <unistd.h>

/* ---- What VMware's vmci_sockets.h gave a Linux program (vmci-sdk.md 10.1) */

#define SO_VMCI_BUFFER_SIZE       0
#define SO_VMCI_BUFFER_MIN_SIZE   1
#define SO_VMCI_BUFFER_MAX_SIZE   2
#define SO_VMCI_PEER_HOST_VM_ID   3
#define SO_VMCI_SERVICE_LABEL     4
#define SO_VMCI_TRUSTED           5
#define SO_VMCI_CONNECT_TIMEOUT   6
#define SO_VMCI_NONBLOCK_TXRX     7
#define SO_VMCI_DISCONNECT_CAUSE  8

#define VMADDR_CID_ANY  ((unsigned int)-1)
#define VMADDR_PORT_ANY ((unsigned int)-1)
#define VMCI_SOCKETS_INVALID_VERSION ((unsigned int)-1)

struct sockaddr_vm {
   sa_family_t svm_family;
   unsigned short svm_reserved1;
   unsigned int svm_port;
   unsigned int svm_cid;
   unsigned char svm_zero[sizeof(struct sockaddr) - sizeof(sa_family_t) - sizeof(unsigned short)
                          - sizeof(unsigned int) - sizeof(unsigned int)];
};

#define VMCI_SOCKETS_DEFAULT_DEVICE     "/dev/vsock"
#define VMCI_SOCKETS_CLASSIC_ESX_DEVICE "/vmfs/devices/char/vsock/vsock"
#define VMCI_SOCKETS_VERSION            1972
#define VMCI_SOCKETS_GET_AF_VALUE       1976
#define VMCI_SOCKETS_GET_LOCAL_CID      1977

/* Every ioctl the helpers make on the device goes through here. */
static int DeviceIoctl(int fd, unsigned long request, void *arg)
{
#ifdef VSC_HOST_ONLY
   struct stat st;

   if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      fprintf(stderr, "refusing: the descriptor opened as /dev/vsock is not a test file\n");
      exit(3);
   }
#endif
   return ioctl(fd, request, arg);
}

static int OpenDevice(void)
{
   int fd = open(VMCI_SOCKETS_DEFAULT_DEVICE, O_RDWR);

   if (fd < 0) {
      fd = open(VMCI_SOCKETS_CLASSIC_ESX_DEVICE, O_RDWR);
   }
   return fd;
}

/* The family for socket() and the level for options, or -1. The device stays
 * open (the family stayed registered while it was) and is handed to the caller
 * through outFd when that is not NULL. */
static inline int VMCISock_GetAFValueFd(int *outFd)
{
   int family;
   int fd = OpenDevice();

   if (fd < 0) {
      return -1;
   }
   if (DeviceIoctl(fd, VMCI_SOCKETS_GET_AF_VALUE, &family) < 0) {
      family = -1;
   }
   if (family < 0) {
      close(fd);
   } else if (outFd != NULL) {
      *outFd = fd;
   }
   return family;
}

static inline int VMCISock_GetAFValue(void)
{
   return VMCISock_GetAFValueFd(NULL);
}

static inline void VMCISock_ReleaseAFValueFd(int fd)
{
   if (fd >= 0) {
      close(fd);
   }
}

static inline unsigned int VMCISock_GetLocalCID(void)
{
   unsigned int cid;
   int fd = OpenDevice();

   if (fd < 0) {
      return VMADDR_CID_ANY;
   }
   if (DeviceIoctl(fd, VMCI_SOCKETS_GET_LOCAL_CID, &cid) < 0) {
      cid = VMADDR_CID_ANY;
   }
   close(fd);
   return cid;
}

static inline unsigned int VMCISock_Version(void)
{
   unsigned int version;
   int fd = OpenDevice();

   if (fd < 0) {
      return VMCI_SOCKETS_INVALID_VERSION;
   }
   if (DeviceIoctl(fd, VMCI_SOCKETS_VERSION, &version) < 0) {
      version = VMCI_SOCKETS_INVALID_VERSION;
   }
   close(fd);
   return version;
}

/* ---- The program ---------------------------------------------------------- */

static const char *ErrName(int err)
{
   static char other[16];

   switch (err) {
   case 0: return "0";
   case EFAULT: return "EFAULT";
   case ENOTTY: return "ENOTTY";
   case EINVAL: return "EINVAL";
   case EBADF: return "EBADF";
   case ENOPROTOOPT: return "ENOPROTOOPT";
   case EOPNOTSUPP: return "EOPNOTSUPP";
   case ENOTSOCK: return "ENOTSOCK";
   case ENODEV: return "ENODEV";
   case ERANGE: return "ERANGE";
   case EAFNOSUPPORT: return "EAFNOSUPPORT";
   case ENAMETOOLONG: return "ENAMETOOLONG";
   default:
      snprintf(other, sizeof other, "%d", err);
      return other;
   }
}

static void Report(const char *name, int rc, int err)
{
   printf("%s rc=%d errno=%s\n", name, rc, ErrName(rc < 0 ? err : 0));
}

static void ReportValue(const char *name, int rc, int err, unsigned long long value)
{
   printf("%s rc=%d errno=%s value=%llu\n", name, rc, ErrName(rc < 0 ? err : 0), value);
}

static int RunHelpers(void)
{
   int fd = -2;
   int af = VMCISock_GetAFValueFd(&fd);

   printf("af %d\n", af);
   printf("fd_kept %d\n", fd >= 0);
   VMCISock_ReleaseAFValueFd(fd);
   printf("af_again %d\n", VMCISock_GetAFValue());
   printf("cid %u\n", VMCISock_GetLocalCID());
   printf("version %u\n", VMCISock_Version());
   return af < 0;
}

/* Options at level 40 on a socket that is not AF_VSOCK: must be the kernel's answers. */
static void UnixOptions(int fd, const char *prefix)
{
   char name[64];
   int value = 7;
   unsigned long long size = 4096;
   socklen_t len;
   int rc;

#define CHECK(label, call)                                    \
   do {                                                       \
      errno = 0;                                              \
      rc = (call);                                            \
      snprintf(name, sizeof name, "%s_%s", prefix, label);    \
      Report(name, rc, errno);                                \
   } while (0)

   len = sizeof value;
   CHECK("get_trusted", getsockopt(fd, 40, SO_VMCI_TRUSTED, &value, &len));
   len = sizeof value;
   CHECK("get_cause", getsockopt(fd, 40, SO_VMCI_DISCONNECT_CAUSE, &value, &len));
   CHECK("set_cause", setsockopt(fd, 40, SO_VMCI_DISCONNECT_CAUSE, &value, sizeof value));
   CHECK("set_size_short", setsockopt(fd, 40, SO_VMCI_BUFFER_SIZE, &size, 4));
   len = sizeof value;
   CHECK("get_unknown", getsockopt(fd, 40, 99, &value, &len));
   CHECK("set_unknown", setsockopt(fd, 40, 99, &value, sizeof value));
#undef CHECK
}

static int RunBadInput(void)
{
   int fd = OpenDevice();
   int pipeFds[2];
   int pair[2];
   int value;
   int copy;
   int rc;

   if (fd < 0) {
      Report("open", fd, errno);
      return 1;
   }
   errno = 0;
   rc = DeviceIoctl(fd, VMCI_SOCKETS_GET_AF_VALUE, NULL);
   Report("af_null", rc, errno);
   rc = DeviceIoctl(fd, VMCI_SOCKETS_GET_AF_VALUE, (void *)8);
   Report("af_unmapped", rc, errno);
   value = -7;
   rc = DeviceIoctl(fd, VMCI_SOCKETS_GET_AF_VALUE, &value);
   ReportValue("af", rc, errno, (unsigned long long)value);
   copy = dup(fd);
   value = -7;
   rc = DeviceIoctl(copy, VMCI_SOCKETS_GET_AF_VALUE, &value);
   ReportValue("af_dup", rc, errno, (unsigned long long)value);
   close(copy);
   close(fd);

   if (pipe(pipeFds) != 0) {
      perror("pipe");
      return 1;
   }
   value = 12345;
   rc = ioctl(pipeFds[0], VMCI_SOCKETS_GET_AF_VALUE, &value);
   ReportValue("pipe_af", rc, errno, (unsigned long long)value);
   rc = ioctl(pipeFds[0], VMCI_SOCKETS_GET_AF_VALUE, NULL);
   Report("pipe_af_null", rc, errno);
   close(pipeFds[0]);
   close(pipeFds[1]);
   value = 12345;
   rc = ioctl(pipeFds[0], VMCI_SOCKETS_GET_AF_VALUE, &value);
   ReportValue("closed_af", rc, errno, (unsigned long long)value);
   rc = ioctl(-1, VMCI_SOCKETS_GET_AF_VALUE, &value);
   Report("negative_fd_af", rc, errno);

   if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) != 0) {
      perror("socketpair");
      return 1;
   }
   UnixOptions(pair[0], "unix");
   close(pair[0]);
   close(pair[1]);
   return 0;
}

#ifndef VSC_HOST_ONLY

static int Stream(int af)
{
   int fd = socket(af, SOCK_STREAM, 0);

   if (fd < 0) {
      perror("socket");
      exit(1);
   }
   return fd;
}

static int RunOptions(int af)
{
   int fd = Stream(af);
   unsigned long long size = 0;
   struct timeval tv;
   char label[32] = "legacy service";
   int value;
   socklen_t len;
   int rc;

   len = sizeof size;
   rc = getsockopt(fd, af, SO_VMCI_BUFFER_SIZE, &size, &len);
   ReportValue("get_buffer_size", rc, errno, size);
   size = 1 << 20;
   rc = setsockopt(fd, af, SO_VMCI_BUFFER_MAX_SIZE, &size, sizeof size);
   Report("set_buffer_max", rc, errno);
   size = 4096;
   rc = setsockopt(fd, af, SO_VMCI_BUFFER_MIN_SIZE, &size, sizeof size);
   Report("set_buffer_min", rc, errno);
   size = 32768;
   rc = setsockopt(fd, af, SO_VMCI_BUFFER_SIZE, &size, sizeof size);
   Report("set_buffer_size", rc, errno);
   size = 0;
   len = sizeof size;
   rc = getsockopt(fd, af, SO_VMCI_BUFFER_SIZE, &size, &len);
   ReportValue("get_buffer_size_after", rc, errno, size);
   size = 2 << 20;                           /* above the max: clamped */
   rc = setsockopt(fd, af, SO_VMCI_BUFFER_SIZE, &size, sizeof size);
   len = sizeof size;
   rc = rc == 0 ? getsockopt(fd, af, SO_VMCI_BUFFER_SIZE, &size, &len) : rc;
   ReportValue("buffer_size_clamped", rc, errno, size);
   rc = setsockopt(fd, af, SO_VMCI_BUFFER_SIZE, &size, 4);
   Report("set_buffer_size_short", rc, errno);
   len = 4;
   rc = getsockopt(fd, af, SO_VMCI_BUFFER_MIN_SIZE, &size, &len);
   Report("get_buffer_min_short", rc, errno);

   tv.tv_sec = 3;
   tv.tv_usec = 0;
   rc = setsockopt(fd, af, SO_VMCI_CONNECT_TIMEOUT, &tv, sizeof tv);
   Report("set_connect_timeout", rc, errno);
   memset(&tv, 0, sizeof tv);
   len = sizeof tv;
   rc = getsockopt(fd, af, SO_VMCI_CONNECT_TIMEOUT, &tv, &len);
   ReportValue("get_connect_timeout", rc, errno, (unsigned long long)tv.tv_sec);

   len = sizeof value;
   rc = getsockopt(fd, af, SO_VMCI_PEER_HOST_VM_ID, &value, &len);
   Report("get_peer_host_vm_id", rc, errno);
   rc = setsockopt(fd, af, SO_VMCI_SERVICE_LABEL, label, (socklen_t)strlen(label) + 1);
   Report("set_service_label", rc, errno);
   len = sizeof label;
   rc = getsockopt(fd, af, SO_VMCI_SERVICE_LABEL, label, &len);
   Report("get_service_label", rc, errno);

   value = -1;
   len = sizeof value;
   rc = getsockopt(fd, af, SO_VMCI_TRUSTED, &value, &len);
   ReportValue("get_trusted", rc, errno, (unsigned long long)value);
   printf("trusted_len %u\n", (unsigned)len);
   len = 2;
   rc = getsockopt(fd, af, SO_VMCI_TRUSTED, &value, &len);
   Report("get_trusted_short", rc, errno);
   len = sizeof value;
   rc = getsockopt(fd, af, SO_VMCI_TRUSTED, NULL, &len);
   Report("get_trusted_null", rc, errno);
   rc = getsockopt(fd, af, SO_VMCI_TRUSTED, &value, NULL);
   Report("get_trusted_null_len", rc, errno);
   rc = getsockopt(fd, af, SO_VMCI_TRUSTED, (void *)8, &len);
   Report("get_trusted_unmapped", rc, errno);
   value = 1;
   rc = setsockopt(fd, af, SO_VMCI_TRUSTED, &value, sizeof value);
   Report("set_trusted", rc, errno);

   value = 1;
   rc = setsockopt(fd, af, SO_VMCI_NONBLOCK_TXRX, &value, sizeof value);
   Report("set_nonblock_txrx", rc, errno);
   len = sizeof value;
   rc = getsockopt(fd, af, SO_VMCI_NONBLOCK_TXRX, &value, &len);
   Report("get_nonblock_txrx", rc, errno);
   len = sizeof value;
   rc = getsockopt(fd, af, SO_VMCI_DISCONNECT_CAUSE, &value, &len);
   Report("get_disconnect_cause", rc, errno);
   rc = setsockopt(fd, af, SO_VMCI_DISCONNECT_CAUSE, &value, sizeof value);
   Report("set_disconnect_cause", rc, errno);
   len = sizeof value;
   rc = getsockopt(fd, af, 99, &value, &len);
   Report("get_unknown", rc, errno);
   rc = setsockopt(fd, af, 99, &value, sizeof value);
   Report("set_unknown", rc, errno);
   close(fd);

   errno = 0;
   fd = socket(af, SOCK_DGRAM, 0);
   Report("dgram_socket", fd < 0 ? -1 : 0, errno);
   if (fd >= 0) {
      close(fd);
   }
   return 0;
}

static int RunServer(int af, unsigned int port)
{
   struct sockaddr_vm addr;
   struct sockaddr_vm peer;
   socklen_t peerLen = sizeof peer;
   unsigned long long size = 65536;
   char line[512];
   ssize_t got;
   int fd = Stream(af);
   int conn;

   if (setsockopt(fd, af, SO_VMCI_BUFFER_SIZE, &size, sizeof size) != 0) {
      perror("setsockopt");
      return 1;
   }
   memset(&addr, 0, sizeof addr);
   addr.svm_family = (sa_family_t)af;
   addr.svm_cid = VMADDR_CID_ANY;
   addr.svm_port = port;
   if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 1) != 0) {
      perror("bind/listen");
      return 1;
   }
   printf("listening on cid %u port %u\n", VMCISock_GetLocalCID(), port);
   fflush(stdout);
   conn = accept(fd, (struct sockaddr *)&peer, &peerLen);
   if (conn < 0) {
      perror("accept");
      return 1;
   }
   got = recv(conn, line, sizeof line, 0);
   if (got <= 0 || send(conn, line, (size_t)got, 0) != got) {
      perror("echo");
      return 1;
   }
   printf("echoed %d bytes to cid %u\n", (int)got, peer.svm_cid);
   close(conn);
   close(fd);
   return 0;
}

static int RunClient(int af, unsigned int cid, unsigned int port, const char *text)
{
   struct sockaddr_vm addr;
   struct timeval tv = { 10, 0 };
   char line[512];
   size_t len = strlen(text);
   size_t have = 0;
   int fd = Stream(af);

   if (setsockopt(fd, af, SO_VMCI_CONNECT_TIMEOUT, &tv, sizeof tv) != 0) {
      perror("setsockopt");
      return 1;
   }
   memset(&addr, 0, sizeof addr);
   addr.svm_family = (sa_family_t)af;
   addr.svm_cid = cid;
   addr.svm_port = port;
   if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
      perror("connect");
      return 1;
   }
   if (len >= sizeof line || send(fd, text, len, 0) != (ssize_t)len) {
      perror("send");
      return 1;
   }
   while (have < len) {
      ssize_t got = recv(fd, line + have, len - have, 0);
      if (got <= 0) {
         perror("recv");
         return 1;
      }
      have += (size_t)got;
   }
   line[have] = '\0';
   printf("%s\n", line);
   close(fd);
   return 0;
}

#endif /* !VSC_HOST_ONLY */

static int Usage(void)
{
   fprintf(stderr, "usage: vmci_sockets_legacy helpers|badinput"
#ifndef VSC_HOST_ONLY
                   "|options|server PORT|client CID PORT TEXT"
#endif
                   "\n");
   return 2;
}

int main(int argc, char **argv)
{
   setvbuf(stdout, NULL, _IOLBF, 0);
#ifdef VSC_HOST_ONLY
   if (getenv("VSOCKCOMPAT_VSOCK_DEVICE") == NULL || getenv("LD_PRELOAD") == NULL
       || strstr(getenv("LD_PRELOAD"), "vsockcompat-preload") == NULL) {
      fprintf(stderr, "refusing: host builds run only with the preload and VSOCKCOMPAT_VSOCK_DEVICE\n");
      return 3;
   }
#endif
   if (argc == 2 && strcmp(argv[1], "helpers") == 0) {
      return RunHelpers();
   }
   if (argc == 2 && strcmp(argv[1], "badinput") == 0) {
      return RunBadInput();
   }
#ifndef VSC_HOST_ONLY
   {
      int af = VMCISock_GetAFValue();

      if (argc >= 2 && af < 0) {
         fprintf(stderr, "VMCISock_GetAFValue: %d (no VMCI Sockets here)\n", af);
         return 4;
      }
      if (argc == 2 && strcmp(argv[1], "options") == 0) {
         return RunOptions(af);
      }
      if (argc == 3 && strcmp(argv[1], "server") == 0) {
         return RunServer(af, (unsigned int)strtoul(argv[2], NULL, 0));
      }
      if (argc == 5 && strcmp(argv[1], "client") == 0) {
         return RunClient(af, (unsigned int)strtoul(argv[2], NULL, 0),
                          (unsigned int)strtoul(argv[3], NULL, 0), argv[4]);
      }
   }
#endif
   return Usage();
}
