/*
 * vmci_sockets.h: a compatible replacement, by vsockcompat, for the header
 * that VMware shipped with VMCI Sockets (Workstation 6.5 and later), so that
 * programs written against it build unchanged against AF_VSOCK on mainline
 * Linux (vmci-sdk.md section 10.1). Header only: nothing to link.
 *
 * The VMware header implemented its helpers inline; so does this one, with
 * the same names and return conventions, but without the obsolete
 * IOCTL_VMCI_SOCKETS_GET_AF_VALUE (1976), which mainline's /dev/vsock does
 * not handle (vmci-sdk.md section 10.3: binaries built with the old header
 * get -1 there).
 *
 *   VMCISock_GetAFValue()       AF_VSOCK (40) when this kernel has vsock,
 *                               else -1. Detected WITHOUT creating a socket
 *                               (which could auto-load a transport, and on a
 *                               VM leads to the hypervisor host): vsock is
 *                               present when /dev/vsock exists (the misc
 *                               device af_vsock registers) or
 *                               /sys/module/vsock exists (module loaded, also
 *                               without a /dev entry, e.g. in a container).
 *                               So a kernel whose vsock module is not loaded
 *                               yet gives -1, where VMware's latest header,
 *                               which probed with socket(40, SOCK_DGRAM, 0),
 *                               might have auto-loaded it. No fd is kept:
 *                               AF_VSOCK stays registered regardless.
 *   VMCISock_GetAFValueFd(&fd)  the same; *fd (when fd is not NULL) is always
 *                               set to -1, as VMware's latest header did when
 *                               no device fd was needed.
 *   VMCISock_ReleaseAFValueFd() closes fd when fd >= 0; -1 is a no-op.
 *   VMCISock_GetLocalCID()      IOCTL_VM_SOCKETS_GET_LOCAL_CID (1977) on
 *                               /dev/vsock; VMADDR_CID_ANY on any failure.
 *   VMCISock_Version()          always VMCI_SOCKETS_INVALID_VERSION
 *                               (0xFFFFFFFF): the VERSION ioctl (1972) does
 *                               not exist on mainline's /dev/vsock, and the
 *                               SDK defines 0xFFFFFFFF as "invalid/unknown".
 *
 * Socket options (level = the AF value, i.e. AF_VSOCK): SO_VMCI_* names are
 * the Linux SO_VM_SOCKETS_* values. Only those with a Linux counterpart are
 * defined: SO_VMCI_SERVICE_LABEL (4) and SO_VMCI_DISCONNECT_CAUSE (8) ..
 * SO_VMCI_PEER_BURST_LEVEL (11) are left undefined on purpose, since 8 is
 * SO_VM_SOCKETS_CONNECT_TIMEOUT_NEW on Linux and would silently do something
 * else. SO_VMCI_CONNECT_TIMEOUT (6 in the SDK, a struct timeval) is Linux's
 * SO_VM_SOCKETS_CONNECT_TIMEOUT, which is 6 wherever struct timeval has the
 * kernel's layout (all 64-bit ABIs) and 8 on 32-bit ABIs with 64-bit time_t.
 *
 * struct sockaddr_vm and VMADDR_* come from <linux/vm_sockets.h> when it is
 * available (define VMCI_SOCKETS_NO_LINUX_HEADER to use the copies below,
 * which have the same layout: vmci-sdk.md section 3.5).
 *
 * C89 (GNU __inline__), C99/C11 and C++; no warnings with -Wall -Wextra
 * -Wpedantic. Defines no feature-test macro and changes none of the
 * including program's settings.
 */
#ifndef _VMCI_SOCKETS_H_
#define _VMCI_SOCKETS_H_

#include <sys/types.h>
#include <sys/socket.h>
#include <sys/ioctl.h>
#include <fcntl.h>
#include <unistd.h>

