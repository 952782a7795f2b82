"""Queue pairs under the kernel API's names (vmci-sdk.md sections 4.7 and 11), returning SDK codes.

Queue pairs were never in the 2007 user-level SDK; programs ported from the
kernel API use these shapes, with C out-parameters returned as in ``sdk``:

2008 (``VMCIQueuePair_*``), pairs named by their handle::

    VMCIQueuePair_Alloc(handle, produceSize, consumeSize, peer, flags)
        -> (rv, handle, produceQ, consumeQ)
    VMCIQueuePair_AllocPriv(handle, produceSize, consumeSize, peer, flags, privFlags) -> the same
    VMCIQueuePair_Detach(handle) -> rv

``rv`` is VMCI_SUCCESS_QUEUEPAIR_CREATE or _ATTACH, as the 2008 host returned;
``produceQ``/``consumeQ`` are the queues' memory laid out as a ``VMCIQueue`` (the
VMCIQueueHeader at offset 0, data from byte 4096), released by the detach (None
for a pair carried over a stream across kernels, which has no shared memory).
On failure: ``(code, VMCI_INVALID_HANDLE, None, None)``.

2010+ (``vmci_qpair_*``), pairs named by the object ``vmci_qpair_alloc`` returns::

    vmci_qpair_alloc(handle, produce_qsize, consume_qsize, peer, flags, priv_flags)
        -> (rv, qpair, handle)                      # (code, None, VMCI_INVALID_HANDLE)
    vmci_qpair_detach(qpair) -> rv
    vmci_qpair_enqueue(qpair, buf, buf_size, mode) -> bytes written or code
    vmci_qpair_dequeue(qpair, buf, buf_size, mode) / vmci_qpair_peek(...) -> bytes read or code
    vmci_qpair_enquev(qpair, iov, iov_size, mode)   # iov: a list of buffers
    vmci_qpair_dequev(qpair, iov, iov_size, mode) / vmci_qpair_peekv(...)
    vmci_qpair_produce_free_space(qpair), _produce_buf_ready, _consume_free_space,
    _consume_buf_ready -> count or code
    vmci_qpair_get_produce_indexes(qpair) -> (rv, producer_tail, consumer_head)
    vmci_qpair_get_consume_indexes(qpair) -> (rv, consumer_tail, producer_head)
        # VMCI_ERROR_UNAVAILABLE for a pair carried over a stream (no shared header)

``rv`` of a successful ``vmci_qpair_alloc`` is VMCI_SUCCESS (mainline). ``mode``
is unused, as on Linux. Detach returns VMCI_SUCCESS or VMCI_SUCCESS_LAST_DETACH.
The kernel's ``vmci_qpair_detach`` sets the caller's pointer to NULL, so a
second detach, like any call with an object this library did not hand out (or
already detached), returns VMCI_ERROR_INVALID_ARGS.

Nothing raises for bad input. Sizes that are not ints, negative, both zero or
above 2**64: VMCI_ERROR_INVALID_ARGS; produce + consume above 128 MiB:
VMCI_ERROR_NO_RESOURCES; unknown flags (NONBLOCK and PINNED included, as
mainline): VMCI_ERROR_INVALID_ARGS; privilege flags other than
VMCI_NO_PRIVILEGE_FLAGS: VMCI_ERROR_NO_ACCESS, as a guest endpoint answers (a
process cannot choose its privileges; the policy gives them). The create and
attach rules and the data codes are ``QueuePair``'s (section 11). Every call
before ``VMCI_InitApp`` returns VMCI_ERROR_UNAVAILABLE, like the other SDK calls.
"""
import threading
from typing import Dict, List, Optional, Tuple

from .constants import (
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_INVALID_SIZE,
    VMCI_ERROR_NO_ACCESS,
    VMCI_ERROR_NO_RESOURCES,
    VMCI_ERROR_NOT_FOUND,
    VMCI_ERROR_UNAVAILABLE,
    VMCI_INVALID_ID,
    VMCI_NO_PRIVILEGE_FLAGS,
    VMCI_PRIVILEGE_ALL_FLAGS,
    VMCI_SUCCESS,
    VMCI_SUCCESS_QUEUEPAIR_ATTACH,
    VMCI_SUCCESS_QUEUEPAIR_CREATE,
)
from .errors import VMCIError
from .handles import VMCI_INVALID_HANDLE, VMCIHandle, as_handle
from .queuepair import QueuePair

__all__ = ["QueuePairCalls", "QUEUE_PAIR_FUNCTIONS"]

