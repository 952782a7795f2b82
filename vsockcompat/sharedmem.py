"""Shared memory regions (vmci-sdk.md 4.3) as POSIX shared memory between processes.

A region is a ``/dev/shm`` object mapped into every user: a write by one user
is visible to the others at once, with no copy and no call. Contract:

- ``SharedRegion.create(size)`` gives a fresh handle ``(own cid, rid >= 1024)``
  from the id space datagram endpoints use. ``size`` is an int > 0
  (``InvalidArgs`` for a non-int, ``InvalidSize`` for 0 or less); the backing is
  whole pages, reserved at once, but ``size`` and ``buffer`` are exactly the
  requested size. A size the memory cannot hold (free space of /dev/shm or
  available RAM) raises ``NoMem`` before anything is allocated. Contents start
  zeroed.
- ``SharedRegion.attach(handle, size=None)`` maps a live region from any
  context, for any process of the same user on the same runtime directory.
  ``size`` must equal the region's size (``InvalidSize``); None takes it as
  it is. A handle with no live region: ``NotFound``.
- ``detach()`` unmaps. The region lives until its last user detaches, exits or
  crashes: the creator's detach leaves it to the others. The last detach
  removes the shm object and the marker; a crashed last user's leftovers are
  reclaimed by the next ``create`` in that context or by ``gc``. A second
  ``detach`` raises ``NotFound``. Views taken from ``buffer`` and still held at
  detach keep their memory mapped until released.

Files: ``/dev/shm/vsc.<uid>.<8 hex of the runtime directory>.<cid>.<rid>`` (mode
0600) and the marker ``<rundir>/c<cid>/<rid>.shm`` ("<size> <shm name>"). Every
user holds ``flock(LOCK_SH)`` on its own open file of the shm object, so a
region is alive exactly while ``LOCK_EX | LOCK_NB`` fails. Every such probe,
every attach and every removal happens under the context's allocation lock
(``c<cid>/.lock``, the one ``LocalTransport.allocate`` holds), so probes never
race each other.

Where the runtime mirrors regions (``VSOCKCOMPAT_SHM_MODE=mirrored``, or ``auto`` on a
transport without shared memory, such as vsock), ``create``, ``attach`` and ``query``
hand over to ``mirror.MirroredRegion`` and ``mirror.query``, whose coherence contract
replaces "visible at once".
"""
import atexit
import contextlib
import errno
import fcntl
import functools
import hashlib
import mmap
import os
import re
import sys
import threading
import weakref
from typing import List, Optional

import psutil

from .errors import (Generic, InvalidArgs, InvalidSize, NoAccess, NoMem,
                     NoResources, NotFound, Unavailable, VMCIError)
from .handles import VMCIHandle, as_handle
from .runtime import Runtime, default_runtime

__all__ = ["SharedRegion", "query", "region_alive", "gc", "register_kind", "shm_prefix", "main"]

SHM_DIR = "/dev/shm"
MARKER_SUFFIX = ".shm"
_MARKER = re.compile(r"(0|[1-9][0-9]{0,9})\.shm")
_OBJECT = re.compile(r"(0|[1-9][0-9]{0,9})\.(0|[1-9][0-9]{0,9})")
_NO_MEMORY = (errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EOVERFLOW)
_live: "weakref.WeakSet[SharedRegion]" = weakref.WeakSet()


def shm_prefix(rundir: str) -> str:
    """``vsc.<uid>.<8 hex of sha1(rundir)>.``: how every shm object name of ``rundir`` starts
    (queue pairs' objects too)."""
    digest = hashlib.sha1(os.path.abspath(rundir).encode("utf-8", "surrogateescape")).hexdigest()
    return "vsc.%d.%s." % (os.getuid(), digest[:8])


def _shm_path(rundir: str, handle: VMCIHandle) -> str:
    return os.path.join(SHM_DIR, "%s%d.%d" % (shm_prefix(rundir), handle.context, handle.resource))


