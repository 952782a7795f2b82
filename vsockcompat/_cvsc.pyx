# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython data-plane core: the contract of ``_core.pyi`` over the C core (src/vsc_dgram.c)."""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset


cdef extern from "vsc_dgram.h" nogil:
    ctypedef struct vsc_handle:
        uint32_t context
        uint32_t resource

    ctypedef struct vsc_dg_header:
        vsc_handle dst
        vsc_handle src
        uint64_t payload_size

    ctypedef struct vsc_link:
        int fd

    ctypedef struct vsc_rx:
        int epfd
        int last_fd

    int VSC_AGAIN
    int VSC_PEER_GONE
    int VSC_BAD_FRAME
    int VSC_FORGED
    int VSC_ACCEPT
    int VSC_WAKE
    int VSC_INTR
    int VSC_DENIED
    int VSC_STALE
    int VSC_ACCT_SIZE
    unsigned int VSC_ACCT_MAGIC
    unsigned int VSC_ACCT_VERSION
    int VSC_ACCT_OFF_LIMIT
    int VSC_ACCT_OFF_CLOSED
    int VSC_ACCT_OFF_ACL_EPOCH
    int VMCI_DG_HEADERSIZE
    int VMCI_ERROR_INVALID_ARGS
    int VMCI_ERROR_NO_RESOURCES

    void vsc_dg_encode_header(uint8_t *out, const vsc_dg_header *h)
    void vsc_dg_decode_header(const uint8_t *inp, vsc_dg_header *h)
    int vsc_acct_init(uint8_t *acct, uint64_t limit)
    void vsc_acct_close(uint8_t *acct)
    uint64_t vsc_acct_queued(const uint8_t *acct)
    int vsc_dg_send(int sock_fd, uint8_t *acct, const vsc_dg_header *h, const void *payload,
                    int *sys_errno)
    ssize_t vsc_dg_recv(int sock_fd, uint8_t *acct, vsc_dg_header *h, void *buf, size_t buf_len,
                        void *spill, size_t spill_len, int *sys_errno)
    void vsc_link_init(vsc_link *link, int fd, uint8_t *acct, vsc_handle dst, vsc_handle src)
    void vsc_link_close(vsc_link *link)
    int vsc_link_send(vsc_link *link, const void *payload, uint64_t length, int *sys_errno)
    int vsc_rx_init(vsc_rx *rx, int listener_fd, int wake_fd, uint8_t *acct, vsc_handle self)
    void vsc_rx_destroy(vsc_rx *rx)
    int vsc_rx_add(vsc_rx *rx, int fd, vsc_handle src)
    void vsc_rx_remove(vsc_rx *rx, int fd)
    ssize_t vsc_rx_recv(vsc_rx *rx, void *buf, size_t buf_len, void *spill, size_t spill_len,
                        int timeout_ms, int *sys_errno)
    void vsc_rx_set_polled(vsc_rx *rx, int polled)


cdef extern from "Python.h":
    int PyErr_CheckSignals() except -1


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *mutex, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)


cdef extern from "<errno.h>" nogil:
    int EAGAIN
    int ENOMEM


cdef extern from "<sys/socket.h>" nogil:
    int c_shutdown "shutdown"(int fd, int how)
    int SHUT_WR


cdef extern from "<poll.h>" nogil:  # pollfd and c_poll: declared in _cqstream.pxi
    short POLLHUP
    short POLLERR
    short POLLNVAL


cdef extern from *:
    """
    #define vsc_atomic_load_u64(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    """
    uint64_t vsc_atomic_load_u64(uint64_t *p) nogil


NAME = "cython"
AGAIN = VSC_AGAIN
PEER_GONE = VSC_PEER_GONE
BAD_FRAME = VSC_BAD_FRAME
FORGED = VSC_FORGED
ACCEPT = VSC_ACCEPT
WAKE = VSC_WAKE
DENIED = VSC_DENIED
STALE = VSC_STALE
ACCOUNT_SIZE = VSC_ACCT_SIZE
ACCOUNT_MAGIC = VSC_ACCT_MAGIC
ACCOUNT_VERSION = VSC_ACCT_VERSION


cdef inline void _fill(vsc_dg_header *h, uint32_t dc, uint32_t dr, uint32_t sc, uint32_t sr, uint64_t n):
    h.dst.context = dc
    h.dst.resource = dr
    h.src.context = sc
    h.src.resource = sr
    h.payload_size = n