QUEUE_PAIR_FUNCTIONS = (
    "VMCIQueuePair_Alloc", "VMCIQueuePair_AllocPriv", "VMCIQueuePair_Detach",
    "vmci_qpair_alloc", "vmci_qpair_detach",
    "vmci_qpair_enqueue", "vmci_qpair_dequeue", "vmci_qpair_peek",
    "vmci_qpair_enquev", "vmci_qpair_dequev", "vmci_qpair_peekv",
    "vmci_qpair_produce_free_space", "vmci_qpair_produce_buf_ready",
    "vmci_qpair_consume_free_space", "vmci_qpair_consume_buf_ready",
    "vmci_qpair_get_produce_indexes", "vmci_qpair_get_consume_indexes",
)

_U64 = 1 << 64
_FAILED_2008 = (VMCI_INVALID_HANDLE, None, None)
_TABLE_LOCK = threading.Lock()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_alloc(handle, produce, consume, peer, flags, priv) -> Tuple[int, Optional[VMCIHandle]]:
    """VMCI_SUCCESS and the handle (None: a fresh one), or the code of the first bad argument."""
    try:
        handle = as_handle(handle)
    except VMCIError:
        return VMCI_ERROR_INVALID_ARGS, None
    for value in (produce, consume, peer, flags, priv):
        if not _is_int(value) or value < 0:
            return VMCI_ERROR_INVALID_ARGS, None
    if produce >= _U64 or consume >= _U64 or peer > VMCI_INVALID_ID or produce == consume == 0:
        return VMCI_ERROR_INVALID_ARGS, None
    if priv & ~VMCI_PRIVILEGE_ALL_FLAGS:
        return VMCI_ERROR_INVALID_ARGS, None
    if priv != VMCI_NO_PRIVILEGE_FLAGS:
        return VMCI_ERROR_NO_ACCESS, None
    return VMCI_SUCCESS, None if handle.resource == VMCI_INVALID_ID else handle


def _flat(buf, writable: bool) -> Optional[memoryview]:
    """``buf`` as a flat byte view, or None when it is not a buffer (or is read-only when
    ``writable``)."""
    try:
        view = memoryview(buf)
    except TypeError:
        return None
    if writable and view.readonly:
        return None
    if view.ndim != 1 or view.itemsize != 1:
        try:
            view = view.cast("B")
        except TypeError:
            return None
    return view


def _byte_view(buf, size, writable: bool) -> Optional[memoryview]:
    """``buf[:size]`` as a flat byte view, or None (not a buffer, read-only, or shorter than size)."""
    if not _is_int(size) or size < 0:
        return None
    view = _flat(buf, writable)
    return view[:size] if view is not None and size <= len(view) else None


def _iov_views(iov, size, writable: bool) -> Optional[List[memoryview]]:
    """The buffers of ``iov`` cut to ``size`` bytes in all, or None (bad buffer, or too short)."""
    if not isinstance(iov, (list, tuple)) or not _is_int(size) or size < 0:
        return None
    views, left = [], size
    for buf in iov:
        view = _flat(buf, writable)
        if view is None:
            return None
        views.append(view[:left])
        left -= len(views[-1])
    return views if left == 0 else None


