"""AF_VSOCK stood in for by AF_UNIX, in the test process only (the Python side of
``tests/c/vsock_emulation.c``: same paths, same variables, so Python and C endpoints meet).

This machine's AF_VSOCK leads to a hypervisor host that is not ours, so host tests never create a
real AF_VSOCK socket: ``install`` replaces the vsock transport's socket factory
(``transport.vsock._vsock_socket``) and its local-CID reading, and makes ``socket.socket`` refuse
AF_VSOCK outright, so a path that slipped past the factory fails instead of leaving the machine.

A kernel of CID ``$VSOCK_EMU_CID`` (default 1; read when a socket is made). Port P of CID C is
the AF_UNIX path ``$VSOCK_EMU_DIR/c<C>p<P>`` for SEQPACKET and STREAM sockets, and
``$VSOCK_EMU_DIR/c<C>p<P>.d`` (an AF_UNIX SOCK_DGRAM socket) for DGRAM ones, which exist only with
``$VSOCK_EMU_DGRAM=1`` (else ``socket()`` fails with ENODEV, as under virtio and vsock_loopback).
CID 1 is the own kernel; a kernel of CID 1 reaches only CIDs 1 and 2 (both itself), any other
kernel every CID from 2 up; other CIDs fail with ENETUNREACH. A connect to a port nobody listens
on fails with ECONNRESET (vsock_loopback), a datagram to a port nobody holds with EHOSTUNREACH
(vmci_transport's errno for VMCI_ERROR_INVALID_RESOURCE). ``sendto`` of an unbound DGRAM socket
first binds it to an ephemeral port of its CID, as the kernel auto-binds; ``recvfrom``,
``recvmsg_into``, ``getpeername`` map paths back to ``(cid, port)``; ``getsockname`` gives
``(VMADDR_CID_ANY, port)``, as the kernel does for a socket bound to the any-CID. Binding a port
<= 1023 needs CAP_NET_BIND_SERVICE (``has_bind_capability``, which tests may replace).
"""
import errno
import itertools
import os
import re
import socket

from vsockcompat.constants import (AF_VSOCK, VMADDR_CID_ANY, VMADDR_CID_HOST, VMADDR_CID_LOCAL,
                                   VMADDR_PORT_ANY)
from vsockcompat.constants import VMCI_RESERVED_RESOURCE_ID_MAX as LAST_RESERVED_PORT

CAP_NET_BIND_SERVICE = 10
_PATH = re.compile(r"c([0-9]+)p([0-9]+)(\.d)?")
_ephemeral = itertools.count()
_real_socket = socket.socket


def emu_cid() -> int:
    cid = os.environ.get("VSOCK_EMU_CID")
    return int(cid) if cid else VMADDR_CID_LOCAL


