/*
 * vsockcompat C core: the hybrid transport (vsockcompat/transport/hybrid.py, in C): the host side
 * of Firecracker, Cloud Hypervisor and vhost-user-vsock, whose guests' vsock devices end in the
 * VMM's Unix sockets. AF_UNIX only: no AF_VSOCK socket is ever created here.
 *
 * Settings: VSOCKCOMPAT_HYBRID_UDS (the VMM sockets, ':'-separated, made absolute; 32 at most) and
 * VSOCKCOMPAT_HYBRID_CID (the guest CID behind each, ':'-separated; unset with one socket: 3).
 * Our context is 2 (the host) or, with VSOCKCOMPAT_CID=1, 1 (the discovery daemon's).
 *
 *   <uds>_<port>        where the VMM of <uds> delivers its guest's connections to host port <port>
 *   <uds>_<port>.host   where the host's processes connect to the endpoint on port <port>
 *
 * An endpoint (cid, rid) listens at <uds>_<rid> and <uds>_<rid>.host of every socket (the
 * listener is an epoll set of those sockets). The path a connection arrived on (getsockname, the
 * kernel's word) decides the peer's context: at <uds>_<rid> the guest behind <uds> (a hello
 * claiming context 1 is refused); at .host a process of this user (SO_PEERCRED), in context 1 if
 * its hello says so, else 2.
 *
 * A link to context 1 or 2 connects to the destination's .host path on the first socket where one
 * listens (none: VMCI_ERROR_INVALID_RESOURCE); a link to a guest connects to its VMM's socket,
 * sends "CONNECT <port>\n" and reads "OK <hostport>\n" within VSC_HYBRID_HANDSHAKE_TIMEOUT_MS: no
 * VMM there is VMCI_ERROR_DST_UNREACHABLE, a VMM that closes VMCI_ERROR_INVALID_RESOURCE, another
 * answer VMCI_ERROR_DST_UNREACHABLE, no answer in time VMCI_ERROR_TIMEOUT; a CID behind none of the
 * sockets is VMCI_ERROR_DST_UNREACHABLE at once. Then, as on vsock in stream mode, the hello and
 * frames back to back, verdicts back (src/vsc_link.h).
 */
#ifndef VSC_HYBRID_H
#define VSC_HYBRID_H

#include <stdint.h>

#include "vsc_link.h"
#include "vsc_local.h"

/* What the .host paths append to a port's path: never a path the VMM connects to. */
#define VSC_HYBRID_HOST_SUFFIX ".host"

/*
 * Open the hybrid transport of t (settings read): parse the VMM sockets and check them as
 * vsockcompat/transport/hybrid.py does (a path too long for its port suffixes, a directory that
 * does not exist, a CID or a path twice); t->cid becomes 2, or 1 when VSOCKCOMPAT_CID=1. Nothing
 * is opened. 0, or -1 with the reason on stderr.
 */
int vsc_hybrid_open(vsc_local *t);

/* A listener at every path of resource (VMCI_INVALID_ID: the next free id), in the id space of
 * the endpoints, without an account (out->acct NULL): a stream endpoint of a mirrored region
 * (mirror_link.listen on hybrid). A VMCI code as vsc_hybrid_bind's. */
int vsc_hybrid_listen(const vsc_local *t, uint32_t resource, vsc_bound *out);
/* Remove b's paths: nobody reaches it any more (the caller still closes the listener). */
void vsc_hybrid_unlisten(const vsc_local *t, const vsc_bound *b);

/* Endpoints: a VMCI code (DUPLICATE_ENTRY when a live listener holds one of the paths; the
 * files of dead ones are reclaimed). out->listener is an epoll fd over out->set's sockets. */
int vsc_hybrid_bind(const vsc_local *t, uint32_t resource, vsc_bound *out);
/* Senders see the endpoint gone (its paths are removed); the caller still closes the listener
 * (vsc_hybrid_close_listener) and unmaps acct. */
void vsc_hybrid_unbind(const vsc_local *t, const vsc_bound *b);
/* Close the listener and its sockets (in a forked child too: nothing shared is touched). */
void vsc_hybrid_close_listener(vsc_bound *b);
/* Accept one waiting connection on any of b's sockets, without blocking: its fd (close-on-exec,
 * blocking), or -1 (errno EAGAIN when none waits). */
int vsc_hybrid_accept(const vsc_bound *b);

/* A blocking AF_UNIX stream to the listener dst (mirror_link.connect on hybrid): a guest's through
 * its VMM, a host one (context 1 or 2) at its .host path, by deadline (vsc_now_ms); in *out,
 * with SO_SNDTIMEO set by the connect. The codes of a link's connect (see above). */
int vsc_hybrid_connect_stream(const vsc_local *t, vsc_handle dst, int64_t deadline, int *out);

/* Links: a VMCI code (see above). */
int vsc_hybrid_connect(const vsc_local *t, vsc_handle src, vsc_handle dst, vsc_conn *out);

/* Identify the accepted connection fd (see above; the hello waited for at most
 * VSC_HELLO_TIMEOUT_MS): 0 with *src, *rx_fd and *in (src/vsc_link.h vsc_stream_in_start), or
 * -1 if refused (fd is closed). */
int vsc_hybrid_identify(const vsc_local *t, int fd, vsc_handle *src, int *rx_fd, vsc_vsock_in **in);

/* The context of the peer of a stream fd accepted from a vsc_hybrid_listen listener, whose hello
 * claims claimed (mirror_link.peer_context): the guest of the VMM it came through; at a .host path
 * claimed if it is a host context and the peer runs as this user; else VMCI_INVALID_ID. */
uint32_t vsc_hybrid_stream_peer(const vsc_local *t, int fd, uint32_t claimed);

/* Whether a host endpoint (context 1 or 2) listens at h: a listening Unix socket at one of its
 * .host paths (/proc/net/unix; nothing is connected). Guests' endpoints: 0. */
int vsc_hybrid_host_alive(const vsc_local *t, vsc_handle h);

/* The VMM sockets and their CIDs as VSOCKCOMPAT_HYBRID_UDS=... and VSOCKCOMPAT_HYBRID_CID=...
 * environment entries (absolute paths), for a daemon started for us; NULL out of memory. */
char *vsc_hybrid_env_uds(const vsc_local *t);
char *vsc_hybrid_env_cids(const vsc_local *t);

#endif
