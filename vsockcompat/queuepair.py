"""Queue pairs with today's kernel semantics (vmci-sdk.md section 11), on the local transport.

``QueuePair.alloc`` creates the pair named by a handle, or attaches to it when
another context created it. Each end writes into its produce queue and reads
its consume queue; ``enqueue`` writes what fits (partial writes) and never
blocks, ``dequeue`` reads what is there (``peek_view`` + ``consume``: in place,
with no copy); ``wait_for_data``/``wait_for_space`` sleep in the kernel until
the peer makes progress. Detach is final.

Memory and liveness (all under the runtime directory's context ``c<cid>/``)::

    /dev/shm/vsc.<uid>.<hash of rundir>.qp.<cid>.<rid>
        page 0: control words (sizes, flags, peer, who is attached and detached)
        then the creator's produce queue, then its consume queue, each a
        header page (VMCIQueueHeader) + data pages (src/vsc_ring.h)
    c<cid>/<rid>.qp        marker: the pair exists; flock'ed for state changes
    c<cid>/<rid>.qp.0/.1   creator's / attacher's end, flock'ed for its whole life
    c<cid>/<rid>.qp.sock   creator's listening socket, until the attacher connects

The two ends share a connected SOCK_SEQPACKET doorbell. An end about to sleep
sets a waiting bit in its header page; the other end rings only then. EOF on
the doorbell means the peer detached or died: VMCI_EVENT_QP_PEER_DETACH is
queued, enqueue returns VMCI_ERROR_QUEUEPAIR_NOTATTACHED, and dequeue first
drains what the peer wrote, then returns NOTATTACHED. A crashed peer is noticed
when the survivor cannot make progress (NOSPACE/NODATA), waits, or reads events.
The shared memory and the files go away with the last detach; a pair whose
ends all died is reclaimed by the next allocation of its id.
"""
import collections
import contextlib
import fcntl
import hashlib
import mmap
import os
import select
import socket
import sys
import threading
import time
from typing import List, NamedTuple, Optional, Tuple

from .constants import (
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_NOT_FOUND,
    VMCI_ERROR_QUEUEPAIR_NODATA,
    VMCI_ERROR_QUEUEPAIR_NOSPACE,
    VMCI_ERROR_QUEUEPAIR_NOTATTACHED,
    VMCI_ERROR_TIMEOUT,
    VMCI_EVENT_QP_PEER_ATTACH,
    VMCI_EVENT_QP_PEER_DETACH,
    VMCI_INVALID_ID,
    VMCI_MAX_GUEST_QP_MEMORY,
    VMCI_QP_ALL_FLAGS,
    VMCI_QPFLAG_ATTACH_ONLY,
    VMCI_QPFLAG_LOCAL,
    VMCI_SUCCESS,
    VMCI_SUCCESS_LAST_DETACH,
    VMCI_SUCCESS_QUEUEPAIR_ATTACH,
    VMCI_SUCCESS_QUEUEPAIR_CREATE,
)
from .errors import (
    AlreadyExists, DuplicateEntry, InvalidArgs, NoAccess, NoResources, NotFound,
    QueuePairMismatch, Unavailable, VMCIError, check,
)
from . import mirror_link
from .handles import VMCIHandle, as_handle
from .runtime import Runtime, default_runtime

__all__ = ["QueuePair", "QPEvent", "shm_name"]

_PAGE = 4096
_MAGIC = 0x3150514353560001  # "VSCQP1", layout version 1
_C_MAGIC, _C_PRODUCE, _C_CONSUME, _C_FLAGS, _C_PEER, _C_CREATOR, _C_ATTACHER, _C_STATE = range(8)
_ATTACHED, _DETACHED = 1, (2, 4)  # state bits; _DETACHED[role]
_CREATOR, _ATTACHER = 0, 1
_BELL = b"\x01"
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_RECHECK = 2.0  # longest sleep between re-checks, a safety net for weakly ordered CPUs


class QPEvent(NamedTuple):
    """An event of a queue pair: VMCI_EVENT_QP_PEER_ATTACH or _DETACH, the pair, the peer's context."""

    event: int
    handle: VMCIHandle
    peer_id: int