#if defined(__linux__) && !defined(VMCI_SOCKETS_NO_LINUX_HEADER)
#  if defined(__has_include)
#    if __has_include(<linux/vm_sockets.h>)
#      include <linux/vm_sockets.h>
#      define VMCI_SOCKETS_HAVE_LINUX_HEADER 1
#    endif
#  else
#    include <linux/vm_sockets.h>
#    define VMCI_SOCKETS_HAVE_LINUX_HEADER 1
#  endif
#endif

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
#ifndef PF_VSOCK
#define PF_VSOCK AF_VSOCK
#endif

#ifndef VMCI_SOCKETS_HAVE_LINUX_HEADER
/* The layout of Linux's struct sockaddr_vm (16 bytes, host byte order). */
struct sockaddr_vm {
   sa_family_t svm_family;
   unsigned short svm_reserved1;
   unsigned int svm_port;
   unsigned int svm_cid;
   unsigned char svm_flags;
   unsigned char svm_zero[sizeof(struct sockaddr) - sizeof(sa_family_t)
                          - sizeof(unsigned short) - sizeof(unsigned int)
                          - sizeof(unsigned int) - sizeof(unsigned char)];
};
#endif

/* VMADDR_*: Linux's values, for headers that lack some of them. */
#ifndef VMADDR_CID_ANY
#define VMADDR_CID_ANY 0xFFFFFFFFu
#endif
#ifndef VMADDR_PORT_ANY
#define VMADDR_PORT_ANY 0xFFFFFFFFu
#endif
#ifndef VMADDR_CID_HYPERVISOR
#define VMADDR_CID_HYPERVISOR 0
#endif
#ifndef VMADDR_CID_LOCAL
#define VMADDR_CID_LOCAL 1            /* formerly VMADDR_CID_RESERVED */
#endif
#ifndef VMADDR_CID_RESERVED
#define VMADDR_CID_RESERVED VMADDR_CID_LOCAL
#endif
#ifndef VMADDR_CID_HOST
#define VMADDR_CID_HOST 2
#endif
#ifndef VMADDR_FLAG_TO_HOST
#define VMADDR_FLAG_TO_HOST 0x01
#endif

/* Linux SO_VM_SOCKETS_* names, for headers that lack some of them. */
#ifndef SO_VM_SOCKETS_BUFFER_SIZE
#define SO_VM_SOCKETS_BUFFER_SIZE 0
#endif
#ifndef SO_VM_SOCKETS_BUFFER_MIN_SIZE
#define SO_VM_SOCKETS_BUFFER_MIN_SIZE 1
#endif
#ifndef SO_VM_SOCKETS_BUFFER_MAX_SIZE
#define SO_VM_SOCKETS_BUFFER_MAX_SIZE 2
#endif
#ifndef SO_VM_SOCKETS_PEER_HOST_VM_ID
#define SO_VM_SOCKETS_PEER_HOST_VM_ID 3
#endif
#ifndef SO_VM_SOCKETS_TRUSTED
#define SO_VM_SOCKETS_TRUSTED 5
#endif
#ifndef SO_VM_SOCKETS_CONNECT_TIMEOUT
#define SO_VM_SOCKETS_CONNECT_TIMEOUT 6
#endif
#ifndef SO_VM_SOCKETS_NONBLOCK_TXRX
#define SO_VM_SOCKETS_NONBLOCK_TXRX 7
#endif

/* The VMCI Sockets option names (level: the value of VMCISock_GetAFValue()). */
#define SO_VMCI_BUFFER_SIZE       SO_VM_SOCKETS_BUFFER_SIZE        /* 0, unsigned long long */
#define SO_VMCI_BUFFER_MIN_SIZE   SO_VM_SOCKETS_BUFFER_MIN_SIZE    /* 1, unsigned long long */
#define SO_VMCI_BUFFER_MAX_SIZE   SO_VM_SOCKETS_BUFFER_MAX_SIZE    /* 2, unsigned long long */
#define SO_VMCI_PEER_HOST_VM_ID   SO_VM_SOCKETS_PEER_HOST_VM_ID    /* 3 */
#define SO_VMCI_TRUSTED           SO_VM_SOCKETS_TRUSTED            /* 5 */
#define SO_VMCI_CONNECT_TIMEOUT   SO_VM_SOCKETS_CONNECT_TIMEOUT    /* 6, struct timeval */
#define SO_VMCI_NONBLOCK_TXRX     SO_VM_SOCKETS_NONBLOCK_TXRX      /* 7 */

