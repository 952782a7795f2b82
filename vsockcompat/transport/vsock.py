"""The ``vsock`` transport: datagram endpoints over real AF_VSOCK (``VSOCKCOMPAT_TRANSPORT=vsock``).

Mapping (DESIGN.md, "Mapping the SDK onto today's kernels"), in the link modes (``seqpacket``,
``stream``; the ``dgram`` mode of VMware's VMCI transport has its own: ``vsock_dgram.py``):

* handle ``(context, resource)`` <-> vsock address ``(cid, port)``; our context is the kernel's
  ``IOCTL_VM_SOCKETS_GET_LOCAL_CID`` on ``/dev/vsock`` (a client's ``getsockname`` does not
  name it). The kernel's own loopback CID 1 (``VMADDR_CID_LOCAL``) names this kernel, so a peer
  seen at CID 1 is reported in our own context.
* endpoint ``(cid, rid)`` = a ``SOCK_SEQPACKET`` listener bound to ``(VMADDR_CID_ANY, rid)``.
  Auto-assigned ids start at 1024 (the VMCI id space) and go upwards past ports in use, rather
  than taking the kernel's ``VMADDR_PORT_ANY`` (a random ephemeral port). Ports <= 1023 need
  ``CAP_NET_BIND_SERVICE`` (``NoAccess`` otherwise); a port in use gives ``DuplicateEntry``.
* link = one ``SOCK_SEQPACKET`` connection to ``(dst.context, dst.resource)``, cached by the
  endpoint (one connect per destination); every datagram is one message: the SDK's 24-byte
  header then the payload, exactly as on the local transport. The core sends each datagram
  on the vsock connection itself, one non-blocking ``sendmsg`` on the caller's thread (a
  *direct* link, ``streams.py``). Linux (6.1) may send *part* of a SEQPACKET message and then
  fail with ``EAGAIN`` when the receiver's buffer is full, leaving the receiver a message
  without its end (never delivered: it lacks its end-of-record mark) which the next message
  would complete into a merged one. So the first ``EAGAIN`` **seals** the link
  (``Link.seal_when_full``): that send and the next ones return ``VMCI_ERROR_NO_RESOURCES``
  and the connection is shut down for writing (``SHUT_WR``). The receiver then reads every
  whole datagram sent before the cut and, after them, the end of the connection: a message
  without its end-of-record mark is never delivered (``virtio_transport_common.c`` counts
  only messages whose last packet carries ``VIRTIO_VSOCK_SEQ_EOM``, and a receive with none
  counted and the peer's sending side shut returns 0), and every receiver (both cores, the C
  library) closes a connection at its end. Only once it has (a hang-up on the sealed
  connection) does the endpoint open a fresh link, so FIFO order per sender holds across the
  seal, with no change on the wire. A receiver that never reads keeps its sender refused (its
  queue is full); one that goes away gives the usual peer-gone path below. A watch thread per
  link reads the verdicts the receiver writes back and sees hang-ups.

Modes (``VSOCKCOMPAT_VSOCK_MODE``, decided by ``choose_mode`` with ``socket()`` only, no traffic):
``dgram`` (VMware's VMCI transport: one ``SOCK_DGRAM`` socket per endpoint, the SDK payload as
the datagram, no hello, no verdicts; ``transport/vsock_dgram.py``), ``seqpacket`` (virtio,
vhost, loopback), or ``stream``: ``SOCK_STREAM`` connections carrying the same hello and frames
back to back (a frame's header says its payload size, so frames need no other framing).
``auto`` takes DGRAM when ``socket(AF_VSOCK, SOCK_DGRAM)`` can be created (only a datagram
transport, VMCI, lets it: see ``vsock_dgram.py``), else SEQPACKET when such a socket can be
created, else STREAM. The two ends of a link must use
the same mode (a vsock port has one socket type); set ``stream`` on both sides for a device
without SEQPACKET (vhost-device-vsock, Firecracker, Cloud Hypervisor: their connects fail with
``ESOCKTNOSUPPORT``). Probing has a limit: since Linux 5.14 a SEQPACKET *socket* can be created
whatever the transport, which says whether it carries SEQPACKET only at ``connect``; there the
connect's ``ESOCKTNOSUPPORT`` becomes ``DstUnreachable`` naming the fix (``stream``); kernels
before 5.14 refuse the socket, and ``auto`` takes STREAM. The rest of this docstring describes
the link modes (``seqpacket``, ``stream``); dgram mode has no links. Between two guests
(vhost-device-vsock's sibling forwarding, stream mode) a link's pump writes in pieces of at
most ``pieces.SIBLING_PIECE`` bytes, decided per link at connect (``transport/pieces.py``:
bigger packets are lost on that path).

In stream mode the core still sees whole messages (``transport/streams.py``, shared with the
``hybrid`` transport): each accepted connection gets a reader thread
that reads the hello, then splits the stream into frames and forwards each one as a message on an
``AF_UNIX`` SEQPACKET pair, whose other end is what the endpoint's listener hands to the core
(``StreamListener``). A frame whose header announces more than ``VMCI_MAX_DG_PAYLOAD_SIZE`` bytes,
or a stream that ends inside a frame, is forwarded as the bytes read so far (the core drops it
as a bad frame and closes the connection); a connection without a valid hello is handed over as
refused (the endpoint counts it).

The well-known context
----------------------

Context 1 (``VMCI_WELL_KNOWN_CONTEXT_ID``) is where the SDK's services live, the discovery
service at ``(1, 1)``. Over vsock it is served by the host: a guest (local CID > 2) reaches context
1 at CID 2 (``VMADDR_CID_HOST``), a host or a loopback-only kernel at CID 1
(``VMADDR_CID_LOCAL``). A transport opened with ``context=1`` (the runtime's ``cid`` setting is 1,
as the discovery daemon's is) reports its endpoints in context 1, binds their ports as usual
(resource id = port; ports <= 1023, as the daemon's port 1, need ``CAP_NET_BIND_SERVICE``), and
says so in its hellos (magic ``"VSW1"``). A receiver accepts that claim only from the host
(peer CID 2) or from its own kernel (CID 1 or the local CID); a guest cannot be context 1. It is
refused on a guest kernel (local CID > 2).

Wire format of a link
---------------------

The connector's first message on a new connection is an 8-byte **hello**, before any datagram::

    offset 0  u32 little-endian  magic 0x31435356 (the bytes "VSC1"), or 0x31575356 ("VSW1")
                                 when the sender speaks for the well-known context 1
    offset 4  u32 little-endian  source resource id (the sending endpoint's rid, != 0xFFFFFFFF)

then each message (each frame, in stream mode) is one datagram frame (``VMCIDatagram`` header + payload, ``vmci-sdk.md``
3.1). The receiving transport reads the hello in ``identify`` (waiting at most
``HELLO_TIMEOUT`` seconds), takes the peer's context from ``getpeername`` (kernel-verified)
and its resource id from the hello; a connection without a valid hello (wrong size, wrong
magic, truncated, nothing within the timeout) is refused. From then on the core's Receiver
drops (and the endpoint counts as ``forged``) any frame whose ``src`` is not exactly that
(context, resource) or whose ``dst`` is not the endpoint's own handle.

The other direction carries **verdicts** (``transport/verdicts.py``): privileges live in the
receiving process, so it tells a sender whether it may send, each verdict an 8-byte message
(back to back in stream mode)::

    offset 0  u32 little-endian  magic 0x31565356 (the bytes "VSV1")
    offset 4  u32 little-endian  0: the sender may send; 1: it is denied VMCI_PRIV_DG_SEND

A link starts allowed. The receiver writes a verdict when it accepts a connection whose sender
is denied, and again whenever that sender's verdict changes (the endpoint's privileges or a
group they name changed), at once, from the thread that made the change. It never blocks on
it: a sender that does not read them may miss some. The sender's pump (or watch) keeps the last
verdict; while it says denied, ``VMCIDatagram_SendTo`` returns ``VMCI_ERROR_NO_ACCESS`` (``send``
raises ``NoAccess``) on the cached link, without a syscall; a message that is not a verdict
(wrong size, magic or word) ends the link, counted in ``stats.bad_verdicts``. The receiver
still enforces the privileges itself, so a sender that ignores verdicts is dropped and counted
(``stats.denied``). The race is inherent: datagrams sent before a verdict reaches the sender
(the first ones on a fresh link to a receiver that denies it, or ones in flight when the
privileges change) are dropped and counted by the receiver, not reported to the sender. A
sender of an older version, which took any byte from the receiver for a hang-up, sees a denial
as a lost connection and reconnects.

Trust: the context is the kernel's word; the resource id is the sender's, fixed once per
connection. Processes of one context can therefore claim each other's resource ids (as any
process of a VM could on VMCI's datagram API with a trusted handle); across contexts nobody can
forge a context id. Address endpoints by the context their handle reports (the local CID): a
frame whose ``dst.context`` names the same kernel by another CID (1, or 2 on a guest without a
host transport) is dropped as forged by the receiver.

Queue accounting and its bound
------------------------------

There is no shared memory across kernels. Each link and each endpoint gets a private anonymous
account page, initialised with a limit of 2**62 (no user-space bound): the sender's page only
counts what it produced, the receiver's only what it consumed. The bound is the kernel's: a
sender that finds the receiving connection full gets ``EAGAIN`` -> ``VMCI_ERROR_NO_RESOURCES``
at once (sealing a SEQPACKET link, above). In SEQPACKET mode an endpoint's listener sets its
connections' kernel buffer (``SO_VM_SOCKETS_BUFFER_SIZE``, which the kernel also grants the
sender as credit) to ``VSOCK_DG_LINK_BUFFER`` = ``VMCI_MAX_DATAGRAM_QUEUE_SIZE - 1`` bytes. A
message is the SDK's datagram, header included, so once the receiver has read the link's hello
(its first receive after the sender connected) a sender's datagrams queued for the endpoint
stay below the SDK's 139,264 bytes, counted as the SDK counts them, and the datagram that would
reach it is refused (``tests/real_vsock/test_vsock_queue_bound.py``); before, the hello's 8
bytes count too. The buffer is never shrunk on a connection: a sender may already have packets
in flight for the larger buffer, and the kernel would drop them. Unlike the SDK's and the local transport's
bound, it is per sending link, not per endpoint (each of several senders has it), and after a
refusal the sealed link refuses everything until the receiver has drained it. In stream mode the
bound is the link's AF_UNIX pair and connection (``net.core.wmem_default`` and 256 KiB).

Peer loss: a receiver that goes away resets its connections; the next send on a direct link
fails (``EPIPE``/``ECONNRESET``), and in stream mode the link's pump sees the hang-up and closes
its end of the pair, so the endpoint's stale-link check sees it and the next send gets
``EPIPE``; the endpoint reconnects once, and the refused connect reports
``VMCI_ERROR_INVALID_RESOURCE``. Closing a stream-mode link (``disconnect``: ``forget``, or
closing the endpoint) first lets its pump forward what the core already sent, for at most
``LINGER`` seconds, so a reply sent just before closing is not lost; a direct link's datagrams
are in the kernel once sent, and its connection is shut down at once.
"""
import errno
import fcntl
import os
import select
import socket
import struct
import threading
from typing import Dict, Optional, Tuple

