"""Stream endpoints named by a handle, for mirrored regions and streamed queue pairs.

Which mode a runtime uses (``VSOCKCOMPAT_SHM_MODE``): ``shared`` is POSIX shared memory
(one kernel only), ``mirrored`` carries regions and queue pairs over streams,
``auto`` (the default) is ``shared`` where the transport has shared memory (local)
and ``mirrored`` elsewhere (vsock).

Naming of a stream endpoint of kind ``suffix`` (``.mir`` regions, ``.qst`` queue pairs):

- local transport: the owner holds ``c<cid>/<rid><suffix>`` flock'ed for its life (so
  the id is taken exactly while it lives, and a dead owner's files are reclaimed by
  the next allocation) and listens on ``AF_UNIX`` ``SOCK_STREAM`` at
  ``c<cid>/<rid><suffix>.sock``;
- vsock transport: the owner listens on ``AF_VSOCK`` ``SOCK_STREAM`` at
  ``(VMADDR_CID_ANY, rid)``; the handle is ``(local cid, rid)`` and a peer connects to
  ``(cid, rid)``. The port space is the one datagram endpoints bind in, so a handle
  names one thing. Used only when the runtime's transport is ``vsock``;
- hybrid transport (the host side of VMMs' Unix sockets): the owner listens on
  ``AF_UNIX`` at ``<uds>_<rid>`` of every VMM socket (a ``ListenerSet``), where each VMM
  delivers its guest's connections to host port ``rid`` (so a guest reaches ``(2, rid)`` as
  over vsock); the peer is the guest of the socket it came through (``transport.hybrid``).
  The host reaches a guest's endpoints through that guest's VMM (``CONNECT <rid>``). The
  host's processes reach each other's at ``<uds>_<rid>.host`` (mirrored too, so a host
  region is one region for the guests and the host's processes alike).
"""
import contextlib
import errno
import fcntl
import functools
import os
import socket
from typing import Optional

from .constants import SO_VM_SOCKETS_BUFFER_MAX_SIZE, SO_VM_SOCKETS_BUFFER_SIZE
from .errors import (DstUnreachable, DuplicateEntry, InvalidResource, NoAccess, NoResources,
                     NotFound, Timeout, Unavailable)
from .handles import VMCIHandle
from .runtime import Runtime
from .transport.pieces import piece_for

AF_VSOCK = 40
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_LOCAL = 1
FIRST_AUTO_RID = 1024
AUTO_RID_TRIES = 65536
#: Seconds a connect may take.
CONNECT_TIMEOUT = 10.0
REGION, QUEUE_PAIR = ".mir", ".qst"
_KINDS = {REGION: "sharedmem", QUEUE_PAIR: "queuepair"}  # as access control names them

_STREAM = socket.SOCK_STREAM | socket.SOCK_CLOEXEC
_GONE = (errno.ECONNREFUSED, errno.ECONNRESET, errno.ENOENT, errno.ENOTCONN, errno.EPIPE)
_UNREACHABLE = (errno.EHOSTUNREACH, errno.ENODEV, errno.ENETUNREACH, errno.EADDRNOTAVAIL)


def mirrored(runtime: Runtime) -> bool:
    """Whether ``runtime`` carries regions and queue pairs over streams."""
    mode = getattr(runtime.settings, "shm_mode", "auto")
    if mode == "auto":
        return "shared-memory" not in runtime.transport.features
    return mode == "mirrored"


def _is_local(transport) -> bool:
    return hasattr(transport, "add_resource_kind")


def _is_hybrid(transport) -> bool:
    return hasattr(transport, "listen_stream")


def _alive(marker: str) -> bool:
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def register_kinds(transport) -> None:
    """Teach the local transport's id allocation about stream endpoints."""
    if _is_local(transport):
        for suffix in (REGION, QUEUE_PAIR):
            transport.add_resource_kind(suffix, _alive)


class Listener:
    """A listening stream endpoint at ``handle``; ``close()`` frees the handle."""

    def __init__(self, handle: VMCIHandle, sock: socket.socket, files=(), lock_fd: int = -1):
        self.handle = handle
        self.sock = sock
        self._files = files
        self._lock_fd = lock_fd
        self._on_close = None

    def close(self) -> None:
        """Stop listening. The id is free once the files are gone (local) or the port closed."""
        for path in self._files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._files = ()
        self.sock.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


def listen(runtime: Runtime, suffix: str, resource: Optional[int] = None) -> Listener:
    """Listen at ``(local cid, resource)`` (None: a fresh id >= 1024); DuplicateEntry if taken."""
    transport = runtime.transport
    if _is_local(transport):
        register_kinds(transport)
        return transport.allocate(resource, functools.partial(_listen_local, transport, suffix))
    if _is_hybrid(transport):
        rid, sock = transport.listen_stream(resource)
        listener = Listener(VMCIHandle(transport.local_cid, rid), sock, sock.paths)
    else:
        listener = _listen_vsock(transport.local_cid, resource)
    # No runtime directory to find it by: access control learns of it from us.
    access, handle = runtime.access, listener.handle
    access.own(handle, _KINDS[suffix])
    listener._on_close = lambda: access.disown(handle)
    return listener


