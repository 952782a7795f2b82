"""Pure-Python ``QueueStream``: the data path of a streamed queue pair (``qp_stream``), the
same frames (``mirror_wire``), results and accounting as the Cython core's ``_cqstream.pxi``.

The socket is non-blocking; every call takes the object's lock and makes only non-blocking
socket calls, and the blocking waits sleep in ``poll`` outside it. Bytes go out in stream
order: a send the socket does not take whole leaves its rest in ``_out``, and nothing is sent
directly while ``_out`` holds bytes.
"""
import contextlib
import os
import select
import threading
import time

from . import mirror_wire as W
from .constants import (
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_QUEUEPAIR_NODATA,
    VMCI_ERROR_QUEUEPAIR_NOSPACE,
    VMCI_ERROR_QUEUEPAIR_NOTATTACHED,
    VMCI_ERROR_TIMEOUT,
)

__all__ = ["QS_DATA", "QS_CREDIT", "QS_GONE", "QS_BAD", "QS_BUSY", "QueueStream"]

QS_DATA, QS_CREDIT, QS_GONE, QS_BAD, QS_BUSY = W.QS_DATA, W.QS_CREDIT, W.QS_GONE, W.QS_BAD, W.QS_BUSY
_EOF, _DETACHED = W.QS_EOF, W.QS_DETACHED
_HDR = W.HEADER.size
_ALL = 1 << 64
_WAKE = -2006  # the core's WAKE (_pure.WAKE)
_SOFT = (BlockingIOError, InterruptedError)
_COUNTED = {W.CREDIT: "CREDIT", W.WANT: "WANT"}  # control frames that ``counts`` reports


def _view(buf, writable=False) -> memoryview:
    view = memoryview(buf)
    if writable and view.readonly:
        raise BufferError("the destination buffer must be writable")
    return view if view.ndim == 1 and view.format in ("B", "b", "c") else view.cast("B")


