/*
 * vsockcompat C core: datagram endpoints with the SDK's semantics
 * (vsockcompat/datagram.py, in C) over the local transport, the vsock one or the hybrid one
 * (t->transport; src/vsc_vsock.h, src/vsc_hybrid.h), which differ only in how endpoints bind,
 * links open and close, and accepted connections are identified.
 */
#ifndef VSC_ENDPOINT_H
#define VSC_ENDPOINT_H

#include <pthread.h>

#include "vsc_hybrid.h"
#include "vsc_local.h"
#include "vsc_vsock.h"

#define VSC_MAX_LINKS 256

typedef struct {
    vsc_handle dst;
    vsc_conn conn;
    vsc_link link;
    uint64_t acl_epoch;      /* the receiver's ACL epoch when `denied` was decided */
    int denied;              /* DG_SEND is denied to us: sends fail with VMCI_ERROR_NO_ACCESS */
} vsc_ep_link;

typedef struct vsc_endpoint {
    vsc_handle handle;
    const vsc_local *transport;
    vsc_bound bound;         /* in vsock dgram mode, bound.listener is the endpoint's DGRAM socket */
    int dgram;               /* vsock dgram mode: no links, no connections (src/vsc_vsock.h) */
    int wake_r, wake_w;
    int closing;             /* atomic; set once by vsc_endpoint_close */
    int refs;                /* atomic; counted by the caller (its table), not by this module */

    pthread_mutex_t recv_lock; /* held by the one receiving thread, also while it blocks */
    vsc_rx rx;
    uint8_t *spill;          /* VMCI_MAX_DG_PAYLOAD_SIZE + 1 bytes */
    uint8_t *held;           /* a datagram too large for the last buffer; NULL if none */
    uint64_t held_len;
    vsc_handle held_src;
    uint64_t acl_epoch;      /* our ACL epoch when the connections' `denied` flags were decided */
    uint8_t *denied;         /* indexed by fd: 1 if that connection's sender may not reach us */
    int denied_cap, ndenied;
    uint64_t dropped_denied; /* datagrams read and dropped because their sender was denied */
    vsc_vsock_in **ins;      /* vsock, indexed by fd: the state behind an accepted connection */
    int ins_cap;

    pthread_mutex_t link_lock; /* guards links; held across a send (which never blocks) */
    vsc_ep_link *links;      /* oldest first */
    int nlinks, caplinks;
} vsc_endpoint;

/* The one place the C library opens its transport: the settings (vsc_local_open), then
 * vsc_vsock_open or vsc_hybrid_open. 0, or -1 if it cannot run here (for vsock and hybrid, why
 * is on stderr). */
int vsc_transport_open(vsc_local *t);

/* A VMCI code; *out owns the endpoint (refs = 1). resource VMCI_INVALID_ID: auto-assign. */
int vsc_endpoint_create(const vsc_local *t, uint32_t resource, vsc_endpoint **out);
/* Destroy the endpoint for everyone: senders see it gone, receivers return. Idempotent. */
void vsc_endpoint_close(vsc_endpoint *ep);
/* Release the memory and descriptors; no other thread may use ep any more. */
void vsc_endpoint_free(vsc_endpoint *ep);
/* In a forked child: drop the parent's endpoint without touching shared state or its locks. */
void vsc_endpoint_abandon(vsc_endpoint *ep);

/* Our privileges changed (over vsock): decide again for every connection and tell the senders
 * whose verdict changed, at once if no thread is receiving, else from that thread, which is
 * woken for it. */
void vsc_endpoint_privileges_changed(vsc_endpoint *ep);

/* The frame size (header included) or a VMCI code; VMCI_ERROR_NO_ACCESS if the destination
 * denies us DG_SEND (checked when a link opens and again whenever its ACL epoch changes; in
 * vsock dgram mode only as far as this process knows it: a receiver elsewhere drops in silence). */
int vsc_endpoint_send(vsc_endpoint *ep, vsc_handle dst, const void *buf, uint32_t len);
/*
 * The payload length, or VMCI_ERROR_NO_MEM (too small a buffer; the datagram stays
 * queued), VMCI_ERROR_TIMEOUT (timeout_ms >= 0 passed), VMCI_ERROR_NO_MORE_DATAGRAMS
 * (closed meanwhile), another VMCI code. Retries on EINTR. Datagrams of senders that our
 * privileges deny are read and dropped (counted in dropped_denied), never delivered.
 */
int vsc_endpoint_recv(vsc_endpoint *ep, void *buf, uint32_t len, vsc_handle *src, int timeout_ms);

#endif
