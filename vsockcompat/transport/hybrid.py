"""The ``hybrid`` transport: the host side of a VMM's "hybrid vsock" (``VSOCKCOMPAT_TRANSPORT=hybrid``).

Firecracker, Cloud Hypervisor and QEMU with vhost-user-vsock (``vhost-device-vsock``) give a
guest a virtio-vsock device whose host end is not the host kernel's AF_VSOCK but Unix sockets
of the VMM, named by one path, ``VSOCKCOMPAT_HYBRID_UDS`` (``uds_path`` below):

* host -> guest: connect to ``uds_path``, send ``CONNECT <port>\\n``, read ``OK <hostport>\\n``;
  the connection is then a stream to the guest's vsock port ``<port>`` (the guest sees the peer
  as ``(2, <hostport>)``). A VMM that closes instead of answering says the guest refused
  (``InvalidResource``); an answer that is not ``OK <decimal>\\n`` is ``DstUnreachable``; no
  answer within ``HANDSHAKE_TIMEOUT`` seconds is ``Timeout``.
* guest -> host: a guest's ``connect((2, <port>))`` reaches the Unix listener at
  ``<uds_path>_<port>``: that is where an endpoint with resource id ``<port>`` listens.

This uses AF_UNIX only: no AF_VSOCK socket is ever created here. Endpoints are in context 2 (the
host); the one peer is the guest behind ``uds_path``, whose CID (``VSOCKCOMPAT_HYBRID_CID``, 3
by default) is configuration, as it is for the VMM: the VMM alone can connect to our listeners
and it does so only for its guest, so the peer's context is that CID, never what a frame says.

Streams carry the vsock transport's stream mode (``transport.vsock``): the 8-byte hello, then
frames back to back; the guest must run the vsock transport with ``VSOCKCOMPAT_VSOCK_MODE=stream``
(these devices have no SEQPACKET). A guest's hello claiming the well-known context is refused.
Verdicts flow back on each stream as they do over vsock, so the guest and the host each learn
when the other denies them DG_SEND.
"""
import contextlib
import errno
import os
import re
import socket
import threading
import time
from typing import Dict, Optional, Tuple

from ..constants import VMCI_HOST_CONTEXT_ID
from ..errors import DstUnreachable, DuplicateEntry, InvalidResource, NoResources, Timeout
from ..handles import VMCIHandle
from .base import Bound, Link, Peer, Transport, TransportUnavailable
from .streams import StreamLinks, StreamListener, encode_hello
from .vsock import FIRST_AUTO_RID, _link_error

#: Seconds the VMM has to answer ``CONNECT <port>``.
HANDSHAKE_TIMEOUT = 5.0
#: The longest answer read: "OK 4294967295\n" is 14 bytes.
MAX_REPLY = 32
_OK = re.compile(rb"OK ([0-9]{1,10})\n")
_SUN_PATH_MAX = 107
_MAX_PORT = 0xFFFFFFFE
AUTO_RID_TRIES = 65536


def read_reply(sock: socket.socket, deadline: float) -> bytes:
    """Read the VMM's one-line answer (with its newline) by ``deadline``.

    Returns what was read: ends at the newline, at end of file, or at MAX_REPLY bytes.
    Raises ``socket.timeout`` when the deadline passes first.
    """
    data = b""
    while len(data) < MAX_REPLY and not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("no answer")
        sock.settimeout(left)
        byte = sock.recv(1)  # byte by byte: what follows the newline is the guest's
        if not byte:
            break
        data += byte
    return data


def parse_reply(data: bytes) -> Optional[int]:
    """The host port of a well-formed ``OK <port>\\n``, else None."""
    match = _OK.fullmatch(data)
    if match is None or int(match.group(1)) > 0xFFFFFFFF:
        return None
    return int(match.group(1))


