"""The pure core's Fastpath: one endpoint's ``send_status`` and ``recv_status`` (see _core.pyi)."""
import threading

from ._pure import (_SEND_FLAGS, _SKIP_MAX, _SMALL, _W_ACL_EPOCH, _W_CLOSED, _W_CONSUMED, _W_PRODUCED,
                    AGAIN, PEER_GONE, _mutex_trylock_gil, _mutex_unlock_gil, _readv)
from .constants import (VMCI_DG_HEADERSIZE, VMCI_ERROR_INVALID_ARGS, VMCI_ERROR_NO_MORE_DATAGRAMS,
                        VMCI_MAX_DG_PAYLOAD_SIZE)

_NOBODY = object()  # never a destination: the send cache starts empty


class Fastpath:
    """One endpoint's ``send_status`` and ``recv_status``, each one call (see _core.pyi)."""

    __slots__ = ("_rx", "_spill", "_hot_reads", "recv_lock", "_links", "_last", "_send_slow", "_recv_slow", "_last_tag",
                 "_last_src", "closing", "held", "last_peer", "sent", "received")

    def __init__(self, receiver, spill, send_slow, recv_slow):
        self._rx = receiver
        self._spill = spill
        self._hot_reads = len(spill) > VMCI_MAX_DG_PAYLOAD_SIZE  # see Receiver._read
        self.recv_lock = threading.Lock()
        self._links = {}
        self._last = (_NOBODY, None)  # (dst, link) of the last send: one tuple, replaced whole
        self._send_slow = send_slow
        self._recv_slow = recv_slow
        self._last_tag = _NOBODY
        self._last_src = None
        self.closing = False
        self.held = None
        self.last_peer = None
        self.sent = 0
        self.received = 0

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
        if self.closing:
            return VMCI_ERROR_INVALID_ARGS
        last, link = self._last
        if last is not dst:  # a reply, or a client, names one handle object again and again
            link = self._links.get(dst)
            if link is None:
                return self._send_slow(dst, buf, length, None)
            self._last = (dst, link)
        # The common case of link.send inline, one Python frame less per datagram (a call costs
        # about 1,000 instructions, callgrind): a byte string or 1-D byte view of up to _SMALL
        # bytes, the lock free, the link open and unsealed, the receiver's ACL epoch unchanged
        # and its queue not full. Anything else is link.send's, which takes it from the start:
        # nothing is done here before the lock is taken. The queue's bound is checked against
        # the CONSUMED word seen last (it only grows), read again when that is not enough.
        kind = type(buf)
        rc = None
        if (kind is bytes or kind is memoryview and buf.itemsize == 1 and buf.ndim == 1 or kind is bytearray) \
                and 0 <= length <= _SMALL and length <= len(buf):
            size, header = link._header  # one tuple: a thread sending another length replaces it whole
            if size != length:
                header = link.header(length)
            lock = link._lock
            if not _mutex_trylock_gil(lock):
                try:
                    words = link._words
                    produced = words[_W_PRODUCED]
                    total = VMCI_DG_HEADERSIZE + length
                    room = link._limit - total  # the queue is full at produced - consumed >= room
                    if produced - link._consumed >= room:
                        link._consumed = words[_W_CONSUMED]
                    if not (link._shut or words[_W_CLOSED]
                            or link._epoch is not None and words[_W_ACL_EPOCH] != link._epoch
                            or produced - link._consumed >= room or room <= 0):
                        words[_W_PRODUCED] = produced + total
                        try:
                            link._sock.send(header + (buf if length == len(buf) else buf[:length]), _SEND_FLAGS)
                            rc = total
                        except OSError as exc:
                            rc = link._failed(exc, produced)
                finally:
                    _mutex_unlock_gil(lock)
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
        lock = self.recv_lock
        lock.acquire()
        try:
            if self.closing:
                return VMCI_ERROR_NO_MORE_DATAGRAMS, None
            if self.held is not None or timeout is not None:
                return self._recv_slow(buf, timeout, None, None)
            rx = self._rx
            conn = rx._hot
            if conn is None or rx._skips >= _SKIP_MAX or rx._ready or not self._hot_reads:
                n, tag = rx._receive(buf, self._spill, None, True)  # take(), one frame less
            else:
                # The common case of take() inline, one Python frame less per datagram: one
                # sender, whose last read delivered a frame (Receiver._read's hot read), sends
                # a frame alike the last good one (Receiver._admit) from a connection that may
                # deliver, and the receiver's ACL epoch did not move.
                rx._skips += 1
                try:
                    n = _readv(conn[4], (rx._header, buf, self._spill))
                except OSError as exc:
                    rx.last_fd = conn[4]  # set only where recv_slow may read it
                    n, tag = rx._hot_failed(exc, buf, self._spill)
                else:
                    if n == 0:
                        rx.last_fd = conn[4]
                        n, tag = PEER_GONE, None
                    else:
                        words = rx._words  # the frame leaves the queue, as in Receiver._receive
                        consumed = words[_W_CONSUMED] + n
                        if consumed > words[_W_PRODUCED]:
                            consumed = max(words[_W_PRODUCED], consumed - n)
                        words[_W_CONSUMED] = consumed
                        tag = rx._good_tag
                        if tag is None or (conn, n, rx._header, 0) != rx._good or words[_W_ACL_EPOCH] != rx._epoch:
                            rx.last_fd = conn[4]
                            n, tag = rx._admit(buf, conn, n, 0, True, True)
                        else:
                            n -= VMCI_DG_HEADERSIZE
            if n < 0 or n > len(buf):
                return self._recv_slow(buf, None, n, tag)
            if tag is not self._last_tag:
                self._last_src = tag.handle
                self._last_tag = tag
            self.last_peer = tag
            self.received += 1
            return n, self._last_src
        finally:
            lock.release()
