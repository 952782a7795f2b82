"""The ``vsock`` transport: datagram endpoints over real AF_VSOCK (``VSOCKCOMPAT_TRANSPORT=vsock``).

Mapping (DESIGN.md, "Mapping the SDK onto today's kernels"):

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
  header then the payload, exactly as on the local transport. The core does not send on the
  vsock socket itself: Linux (6.1) may send *part* of a SEQPACKET message and then fail with
  ``EAGAIN`` on a non-blocking send, leaving the receiver a message without its end (readable,
  yet ``EAGAIN`` to read) or, with the next message, a merged one. So the core sends, without
  blocking, on one end of an ``AF_UNIX`` SEQPACKET pair (all or nothing per message), and a
  pump thread per link forwards each message with a blocking send on the vsock connection.

This release uses SOCK_SEQPACKET only (virtio, vhost, loopback). VMware's VMCI transport, the
only one with SOCK_DGRAM, has no SEQPACKET; the DGRAM mode and a SOCK_STREAM mode with framing
(Hyper-V) are future work. Only ``socket()`` is ever called to decide (no traffic).

Wire format of a link
---------------------

The connector's first message on a new connection is an 8-byte **hello**, before any datagram::

    offset 0  u32 little-endian  magic 0x31435356 (the bytes "VSC1")
    offset 4  u32 little-endian  source resource id (the sending endpoint's rid, != 0xFFFFFFFF)

then each message is one datagram frame (``VMCIDatagram`` header + payload, ``vmci-sdk.md``
3.1). The receiving transport reads the hello in ``identify`` (waiting at most
``HELLO_TIMEOUT`` seconds), takes the peer's context from ``getpeername`` (kernel-verified)
and its resource id from the hello; a connection without a valid hello (wrong size, wrong
magic, truncated, nothing within the timeout) is refused. From then on the core's Receiver
drops (and the endpoint counts as ``forged``) any frame whose ``src`` is not exactly that
(context, resource) or whose ``dst`` is not the endpoint's own handle.

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
counts what it produced, the receiver's only what it consumed. The SDK's exact bound of
``VMCI_MAX_DATAGRAM_QUEUE_SIZE`` (139,264) bytes queued per endpoint is a property of the local
transport; over vsock the bound is the kernel's: the receiving connection's buffer (256 KiB by
default), then the link's AF_UNIX pair (``net.core.wmem_default``); a sender that finds both
full gets ``EAGAIN`` -> ``VMCI_ERROR_NO_RESOURCES`` at once. A credit scheme that bounds each
sender by the receiver's free space (and so restores the SDK bound) is future work.

Peer loss: a receiver that goes away resets its connections; the link's pump sees the hang-up
and closes its end of the pair, so the endpoint's stale-link check sees it and the next send
gets ``EPIPE``; the endpoint reconnects once, and the refused connect reports
``VMCI_ERROR_INVALID_RESOURCE``.
"""
import errno
import fcntl
import mmap
import os
import select
import socket
import struct
import threading
from typing import Dict, Optional, Set

from ..constants import VMCI_HYPERVISOR_CONTEXT_ID, VMCI_MAX_DG_SIZE, VMCI_RESERVED_RESOURCE_ID_MAX
from ..errors import DstUnreachable, DuplicateEntry, InvalidResource, NoAccess, NoResources
from ..handles import VMCIHandle
from .base import Bound, Link, Peer, Transport, TransportUnavailable

AF_VSOCK = 40
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_LOCAL = 1
VMADDR_PORT_ANY = 0xFFFFFFFF
IOCTL_VM_SOCKETS_GET_LOCAL_CID = 0x7B9  # _IO(7, 0xb9) = 1977
VSOCK_DEVICE = "/dev/vsock"

HELLO = struct.Struct("<II")
HELLO_MAGIC = 0x31435356  # b"VSC1" read as a little-endian u32
#: Seconds ``identify`` waits for a new connection's hello.
HELLO_TIMEOUT = 5.0
#: The account limit of vsock links and endpoints: no user-space bound (see the module docstring).
UNBOUNDED = 1 << 62
FIRST_AUTO_RID = VMCI_RESERVED_RESOURCE_ID_MAX + 1
#: Ports tried, upwards, for one auto-assigned resource id.
AUTO_RID_TRIES = 65536
PUMP_JOIN_TIMEOUT = 5.0

