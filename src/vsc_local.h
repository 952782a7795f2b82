/*
 * vsockcompat C core: the local transport (vsockcompat/transport/local.py, in C).
 *
 *   <rundir>/c<cid>/                      one directory per context (0755)
 *   <rundir>/c<cid>/<rid>                 listening SOCK_SEQPACKET socket of (cid, rid)
 *   <rundir>/c<cid>/<rid>.acct            its queue account page (vsc_dgram.h)
 *   <rundir>/c<cid>/<rid>-<dcid>.<drid>   bound socket of the link (cid, rid) -> (dcid, drid)
 *   <rundir>/c<cid>/<rid>.shm             marker of the shared memory region (cid, rid) (vsc_shm.h)
 *   <rundir>/c<cid>/<rid>.acl             client privileges of the resource (cid, rid) (vsc_acl.h)
 *   <rundir>/c<cid>/.lock, .next          allocation lock, next auto-assigned resource id
 */
#ifndef VSC_LOCAL_H
#define VSC_LOCAL_H

#include <stdint.h>
#include <sys/types.h>
#include <sys/un.h>

#include "vsc_dgram.h"

#define VSC_SUN_PATH_MAX 107
#define VSC_LONGEST_NAME_LEN 45 /* strlen("/c4294967295/4294967295-4294967295.4294967295") */
#define VSC_RUNDIR_MAX (VSC_SUN_PATH_MAX - VSC_LONGEST_NAME_LEN + 1)

struct vsc_policy;
struct vsc_hybrid;
struct vsc_hybrid_set;

/* The transports of the C library (VSOCKCOMPAT_TRANSPORT). */
#define VSC_TRANSPORT_LOCAL  0 /* "local" and "auto": never opens AF_VSOCK */
#define VSC_TRANSPORT_VSOCK  1 /* "vsock": src/vsc_vsock.h */
#define VSC_TRANSPORT_HYBRID 2 /* "hybrid": src/vsc_hybrid.h (AF_UNIX only) */

/* VSOCKCOMPAT_VSOCK_MODE as asked for; vsc_vsock_open decides "auto". */
#define VSC_VSOCK_AUTO      0
#define VSC_VSOCK_SEQPACKET 1
#define VSC_VSOCK_STREAM    2
#define VSC_VSOCK_DGRAM     3 /* one AF_VSOCK SOCK_DGRAM socket per endpoint: src/vsc_vsock_dgram.c */

/* VSOCKCOMPAT_SHM_MODE (_settings.SHM_MODES): where shared memory regions live. */
#define VSC_SHM_AUTO     0 /* shared on the local transport, mirrored on vsock */
#define VSC_SHM_SHARED   1 /* POSIX shared memory (src/vsc_shm.h) */
#define VSC_SHM_MIRRORED 2 /* mirrored over streams (src/vsc_mirror.h) */

/* The process's transport: its settings, then what opening it found. Fixed once opened. */
typedef struct {
    char rundir[VSC_RUNDIR_MAX]; /* absolute, normalised as os.path.abspath does */
    uint32_t cid;       /* our context: VSOCKCOMPAT_CID on local; on vsock the kernel's CID, or 1; on
                         * hybrid 2, or 1 */
    int transport;      /* VSC_TRANSPORT_* */
    int vsock_mode;     /* VSC_VSOCK_*: asked for, then (once open) DGRAM, SEQPACKET or STREAM */
    int shm_mode;       /* VSC_SHM_* */
    uint32_t kcid;      /* vsock: the kernel's CID (IOCTL_VM_SOCKETS_GET_LOCAL_CID) */
    int well_known;     /* vsock, hybrid: we speak for context 1 (the discovery daemon's context) */
    const struct vsc_hybrid *hybrid; /* hybrid: the VMM sockets (vsc_hybrid_open) */
    int ds_autostart;
    int sndbuf;
    pid_t pid;          /* the process these settings were read in */
    uint64_t start;     /* its start time, /proc/<pid>/stat field 22 */
    const struct vsc_policy *policy; /* context flags and owners (vsc_policy.h); NULL: built-in */
} vsc_local;

typedef struct {
    vsc_handle handle;
    int listener;       /* non-blocking, close-on-exec */
    uint8_t *acct;      /* mapped account page, VSC_ACCT_SIZE bytes */
    struct vsc_hybrid_set *set; /* hybrid: the listening sockets behind listener (an epoll fd) */
} vsc_bound;