from ..constants import (
    AF_VSOCK,
    IOCTL_VM_SOCKETS_GET_LOCAL_CID,
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
    VMADDR_CID_LOCAL,
    VMADDR_PORT_ANY,
    VMCI_HYPERVISOR_CONTEXT_ID,
    VMCI_RESERVED_RESOURCE_ID_MAX,
    VMCI_WELL_KNOWN_CONTEXT_ID,
    VSOCK_DG_LINK_BUFFER,
    SO_VM_SOCKETS_BUFFER_SIZE,
)
from ..errors import DstUnreachable, DuplicateEntry, InvalidResource, NoAccess, NoResources
from ..handles import VMCIHandle
from .base import Bound, Link, Peer, Transport, TransportUnavailable
from .pieces import piece_for
from .vsock_dgram import DGRAM_FEATURES, DgramListener, DgramMode
from .streams import (  # noqa: F401  (the hello and the pump are part of this transport's wire format)
    HELLO,
    HELLO_MAGIC,
    HELLO_TIMEOUT,
    HELLO_WELL_KNOWN_MAGIC,
    StreamLinks,
    StreamListener,
    _pump,
    decode_hello,
    encode_hello,
    parse_hello,
    read_stream_hello,
)
from .verdicts import VERDICT, VERDICT_MAGIC, decode_verdict, encode_verdict  # noqa: F401  (wire format)