_SOCK_TYPE = socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
_GONE = (errno.ECONNREFUSED, errno.ECONNRESET, errno.EPROTO, errno.ETIMEDOUT, errno.EPIPE,
         errno.ENOTCONN)
_UNREACHABLE = (errno.EHOSTUNREACH, errno.ENODEV, errno.ENETUNREACH, errno.EADDRNOTAVAIL,
                errno.ESOCKTNOSUPPORT, errno.EAFNOSUPPORT)
_BUSY = (errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM, errno.EMFILE, errno.ENFILE)


def parse_hello(data: bytes, truncated: bool = False) -> Optional[int]:
    """The sender's resource id from a connection's first message, or None if it is not a hello."""
    if truncated or len(data) != HELLO.size:
        return None
    magic, rid = HELLO.unpack(data)
    if magic != HELLO_MAGIC or rid == VMADDR_PORT_ANY:
        return None
    return rid


def _vsock_socket() -> socket.socket:
    return socket.socket(AF_VSOCK, _SOCK_TYPE)


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


def _pump(back: socket.socket, vs: socket.socket) -> None:
    """Forward whole messages from a link's AF_UNIX end to its vsock connection, blocking.

    Ends (closing ``back``, so the core's next send sees EPIPE) when the core closes its end,
    when the receiver hangs up (it never writes: any event on ``vs`` is a hang-up) or when a
    send fails. ``vs`` is closed by ``disconnect``.
    """
    buf = bytearray(VMCI_MAX_DG_SIZE + 1)
    view = memoryview(buf)
    poller = select.poll()
    poller.register(back, select.POLLIN)
    poller.register(vs, select.POLLIN)
    vs_fd = vs.fileno()
    try:
        while True:
            events = poller.poll()
            if any(fd == vs_fd for fd, _ in events):
                return
            n = back.recv_into(buf)
            if n == 0:
                return
            if vs.send(view[:n]) != n:  # blocking SEQPACKET: whole message or an error
                return
    except OSError:
        return
    finally:
        view.release()
        back.close()


def _link_error(exc: OSError, dst: VMCIHandle):
    """The VMCIError for a failed connect (or hello) to ``dst``."""
    if exc.errno in _GONE:
        return InvalidResource("no endpoint %s (%s)" % (tuple(dst), os.strerror(exc.errno)))
    if exc.errno in _UNREACHABLE:
        return DstUnreachable("context %d cannot be reached over vsock (%s)"
                              % (dst.context, os.strerror(exc.errno)))
    if exc.errno in (errno.EACCES, errno.EPERM):
        return NoAccess("not allowed to reach endpoint %s" % (tuple(dst),))
    if exc.errno in _BUSY:
        return NoResources("cannot open a link to %s now (%s)" % (tuple(dst), os.strerror(exc.errno)))
    return None


