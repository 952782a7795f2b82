"""Pure-Python queue-pair rings: the layout and arithmetic of ``src/vsc_ring.c``.

Index words are read and written as native 64-bit words through memoryview
casts (one aligned 8-byte access each, never torn). CPython gives no
acquire/release primitives; the stores below are ordered as the C core orders
them (data, then tail; copy, then head), which x86-64's ordering preserves. A
full fence (for the waiting bits) is a lock acquire/release, a locked
instruction on x86-64.
"""
import ctypes
import threading

from .constants import (
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_INVALID_SIZE,
    VMCI_ERROR_QUEUEPAIR_NODATA,
    VMCI_ERROR_QUEUEPAIR_NOSPACE,
)

__all__ = ["QP_PAGE_SIZE", "QP_MAX_RING_SIZE", "QP_WAITING_READ", "QP_WAITING_WRITE", "Ring"]

QP_PAGE_SIZE = 4096
QP_MAX_RING_SIZE = 1 << 62
QP_WAITING_READ = 1
QP_WAITING_WRITE = 2
_WAITING_BITS = 3  # the waiting word: these bits, the owner's sleep count above them
_WAITING_ARM = 4
# Word indexes in a header page: handle, producerTail, consumerHead, private waiting bits.
_W_HANDLE, _W_TAIL, _W_HEAD, _W_WAITING = 0, 1, 2, 8
_FENCE = threading.Lock()


def _fence():
    _FENCE.acquire()
    _FENCE.release()


def _space(tail, head, size):
    if tail >= size or head >= size:
        return VMCI_ERROR_INVALID_SIZE
    return size - (tail - head) - 1 if tail >= head else head - tail - 1


def _queue(buf, size):
    view = memoryview(buf)
    if view.readonly:
        raise BufferError("queue memory must be writable")
    view = view.cast("B")
    if len(view) < QP_PAGE_SIZE + size:
        raise ValueError("a queue needs a %d-byte header page plus its size" % QP_PAGE_SIZE)
    if ctypes.addressof(ctypes.c_char.from_buffer(view)) % 8:
        raise ValueError("queue memory must be 8-byte aligned")
    return view[:QP_PAGE_SIZE].cast("Q"), view[QP_PAGE_SIZE:QP_PAGE_SIZE + size]


def _check_size(size):
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError("a ring size must be an int, got %r" % (size,))
    if size < 0:
        raise OverflowError("a ring size must be >= 0")
    if size >= QP_MAX_RING_SIZE:
        raise ValueError("a ring size must be below 2**62")
    return size


