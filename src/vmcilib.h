/*
 * vmcilib.h: the VMCI SDK header (VMware Workstation 6.0 user-level API),
 * reconstructed by vsockcompat so that legacy sources recompile unchanged
 * against libvmci.so.0. The original header was never published; types and
 * shapes follow the shipped samples (vmci-sdk.md sections 2 and 4), values
 * come from vsc_constants.h, which is generated from vsockcompat/constants.py.
 *
 * Status: datagrams, shared memory, the discovery service and
 * VMCIResource_AddClientPrivileges (enforced: a denied DG_SEND or SM_ATTACH
 * gives VMCI_ERROR_NO_ACCESS) are implemented.
 */
#ifndef _VMCILIB_H_
#define _VMCILIB_H_

#include <stddef.h>
#include <stdint.h>

#include "vsc_constants.h"

#ifdef __cplusplus
extern "C" {
#endif

/* vm_basic_types.h names, unless the program brings its own. */
#ifndef _VM_BASIC_TYPES_H_
typedef uint8_t uint8;
typedef uint16_t uint16;
typedef uint32_t uint32;
typedef uint64_t uint64;
typedef int8_t int8;
typedef int16_t int16;
typedef int32_t int32;
typedef int64_t int64;
#ifndef __cplusplus
typedef char Bool;
#endif
#ifndef TRUE
#define TRUE 1
#endif
#ifndef FALSE
#define FALSE 0
#endif
#endif

typedef uint32 VMCIId;

typedef struct VMCIHandle {
   VMCIId context;
   VMCIId resource;
} VMCIHandle;

typedef uint32 VMCIPrivilegeFlags;
typedef int VMCIResourcePrivilegeType;

static __inline__ VMCIHandle VMCI_MAKE_HANDLE(VMCIId cid, VMCIId rid)
{
   VMCIHandle h;
   h.context = cid;
   h.resource = rid;
   return h;
}

#define VMCI_HANDLE_TO_CONTEXT_ID(_h)  ((_h).context)
#define VMCI_HANDLE_TO_RESOURCE_ID(_h) ((_h).resource)
#define VMCI_HANDLE_EQUAL(_h1, _h2) \
   ((_h1).context == (_h2).context && (_h1).resource == (_h2).resource)
#define VMCI_HANDLE_TO_UINT64(_h) \
   (((uint64)(_h).context << 32) | (uint64)(_h).resource)

static const VMCIHandle VMCI_INVALID_HANDLE = {VMCI_INVALID_ID, VMCI_INVALID_ID};
static const VMCIHandle VMCI_ANON_SRC_HANDLE = {VMCI_ANON_SRC_CONTEXT_ID, VMCI_ANON_SRC_RESOURCE_ID};
#define VMCI_HANDLE_INVALID(_h) VMCI_HANDLE_EQUAL((_h), VMCI_INVALID_HANDLE)

#define VMCI_DS_HANDLE  VMCI_MAKE_HANDLE(VMCI_WELL_KNOWN_CONTEXT_ID, VMCI_DS_RESOURCE_ID)
#define VMCI_DS_CONTEXT VMCI_MAKE_HANDLE(VMCI_WELL_KNOWN_CONTEXT_ID, VMCI_CONTEXT_RESOURCE_ID)

#define VMCI_PUBLIC_GROUP_NAME "vmci public group"
#define VMCI_LGPFX "VMCI: "

#define VMCI_DG_SIZE(_dgSize)  (VMCI_DG_HEADERSIZE + (size_t)(_dgSize))
#define VMCI_DG_SIZE_ALIGNED(_dgSize) ((VMCI_DG_SIZE(_dgSize) + 7) & (size_t)~7)

/* 4.1 Library setup. devName is accepted and not opened. */
int VMCI_InitApp(const char *devName);
void VMCI_CleanupApp(void);

/* 4.2 Datagrams. CreateHnd(0): a fresh resource id >= 1024; another value asks for that id. */
VMCIHandle VMCIDatagram_CreateHnd(uint32 resourceID);
int VMCIDatagram_DestroyHnd(VMCIHandle handle);
/* Returns the datagram's size including its 24-byte header. */
int VMCIDatagram_SendTo(VMCIHandle dst, VMCIHandle src, uint32 len, const void *buf);
/* Blocks; returns the payload length. srcOut may be NULL. */
int VMCIDatagram_RecvFrom(VMCIHandle handle, VMCIHandle *srcOut, void *buf, uint32 len);

/* 4.3 Shared memory: regions shared with Python processes too (see README.rst). */
VMCIHandle VMCISharedMem_Create(uint32 size, void **addrOut);
int VMCISharedMem_Query(VMCIHandle handle, uint32 *sizeOut);
int VMCISharedMem_Attach(VMCIHandle handle, void **addrOut, uint32 *sizeInOut);
int VMCISharedMem_Detach(VMCIHandle handle);

/* 4.4 Access control (the kernel's shape): validates its arguments, enforces nothing. */
int VMCIResource_AddClientPrivileges(VMCIHandle resourceHandle, VMCIHandle clientHandle,
                                     int numAllowPrivs, VMCIResourcePrivilegeType *allowPrivs,
                                     int numDenyPrivs, VMCIResourcePrivilegeType *denyPrivs);

/* 4.5 Discovery service. */
int VMCIDs_Lookup(const char *name, VMCIHandle *out);
int VMCIDs_Register(const char *name, VMCIHandle handle);
int VMCIDs_Unregister(const char *name);

#ifdef __cplusplus
}
#endif
#endif /* _VMCILIB_H_ */
