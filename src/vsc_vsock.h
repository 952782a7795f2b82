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

/* Endpoints: a VMCI code (DUPLICATE_ENTRY for a port in use, NO_ACCESS for a privileged one). */
int vsc_vsock_bind(const vsc_local *t, uint32_t resource, vsc_bound *out);
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

#endif