def encode_header(uint32_t dst_context, uint32_t dst_resource, uint32_t src_context,
                  uint32_t src_resource, uint64_t payload_size):
    """Return the 24-byte VMCI datagram header."""
    cdef vsc_dg_header h
    cdef bytes out = PyBytes_FromStringAndSize(NULL, VMCI_DG_HEADERSIZE)
    _fill(&h, dst_context, dst_resource, src_context, src_resource, payload_size)
    vsc_dg_encode_header(<uint8_t *>PyBytes_AS_STRING(out), &h)
    return out


def decode_header(frame):
    """Return ``(dst_context, dst_resource, src_context, src_resource, payload_size)``.

    Raises ValueError if ``frame`` is shorter than a header.
    """
    cdef Py_buffer view
    cdef vsc_dg_header h
    PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
    try:
        if view.len < VMCI_DG_HEADERSIZE:
            raise ValueError("a datagram header needs %d bytes, got %d" % (VMCI_DG_HEADERSIZE, view.len))
        vsc_dg_decode_header(<const uint8_t *>view.buf, &h)
    finally:
        PyBuffer_Release(&view)
    return (h.dst.context, h.dst.resource, h.src.context, h.src.resource, h.payload_size)


def encode_datagram(uint32_t dst_context, uint32_t dst_resource, uint32_t src_context,
                    uint32_t src_resource, payload):
    """Return header and payload as one frame."""
    cdef Py_buffer view
    cdef vsc_dg_header h
    cdef bytes out
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        out = PyBytes_FromStringAndSize(NULL, VMCI_DG_HEADERSIZE + view.len)
        _fill(&h, dst_context, dst_resource, src_context, src_resource, <uint64_t>view.len)
        vsc_dg_encode_header(<uint8_t *>PyBytes_AS_STRING(out), &h)
        memcpy(PyBytes_AS_STRING(out) + VMCI_DG_HEADERSIZE, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return out


cdef class Account:
    """A receiving endpoint's queue account: one shared page, see vsc_dgram.h."""

    cdef readonly int fd
    cdef Py_buffer _view
    cdef uint8_t *_page
    cdef bint _held

    def __cinit__(self, int fd, page):
        PyObject_GetBuffer(page, &self._view, PyBUF_WRITABLE)
        self._held = True
        if self._view.len < VSC_ACCT_SIZE:
            self.release_memory()
            raise ValueError("an account page needs %d bytes" % VSC_ACCT_SIZE)
        self._page = <uint8_t *>self._view.buf
        self.fd = fd

    def __dealloc__(self):
        self.release_memory()

    cdef inline uint8_t *page(self) except NULL:
        if not self._held:
            raise ValueError("the account's memory was released")
        return self._page

    def initialise(self, uint64_t limit):
        cdef int rc = vsc_acct_init(self.page(), limit)
        if rc != 0:
            raise OSError(rc, "cannot initialise the account lock")

    def is_valid(self):
        cdef uint8_t *p = self.page()
        return (<uint32_t *>p)[0] == VSC_ACCT_MAGIC and (<uint32_t *>p)[1] == VSC_ACCT_VERSION

    def mark_closed(self):
        vsc_acct_close(self.page())

    @property
    def closed(self):
        return (<uint64_t *>(self.page() + VSC_ACCT_OFF_CLOSED))[0] != 0

    @property
    def limit(self):
        return (<uint64_t *>(self.page() + VSC_ACCT_OFF_LIMIT))[0]

    def queued(self):
        return vsc_acct_queued(self.page())

    def release_memory(self):
        if self._held:
            self._held = False
            self._page = NULL
            PyBuffer_Release(&self._view)


def send_datagram(sock, Account account not None, uint32_t dst_context, uint32_t dst_resource,
                  uint32_t src_context, uint32_t src_resource, payload, Py_ssize_t length):
    """Send one datagram without blocking; see ``vsc_dg_send``."""
    cdef Py_buffer view
    cdef vsc_dg_header h
    cdef int rc, err, fd = sock.fileno()
    cdef uint8_t *page = account.page()
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        if length < 0 or length > view.len:
            return VMCI_ERROR_INVALID_ARGS
        _fill(&h, dst_context, dst_resource, src_context, src_resource, <uint64_t>length)
        with nogil:
            rc = vsc_dg_send(fd, page, &h, view.buf, &err)
    finally:
        PyBuffer_Release(&view)
    return rc


cdef inline uint64_t _acl_epoch(const uint8_t *page) nogil:
    return vsc_atomic_load_u64(<uint64_t *>(page + VSC_ACCT_OFF_ACL_EPOCH))


cdef class Link:
    """One endpoint's connection to one receiver: ``send`` is the datagram fast path.

    Thread-safe: sends and ``close`` serialise on the receiver's account lock.
    """

    cdef vsc_link _link
    cdef object _sock
    cdef Account _account
    cdef uint8_t *_page
    cdef uint64_t _epoch
    cdef bint _watch
    cdef bint _seal
    cdef bint _sealed
    cdef bint _seal_ready
    cdef pthread_mutex_t _seal_lock

    def __cinit__(self, sock, Account account not None, uint32_t dst_context, uint32_t dst_resource,
                  uint32_t src_context, uint32_t src_resource):
        cdef vsc_handle dst, src
        dst.context = dst_context
        dst.resource = dst_resource
        src.context = src_context
        src.resource = src_resource
        self._page = account.page()
        vsc_link_init(&self._link, sock.fileno(), self._page, dst, src)
        self._sock = sock
        self._account = account

    def watch_acl(self):
        """Read the receiver's ACL epoch word now; from then on ``send`` returns STALE, sending
        nothing, once the word differs (the receiver's privileges changed: check them again)."""
        self._epoch = _acl_epoch(self._account.page())
        self._watch = True

    def __dealloc__(self):
        if self._seal_ready:
            pthread_mutex_destroy(&self._seal_lock)

    def seal_when_full(self):
        """From now on a send that finds the socket full (``EAGAIN``) seals the link.

        For a socket whose non-blocking send may write *part* of a message before failing with
        ``EAGAIN`` (an AF_VSOCK SEQPACKET one): that send returns VMCI_ERROR_NO_RESOURCES, the
        socket is shut down for writing (``SHUT_WR``: the receiver reads every whole message
        sent before the cut, then the end; a cut message is never delivered) and nothing is
        sent on it again. A sealed link's ``send`` returns VMCI_ERROR_NO_RESOURCES until the
        receiver has closed the connection (one ``poll``: a hang-up), and STALE from then on
        (everything sent before the seal was read: replace the link, FIFO order is kept).
        """
        if not self._seal_ready:
            rc = pthread_mutex_init(&self._seal_lock, NULL)
            if rc != 0:
                raise OSError(rc, "cannot create the link's seal lock")
            self._seal_ready = True
        self._seal = True

    @property
    def sealed(self):
        """True once a send found the socket full after ``seal_when_full`` (and shut it down
        for writing)."""
        return bool(self._sealed)

    def send(self, payload, Py_ssize_t length):
        """Send ``length`` bytes of ``payload``: the frame size or a status (see ``vsc_link_send``)."""
        return self._send(payload, length)

    cdef int _send(self, payload, Py_ssize_t length) except? -1:
        cdef Py_buffer view
        cdef int rc, err
        if self._watch and _acl_epoch(self._page) != self._epoch:
            return VSC_STALE
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        if length < 0 or length > view.len:
            PyBuffer_Release(&view)
            return VMCI_ERROR_INVALID_ARGS
        with nogil:
            if self._seal:
                rc = self._send_sealing(view.buf, <uint64_t>length)
            else:
                rc = vsc_link_send(&self._link, view.buf, <uint64_t>length, &err)
        PyBuffer_Release(&view)
        return rc

    cdef int _send_sealing(self, const void *buf, uint64_t length) noexcept nogil:
        """``vsc_link_send`` under the seal lock: a send that meets ``EAGAIN`` seals the link
        (and shuts the socket down for writing) before any other thread may send."""
        cdef int rc, err = 0
        cdef pollfd gone
        pthread_mutex_lock(&self._seal_lock)
        if self._sealed:
            gone.fd = self._link.fd
            gone.events = 0  # hang-ups and errors are reported whatever is asked
            gone.revents = 0
            rc = VMCI_ERROR_NO_RESOURCES
            if gone.fd < 0:
                rc = VSC_PEER_GONE
            elif c_poll(&gone, 1, 0) > 0 and gone.revents & (POLLHUP | POLLERR | POLLNVAL):
                rc = VSC_STALE
            pthread_mutex_unlock(&self._seal_lock)
            return rc
        rc = vsc_link_send(&self._link, buf, length, &err)
        if err == EAGAIN or err == ENOMEM:  # the errors Linux may return after a partial send
            self._sealed = True
            c_shutdown(self._link.fd, SHUT_WR)  # fails only on a connection already gone
        pthread_mutex_unlock(&self._seal_lock)
        return rc

    def close(self):
        """Stop sending (waits for a send in progress); the caller then closes the socket."""
        with nogil:
            if self._seal_ready:  # a sealing send reads the descriptor under this lock
                pthread_mutex_lock(&self._seal_lock)
            vsc_link_close(&self._link)
            if self._seal_ready:
                pthread_mutex_unlock(&self._seal_lock)


cdef class Receiver:
    """The connections senders opened to one endpoint, served oldest first (``vsc_rx``)."""

    cdef vsc_rx _rx
    cdef bint _ready
    cdef Account _account
    cdef dict _socks
    cdef dict _tags
    cdef set _denied
    cdef object _recheck
    cdef uint64_t _epoch
    cdef bint _stale
    cdef object _spill
    cdef Py_buffer _sview
    cdef bint _spill_held
    cdef bint _busy

    def __cinit__(self, listener, int wake_fd, Account account not None, uint32_t self_context,
                  uint32_t self_resource):
        cdef vsc_handle me
        me.context = self_context
        me.resource = self_resource
        rc = vsc_rx_init(&self._rx, listener.fileno(), wake_fd, account.page(), me)
        if rc != 0:
            raise OSError(rc, "cannot create the receiver's epoll instance")
        vsc_rx_set_polled(&self._rx, 0)  # until someone asks for fileno()
        self._ready = True
        self._account = account
        self._socks = {}
        self._tags = {}
        self._denied = set()

    def __dealloc__(self):
        self._drop_spill()
        if self._ready:
            vsc_rx_destroy(&self._rx)

    @property
    def last_fd(self):
        return self._rx.last_fd

    def fileno(self):
        """The epoll descriptor: readable while ``recv``/``take`` can make progress."""
        if self._ready:
            vsc_rx_set_polled(&self._rx, 1)
        return self._rx.epfd

    def add(self, sock, uint32_t src_context, uint32_t src_resource, tag=None):
        """Serve ``sock``, whose sender the kernel says is ``(src_context, src_resource)``;
        ``take`` returns ``tag`` with each datagram read from it."""
        cdef vsc_handle src
        cdef int fd = sock.fileno()
        src.context = src_context
        src.resource = src_resource
        rc = vsc_rx_add(&self._rx, fd, src)
        if rc != 0:
            raise OSError(rc, "cannot watch connection %d" % fd)
        self._socks[fd] = sock
        self._tags[fd] = tag

    def remove(self, int fd):
        """Stop serving the connection ``fd`` (the caller closes it)."""
        vsc_rx_remove(&self._rx, fd)
        self._socks.pop(fd, None)
        self._tags.pop(fd, None)
        self._denied.discard(fd)

    def deny(self, int fd, bint denied):
        """Drop (``take`` returns DENIED) or deliver again what the connection ``fd`` sends."""
        if denied:
            if fd in self._socks:
                self._denied.add(fd)
        else:
            self._denied.discard(fd)

    def watch_acl(self, recheck):
        """From now on, ``take`` calls ``recheck()`` before delivering a frame whenever the
        account's ACL epoch word changed since the last call (or ``acl_changed`` was called).
        The epoch is read before ``recheck`` runs, so a change during it is seen again."""
        self._epoch = _acl_epoch(self._account.page())
        self._stale = False
        self._recheck = recheck

    def acl_changed(self):
        """Call ``recheck`` before the next delivery even if the epoch word did not change."""
        self._stale = True

    cdef int _hold_spill(self, spill) except -1:
        if self._spill_held:
            if spill is self._spill:
                return 0
            if self._busy:
                raise RuntimeError("the receiver is receiving on another thread")
            self._drop_spill()
        PyObject_GetBuffer(spill, &self._sview, PyBUF_WRITABLE)
        self._spill = spill
        self._spill_held = True
        return 0

    cdef void _drop_spill(self):
        if self._spill_held and not self._busy:
            self._spill_held = False
            self._spill = None
            PyBuffer_Release(&self._sview)

    cdef ssize_t _wait(self, Py_buffer *bview, timeout) except? -1:
        """vsc_rx_recv until it returns something other than VSC_INTR (signals are checked)."""
        cdef ssize_t n
        cdef int err, timeout_ms
        cdef double deadline = 0
        if not self._ready:
            raise ValueError("the receiver is closed")
        if timeout is None:
            timeout_ms = -1
        elif timeout < 0:
            timeout_ms = -1
        else:
            deadline = _monotonic() + timeout
            timeout_ms = _millis(timeout)
        while True:
            self._busy = True  # the spill buffer stays exported meanwhile
            with nogil:
                n = vsc_rx_recv(&self._rx, bview.buf, <size_t>bview.len, self._sview.buf,
                                <size_t>self._sview.len, timeout_ms, &err)
            self._busy = False
            if n != VSC_INTR:
                return n
            PyErr_CheckSignals()
            if timeout_ms >= 0:
                if timeout_ms == 0 or _monotonic() >= deadline:
                    return VSC_AGAIN
                timeout_ms = _millis(deadline - _monotonic())

    def recv(self, buf, spill, timeout):
        """Receive one frame, waiting up to ``timeout`` seconds (None: forever).

        Returns the frame size (``last_fd`` names the connection), AGAIN on
        timeout, ACCEPT, WAKE, or PEER_GONE / BAD_FRAME / FORGED / a VMCI code
        for the connection ``last_fd``.
        """
        cdef Py_buffer bview
        self._hold_spill(spill)
        PyObject_GetBuffer(buf, &bview, PyBUF_WRITABLE)
        try:
            return self._wait(&bview, timeout)
        finally:
            PyBuffer_Release(&bview)

    def take(self, buf, spill, timeout):
        """Receive one datagram for delivery, waiting up to ``timeout`` seconds (None: forever).

        Returns ``(payload_length, tag)``: the payload is in ``buf`` and, past its
        end, in ``spill``; ``tag`` is the one given to ``add`` for its connection
        (``last_fd``). Otherwise ``(status, None)``: DENIED (a frame from a denied
        connection was read and dropped; ``buf`` holds zeros in its place) or a
        status of ``recv``. See ``watch_acl`` for the privilege re-check.
        """
        cdef Py_ssize_t status
        tag = self._take(buf, spill, timeout, &status)
        return status, tag

    cdef object _take(self, buf, spill, timeout, Py_ssize_t *status, Py_ssize_t *room=NULL):
        """``take``: returns the tag, the payload length or the status in ``*status``, the size
        of ``buf`` in ``*room``."""
        cdef Py_buffer bview
        cdef ssize_t n
        cdef uint64_t epoch
        cdef Py_ssize_t length
        cdef int fd
        self._hold_spill(spill)
        PyObject_GetBuffer(buf, &bview, PyBUF_WRITABLE)
        try:
            if room != NULL:
                room[0] = bview.len
            n = self._wait(&bview, timeout)
            status[0] = n
            if n < 0:
                return None
            fd = self._rx.last_fd
            length = n - VMCI_DG_HEADERSIZE
            if self._recheck is not None:
                epoch = _acl_epoch(self._account.page())
                if epoch != self._epoch or self._stale:
                    self._epoch = epoch
                    self._stale = False
                    self._recheck()
            status[0] = VSC_DENIED
            if self._denied and fd in self._denied:
                memset(bview.buf, 0, <size_t>(length if length < bview.len else bview.len))
                return None
            tag = self._tags.get(fd)
            if tag is None and fd not in self._tags:  # removed by recheck: dropped like a denial
                memset(bview.buf, 0, <size_t>(length if length < bview.len else bview.len))
                return None
            status[0] = length
            return tag
        finally:
            PyBuffer_Release(&bview)

    def close(self):
        if self._ready:
            self._ready = False
            vsc_rx_destroy(&self._rx)
            self._socks.clear()
            self._tags.clear()
            self._denied.clear()
        self._recheck = None
        self._drop_spill()


from time import monotonic as _monotonic


cdef inline int _millis(double seconds):
    """Milliseconds to wait, rounded up so a wait never ends early; 0 if the time is up."""
    if seconds <= 0:
        return 0
    if seconds > 2000000:
        return 2000000000
    return <int>(seconds * 1000.0 + 0.999)


def recv_datagram(sock, Account account not None, buf, spill):
    """Receive one frame without blocking; see ``vsc_dg_recv``.

    The payload lands in ``buf`` and, past its end, in ``spill``. Returns ``(status, fields)``:
    status is the frame size or a core status; fields is the decoded header
    tuple when status >= 0, else None.
    """
    cdef Py_buffer bview, sview
    cdef vsc_dg_header h
    cdef ssize_t n
    cdef int err, fd = sock.fileno()
    cdef uint8_t *page = account.page()
    PyObject_GetBuffer(buf, &bview, PyBUF_WRITABLE)
    try:
        PyObject_GetBuffer(spill, &sview, PyBUF_WRITABLE)
        try:
            with nogil:
                n = vsc_dg_recv(fd, page, &h, bview.buf, <size_t>bview.len, sview.buf,
                                <size_t>sview.len, &err)
        finally:
            PyBuffer_Release(&sview)
    finally:
        PyBuffer_Release(&bview)
    if n < 0:
        return n, None
    return n, (h.dst.context, h.dst.resource, h.src.context, h.src.resource, h.payload_size)


include "_cring.pxi"
include "_cfast.pxi"
include "_cqstream.pxi"