def shm_name(rundir: str, handle: VMCIHandle) -> str:
    """The POSIX shm object (a name under /dev/shm) of the pair ``handle`` in ``rundir``."""
    digest = hashlib.sha1(os.path.abspath(rundir).encode()).hexdigest()[:8]
    return "vsc.%d.%s.qp.%d.%d" % (os.getuid(), digest, handle.context, handle.resource)


def _shm_path(rundir: str, handle: VMCIHandle) -> str:
    return os.path.join("/dev/shm", shm_name(rundir, handle))


def _queue_bytes(size: int) -> int:
    return _PAGE + -(-size // _PAGE) * _PAGE


def _end_alive(path: str) -> bool:
    """Whether an end holds its lock file (a dead process's flock vanishes with it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _lock_end(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


@contextlib.contextmanager
def _marker_lock(path: str):
    """Hold the marker's flock; yields False if there is no marker (no pair)."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield True
                return
        finally:
            os.close(fd)


def _remove_files(base: str) -> None:
    cdir, prefix = os.path.split(base + ".qp")
    for name in os.listdir(cdir):
        if name == prefix or name.startswith(prefix + "."):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(cdir, name))


def register_kind(transport) -> None:
    """Teach ``transport``'s id allocation about queue pairs (ids taken while an end lives)."""
    rundir = transport.rundir

    def alive(marker: str) -> bool:
        return _end_alive(marker + ".0") or _end_alive(marker + ".1")

    def reap(marker: str) -> None:
        cdir, name = os.path.split(marker)
        handle = VMCIHandle(int(os.path.basename(cdir)[1:]), int(name[:-3]))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_shm_path(rundir, handle))

    transport.add_resource_kind(".qp", alive, reap)
    mirror_link.register_kinds(transport)


