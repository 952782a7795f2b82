/*
 * libvmci.so.0: the VMCI SDK's user-level calls (vmci-sdk.md section 4) over the
 * vsockcompat C core. Every choice where the SDK is silent is the Python
 * side's (vsockcompat/sdk.py, README "Where the SDK is silent"), code for code.
 *
 * State: one handle table of this process's datagram endpoints, guarded by
 * g_lock, which is only ever held for table operations (never while a call
 * blocks or sends; a datagram call takes it once). The table holds one
 * reference to each endpoint; a call using an endpoint holds another (the
 * count is atomic, dropped without g_lock), so DestroyHnd/CleanupApp never free an
 * endpoint another thread is receiving on: they close it (the receiver
 * returns VMCI_ERROR_NO_MORE_DATAGRAMS) and the last reference frees it.
 *
 * fork(): a pthread_atfork child handler marks the table as inherited. The
 * child's next call drops the parent's endpoints without touching their
 * files, account pages or locks (their handles are then unknown in the child:
 * SendTo/RecvFrom give VMCI_ERROR_INVALID_ARGS, DestroyHnd VMCI_ERROR_NOT_FOUND),
 * and the child stays initialised, so it can create endpoints of its own.
 *
 * Shared memory (VMCISharedMem_*, src/vsc_shm.c) speaks vsockcompat/sharedmem.py's
 * protocol, so C and Python processes share regions both ways; mirrored regions
 * (src/vsc_mirror.h, VSOCKCOMPAT_SHM_MODE) speak vsockcompat/mirror.py's. A second table,
 * g_regions (also under g_lock), holds this process's mappings; the region calls
 * do their file work outside g_lock. CleanupApp detaches them all; a forked
 * child drops the parent's entries (closing only its copy of each lock file, the
 * mappings stay) and its own calls then see those handles as unknown.
 *
 * Access control (src/vsc_acl.c) shares vsockcompat/access.py's files, so C and
 * Python processes obey the same privileges: VMCIResource_AddClientPrivileges
 * records them (codes of the Python VMCILibrary method), VMCIDatagram_SendTo
 * gives VMCI_ERROR_NO_ACCESS to a sender denied DG_SEND (also on a link opened
 * before the denial), an endpoint drops what a denied sender still delivers,
 * and VMCISharedMem_Attach gives VMCI_ERROR_NO_ACCESS without SM_ATTACH. Before
 * those, the context flags of the policy file (src/vsc_policy.h; RESTRICTED talks
 * only to TRUSTED) refuse datagrams and attaches between contexts that may not
 * interact, and a context the policy gives to another user refuses VMCI_InitApp.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vmcilib.h"
#include "vsc_acl.h"
#include "vsc_ds.h"
#include "vsc_endpoint.h"
#include "vsc_local.h"
#include "vsc_mirror.h"
#include "vsc_shm.h"

#define VSC_EXPORT __attribute__((visibility("default")))

_Static_assert(sizeof(VMCIHandle) == 8 && sizeof(vsc_handle) == 8, "handle layout");

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_initialised;          /* under g_lock */
static int g_settings_read;        /* under g_lock; g_transport is fixed once read */
static vsc_local g_transport;
static vsc_policy g_policy;        /* g_transport.policy once read (under g_lock), then fixed */
static int g_policy_read;          /* under g_lock */
static vsc_endpoint **g_table;     /* under g_lock; each entry holds one reference */
static int g_count, g_cap;
static int g_inherited;            /* set in a forked child; under g_lock */
static vsc_region **g_regions;     /* under g_lock; this process's mapped regions */
static int g_nregions, g_regions_cap;

static const VMCIHandle INVALID_HANDLE = {VMCI_INVALID_ID, VMCI_INVALID_ID};

static int region_detach(vsc_region *r);

static void atfork_prepare(void) { pthread_mutex_lock(&g_lock); }
static void atfork_parent(void) { pthread_mutex_unlock(&g_lock); }

static void atfork_child(void)
{
    g_inherited = 1;
    pthread_mutex_unlock(&g_lock);
}