def _listen_local(transport, suffix: str, handle: VMCIHandle) -> Listener:
    marker = transport.endpoint_path(handle) + suffix
    fd = os.open(marker, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    sock = socket.socket(socket.AF_UNIX, _STREAM)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker + ".sock")
        sock.bind(marker + ".sock")
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        os.close(fd)
        for path in (marker, marker + ".sock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise
    return Listener(handle, sock, (marker + ".sock", marker), fd)


def _listen_vsock(cid: int, resource: Optional[int]) -> Listener:
    sock = socket.socket(AF_VSOCK, _STREAM)
    try:
        rid = FIRST_AUTO_RID if resource is None else resource
        for _ in range(AUTO_RID_TRIES if resource is None else 1):
            try:
                sock.bind((VMADDR_CID_ANY, rid))
                break
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM):
                    raise NoAccess("resource id %d is a privileged vsock port" % rid) from None
                if exc.errno != errno.EADDRINUSE:
                    raise
                if resource is not None:
                    raise DuplicateEntry("resource id %d is taken in context %d" % (rid, cid)) from None
                rid = rid + 1 if rid + 1 < VMADDR_CID_ANY else FIRST_AUTO_RID
        else:
            raise NoResources("no free resource id for a stream endpoint")
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return Listener(VMCIHandle(cid, rid), sock)


def connect(runtime: Runtime, suffix: str, handle: VMCIHandle,
            timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A stream connected to the endpoint ``handle`` of kind ``suffix``, blocking with a
    ``timeout``. NotFound when nothing listens there."""
    transport = runtime.transport
    if _is_hybrid(transport):
        try:
            return transport.connect_stream(handle, timeout)
        except InvalidResource:
            raise NotFound("nothing at %s" % (tuple(handle),)) from None
    if _is_local(transport):
        family, address = socket.AF_UNIX, transport.endpoint_path(handle) + suffix + ".sock"
    else:
        family, address = AF_VSOCK, (handle.context, handle.resource)
    sock = socket.socket(family, _STREAM)
    name = None
    try:
        sock.settimeout(timeout)
        if family == socket.AF_UNIX:
            # Bound in our context's directory, so the owner learns our context from the kernel.
            name = transport.bind_in_context(sock, "stream")
        sock.connect(address)
    except socket.timeout:
        sock.close()
        raise Timeout("no answer from %s within %g s" % (tuple(handle), timeout)) from None
    except OSError as exc:
        sock.close()
        if exc.errno in _GONE:
            raise NotFound("nothing at %s" % (tuple(handle),)) from None
        if exc.errno in _UNREACHABLE:
            raise DstUnreachable("context %d cannot be reached" % handle.context) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise NoAccess("not allowed to reach %s" % (tuple(handle),)) from None
        raise Unavailable("cannot reach %s: %s" % (tuple(handle), exc)) from None
    except BaseException:
        sock.close()
        raise
    finally:
        if name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)  # the kernel keeps the address the peer reads
    return sock


def peer_context(runtime: Runtime, sock: socket.socket, claimed: int) -> Optional[int]:
    """The context of a connected peer as the kernel says, or None if its claim is false.

    vsock: the peer's CID. Hybrid: the guest's, for a stream through a VMM; ``claimed``
    for a host process of this user (``HybridTransport.stream_peer_context``). Local
    transport: the peer must be bound in ``c<claimed>/`` and run as the user who owns that
    directory (``SO_PEERCRED``), as datagram links are.
    """
    if sock.family == AF_VSOCK:
        cid = sock.getpeername()[0]
        return runtime.transport.local_cid if cid == VMADDR_CID_LOCAL else cid
    if _is_hybrid(runtime.transport):
        return runtime.transport.stream_peer_context(sock, claimed)
    return claimed if runtime.transport.peer_in_context(sock, claimed) else None


def hold(sock, nbytes: int) -> None:
    """Let the kernel queue ``nbytes`` of an AF_VSOCK stream ``sock`` for us to read.

    The vsock kernel buffer (``SO_VM_SOCKETS_BUFFER_SIZE``, 256 KiB by default and at most
    ``SO_VM_SOCKETS_BUFFER_MAX_SIZE``) is the credit our kernel grants the peer's: a stream
    carrying a queue of that size plus its frame headers would find the kernel's flow control
    binding before its own. Raises both to ``nbytes`` when below (never lowers them); a
    listening socket passes them to the connections it accepts. Other sockets: nothing (a
    ``ListenerSet`` or AF_UNIX stream has no such buffer). Unprivileged; OSError propagates.
    """
    if getattr(sock, "family", None) != AF_VSOCK:
        return
    if sock.getsockopt(AF_VSOCK, SO_VM_SOCKETS_BUFFER_MAX_SIZE) < nbytes:
        sock.setsockopt(AF_VSOCK, SO_VM_SOCKETS_BUFFER_MAX_SIZE, nbytes)
    if sock.getsockopt(AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE) < nbytes:
        sock.setsockopt(AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE, nbytes)


def write_piece(runtime: Runtime, sock: socket.socket) -> Optional[int]:
    """Bytes per ``send()`` on the connected stream ``sock``: ``SIBLING_PIECE`` between two
    guests (vhost-device-vsock drops bigger packets there; ``transport/pieces.py``), else None
    (write whole). Decide once per connection."""
    return piece_for(sock, runtime.transport.local_cid)


__all__ = ["mirrored", "listen", "connect", "peer_context", "hold", "write_piece", "register_kinds", "Listener",
           "REGION", "QUEUE_PAIR", "CONNECT_TIMEOUT"]
