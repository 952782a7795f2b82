# Streamed queue pairs: the data path of qp_stream over one stream socket (frames of
# mirror_wire); included at the end of _cvsc.pyx. Contract: ``QueueStream`` in _core.pyi.
#
# Every method runs with the GIL held and makes only non-blocking socket calls, so a call is
# atomic with respect to the other threads of the process; the GIL is released only around
# poll(2), with ``_busy`` counting the threads inside so ``close`` never pulls the memory from
# under one. Bytes go out in stream order: a send that does not fit the socket leaves its rest
# in ``_out``, and nothing is sent directly while ``_out`` holds bytes.
from libc.stdlib cimport realloc as _realloc
from libc.string cimport memmove
from libc.errno cimport errno, EINTR, EAGAIN

cdef extern from "<errno.h>":
    int EWOULDBLOCK
from libc.math cimport ceil

from time import monotonic as _monotonic

from vsockcompat import mirror_wire as _W


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t c_sendmsg "sendmsg"(int fd, const msghdr *msg, int flags)
    ssize_t c_recvmsg "recvmsg"(int fd, msghdr *msg, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL


cdef extern from "<unistd.h>" nogil:
    ssize_t c_read "read"(int fd, void *buf, size_t n)
    ssize_t c_write "write"(int fd, const void *buf, size_t n)
    int c_close "close"(int fd)
    int c_pipe2 "pipe2"(int *fds, int flags)


cdef extern from "<fcntl.h>" nogil:
    int O_NONBLOCK
    int O_CLOEXEC


cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int c_poll "poll"(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN
    short POLLOUT


QS_DATA = _W.QS_DATA
QS_CREDIT = _W.QS_CREDIT
QS_GONE = _W.QS_GONE
QS_BAD = _W.QS_BAD
QS_BUSY = _W.QS_BUSY

cdef int _QS_DATA = _W.QS_DATA, _QS_CREDIT = _W.QS_CREDIT, _QS_GONE = _W.QS_GONE
cdef int _QS_BAD = _W.QS_BAD, _QS_BUSY = _W.QS_BUSY, _QS_EOF = _W.QS_EOF, _QS_DETACHED = _W.QS_DETACHED
cdef uint32_t _F_MAGIC = _W.MAGIC
cdef uint8_t _F_DATA = _W.DATA, _F_CREDIT = _W.CREDIT, _F_WANT = _W.WANT, _F_BYE = _W.BYE
cdef uint64_t _F_MAX = _W.MAX_PAYLOAD
cdef enum:
    _HDR = 20          # mirror_wire.HEADER.size (checked at import below)
    _MAX_IOV = 64
    _RING_MIN = 65536
assert _W.HEADER.size == _HDR
cdef uint64_t _ALL = <uint64_t>-1
cdef int _NODATA = -36, _NOSPACE = -35, _NOTATTACHED = -34, _TIMEOUT = -26, _BADARGS = -2


cdef inline void _put_header(uint8_t *h, uint8_t ftype, uint64_t arg, uint32_t length) noexcept nogil:
    cdef int i
    for i in range(4):
        h[i] = (_F_MAGIC >> (8 * i)) & 0xFF
        h[16 + i] = (length >> (8 * i)) & 0xFF
    h[4] = ftype
    h[5] = h[6] = h[7] = 0
    for i in range(8):
        h[8 + i] = (arg >> (8 * i)) & 0xFF


cdef inline uint64_t _le(const uint8_t *p, int n) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n):
        v |= (<uint64_t>p[i]) << (8 * i)
    return v


cdef int _deadline_ms(double deadline) except? -2:
    # milliseconds left until ``deadline`` (monotonic seconds; < 0: none) for poll(2); -1 forever
    if deadline < 0:
        return -1
    left = deadline - _monotonic()
    return 0 if left <= 0 else <int>min(ceil(left * 1000.0), 2147483647.0)


cdef class QueueStream:
    """One end's data path of a streamed queue pair: see ``QueueStream`` in ``_core.pyi``."""

    cdef int _fd, _wake
    cdef uint64_t _pcap, _ccap, _csize
    cdef uint64_t _sent, _peer_consumed, _consumed, _credited, _announced
    cdef bint _peer_wants, _asked
    cdef bint _dry           # the last read found the socket empty (EAGAIN, or short)
    cdef int _state, _news, _busy
    cdef int _sleepers       # threads asleep in _sleep (they read the stream themselves)
    cdef int _kick[2]        # a pipe: written when another thread's read brought what sleepers wait for
    cdef double _send_timeout
    cdef uint8_t _hdr[_HDR]
    cdef int _hdr_have
    cdef uint64_t _data_left
    cdef uint64_t _promised  # payload bytes counted ready by wait_data but not received yet
    # the consume queue: bytes received, not yet dequeued (circular; grown up to _ccap)
    cdef uint8_t *_ring
    cdef uint64_t _rcap, _rhead, _rlen
    # bytes of the stream not yet accepted by the socket, in order
    cdef uint8_t *_out
    cdef size_t _ocap, _ostart, _oend
    cdef public uint64_t max_send
    cdef public uint64_t read_ahead   # stream bytes a read takes beyond the next header
    # what ``counts`` reports: system calls made and frames sent (the DATA, CREDIT, WANT order)
    cdef uint64_t _n_sendmsg, _n_recvmsg
    cdef uint64_t _n_frames[3]

    def __cinit__(self, sock, int wake_fd, uint64_t produce_size, uint64_t consume_size,
                  double send_timeout=30.0):
        self._fd = sock.fileno()
        self._wake = wake_fd
        self._kick[0] = self._kick[1] = -1
        if c_pipe2(self._kick, O_NONBLOCK | O_CLOEXEC) < 0:
            raise OSError(errno, "pipe2")
        self._pcap = produce_size - 1 if produce_size else 0
        self._ccap = consume_size - 1 if consume_size else 0
        self._csize = consume_size
        self._send_timeout = send_timeout
        self.max_send = 0
        self.read_ahead = _W.QS_READ_AHEAD

    def __dealloc__(self):
        _free(self._ring)
        _free(self._out)
        self._close_kick()

    cdef void _close_kick(self) noexcept:
        if self._kick[0] >= 0:
            c_close(self._kick[0])
            c_close(self._kick[1])
            self._kick[0] = self._kick[1] = -1

    cdef int _sleep(self, short events, int ms, bint first) except -1:
        # Sleep in poll(2) (GIL released) until the socket has ``events``, the wake fd or the
        # kick pipe is readable, or ``ms`` pass: 1 if woken by the wake fd, else 0. With
        # another sleeper there a kick may be drained by it, so each sleeps 10 ms at most;
        # a wait's ``first`` sleep kicks the others once so that they bound theirs too (and
        # leaves the pipe out of its own poll: draining that kick itself could leave them
        # asleep, poll(2) looking again once they run).
        cdef pollfd fds[3]
        cdef int rc, nfds = 3
        cdef char sink[64]
        sink[0] = 0
        if self._sleepers:
            if first:
                c_write(self._kick[1], sink, 1)
                nfds = 2
            if ms < 0 or ms > 10:
                ms = 10
        fds[0].fd, fds[0].events, fds[0].revents = self._fd, events, 0
        fds[1].fd, fds[1].events, fds[1].revents = self._wake, POLLIN, 0
        fds[2].fd, fds[2].events, fds[2].revents = self._kick[0], POLLIN, 0
        self._busy += 1
        self._sleepers += 1
        with nogil:
            rc = c_poll(fds, nfds, ms)
        self._sleepers -= 1
        self._busy -= 1
        if rc > 0 and nfds == 3 and fds[2].revents:
            while c_read(self._kick[0], sink, sizeof(sink)) > 0:
                pass
        return 1 if rc > 0 and fds[1].revents else 0

    # -- sending

    cdef int _append_out(self, const iovec *iov, int n, size_t skip) except -1:
        # Queue the bytes of ``iov`` after the first ``skip`` (their copy: the caller's buffers
        # are released when it returns).
        cdef size_t need = 0, k, cap
        cdef int i
        for i in range(n):
            need += iov[i].iov_len
        need -= skip
        if self._ostart == self._oend:
            self._ostart = self._oend = 0
        if self._oend + need > self._ocap:
            if self._ostart:
                memcpy(self._out, self._out + self._ostart, self._oend - self._ostart)
                self._oend -= self._ostart
                self._ostart = 0
            if self._oend + need > self._ocap:
                cap = max(<size_t>_RING_MIN, self._ocap)
                while cap < self._oend + need:
                    cap *= 2
                p = <uint8_t *>_realloc(self._out, cap)
                if p == NULL:
                    raise MemoryError()
                self._out, self._ocap = p, cap
        for i in range(n):
            k = iov[i].iov_len
            if skip >= k:
                skip -= k
                continue
            memcpy(self._out + self._oend, <uint8_t *>iov[i].iov_base + skip, k - skip)
            self._oend += k - skip
            skip = 0
        return 0

    cdef size_t _sendv(self, const iovec *iov, int n):
        # Send as much of ``iov`` as the socket takes now, at most ``max_send`` bytes per call;
        # the count sent. A failing socket marks the peer gone.
        cdef iovec part[_MAX_IOV]
        cdef msghdr msg
        cdef size_t total = 0, sent = 0, skip, limit, k
        cdef ssize_t r
        cdef int i, m
        for i in range(n):
            total += iov[i].iov_len
        memset(&msg, 0, sizeof(msg))
        while sent < total:
            limit = total - sent
            if self.max_send and limit > self.max_send:
                limit = self.max_send
            skip, m = sent, 0
            for i in range(n):
                k = iov[i].iov_len
                if skip >= k:
                    skip -= k
                    continue
                part[m].iov_base = <uint8_t *>iov[i].iov_base + skip
                part[m].iov_len = min(k - skip, limit)
                limit -= part[m].iov_len
                skip = 0
                m += 1
                if limit == 0:
                    break
            msg.msg_iov = part
            msg.msg_iovlen = m
            r = c_sendmsg(self._fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL)
            self._n_sendmsg += 1
            if r < 0:
                if errno == EINTR:
                    continue
                if errno != EAGAIN and errno != EWOULDBLOCK:
                    self._gone(0)
                break
            sent += r
        return sent

    cdef int _emit(self, const iovec *iov, int n) except -1:
        # Put ``iov`` (whole frames) on the stream, after what ``_out`` holds.
        cdef size_t sent = 0
        if self._state & _QS_GONE:
            return 0
        if self._ostart == self._oend:
            sent = self._sendv(iov, n)
            if self._state & _QS_GONE:
                return 0
        self._append_out(iov, n, sent)
        return 0

    cdef int _send_out(self) except -1:
        cdef iovec one
        if self._ostart == self._oend or self._state & _QS_GONE:
            return 0
        one.iov_base = self._out + self._ostart
        one.iov_len = self._oend - self._ostart
        self._ostart += self._sendv(&one, 1)
        return 0

    cdef int _control(self, uint8_t ftype, uint64_t arg) except -1:
        cdef uint8_t h[_HDR]
        cdef iovec one
        _put_header(h, ftype, arg, 0)
        one.iov_base, one.iov_len = h, _HDR
        return self._emit(&one, 1)

    cdef int _want(self) except -1:
        self._n_frames[2] += 1
        return self._control(_F_WANT, 0)

    cdef int _credit(self) except -1:
        # CREDIT when a quarter of the consume queue is owed, or the peer asked (WANT).
        cdef uint64_t owed = self._consumed - self._credited
        if owed and (self._peer_wants or owed * 4 >= self._csize) and not self._state & _QS_GONE:
            self._credited = self._consumed
            self._peer_wants = False
            self._n_frames[1] += 1
            self._control(_F_CREDIT, self._consumed)
        return 0

    cdef int _send_data(self, const iovec *iov, int n, uint64_t total) except -1:
        # DATA frames carrying the first ``total`` bytes of ``iov`` (n < _MAX_IOV entries).
        cdef iovec frame[_MAX_IOV]
        cdef uint8_t h[_HDR]
        cdef uint64_t k, left, c
        cdef size_t off = 0
        cdef int i = 0, m
        while total:
            k = min(total, _F_MAX)
            _put_header(h, _F_DATA, 0, <uint32_t>k)
            self._n_frames[0] += 1
            frame[0].iov_base, frame[0].iov_len = h, _HDR
            m, left = 1, k
            while left:
                if off == iov[i].iov_len:
                    i += 1
                    off = 0
                    continue
                c = min(iov[i].iov_len - off, left)
                frame[m].iov_base = <uint8_t *>iov[i].iov_base + off
                frame[m].iov_len = c
                off += c
                left -= c
                m += 1
            self._emit(frame, m)
            total -= k
        return 0

    cdef int _check_open(self):
        if self._state & _QS_DETACHED or self._state & _QS_GONE:
            return _NOTATTACHED
        return 0

    cdef int _short(self, uint64_t need) except -1:
        # A write of ``need`` bytes that the credit known so far does not cover first takes
        # the credit already in the socket (the stream read as ``pull`` does), so that it is
        # cut or refused only for want of credit the peer has not sent. 1 if the peer went.
        if self._pcap - (self._sent - self._peer_consumed) < need:
            self._rx(NULL, _ALL, False)
            if self._state & _QS_GONE:
                return 1
        return 0

    def write(self, buf):
        """Enqueue what fits of ``buf``: the count, QUEUEPAIR_NOSPACE (WANT sent), or
        QUEUEPAIR_NOTATTACHED. Blocks (GIL released) only while the socket has no room."""
        cdef Py_buffer view
        cdef iovec one
        cdef uint64_t n, free
        if self._check_open():
            return _NOTATTACHED
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            if self._short(<uint64_t>view.len):
                return _NOTATTACHED
            free = self._pcap - (self._sent - self._peer_consumed)
            if free == 0:
                if not self._asked:
                    self._asked = True
                    self._want()
                n = 0
            else:
                n = min(<uint64_t>view.len, free)
                self._sent += n
                one.iov_base, one.iov_len = view.buf, n
                if n:
                    self._send_data(&one, 1, n)
        finally:
            PyBuffer_Release(&view)
        if self._ostart != self._oend:
            self._flush(self._send_timeout)
        return n if free else _NOSPACE

    def write_many(self, bufs):
        """Enqueue whole buffers while each fits: how many (0 for none given), or
        QUEUEPAIR_NOSPACE if the first does not fit, or QUEUEPAIR_NOTATTACHED."""
        cdef list items = list(bufs)
        cdef Py_ssize_t count = len(items), got = 0, i, j, taken = 0
        cdef Py_buffer *views
        cdef iovec *iov
        cdef uint64_t free, total = 0
        cdef int batch
        if self._check_open():
            return _NOTATTACHED
        if count == 0:
            return 0
        views = <Py_buffer *>_malloc(count * sizeof(Py_buffer))
        iov = <iovec *>_malloc(count * sizeof(iovec))
        if views == NULL or iov == NULL:
            _free(views)
            _free(iov)
            raise MemoryError()
        try:
            for i in range(count):
                PyObject_GetBuffer(items[i], &views[i], PyBUF_SIMPLE)
                got += 1
                total += <uint64_t>views[i].len
            if self._short(total):
                return _NOTATTACHED
            total = 0
            free = self._pcap - (self._sent - self._peer_consumed)
            while free and taken < count and <uint64_t>views[taken].len <= free - total:
                iov[taken].iov_base = views[taken].buf
                iov[taken].iov_len = <size_t>views[taken].len
                total += <uint64_t>views[taken].len
                taken += 1
            if taken == 0:
                if not self._asked:
                    self._asked = True
                    self._want()
            else:
                self._sent += total
                i = 0
                while i < taken:      # frames of up to _MAX_IOV - 1 buffers
                    batch = <int>min(taken - i, _MAX_IOV - 1)
                    total = 0
                    for j in range(batch):
                        total += iov[i + j].iov_len
                    if total:
                        self._send_data(&iov[i], batch, total)
                    i += batch
        finally:
            for i in range(got):
                PyBuffer_Release(&views[i])
            _free(views)
            _free(iov)
        if self._ostart != self._oend:
            self._flush(self._send_timeout)
        return taken if taken else _NOSPACE

    def ask(self):
        """Send WANT (once until a CREDIT comes): the peer then returns what it owes."""
        if not self._asked and not self._state & (_QS_GONE | _QS_DETACHED):
            self._asked = True
            self._want()
            self._send_out()

    cdef int _flush(self, double timeout) except? -9999:
        # Until ``_out`` is empty: 0, or TIMEOUT (the peer is then taken as gone),
        # QUEUEPAIR_NOTATTACHED, WAKE. Reads the stream meanwhile (the peer may be waiting
        # for our credit to read its own).
        cdef pollfd fds[2]
        cdef int ms, rc
        cdef double deadline = -1 if timeout < 0 else _monotonic() + timeout
        while True:
            self._send_out()
            if self._ostart == self._oend:
                return 0
            if self._state & _QS_GONE:
                return _NOTATTACHED
            ms = _deadline_ms(deadline)
            if ms == 0:
                self._gone(0)
                return _TIMEOUT
            fds[0].fd, fds[0].events, fds[0].revents = self._fd, POLLOUT | POLLIN, 0
            fds[1].fd, fds[1].events, fds[1].revents = self._wake, POLLIN, 0
            self._busy += 1
            with nogil:
                rc = c_poll(fds, 2, ms)
            self._busy -= 1
            if rc > 0 and fds[1].revents:
                return WAKE
            if rc > 0 and fds[0].revents & ~POLLOUT:
                self._rx(NULL, _ALL, False)

    def flush(self, timeout=None):
        """Send what the socket did not take yet: 0, VMCI_ERROR_TIMEOUT (``timeout`` seconds,
        None: the send timeout; 0: no wait, 0 also when bytes remain), NOTATTACHED or WAKE."""
        if self._state & _QS_GONE or self._ostart == self._oend:
            return 0
        if timeout == 0:
            self._send_out()
            return 0
        return self._flush(self._send_timeout if timeout is None else timeout)

    @property
    def pending(self):
        """Bytes of the stream the socket has not taken yet."""
        return self._oend - self._ostart

    # -- receiving

    cdef void _gone(self, int why) noexcept:
        self._state |= _QS_GONE | why
        self._news |= _QS_GONE

    cdef int _frame(self) except -1:
        # The header in _hdr is complete: act on it.
        cdef uint8_t *h = self._hdr
        cdef uint8_t ftype = h[4]
        cdef uint64_t arg = _le(h + 8, 8), length = _le(h + 16, 4)
        self._hdr_have = 0
        if _le(h, 4) != _F_MAGIC or h[5] or h[6] or h[7] or length > _F_MAX:
            self._gone(_QS_BAD | _QS_EOF)
        elif ftype == _F_DATA:
            if self._announced - self._consumed + length > self._ccap:
                self._gone(_QS_BAD | _QS_EOF)
            else:
                self._announced += length
                self._data_left = length
        elif length:
            self._gone(_QS_BAD | _QS_EOF)
        elif ftype == _F_CREDIT and self._peer_consumed <= arg <= self._sent:
            if arg != self._peer_consumed:
                self._news |= _QS_CREDIT
            self._peer_consumed = arg
            self._asked = False
        elif ftype == _F_WANT:
            self._peer_wants = True
            self._credit()
        elif ftype == _F_BYE:
            self._gone(_QS_EOF)
        else:
            self._gone(_QS_BAD | _QS_EOF)
        return 0

    cdef int _grow(self, uint64_t need) except -1:
        # Room in the ring for ``need`` more bytes.
        cdef uint64_t cap = self._rcap if self._rcap else _RING_MIN, first
        cdef uint8_t *p
        if self._rlen + need <= self._rcap:
            return 0
        while cap < self._rlen + need:
            cap *= 2
        p = <uint8_t *>_malloc(cap)
        if p == NULL:
            raise MemoryError()
        if self._rlen:
            first = min(self._rlen, self._rcap - self._rhead)
            memcpy(p, self._ring + self._rhead, first)
            memcpy(p + first, self._ring, self._rlen - first)
        _free(self._ring)
        self._ring, self._rcap, self._rhead = p, cap, 0
        return 0

    cdef void _ring_out(self, uint8_t *to, uint64_t pos, uint64_t k) noexcept:
        # Copy ``k`` ring bytes from ``pos`` (an offset from the head, may wrap) to ``to``.
        cdef uint64_t at, a
        while k:
            at = (self._rhead + pos) % self._rcap
            a = min(k, self._rcap - at)
            memcpy(to, self._ring + at, a)
            to += a
            pos += a
            k -= a

    cdef void _ring_move(self, uint64_t to, uint64_t frm, uint64_t k) noexcept:
        # Move ``k`` ring bytes down from offset ``frm`` to ``to`` (< frm; offsets from the
        # head, either may wrap): in pieces that wrap nowhere, first to last.
        cdef uint64_t t, f, a
        while k:
            t = (self._rhead + to) % self._rcap
            f = (self._rhead + frm) % self._rcap
            a = min(k, self._rcap - t, self._rcap - f)
            memmove(self._ring + t, self._ring + f, a)
            to += a
            frm += a
            k -= a

    cdef uint64_t _parse(self, uint64_t r) except? 0:
        # The ``r`` stream bytes just read into the ring after its payload: act on the frames
        # among them, moving each payload down to follow the ring's payload (headers go
        # through _hdr). Returns the payload bytes kept.
        cdef uint64_t src = 0, kept = 0, k, base = self._rlen
        while src < r and not self._state & _QS_EOF:
            if self._data_left:
                k = min(self._data_left, r - src)
                if src != kept:
                    self._ring_move(base + kept, base + src, k)
                kept += k
                src += k
                self._data_left -= k
            else:
                k = min(<uint64_t>(_HDR - self._hdr_have), r - src)
                self._ring_out(self._hdr + self._hdr_have, base + src, k)
                self._hdr_have += <int>k
                src += k
                if self._hdr_have == _HDR:
                    self._frame()
        self._rlen += kept
        return kept

    cdef int64_t _rx(self, uint8_t *dst, uint64_t room, bint heads) except -1:
        # Read the stream without blocking. Each read takes, in order: the rest of the current
        # DATA payload straight into ``dst`` (only while the ring is empty: stream order), then
        # the next header, then up to ``read_ahead`` bytes more (with dst NULL, also the
        # payload still wanted) into the ring's free space, where the frames among them are
        # parsed at once (``_parse``): so one read takes a header with its payload, and many
        # small frames at a time. ``room``: the payload bytes wanted, in ``dst`` (or with dst
        # NULL, in the ring); ``heads``: and the frames up to the next payload. Stops at the
        # first read that finds the socket short (``_dry``), and with ``dst`` once the ring
        # holds bytes (they come first: the caller takes them). Returns the payload count
        # delivered to ``dst`` (consumed at once), or with dst NULL put in the ring.
        cdef iovec iov[4]
        cdef msghdr msg
        cdef uint64_t got = 0, total = 0, want, tail, first, ahead, kept
        cdef size_t asked, r, hdr_part
        cdef ssize_t rc
        cdef int n, news = self._news
        cdef char one = 0
        memset(&msg, 0, sizeof(msg))
        while not self._state & (_QS_EOF | _QS_DETACHED):
            if got >= room and (got or self._data_left or not heads):
                break
            if dst != NULL and total and self._rlen:
                break
            n, want, hdr_part = 0, 0, 0
            if dst != NULL and self._data_left and not self._rlen:
                want = min(self._data_left, room - got)
                iov[0].iov_base, iov[0].iov_len = dst + got, want
                n = 1
            if want == self._data_left:
                hdr_part = _HDR - self._hdr_have
                iov[n].iov_base, iov[n].iov_len = self._hdr + self._hdr_have, hdr_part
                n += 1
            ahead = self.read_ahead
            if dst == NULL:
                ahead += min(room - got, self._data_left)
            if ahead:
                if self._rlen == 0:
                    self._rhead = 0
                self._grow(ahead)
                tail = (self._rhead + self._rlen) % self._rcap
                first = min(ahead, self._rcap - tail)
                iov[n].iov_base, iov[n].iov_len = self._ring + tail, first
                n += 1
                if first < ahead:
                    iov[n].iov_base, iov[n].iov_len = self._ring, ahead - first
                    n += 1
            asked = want + hdr_part + ahead
            msg.msg_iov = iov
            msg.msg_iovlen = n
            rc = c_recvmsg(self._fd, &msg, MSG_DONTWAIT)
            self._n_recvmsg += 1
            if rc < 0:
                if errno == EINTR:
                    continue
                self._dry = True
                if errno != EAGAIN and errno != EWOULDBLOCK:
                    self._gone(_QS_EOF)
                break
            if rc == 0:
                self._gone(_QS_EOF | (_QS_BAD if self._hdr_have or self._data_left else 0))
                break
            r = <size_t>rc
            if want:
                first = min(<uint64_t>r, want)
                self._data_left -= first
                got += first
                total += first
                self._consumed += first
                r -= first
            if hdr_part and r:
                first = min(r, hdr_part)
                self._hdr_have += <int>first
                r -= first
                if self._hdr_have == _HDR:
                    self._frame()
            if r:
                kept = self._parse(r)
                total += kept
                if dst == NULL:
                    got += kept
            self._dry = <size_t>rc < asked
            if self._dry:
                break
        if total:
            self._news |= _QS_DATA
            self._promised -= min(self._promised, total)
        if self._sleepers and ((total > got or (total and dst == NULL)) or (self._news & ~news)):
            c_write(self._kick[1], &one, 1)    # what a sleeper waits for came to this thread
        return got

    cdef int64_t _await(self, uint8_t *dst, uint64_t want) except -1:
        # Wait (GIL released in poll) for up to ``want`` promised bytes (``_promised``: counted
        # ready by ``wait_data`` from their frame's header, so on their way), read as ``_rx``.
        cdef int ms
        cdef uint64_t got = 0
        cdef bint first = True
        cdef double deadline = _monotonic() + self._send_timeout
        while got < want and self._promised and not self._state & (_QS_EOF | _QS_DETACHED):
            if dst != NULL and self._rlen:
                break       # another thread put the next bytes in the ring: they come first
            ms = _deadline_ms(deadline)
            if ms == 0 or self._sleep(POLLIN, ms, first):
                break
            first = False
            got += self._rx(NULL if dst == NULL else dst + got, want - got, False)
        return got

    cdef uint64_t _take(self, uint8_t *dst, uint64_t n, bint consume):
        # Copy up to ``n`` bytes from the head of the ring.
        cdef uint64_t k = min(n, self._rlen), first
        if k:
            first = min(k, self._rcap - self._rhead)
            memcpy(dst, self._ring + self._rhead, first)
            memcpy(dst + first, self._ring, k - first)
            if consume:
                self._drop(k)
        return k

    cdef void _drop(self, uint64_t k) noexcept:
        self._rhead = (self._rhead + k) % self._rcap if self._rcap else 0
        self._rlen -= k
        self._consumed += k

    cdef int _read_status(self, uint64_t n) noexcept:
        if n:
            return 0
        if self._state & _QS_DETACHED or (self._state & _QS_GONE and not self._rlen):
            return _NOTATTACHED
        return _NODATA

    cdef int _fill(self, uint64_t size) except -1:
        # The ring up to ``size`` bytes, as far as the socket (and what was promised) has them.
        if self._rlen < size:
            self._rx(NULL, size - self._rlen, False)
            if self._rlen < size and self._promised:
                self._await(NULL, min(size - self._rlen, self._promised))
        return 0

    def read_into(self, buf, bint consume=True):
        """Dequeue (or with ``consume`` false, peek) into ``buf``: the count, QUEUEPAIR_NODATA,
        or QUEUEPAIR_NOTATTACHED (detached, or the peer gone and everything read). A dequeue
        that empties the ring reads the rest from the socket straight into ``buf``."""
        cdef Py_buffer view
        cdef uint64_t n = 0, size
        if self._state & _QS_DETACHED:
            return _NOTATTACHED
        PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
        try:
            size = <uint64_t>view.len
            if consume:
                n = self._take(<uint8_t *>view.buf, size, True)
                if n < size and self._rlen == 0:
                    while True:      # what a read puts in the ring (read ahead) comes next
                        n += self._rx(<uint8_t *>view.buf + n, size - n, False)
                        n += self._take(<uint8_t *>view.buf + n, size - n, True)
                        if n == size or self._dry or self._state & (_QS_EOF | _QS_DETACHED):
                            break
                    if n < size and self._promised:
                        n += self._await(<uint8_t *>view.buf + n, min(size - n, self._promised))
                        n += self._take(<uint8_t *>view.buf + n, size - n, True)
                self._credit()
            else:
                self._fill(size)
                n = self._take(<uint8_t *>view.buf, size, False)
        finally:
            PyBuffer_Release(&view)
        if self._ostart != self._oend:
            self._send_out()
        return n if n else self._read_status(0)

    def read_bytes(self, Py_ssize_t n, bint consume=True):
        """Up to ``n`` bytes as ``bytes`` (consumed unless ``consume`` is false), or a code as
        ``read_into``."""
        cdef bytes out
        cdef uint64_t k
        if n < 0:
            return _BADARGS
        if self._state & _QS_DETACHED:
            return _NOTATTACHED
        self._fill(<uint64_t>n)
        k = min(<uint64_t>n, self._rlen)
        if k == 0:
            return self._read_status(0)
        out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>k)   # may run other threads (GC)
        n = <Py_ssize_t>self._take(<uint8_t *>PyBytes_AS_STRING(out), k, consume)
        if n == 0:
            return self._read_status(0)
        if <uint64_t>n < k:
            out = out[:n]
        if consume:
            self._credit()
            self._send_out()
        return out

    def consume(self, Py_ssize_t n):
        """Drop the first ``n`` ready bytes: ``n``, INVALID_ARGS (more than is ready), or
        QUEUEPAIR_NOTATTACHED after detach."""
        if self._state & _QS_DETACHED:
            return _NOTATTACHED
        if n < 0 or <uint64_t>n > self._rlen:
            return _BADARGS
        self._drop(<uint64_t>n)
        self._credit()
        self._send_out()
        return n

    def pull(self):
        """Read what the socket holds into the ring, without waiting; the QS_* news since the
        last call (QS_DATA, QS_CREDIT, QS_GONE), or QS_BUSY if a thread waits in ``wait_*``
        (it reads the stream itself)."""
        cdef int news
        if self._sleepers:
            return _QS_BUSY
        self._rx(NULL, _ALL, False)
        if self._ostart != self._oend:
            self._send_out()
        news, self._news = self._news, 0
        return news

    cdef int64_t _wait(self, uint64_t space, object timeout) except? -9999:
        # space 0: until data is ready (its count); else until ``space`` bytes are free.
        cdef int ms
        cdef uint64_t free
        cdef bint first = True
        cdef double deadline = -1 if timeout is None else _monotonic() + max(<double>timeout, 0.0)
        cdef bint sleeps = timeout is None or timeout > 0
        while True:
            if self._state & _QS_DETACHED:
                return _NOTATTACHED
            if space:
                if self._state & _QS_GONE:
                    return _NOTATTACHED
                free = self._pcap - (self._sent - self._peer_consumed)
                if free >= space:
                    return free
                if not self._asked:
                    self._asked = True
                    self._want()
                self._rx(NULL, _ALL, False)
                if self._pcap - (self._sent - self._peer_consumed) >= space:
                    continue
            else:
                # Up to the next payload's header: its bytes count as ready (they come in the
                # same send as the header) and the caller's dequeue reads them directly.
                # (a dequeue that just found the socket empty is followed by a poll first)
                if not (first and self._dry and not self._rlen and not self._data_left and sleeps):
                    self._rx(NULL, 0, True)
                if self._state & _QS_EOF:
                    self._data_left = 0      # a frame cut short: its rest never comes
                if self._rlen or self._data_left:
                    self._promised = self._data_left
                    return self._rlen + self._data_left
                if self._state & _QS_GONE:
                    return _NOTATTACHED
            self._send_out()
            ms = _deadline_ms(deadline)
            if ms == 0:
                return _TIMEOUT
            if self._sleep(POLLIN | (POLLOUT if self._ostart != self._oend else 0), ms, first):
                return WAKE
            first = False

    def wait_data(self, timeout=None):
        """Sleep (GIL released) until data is ready: its count, VMCI_ERROR_TIMEOUT after
        ``timeout`` seconds (None: forever), QUEUEPAIR_NOTATTACHED (peer gone, all read;
        detached), or WAKE (the wake fd is readable)."""
        return self._wait(0, timeout)

    def wait_space(self, uint64_t n, timeout=None):
        """Sleep until ``n`` (> 0) bytes are free in the produce queue: the free count, or a
        code as ``wait_data``. Asks the peer for its credit (WANT) first."""
        if n == 0:
            return _BADARGS
        return self._wait(n, timeout)

    def bye(self, bint send=True, timeout=None):
        """Detach: every later call returns QUEUEPAIR_NOTATTACHED; with ``send`` (and the peer
        there) BYE follows the bytes already enqueued, flushed within ``timeout`` seconds."""
        rc = 0
        if send and not self._state & (_QS_GONE | _QS_DETACHED):
            self._control(_F_BYE, 0)
            rc = self._flush(self._send_timeout if timeout is None else timeout)
        self._state |= _QS_DETACHED
        return rc

    def close(self):
        """Free the buffers; False (nothing done) while a thread is inside a blocking call."""
        if self._busy:
            return False
        self._state |= _QS_DETACHED | _QS_EOF
        _free(self._ring)
        _free(self._out)
        self._ring = self._out = NULL
        self._close_kick()
        self._rcap = self._rlen = self._rhead = 0
        self._ocap = self._ostart = self._oend = 0
        return True

    # -- what the API's queries report

    @property
    def state(self):
        """QS_GONE (the peer detached, died or was cut off), with QS_BAD if it sent a bad frame."""
        return self._state & (_QS_GONE | _QS_BAD)

    @property
    def ready(self):
        """Bytes in the ring (read from the socket, not dequeued)."""
        return self._rlen

    @property
    def unread(self):
        """Bytes the peer sent (as far as headers told) that were not dequeued."""
        return self._announced - self._consumed

    @property
    def free(self):
        """Bytes ``write`` accepts now: produce capacity minus what the peer has not credited."""
        return self._pcap - (self._sent - self._peer_consumed)

    @property
    def sent(self):
        return self._sent

    @property
    def peer_consumed(self):
        return self._peer_consumed

    @property
    def counts(self):
        """System calls made and frames sent so far, by name (see ``_core.pyi``)."""
        return dict(zip(_W.QS_COUNTS, (self._n_sendmsg, self._n_recvmsg, self._n_frames[0],
                                        self._n_frames[1], self._n_frames[2])))