__attribute__((constructor)) static void vsc_lib_load(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

static vsc_handle to_vsc(VMCIHandle h)
{
    vsc_handle v = {h.context, h.resource};
    return v;
}

static VMCIHandle to_vmci(vsc_handle h)
{
    VMCIHandle v = {h.context, h.resource};
    return v;
}

/* Lock the table; in a forked child, first drop what the parent owns. */
static void table_lock(void)
{
    pthread_mutex_lock(&g_lock);
    if (g_inherited) {
        int i;

        g_inherited = 0;
        for (i = 0; i < g_count; i++)
            vsc_endpoint_abandon(g_table[i]);
        g_count = 0;
        for (i = 0; i < g_nregions; i++)
            if (g_regions[i]->mirror != NULL)
                vsc_mirror_abandon(g_regions[i]);
            else
                vsc_shm_abandon(g_regions[i]);
        g_nregions = 0;
        vsc_acl_memory_forget_all();
        if (g_settings_read) {
            g_transport.pid = getpid();
            g_transport.start = vsc_local_start_ticks(g_transport.pid);
        }
    }
}

static int table_find(VMCIHandle h)
{
    int i;

    for (i = 0; i < g_count; i++)
        if (g_table[i]->handle.context == h.context && g_table[i]->handle.resource == h.resource)
            return i;
    return -1;
}

static int is_initialised(void)
{
    int init;

    table_lock();
    init = g_initialised;
    pthread_mutex_unlock(&g_lock);
    return init;
}

/* A reference to our endpoint h, or NULL; *init tells whether the library is initialised.
 * One pass under g_lock: the datagram calls take it once each. A reference is taken only
 * while the table holds one, so refs never rises from 0. */
static vsc_endpoint *endpoint_get(VMCIHandle h, int *init)
{
    vsc_endpoint *ep = NULL;
    int i;

    table_lock();
    *init = g_initialised;
    if (g_initialised && (i = table_find(h)) >= 0) {
        ep = g_table[i];
        __atomic_add_fetch(&ep->refs, 1, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&g_lock);
    return ep;
}

/* Drop a reference without g_lock; the last one frees the endpoint. */
static void endpoint_put(vsc_endpoint *ep)
{
    if (__atomic_sub_fetch(&ep->refs, 1, __ATOMIC_ACQ_REL) == 0)
        vsc_endpoint_free(ep);
}

/* 4.1 Library setup */

/* The policy file, read until it reads well (a malformed one refuses, naming its line, as
 * Python's VMCI_InitApp does); then whether it gives our context to another user. Under g_lock. */
static int load_policy(void)
{
    char err[512];
    uint32_t uid;

    if (!g_policy_read) {
        if (vsc_policy_load(g_transport.rundir, &g_policy, err, sizeof err) != 0) {
            fprintf(stderr, "vsockcompat: %s\n", err);
            return VMCI_ERROR_NO_ACCESS;
        }
        g_policy_read = 1;
        g_transport.policy = &g_policy;
    }
    if (vsc_policy_uid(&g_policy, g_transport.cid, &uid) && uid != (uint32_t)getuid()) {
        fprintf(stderr, "vsockcompat: context %u belongs to user %u by the policy, not to user %u\n",
                (unsigned)g_transport.cid, (unsigned)uid, (unsigned)getuid());
        return VMCI_ERROR_NO_ACCESS;
    }
    return VMCI_SUCCESS;
}

VSC_EXPORT int VMCI_InitApp(const char *devName)
{
    int rc = VMCI_SUCCESS;

    (void)devName; /* accepted for compatibility, never opened */
    table_lock();
    if (!g_settings_read) {
        if (vsc_transport_open(&g_transport) == 0)
            g_settings_read = 1;
        else
            rc = VMCI_ERROR_DEVICE_NOT_FOUND;
    }
    if (rc == VMCI_SUCCESS)
        rc = load_policy();
    if (rc == VMCI_SUCCESS)
        g_initialised = 1;
    pthread_mutex_unlock(&g_lock);
    return rc;
}

VSC_EXPORT void VMCI_CleanupApp(void)
{
    vsc_endpoint **table;
    vsc_region **regions;
    int count, nregions, i;

    table_lock();
    table = g_table;
    count = g_count;
    g_table = NULL;
    g_count = g_cap = 0;
    regions = g_regions;
    nregions = g_nregions;
    g_regions = NULL;
    g_nregions = g_regions_cap = 0;
    g_initialised = 0;
    pthread_mutex_unlock(&g_lock);
    for (i = 0; i < count; i++) {
        vsc_endpoint_close(table[i]);
        endpoint_put(table[i]);
    }
    free(table);
    for (i = 0; i < nregions; i++)
        region_detach(regions[i]);
    free(regions);
}

/* 4.2 Datagrams */

VSC_EXPORT VMCIHandle VMCIDatagram_CreateHnd(uint32 resourceID)
{
    uint32_t resource = resourceID == 0 ? VMCI_INVALID_ID : resourceID;
    vsc_endpoint *ep;
    int ok = 0;

    if (!is_initialised())
        return INVALID_HANDLE;
    if (vsc_endpoint_create(&g_transport, resource, &ep) != VMCI_SUCCESS)
        return INVALID_HANDLE;
    table_lock();
    if (g_initialised && g_count == g_cap) {
        int cap = g_cap ? g_cap * 2 : 16;
        vsc_endpoint **grown = realloc(g_table, (size_t)cap * sizeof *grown);
        if (grown != NULL) {
            g_table = grown;
            g_cap = cap;
        }
    }
    if (g_initialised && g_count < g_cap) {
        g_table[g_count++] = ep;
        ok = 1;
    }
    pthread_mutex_unlock(&g_lock);
    if (!ok) {
        vsc_endpoint_free(ep);
        return INVALID_HANDLE;
    }
    return to_vmci(ep->handle);
}

VSC_EXPORT int VMCIDatagram_DestroyHnd(VMCIHandle handle)
{
    vsc_endpoint *ep = NULL;
    int i, init;

    table_lock();
    init = g_initialised;
    if (init && (i = table_find(handle)) >= 0) {
        ep = g_table[i];
        g_table[i] = g_table[--g_count];
    }
    pthread_mutex_unlock(&g_lock);
    if (ep == NULL)
        return init ? VMCI_ERROR_NOT_FOUND : VMCI_ERROR_UNAVAILABLE;
    vsc_endpoint_close(ep);
    endpoint_put(ep);
    return VMCI_SUCCESS;
}

VSC_EXPORT int VMCIDatagram_SendTo(VMCIHandle dst, VMCIHandle src, uint32 len, const void *buf)
{
    vsc_endpoint *ep;
    int init, rc;

    ep = endpoint_get(src, &init);
    if (!init)
        return VMCI_ERROR_UNAVAILABLE;
    if ((buf == NULL && len > 0) || len > VMCI_MAX_DG_PAYLOAD_SIZE || ep == NULL) {
        if (ep != NULL)
            endpoint_put(ep);
        return VMCI_ERROR_INVALID_ARGS;
    }
    rc = vsc_endpoint_send(ep, to_vsc(dst), buf, len);
    endpoint_put(ep);
    return rc;
}

VSC_EXPORT int VMCIDatagram_RecvFrom(VMCIHandle handle, VMCIHandle *srcOut, void *buf, uint32 len)
{
    vsc_endpoint *ep;
    vsc_handle src;
    int init, rc;

    if (srcOut != NULL)
        *srcOut = INVALID_HANDLE;
    ep = endpoint_get(handle, &init);
    if (ep == NULL)
        return init ? VMCI_ERROR_INVALID_ARGS : VMCI_ERROR_UNAVAILABLE;
    if (buf == NULL && len > 0) {
        endpoint_put(ep);
        return VMCI_ERROR_INVALID_ARGS;
    }
    rc = vsc_endpoint_recv(ep, buf, len, &src, -1);
    endpoint_put(ep);
    if (rc >= 0 && srcOut != NULL)
        *srcOut = to_vmci(src);
    return rc;
}

/* 4.3 Shared memory (src/vsc_shm.c; README "Where the SDK is silent" for the codes)
 *
 * Where regions are mirrored (VSOCKCOMPAT_SHM_MODE=mirrored, or auto on vsock and hybrid) the
 * calls go to src/vsc_mirror.c, which speaks vsockcompat/mirror.py's protocol over the
 * transport's streams (on hybrid through the VMM sockets, src/vsc_hybrid.h). Over vsock or hybrid
 * with VSOCKCOMPAT_SHM_MODE=shared there is no memory shared between kernels: the calls give the
 * codes of Python's vsock and hybrid transports without shared memory: Create VMCI_INVALID_HANDLE, Query and Attach
 * VMCI_ERROR_UNAVAILABLE (Attach after the policy's check), Detach VMCI_ERROR_NOT_FOUND
 * (nothing is ever mapped). */

static int shm_on_vsock(void)
{
    return vsc_links_streamed(&g_transport) && !vsc_mirror_enabled(&g_transport); /* vsock, hybrid */
}

static int region_detach(vsc_region *r)
{
    return r->mirror != NULL ? vsc_mirror_detach(r) : vsc_shm_detach(&g_transport, r);
}

static int region_find(vsc_handle h)
{
    int i;

    for (i = 0; i < g_nregions; i++)
        if (g_regions[i]->handle.context == h.context && g_regions[i]->handle.resource == h.resource)
            return i;
    return -1;
}

/* Enter r into the table: VMCI_SUCCESS; else the caller still owns r (VMCI_ERROR_UNAVAILABLE after
 * CleanupApp, VMCI_ERROR_ALREADY_EXISTS if another thread mapped the same region meanwhile). */
static int region_add(vsc_region *r)
{
    int rc = VMCI_SUCCESS;

    table_lock();
    if (!g_initialised) {
        rc = VMCI_ERROR_UNAVAILABLE;
    } else if (region_find(r->handle) >= 0) {
        rc = VMCI_ERROR_ALREADY_EXISTS;
    } else {
        if (g_nregions == g_regions_cap) {
            int cap = g_regions_cap ? g_regions_cap * 2 : 8;
            vsc_region **grown = realloc(g_regions, (size_t)cap * sizeof *grown);
            if (grown != NULL) {
                g_regions = grown;
                g_regions_cap = cap;
            }
        }
        if (g_nregions < g_regions_cap)
            g_regions[g_nregions++] = r;
        else
            rc = VMCI_ERROR_NO_MEM;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

VSC_EXPORT VMCIHandle VMCISharedMem_Create(uint32 size, void **addrOut)
{
    vsc_region *r;

    if (addrOut != NULL)
        *addrOut = NULL;
    if (!is_initialised() || addrOut == NULL || shm_on_vsock())
        return INVALID_HANDLE;
    if ((vsc_mirror_enabled(&g_transport) ? vsc_mirror_create(&g_transport, size, &r)
                                          : vsc_shm_create(&g_transport, size, &r)) != VMCI_SUCCESS)
        return INVALID_HANDLE;
    if (region_add(r) != VMCI_SUCCESS) {
        region_detach(r);
        return INVALID_HANDLE;
    }
    *addrOut = r->addr;
    return to_vmci(r->handle);
}

VSC_EXPORT int VMCISharedMem_Query(VMCIHandle handle, uint32 *sizeOut)
{
    if (!is_initialised())
        return VMCI_ERROR_UNAVAILABLE;
    if (sizeOut == NULL)
        return VMCI_ERROR_INVALID_ARGS;
    if (shm_on_vsock())
        return VMCI_ERROR_UNAVAILABLE;
    if (vsc_mirror_enabled(&g_transport))
        return vsc_mirror_query(&g_transport, to_vsc(handle), sizeOut);
    return vsc_shm_query(&g_transport, to_vsc(handle), sizeOut);
}

VSC_EXPORT int VMCISharedMem_Attach(VMCIHandle handle, void **addrOut, uint32 *sizeInOut)
{
    vsc_region *r;
    int rc, init, mapped;

    if (addrOut != NULL)
        *addrOut = NULL;
    table_lock();
    init = g_initialised;
    mapped = init && region_find(to_vsc(handle)) >= 0;
    pthread_mutex_unlock(&g_lock);
    if (!init)
        return VMCI_ERROR_UNAVAILABLE;
    if (addrOut == NULL || sizeInOut == NULL)
        return VMCI_ERROR_INVALID_ARGS;
    if (mapped)
        return VMCI_ERROR_ALREADY_EXISTS;
    if (!vsc_acl_may_attach(&g_transport, g_transport.cid, to_vsc(handle)))
        return VMCI_ERROR_NO_ACCESS;
    if (shm_on_vsock())
        return VMCI_ERROR_UNAVAILABLE;
    rc = vsc_mirror_enabled(&g_transport) ? vsc_mirror_attach(&g_transport, to_vsc(handle), *sizeInOut, &r)
                                          : vsc_shm_attach(&g_transport, to_vsc(handle), *sizeInOut, &r);
    if (rc != VMCI_SUCCESS)
        return rc;
    if ((rc = region_add(r)) != VMCI_SUCCESS) {
        region_detach(r);
        return rc;
    }
    *addrOut = r->addr;
    *sizeInOut = r->size;
    return VMCI_SUCCESS;
}

VSC_EXPORT int VMCISharedMem_Detach(VMCIHandle handle)
{
    vsc_region *r = NULL;
    int i, init;

    table_lock();
    init = g_initialised;
    if (init && (i = region_find(to_vsc(handle))) >= 0) {
        r = g_regions[i];
        g_regions[i] = g_regions[--g_nregions];
    }
    pthread_mutex_unlock(&g_lock);
    if (r == NULL)
        return init ? VMCI_ERROR_NOT_FOUND : VMCI_ERROR_UNAVAILABLE;
    return region_detach(r);
}

/* 4.4 Access control (src/vsc_acl.h) */

VSC_EXPORT int VMCIResource_AddClientPrivileges(VMCIHandle resourceHandle, VMCIHandle clientHandle,
                                                int numAllowPrivs, VMCIResourcePrivilegeType *allowPrivs,
                                                int numDenyPrivs, VMCIResourcePrivilegeType *denyPrivs)
{
    vsc_endpoint *ep;
    int rc, init;

    if (!is_initialised())
        return VMCI_ERROR_UNAVAILABLE;
    if (VMCI_HANDLE_INVALID(resourceHandle) || VMCI_HANDLE_INVALID(clientHandle))
        return VMCI_ERROR_INVALID_ARGS;
    rc = vsc_acl_add(&g_transport, to_vsc(resourceHandle), to_vsc(clientHandle), numAllowPrivs, allowPrivs,
                     numDenyPrivs, denyPrivs);
    /* Over vsock senders learn it from our verdicts (on local they read the privileges). */
    if (rc == VMCI_SUCCESS && vsc_links_streamed(&g_transport)
        && (ep = endpoint_get(resourceHandle, &init)) != NULL) {
        vsc_endpoint_privileges_changed(ep);
        endpoint_put(ep);
    }
    return rc;
}

/* 4.5 Discovery service */

VSC_EXPORT int VMCIDs_Lookup(const char *name, VMCIHandle *out)
{
    vsc_handle found;
    int rc;

    if (out != NULL)
        *out = INVALID_HANDLE;
    if (!is_initialised())
        return VMCI_ERROR_UNAVAILABLE;
    if (out == NULL)
        return VMCI_ERROR_INVALID_ARGS;
    rc = vsc_ds_call(&g_transport, VMCI_DS_ACTION_LOOKUP, name, to_vsc(INVALID_HANDLE), &found);
    if (rc == VMCI_SUCCESS)
        *out = to_vmci(found);
    return rc;
}

VSC_EXPORT int VMCIDs_Register(const char *name, VMCIHandle handle)
{
    if (!is_initialised())
        return VMCI_ERROR_UNAVAILABLE;
    return vsc_ds_call(&g_transport, VMCI_DS_ACTION_REGISTER, name, to_vsc(handle), NULL);
}

VSC_EXPORT int VMCIDs_Unregister(const char *name)
{
    if (!is_initialised())
        return VMCI_ERROR_UNAVAILABLE;
    return vsc_ds_call(&g_transport, VMCI_DS_ACTION_UNREGISTER, name, to_vsc(INVALID_HANDLE), NULL);
}
