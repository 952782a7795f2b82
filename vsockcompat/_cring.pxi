# Queue-pair rings over the C core in src/vsc_ring.c; included at the end of _cvsc.pyx.
from libc.stdlib cimport free as _free, malloc as _malloc
from libc.stdint cimport int64_t, uintptr_t
from posix.uio cimport iovec


cdef extern from "vsc_ring.h" nogil:
    ctypedef struct vsc_qp:
        uint8_t *produce_q
        uint8_t *consume_q
        uint64_t produce_size
        uint64_t consume_size

    int VSC_QP_PAGE_SIZE
    int VSC_QP_DATA_OFFSET
    int VSC_QP_OFF_WAITING
    unsigned int VSC_QP_WAITING_READ
    unsigned int VSC_QP_WAITING_WRITE
    int VMCI_ERROR_QUEUEPAIR_NODATA

    void vsc_qp_init_header(uint8_t *queue, uint32_t context, uint32_t resource)
    int64_t vsc_qp_free_space(const vsc_qp *qp)
    int64_t vsc_qp_buf_ready(const vsc_qp *qp)
    int64_t vsc_qp_produce_buf_ready(const vsc_qp *qp)
    int64_t vsc_qp_consume_free_space(const vsc_qp *qp)
    int64_t vsc_qp_enqueue(vsc_qp *qp, const void *buf, size_t n)
    int64_t vsc_qp_enqueuev(vsc_qp *qp, const iovec *iov, size_t count, size_t *msgs)
    int64_t vsc_qp_dequeue(vsc_qp *qp, void *buf, size_t n)
    int64_t vsc_qp_peek(const vsc_qp *qp, void *buf, size_t n)
    int64_t vsc_qp_peek_span(const vsc_qp *qp, size_t n, uint64_t *offset)
    int64_t vsc_qp_consume(vsc_qp *qp, size_t n)
    void vsc_qp_produce_indexes(const vsc_qp *qp, uint64_t *tail, uint64_t *head)
    void vsc_qp_consume_indexes(const vsc_qp *qp, uint64_t *tail, uint64_t *head)
    void vsc_qp_set_waiting(vsc_qp *qp, uint64_t bits)
    uint64_t vsc_qp_peer_waiting(const vsc_qp *qp)
    int64_t vsc_qp_arm_wait(vsc_qp *qp, uint64_t bits, uint64_t want)


QP_PAGE_SIZE = VSC_QP_PAGE_SIZE
QP_MAX_RING_SIZE = 1 << 62
cdef enum:
    _NOGIL_BYTES = 65536
QP_WAITING_READ = VSC_QP_WAITING_READ
QP_WAITING_WRITE = VSC_QP_WAITING_WRITE


cdef uint64_t _ring_size(size) except? 0:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError("a ring size must be an int, got %r" % (size,))
    if size < 0:
        raise OverflowError("a ring size must be >= 0")
    if size >= QP_MAX_RING_SIZE:
        raise ValueError("a ring size must be below 2**62")
    return size


cdef size_t _count(n) except? 0:
    # As the pure core: ints only (not bool), >= 0; any count past a ring's size means "more".
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError("a byte count must be an int")
    if n < 0:
        raise ValueError("a byte count must be >= 0")
    return n if n < QP_MAX_RING_SIZE else QP_MAX_RING_SIZE


cdef _release_views(list views):
    # A view something else still exports from (a numpy array, say) cannot be
    # released; its memory stays mapped (the export pins the mapping), so using it
    # is never out of bounds, only stale.
    for view in views:
        try:
            view.release()
        except BufferError:
            pass
    del views[:]


