/*
 * vsockcompat C core: the vsock transport (vsockcompat/transport/vsock.py and streams.py, in C),
 * byte for byte the Python wire, so C and Python endpoints talk across AF_VSOCK.
 *
 * Mapping: endpoint (cid, rid) = a listening AF_VSOCK socket bound to (VMADDR_CID_ANY, rid);
 * our context is the kernel's CID (IOCTL_VM_SOCKETS_GET_LOCAL_CID), or 1 when VSOCKCOMPAT_CID=1
 * on a host or loopback-only kernel (the discovery daemon's context). Context 1 is reached at
 * CID 2 from a guest (local CID > 2), else at CID 1.
 *
 * The mode (VSOCKCOMPAT_VSOCK_MODE; auto: the first of DGRAM, SEQPACKET, STREAM whose socket can be
 * created, nothing connected) is the socket type. In dgram mode there are no links: an endpoint's
 * socket is a SOCK_DGRAM one and a datagram is one vsock datagram of the payload alone
 * (src/vsc_vsock_dgram.c, at the end of this header). Otherwise:
 *
 * A link = one connection to (dst.context, dst.resource), SOCK_SEQPACKET or SOCK_STREAM. The connector
 * first sends the 8-byte hello (VSC_HELLO_MAGIC or VSC_HELLO_WELL_KNOWN_MAGIC, then its rid,
 * u32 little-endian each), then datagram frames (the SDK header + payload), one per message or,
 * in stream mode, back to back (cut into send() calls of at most VSC_SIBLING_PIECE bytes between
 * two sibling guests: vsc_vsock_piece_between). The receiver takes the sender's context from getpeername (the
 * kernel's word, never the frame's) and its rid from the hello; it may write 8-byte verdicts
 * back (VSC_VERDICT_MAGIC, then VSC_VERDICT_MAY_SEND or VSC_VERDICT_DENIED).
 *
 * As in Python, the endpoint never sends on the vsock socket itself (a non-blocking SEQPACKET
 * send may leave half a message): it sends, all or nothing, on one end of an AF_UNIX SEQPACKET
 * pair whose other end a pump thread forwards with blocking sends, reading verdicts meanwhile.
 * In stream mode each accepted connection gets a reader thread that splits the stream into
 * frames and hands each one to the receiver as a message on an AF_UNIX SEQPACKET pair.
 *
 * Accounts: links and endpoints get private pages with the limit VSC_UNBOUNDED_ACCOUNT_LIMIT;
 * the kernel's buffers bound the queue and a full one gives VMCI_ERROR_NO_RESOURCES at once.
 *
 * The socket-agnostic half (hellos, verdicts, pumps, stream readers) is src/vsc_link.h.
 */
#ifndef VSC_VSOCK_H
#define VSC_VSOCK_H

#include <stddef.h>
#include <stdint.h>

#include "vsc_link.h"
#include "vsc_local.h"

#define VSC_VSOCK_DEVICE "/dev/vsock"
/* Ports tried, upwards from the last one, for one auto-assigned resource id. */
#define VSC_VSOCK_AUTO_RID_TRIES 65536

/*
 * Open the vsock transport of t (settings read, t->cid as VSOCKCOMPAT_CID): the kernel's CID
 * first (an ioctl on /dev/vsock; no socket is made when it is unknown), then the socket type,
 * by creating (never connecting) AF_VSOCK sockets. 0, or -1 with the reason on stderr.
 */
int vsc_vsock_open(vsc_local *t);
/* The vsock CID of context `context` as seen from a kernel of CID kcid. */
uint32_t vsc_vsock_cid_of(uint32_t kcid, uint32_t context);
/* Bytes per send() on a stream from a kernel of CID kcid to peer_cid: VSC_SIBLING_PIECE when both
 * are distinct guests (CIDs above VMADDR_CID_HOST), whose packets vhost-device-vsock drops when
 * bigger than one receive buffer of the other guest (vsockcompat/transport/pieces.py); else 0. */
