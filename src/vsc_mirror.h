/*
 * vsockcompat C core: mirrored shared memory (vsockcompat/mirror.py in C, VSOCKCOMPAT_SHM_MODE),
 * byte for byte the Python protocol, so C and Python users share one mirrored region both ways.
 *
 * Every user holds a private copy of the region (an anonymous mapping, the address the SDK call
 * returns). The coherence contract is mirror.py's (README "Across kernels"): each side diffs its
 * copy against the copy it last mirrored (VSC_MIRROR_BLOCK blocks, then VSC_MIRROR_LINE lines)
 * every VSC_MIRROR_INTERVAL_MS ms (stretched to ten times a scan's duration for huge regions) on
 * a background thread and sends the changed lines as UPDATE frames; the creator applies an
 * attacher's updates, acknowledges them (ACK n) and relays them to the other attachers; an
 * attacher never applies received bytes over bytes it sent that the creator had not applied yet.
 * An attacher's Detach flushes its writes, then says BYE. A creator's Detach leaves its process
 * serving the remaining attachers (on the thread) until the last one leaves.
 *
 * Streams and frames (vsockcompat/mirror_link.py, mirror_wire.py; layout in vsc_constants.h):
 *   local: the creator holds <rundir>/c<cid>/<rid>.mir flock'ed (LOCK_SH) for its life and listens
 *          on AF_UNIX SOCK_STREAM at <rundir>/c<cid>/<rid>.mir.sock; an attacher connects from a
 *          name bound in its own context directory (.stream-<pid>-<n>, unlinked once connected),
 *          which is how the creator learns its context (path and SO_PEERCRED);
 *   vsock: the creator listens on AF_VSOCK SOCK_STREAM at (VMADDR_CID_ANY, rid); an attacher
 *          connects to (cid, rid); the kernel gives the peer's CID;
 *   hybrid: the creator listens at <uds>_<rid> and <uds>_<rid>.host of every VMM socket
 *          (vsc_hybrid_listen); an attacher reaches a guest's region through its VMM (CONNECT),
 *          a host one at .host; the path it came through names the peer (vsc_hybrid_stream_peer).
 * The attacher sends HELLO (arg: the size it asks for, 0 for any; payload: u32 its context), the
 * creator REFUSE (arg: a VMCI code) or SIZE, the region as UPDATE frames and FLUSHED 0. QUERY is
 * answered by SIZE and a close.
 *
 * Every result is a VMCI code. The vsc_region (vsc_shm.h) of a mirrored region has mirror set;
 * its lock_fd is -1.
 */
#ifndef VSC_MIRROR_H
#define VSC_MIRROR_H

#include <stdint.h>

#include "vsc_local.h"
#include "vsc_shm.h"

/* Milliseconds a connect or the creator's answer to HELLO / QUERY may take (mirror_link.CONNECT_TIMEOUT). */
#define VSC_MIRROR_CONNECT_MS 10000
/* Milliseconds a blocking send may take before the peer is given up (mirror.SEND_TIMEOUT). */
#define VSC_MIRROR_SEND_MS 10000
/* Milliseconds a new connection has to say HELLO or QUERY (mirror.HELLO_TIMEOUT). */
#define VSC_MIRROR_HELLO_MS 5000

/* Whether t mirrors regions (VSOCKCOMPAT_SHM_MODE=mirrored, or auto on the vsock and hybrid
 * transports, as mirror_link.mirrored). */
int vsc_mirror_enabled(const vsc_local *t);

/* Create a zeroed region of size bytes (> 0, else VMCI_ERROR_INVALID_SIZE) in t's context and serve
 * it on a thread; VMCI_ERROR_NO_MEM if a copy of it does not fit in the available memory. */
int vsc_mirror_create(const vsc_local *t, uint32_t size, vsc_region **out);
/* The size of the region h, asked of its creator: VMCI_ERROR_NOT_FOUND if nobody serves it,
 * VMCI_ERROR_INVALID_SIZE for a (Python) region too large for a uint32. */
int vsc_mirror_query(const vsc_local *t, vsc_handle h, uint32_t *size);
/* Attach to the region h: size must be its size (VMCI_ERROR_INVALID_SIZE), 0 takes any; the
 * creator's refusal code (VMCI_ERROR_NO_ACCESS, ...); VMCI_ERROR_NOT_FOUND if nobody serves it. */
int vsc_mirror_attach(const vsc_local *t, vsc_handle h, uint32_t size, vsc_region **out);
/* Stop using r (flushing an attacher's writes first) and free it; the mapping goes. Always
 * VMCI_SUCCESS: a creator that died only leaves the attacher its last copy. */
int vsc_mirror_detach(vsc_region *r);
/* In a forked child: forget r (close our copies of its descriptors, free r); the mapping stays. */
void vsc_mirror_abandon(vsc_region *r);

#endif