VSOCK_DEVICE = "/dev/vsock"

FIRST_AUTO_RID = VMCI_RESERVED_RESOURCE_ID_MAX + 1
#: Ports tried, upwards, for one auto-assigned resource id.
AUTO_RID_TRIES = 65536
MODES = ("dgram", "seqpacket", "stream")

_SOCK_TYPES = {"dgram": socket.SOCK_DGRAM, "seqpacket": socket.SOCK_SEQPACKET,
               "stream": socket.SOCK_STREAM}
_NO_DGRAM_HINT = (" (only VMware's VMCI transport carries vsock datagrams; "
                  "VSOCKCOMPAT_VSOCK_MODE=seqpacket or stream work on the others)")
_GONE = (errno.ECONNREFUSED, errno.ECONNRESET, errno.EPROTO, errno.ETIMEDOUT, errno.EPIPE,
         errno.ENOTCONN)
_UNREACHABLE = (errno.EHOSTUNREACH, errno.ENODEV, errno.ENETUNREACH, errno.EADDRNOTAVAIL,
                errno.ESOCKTNOSUPPORT, errno.EAFNOSUPPORT)
_BUSY = (errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM, errno.EMFILE, errno.ENFILE)


def _vsock_socket(kind: int = socket.SOCK_SEQPACKET) -> socket.socket:
    return socket.socket(AF_VSOCK, kind | socket.SOCK_CLOEXEC)


