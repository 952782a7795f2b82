# The per-datagram paths of one endpoint, each one call into the core: Fastpath (see _core.pyi).
# Included from _cvsc.pyx after Link and Receiver, whose cdef methods it calls directly.
from cpython.pythread cimport (NOWAIT_LOCK, PY_LOCK_ACQUIRED, PyLockStatus, PyThread_acquire_lock,
                               PyThread_allocate_lock, PyThread_free_lock, PyThread_release_lock,
                               PyThread_type_lock)


cdef extern from "pythread.h":
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock lock, long long microseconds,
                                             int intr_flag) nogil


cdef extern from "vsc_dgram.h":
    int VMCI_ERROR_NO_MORE_DATAGRAMS


cdef class RecvLock:
    """A lock like ``threading.Lock`` (not reentrant): ``acquire()`` waits without the GIL and
    runs signal handlers meanwhile; a context manager too."""

    cdef PyThread_type_lock _lock
    cdef bint _locked

    def __cinit__(self):
        self._lock = PyThread_allocate_lock()
        if self._lock == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self._lock != NULL:
            if self._locked:
                PyThread_release_lock(self._lock)
            PyThread_free_lock(self._lock)

    cdef int _acquire(self) except -1:
        cdef PyLockStatus got
        if not PyThread_acquire_lock(self._lock, NOWAIT_LOCK):
            while True:
                with nogil:
                    got = PyThread_acquire_lock_timed(self._lock, -1, 1)
                if got == PY_LOCK_ACQUIRED:
                    break
                PyErr_CheckSignals()  # interrupted: a handler may raise (the lock is not held)
        self._locked = True
        return 0

    cdef inline void _release(self) noexcept:
        self._locked = False
        PyThread_release_lock(self._lock)

    def acquire(self):
        self._acquire()
        return True

    def release(self):
        if not self._locked:
            raise RuntimeError("release unlocked lock")
        self._release()

    def locked(self):
        return self._locked

    def __enter__(self):
        self._acquire()
        return True

    def __exit__(self, *exc):
        self._release()


_NOBODY = object()  # never a tag: the source cache starts empty


cdef class Fastpath:
    """One endpoint's ``send_status`` and ``recv_status``, each one call (see _core.pyi)."""

    cdef Receiver _rx
    cdef object _spill
    cdef readonly RecvLock recv_lock
    cdef dict _links
    cdef object _last_dst
    cdef Link _last_link
    cdef object _send_slow
    cdef object _recv_slow
    cdef object _last_tag
    cdef object _last_src
    cdef public bint closing
    cdef public object held
    cdef public object last_peer
    cdef public unsigned long long sent
    cdef public unsigned long long received

    def __cinit__(self, Receiver receiver not None, spill, send_slow, recv_slow):
        self._rx = receiver
        self._spill = spill
        self.recv_lock = RecvLock()
        self._links = {}
        self._send_slow = send_slow
        self._recv_slow = recv_slow
        self._last_tag = _NOBODY

    def add_link(self, dst, Link link not None):
        """Send to ``dst`` on ``link`` from now on."""
        self._links[dst] = link

    def drop_link(self, dst):
        """Forget the link to ``dst`` (the next send to it goes to ``send_slow``)."""
        self._links.pop(dst, None)
        self._last_dst = None
        self._last_link = None

    def clear_links(self):
        self._links.clear()
        self._last_dst = None
        self._last_link = None

    def send_status(self, dst, buf, Py_ssize_t length):
        """Send ``length`` bytes of ``buf`` to ``dst``; the frame size or a VMCI error code."""
        cdef Link link
        cdef int rc
        if self.closing:
            return VMCI_ERROR_INVALID_ARGS
        if dst is self._last_dst and self._last_link is not None:
            link = self._last_link  # a reply, or a client, names one handle object again and again
        else:
            found = self._links.get(dst)
            if found is None:
                return self._send_slow(dst, buf, length, None)
            link = <Link>found
            self._last_dst = dst
            self._last_link = link
        rc = link._send(buf, length)
        if rc >= 0:
            self.sent += 1
            return rc
        if rc > VSC_AGAIN:  # a VMCI code; the core's own statuses (PEER_GONE, STALE) are <= AGAIN
            return rc
        return self._send_slow(dst, buf, length, link)

    def recv_status(self, buf, timeout=None):
        """One datagram into ``buf``: ``(payload_length, src)`` or ``(VMCI code, None)``."""
        cdef Py_ssize_t n, room
        self.recv_lock._acquire()
        try:
            if self.closing:
                return VMCI_ERROR_NO_MORE_DATAGRAMS, None
            if self.held is not None or timeout is not None:
                return self._recv_slow(buf, timeout, None, None)
            tag = self._rx._take(buf, self._spill, None, &n, &room)
            if n < 0 or n > room:
                return self._recv_slow(buf, None, n, tag)
            if tag is not self._last_tag:
                self._last_src = tag.handle
                self._last_tag = tag
            self.last_peer = tag
            self.received += 1
            return n, self._last_src
        finally:
            self.recv_lock._release()