cdef class Ring:
    """One endpoint's view of a queue pair: see ``Ring`` in ``_core.pyi``."""

    cdef vsc_qp _qp
    cdef Py_buffer _pview
    cdef Py_buffer _cview
    cdef int _held  # 0: nothing, 1: _pview, 2: both views
    cdef object _cdata  # read-only memoryview of the consume data area; peek_view slices it
    cdef list _lent  # views handed out by peek_view, released by consume and release_memory

    def __cinit__(self, produce_q, consume_q, produce_size, consume_size):
        cdef uint64_t psize = _ring_size(produce_size), csize = _ring_size(consume_size)
        PyObject_GetBuffer(produce_q, &self._pview, PyBUF_WRITABLE)
        self._held = 1
        PyObject_GetBuffer(consume_q, &self._cview, PyBUF_WRITABLE)
        self._held = 2
        if (<uint64_t>self._pview.len < VSC_QP_DATA_OFFSET + psize
                or <uint64_t>self._cview.len < VSC_QP_DATA_OFFSET + csize):
            self.release_memory()
            raise ValueError("a queue needs a %d-byte header page plus its size" % VSC_QP_PAGE_SIZE)
        if (<uintptr_t>self._pview.buf) % 8 or (<uintptr_t>self._cview.buf) % 8:
            self.release_memory()
            raise ValueError("queue memory must be 8-byte aligned")
        self._qp.produce_q = <uint8_t *>self._pview.buf
        self._qp.consume_q = <uint8_t *>self._cview.buf
        self._qp.produce_size = psize
        self._qp.consume_size = csize
        self._cdata = memoryview(consume_q).cast("B")[VSC_QP_DATA_OFFSET:VSC_QP_DATA_OFFSET + csize].toreadonly()
        self._lent = []

    def __dealloc__(self):
        self.release_memory()

    cdef inline vsc_qp *qp(self) except NULL:
        if self._held != 2:
            raise ValueError("the ring's memory was released")
        return &self._qp

    @property
    def produce_size(self):
        return self._qp.produce_size

    @property
    def consume_size(self):
        return self._qp.consume_size

    def initialise(self, uint32_t context, uint32_t resource):
        cdef vsc_qp *qp = self.qp()
        vsc_qp_init_header(qp.produce_q, context, resource)
        vsc_qp_init_header(qp.consume_q, context, resource)

    def produce_free_space(self):
        return vsc_qp_free_space(self.qp())

    def produce_buf_ready(self):
        return vsc_qp_produce_buf_ready(self.qp())

    def consume_buf_ready(self):
        return vsc_qp_buf_ready(self.qp())

    def consume_free_space(self):
        return vsc_qp_consume_free_space(self.qp())

    def enqueue(self, buf):
        cdef vsc_qp *qp = self.qp()
        cdef Py_buffer view
        cdef int64_t rc
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            if view.len >= _NOGIL_BYTES:
                with nogil:
                    rc = vsc_qp_enqueue(qp, view.buf, <size_t>view.len)
            else:
                rc = vsc_qp_enqueue(qp, view.buf, <size_t>view.len)
        finally:
            PyBuffer_Release(&view)
        return rc

    def enqueue_many(self, bufs):
        cdef vsc_qp *qp = self.qp()
        cdef list items = list(bufs)
        cdef Py_ssize_t n = len(items), got = 0, i
        cdef Py_buffer *views
        cdef iovec *iov
        cdef size_t msgs = 0
        cdef int64_t rc
        if n == 0:
            return vsc_qp_enqueuev(qp, NULL, 0, &msgs)
        views = <Py_buffer *>_malloc(n * sizeof(Py_buffer))
        iov = <iovec *>_malloc(n * sizeof(iovec))
        if views == NULL or iov == NULL:
            _free(views)
            _free(iov)
            raise MemoryError()
        try:
            for i in range(n):
                PyObject_GetBuffer(items[i], &views[i], PyBUF_SIMPLE)
                got += 1
                iov[i].iov_base = views[i].buf
                iov[i].iov_len = <size_t>views[i].len
            rc = vsc_qp_enqueuev(qp, iov, <size_t>n, &msgs)
        finally:
            for i in range(got):
                PyBuffer_Release(&views[i])
            _free(views)
            _free(iov)
        return rc if rc < 0 else <Py_ssize_t>msgs

    cdef int64_t _read(self, buf, bint advance) except? -9999:
        cdef vsc_qp *qp = self.qp()
        cdef Py_buffer view
        cdef int64_t rc
        PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
        try:
            with nogil:
                rc = vsc_qp_dequeue(qp, view.buf, <size_t>view.len) if advance else \
                    vsc_qp_peek(qp, view.buf, <size_t>view.len)
        finally:
            PyBuffer_Release(&view)
        return rc

    cdef object _read_bytes(self, Py_ssize_t n, bint advance):
        cdef vsc_qp *qp = self.qp()
        cdef int64_t ready, rc
        cdef bytes out
        if n < 0:
            raise ValueError("a byte count must be >= 0")
        ready = vsc_qp_buf_ready(qp)
        if ready <= 0:
            return VMCI_ERROR_QUEUEPAIR_NODATA if ready == 0 else ready
        # The ready count only grows until we read, so exactly min(n, ready) bytes come out.
        out = PyBytes_FromStringAndSize(NULL, min(n, ready))
        rc = vsc_qp_dequeue(qp, PyBytes_AS_STRING(out), len(out)) if advance else \
            vsc_qp_peek(qp, PyBytes_AS_STRING(out), len(out))
        return out if rc == len(out) else rc

    def dequeue_into(self, buf):
        return self._read(buf, True)

    def peek_into(self, buf):
        return self._read(buf, False)

    def dequeue(self, Py_ssize_t n):
        return self._read_bytes(n, True)

    def peek(self, Py_ssize_t n):
        return self._read_bytes(n, False)

    def peek_view(self, n):
        cdef uint64_t offset
        cdef size_t k = _count(n)
        cdef int64_t rc = vsc_qp_peek_span(self.qp(), k, &offset)
        if rc < 0:
            return rc
        view = self._cdata[offset:offset + <uint64_t>rc]
        self._lent.append(view)
        return view

    def consume(self, n):
        cdef size_t k = _count(n)
        cdef int64_t rc = vsc_qp_consume(self.qp(), k)
        if rc >= 0 and self._lent:
            _release_views(self._lent)
        return rc

    def produce_indexes(self):
        cdef uint64_t tail, head
        vsc_qp_produce_indexes(self.qp(), &tail, &head)
        return tail, head

    def consume_indexes(self):
        cdef uint64_t tail, head
        vsc_qp_consume_indexes(self.qp(), &tail, &head)
        return tail, head

    def set_waiting(self, uint64_t bits):
        vsc_qp_set_waiting(self.qp(), bits)

    def peer_waiting(self):
        return vsc_qp_peer_waiting(self.qp())

    def arm_wait(self, uint64_t bits, uint64_t want):
        return vsc_qp_arm_wait(self.qp(), bits, want)

    def release_memory(self):
        if self._lent:
            _release_views(self._lent)
        if self._cdata is not None:
            self._cdata.release()
            self._cdata = None
        if self._held >= 2:
            PyBuffer_Release(&self._cview)
        if self._held >= 1:
            PyBuffer_Release(&self._pview)
        self._held = 0