def _marker_path(transport, handle: VMCIHandle) -> str:
    return os.path.join(transport.context_dir(handle.context), "%d%s" % (handle.resource, MARKER_SUFFIX))


def _page_round(size: int) -> int:
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidArgs("a region size is an int, got %r" % (size,))
    if size <= 0:
        raise InvalidSize("a region size is at least 1 byte, got %d" % size)
    return int(size)


def _vmci_error(exc: OSError) -> VMCIError:
    if exc.errno in _NO_MEMORY:
        return NoMem(str(exc))
    if exc.errno in (errno.EACCES, errno.EPERM):
        return NoAccess(str(exc))
    if exc.errno == errno.ENOENT:
        return NotFound(str(exc))
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return NoResources(str(exc))
    return Generic(str(exc))


@contextlib.contextmanager
def _vmci_errors():
    try:
        yield
    except OSError as exc:
        raise _vmci_error(exc) from None


def _transport(runtime: Optional[Runtime]):
    transport = (runtime if runtime is not None else default_runtime()).transport
    if "shared-memory" not in transport.features or not os.path.isdir(SHM_DIR):
        raise Unavailable("no shared memory on the %s transport" % transport.name)
    register_kind(transport)
    return transport


def _mirror():
    from . import mirror
    return mirror


def _mirrored(runtime: Optional[Runtime]) -> bool:
    """Whether regions are mirrored over streams (``mirror``) rather than shared here."""
    from .mirror_link import mirrored
    with _vmci_errors():
        return mirrored(runtime if runtime is not None else default_runtime())


def register_kind(transport) -> None:
    """Teach ``transport``'s id allocation about regions (ids taken while alive, dead ones reclaimed)."""
    from .mirror_link import register_kinds
    register_kinds(transport)
    transport.add_resource_kind(MARKER_SUFFIX, functools.partial(_region_in_use, transport.rundir),
                                functools.partial(_reap_region, transport.rundir))


