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

This uses AF_UNIX only: no AF_VSOCK socket is ever created here. The one peer behind the VMM is
its guest, whose CID (``VSOCKCOMPAT_HYBRID_CID``, 3 by default) is configuration, as it is for
the VMM: the VMM alone connects to ``<uds_path>_<port>`` and only for its guest, so a peer
arriving there is in that CID, never in what a frame or a hello says.

The host's own contexts
-----------------------

Endpoints are in context 2 (the host), or in the well-known context 1 when the transport is
opened with ``context=1`` (the runtime's ``cid`` setting is 1, as the discovery daemon's is):
the guest reaches context 1 at CID 2, so the daemon's ``(1, 1)`` listens at ``<uds_path>_1``.
Host processes on the same VMM socket reach each other, and the daemon, without the VMM: every
endpoint also listens at ``<uds_path>_<port>.host`` (``host_path``), a path the VMM never
connects to (it only appends a decimal port). So the path a connection arrived on, which the
kernel reports (``getsockname``), decides who the peer is:

* at ``<uds_path>_<port>``: the guest, context ``guest_cid``; a hello claiming the well-known
  context ("VSW1") is refused: a guest cannot be context 1, nor the host;
* at ``<uds_path>_<port>.host``: a host process, which must run as this user
  (``SO_PEERCRED``); context 1 if its hello says so, else 2 (as on vsock, where only the
  host's own kernel may claim context 1). Its pid is the kernel's, so the discovery daemon
  ties a host registration to its process as on the local transport.

A link to context 1 or 2 connects to the destination's ``host_path`` and sends the hello; a
link to ``guest_cid`` goes through the VMM; any other context is ``DstUnreachable``. Mirrored
regions and streamed queue pairs (``mirror_link``) use plain streams, between the host and the
guest only: the owner's listener at ``<uds_path>_<rid>`` (``listen_stream``), the host's
connection through the VMM (``connect_stream``).

Streams carry the vsock transport's stream mode (``transport.vsock``): the 8-byte hello, then
frames back to back; the guest must run the vsock transport with ``VSOCKCOMPAT_VSOCK_MODE=stream``
(these devices have no SEQPACKET). A guest's hello claiming the well-known context is refused.
Verdicts flow back on each stream as they do over vsock, so the guest and the host each learn
when the other denies them DG_SEND.

Liveness (``endpoint_alive``, which the discovery daemon uses to drop the entries of endpoints
that are gone): a host endpoint is alive while a Unix socket listens at its ``host_path``
(``/proc/net/unix``, no traffic). A guest endpoint is probed through the VMM: ``CONNECT
<port>`` answered ``OK`` is alive (the probe then sends a hello of one of our endpoints and
closes, so the guest sees a link that ends, not a refused connection); a VMM that closes, or
that is gone, says it is not; no answer within ``PROBE_TIMEOUT`` seconds counts as alive.
"""
import contextlib
import errno
import os
import re
import socket
import struct
import threading
import time
from typing import Dict, List, Optional, Tuple

from ..constants import VMCI_HOST_CONTEXT_ID, VMCI_WELL_KNOWN_CONTEXT_ID
from ..errors import DstUnreachable, DuplicateEntry, InvalidResource, NoResources, Timeout
from ..handles import VMCIHandle
from .base import Bound, Link, Peer, Transport, TransportUnavailable
from .streams import StreamLinks, StreamListener, encode_hello
from .vsock import FIRST_AUTO_RID, _link_error

#: Seconds the VMM has to answer ``CONNECT <port>``.
HANDSHAKE_TIMEOUT = 5.0
#: Seconds a liveness probe of a guest endpoint waits for the VMM's answer.
PROBE_TIMEOUT = 1.0
#: The longest answer read: "OK 4294967295\n" is 14 bytes.
MAX_REPLY = 32
#: What ``host_path`` appends to a port's path: never a path the VMM connects to.
HOST_SUFFIX = ".host"
_OK = re.compile(rb"OK ([0-9]{1,10})\n")
_SUN_PATH_MAX = 107
_MAX_PORT = 0xFFFFFFFE
_CREDS = struct.Struct("3i")
_HOST_CONTEXTS = (VMCI_WELL_KNOWN_CONTEXT_ID, VMCI_HOST_CONTEXT_ID)
_SO_ACCEPTCON = 1 << 16  # /proc/net/unix "Flags" of a listening socket
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


def unix_listening(path: str) -> bool:
    """Whether a Unix stream socket of this network namespace listens at ``path`` (the kernel's
    ``/proc/net/unix``; no connection is made)."""
    try:
        with open("/proc/net/unix", "rb") as f:
            lines = f.read().split(b"\n")[1:]
    except OSError:
        return False
    wanted = os.fsencode(path)
    for line in lines:
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7] == wanted and int(fields[3], 16) & _SO_ACCEPTCON:
            return True
    return False


class HybridTransport(StreamLinks, Transport):
    """Host endpoints behind a VMM's hybrid-vsock Unix sockets; the peers are its guest and the
    host's other processes on the same socket."""

    name = "hybrid"
    features = frozenset({"dgram", "peer-identity", "verdicts"})

    def __init__(self, core, uds_path: str, guest_cid: int = 3, *, context: Optional[int] = None):
        """``uds_path``: the VMM's socket; ``guest_cid``: its guest's CID; ``context``: None or 2
        (the host), or 1 (the well-known context, for the discovery daemon). Opens nothing yet."""
        uds_path = os.path.abspath(uds_path)
        if len(uds_path) + len("_4294967295" + HOST_SUFFIX) > _SUN_PATH_MAX:
            raise TransportUnavailable("the VMM socket path %r is too long for Unix socket paths "
                                       "with a port suffix" % uds_path)
        if not os.path.isdir(os.path.dirname(uds_path)):
            raise TransportUnavailable("the directory of the VMM socket %r does not exist" % uds_path)
        if not 2 < guest_cid < 0xFFFFFFFF:
            raise TransportUnavailable("guest CID %d is not a guest's" % guest_cid)
        if context not in (None,) + _HOST_CONTEXTS:
            raise TransportUnavailable("on the hybrid transport a process is in context 2 (the "
                                       "host) or 1 (the discovery service), not in %d" % context)
        self.uds_path = uds_path
        self.guest_cid = guest_cid
        self._cid = VMCI_HOST_CONTEXT_ID if context is None else context
        self._well_known = self._cid == VMCI_WELL_KNOWN_CONTEXT_ID
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

    def host_path(self, rid: int) -> str:
        """Where the host's processes connect to the endpoint on port ``rid``."""
        return self.port_path(rid) + HOST_SUFFIX

    # Endpoints

    def bind(self, resource: Optional[int]) -> Bound:
        rid, socks = self._bind(resource, (self.port_path, self.host_path))
        try:
            for sock in socks:
                sock.listen(socket.SOMAXCONN)
            listener = StreamListener(socks, self._identify_stream, "hybrid-%d" % rid)
        except BaseException:
            self._unlink(rid)
            for sock in socks:
                sock.close()
            raise
        try:
            account, page = self._private_account()
        except BaseException:
            self._unlink(rid)
            listener.close()
            raise
        with self._lock:
            self._bound[rid] = listener
        return Bound(VMCIHandle(self._cid, rid), listener, account, page)

    def _unlink(self, rid: int) -> None:
        for path in (self.port_path(rid), self.host_path(rid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _try_bind(self, rid: int, paths) -> Optional[List[socket.socket]]:
        """Sockets bound at ``path(rid)`` for each of ``paths``; None if a live listener holds
        any (a dead one's file is reclaimed)."""
        socks = []
        try:
            for path in paths:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                socks.append(sock)
                if not self._try_bind_path(sock, path(rid)):
                    for bound in paths[:len(socks) - 1]:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(bound(rid))
                    for s in socks:
                        s.close()
                    return None
        except BaseException:
            for s in socks:
                s.close()
            raise
        return socks

    def _try_bind_path(self, sock: socket.socket, path: str) -> bool:
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

    def _bind(self, rid: Optional[int], paths):
        """``(rid, sockets)`` bound at ``rid`` (None: the next free id) for each of ``paths``."""
        if rid is not None:
            socks = self._try_bind(rid, paths)
            if socks is None:
                raise DuplicateEntry("resource id %d is taken (%s is in use)" % (rid, self.port_path(rid)))
            return rid, socks
        with self._lock:
            rid = self._next_rid
        for _ in range(AUTO_RID_TRIES):
            socks = self._try_bind(rid, paths)
            if socks is not None:
                with self._lock:
                    self._next_rid = rid + 1 if rid < _MAX_PORT else FIRST_AUTO_RID
                return rid, socks
            rid = rid + 1 if rid < _MAX_PORT else FIRST_AUTO_RID
        raise NoResources("no free resource id in %d tries" % AUTO_RID_TRIES)

    def unbind(self, bound: Bound) -> None:
        bound.account.mark_closed()
        with self._lock:
            self._bound.pop(bound.handle.resource, None)
        self._unlink(bound.handle.resource)
        bound.listener.close()
        self._release(bound.account, bound.page)

    # Links

    def connect(self, src: VMCIHandle, dst: VMCIHandle) -> Link:
        if dst.context != self.guest_cid and dst.context not in _HOST_CONTEXTS:
            raise DstUnreachable("context %d cannot be reached through %s (its guest is %d)"
                                 % (dst.context, self.uds_path, self.guest_cid))
        if not 0 <= dst.resource <= _MAX_PORT:
            raise InvalidResource("no endpoint %s" % (tuple(dst),))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if dst.context == self.guest_cid:
                self._handshake(sock, dst)
            else:
                self._connect_host(sock, dst)
            sock.settimeout(None)
            sock.sendall(encode_hello(src.resource, self._well_known))
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

    def _connect_host(self, sock: socket.socket, dst: VMCIHandle) -> None:
        """Connect to a host endpoint's ``host_path``; InvalidResource if none listens there."""
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            sock.connect(self.host_path(dst.resource))
        except (FileNotFoundError, ConnectionRefusedError):
            raise InvalidResource("no endpoint %s on this host (%s)"
                                  % (tuple(dst), self.host_path(dst.resource))) from None
        except socket.timeout:
            raise Timeout("endpoint %s did not accept within %gs" % (tuple(dst), HANDSHAKE_TIMEOUT)) from None

    def _handshake(self, sock: socket.socket, dst: VMCIHandle, timeout: float = HANDSHAKE_TIMEOUT) -> int:
        """``CONNECT <port>`` through the VMM; the host port it answers, or a VMCIError."""
        deadline = time.monotonic() + timeout
        sock.settimeout(timeout)
        try:
            sock.connect(self.uds_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DstUnreachable("no VMM listens at %s (%s)" % (self.uds_path, exc.strerror)) from None
        except socket.timeout:
            raise Timeout("the VMM at %s did not accept within %gs" % (self.uds_path, timeout)) from None
        try:
            sock.sendall(b"CONNECT %d\n" % dst.resource)
            reply = read_reply(sock, deadline)
        except socket.timeout:
            raise Timeout("the VMM at %s did not answer CONNECT %d within %gs"
                          % (self.uds_path, dst.resource, timeout)) from None
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

    # Streams of mirrored regions and queue pairs (``mirror_link``): the guest's side only

    def listen_stream(self, resource: Optional[int]) -> Tuple[int, socket.socket]:
        """A stream listener where the VMM delivers the guest's connections to ``resource``
        (None: a fresh id), in the id space of this transport's endpoints."""
        rid, (sock,) = self._bind(resource, (self.port_path,))
        try:
            sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.port_path(rid))
            raise
        return rid, sock

    def connect_stream(self, dst: VMCIHandle, timeout: float) -> socket.socket:
        """A stream to the guest's listener ``dst`` through the VMM; a VMCIError otherwise."""
        if dst.context != self.guest_cid:
            raise DstUnreachable("on the hybrid transport mirrored regions and queue pairs reach "
                                 "the guest (%d) only, not context %d" % (self.guest_cid, dst.context))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._handshake(sock, dst, timeout)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock

    def stream_peer_context(self, sock: socket.socket) -> Optional[int]:
        """The context of the peer of a stream ``listen_stream`` accepted: the guest's."""
        return None if sock.getsockname().endswith(HOST_SUFFIX) else self.guest_cid

    # Identity

    def _identify_stream(self, conn: socket.socket, hello: Tuple[bool, int]) -> Optional[Peer]:
        well_known, rid = hello
        if not conn.getsockname().endswith(HOST_SUFFIX):  # the kernel's word: where it arrived
            return None if well_known else Peer(VMCIHandle(self.guest_cid, rid), 0, None)
        pid, uid, _ = _CREDS.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
        if uid != os.getuid():
            return None
        context = VMCI_WELL_KNOWN_CONTEXT_ID if well_known else VMCI_HOST_CONTEXT_ID
        return Peer(VMCIHandle(context, rid), pid, uid)

    def _stream_listeners(self):
        with self._lock:
            return list(self._bound.values())

    def identify(self, conn, dst: VMCIHandle) -> Optional[Peer]:
        return self._stream_peer(conn)

    # Introspection

    def endpoint_alive(self, handle: VMCIHandle) -> bool:
        """Whether an endpoint listens at ``handle``: ours, another host process's (on this VMM
        socket; contexts 1 and 2 share its ports) or the guest's (probed through the VMM)."""
        if handle.context == self.guest_cid:
            return self._guest_listening(handle.resource)
        if handle.context not in _HOST_CONTEXTS or not 0 <= handle.resource <= _MAX_PORT:
            return False
        with self._lock:
            if handle.context == self._cid and handle.resource in self._bound:
                return True
        return unix_listening(self.host_path(handle.resource))

    resource_alive = endpoint_alive

    def _guest_listening(self, port: int) -> bool:
        """Probe the guest's ``port`` through the VMM (see the module docstring)."""
        if not 0 <= port <= _MAX_PORT:
            return False
        with self._lock:
            ours = next(iter(self._bound), None)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._handshake(sock, VMCIHandle(self.guest_cid, port), PROBE_TIMEOUT)
            if ours is not None:
                sock.sendall(encode_hello(ours, self._well_known))
            return True
        except (InvalidResource, DstUnreachable):
            return False
        except (Timeout, OSError):
            return True  # unknown is not gone
        finally:
            sock.close()


__all__ = ["HybridTransport", "HANDSHAKE_TIMEOUT", "HOST_SUFFIX", "PROBE_TIMEOUT", "parse_reply",
           "read_reply", "unix_listening"]