class VsockTransport(Transport):
    """AF_VSOCK SOCK_SEQPACKET links; identity: kernel CID + the connection's hello."""

    name = "vsock"
    features = frozenset({"dgram", "peer-identity"})

    def __init__(self, core, cid: Optional[int] = None):
        """Open the transport; TransportUnavailable if AF_VSOCK SOCK_SEQPACKET cannot be used.

        ``cid`` overrides the kernel's local CID (for kernels whose ``/dev/vsock`` cannot say);
        by default it is read from the ioctl. Creating the probe socket sends nothing.
        """
        try:
            probe = _vsock_socket()
        except OSError as exc:
            raise TransportUnavailable(
                "AF_VSOCK SOCK_SEQPACKET sockets cannot be created here: [Errno %s] %s"
                % (exc.errno, exc.strerror or exc)) from exc
        probe.close()
        if cid is None:
            cid = read_local_cid()
            if cid == VMADDR_CID_ANY:
                raise TransportUnavailable(
                    "the local CID is unknown (IOCTL_VM_SOCKETS_GET_LOCAL_CID on %s failed or "
                    "no vsock transport gave this kernel a CID)" % VSOCK_DEVICE)
        self._cid = cid
        self._core = core
        self._lock = threading.Lock()
        self._bound: Set[int] = set()
        self._next_rid = FIRST_AUTO_RID
        self._pumps: Dict[int, tuple] = {}

    @property
    def local_cid(self) -> int:
        return self._cid

    # Endpoints

    def bind(self, resource: Optional[int]) -> Bound:
        listener = _vsock_socket()
        try:
            if resource is not None:
                rid = self._bind_explicit(listener, resource)
            else:
                rid = self._bind_auto(listener)
            listener.listen(socket.SOMAXCONN)
            listener.setblocking(False)
            account, page = self._private_account()
        except BaseException:
            listener.close()
            raise
        with self._lock:
            self._bound.add(rid)
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
            self._bound.discard(bound.handle.resource)
        bound.listener.close()
        self._release(bound.account, bound.page)

    # Links

    def connect(self, src: VMCIHandle, dst: VMCIHandle) -> Link:
        if dst.context in (VMCI_HYPERVISOR_CONTEXT_ID, VMADDR_CID_ANY):
            raise DstUnreachable("context %d cannot be reached over vsock" % dst.context)
        if dst.resource == VMADDR_PORT_ANY:
            raise InvalidResource("no endpoint %s" % (tuple(dst),))
        vs = _vsock_socket()
        try:
            # Blocking: the kernel's connect timeout (2 s by default) bounds it.
            vs.connect((dst.context, dst.resource))
            vs.sendall(HELLO.pack(HELLO_MAGIC, src.resource))
        except OSError as exc:
            vs.close()
            error = _link_error(exc, dst)
            if error is None:
                raise
            raise error from None
        except BaseException:
            vs.close()
            raise
        try:
            front, back = socket.socketpair(socket.AF_UNIX, _SOCK_TYPE)
        except BaseException:
            vs.close()
            raise
        try:
            front.setblocking(False)
            account, page = self._private_account()
            pump = threading.Thread(target=_pump, args=(back, vs), daemon=True,
                                    name="vsockcompat-vsock-link-%d-%d.%d" % (src.resource, *dst))
            pump.start()
        except BaseException:
            for sock in (front, back, vs):
                sock.close()
            raise
        with self._lock:
            self._pumps[id(front)] = (vs, pump)
        return Link(front, account, page)

    def disconnect(self, src: VMCIHandle, link: Link) -> None:
        with self._lock:
            vs, pump = self._pumps.pop(id(link.sock))
        try:
            vs.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in send
        except OSError:
            pass
        link.sock.close()  # the pump's recv sees the end
        pump.join(PUMP_JOIN_TIMEOUT)
        vs.close()
        self._release(link.account, link.page)

    # Identity

    def identify(self, conn, dst: VMCIHandle) -> Optional[Peer]:
        cid, _port = conn.getpeername()
        if cid == VMADDR_CID_LOCAL:
            cid = self._cid  # the loopback peer runs under this kernel: our context
        poller = select.poll()
        poller.register(conn, select.POLLIN)
        if not poller.poll(int(HELLO_TIMEOUT * 1000)):
            return None
        try:
            data, _, flags, _ = conn.recvmsg(HELLO.size + 1, 0, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        rid = parse_hello(data, truncated=bool(flags & socket.MSG_TRUNC))
        if rid is None:
            return None
        return Peer(VMCIHandle(cid, rid), 0, -1)  # pid 0 / uid -1: not known across kernels

    # Introspection

    def endpoint_alive(self, handle: VMCIHandle) -> bool:
        """True for an endpoint this transport bound and still holds; False otherwise.

        Other processes' and other contexts' endpoints cannot be checked without traffic.
        """
        if handle.context != self._cid:
            return False
        with self._lock:
            return handle.resource in self._bound

    # Helpers

    def _private_account(self):
        page = mmap.mmap(-1, self._core.ACCOUNT_SIZE)
        try:
            account = self._core.Account(-1, page)
            account.initialise(UNBOUNDED)
        except BaseException:
            page.close()
            raise
        return account, page

    @staticmethod
    def _release(account, page) -> None:
        account.release_memory()
        page.close()


__all__ = ["VsockTransport", "read_local_cid", "parse_hello", "HELLO", "HELLO_MAGIC", "HELLO_TIMEOUT"]