def choose_mode(requested: str = "auto") -> str:
    """``dgram``, ``seqpacket`` or ``stream``, by creating (never binding, connecting or
    sending on) AF_VSOCK sockets.

    ``auto`` is DGRAM when such a socket can be created (a datagram transport, VMCI, is
    loaded), else SEQPACKET when such a socket can be created, else STREAM. TransportUnavailable
    when the mode asked for (or, for ``auto``, none) can be created.
    """
    if requested not in MODES + ("auto",):
        raise TransportUnavailable("unknown vsock mode %r (auto, %s)" % (requested, ", ".join(MODES)))
    errors = []
    for mode in (MODES if requested == "auto" else (requested,)):
        try:
            probe = _vsock_socket(_SOCK_TYPES[mode]) if mode != "seqpacket" else _vsock_socket()
        except OSError as exc:
            errors.append("AF_VSOCK SOCK_%s sockets cannot be created here: [Errno %s] %s%s"
                          % (mode.upper(), exc.errno, exc.strerror or exc,
                             _NO_DGRAM_HINT if mode == "dgram" else ""))
            continue
        probe.close()
        return mode
    raise TransportUnavailable("; ".join(errors))


def read_local_cid(device: str = VSOCK_DEVICE) -> int:
    """This kernel's CID from ``IOCTL_VM_SOCKETS_GET_LOCAL_CID``; VMADDR_CID_ANY if unknown."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return VMADDR_CID_ANY
    try:
        return struct.unpack("I", fcntl.ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, b"\0" * 4))[0]
    except OSError:
        return VMADDR_CID_ANY
    finally:
        os.close(fd)


def well_known_cid(local_cid: int) -> int:
    """The vsock CID at which this kernel reaches context 1: the host's from a guest, else its own."""
    return VMADDR_CID_HOST if VMADDR_CID_HOST < local_cid < VMADDR_CID_ANY else VMADDR_CID_LOCAL


def _link_error(exc: OSError, dst: VMCIHandle):
    """The VMCIError for a failed connect (or hello) to ``dst``."""
    if exc.errno in _GONE:
        return InvalidResource("no endpoint %s (%s)" % (tuple(dst), os.strerror(exc.errno)))
    if exc.errno == errno.ESOCKTNOSUPPORT:
        return DstUnreachable("context %d cannot be reached with this socket type (%s): use "
                              "VSOCKCOMPAT_VSOCK_MODE=stream on both sides"
                              % (dst.context, os.strerror(exc.errno)))
    if exc.errno in _UNREACHABLE:
        return DstUnreachable("context %d cannot be reached over vsock (%s)"
                              % (dst.context, os.strerror(exc.errno)))
    if exc.errno in (errno.EACCES, errno.EPERM):
        return NoAccess("not allowed to reach endpoint %s" % (tuple(dst),))
    if exc.errno in _BUSY:
        return NoResources("cannot open a link to %s now (%s)" % (tuple(dst), os.strerror(exc.errno)))
    return None


