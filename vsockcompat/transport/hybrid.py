"""The ``hybrid`` transport: the host side of VMMs' "hybrid vsock" (``VSOCKCOMPAT_TRANSPORT=hybrid``).

Firecracker, Cloud Hypervisor and QEMU with vhost-user-vsock (``vhost-device-vsock``) give a
guest a virtio-vsock device whose host end is not the host kernel's AF_VSOCK but Unix sockets
of the VMM, named by one path per guest. One transport serves several such sockets
(``VSOCKCOMPAT_HYBRID_UDS=a:b``, with the guest CID behind each, ``VSOCKCOMPAT_HYBRID_CID=3:4``),
each a ``VMMSocket`` ``(uds_path, guest_cid)``; guest CIDs are distinct, and a connection to a
guest goes through the socket of its CID:

* host -> guest: connect to ``uds_path``, send ``CONNECT <port>\\n``, read ``OK <hostport>\\n``;
  the connection is then a stream to the guest's vsock port ``<port>`` (the guest sees the peer
  as ``(2, <hostport>)``). A VMM that closes instead of answering says the guest refused
  (``InvalidResource``); an answer that is not ``OK <decimal>\\n`` is ``DstUnreachable``; no
  answer within ``HANDSHAKE_TIMEOUT`` seconds is ``Timeout``. A CID behind none of the sockets
  is ``DstUnreachable`` at once.
* guest -> host: a guest's ``connect((2, <port>))`` reaches the Unix listener at
  ``<uds_path>_<port>``: an endpoint with resource id ``<port>`` listens there on every socket
  (a ``ListenerSet`` for regions and queue pairs), so each guest reaches it.

This uses AF_UNIX only: no AF_VSOCK socket is ever created here. The one peer behind a VMM socket
is its guest, whose CID is configuration, as it is for the VMM: the VMM alone connects to
``<uds_path>_<port>`` and only for its guest, so a peer arriving there is in that socket's CID,
never in what a frame or a hello says.

The host's own contexts
-----------------------

Endpoints are in context 2 (the host), or in the well-known context 1 when the transport is
opened with ``context=1`` (the runtime's ``cid`` setting is 1, as the discovery daemon's is):
the guest reaches context 1 at CID 2, so the daemon's ``(1, 1)`` listens at ``<uds_path>_1``.
Host processes reach each other, and the daemon, without the VMM: every endpoint also listens
at ``<uds_path>_<port>.host`` (``host_path``) of every socket, a path the VMM never connects to
(it only appends a decimal port). So the path a connection arrived on, which the kernel reports
(``getsockname``), decides who the peer is:

* at ``<uds_path>_<port>``: the guest of that socket; a hello claiming the well-known
  context ("VSW1") is refused: a guest cannot be context 1, nor the host;
* at ``<uds_path>_<port>.host``: a host process, which must run as this user
  (``SO_PEERCRED``); context 1 if its hello says so, else 2 (as on vsock, where only the
  host's own kernel may claim context 1). Its pid is the kernel's, so the discovery daemon
  ties a host registration to its process as on the local transport.

A link to context 1 or 2 connects to the destination's ``host_path`` on the first socket where
one listens (so processes configured with different subsets of the sockets still meet), and
sends the hello; a link to a guest goes through its VMM; any other context is
``DstUnreachable``. Mirrored regions and streamed queue pairs (``mirror_link``) use plain
streams (no hello; their own HELLO frame carries the attacher's context): the owner's
``ListenerSet`` at ``<uds_path>_<rid>`` and ``<uds_path>_<rid>.host`` of every socket
(``listen_stream``); the host's connection to a guest goes through the guest's VMM, to another
host process to its ``host_path`` (``connect_stream``). Host processes share a kernel, yet
their regions are mirrored too rather than POSIX shared memory: one region is then one thing
whoever attaches (guests and host processes alike, one creator serving all, one id space with
the endpoints), as a host region of the SDK is one region for every context. The peer of such
a stream is judged as a datagram link's: at (or to) a ``host_path``, a process of this user
(``SO_PEERCRED``), in the host context its HELLO names (1 or 2, nothing else).

Streams carry the vsock transport's stream mode (``transport.vsock``): the 8-byte hello, then
frames back to back; the guest must run the vsock transport with ``VSOCKCOMPAT_VSOCK_MODE=stream``
(these devices have no SEQPACKET). A guest's hello claiming the well-known context is refused.
Verdicts flow back on each stream as they do over vsock, so the guest and the host each learn
when the other denies them DG_SEND.

Claiming a port: the files ``<uds_path>_<port>`` and ``<uds_path>_<port>.host`` of every socket
are the host's port namespace, shared by all the processes given those sockets, with no kernel to
hand ports out. A process claims a port (an endpoint's or a stream listener's) by binding all its
paths and listening there; a file where nothing listens is a dead claim's, and is reclaimed. So
that a claim in progress (bound, not yet listening) is never taken for a dead one, claims are
serialised: a process claims while it holds ``flock`` on each directory of the VMM sockets (the
directory itself: no lock file), taken in one order by all, and listens before it lets go.
Without it two programs starting at once both got port 1024, one of them deaf.

Liveness (``endpoint_alive``, which the discovery daemon uses to drop the entries of endpoints
that are gone): a host endpoint is alive while a Unix socket listens at one of its
``host_path`` files (``/proc/net/unix``, no traffic). A guest endpoint is probed through its VMM:
``CONNECT <port>`` answered ``OK`` is alive (the probe then sends a hello of one of our
endpoints and closes, so the guest sees a link that ends, not a refused connection); a VMM that
closes, or that is gone, says it is not; no answer within ``PROBE_TIMEOUT`` seconds counts as
alive.
"""
import contextlib
import errno
import fcntl
import os
import re
import select
import socket
import struct
import threading
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from ..constants import (HYBRID_CLAIM_TIMEOUT_MS, HYBRID_HANDSHAKE_TIMEOUT_MS, HYBRID_MAX_REPLY,
                         VMCI_HOST_CONTEXT_ID, VMCI_WELL_KNOWN_CONTEXT_ID)