def _check_size(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgs("%s must be an int, got %r" % (what, value))
    if value < 0:
        raise InvalidArgs("%s must be >= 0, got %d" % (what, value))
    return int(value)


def _is_count_type(value) -> bool:
    """Whether ``value`` may be a byte count: an int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_args(handle, produce_size, consume_size, peer, flags) -> Optional[VMCIHandle]:
    handle = None if handle is None else as_handle(handle)
    if handle is not None and handle.resource == VMCI_INVALID_ID:
        handle = None
    produce_size = _check_size("produce_size", produce_size)
    consume_size = _check_size("consume_size", consume_size)
    if produce_size == 0 and consume_size == 0:
        raise InvalidArgs("at least one of produce_size and consume_size must be non-zero")
    if produce_size + consume_size > VMCI_MAX_GUEST_QP_MEMORY:
        raise NoResources("a queue pair holds at most %d bytes" % VMCI_MAX_GUEST_QP_MEMORY)
    if isinstance(flags, bool) or not isinstance(flags, int) or flags & ~VMCI_QP_ALL_FLAGS or flags < 0:
        raise InvalidArgs("unknown queue-pair flags %r" % (flags,))
    if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer <= VMCI_INVALID_ID:
        raise InvalidArgs("peer must be a context id, got %r" % (peer,))
    return handle


class _Mapping:
    """The shm mapping of a pair and the views into it; ``close`` releases all of them."""

    def __init__(self, mm: mmap.mmap, produce: int, consume: int, role: int, core):
        self.mm = mm
        self.ctl = memoryview(mm)[:_PAGE].cast("Q")
        first, second = _PAGE, _PAGE + _queue_bytes(produce)
        self.qa = memoryview(mm)[first:second]
        self.qb = memoryview(mm)[second:second + _queue_bytes(consume)]
        if role == _CREATOR:
            self.ring = core.Ring(self.qa, self.qb, produce, consume)
        else:
            self.ring = core.Ring(self.qb, self.qa, consume, produce)

    def close(self) -> None:
        self.ring.release_memory()
        for view in (self.ctl, self.qa, self.qb):
            view.release()
        try:
            self.mm.close()
        except BufferError:
            # A slice of a peek_view someone kept pins the mapping: it is unmapped
            # when the last such view goes, so no view ever points at unmapped memory.
            pass
        self.mm = None


# Fault the whole mapping in at mmap time (Linux; mmap.MAP_POPULATE is Python >= 3.10).
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000 if sys.platform.startswith("linux") else 0)


def _map(path: str, flags: int, size: int = 0) -> mmap.mmap:
    """Map the pair's shm object; ``size``: create it with that many bytes, all allocated.

    As the kernel allocates a queue pair's pages when it creates the pair, the
    creator allocates every page at once (``posix_fallocate``: a full ``/dev/shm``
    is an OSError here, not a SIGBUS at some later enqueue), and both ends map
    them populated, so the first pass over a ring takes no page faults.
    """
    fd = os.open(path, flags | os.O_RDWR | os.O_CLOEXEC, 0o644)
    try:
        if size:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
        size = os.fstat(fd).st_size
        if size < _PAGE:
            raise FileNotFoundError(path)
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _MAP_POPULATE)
    finally:
        os.close(fd)


class PairEnd:
    """What every kind of queue-pair end shares: the raising forms of the ``*_status`` calls,
    detach as a context manager, and its repr.

    A subclass sets ``handle``, ``created``, ``produce_size``, ``consume_size``, ``_detached``
    and implements the ``*_status`` calls.
    """

    def detach(self) -> int:
        """Leave the pair (final): VMCI_SUCCESS or VMCI_SUCCESS_LAST_DETACH; NotFound if already detached."""
        return check(self.detach_status())

    def enqueue(self, buf) -> int:
        """Write what fits of ``buf`` and return the count; QueuePairNoSpace when full."""
        return check(self.enqueue_status(buf))

    def enqueue_many(self, bufs) -> int:
        """Write whole buffers while each fits and return how many; QueuePairNoSpace if none fits."""
        return check(self.enqueue_many_status(bufs))

    def dequeue_into(self, buf) -> int:
        """Read into ``buf`` and return the count; QueuePairNoData when empty."""
        return check(self.dequeue_status(buf))

    def consume(self, n: int) -> int:
        """``consume_status`` that raises: InvalidArgs if ``n`` > ready, QueuePairNotAttached."""
        return check(self.consume_status(n))

    def wait_for_data(self, timeout: Optional[float] = None) -> int:
        """Sleep (in the kernel) until data is ready and return the count; Timeout, QueuePairNotAttached."""
        return check(self.wait_for_data_status(timeout))

    def wait_for_space(self, n: int = 1, timeout: Optional[float] = None) -> int:
        """Sleep until ``n`` bytes are free (0 < n < produce_size) and return the free count."""
        return check(self.wait_for_space_status(n, timeout))

    @property
    def detached(self) -> bool:
        return self._detached

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if not self._detached:
            self.detach_status()

    def __repr__(self):
        return "<%s %s %s produce=%d consume=%d%s>" % (
            type(self).__name__, self.handle, "creator" if self.created else "attacher",
            self.produce_size, self.consume_size, " detached" if self._detached else "")


class QueuePair(PairEnd):
    """One end of a queue pair. Build it with ``QueuePair.alloc``; see the module docstring.

    The object API raises the VMCIError of the SDK code; the ``*_status``
    methods return counts or negative codes. ``handle``, ``produce_size``,
    ``consume_size``, ``created`` (True for the creator) and ``peer_id`` (the
    other end's context once known, else VMCI_INVALID_ID) describe the pair.
    """

    def __init__(self, runtime: Runtime, handle: VMCIHandle, role: int, mapping: _Mapping,
                 end_fd: int, listener=None, bell=None):
        self._runtime = runtime
        self.handle = handle
        self.created = role == _CREATOR
        self._role = role
        self._map = mapping
        self.ring = mapping.ring
        self.produce_size = self.ring.produce_size
        self.consume_size = self.ring.consume_size
        self._end_fd = end_fd
        self._listener = listener
        self._bell = bell
        self._base = runtime.transport.endpoint_path(handle)
        self._peer_bit = _DETACHED[1 - role]
        self.peer_id = mapping.ctl[_C_CREATOR] if role == _ATTACHER else VMCI_INVALID_ID
        self._events: collections.deque = collections.deque()
        self._lock = threading.RLock()
        self._peer_gone = False
        self._detached = False
        #: Attachers the creator cut off: a false claim of context, or forbidden flags.
        self.refused_attaches = 0
        core = runtime.core
        self._bits = (core.QP_WAITING_READ, core.QP_WAITING_WRITE)
        self._rung = 0  # the peer's waiting word we last rang for
        self._lent_queues: List[memoryview] = []

    # Allocation

    @classmethod
    def alloc(cls, handle=None, produce_size=0, consume_size=0, peer=VMCI_INVALID_ID, flags=0,
              runtime: Optional[Runtime] = None) -> "QueuePair":
        """Create the pair ``handle`` (None: a fresh id in our context) or attach to it.

        The attacher passes mirrored sizes (its produce = the creator's consume)
        and the same flags, else QueuePairMismatch. ATTACH_ONLY on a missing
        pair, or a missing pair named in another context: NotFound. ``peer``
        restricts who may attach (NoAccess); a third end: Unavailable; our own
        context again without LOCAL: AlreadyExists. Sizes that are not ints,
        negative, both zero, or unknown flags: InvalidArgs; produce + consume
        above 128 MiB: NoResources.
        """
        runtime = runtime if runtime is not None else default_runtime()
        if mirror_link.mirrored(runtime):  # across kernels: a stream (qp_stream)
            from .qp_stream import StreamQueuePair
            return StreamQueuePair.alloc(handle, produce_size, consume_size, peer, flags, runtime)
        handle = _check_args(handle, produce_size, consume_size, peer, flags)
        transport = runtime.transport
        if not hasattr(transport, "add_resource_kind"):
            raise Unavailable("the %s transport has no queue pairs" % transport.name)
        register_kind(transport)
        for _ in range(3):
            if handle is not None:
                qp = cls._attach(runtime, handle, produce_size, consume_size, flags)
                if qp is not None:
                    return qp
            if flags & VMCI_QPFLAG_ATTACH_ONLY:
                raise NotFound("no queue pair %s to attach to" % (handle,))
            if handle is not None and handle.context != transport.local_cid:
                raise NotFound("no queue pair %s (pairs are created in their own context)" % (handle,))
            try:
                return transport.allocate(None if handle is None else handle.resource, lambda h: cls._create(
                    runtime, h, produce_size, consume_size, peer, flags))
            except DuplicateEntry:
                if handle is None or not os.path.lexists(transport.endpoint_path(handle) + ".qp"):
                    raise
        raise Unavailable("queue pair %s keeps changing state" % (handle,))

    @classmethod
    def alloc_status(cls, handle=None, produce_size=0, consume_size=0, peer=VMCI_INVALID_ID, flags=0,
                     runtime: Optional[Runtime] = None) -> Tuple[int, Optional["QueuePair"]]:
        """``(VMCI_SUCCESS_QUEUEPAIR_CREATE or _ATTACH, pair)``, or ``(negative code, None)``."""
        try:
            qp = cls.alloc(handle, produce_size, consume_size, peer, flags, runtime)
        except VMCIError as exc:
            return exc.code, None
        return (VMCI_SUCCESS_QUEUEPAIR_CREATE if qp.created else VMCI_SUCCESS_QUEUEPAIR_ATTACH), qp

    @classmethod
    def _create(cls, runtime, handle, produce_size, consume_size, peer, flags) -> "QueuePair":
        """Runs under the context's allocation lock; the marker is written last."""
        transport = runtime.transport
        base = transport.endpoint_path(handle)
        shm = _shm_path(transport.rundir, handle)
        total = _PAGE + _queue_bytes(produce_size) + _queue_bytes(consume_size)
        end_fd = _lock_end(base + ".qp.0")
        mapping = listener = None
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(shm)
            try:
                mm = _map(shm, os.O_CREAT | os.O_EXCL, total)
            except OSError as exc:
                raise NoResources("cannot allocate %d bytes of shared memory: %s" % (total, exc)) from None
            mapping = _Mapping(mm, produce_size, consume_size, _CREATOR, runtime.core)
            mapping.ring.initialise(handle.context, handle.resource)
            ctl = mapping.ctl
            ctl[_C_PRODUCE], ctl[_C_CONSUME], ctl[_C_FLAGS] = produce_size, consume_size, flags
            ctl[_C_PEER], ctl[_C_CREATOR], ctl[_C_ATTACHER] = peer, handle.context, VMCI_INVALID_ID
            ctl[_C_STATE] = 0
            ctl[_C_MAGIC] = _MAGIC
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            listener.bind(base + ".qp.sock")
            listener.listen(1)
            listener.setblocking(False)
            os.close(os.open(base + ".qp", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
        except BaseException:
            if listener is not None:
                listener.close()
            if mapping is not None:
                mapping.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(shm)
            _remove_files(base)
            os.close(end_fd)
            raise
        return cls(runtime, handle, _CREATOR, mapping, end_fd, listener=listener)

    @classmethod
    def _attach(cls, runtime, handle, produce_size, consume_size, flags) -> Optional["QueuePair"]:
        """Attach to a live pair; None when there is none (missing, or its creator is gone)."""
        transport = runtime.transport
        base = transport.endpoint_path(handle)
        me = transport.local_cid
        with _marker_lock(base + ".qp") as exists:
            if not exists:
                return None
            try:
                mm = _map(_shm_path(transport.rundir, handle), 0)
            except FileNotFoundError:
                return None
            except PermissionError:
                raise NoAccess("not allowed to map queue pair %s" % (handle,)) from None
            ctl = memoryview(mm)[:_PAGE].cast("Q")
            try:
                meta = ctl.tolist()[:_C_STATE + 1]
            finally:
                ctl.release()
            state = meta[_C_STATE]
            if (meta[_C_MAGIC] != _MAGIC or state & _DETACHED[_CREATOR]
                    or not _end_alive(base + ".qp.0")):
                mm.close()
                return None
            try:
                cls._check_attach(meta, me, produce_size, consume_size, flags)
                runtime.access.check_interaction(me, meta[_C_CREATOR], "attach to queue pair %s" % (handle,))
                if mm.size() < _PAGE + _queue_bytes(consume_size) + _queue_bytes(produce_size):
                    raise Unavailable("queue pair %s is damaged" % (handle,))
            except BaseException:
                mm.close()
                raise
            mapping = _Mapping(mm, meta[_C_PRODUCE], meta[_C_CONSUME], _ATTACHER, runtime.core)
            end_fd = bell = None
            try:
                end_fd = _lock_end(base + ".qp.1")
                # Published before connecting: the creator reads them when it accepts.
                mapping.ctl[_C_ATTACHER] = me
                mapping.ctl[_C_STATE] = state | _ATTACHED
                bell = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
                bell.setblocking(False)
                name = transport.bind_in_context(bell, "qpbell")  # the creator checks our context
                try:
                    bell.connect(base + ".qp.sock")
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name)
            except OSError as exc:
                mapping.ctl[_C_ATTACHER] = VMCI_INVALID_ID
                mapping.ctl[_C_STATE] = state
                if bell is not None:
                    bell.close()
                if end_fd is not None:
                    os.close(end_fd)
                mapping.close()
                raise Unavailable("cannot reach the creator of %s: %s" % (handle, exc)) from None
        return cls(runtime, handle, _ATTACHER, mapping, end_fd, bell=bell)

    @staticmethod
    def _check_attach(meta, me, produce_size, consume_size, flags) -> None:
        if meta[_C_STATE] & _ATTACHED:
            raise Unavailable("queue pair already has two ends")
        if flags & VMCI_QPFLAG_LOCAL:
            if not meta[_C_FLAGS] & VMCI_QPFLAG_LOCAL or me != meta[_C_CREATOR]:
                raise InvalidArgs("LOCAL attaches only to a LOCAL pair of our own context")
        elif me == meta[_C_CREATOR]:
            raise AlreadyExists("context %d created this pair" % me)
        if meta[_C_PEER] != VMCI_INVALID_ID and meta[_C_PEER] != me:
            raise NoAccess("the pair is reserved for context %d" % meta[_C_PEER])
        if meta[_C_PRODUCE] != consume_size or meta[_C_CONSUME] != produce_size:
            raise QueuePairMismatch("sizes must mirror the creator's (produce %d, consume %d)"
                                    % (meta[_C_PRODUCE], meta[_C_CONSUME]))
        if (meta[_C_FLAGS] ^ flags) & ~VMCI_QPFLAG_ATTACH_ONLY:
            raise QueuePairMismatch("flags differ from the creator's")

    # Events and the doorbell

    def _service(self, once: bool = False) -> None:
        """Accept the attacher's doorbell, drain rings, notice the peer leaving. Never blocks.

        ``once``: read one ring only (after a sleep the doorbell woke: the peer rings once
        per sleep, so one read usually empties it, without a read that finds nothing)."""
        with self._lock:
            if self._detached:
                return
            if self._bell is None and self._listener is not None:
                try:
                    conn, _ = self._listener.accept()
                except BlockingIOError:
                    conn = None
                if conn is not None:
                    conn.setblocking(False)
                    self._bell = conn
                    self._listener.close()
                    self._listener = None
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._base + ".qp.sock")
                    self.peer_id = self._map.ctl[_C_ATTACHER]
                    if not self._admissible(conn, self.peer_id):
                        # A false claim of context, or flags that forbid the pair: the
                        # attacher is cut off and the pair is left as if it had detached.
                        self.refused_attaches += 1
                        self.peer_id = VMCI_INVALID_ID
                        self._peer_gone = True
                        conn.close()
                        self._bell = None
                        return
                    self._events.append(QPEvent(VMCI_EVENT_QP_PEER_ATTACH, self.handle, self.peer_id))
            while self._bell is not None and not self._peer_gone:
                try:
                    data = self._bell.recv(64)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:
                    self._on_peer_gone()
                elif once:
                    break
            if not self._peer_gone and self._map.ctl[_C_STATE] & self._peer_bit:
                self._on_peer_gone()

    def _admissible(self, conn, cid: int) -> bool:
        """Whether the doorbell's peer really is context ``cid``, which may pair with us."""
        runtime = self._runtime
        return (runtime.transport.peer_in_context(conn, cid)
                and not runtime.access.policy.denies(cid, self.handle.context))

    def _on_peer_gone(self) -> None:
        self._peer_gone = True
        self._events.append(QPEvent(VMCI_EVENT_QP_PEER_DETACH, self.handle, self.peer_id))

    def _ring_peer(self, bit: int) -> None:
        """Ring the peer if it sleeps waiting for ``bit``, once per sleep: its waiting word
        counts its sleeps, and a word we rang for already has its bell (until the peer
        re-arms, one bell wakes it; more would cost both sides a system call each)."""
        word = self.ring.peer_waiting()
        if word & bit and word != self._rung:
            if self._bell is None:
                self._service()
            if self._bell is not None:
                self._rung = word
                with contextlib.suppress(OSError):
                    self._bell.send(_BELL, _SEND_FLAGS)

    def _sleep(self, seconds: float) -> None:
        sock = self._bell if self._bell is not None else self._listener
        if sock is None or self._peer_gone:
            time.sleep(seconds)
            return
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.poll(max(0, int(seconds * 1000) + 1))

    def events(self, timeout: float = 0.0) -> List[QPEvent]:
        """Events since the last call (PEER_ATTACH to the creator, PEER_DETACH to either end).

        Waits up to ``timeout`` seconds (None: forever) for at least one.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._service()
            if self._events or self._detached:
                break
            left = _RECHECK if deadline is None else min(_RECHECK, deadline - time.monotonic())
            if left <= 0:
                break
            self._sleep(left)
        out = list(self._events)
        self._events.clear()
        return out

    # Data

    def _gone(self) -> bool:
        return self._peer_gone or bool(self._map.ctl[_C_STATE] & self._peer_bit)

    def enqueue_status(self, buf) -> int:
        """Write what fits of ``buf``: the count, QUEUEPAIR_NOSPACE, or QUEUEPAIR_NOTATTACHED."""
        return self._write_status(self.ring.enqueue, buf)

    def enqueue_many_status(self, bufs) -> int:
        """Write whole buffers while each fits: how many, or a negative code as ``enqueue_status``."""
        return self._write_status(self.ring.enqueue_many, bufs)

    def _write_status(self, op, arg):
        # The hot path of every write: no call beyond the ring's own two.
        if self._detached or self._peer_gone or self._map.ctl[_C_STATE] & self._peer_bit:
            self._service()
            return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        rc = op(arg)
        if rc > 0:
            word = self.ring.peer_waiting()
            if word & self._bits[0] and word != self._rung:
                self._ring_peer(self._bits[0])
        elif rc == VMCI_ERROR_QUEUEPAIR_NOSPACE:
            self._service()
            if self._peer_gone:
                return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        return rc

    def _read_status(self, op, arg):
        if self._detached:
            return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        rc = op(arg)
        if rc.__class__ is int and rc == VMCI_ERROR_QUEUEPAIR_NODATA:
            return self._no_data(op, arg)
        return rc

    def _no_data(self, op, arg):
        """After ``op(arg)`` found nothing: notice the peer leaving; NOTATTACHED once drained."""
        self._service()
        if not self._peer_gone:
            return VMCI_ERROR_QUEUEPAIR_NODATA
        # Everything the peer wrote before leaving is readable by now.
        rc = op(arg)
        if rc.__class__ is int and rc == VMCI_ERROR_QUEUEPAIR_NODATA:
            return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        return rc

    def dequeue_status(self, buf) -> int:
        """Read into ``buf``: the count, QUEUEPAIR_NODATA, or QUEUEPAIR_NOTATTACHED once drained."""
        ring = self.ring
        rc = self._read_status(ring.dequeue_into, buf)
        if rc > 0 and ring.peer_waiting() & self._bits[1]:  # _ring_peer: once per sleep
            self._ring_peer(self._bits[1])
        return rc

    def peek_status(self, buf) -> int:
        """Like ``dequeue_status`` without consuming."""
        return self._read_status(self.ring.peek_into, buf)

    def dequeue(self, n: int) -> bytes:
        """Up to ``n`` bytes; QueuePairNoData when empty."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidArgs("a byte count must be an int >= 0")
        rc = self._read_status(self.ring.dequeue, n)
        if isinstance(rc, int):
            check(rc)
        elif rc:
            self._ring_peer(self._bits[1])
        return rc

    def peek(self, n: int) -> bytes:
        """Up to ``n`` bytes without consuming them; QueuePairNoData when empty."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidArgs("a byte count must be an int >= 0")
        rc = self._read_status(self.ring.peek, n)
        if isinstance(rc, int):
            check(rc)
        return rc

    # Zero-copy reads

    def peek_view_status(self, n: int):
        """Zero copy: a read-only memoryview of up to ``n`` ready bytes, in place in the consume queue.

        The view ends at the ring's wrap point, so it may hold fewer bytes than are
        ready (call again after ``consume`` for the rest). Its bytes stay as they are
        until consumed. Lifetime: the view is released by the next successful
        ``consume_status``/``consume`` and by ``detach``; using it after that raises
        ValueError. (A view something else still exports from, a numpy array for
        example, cannot be released: its memory stays mapped until it goes, but the
        peer may overwrite its bytes.) Returns a negative code instead of a view:
        QUEUEPAIR_NODATA, QUEUEPAIR_NOTATTACHED (detached, or the peer left and
        everything it wrote was consumed), INVALID_SIZE (corrupted indexes).
        """
        # The hot path of an in-place reader: one call into the ring when data is ready.
        if n.__class__ is not int and not _is_count_type(n) or n < 0:
            return VMCI_ERROR_INVALID_ARGS
        if self._detached:
            return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        rc = self.ring.peek_view(n)
        if rc.__class__ is int and rc == VMCI_ERROR_QUEUEPAIR_NODATA:
            return self._no_data(self.ring.peek_view, n)
        return rc

    def consume_status(self, n: int) -> int:
        """Mark the first ``n`` ready bytes read (after ``peek_view``): ``n``; INVALID_ARGS if
        ``n`` is not an int or more than is ready (nothing is consumed); QUEUEPAIR_NOTATTACHED
        after detach; INVALID_SIZE. Releases every view ``peek_view`` lent."""
        if self._detached:
            return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        if n.__class__ is not int and not _is_count_type(n) or n < 0:
            return VMCI_ERROR_INVALID_ARGS
        ring = self.ring
        rc = ring.consume(n) if n <= self.consume_size else VMCI_ERROR_INVALID_ARGS
        if rc > 0 and ring.peer_waiting() & self._bits[1]:  # _ring_peer: once per sleep
            self._ring_peer(self._bits[1])
        return rc

    def peek_view(self, n: int) -> memoryview:
        """``peek_view_status`` that raises: QueuePairNoData when empty, InvalidArgs, ..."""
        rc = self.peek_view_status(n)
        if isinstance(rc, int):
            check(rc)
        return rc


    def queue_memory(self) -> Tuple[memoryview, memoryview]:
        """This end's (produce queue, consume queue) memory, each laid out as the 2008 kernel
        mapped a ``VMCIQueue``: the VMCIQueueHeader at offset 0, data from byte 4096, whole
        pages. Writable views of the shared mapping (writes to the indexes are seen by both
        ends; a corrupt index makes the ring answer INVALID_SIZE). ``detach`` releases them.
        QueuePairNotAttached after detach."""
        if self._detached:
            check(VMCI_ERROR_QUEUEPAIR_NOTATTACHED)
        first, second = self._map.qa[:], self._map.qb[:]
        views = (first, second) if self._role == _CREATOR else (second, first)
        self._lent_queues.extend(views)
        return views

    def _query(self, fn) -> int:
        if self._detached:
            return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        return fn()

    def produce_free_space(self) -> int:
        """Bytes ``enqueue`` can write now."""
        return check(self._query(self.ring.produce_free_space))

    def produce_buf_ready(self) -> int:
        """Bytes we wrote that the peer has not read."""
        return check(self._query(self.ring.produce_buf_ready))

    def consume_buf_ready(self) -> int:
        """Bytes ``dequeue`` can read now."""
        return check(self._query(self.ring.consume_buf_ready))

    def consume_free_space(self) -> int:
        """Free bytes in the peer's produce queue."""
        return check(self._query(self.ring.consume_free_space))

    # Blocking helpers

    def _wait(self, query, bit: int, want: int, timeout: Optional[float], drain: bool) -> int:
        # The doorbell is serviced after each sleep, not before it: a ring, an attacher
        # or the peer's EOF ends the sleep at once, so the reads a service costs are
        # spent only when the sleep says there is something to read.
        deadline = None if timeout is None else time.monotonic() + timeout
        ring = self.ring
        while True:
            if self._detached or (not drain and self._gone()):
                return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
            got = query()
            if got < 0 or got >= want:
                return got
            if self._peer_gone:  # and everything it wrote is readable: no more will come
                return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
            left = _RECHECK if deadline is None else deadline - time.monotonic()
            if left <= 0:
                self._service()
                got = query()
                if got < 0 or got >= want:
                    return got
                return VMCI_ERROR_QUEUEPAIR_NOTATTACHED if self._peer_gone else VMCI_ERROR_TIMEOUT
            # Set the bit and count again in one core call: the peer rings a bell for
            # nobody only if it looks within that call (a bell costs both sides a system call).
            got = ring.arm_wait(bit, want)
            if got < 0 or got >= want:
                return got
            try:
                self._sleep(min(left, _RECHECK))
            finally:
                ring.set_waiting(0)
            self._service(once=True)

    def wait_for_data_status(self, timeout: Optional[float] = None) -> int:
        """Sleep until data is ready: the byte count, VMCI_ERROR_TIMEOUT, or QUEUEPAIR_NOTATTACHED."""
        return self._wait(self.ring.consume_buf_ready, self._bits[0], 1, timeout, True)

    def wait_for_space_status(self, n: int = 1, timeout: Optional[float] = None) -> int:
        """Sleep until ``n`` bytes are free: the free count, or a code as ``wait_for_data_status``."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < max(self.produce_size, 1):
            return VMCI_ERROR_INVALID_ARGS
        return self._wait(self.ring.produce_free_space, self._bits[1], n, timeout, False)



    # Detach

    def detach_status(self) -> int:
        """Leave the pair: VMCI_SUCCESS, VMCI_SUCCESS_LAST_DETACH (memory freed), or NOT_FOUND if already."""
        with self._lock:
            if self._detached:
                return VMCI_ERROR_NOT_FOUND
            self._detached = True
            last = True
            with _marker_lock(self._base + ".qp") as exists:
                if exists:
                    ctl = self._map.ctl
                    state = ctl[_C_STATE] | _DETACHED[self._role]
                    ctl[_C_STATE] = state
                    if self._role == _CREATOR:
                        other = state & _ATTACHED and not state & _DETACHED[_ATTACHER]
                    else:
                        other = not state & _DETACHED[_CREATOR]
                    last = not (other and _end_alive(self._base + ".qp.%d" % (1 - self._role)))
                    if last:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(_shm_path(self._runtime.transport.rundir, self.handle))
                        _remove_files(self._base)
            for sock in (self._bell, self._listener):
                if sock is not None:
                    sock.close()
            self._bell = self._listener = None
            for view in self._lent_queues:
                with contextlib.suppress(BufferError):  # exported further: stays mapped
                    view.release()
            self._lent_queues.clear()
            self._map.close()
            os.close(self._end_fd)
            return VMCI_SUCCESS_LAST_DETACH if last else VMCI_SUCCESS