class QueueStream:
    """One end's data path of a streamed queue pair: see ``QueueStream`` in ``_core.pyi``."""

    def __init__(self, sock, wake_fd, produce_size, consume_size, send_timeout=30.0):
        for size in (produce_size, consume_size):
            if isinstance(size, bool) or not isinstance(size, int):
                raise TypeError("a queue size must be an int")
            if size < 0 or size >= _ALL:
                raise OverflowError("a queue size must be in [0, 2**64)")
        self._sock = sock
        self._wake = wake_fd
        self._pcap = max(produce_size - 1, 0)
        self._ccap = max(consume_size - 1, 0)
        self._csize = consume_size
        self._send_timeout = float(send_timeout)
        self._lock = threading.Lock()
        self._sent = self._peer_consumed = self._consumed = self._credited = self._announced = 0
        self._peer_wants = self._asked = False
        self._state = self._news = self._busy = 0
        self._sleepers = 0          # threads asleep in _sleep (they read the stream themselves)
        # a pipe: written when another thread's read brought what sleepers wait for
        self._kick_r, self._kick_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._hdr = bytearray(_HDR)
        self._hdr_have = 0
        self._data_left = 0
        self._promised = 0          # payload bytes counted ready by wait_data, not received yet
        self._dry = False           # the last read found the socket empty (EAGAIN, or short)
        self._ring = bytearray()    # the consume queue is [_rpos, _rend); the rest is spare room
        self._rpos = self._rend = 0
        self._out = bytearray()     # bytes of the stream the socket has not taken yet
        self.max_send = 0
        self.read_ahead = W.QS_READ_AHEAD   # stream bytes a read takes beyond the next header
        self._counts = dict.fromkeys(W.QS_COUNTS, 0)

    # -- sending (lock held)

    def _sendv(self, parts) -> int:
        """Send what the socket takes now of ``parts`` (at most ``max_send`` per call)."""
        total = sum(len(p) for p in parts)
        sent = 0
        while sent < total:
            limit = self.max_send or total
            chunk, skip = [], sent
            for p in parts:
                if skip >= len(p):
                    skip -= len(p)
                    continue
                piece = p[skip:skip + limit]
                chunk.append(piece)
                limit -= len(piece)
                skip = 0
                if not limit:
                    break
            try:
                self._counts["sendmsg"] += 1
                n = self._sock.sendmsg(chunk)
            except InterruptedError:
                continue
            except BlockingIOError:
                break
            except OSError:
                self._gone(0)
                break
            sent += n
        return sent

    def _emit(self, parts) -> None:
        if self._state & QS_GONE:
            return
        sent = 0
        if not self._out:
            sent = self._sendv(parts)
            if self._state & QS_GONE:
                return
        for p in parts:
            if sent >= len(p):
                sent -= len(p)
                continue
            self._out += p[sent:]
            sent = 0

    def _send_out(self) -> None:
        if self._out and not self._state & QS_GONE:
            del self._out[:self._sendv([memoryview(self._out)])]

    def _control(self, ftype, arg=0) -> None:
        if ftype in _COUNTED:
            self._counts[_COUNTED[ftype]] += 1
        self._emit([W.HEADER.pack(W.MAGIC, ftype, 0, 0, arg, 0)])

    def _credit(self) -> None:
        owed = self._consumed - self._credited
        if owed and (self._peer_wants or owed * 4 >= self._csize) and not self._state & QS_GONE:
            self._credited = self._consumed
            self._peer_wants = False
            self._control(W.CREDIT, self._consumed)

    def _ask(self) -> None:
        if not self._asked:
            self._asked = True
            self._control(W.WANT)

    def _send_data(self, views) -> None:
        views = [v for v in views if len(v)]
        while views:
            parts, left = [], W.MAX_PAYLOAD
            while views and left:
                piece = views[0][:left]
                parts.append(piece)
                left -= len(piece)
                if len(piece) == len(views[0]):
                    views.pop(0)
                else:
                    views[0] = views[0][len(piece):]
            self._counts["DATA"] += 1
            self._emit([W.HEADER.pack(W.MAGIC, W.DATA, 0, 0, 0, W.MAX_PAYLOAD - left), *parts])

    def _free(self) -> int:
        return self._pcap - (self._sent - self._peer_consumed)

    def _short(self, need) -> int:
        """The free space for a write of ``need`` bytes: when it is short, first the credit
        already in the socket is taken (the stream read as ``pull`` does), so that a write is
        cut or refused only for want of credit the peer has not sent; -1 if the peer went."""
        if self._free() < need:
            self._rx(None, _ALL, False)
            if self._state & QS_GONE:
                return -1
        return self._free()

    def write(self, buf):
        """Enqueue what fits of ``buf``: the count, QUEUEPAIR_NOSPACE (WANT sent), or
        QUEUEPAIR_NOTATTACHED. Blocks only while the socket has no room."""
        view = _view(buf)
        with self._lock:
            if self._state & (_DETACHED | QS_GONE):
                return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
            free = self._short(len(view))
            if free < 0:
                return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
            if not free:
                self._ask()
                return VMCI_ERROR_QUEUEPAIR_NOSPACE
            n = min(len(view), free)
            self._sent += n
            if n:
                self._send_data([view[:n]])
            blocked = bool(self._out)
        if blocked:
            self._flush(self._send_timeout)
        return n

    def write_many(self, bufs):
        """Enqueue whole buffers while each fits: how many (0 for none given), or
        QUEUEPAIR_NOSPACE if the first does not fit, or QUEUEPAIR_NOTATTACHED."""
        views = [_view(b) for b in bufs]
        with self._lock:
            if self._state & (_DETACHED | QS_GONE):
                return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
            if not views:
                return 0
            free, taken = self._short(sum(len(v) for v in views)), 0
            if free < 0:
                return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
            while free and taken < len(views) and len(views[taken]) <= free:
                free -= len(views[taken])
                taken += 1
            if not taken:
                self._ask()
                return VMCI_ERROR_QUEUEPAIR_NOSPACE
            self._sent += self._free() - free
            self._send_data(views[:taken])
            blocked = bool(self._out)
        if blocked:
            self._flush(self._send_timeout)
        return taken

    def ask(self):
        """Send WANT (once until a CREDIT comes): the peer then returns what it owes."""
        with self._lock:
            if not self._state & (QS_GONE | _DETACHED):
                self._ask()
                self._send_out()

    def _poll(self, events, ms, sleeper, first=False):
        """Sleep in poll(2) (lock released: the caller holds it) on the socket, the wake fd
        and, for a ``sleeper``, the kick pipe: (socket revents, woken by the wake fd). With
        another sleeper there a kick may be drained by it, so each sleeps 10 ms at most; a
        wait's ``first`` sleep kicks the others once so that they bound theirs too (and leaves
        the pipe out of its own poll: draining that kick itself could leave them asleep,
        poll(2) looking again once they run)."""
        poller = select.poll()
        poller.register(self._sock, events)
        poller.register(self._wake, select.POLLIN)
        if sleeper:
            kicked = first and self._sleepers
            if kicked:
                with contextlib.suppress(OSError):
                    os.write(self._kick_w, b"\0")
            else:
                poller.register(self._kick_r, select.POLLIN)
            if self._sleepers and (ms < 0 or ms > 10):
                ms = 10
        self._busy += 1
        self._sleepers += sleeper
        self._lock.release()
        try:
            ready = dict(poller.poll(ms))
        finally:
            self._lock.acquire()
            self._busy -= 1
            self._sleepers -= sleeper
        if self._kick_r in ready:
            with contextlib.suppress(OSError):
                while os.read(self._kick_r, 64):
                    pass
        return ready.get(self._sock.fileno(), 0), self._wake in ready

    @staticmethod
    def _ms(deadline):
        if deadline is None:
            return -1
        left = deadline - time.monotonic()
        return 0 if left <= 0 else int(left * 1000) + 1

    def _flush(self, timeout):
        deadline = None if timeout < 0 else time.monotonic() + timeout
        with self._lock:
            while True:
                self._send_out()
                if not self._out:
                    return 0
                if self._state & QS_GONE:
                    return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
                ms = self._ms(deadline)
                if ms == 0:
                    self._gone(0)
                    return VMCI_ERROR_TIMEOUT
                revents, woken = self._poll(select.POLLOUT | select.POLLIN, ms, False)
                if woken:
                    return _WAKE
                if revents & ~select.POLLOUT:
                    self._rx(None, _ALL, False)

    def flush(self, timeout=None):
        """Send what the socket did not take yet: 0, VMCI_ERROR_TIMEOUT (``timeout`` seconds,
        None: the send timeout; 0: no wait, 0 also when bytes remain), NOTATTACHED or WAKE."""
        with self._lock:
            if self._state & QS_GONE or not self._out:
                return 0
            if timeout == 0:
                self._send_out()
                return 0
        return self._flush(self._send_timeout if timeout is None else timeout)

    @property
    def pending(self):
        """Bytes of the stream the socket has not taken yet."""
        return len(self._out)

    # -- receiving (lock held)

    def _gone(self, why) -> None:
        self._state |= QS_GONE | why
        self._news |= QS_GONE

    def _frame(self) -> None:
        magic, ftype, flags, reserved, arg, length = W.HEADER.unpack(self._hdr)
        self._hdr_have = 0
        if magic != W.MAGIC or flags or reserved or length > W.MAX_PAYLOAD:
            self._gone(QS_BAD | _EOF)
        elif ftype == W.DATA:
            if self._announced - self._consumed + length > self._ccap:
                self._gone(QS_BAD | _EOF)
            else:
                self._announced += length
                self._data_left = length
        elif length:
            self._gone(QS_BAD | _EOF)
        elif ftype == W.CREDIT and self._peer_consumed <= arg <= self._sent:
            if arg != self._peer_consumed:
                self._news |= QS_CREDIT
            self._peer_consumed = arg
            self._asked = False
        elif ftype == W.WANT:
            self._peer_wants = True
            self._credit()
        elif ftype == W.BYE:
            self._gone(_EOF)
        else:
            self._gone(QS_BAD | _EOF)

    def _parse(self, start, r) -> int:
        """The ``r`` stream bytes just read onto the ring at ``start`` (after its payload): act
        on the frames among them, moving each payload down to follow the ring's payload
        (headers go through ``_hdr``); the ring is cut after it. The payload bytes kept."""
        ring, src, kept, end = self._ring, start, start, start + r
        while src < end and not self._state & _EOF:
            if self._data_left:
                k = min(self._data_left, end - src)
                if src != kept:
                    ring[kept:kept + k] = ring[src:src + k]
                kept += k
                src += k
                self._data_left -= k
            else:
                k = min(_HDR - self._hdr_have, end - src)
                self._hdr[self._hdr_have:self._hdr_have + k] = ring[src:src + k]
                self._hdr_have += k
                src += k
                if self._hdr_have == _HDR:
                    self._frame()
        self._rend = kept
        return kept - start

    def _rx(self, dst, room, heads) -> int:
        """Read the stream without blocking, as the Cython core's ``_rx``: each read takes the
        rest of the current payload into ``dst`` (a writable view; delivered, so consumed; only
        while the ring is empty), the next header, then up to ``read_ahead`` bytes more (with
        None, also the payload still wanted) onto the ring, where ``_parse`` acts on the frames
        among them. ``room``: payload bytes wanted in ``dst`` (with None, on the ring);
        ``heads``: and the frames up to the next payload. Stops at the first read that finds
        the socket short, and with ``dst`` once the ring holds bytes. Returns the payload
        count delivered to ``dst`` or, with None, put on the ring."""
        got = total = 0
        news = self._news
        while not self._state & (_EOF | _DETACHED):
            if got >= room and (got or self._data_left or not heads):
                break
            if dst is not None and total and self._ready():
                break
            want = hdr_part = 0
            bufs = []
            if dst is not None and self._data_left and not self._ready():
                want = min(self._data_left, room - got)
                bufs.append(dst[got:got + want])
            if want == self._data_left:
                hdr_part = _HDR - self._hdr_have
                bufs.append(memoryview(self._hdr)[self._hdr_have:])
            ahead = self.read_ahead + (min(room - got, self._data_left) if dst is None else 0)
            if ahead:
                self._room(ahead)
                bufs.append(memoryview(self._ring)[self._rend:self._rend + ahead])
            start = self._rend
            asked = want + hdr_part + ahead
            self._counts["recvmsg"] += 1
            try:
                r = self._sock.recvmsg_into(bufs)[0]
            except _SOFT as exc:
                r = -1 if isinstance(exc, BlockingIOError) else -2
            except OSError:
                self._gone(_EOF)
                r = -1
            finally:
                for b in bufs:
                    b.release()
            if r == -2:
                continue
            self._dry = r < asked
            if r < 0:
                break
            if r == 0:
                self._gone(_EOF | (QS_BAD if self._hdr_have or self._data_left else 0))
                break
            k = min(r, want)
            if k:
                self._data_left -= k
                got += k
                total += k
                self._consumed += k
                r -= k
            if hdr_part and r:
                k = min(r, hdr_part)
                self._hdr_have += k
                r -= k
                if self._hdr_have == _HDR:
                    self._frame()
            if ahead:
                kept = self._parse(start, r)
                total += kept
                if dst is None:
                    got += kept
            if self._dry:
                break
        if total:
            self._news |= QS_DATA
            self._promised -= min(self._promised, total)
        if self._sleepers and (total > got or (total and dst is None) or self._news & ~news):
            with contextlib.suppress(OSError):
                os.write(self._kick_w, b"\0")   # what a sleeper waits for came to this thread
        return got

    def _room(self, n) -> None:
        """Spare room for ``n`` bytes after the ring's end, so that a read allocates nothing:
        the unread bytes move to the buffer's start when they are no more than the bytes that
        frees, else (or if still short) the buffer grows, at least doubling."""
        ring, have = self._ring, self._rend - self._rpos
        if self._rend + n <= len(ring):
            return
        if have <= self._rpos:
            ring[:have] = ring[self._rpos:self._rend]
            self._rpos, self._rend = 0, have
        if self._rend + n > len(ring):
            ring.extend(bytes(max(self._rend + n - len(ring), len(ring))))

    def _await(self, dst, want) -> int:
        """Wait (lock released) for up to ``want`` promised bytes (``_promised``: counted ready
        by ``wait_data`` from their frame's header, so on their way), read as ``_rx``."""
        got, first = 0, True
        deadline = time.monotonic() + self._send_timeout
        while got < want and self._promised and not self._state & (_EOF | _DETACHED):
            if dst is not None and self._ready():
                break       # another thread put the next bytes in the ring: they come first
            ms = self._ms(deadline)
            if ms == 0 or self._poll(select.POLLIN, ms, True, first)[1]:
                break
            first = False
            got += self._rx(None if dst is None else dst[got:], want - got, False)
        return got

    def _fill(self, size) -> None:
        """The ring up to ``size`` bytes, as far as the socket (and what was promised) has them."""
        if self._ready() < size:
            self._rx(None, size - self._ready(), False)
            if self._ready() < size and self._promised:
                self._await(None, min(size - self._ready(), self._promised))

    def _ready(self) -> int:
        return self._rend - self._rpos

    def _take(self, dst, n, consume) -> int:
        k = min(n, self._ready())
        if k:
            dst[:k] = memoryview(self._ring)[self._rpos:self._rpos + k]
            if consume:
                self._drop(k)
        return k

    def _drop(self, k) -> None:
        self._rpos += k
        self._consumed += k
        if self._rpos == self._rend:
            self._rpos = self._rend = 0

    def _read_status(self) -> int:
        if self._state & _DETACHED or (self._state & QS_GONE and not self._ready()):
            return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        return VMCI_ERROR_QUEUEPAIR_NODATA

    def read_into(self, buf, consume=True):
        """Dequeue (or with ``consume`` false, peek) into ``buf``: the count, QUEUEPAIR_NODATA,
        or QUEUEPAIR_NOTATTACHED (detached, or the peer gone and everything read). A dequeue
        that empties the ring reads the rest from the socket straight into ``buf``."""
        view = _view(buf, writable=True)
        with self._lock:
            if self._state & _DETACHED:
                return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
            size = len(view)
            if consume:
                n = self._take(view, size, True)
                if n < size and not self._ready():
                    while True:      # what a read puts on the ring (read ahead) comes next
                        n += self._rx(view[n:], size - n, False)
                        n += self._take(view[n:], size - n, True)
                        if n == size or self._dry or self._state & (_EOF | _DETACHED):
                            break
                    if n < size and self._promised:
                        n += self._await(view[n:], min(size - n, self._promised))
                        n += self._take(view[n:], size - n, True)
                self._credit()
            else:
                self._fill(size)
                n = self._take(view, size, False)
            self._send_out()
            return n if n else self._read_status()

    def read_bytes(self, n, consume=True):
        """Up to ``n`` bytes as ``bytes`` (consumed unless ``consume`` is false), or a code as
        ``read_into``."""
        if n < 0:
            return VMCI_ERROR_INVALID_ARGS
        with self._lock:
            if self._state & _DETACHED:
                return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
            self._fill(n)
            k = min(n, self._ready())
            if not k:
                return self._read_status()
            out = bytes(memoryview(self._ring)[self._rpos:self._rpos + k])
            if consume:
                self._drop(k)
                self._credit()
                self._send_out()
            return out

    def consume(self, n):
        """Drop the first ``n`` ready bytes: ``n``, INVALID_ARGS (more than is ready), or
        QUEUEPAIR_NOTATTACHED after detach."""
        with self._lock:
            if self._state & _DETACHED:
                return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
            if n < 0 or n > self._ready():
                return VMCI_ERROR_INVALID_ARGS
            self._drop(n)
            self._credit()
            self._send_out()
            return n

    def pull(self):
        """Read what the socket holds into the ring, without waiting; the QS_* news since the
        last call (QS_DATA, QS_CREDIT, QS_GONE), or QS_BUSY if a thread waits in ``wait_*``."""
        with self._lock:
            if self._sleepers:
                return QS_BUSY
            self._rx(None, _ALL, False)
            self._send_out()
            news, self._news = self._news, 0
            return news

    def _wait(self, space, timeout):
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        first, sleeps = True, timeout is None or timeout > 0
        with self._lock:
            while True:
                if self._state & _DETACHED:
                    return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
                if space:
                    if self._state & QS_GONE:
                        return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
                    if self._free() >= space:
                        return self._free()
                    self._ask()
                    self._rx(None, _ALL, False)
                    if self._free() >= space:
                        continue
                else:
                    # Up to the next payload's header: its bytes count as ready (they come in
                    # the same send as the header) and the caller's dequeue reads them directly.
                    # (a dequeue that just found the socket empty is followed by a poll first)
                    if not (first and self._dry and not self._ready() and not self._data_left and sleeps):
                        self._rx(None, 0, True)
                    if self._state & _EOF:
                        self._data_left = 0      # a frame cut short: its rest never comes
                    if self._ready() or self._data_left:
                        self._promised = self._data_left
                        return self._ready() + self._data_left
                    if self._state & QS_GONE:
                        return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
                self._send_out()
                ms = self._ms(deadline)
                if ms == 0:
                    return VMCI_ERROR_TIMEOUT
                if self._poll(select.POLLIN | (select.POLLOUT if self._out else 0), ms, True, first)[1]:
                    return _WAKE
                first = False

    def wait_data(self, timeout=None):
        """Sleep until data is ready: its count, VMCI_ERROR_TIMEOUT after ``timeout`` seconds
        (None: forever), QUEUEPAIR_NOTATTACHED (peer gone, all read; detached), or WAKE."""
        return self._wait(0, timeout)

    def wait_space(self, n, timeout=None):
        """Sleep until ``n`` (> 0) bytes are free in the produce queue: the free count, or a
        code as ``wait_data``. Asks the peer for its credit (WANT) first."""
        if n <= 0:
            return VMCI_ERROR_INVALID_ARGS
        return self._wait(n, timeout)

    def bye(self, send=True, timeout=None):
        """Detach: every later call returns QUEUEPAIR_NOTATTACHED; with ``send`` (and the peer
        there) BYE follows the bytes already enqueued, flushed within ``timeout`` seconds."""
        rc = 0
        with self._lock:
            flush = send and not self._state & (QS_GONE | _DETACHED)
            if flush:
                self._control(W.BYE)
        if flush:
            rc = self._flush(self._send_timeout if timeout is None else timeout)
        with self._lock:
            self._state |= _DETACHED
        return rc

    def close(self):
        """Free the buffers; False (nothing done) while a thread is inside a blocking call."""
        with self._lock:
            if self._busy:
                return False
            self._state |= _DETACHED | _EOF
            self._ring, self._out, self._rpos, self._rend = bytearray(), bytearray(), 0, 0
            self._close_kick()
            return True

    def _close_kick(self) -> None:
        if getattr(self, "_kick_r", -1) >= 0:
            os.close(self._kick_r)
            os.close(self._kick_w)
            self._kick_r = self._kick_w = -1

    def __del__(self):
        self._close_kick()

    @property
    def state(self):
        """QS_GONE (the peer detached, died or was cut off), with QS_BAD if it sent a bad frame."""
        return self._state & (QS_GONE | QS_BAD)

    @property
    def ready(self):
        """Bytes in the ring (read from the socket, not dequeued)."""
        return self._ready()

    @property
    def unread(self):
        """Bytes the peer sent (as far as headers told) that were not dequeued."""
        return self._announced - self._consumed

    @property
    def free(self):
        """Bytes ``write`` accepts now: produce capacity minus what the peer has not credited."""
        return self._free()

    @property
    def sent(self):
        return self._sent

    @property
    def peer_consumed(self):
        return self._peer_consumed

    @property
    def counts(self):
        """System calls made and frames sent so far, by name (see ``_core.pyi``)."""
        return dict(self._counts)