class HybridTransport(StreamLinks, Transport):
    """Host endpoints behind a VMM's hybrid-vsock Unix sockets; the peer is its guest."""

    name = "hybrid"
    features = frozenset({"dgram", "peer-identity", "verdicts"})

    def __init__(self, core, uds_path: str, guest_cid: int = 3):
        """``uds_path``: the VMM's socket; ``guest_cid``: its guest's CID. Opens nothing yet."""
        uds_path = os.path.abspath(uds_path)
        if len(uds_path) + len("_4294967295") > _SUN_PATH_MAX:
            raise TransportUnavailable("the VMM socket path %r is too long for Unix socket paths "
                                       "with a port suffix" % uds_path)
        if not os.path.isdir(os.path.dirname(uds_path)):
            raise TransportUnavailable("the directory of the VMM socket %r does not exist" % uds_path)
        if not 2 < guest_cid < 0xFFFFFFFF:
            raise TransportUnavailable("guest CID %d is not a guest's" % guest_cid)
        self.uds_path = uds_path
        self.guest_cid = guest_cid
        self._cid = VMCI_HOST_CONTEXT_ID
        self._core = core
        self._lock = threading.Lock()
        self._bound: Dict[int, StreamListener] = {}
        self._next_rid = FIRST_AUTO_RID
        self._pumps: Dict[int, tuple] = {}

    @property
    def local_cid(self) -> int:
        return self._cid

    def port_path(self, rid: int) -> str:
        """Where the VMM delivers the guest's connections to host port ``rid``."""
        return "%s_%d" % (self.uds_path, rid)

    # Endpoints

    def bind(self, resource: Optional[int]) -> Bound:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            rid = self._bind_explicit(sock, resource) if resource is not None else self._bind_auto(sock)
            try:
                sock.listen(socket.SOMAXCONN)
                listener = StreamListener(sock, self._identify_stream, "hybrid-%d" % rid)
                account, page = self._private_account()
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.port_path(rid))
                raise
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self._bound[rid] = listener
        return Bound(VMCIHandle(self._cid, rid), listener, account, page)

    def _try_bind(self, sock: socket.socket, rid: int) -> bool:
        """Bind to ``rid``'s path; False if a live listener holds it (a dead one's file is reclaimed)."""
        path = self.port_path(rid)
        for _ in range(2):
            try:
                sock.bind(path)
                return True
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or self._listening(path):
                    if exc.errno == errno.EADDRINUSE:
                        return False
                    raise
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        return False

    @staticmethod
    def _listening(path: str) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def _bind_explicit(self, sock: socket.socket, rid: int) -> int:
        if not self._try_bind(sock, rid):
            raise DuplicateEntry("resource id %d is taken (%s is in use)" % (rid, self.port_path(rid)))
        return rid

    def _bind_auto(self, sock: socket.socket) -> int:
        with self._lock:
            rid = self._next_rid
        for _ in range(AUTO_RID_TRIES):
            if self._try_bind(sock, rid):
                with self._lock:
                    self._next_rid = rid + 1 if rid < _MAX_PORT else FIRST_AUTO_RID
                return rid
            rid = rid + 1 if rid < _MAX_PORT else FIRST_AUTO_RID
        raise NoResources("no free resource id in %d tries" % AUTO_RID_TRIES)

    def unbind(self, bound: Bound) -> None:
        bound.account.mark_closed()
        with self._lock:
            self._bound.pop(bound.handle.resource, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.port_path(bound.handle.resource))
        bound.listener.close()
        self._release(bound.account, bound.page)

    # Links

    def connect(self, src: VMCIHandle, dst: VMCIHandle) -> Link:
        if dst.context != self.guest_cid:
            raise DstUnreachable("context %d cannot be reached through %s (its guest is %d)"
                                 % (dst.context, self.uds_path, self.guest_cid))
        if not 0 <= dst.resource <= _MAX_PORT:
            raise InvalidResource("no endpoint %s" % (tuple(dst),))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._handshake(sock, dst)
            sock.settimeout(None)
            sock.sendall(encode_hello(src.resource))
        except OSError as exc:
            sock.close()
            error = _link_error(exc, dst)
            if error is None:
                raise
            raise error from None
        except BaseException:
            sock.close()
            raise
        return self._start_link(sock, src, dst, stream=True)

    def _handshake(self, sock: socket.socket, dst: VMCIHandle) -> int:
        """``CONNECT <port>`` through the VMM; the host port it answers, or a VMCIError."""
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            sock.connect(self.uds_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DstUnreachable("no VMM listens at %s (%s)" % (self.uds_path, exc.strerror)) from None
        except socket.timeout:
            raise Timeout("the VMM at %s did not accept within %gs" % (self.uds_path, HANDSHAKE_TIMEOUT)) from None
        try:
            sock.sendall(b"CONNECT %d\n" % dst.resource)
            reply = read_reply(sock, deadline)
        except socket.timeout:
            raise Timeout("the VMM at %s did not answer CONNECT %d within %gs"
                          % (self.uds_path, dst.resource, HANDSHAKE_TIMEOUT)) from None
        except (ConnectionResetError, BrokenPipeError):
            reply = b""
        if not reply:
            raise InvalidResource("no endpoint %s: the VMM at %s closed the connection instead of "
                                  "answering CONNECT %d" % (tuple(dst), self.uds_path, dst.resource))
        port = parse_reply(reply)
        if port is None:
            raise DstUnreachable("the VMM at %s answered CONNECT %d with %r, not OK <port>"
                                 % (self.uds_path, dst.resource, reply))
        return port

    # Identity

    def _identify_stream(self, conn: socket.socket, hello: Tuple[bool, int]) -> Optional[VMCIHandle]:
        well_known, rid = hello
        return None if well_known else VMCIHandle(self.guest_cid, rid)

    def _stream_listeners(self):
        with self._lock:
            return list(self._bound.values())

    def identify(self, conn, dst: VMCIHandle) -> Optional[Peer]:
        return self._stream_peer(conn)

    # Introspection

    def endpoint_alive(self, handle: VMCIHandle) -> bool:
        """True for an endpoint this transport bound and still holds (the guest's: unknown, False)."""
        if handle.context != self._cid:
            return False
        with self._lock:
            return handle.resource in self._bound

    resource_alive = endpoint_alive


__all__ = ["HybridTransport", "HANDSHAKE_TIMEOUT", "parse_reply", "read_reply"]
