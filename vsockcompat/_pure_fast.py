"""The pure core's Fastpath: one endpoint's ``send_status`` and ``recv_status`` (see _core.pyi)."""
from ._pure import (_SEND_FLAGS, _SKIP_MAX, _SMALL, _W_ACL_EPOCH, _W_CLOSED, _W_CONSUMED, _W_PRODUCED,
                    AGAIN, PEER_GONE, _mutex_trylock_gil, _mutex_unlock_gil, _readv)
from ._pure_lock import RecvLock
from .constants import (VMCI_DG_HEADERSIZE, VMCI_ERROR_INVALID_ARGS, VMCI_ERROR_NO_MORE_DATAGRAMS,
                        VMCI_MAX_DG_PAYLOAD_SIZE)

_NOBODY = object()  # never a destination: the send cache starts empty


class Fastpath:
    """One endpoint's ``send_status`` and ``recv_status``, each one call (see _core.pyi)."""

    __slots__ = ("_rx", "_spill", "_hot_reads", "recv_lock", "_free", "_links", "_last", "_send_slow", "_recv_slow",
                 "_iov", "_last_tag", "_last_src", "_closing", "_held", "_plain", "sent", "received")

    def __init__(self, receiver, spill, send_slow, recv_slow):
        self._rx = receiver
        self._spill = spill
        self._hot_reads = len(spill) > VMCI_MAX_DG_PAYLOAD_SIZE  # see Receiver._read
        self.recv_lock = RecvLock()
        self._free = self.recv_lock.free  # its token, taken and given back inline
        self._links = {}
        self._last = (_NOBODY, None)  # (dst, link) of the last send: one tuple, replaced whole
        self._send_slow = send_slow
        self._recv_slow = recv_slow
        self._iov = [receiver._header, None, spill]  # readv's buffers: the caller's between header and spill
        self._last_tag = None  # last_peer; never a tag
        self._last_src = None  # its handle
        self._closing = False
        self._held = None
        self._plain = self._hot_reads  # not closing, nothing held, hot reads possible: one check
        self.sent = 0
        self.received = 0

    @property
    def last_peer(self):
        return self._last_tag

    @last_peer.setter
    def last_peer(self, tag):
        self._last_tag = tag
        self._last_src = None if tag is None else tag.handle

    @property
    def closing(self):
        return self._closing

    @closing.setter
    def closing(self, value):
        self._closing = value
        self._plain = self._hot_reads and not value and self._held is None

    @property
    def held(self):
        return self._held

    @held.setter
    def held(self, value):
        self._held = value
        self.closing = self._closing  # _plain again

    def add_link(self, dst, link):
        """Send to ``dst`` on ``link`` from now on."""
        self._links[dst] = link

    def drop_link(self, dst):
        """Forget the link to ``dst`` (the next send to it goes to ``send_slow``)."""
        self._links.pop(dst, None)
        self._last = (_NOBODY, None)

    def clear_links(self):
        self._links.clear()
        self._last = (_NOBODY, None)

    def send_status(self, dst, buf, length):
        """Send ``length`` bytes of ``buf`` to ``dst``; the frame size or a VMCI error code."""
        if self._closing:
            return VMCI_ERROR_INVALID_ARGS
        last, link = self._last
        if last is not dst:  # a reply, or a client, names one handle object again and again
            link = self._links.get(dst)
            if link is None:
                return self._send_slow(dst, buf, length, None)
            self._last = (dst, link)
        # The common case of link.send inline, one Python frame less per datagram (a call costs
        # about 1,000 instructions, callgrind): a byte string or 1-D byte view, a length the
        # link's header cache holds (it holds only lengths link.send accepted, and those up to
        # _SMALL that the checks here let through), the lock free, the link open and unsealed,
        # the link watching the receiver's ACL epoch (an endpoint's links all do, see
        # datagram._OpenLink), the epoch unchanged and the queue not full. Anything else is
        # link.send's, which takes it from the start: the frame is joined before the lock is
        # taken (a view that cannot be joined raises there, with nothing counted), and nothing
        # is written before the checks pass. The queue's bound is checked against the CONSUMED
        # word seen last (it only grows), read again when that is not enough.
        kind = type(buf)
        if kind is bytes or kind is memoryview and buf.itemsize == 1 and buf.ndim == 1 or kind is bytearray:
            cached, header, total, room = link._header  # one tuple: a thread sending another length
            if cached != length:                        # replaces it whole
                if not 0 <= length <= _SMALL:
                    return self._send_done(dst, buf, length, link, None)
                header, total, room = link.header(length)
            size = len(buf)
            if length <= size:
                try:
                    frame = header + buf if length == size else header + buf[:length]
                except TypeError:  # a view that is not contiguous: link.send raises as the Cython core
                    return self._send_done(dst, buf, length, link, None)
                lock = link._lock
                if _mutex_trylock_gil(lock):  # busy, or its holder died: link.send waits for it
                    return self._send_done(dst, buf, length, link, None)
                try:
                    words = link._words
                    produced = words[_W_PRODUCED]
                    if produced - link._consumed >= room:  # room: what a frame this size leaves
                        link._consumed = words[_W_CONSUMED]
                        if produced - link._consumed >= room:
                            room = 0  # full: link.send says so
                    if room <= 0 or link._shut or words[_W_CLOSED] or words[_W_ACL_EPOCH] != link._epoch:
                        rc = None  # (an unwatched link's epoch is None: link.send's)
                    else:
                        words[_W_PRODUCED] = produced + total
                        try:
                            link._sock.send(frame, _SEND_FLAGS)
                        except OSError as exc:
                            rc = link._failed(exc, produced)
                        else:
                            self.sent += 1
                            return total
                finally:
                    _mutex_unlock_gil(lock)
                return self._send_done(dst, buf, length, link, rc)
        return self._send_done(dst, buf, length, link, None)

    def _send_done(self, dst, buf, length, link, rc):
        """``send_status``'s result where its inline send did not send: ``rc``, the status of a
        send that failed (None: ``link.send`` from the start), counted, or ``send_slow``'s."""
        if rc is None:
            rc = link.send(buf, length)
        if rc >= 0:
            self.sent += 1
            return rc
        if rc > AGAIN:  # a VMCI code; the core's own statuses (PEER_GONE, STALE) are <= AGAIN
            return rc
        return self._send_slow(dst, buf, length, link)

    def recv_status(self, buf, timeout=None):
        """One datagram into ``buf``: ``(payload_length, src)`` or ``(VMCI code, None)``."""
        free = self._free
        iov = self._iov
        try:
            free.pop()  # the receive lock, see RecvLock
        except IndexError:
            self.recv_lock.acquire()
        try:
            rx = self._rx
            conn = rx._hot
            if conn is None or timeout is not None or not self._plain or rx._ready \
                    or rx._skips >= _SKIP_MAX and not rx._poll_hot():
                if self._closing:
                    return VMCI_ERROR_NO_MORE_DATAGRAMS, None
                if self._held is not None or timeout is not None:
                    return self._recv_slow(buf, timeout, None, None)
                n, tag = rx._receive(buf, self._spill, None, True)  # take(), one frame less
            else:
                # The common case of take() inline, one Python frame less per datagram: one
                # sender, whose last read delivered a frame (Receiver._read's hot read), sends
                # a frame alike the last good one (Receiver._admit) from a connection that may
                # deliver, and the receiver's ACL epoch did not move.
                rx._skips += 1
                iov[1] = buf
                try:
                    n = _readv(conn[4], iov)
                except OSError as exc:
                    rx.last_fd = conn[4]  # set only where recv_slow may read it
                    n, tag = rx._hot_failed(exc, buf, self._spill)
                else:
                    words = rx._words  # the frame leaves the queue, as in Receiver._receive
                    consumed = rx._consumed + n  # (n == 0, the end: nothing moves)
                    if consumed > words[_W_PRODUCED]:
                        consumed = max(words[_W_PRODUCED], consumed - n)
                    words[_W_CONSUMED] = rx._consumed = consumed
                    tag = rx._good_tag  # None unless _good holds a frame (whose size is not 0)
                    good = rx._good  # compared item by item: no tuple to build
                    if tag is None or good[1] != n or good[0] is not conn or rx._header != good[2] \
                            or words[_W_ACL_EPOCH] != rx._epoch:
                        rx.last_fd = conn[4]
                        n, tag = rx._admit(buf, conn, n, 0, True, True) if n else (PEER_GONE, None)
                    else:
                        n -= VMCI_DG_HEADERSIZE
            if n < 0 or n > len(buf):
                return self._recv_slow(buf, None, n, tag)
            if tag is not self._last_tag:  # last_peer, inline
                self._last_src = tag.handle
                self._last_tag = tag
            self.received += 1
            return n, self._last_src
        finally:
            iov[1] = None  # the caller's buffer is not kept
            free.append(True)
            if self.recv_lock.waiters:
                self.recv_lock.wake()