struct vsc_vsock_pump;

typedef struct {
    int fd;             /* connected, non-blocking */
    uint8_t *acct;      /* the receiver's account page (vsock: the link's private page) */
    char name[sizeof(((struct sockaddr_un *)0)->sun_path)]; /* the path our end is bound to */
    struct vsc_vsock_pump *pump; /* vsock: the thread forwarding fd's messages; NULL on local */
} vsc_conn;

/* Whether links cross kernels as on vsock (vsock and hybrid): streams with hellos and verdicts
 * (src/vsc_link.h), privileges in the owning process (vsc_acl.h), no shared memory. */
static inline int vsc_links_streamed(const vsc_local *t)
{
    return t->transport != VSC_TRANSPORT_LOCAL;
}

/*
 * Read the VSOCKCOMPAT_* settings (vsockcompat/_settings.py, strictly) and pick the transport
 * VSOCKCOMPAT_TRANSPORT names: "auto" and "local" are the local transport (ready: it never
 * touches AF_VSOCK); "vsock" and "hybrid" are still to be opened (vsc_transport_open,
 * src/vsc_endpoint.h). 0, or -1 if the settings are bad.
 */
int vsc_local_open(vsc_local *t);
/* os.path.abspath of in into out (size bytes); 0, or -1 if it does not fit. */
int vsc_abspath(const char *in, char *out, size_t size);
/* Start time of pid in clock ticks; 0 if there is no such process. */
uint64_t vsc_local_start_ticks(pid_t pid);

/* Create an endpoint at resource (VMCI_INVALID_ID: the next free id >= 1024). A VMCI code on failure. */
int vsc_local_bind(const vsc_local *t, uint32_t resource, vsc_bound *out);
/* The allocation behind vsc_local_bind, for other resource kinds sharing the context's id space:
 * under the context's lock (c<cid>/.lock), pick resource (VMCI_INVALID_ID: the next free id >= 1024;
 * a taken one gives VMCI_ERROR_DUPLICATE_ENTRY) and call create(t, cdir, rid, arg), which returns a
 * VMCI code; .next advances past rid on success. A live endpoint or a live resource of a registered
 * kind (vsc_local_add_kind) holds its id, dead ones are reclaimed; any other file c<cid>/<rid>.<x>
 * counts as taken: only its kind reclaims it. */
/* Another resource kind in the id space (vsockcompat LocalTransport.add_resource_kind): a resource
 * of it at (cid, rid) keeps its state in c<cid>/<rid><suffix>*; alive(t, path) with path that marker
 * tells, without changing anything, whether it lives; a dead one is reclaimed on allocation, under
 * the context lock: reap(t, path) (may be NULL) releases what lives outside the runtime directory,
 * then its files are removed. Register before the first allocation (e.g. from a constructor);
 * 0, or -1 if the table is full. */
typedef int (*vsc_local_alive_fn)(const vsc_local *t, const char *path);
typedef void (*vsc_local_reap_fn)(const vsc_local *t, const char *path);
int vsc_local_add_kind(const char *suffix, vsc_local_alive_fn alive, vsc_local_reap_fn reap);
/* Whether the resource whose marker is path (c<cid>/<rid><suffix>) lives, by its registered kind;
 * 0 for a suffix no kind registered. */
int vsc_local_marker_alive(const vsc_local *t, const char *path);
typedef int (*vsc_local_create_fn)(const vsc_local *t, const char *cdir, uint32_t rid, void *arg);
int vsc_local_allocate(const vsc_local *t, uint32_t resource, vsc_local_create_fn create, void *arg);
/* Senders see the endpoint gone at once; the caller still owns (and closes) listener and acct. */
void vsc_local_unbind(const vsc_local *t, const vsc_bound *b);
void vsc_local_unmap(uint8_t *acct);

int vsc_local_connect(const vsc_local *t, vsc_handle src, vsc_handle dst, vsc_conn *out);
void vsc_local_disconnect(vsc_conn *c);

/* The kernel-verified sender of an accepted connection to self; 0, or -1 to refuse it. */
int vsc_local_identify(const vsc_local *t, int fd, vsc_handle self, vsc_handle *src);
int vsc_local_endpoint_alive(const vsc_local *t, vsc_handle h);
/* mkdir -p with mode 0755. 0 or -1 (errno). */
int vsc_local_makedirs(const char *path);

#endif
