/*
 * vsockcompat C core: shared memory regions (vmci-sdk.md 4.3), the on-disk protocol of
 * vsockcompat/sharedmem.py, so that C and Python processes share regions both ways.
 *
 *   /dev/shm/vsc.<uid>.<8 hex of sha1(rundir)>.<cid>.<rid>   the region's pages (0600, whole pages)
 *   <rundir>/c<cid>/<rid>.shm                                 marker: "<size> <shm name>\n" (0600)
 *
 * Every user holds flock(LOCK_SH) on its own open file of the shm object, so a region is
 * alive exactly while flock(LOCK_EX | LOCK_NB) on a fresh open file fails. Every such probe,
 * every attach and every removal happens under the context's allocation lock (c<cid>/.lock).
 * Handles come from the context's id space (vsc_local_allocate); the kind ".shm" is
 * registered with vsc_local_add_kind when the library loads.
 *
 * These calls keep no state: the caller owns each vsc_region and keeps its own table.
 * Every result is a VMCI code.
 */
#ifndef VSC_SHM_H
#define VSC_SHM_H

#include <stddef.h>
#include <stdint.h>

#include "vsc_local.h"

#define VSC_SHM_DIR "/dev/shm"

typedef struct {
    vsc_handle handle;
    uint32_t size;      /* the requested size: Query's, and the length the caller may use */
    size_t backing;     /* size rounded up to whole pages: the mapping's length */
    int lock_fd;        /* our open file of the shm object, holding LOCK_SH; close-on-exec */
    void *addr;         /* MAP_SHARED, read/write, backing bytes (mirrored: the private copy) */
    void *mirror;       /* NULL here; a mirrored region's side (src/vsc_mirror.h), which owns it */
    int created;        /* mirrored: whether this process created it */
} vsc_region;

/* Create a region of size bytes (> 0, else VMCI_ERROR_INVALID_SIZE) in t's context and attach
 * to it. VMCI_ERROR_NO_MEM, before anything is allocated, if the page-rounded size exceeds the
 * free space of /dev/shm or the available RAM; the backing is reserved at once. Starts zeroed. */
int vsc_shm_create(const vsc_local *t, uint32_t size, vsc_region **out);
/* The requested size of the live region h; VMCI_ERROR_NOT_FOUND if none lives there. */
int vsc_shm_query(const vsc_local *t, vsc_handle h, uint32_t *size);
/* Map the live region h. size must be its size (VMCI_ERROR_INVALID_SIZE), 0 takes any. */
int vsc_shm_attach(const vsc_local *t, vsc_handle h, uint32_t size, vsc_region **out);
/* Unmap and free r; the last user's detach removes the shm object and the marker. */
int vsc_shm_detach(const vsc_local *t, vsc_region *r);
/* In a forked child: forget r (close our copy of the lock file, free r) without touching the
 * shared state; the mapping stays, as the parent's pointers into it may still be in use. */
void vsc_shm_abandon(vsc_region *r);

/* MemAvailable of /proc/meminfo in bytes; UINT64_MAX when it cannot be read. */
uint64_t vsc_mem_available(void);

/* "/dev/shm/vsc.<uid>.<8 hex>.<cid>.<rid>" into out (at least VSC_SHM_PATH_MAX bytes). */
#define VSC_SHM_PATH_MAX 96
void vsc_shm_path(const vsc_local *t, vsc_handle h, char *out, size_t size);

#endif