from ..errors import DstUnreachable, DuplicateEntry, InvalidResource, NoResources, Timeout
from ..handles import VMCIHandle
from .base import Bound, Link, Peer, Transport, TransportUnavailable
from .streams import StreamLinks, StreamListener, encode_hello
from .vsock import FIRST_AUTO_RID, _link_error

#: Seconds the VMM has to answer ``CONNECT <port>``.
HANDSHAKE_TIMEOUT = HYBRID_HANDSHAKE_TIMEOUT_MS / 1000
#: Seconds a liveness probe of a guest endpoint waits for the VMM's answer.
PROBE_TIMEOUT = 1.0
#: The longest answer read: "OK 4294967295\n" is 14 bytes.
MAX_REPLY = HYBRID_MAX_REPLY
#: What ``host_path`` appends to a port's path: never a path the VMM connects to.
HOST_SUFFIX = ".host"
#: Seconds a claim of a port waits for the claim lock (held for microseconds by each claimer).
CLAIM_TIMEOUT = HYBRID_CLAIM_TIMEOUT_MS / 1000
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


def _peer_creds(sock: socket.socket) -> Tuple[int, int]:
    """``(pid, uid)`` of the process at the other end of a Unix stream (``SO_PEERCRED``)."""
    pid, uid, _ = _CREDS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
    return pid, uid


class VMMSocket(NamedTuple):
    """One VMM's hybrid-vsock Unix socket and the CID of the guest behind it."""

    uds_path: str
    guest_cid: int

    def port_path(self, rid: int) -> str:
        """Where this VMM delivers its guest's connections to host port ``rid``."""
        return "%s_%d" % (self.uds_path, rid)

    def host_path(self, rid: int) -> str:
        """Where the host's processes connect to the endpoint on port ``rid`` (this socket's)."""
        return self.port_path(rid) + HOST_SUFFIX