def has_bind_capability() -> bool:
    """Whether this process holds CAP_NET_BIND_SERVICE (the kernel's check for ports <= 1023)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_BIND_SERVICE & 1)
    return False


def reach(cid: int) -> int:
    """The kernel a destination CID leads to (0: none)."""
    own = emu_cid()
    if cid in (VMADDR_CID_LOCAL, own):
        return own
    if own == VMADDR_CID_LOCAL:
        return own if cid == VMADDR_CID_HOST else 0
    return cid if VMADDR_CID_HOST <= cid < VMADDR_CID_ANY else 0


class StandinSocket:
    """An AF_VSOCK socket of one type, made of an AF_UNIX socket of that type."""

    family = AF_VSOCK

    def __init__(self, kind: int = socket.SOCK_SEQPACKET, _sock=None):
        directory = os.environ.get("VSOCK_EMU_DIR")
        if not directory:
            raise OSError(errno.EAFNOSUPPORT, "AF_VSOCK is stood in for only with VSOCK_EMU_DIR")
        self.type = kind & 0xF
        if _sock is None and self.type == socket.SOCK_DGRAM and os.environ.get("VSOCK_EMU_DGRAM") != "1":
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        self._dir = directory
        self._cid = emu_cid()
        self._sock = _sock if _sock is not None else _real_socket(socket.AF_UNIX, kind)
        self._path = None

    def __getattr__(self, name):  # fileno, setblocking, settimeout, recv, send, shutdown, ...
        if name == "_sock":
            raise AttributeError(name)
        return getattr(self._sock, name)

    def _path_of(self, cid: int, port: int) -> str:
        suffix = ".d" if self.type == socket.SOCK_DGRAM else ""
        return os.path.join(self._dir, "c%dp%d%s" % (cid, port, suffix))

    @staticmethod
    def address_of(path) -> tuple:
        """The ``(cid, port)`` behind a stand-in path (unknown: ``(ANY, PORT_ANY)``)."""
        match = _PATH.fullmatch(os.path.basename(path)) if isinstance(path, str) and path else None
        return (int(match.group(1)), int(match.group(2))) if match else (VMADDR_CID_ANY, VMADDR_PORT_ANY)

    def bind(self, address) -> None:
        cid, port = address
        if cid not in (VMADDR_CID_ANY, self._cid):
            raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
        if port == VMADDR_PORT_ANY:
            self._bind_ephemeral()
            return
        if port <= LAST_RESERVED_PORT and not has_bind_capability():
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        self._bind_path(self._path_of(self._cid, port))

    def _bind_path(self, path: str) -> None:
        self._sock.bind(path)  # EADDRINUSE while the path exists: ``close`` removes it
        self._path = path

    def _bind_ephemeral(self) -> None:
        while True:
            port = 0x40000000 + (os.getpid() & 0xFFFF) * 0x1000 + (next(_ephemeral) & 0xFFF)
            try:
                self._bind_path(self._path_of(self._cid, port))
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise

    def _target(self, address) -> str:
        cid, port = address
        peer = reach(cid)
        if peer == 0:
            raise OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))
        return self._path_of(peer, port)

    def connect(self, address) -> None:
        target = self._target(address)
        if self._path is None:
            self._bind_ephemeral()
        try:
            self._sock.connect(target)
        except (FileNotFoundError, ConnectionRefusedError):
            raise OSError(errno.ECONNRESET, os.strerror(errno.ECONNRESET)) from None

    def sendto(self, data, flags_or_address, address=None) -> int:
        flags, address = (0, flags_or_address) if address is None else (flags_or_address, address)
        target = self._target(address)
        if self._path is None:
            self._bind_ephemeral()
        try:
            return self._sock.sendto(data, flags, target)
        except (FileNotFoundError, ConnectionRefusedError):
            raise OSError(errno.EHOSTUNREACH, os.strerror(errno.EHOSTUNREACH)) from None

    def recvfrom(self, size: int, flags: int = 0):
        data, path = self._sock.recvfrom(size, flags)
        return data, self.address_of(path)

    def recvmsg_into(self, buffers, ancbufsize: int = 0, flags: int = 0):
        n, ancdata, msg_flags, path = self._sock.recvmsg_into(buffers, ancbufsize, flags)
        return n, ancdata, msg_flags, self.address_of(path)

    def getsockname(self):
        return VMADDR_CID_ANY, self.address_of(self._path)[1]

    def getpeername(self):
        return self.address_of(self._sock.getpeername())

    def accept(self):
        conn, _ = self._sock.accept()
        wrapped = StandinSocket(self.type, _sock=conn)
        return wrapped, wrapped.getpeername()

    def close(self) -> None:
        if self._path is not None and self._sock.fileno() >= 0:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def standin_socket(kind: int = socket.SOCK_SEQPACKET) -> StandinSocket:
    """The stand-in for ``transport.vsock._vsock_socket``."""
    return StandinSocket(kind | socket.SOCK_CLOEXEC)


class _NoVsock(_real_socket):
    """``socket.socket`` that refuses AF_VSOCK (and records the attempt)."""

    attempts = []

    def __init__(self, family=-1, *args, **kwargs):
        if family == AF_VSOCK:
            _NoVsock.attempts.append((family, args, kwargs))
            raise OSError(errno.EAFNOSUPPORT, "real AF_VSOCK refused on the host by the stand-in")
        super().__init__(family, *args, **kwargs)


def install(monkeypatch, directory: str, cid: int = 2, dgram: bool = True) -> list:
    """Stand in for AF_VSOCK for the rest of the test; returns the list of real AF_VSOCK
    attempts (which must stay empty)."""
    from vsockcompat.transport import vsock as vsock_module

    monkeypatch.setenv("VSOCK_EMU_DIR", directory)
    monkeypatch.setenv("VSOCK_EMU_CID", str(cid))
    monkeypatch.setenv("VSOCK_EMU_DGRAM", "1" if dgram else "0")
    _NoVsock.attempts = []
    monkeypatch.setattr(socket, "socket", _NoVsock)
    monkeypatch.setattr(vsock_module, "_vsock_socket", standin_socket)
    monkeypatch.setattr(vsock_module, "read_local_cid", lambda device=None: emu_cid())
    return _NoVsock.attempts


def installed() -> bool:
    """Whether the vsock transport's sockets are stand-ins and real AF_VSOCK is refused."""
    from vsockcompat.transport import vsock as vsock_module

    return vsock_module._vsock_socket is standin_socket and socket.socket is _NoVsock