@contextlib.contextmanager
def _context_lock(cdir: str):
    """The allocation lock of a context (none if the context has no directory)."""
    try:
        fd = os.open(os.path.join(cdir, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        fd = -1
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def _in_use(path: str) -> bool:
    """Whether some process holds a lock on the shm object ``path``. Under the context lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _unlink(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _marker_shm(rundir: str, marker: str) -> str:
    cdir, name = os.path.split(marker)
    handle = VMCIHandle(int(os.path.basename(cdir)[1:]), int(name[:-len(MARKER_SUFFIX)]))
    return _shm_path(rundir, handle)


def _region_in_use(rundir: str, marker: str) -> bool:
    """``alive`` of the ``.shm`` resource kind: some user still holds the region."""
    return _in_use(_marker_shm(rundir, marker))


def _reap_region(rundir: str, marker: str) -> None:
    """``reap`` of the ``.shm`` resource kind: remove a dead region's shm object."""
    _unlink(_marker_shm(rundir, marker))


def _read_marker(path: str) -> int:
    try:
        with open(path, "rb") as f:
            size = int(f.read(64).split()[0])
    except (FileNotFoundError, NotADirectoryError, ValueError, IndexError):
        raise NotFound("no shared memory region at %s" % path) from None
    if size <= 0:
        raise NotFound("no shared memory region at %s" % path)
    return size


def _map(path: str, length: int) -> mmap.mmap:
    """A shared mapping of ``length`` bytes of ``path``, through its own open file, so that
    the mapping never shares the lock holder's open file description."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        if os.fstat(fd).st_size < length:
            raise NotFound("shared memory object %s is not ready" % path)
        return mmap.mmap(fd, length)
    finally:
        os.close(fd)


def _memory_available() -> int:
    st = os.statvfs(SHM_DIR)
    return min(st.f_bavail * st.f_frsize, psutil.virtual_memory().available)


def _new_object(path: str, backing: int) -> int:
    """Create the shm object (an orphan of that name is replaced) and lock it shared."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            if _in_use(path):
                raise NoResources("%s is in use but has no marker" % path) from None
            _unlink(path)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.ftruncate(fd, backing)
            os.posix_fallocate(fd, 0, backing)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        return fd
    raise NoResources("cannot create %s" % path)


def _sweep(transport, cid: int) -> List[VMCIHandle]:
    """Remove the dead regions of context ``cid`` that have a marker. Under its context lock."""
    cdir = transport.context_dir(cid)
    reaped = []
    for name in os.listdir(cdir):
        match = _MARKER.fullmatch(name)
        if match is not None:
            handle = VMCIHandle(cid, int(match.group(1)))
            path = _shm_path(transport.rundir, handle)
            if not _in_use(path):
                _unlink(path, os.path.join(cdir, name))
                reaped.append(handle)
    return reaped


class SharedRegion:
    """One user's mapping of a shared memory region; see the module's contract.

    ``handle``, ``size`` (the requested size), ``buffer`` (a writable memoryview of
    exactly ``size`` bytes; ``NotFound`` once detached), ``detach()``; a context
    manager that detaches on exit. A region still attached when its object is
    collected or the process exits is detached then. Errors raise the VMCIError
    subclass of the SDK code.
    """

    def __init__(self, transport, handle: VMCIHandle, size: int, lock_fd: int, mm: mmap.mmap):
        self._transport = transport
        self.handle = handle
        self.size = size
        self._lock_fd = lock_fd
        self._mmap = mm
        self._view = memoryview(mm)[:size]
        self._detach_lock = threading.Lock()
        _live.add(self)

    @classmethod
    def create(cls, size, runtime: Optional[Runtime] = None) -> "SharedRegion":
        """Create a region of ``size`` bytes and attach to it."""
        size = _check_size(size)
        if _mirrored(runtime):
            return _mirror().MirroredRegion.create(size, runtime)
        with _vmci_errors():
            transport = _transport(runtime)
            backing = _page_round(size)
            if backing > _memory_available():
                raise NoMem("%d bytes of shared memory are not available" % size)
            return transport.allocate(None, lambda handle: cls._create(transport, handle, size, backing))

    @classmethod
    def _create(cls, transport, handle: VMCIHandle, size: int, backing: int) -> "SharedRegion":
        _sweep(transport, handle.context)
        path = _shm_path(transport.rundir, handle)
        marker = _marker_path(transport, handle)
        fd = _new_object(path, backing)
        try:
            mm = _map(path, backing)
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                with open(os.open(marker, flags, 0o600), "w") as f:
                    f.write("%d %s\n" % (size, os.path.basename(path)))
            except BaseException:
                mm.close()
                raise
        except BaseException:
            os.close(fd)
            _unlink(path, marker)
            raise
        return cls(transport, handle, size, fd, mm)

    @classmethod
    def attach(cls, handle, size=None, runtime: Optional[Runtime] = None) -> "SharedRegion":
        """Attach to the live region ``handle``; ``size``, if given, must be its size."""
        handle = as_handle(handle)
        if size is not None:
            size = _check_size(size)
        rt = runtime if runtime is not None else default_runtime()
        rt.access.check_attach(rt.transport.local_cid, handle)
        if _mirrored(runtime):
            return _mirror().MirroredRegion.attach(handle, size, runtime)
        with _vmci_errors():
            transport = _transport(runtime)
            marker = _marker_path(transport, handle)
            path = _shm_path(transport.rundir, handle)
            with _context_lock(transport.context_dir(handle.context)):
                actual = _read_marker(marker)
                if size is not None and size != actual:
                    raise InvalidSize("region %s has %d bytes, not %d" % (tuple(handle), actual, size))
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                except FileNotFoundError:
                    raise NotFound("region %s is gone" % (tuple(handle),)) from None
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        fcntl.flock(fd, fcntl.LOCK_SH)
                    else:
                        _unlink(path, marker)
                        raise NotFound("region %s is gone (its users died)" % (tuple(handle),))
                    mm = _map(path, _page_round(actual))
                except BaseException:
                    os.close(fd)
                    raise
            return cls(transport, handle, actual, fd, mm)

    @property
    def buffer(self) -> memoryview:
        if self._lock_fd < 0:
            raise NotFound("region %s is detached" % (tuple(self.handle),))
        return self._view

    @property
    def closed(self) -> bool:
        return self._lock_fd < 0

    def detach(self) -> None:
        """Unmap; the last user's detach removes the region. ``NotFound`` if already detached."""
        with self._detach_lock:
            if self._lock_fd < 0:
                raise NotFound("region %s is already detached" % (tuple(self.handle),))
            with contextlib.suppress(BufferError):
                self._view.release()
                self._mmap.close()
            self._view = self._mmap = None
            transport, handle = self._transport, self.handle
            with _vmci_errors(), _context_lock(transport.context_dir(handle.context)):
                os.close(self._lock_fd)
                self._lock_fd = -1
                path = _shm_path(transport.rundir, handle)
                if not _in_use(path):
                    _unlink(path, _marker_path(transport, handle))
        _live.discard(self)

    def __enter__(self) -> "SharedRegion":
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_fd >= 0:
            self.detach()

    def __del__(self):
        if getattr(self, "_lock_fd", -1) >= 0:
            with contextlib.suppress(Exception):
                self.detach()

    def __repr__(self):
        state = " detached" if self.closed else ""
        return "<SharedRegion %s size=%d%s>" % (tuple(self.handle), self.size, state)


@atexit.register
def _detach_all() -> None:
    for region in list(_live):
        with contextlib.suppress(Exception):
            region.detach()


def query(handle, runtime: Optional[Runtime] = None) -> int:
    """The requested size of the live region ``handle``; ``NotFound`` if there is none."""
    handle = as_handle(handle)
    if _mirrored(runtime):
        return _mirror().query(handle, runtime)
    with _vmci_errors():
        transport = _transport(runtime)
        with _context_lock(transport.context_dir(handle.context)):
            size = _read_marker(_marker_path(transport, handle))
            if not _in_use(_shm_path(transport.rundir, handle)):
                raise NotFound("region %s is gone" % (tuple(handle),))
    return size


def region_alive(handle, runtime: Optional[Runtime] = None) -> bool:
    """Whether ``handle`` names a live region (for the discovery service's pruning)."""
    try:
        query(handle, runtime)
    except VMCIError:
        return False
    return True


def gc(runtime: Optional[Runtime] = None) -> List[VMCIHandle]:
    """Reclaim the runtime directory's orphans: markers of regions nobody holds and shm
    objects without a marker; return their handles, sorted."""
    with _vmci_errors():
        transport = _transport(runtime)
        reaped = set()
        for cid in transport.contexts():
            with _context_lock(transport.context_dir(cid)):
                reaped.update(_sweep(transport, cid))
        prefix = shm_prefix(transport.rundir)
        for name in os.listdir(SHM_DIR):
            match = _OBJECT.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
            if match is None:
                continue
            handle = VMCIHandle(int(match.group(1)), int(match.group(2)))
            with _context_lock(transport.context_dir(handle.context)):
                path = os.path.join(SHM_DIR, name)
                if not os.path.lexists(_marker_path(transport, handle)) and not _in_use(path):
                    _unlink(path)
                    reaped.add(handle)
    return sorted(reaped)


def main(argv) -> int:
    """``vsockcompat gc``: reclaim orphaned shared memory regions and print their handles."""
    if argv:
        print("usage: vsockcompat gc\n  reclaim shared memory regions whose users all died",
              file=sys.stderr if argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv[0] in ("-h", "--help") else 2
    try:
        reaped = gc()
    except VMCIError as exc:
        print("vsockcompat gc: %s" % exc, file=sys.stderr)
        return 1
    for handle in reaped:
        print("reclaimed shared memory region (%d, %d)" % handle)
    if not reaped:
        print("nothing to reclaim")
    return 0