size_t vsc_vsock_piece_between(uint32_t kcid, uint32_t peer_cid);

/* Endpoints: a VMCI code (DUPLICATE_ENTRY for a port in use, NO_ACCESS for a privileged one, and
 * in dgram mode for VMCI_DS_RESOURCE_ID unless we speak for context 1). The endpoint's socket is
 * out->listener: listening, or in dgram mode the bound SOCK_DGRAM socket itself. */
int vsc_vsock_bind(const vsc_local *t, uint32_t resource, vsc_bound *out);
/* Bind the AF_VSOCK socket fd to port resource, or (VMCI_INVALID_ID) to the next free port from
 * the last one given, into *rid; a VMCI code (DUPLICATE_ENTRY, NO_ACCESS for a privileged port,
 * NO_RESOURCES when none is free). */
int vsc_vsock_bind_rid(int fd, uint32_t resource, uint32_t *rid);
/* Senders see the endpoint gone; the caller still closes listener and unmaps acct. */
void vsc_vsock_unbind(const vsc_bound *b);

/* Links: a VMCI code (vsockcompat/transport/vsock.py _link_error). */
int vsc_vsock_connect(const vsc_local *t, vsc_handle src, vsc_handle dst, vsc_conn *out);

/*
 * Identify the accepted vsock connection fd to endpoint self (peer CID, then the hello, waited
 * for at most VSC_HELLO_TIMEOUT_MS). 0 with *src, *rx_fd (what the receiver reads: fd itself,
 * or in stream mode the core end of its reader's pair) and *in (NULL for SEQPACKET); -1 if
 * refused (fd is closed).
 */
int vsc_vsock_accept(const vsc_local *t, int fd, vsc_handle self, vsc_handle *src, int *rx_fd,
                     vsc_vsock_in **in);

/* The VMCI code for a failed connect, hello or datagram send (vsockcompat/transport/vsock.py
 * _link_error; EAGAIN, ENOBUFS and ENOMEM: VMCI_ERROR_NO_RESOURCES). */
int vsc_vsock_error(int e);

/*
 * Dgram mode (src/vsc_vsock_dgram.c). A datagram is one vsock datagram whose bytes are the SDK
 * payload alone, sent with sendto from the sending endpoint's own bound socket, so the kernel
 * stamps its source (cid, port); the receiver takes the source handle from that address only
 * (vsc_vsock_dgram_source). No hello, no verdicts: a receiver that denies a sender drops its
 * datagrams (the endpoint counts them) and the sender is not told. The queue bound is the
 * receiving kernel's socket buffer; datagrams can be lost, as with VMware's own AF_VSOCK
 * datagrams.
 */
/* The handle of a datagram the kernel says came from (cid, port): from the well-known CID's (or
 * our own kernel's) port VMCI_DS_RESOURCE_ID, (1, 1); from CID 1 or our own CID, (kcid, port);
 * else (cid, port). */
vsc_handle vsc_vsock_dgram_source(const vsc_local *t, uint32_t cid, uint32_t port);
/* Send len payload bytes from the endpoint socket fd to dst, without blocking: len plus the SDK
 * header size (what the other modes return), or a VMCI code (vsc_vsock_error). */
int vsc_vsock_dgram_send(const vsc_local *t, int fd, vsc_handle dst, const void *buf, uint32_t len);
/* Receive one datagram from the endpoint socket fd without blocking, its payload scattered into
 * buf then spill: the payload length with *src, VSC_AGAIN (none queued), VSC_BAD_FRAME (one that
 * is not a vsock datagram we can hold: read and dropped), or a VMCI code. */
ssize_t vsc_vsock_dgram_recv(const vsc_local *t, int fd, void *buf, size_t len, void *spill, size_t spill_len,
                             vsc_handle *src);

#endif
