"""The pure core's Fastpath: one endpoint's ``send_status`` and ``recv_status`` (see _core.pyi)."""
import threading

from ._pure import AGAIN
from .constants import VMCI_ERROR_INVALID_ARGS, VMCI_ERROR_NO_MORE_DATAGRAMS

_NOBODY = object()  # never a destination: the send cache starts empty


class Fastpath:
    """One endpoint's ``send_status`` and ``recv_status``, each one call (see _core.pyi)."""

    __slots__ = ("_rx", "_spill", "recv_lock", "_links", "_last", "_send_slow", "_recv_slow", "_last_tag",
                 "_last_src", "closing", "held", "last_peer", "sent", "received")

    def __init__(self, receiver, spill, send_slow, recv_slow):
        self._rx = receiver
        self._spill = spill
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
        last = self._last
        if last[0] is dst:  # a reply, or a client, names one handle object again and again
            link = last[1]
        else:
            link = self._links.get(dst)
            if link is None:
                return self._send_slow(dst, buf, length, None)
            self._last = (dst, link)
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
            n, tag = self._rx._receive(buf, self._spill, None, True)  # take(), one frame less
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