class ListenerSet:
    """Listening stream sockets of one port, one per VMM socket, used as one listening socket
    (for ``mirror_link``): ``fileno()`` is readable while any has a connection waiting (an
    epoll descriptor), ``accept()`` takes the next from whichever has one (``BlockingIOError``
    when none has, in non-blocking mode), ``close()`` closes them all. ``paths`` are the paths
    they are bound at; the set does not unlink them."""

    def __init__(self, socks: List[socket.socket], paths: Tuple[str, ...]):
        self.socks = tuple(socks)
        self.paths = paths
        self._blocking = True
        self._epoll = select.epoll()
        try:
            for sock in self.socks:
                sock.setblocking(False)
                self._epoll.register(sock.fileno(), select.EPOLLIN)
        except BaseException:
            self._epoll.close()
            raise

    def fileno(self) -> int:
        return self._epoll.fileno()

    def setblocking(self, flag: bool) -> None:
        self._blocking = bool(flag)

    def accept(self):
        """``(conn, address)`` of the next waiting connection."""
        while True:
            for sock in self.socks:
                try:
                    return sock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
            if not self._blocking:
                raise BlockingIOError(errno.EAGAIN, "no connection waits")
            self._epoll.poll()

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self._epoll.close()


class HybridTransport(StreamLinks, Transport):
    """Host endpoints behind VMMs' hybrid-vsock Unix sockets; the peers are their guests and the
    host's other processes."""

    name = "hybrid"
    features = frozenset({"dgram", "peer-identity", "verdicts"})

    def __init__(self, core, guests: Sequence[Tuple[str, int]], *, context: Optional[int] = None):
        """``guests``: the VMM sockets, ``(uds_path, guest_cid)`` pairs with distinct CIDs and
        paths; ``context``: None or 2 (the host), or 1 (the well-known context, for the
        discovery daemon). Opens nothing yet; raises TransportUnavailable for what cannot work."""
        if not guests:
            raise TransportUnavailable("the hybrid transport needs at least one VMM socket")
        vmms = tuple(VMMSocket(os.path.abspath(uds), cid) for uds, cid in guests)
        for vmm in vmms:
            if len(vmm.uds_path) + len("_4294967295" + HOST_SUFFIX) > _SUN_PATH_MAX:
                raise TransportUnavailable("the VMM socket path %r is too long for Unix socket "
                                           "paths with a port suffix" % vmm.uds_path)
            if not os.path.isdir(os.path.dirname(vmm.uds_path)):
                raise TransportUnavailable("the directory of the VMM socket %r does not exist"
                                           % vmm.uds_path)
            if not 2 < vmm.guest_cid < 0xFFFFFFFF:
                raise TransportUnavailable("guest CID %d is not a guest's" % vmm.guest_cid)
        self._by_cid = {vmm.guest_cid: vmm for vmm in vmms}
        self._by_uds = {vmm.uds_path: vmm for vmm in vmms}
        if len(self._by_cid) != len(vmms) or len(self._by_uds) != len(vmms):
            raise TransportUnavailable("each VMM socket needs a path and a guest CID of its own: %s"
                                       % ", ".join("%s=%d" % vmm for vmm in vmms))
        if context not in (None,) + _HOST_CONTEXTS:
            raise TransportUnavailable("on the hybrid transport a process is in context 2 (the "
                                       "host) or 1 (the discovery service), not in %d" % context)
        self.vmms = vmms
        self._dirs = tuple(sorted({os.path.dirname(vmm.uds_path) for vmm in vmms}))
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

    @property
    def guest_cids(self) -> Tuple[int, ...]:
        """The CIDs of the guests behind the VMM sockets, in their order."""
        return tuple(vmm.guest_cid for vmm in self.vmms)

    def port_paths(self, rid: int) -> Tuple[str, ...]:
        """Where the VMMs deliver their guests' connections to host port ``rid``."""
        return tuple(vmm.port_path(rid) for vmm in self.vmms)

    def host_paths(self, rid: int) -> Tuple[str, ...]:
        """Where the host's processes connect to the endpoint on port ``rid``."""
        return tuple(vmm.host_path(rid) for vmm in self.vmms)

    def _vmm(self, dst: VMCIHandle, what: str) -> VMMSocket:
        """The VMM socket of the guest ``dst.context``; DstUnreachable if there is none."""
        vmm = self._by_cid.get(dst.context)
        if vmm is None:
            raise DstUnreachable("context %d cannot be reached: %s reach guests %s only"
                                 % (dst.context, what, ", ".join(map(str, self.guest_cids))))
        return vmm

    # Endpoints

    def bind(self, resource: Optional[int]) -> Bound:
        rid, socks = self._bind(resource, self.stream_paths)
        try:
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
        for path in self.port_paths(rid) + self.host_paths(rid):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _try_bind(self, paths: Tuple[str, ...]) -> Optional[List[socket.socket]]:
        """Sockets bound and listening at each of ``paths``; None if a live listener holds any
        (a dead one's file is reclaimed). Call while ``_claim_lock`` is held."""
        socks: List[socket.socket] = []
        bound = 0  # paths[:bound] are ours
        try:
            for path in paths:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                socks.append(sock)
                if not self._try_bind_path(sock, path):
                    break
                bound += 1
            else:
                for sock in socks:
                    sock.listen(socket.SOMAXCONN)
                return socks
        except BaseException:
            self._abandon(socks, paths[:bound])
            raise
        self._abandon(socks, paths[:bound])
        return None

    @staticmethod
    def _abandon(socks: List[socket.socket], paths: Tuple[str, ...]) -> None:
        """Close ``socks`` and remove ``paths``, the files of a claim that failed."""
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for sock in socks:
            sock.close()

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
        """Whether something listens at ``path`` (a connection attempt: it works across network
        namespaces, unlike ``unix_listening``). Never blocks, as it runs under the claim lock:
        a listener whose backlog is full (EAGAIN) is alive."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            probe.connect(path)
            return True
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            probe.close()

    @contextlib.contextmanager
    def _claim_lock(self):
        """Hold ``flock`` on every directory of the VMM sockets, in (device, inode) order, so
        that no other process claims a port meanwhile (see "Claiming a port"). Timeout after
        ``CLAIM_TIMEOUT`` seconds if a claimer holds one that long (stopped, say)."""
        fds: Dict[Tuple[int, int], int] = {}
        try:
            for directory in self._dirs:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) in fds:  # one directory by two names: one lock
                    os.close(fd)
                else:
                    fds[(st.st_dev, st.st_ino)] = fd
            deadline = time.monotonic() + CLAIM_TIMEOUT
            for key in sorted(fds):
                pause = 0.001
                while True:
                    try:
                        fcntl.flock(fds[key], fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise Timeout("another process has been claiming a port in %s for %gs"
                                          % (", ".join(self._dirs), CLAIM_TIMEOUT)) from None
                        time.sleep(pause)
                        pause = min(pause * 2, 0.05)
            yield
        finally:
            for fd in fds.values():
                os.close(fd)  # releases its flock

    def _bind(self, rid: Optional[int], paths: Callable[[int], Tuple[str, ...]]):
        """``(rid, sockets)`` bound and listening at each of ``paths(rid)`` (None: the next
        free id), claimed under ``_claim_lock``."""
        with self._claim_lock():
            return self._bind_locked(rid, paths)

    def _bind_locked(self, rid: Optional[int], paths: Callable[[int], Tuple[str, ...]]):
        if rid is not None:
            socks = self._try_bind(paths(rid))
            if socks is None:
                raise DuplicateEntry("resource id %d is taken (%s is in use)"
                                     % (rid, " or ".join(paths(rid))))
            return rid, socks
        with self._lock:
            rid = self._next_rid
        for _ in range(AUTO_RID_TRIES):
            socks = self._try_bind(paths(rid))
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
        vmm = None if dst.context in _HOST_CONTEXTS else self._vmm(dst, "these VMM sockets")
        if not 0 <= dst.resource <= _MAX_PORT:
            raise InvalidResource("no endpoint %s" % (tuple(dst),))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if vmm is not None:
                self._handshake(sock, vmm, dst)
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

    def _connect_host(self, sock: socket.socket, dst: VMCIHandle,
                      timeout: Optional[float] = None) -> None:
        """Connect to a host endpoint at the first of its ``host_paths`` that accepts within
        ``timeout`` (None: ``HANDSHAKE_TIMEOUT``); InvalidResource if none listens."""
        timeout = HANDSHAKE_TIMEOUT if timeout is None else timeout
        sock.settimeout(timeout)
        for path in self.host_paths(dst.resource):
            try:
                sock.connect(path)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                continue
            except socket.timeout:
                raise Timeout("endpoint %s did not accept within %gs"
                              % (tuple(dst), timeout)) from None
        raise InvalidResource("no endpoint %s on this host (%s)"
                              % (tuple(dst), " or ".join(self.host_paths(dst.resource))))

    @staticmethod
    def _handshake(sock: socket.socket, vmm: VMMSocket, dst: VMCIHandle,
                   timeout: float = HANDSHAKE_TIMEOUT) -> int:
        """``CONNECT <port>`` through ``vmm``; the host port it answers, or a VMCIError."""
        uds = vmm.uds_path
        deadline = time.monotonic() + timeout
        sock.settimeout(timeout)
        try:
            sock.connect(uds)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DstUnreachable("no VMM listens at %s (%s)" % (uds, exc.strerror)) from None
        except socket.timeout:
            raise Timeout("the VMM at %s did not accept within %gs" % (uds, timeout)) from None
        try:
            sock.sendall(b"CONNECT %d\n" % dst.resource)
            reply = read_reply(sock, deadline)
        except socket.timeout:
            raise Timeout("the VMM at %s did not answer CONNECT %d within %gs"
                          % (uds, dst.resource, timeout)) from None
        except (ConnectionResetError, BrokenPipeError):
            reply = b""
        if not reply:
            raise InvalidResource("no endpoint %s: the VMM at %s closed the connection instead of "
                                  "answering CONNECT %d" % (tuple(dst), uds, dst.resource))
        port = parse_reply(reply)
        if port is None:
            raise DstUnreachable("the VMM at %s answered CONNECT %d with %r, not OK <port>"
                                 % (uds, dst.resource, reply))
        return port

    # Streams of mirrored regions and queue pairs (``mirror_link``)

    def stream_paths(self, rid: int) -> Tuple[str, ...]:
        """Where a stream endpoint on port ``rid`` listens: for the guests and for the host."""
        return self.port_paths(rid) + self.host_paths(rid)

    def listen_stream(self, resource: Optional[int]) -> Tuple[int, ListenerSet]:
        """A listener where every VMM delivers its guest's connections to ``resource`` (None: a
        fresh id), and where the host's processes connect (``host_path``), in the id space of
        this transport's endpoints."""
        rid, socks = self._bind(resource, self.stream_paths)
        try:
            return rid, ListenerSet(socks, self.stream_paths(rid))
        except BaseException:
            for sock in socks:
                sock.close()
            self._unlink(rid)
            raise

    def connect_stream(self, dst: VMCIHandle, timeout: float) -> socket.socket:
        """A stream to the listener ``dst``: a guest's through its VMM, a host process's
        (context 1 or 2) at its ``host_path``; a VMCIError otherwise (InvalidResource when
        nothing listens there)."""
        host = dst.context in _HOST_CONTEXTS
        vmm = None if host else self._vmm(dst, "on the hybrid transport mirrored regions and queue pairs")
        if not 0 <= dst.resource <= _MAX_PORT:
            raise InvalidResource("no endpoint %s" % (tuple(dst),))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if host:
                self._connect_host(sock, dst, timeout)
            else:
                self._handshake(sock, vmm, dst, timeout)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock

    def arrival_cid(self, sock: socket.socket) -> Optional[int]:
        """The guest CID of a connection a VMM delivered at ``<uds_path>_<port>`` (the kernel's
        ``getsockname``), or None when it arrived elsewhere (a ``host_path``, say)."""
        uds, sep, port = sock.getsockname().rpartition("_")
        vmm = self._by_uds.get(uds) if sep and port.isdigit() else None
        return None if vmm is None else vmm.guest_cid

    def stream_peer_context(self, sock: socket.socket, claimed: Optional[int] = None) -> Optional[int]:
        """The context at the other end of a stream, or None if ``claimed`` (what its HELLO
        says) is not believed: the guest of a stream ``listen_stream`` accepted from a VMM, or
        ``connect_stream`` made through one; for a stream at (or to) a ``host_path``, ``claimed``
        if it is a host context and the process there runs as this user (``SO_PEERCRED``)."""
        cid = self.arrival_cid(sock)
        if cid is not None:
            return cid
        peer = sock.getpeername()
        vmm = self._by_uds.get(peer)
        if vmm is not None:
            return vmm.guest_cid
        if not (sock.getsockname().endswith(HOST_SUFFIX) or peer.endswith(HOST_SUFFIX)):
            return None
        if claimed not in _HOST_CONTEXTS or _peer_creds(sock)[1] != os.getuid():
            return None
        return claimed

    # Identity

    def _identify_stream(self, conn: socket.socket, hello: Tuple[bool, int]) -> Optional[Peer]:
        well_known, rid = hello
        if not conn.getsockname().endswith(HOST_SUFFIX):  # the kernel's word: where it arrived
            cid = self.arrival_cid(conn)
            return None if well_known or cid is None else Peer(VMCIHandle(cid, rid), 0, None)
        pid, uid = _peer_creds(conn)
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
        """Whether an endpoint listens at ``handle``: ours, another host process's (contexts 1
        and 2 share the host's ports) or a guest's (probed through its VMM)."""
        vmm = self._by_cid.get(handle.context)
        if vmm is not None:
            return self._guest_listening(vmm, handle.resource)
        if handle.context not in _HOST_CONTEXTS or not 0 <= handle.resource <= _MAX_PORT:
            return False
        with self._lock:
            if handle.context == self._cid and handle.resource in self._bound:
                return True
        return any(unix_listening(path) for path in self.host_paths(handle.resource))

    resource_alive = endpoint_alive

    def _guest_listening(self, vmm: VMMSocket, port: int) -> bool:
        """Probe the guest's ``port`` through its VMM (see the module docstring)."""
        if not 0 <= port <= _MAX_PORT:
            return False
        with self._lock:
            ours = next(iter(self._bound), None)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._handshake(sock, vmm, VMCIHandle(vmm.guest_cid, port), PROBE_TIMEOUT)
            if ours is not None:
                sock.sendall(encode_hello(ours, self._well_known))
            return True
        except (InvalidResource, DstUnreachable):
            return False
        except (Timeout, OSError):
            return True  # unknown is not gone
        finally:
            sock.close()


__all__ = ["HybridTransport", "ListenerSet", "VMMSocket", "HANDSHAKE_TIMEOUT", "HOST_SUFFIX",
           "PROBE_TIMEOUT", "parse_reply", "read_reply", "unix_listening"]
