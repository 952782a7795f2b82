/*
 * vsockcompat C core: the vsock transport (vsockcompat/transport/vsock.py and streams.py, in C),
 * byte for byte the Python wire, so C and Python endpoints talk across AF_VSOCK.
 *
 * Mapping: endpoint (cid, rid) = a listening AF_VSOCK socket bound to (VMADDR_CID_ANY, rid);
 * our context is the kernel's CID (IOCTL_VM_SOCKETS_GET_LOCAL_CID), or 1 when VSOCKCOMPAT_CID=1
 * on a host or loopback-only kernel (the discovery daemon's context). Context 1 is reached at
 * CID 2 from a guest (local CID > 2), else at CID 1.
 *
 * A link = one connection to (dst.context, dst.resource), SOCK_SEQPACKET or SOCK_STREAM (the
 * mode, VSOCKCOMPAT_VSOCK_MODE; auto: SEQPACKET when such a socket can be created). The connector
 * first sends the 8-byte hello (VSC_HELLO_MAGIC or VSC_HELLO_WELL_KNOWN_MAGIC, then its rid,
 * u32 little-endian each), then datagram frames (the SDK header + payload), one per message or,
 * in stream mode, back to back. The receiver takes the sender's context from getpeername (the
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
 * The functions below the "socket-agnostic" line take connected sockets of any family, so the
 * host's tests (which never create AF_VSOCK sockets) run them over AF_UNIX pairs.
 */
#ifndef VSC_VSOCK_H
#define VSC_VSOCK_H

#include <stddef.h>
#include <stdint.h>

#include "vsc_local.h"

#define VSC_VSOCK_DEVICE "/dev/vsock"
/* Ports tried, upwards from the last one, for one auto-assigned resource id. */
#define VSC_VSOCK_AUTO_RID_TRIES 65536
/* Milliseconds a closing link lets its pump forward what was sent; then its join bound. */
#define VSC_VSOCK_LINGER_MS 2000
#define VSC_VSOCK_JOIN_MS 5000

/*
 * Open the vsock transport of t (settings read, t->cid as VSOCKCOMPAT_CID): the kernel's CID
 * first (an ioctl on /dev/vsock; no socket is made when it is unknown), then the socket type,
 * by creating (never connecting) AF_VSOCK sockets. 0, or -1 with the reason on stderr.
 */
int vsc_vsock_open(vsc_local *t);
/* The vsock CID of context `context` as seen from a kernel of CID kcid. */
uint32_t vsc_vsock_cid_of(uint32_t kcid, uint32_t context);

/* Endpoints: a VMCI code (DUPLICATE_ENTRY for a port in use, NO_ACCESS for a privileged one). */
int vsc_vsock_bind(const vsc_local *t, uint32_t resource, vsc_bound *out);
/* Senders see the endpoint gone; the caller still closes listener and unmaps acct. */
void vsc_vsock_unbind(const vsc_bound *b);

/* Links: a VMCI code (vsockcompat/transport/vsock.py _link_error). */
int vsc_vsock_connect(const vsc_local *t, vsc_handle src, vsc_handle dst, vsc_conn *out);

/* Connections accepted on an endpoint's listener: state behind the descriptor the receiver reads. */
typedef struct vsc_vsock_in vsc_vsock_in;
/*
 * Identify the accepted vsock connection fd to endpoint self (peer CID, then the hello, waited
 * for at most VSC_HELLO_TIMEOUT_MS). 0 with *src, *rx_fd (what the receiver reads: fd itself,
 * or in stream mode the core end of its reader's pair) and *in (NULL for SEQPACKET); -1 if
 * refused (fd is closed).
 */
int vsc_vsock_accept(const vsc_local *t, int fd, vsc_handle self, vsc_handle *src, int *rx_fd,
                     vsc_vsock_in **in);

/* --- socket-agnostic: hellos, verdicts, pumps and stream readers --- */

void vsc_hello_encode(uint8_t out[VSC_HELLO_SIZE], uint32_t rid, int well_known);
/* 0 with *well_known and *rid from exactly one hello, or -1 (size, magic or rid VMADDR_PORT_ANY). */
int vsc_hello_decode(const uint8_t *buf, size_t n, int *well_known, uint32_t *rid);
void vsc_verdict_encode(uint8_t out[VSC_VERDICT_SIZE], int denied);
/* 1 (denied) or 0 (may send) from exactly one verdict, or -1 if buf is not one. */
int vsc_verdict_decode(const uint8_t *buf, size_t n);
/* The hello at the start of connection fd (stream: 8 bytes; else one message), within timeout_ms. */
int vsc_hello_read(int fd, int stream, int timeout_ms, int *well_known, uint32_t *rid);

/* Wrap the connected socket vs (hello sent) in a link: out->fd is the core's end of the pump's
 * pair, out->acct its private account, out->pump the thread. Owns vs from the call on. A VMCI code. */
int vsc_link_pump_start(int vs, int stream, vsc_conn *out);
/* Let the pump forward what was sent (VSC_VSOCK_LINGER_MS at most), end it, release everything. */
void vsc_link_pump_stop(vsc_conn *c);
/* In a forked child: drop the copies of the parent's link without touching its thread. */
void vsc_link_pump_abandon(vsc_conn *c);
/* What the receiver last said (1: DG_SEND denied), and whether the pump ended (peer gone,
 * a hang-up, or bytes that are not verdicts: counted in *garbled if not NULL). */
int vsc_link_pump_denied(const vsc_conn *c);
int vsc_link_pump_ended(const vsc_conn *c, int *garbled);

/* Read frames from the connected stream conn on a thread, each one forwarded as a message on a
 * new AF_UNIX SEQPACKET pair whose core end is *rx_fd. Owns conn. 0, or -1 (conn closed). A frame
 * announcing more than the maximum payload, or cut by the end of the stream, is forwarded as what
 * was read (the receiver drops it as a bad frame) and ends the stream. */
int vsc_stream_in_start(int conn, int *rx_fd, vsc_vsock_in **in);
/* Write a verdict to the sender behind an accepted connection (never blocks; a sender that
 * leaves its buffer full misses it): on in's stream, or on fd itself when in is NULL. */
void vsc_vsock_tell(int fd, const vsc_vsock_in *in, int denied);
/* The receiver closed *rx_fd: end the reader and release in. NULL: nothing to do. */
void vsc_vsock_in_release(vsc_vsock_in *in);
/* In a forked child: drop the copies without touching the parent's thread. */
void vsc_vsock_in_abandon(vsc_vsock_in *in);

#endif
