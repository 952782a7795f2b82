"""The hand-over queue of the listeners that stand where a listening socket stands.

``StreamListener`` (stream mode, ``streams.py``) and ``DgramListener`` (dgram mode,
``vsock_dgram.py``) both make AF_UNIX SEQPACKET pairs on their threads and hand each pair's core
end to the endpoint, which takes it as an accepted connection: ``fileno()`` is readable while
such ends wait, ``accept()`` returns the next one as ``(sock, None)`` (``BlockingIOError`` when
none waits), and ``peer(sock)`` the sender found for it (a ``Peer``; None: refused).
"""
import collections
import errno
import os
import threading
from typing import Dict, Optional

from .base import Peer


class HandOver:
    """Core ends waiting for ``accept``, with their senders; a pipe readable while any wait,
    and a stop pipe for the listener's threads. ``_lock`` guards the queue, the peers and
    ``_closed``; ``close_pipes`` closes both pipes once the threads have ended."""

    def __init__(self):
        self._lock = threading.Lock()
        self._queue = collections.deque()
        self._peers: Dict[object, Optional[Peer]] = {}
        self._closed = False
        self._ready_r, self._ready_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._ready_r

    def accept(self):
        with self._lock:
            if not self._queue:
                raise BlockingIOError(errno.EAGAIN, "nothing waits to be accepted")
            front = self._queue.popleft()
            os.read(self._ready_r, 1)
        return front, None

    def peer(self, sock) -> Optional[Peer]:
        with self._lock:
            return self._peers.pop(sock, None)

    def _hand_over(self, front, peer: Optional[Peer]) -> None:
        """Queue ``front`` for ``accept`` with its sender. Call with ``_lock`` held."""
        self._peers[front] = peer
        self._queue.append(front)
        os.write(self._ready_w, b"\0")

    def _take_waiting(self) -> list:
        """Forget every end not yet accepted and return them (to close). Call with ``_lock``."""
        queued, self._queue = list(self._queue), collections.deque()
        self._peers.clear()
        return queued

    def close_pipes(self) -> None:
        for fd in (self._ready_r, self._ready_w, self._stop_r, self._stop_w):
            os.close(fd)


__all__ = ["HandOver"]