class QueuePairCalls:
    """The queue-pair calls of ``VMCILibrary`` (mixed into it).

    Uses the library's ``_initialised``, ``_lock`` and ``runtime``; keeps its own
    tables of the pairs allocated through it. ``_detach_all_queue_pairs`` is for
    ``VMCI_CleanupApp``.
    """

    def _qp_tables(self) -> Tuple[Dict[VMCIHandle, List[QueuePair]], Dict[int, QueuePair]]:
        """(2008 pairs by handle, 2010+ pairs by id of the object) of this library."""
        tables = self.__dict__.get("_qp_tables_")
        if tables is None:
            with _TABLE_LOCK:
                tables = self.__dict__.setdefault("_qp_tables_", ({}, {}))
        return tables

    def _alloc(self, handle, produce, consume, peer, flags, priv) -> Tuple[int, Optional[QueuePair]]:
        if not self._initialised:
            return VMCI_ERROR_UNAVAILABLE, None
        rv, handle = _check_alloc(handle, produce, consume, peer, flags, priv)
        if rv != VMCI_SUCCESS:
            return rv, None
        try:
            qp = QueuePair.alloc(handle, produce, consume, peer, flags, runtime=self.runtime)
        except VMCIError as exc:
            return exc.code, None
        except OSError:
            return VMCI_ERROR_NO_RESOURCES, None
        return (VMCI_SUCCESS_QUEUEPAIR_CREATE if qp.created else VMCI_SUCCESS_QUEUEPAIR_ATTACH), qp

    # 2008: VMCIQueuePair_*

    def VMCIQueuePair_Alloc(self, handle, produceSize, consumeSize, peer, flags):
        """Create the pair ``handle`` (VMCI_INVALID_HANDLE: a fresh one) or attach to it:
        ``(VMCI_SUCCESS_QUEUEPAIR_CREATE or _ATTACH, handle, produceQ, consumeQ)``."""
        return self.VMCIQueuePair_AllocPriv(handle, produceSize, consumeSize, peer, flags,
                                            VMCI_NO_PRIVILEGE_FLAGS)

    def VMCIQueuePair_AllocPriv(self, handle, produceSize, consumeSize, peer, flags, privFlags):
        """``VMCIQueuePair_Alloc`` with privilege flags (only VMCI_NO_PRIVILEGE_FLAGS is allowed)."""
        rv, qp = self._alloc(handle, produceSize, consumeSize, peer, flags, privFlags)
        if qp is None:
            return (rv,) + _FAILED_2008
        with self._lock:
            self._qp_tables()[0].setdefault(qp.handle, []).append(qp)
        # A pair carried over a stream (across kernels) has no shared queue memory.
        produce_q, consume_q = qp.queue_memory() if hasattr(qp, "queue_memory") else (None, None)
        return rv, qp.handle, produce_q, consume_q

    def VMCIQueuePair_Detach(self, handle) -> int:
        """Detach this library's end of the pair ``handle``; its queue views are released.
        VMCI_ERROR_NOT_FOUND if this library has no end of it (e.g. twice)."""
        if not self._initialised:
            return VMCI_ERROR_UNAVAILABLE
        try:
            handle = as_handle(handle)
        except VMCIError:
            return VMCI_ERROR_INVALID_ARGS
        with self._lock:
            ends = self._qp_tables()[0].get(handle)
            qp = ends.pop() if ends else None
            if ends == []:
                del self._qp_tables()[0][handle]
        if qp is None:
            return VMCI_ERROR_NOT_FOUND
        return qp.detach_status()

    # 2010+: vmci_qpair_*

    def vmci_qpair_alloc(self, handle, produce_qsize, consume_qsize, peer, flags, priv_flags):
        """Create or attach (see ``VMCIQueuePair_Alloc``): ``(VMCI_SUCCESS, qpair, handle)``,
        or ``(code, None, VMCI_INVALID_HANDLE)``."""
        rv, qp = self._alloc(handle, produce_qsize, consume_qsize, peer, flags, priv_flags)
        if qp is None:
            return rv, None, VMCI_INVALID_HANDLE
        with self._lock:
            self._qp_tables()[1][id(qp)] = qp
        return VMCI_SUCCESS, qp, qp.handle

    def _qpair(self, qpair) -> Optional[QueuePair]:
        """The live pair ``qpair`` if this library handed it out (the kernel's non-NULL check)."""
        if not self._initialised:
            return None
        found = self._qp_tables()[1].get(id(qpair))
        if found is None or found is not qpair or getattr(found, "detached", False):
            return None
        return found

    def _not_live(self) -> int:
        return VMCI_ERROR_UNAVAILABLE if not self._initialised else VMCI_ERROR_INVALID_ARGS

    def vmci_qpair_detach(self, qpair) -> int:
        """Detach ``qpair``: VMCI_SUCCESS or VMCI_SUCCESS_LAST_DETACH. The object is dead after
        this call whatever it returns (a second detach: VMCI_ERROR_INVALID_ARGS)."""
        qp = self._qpair(qpair)
        if qp is None:
            return self._not_live()
        with self._lock:
            self._qp_tables()[1].pop(id(qp), None)
        return qp.detach_status()

    def vmci_qpair_enqueue(self, qpair, buf, buf_size, mode=0) -> int:
        """Write what fits of ``buf[:buf_size]``: the count, QUEUEPAIR_NOSPACE, QUEUEPAIR_NOTATTACHED."""
        qp = self._qpair(qpair)
        if qp is None:
            return self._not_live()
        view = _byte_view(buf, buf_size, False)
        if view is None or not _is_int(mode):
            return VMCI_ERROR_INVALID_ARGS
        return qp.enqueue_status(view)

    def vmci_qpair_dequeue(self, qpair, buf, buf_size, mode=0) -> int:
        """Read up to ``buf_size`` bytes into ``buf``: the count, QUEUEPAIR_NODATA, ..."""
        return self._read(qpair, buf, buf_size, mode, True)

    def vmci_qpair_peek(self, qpair, buf, buf_size, mode=0) -> int:
        """Like ``vmci_qpair_dequeue`` without consuming."""
        return self._read(qpair, buf, buf_size, mode, False)

    def _read(self, qpair, buf, buf_size, mode, consume: bool) -> int:
        qp = self._qpair(qpair)
        if qp is None:
            return self._not_live()
        view = _byte_view(buf, buf_size, True)
        if view is None or not _is_int(mode):
            return VMCI_ERROR_INVALID_ARGS
        return qp.dequeue_status(view) if consume else qp.peek_status(view)

    def vmci_qpair_enquev(self, qpair, iov, iov_size, mode=0) -> int:
        """Write what fits of the first ``iov_size`` bytes of the buffers ``iov``, in order."""
        qp = self._qpair(qpair)
        if qp is None:
            return self._not_live()
        views = _iov_views(iov, iov_size, False)
        if views is None or not _is_int(mode):
            return VMCI_ERROR_INVALID_ARGS
        total = 0
        for view in views:
            if not len(view):
                continue
            rc = qp.enqueue_status(view)
            if rc < 0:
                return rc if total == 0 else total
            total += rc
            if rc < len(view):
                break
        return total

    def vmci_qpair_dequev(self, qpair, iov, iov_size, mode=0) -> int:
        """Read up to ``iov_size`` bytes into the buffers ``iov``, in order: the count or a code."""
        return self._readv(qpair, iov, iov_size, mode, True)

    def vmci_qpair_peekv(self, qpair, iov, iov_size, mode=0) -> int:
        """Like ``vmci_qpair_dequev`` without consuming."""
        return self._readv(qpair, iov, iov_size, mode, False)

    def _readv(self, qpair, iov, iov_size, mode, consume: bool) -> int:
        qp = self._qpair(qpair)
        if qp is None:
            return self._not_live()
        views = _iov_views(iov, iov_size, True)
        if views is None or not _is_int(mode):
            return VMCI_ERROR_INVALID_ARGS
        # One read of everything wanted, then scattered: a peek cannot be split in calls.
        scratch = bytearray(iov_size)
        rc = qp.dequeue_status(scratch) if consume else qp.peek_status(scratch)
        if rc <= 0:
            return rc
        at = 0
        for view in views:
            n = min(len(view), rc - at)
            view[:n] = scratch[at:at + n]
            at += n
            if at == rc:
                break
        return rc

    def _count(self, qpair, name: str) -> int:
        qp = self._qpair(qpair)
        if qp is None:
            return self._not_live()
        try:
            return getattr(qp, name)()
        except VMCIError as exc:
            return exc.code

    def vmci_qpair_produce_free_space(self, qpair) -> int:
        """Bytes ``vmci_qpair_enqueue`` can write now, or a code."""
        return self._count(qpair, "produce_free_space")

    def vmci_qpair_produce_buf_ready(self, qpair) -> int:
        """Bytes we wrote that the peer has not read, or a code."""
        return self._count(qpair, "produce_buf_ready")

    def vmci_qpair_consume_free_space(self, qpair) -> int:
        """Free bytes in the peer's produce queue, or a code."""
        return self._count(qpair, "consume_free_space")

    def vmci_qpair_consume_buf_ready(self, qpair) -> int:
        """Bytes ``vmci_qpair_dequeue`` can read now, or a code."""
        return self._count(qpair, "consume_buf_ready")

    def vmci_qpair_get_produce_indexes(self, qpair) -> Tuple[int, int, int]:
        """``(VMCI_SUCCESS, producer_tail, consumer_head)`` of our produce queue; the rv is
        VMCI_ERROR_INVALID_SIZE when an index is out of range (the indexes still come back)."""
        return self._indexes(qpair, True)

    def vmci_qpair_get_consume_indexes(self, qpair) -> Tuple[int, int, int]:
        """``(VMCI_SUCCESS, consumer_tail, producer_head)`` of our consume queue (the peer's
        tail, our head); VMCI_ERROR_INVALID_SIZE as ``vmci_qpair_get_produce_indexes``."""
        return self._indexes(qpair, False)

    def _indexes(self, qpair, produce: bool) -> Tuple[int, int, int]:
        qp = self._qpair(qpair)
        if qp is None:
            return self._not_live(), 0, 0
        if not hasattr(qp, "ring"):  # carried over a stream: no shared queue header to read
            return VMCI_ERROR_UNAVAILABLE, 0, 0
        tail, head = qp.ring.produce_indexes() if produce else qp.ring.consume_indexes()
        size = qp.produce_size if produce else qp.consume_size
        # As the kernel: an index >= the size (any index of a zero-size queue) is INVALID_SIZE.
        return (VMCI_ERROR_INVALID_SIZE if tail >= size or head >= size else VMCI_SUCCESS), tail, head

    def _detach_all_queue_pairs(self) -> None:
        """Detach every pair allocated through this library (for ``VMCI_CleanupApp``)."""
        with self._lock:
            by_handle, by_id = self._qp_tables()
            pairs = [qp for ends in by_handle.values() for qp in ends] + list(by_id.values())
            by_handle.clear()
            by_id.clear()
        for qp in pairs:
            if not qp.detached:
                qp.detach_status()