class Ring:
    """One endpoint's view of a queue pair: see ``Ring`` in ``_core.pyi``."""

    __slots__ = ("produce_size", "consume_size", "_ph", "_pd", "_ch", "_cd", "_cdata", "_lent")

    def __init__(self, produce_q, consume_q, produce_size, consume_size):
        self._ph = self._pd = self._ch = self._cd = self._cdata = None
        self._lent = []
        self.produce_size = _check_size(produce_size)
        self.consume_size = _check_size(consume_size)
        self._ph, self._pd = _queue(produce_q, produce_size)
        self._ch, self._cd = _queue(consume_q, consume_size)
        self._cdata = self._cd.toreadonly()  # peek_view slices it

    def _views(self):
        if self._ph is None:
            raise ValueError("the ring's memory was released")
        return self._ph, self._ch

    def initialise(self, context, resource):
        if not (0 <= context <= 0xFFFFFFFF and 0 <= resource <= 0xFFFFFFFF):
            raise OverflowError("a handle field must be in 0..0xFFFFFFFF")
        for words in self._views():
            for i in range(len(words)):
                words[i] = 0
            words[_W_HANDLE] = resource << 32 | context

    def _produce(self):
        ph, ch = self._views()
        if self.produce_size == 0:
            return 0, 0
        tail = ph[_W_TAIL]
        return _space(tail, ch[_W_HEAD], self.produce_size), tail

    def _consume(self):
        ph, ch = self._views()
        size = self.consume_size
        if size == 0:
            return 0, 0
        head = ph[_W_HEAD]
        free = _space(ch[_W_TAIL], head, size)
        return (free if free < 0 else size - free - 1), head

    def produce_free_space(self):
        return self._produce()[0]

    def consume_buf_ready(self):
        return self._consume()[0]

    def produce_buf_ready(self):
        free = self._produce()[0]
        return free if free < 0 or self.produce_size == 0 else self.produce_size - free - 1

    def consume_free_space(self):
        ready = self._consume()[0]
        return ready if ready < 0 or self.consume_size == 0 else self.consume_size - ready - 1

    def _copy_in(self, tail, src):
        data, size, n = self._pd, self.produce_size, len(src)
        first = min(size - tail, n)
        data[tail:tail + first] = src[:first]
        if n > first:
            data[:n - first] = src[first:]
        tail += n
        return tail - size if tail >= size else tail

    def enqueue(self, buf):
        free, tail = self._produce()
        if free <= 0:
            return free if free < 0 else VMCI_ERROR_QUEUEPAIR_NOSPACE
        src = memoryview(buf).cast("B")
        n = min(len(src), free)
        if n:
            self._ph[_W_TAIL] = self._copy_in(tail, src[:n])
        return n

    def enqueue_many(self, bufs):
        bufs = [memoryview(b).cast("B") for b in bufs]
        free, tail = self._produce()
        if free < 0 or not bufs:
            return free if free < 0 else 0
        if free == 0:
            return VMCI_ERROR_QUEUEPAIR_NOSPACE
        msgs = 0
        for src in bufs:
            if len(src) > free:
                break
            if len(src):
                tail = self._copy_in(tail, src)
            free -= len(src)
            msgs += 1
        if msgs == 0:
            return VMCI_ERROR_QUEUEPAIR_NOSPACE
        self._ph[_W_TAIL] = tail
        return msgs

    def _read(self, dst, advance):
        ready, head = self._consume()
        if ready <= 0:
            return ready if ready < 0 else VMCI_ERROR_QUEUEPAIR_NODATA
        n = min(len(dst), ready)
        data, size = self._cd, self.consume_size
        first = min(size - head, n)
        dst[:first] = data[head:head + first]
        if n > first:
            dst[first:n] = data[:n - first]
        if advance and n:
            head += n
            self._ph[_W_HEAD] = head - size if head >= size else head
        return n

    def _read_bytes(self, n, advance):
        _check_count(n)
        ready = self._consume()[0]
        if ready <= 0:
            return ready if ready < 0 else VMCI_ERROR_QUEUEPAIR_NODATA
        out = bytearray(min(n, ready))
        rc = self._read(memoryview(out), advance)
        return bytes(out) if rc == len(out) else rc

    def dequeue_into(self, buf):
        return self._read(_writable(buf), True)

    def peek_into(self, buf):
        return self._read(_writable(buf), False)

    def dequeue(self, n):
        return self._read_bytes(n, True)

    def peek(self, n):
        return self._read_bytes(n, False)

    def peek_view(self, n):
        _check_count(n)
        ready, head = self._consume()
        if ready <= 0:
            return ready if ready < 0 else VMCI_ERROR_QUEUEPAIR_NODATA
        n = min(n, ready, self.consume_size - head)  # up to the wrap point
        view = self._cdata[head:head + n]
        self._lent.append(view)
        return view

    def consume(self, n):
        _check_count(n)
        ready, head = self._consume()
        if ready < 0:
            return ready
        if n > ready:
            return VMCI_ERROR_INVALID_ARGS
        if n:
            head += n
            size = self.consume_size
            self._ph[_W_HEAD] = head - size if head >= size else head
        _release_views(self._lent)
        return n

    def produce_indexes(self):
        ph, ch = self._views()
        return ph[_W_TAIL], ch[_W_HEAD]

    def consume_indexes(self):
        ph, ch = self._views()
        return ch[_W_TAIL], ph[_W_HEAD]

    def set_waiting(self, bits):
        ph = self._views()[0]
        ph[_W_WAITING] = ph[_W_WAITING] & ~_WAITING_BITS | bits & _WAITING_BITS
        _fence()

    def peer_waiting(self):
        _fence()
        return self._views()[1][_W_WAITING]

    def arm_wait(self, bits, want):
        ph = self._views()[0]
        count = (ph[_W_WAITING] & ~_WAITING_BITS) + _WAITING_ARM & 0xFFFFFFFFFFFFFFFF
        ph[_W_WAITING] = count | bits & _WAITING_BITS
        _fence()
        got = self.consume_buf_ready() if bits & QP_WAITING_READ else self.produce_free_space()
        if got < 0 or got >= want:
            ph[_W_WAITING] = count
        return got

    def release_memory(self):
        _release_views(self._lent)
        for name in ("_cdata", "_ph", "_pd", "_ch", "_cd"):
            view = getattr(self, name)
            if view is not None:
                view.release()
                setattr(self, name, None)


def _check_count(n):
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError("a byte count must be an int")
    if n < 0:
        raise ValueError("a byte count must be >= 0")


def _release_views(views):
    """Release lent views; one still exported elsewhere keeps its memory mapped (stale, in bounds)."""
    for view in views:
        try:
            view.release()
        except BufferError:
            pass
    del views[:]


def _writable(buf):
    view = memoryview(buf)
    if view.readonly:
        raise BufferError("the destination buffer must be writable")
    return view.cast("B")