/* Versions: epoch in bits 31..24, major 23..16, minor 15..0. */
#define VMCI_SOCKETS_INVALID_VERSION 0xFFFFFFFFu
#define VMCI_SOCKETS_VERSION_EPOCH(_v) (((_v) & 0xFF000000u) >> 24)
#define VMCI_SOCKETS_VERSION_MAJOR(_v) (((_v) & 0x00FF0000u) >> 16)
#define VMCI_SOCKETS_VERSION_MINOR(_v) ((_v) & 0x0000FFFFu)

/* The device and its one ioctl on mainline (the SDK's numbers are frozen). */
#define VMCI_SOCKETS_DEVICE "/dev/vsock"
#define VMCI_SOCKETS_SYSFS_MODULE "/sys/module/vsock"
#define VMCI_SOCKETS_GET_AF_VALUE 1976    /* obsolete: not handled by mainline, never used here */
#define VMCI_SOCKETS_GET_LOCAL_CID 1977   /* = IOCTL_VM_SOCKETS_GET_LOCAL_CID = _IO(7, 0xb9) */

#if defined(__cplusplus)
#  define VMCI_SOCKETS_INLINE inline
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 199901L
#  define VMCI_SOCKETS_INLINE inline
#else
#  define VMCI_SOCKETS_INLINE __inline__
#endif

#if defined(O_CLOEXEC)
#  define VMCI_SOCKETS_O_CLOEXEC O_CLOEXEC
#else
#  define VMCI_SOCKETS_O_CLOEXEC 0
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* The address family for socket() and the level for {get,set}sockopt():
 * AF_VSOCK when this kernel has vsock (see the top of this file), else -1.
 * *outFd, when outFd is not NULL, is set to -1: no fd needs to be kept. */
static VMCI_SOCKETS_INLINE int VMCISock_GetAFValueFd(int *outFd)
{
   if (outFd != NULL) {
      *outFd = -1;
   }
   if (access(VMCI_SOCKETS_DEVICE, F_OK) == 0 || access(VMCI_SOCKETS_SYSFS_MODULE, F_OK) == 0) {
      return AF_VSOCK;
   }
   return -1;
}

/* Releases what VMCISock_GetAFValueFd() returned in *outFd: closes fd when
 * it is >= 0 (never the case with this header); -1 does nothing. */
static VMCI_SOCKETS_INLINE void VMCISock_ReleaseAFValueFd(int fd)
{
   if (fd >= 0) {
      close(fd);
   }
}

static VMCI_SOCKETS_INLINE int VMCISock_GetAFValue(void)
{
   return VMCISock_GetAFValueFd(NULL);
}

/* This machine's context id (CID); VMADDR_CID_ANY when /dev/vsock is missing
 * or the ioctl fails. On a host with only vsock_loopback it is 1. */
static VMCI_SOCKETS_INLINE unsigned int VMCISock_GetLocalCID(void)
{
   unsigned int cid = VMADDR_CID_ANY;
   int fd = open(VMCI_SOCKETS_DEVICE, O_RDONLY | VMCI_SOCKETS_O_CLOEXEC);

   if (fd < 0) {
      return VMADDR_CID_ANY;
   }
   if (ioctl(fd, VMCI_SOCKETS_GET_LOCAL_CID, &cid) < 0) {
      cid = VMADDR_CID_ANY;
   }
   close(fd);
   return cid;
}

/* The VMCI Sockets version: mainline Linux has no VERSION ioctl (1972), so
 * this is always VMCI_SOCKETS_INVALID_VERSION (0xFFFFFFFF), the SDK's value
 * for "unknown". */
static VMCI_SOCKETS_INLINE unsigned int VMCISock_Version(void)
{
   return VMCI_SOCKETS_INVALID_VERSION;
}

#ifdef __cplusplus
}
#endif

#endif /* _VMCI_SOCKETS_H_ */