class VsockTransport(DgramMode, StreamLinks, Transport):
    """AF_VSOCK endpoints: links (SEQPACKET or STREAM; identity: kernel CID + the connection's
    hello) or, in dgram mode, DGRAM sockets (identity: the kernel's source address)."""

    name = "vsock"
    features = frozenset({"dgram", "peer-identity", "verdicts"})
    #: SEQPACKET links are direct (the core sends on the connection); False: pumped, as in
    #: stream mode (the benchmark compares the two in one run).
    direct_links = True

    def __init__(self, core, cid: Optional[int] = None, *, context: Optional[int] = None,
                 mode: str = "auto"):
        """Open the transport; TransportUnavailable if AF_VSOCK cannot be used in ``mode``.

        ``cid`` overrides the kernel's local CID (for kernels whose ``/dev/vsock`` cannot say);
        by default it is read from the ioctl. ``context`` may only be 1: endpoints of the
        well-known context (the discovery service), on a host or loopback-only kernel. ``mode``
        is ``auto``, ``dgram``, ``seqpacket`` or ``stream`` (``choose_mode``). Probe sockets send
        nothing.
        """
        self.mode = choose_mode(mode)
        if cid is None:
            cid = read_local_cid()
            if cid == VMADDR_CID_ANY:
                raise TransportUnavailable(
                    "the local CID is unknown (IOCTL_VM_SOCKETS_GET_LOCAL_CID on %s failed or "
                    "no vsock transport gave this kernel a CID)" % VSOCK_DEVICE)
        if context is not None and context not in (cid, VMCI_WELL_KNOWN_CONTEXT_ID):
            raise TransportUnavailable("over vsock a process is in its kernel's context (%d) or, "
                                       "on the host, in context 1; not in %d" % (cid, context))
        if context == VMCI_WELL_KNOWN_CONTEXT_ID and well_known_cid(cid) != VMADDR_CID_LOCAL:
            raise TransportUnavailable("context 1 (the discovery service) is served by the host, "
                                       "not by a guest (local CID %d)" % cid)
        self._kcid = cid
        self._cid = cid if context is None else context
        self._well_known = self._cid == VMCI_WELL_KNOWN_CONTEXT_ID
        self._sock_type = _SOCK_TYPES[self.mode]
        self._core = core
        self._lock = threading.Lock()
        self._bound: Dict[int, object] = {}
        self._next_rid = FIRST_AUTO_RID
        self._pumps: Dict[int, tuple] = {}
        if self.mode == "dgram":
            self.features = DGRAM_FEATURES

    @property
    def local_cid(self) -> int:
        return self._cid

    @property
    def kernel_cid(self) -> int:
        """The kernel's CID (differs from ``local_cid`` only for the well-known context)."""
        return self._kcid

    def _socket(self, kind: Optional[int] = None) -> socket.socket:
        """A new AF_VSOCK socket of this mode's type (or of ``kind``)."""
        kind = self._sock_type if kind is None else kind
        return _vsock_socket(kind) if kind != socket.SOCK_SEQPACKET else _vsock_socket()

    # Endpoints

    def bind(self, resource: Optional[int]) -> Bound:
        if self.mode == "dgram":
            return self._bind_dgram(resource)
        sock = self._socket()
        try:
            if resource is not None:
                rid = self._bind_explicit(sock, resource)
            else:
                rid = self._bind_auto(sock)
            if self.mode == "seqpacket":    # accepted connections inherit it
                sock.setsockopt(AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE, VSOCK_DG_LINK_BUFFER)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
            if self.mode == "stream":
                listener = StreamListener(sock, self._identify_stream, "vsock-%d" % rid)
            else:
                listener = sock
            account, page = self._private_account()
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self._bound[rid] = listener
        return Bound(VMCIHandle(self._cid, rid), listener, account, page)

    def _bind_explicit(self, listener: socket.socket, rid: int) -> int:
        try:
            listener.bind((VMADDR_CID_ANY, rid))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise DuplicateEntry("resource id %d is taken in context %d (vsock port in use)"
                                     % (rid, self._cid)) from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise NoAccess("resource id %d is a privileged vsock port (<= %d)"
                               % (rid, VMCI_RESERVED_RESOURCE_ID_MAX)) from None
            raise
        return rid

    def _bind_auto(self, listener: socket.socket) -> int:
        with self._lock:
            rid = self._next_rid
        for _ in range(AUTO_RID_TRIES):
            try:
                listener.bind((VMADDR_CID_ANY, rid))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                rid = rid + 1 if rid + 1 < VMADDR_PORT_ANY else FIRST_AUTO_RID
                continue
            with self._lock:
                self._next_rid = rid + 1 if rid + 1 < VMADDR_PORT_ANY else FIRST_AUTO_RID
            return rid
        raise NoResources("no free resource id from %d in %d tries" % (rid, AUTO_RID_TRIES))

    def unbind(self, bound: Bound) -> None:
        bound.account.mark_closed()
        with self._lock:
            self._bound.pop(bound.handle.resource, None)
        bound.listener.close()
        self._release(bound.account, bound.page)

    # Links

    def vsock_address(self, dst: VMCIHandle) -> Tuple[int, int]:
        """The ``(cid, port)`` that endpoint ``dst`` is reached at."""
        cid = dst.context
        if cid == VMCI_WELL_KNOWN_CONTEXT_ID:
            cid = well_known_cid(self._kcid)
        return cid, dst.resource

    #: How a failed connect, hello or datagram send becomes a VMCIError (None: not ours to map).
    link_error = staticmethod(_link_error)

    def connect(self, src: VMCIHandle, dst: VMCIHandle) -> Link:
        if self.mode == "dgram":
            raise TransportUnavailable("dgram mode has no links: endpoints send with send_datagram")
        if dst.context in (VMCI_HYPERVISOR_CONTEXT_ID, VMADDR_CID_ANY):
            raise DstUnreachable("context %d cannot be reached over vsock" % dst.context)
        if dst.resource == VMADDR_PORT_ANY:
            raise InvalidResource("no endpoint %s" % (tuple(dst),))
        vs = self._socket()
        try:
            # Blocking: the kernel's connect timeout (2 s by default) bounds it.
            vs.connect(self.vsock_address(dst))
            vs.sendall(encode_hello(src.resource, self._well_known))
        except OSError as exc:
            vs.close()
            error = _link_error(exc, dst)
            if error is None:
                raise
            raise error from None
        except BaseException:
            vs.close()
            raise
        if self.mode == "seqpacket" and self.direct_links:
            return self._start_direct_link(vs, src, dst)
        return self._start_link(vs, src, dst, stream=self.mode == "stream",
                                piece=piece_for(vs, self._kcid))

    # Identity

    def _peer_context(self, peer_cid: int, well_known: bool) -> Optional[int]:
        """The context of a peer the kernel places at ``peer_cid``; None if its claim is refused."""
        own = peer_cid in (VMADDR_CID_LOCAL, self._kcid)
        if well_known:
            return VMCI_WELL_KNOWN_CONTEXT_ID if own or peer_cid == VMADDR_CID_HOST else None
        return self._kcid if own else peer_cid

    def _identify_stream(self, conn: socket.socket, hello: Tuple[bool, int]) -> Optional[Peer]:
        context = self._peer_context(conn.getpeername()[0], hello[0])
        return None if context is None else Peer(VMCIHandle(context, hello[1]), 0, None)

    def _stream_listeners(self):
        with self._lock:
            return [listener for listener in self._bound.values()
                    if isinstance(listener, (StreamListener, DgramListener))]

    def identify(self, conn, dst: VMCIHandle) -> Optional[Peer]:
        if self.mode in ("stream", "dgram"):
            return self._stream_peer(conn)
        cid, _port = conn.getpeername()
        poller = select.poll()
        poller.register(conn, select.POLLIN)
        if not poller.poll(int(HELLO_TIMEOUT * 1000)):
            return None
        try:
            data, _, flags, _ = conn.recvmsg(HELLO.size + 1, 0, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        hello = decode_hello(data, truncated=bool(flags & socket.MSG_TRUNC))
        if hello is None:
            return None
        context = self._peer_context(cid, hello[0])
        if context is None:
            return None
        return Peer(VMCIHandle(context, hello[1]), 0, None)  # pid 0, uid None: not known across kernels

    def tell(self, conn, denied: bool) -> None:
        if self.mode == "dgram":
            return  # no channel back to a sender: its datagrams are dropped and counted
        if self.mode == "stream":
            super().tell(conn, denied)
            return
        try:
            conn.send(encode_verdict(denied), socket.MSG_DONTWAIT)
        except OSError:
            pass  # a sender that leaves its buffer full misses it; its datagrams are still dropped

    # Introspection

    def endpoint_alive(self, handle: VMCIHandle) -> bool:
        """True for an endpoint this transport bound and still holds; False otherwise.

        Other processes' and other contexts' endpoints cannot be checked without traffic.
        """
        if handle.context != self._cid:
            return False
        with self._lock:
            return handle.resource in self._bound

    resource_alive = endpoint_alive


__all__ = ["VsockTransport", "StreamListener", "StreamLinks", "choose_mode", "read_local_cid",
           "parse_hello", "decode_hello", "encode_hello", "read_stream_hello", "well_known_cid",
           "HELLO", "HELLO_MAGIC", "HELLO_WELL_KNOWN_MAGIC", "HELLO_TIMEOUT", "MODES",
           "VERDICT", "VERDICT_MAGIC", "decode_verdict", "encode_verdict"]
