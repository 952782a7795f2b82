"""Queue pairs carried over a stream, for kernels that share no pages
(``VSOCKCOMPAT_SHM_MODE=mirrored``, the default on the vsock transport).

``StreamQueuePair`` has ``QueuePair``'s API and results: create/attach with mirrored
sizes and the same checks (QUEUEPAIR_MISMATCH, peer restriction, ATTACH_ONLY, LOCAL, a
third end refused), partial enqueue, NOSPACE / NODATA, peek, the four space/ready
queries, PEER_ATTACH / PEER_DETACH events, blocking waits (in the kernel: a poll of the
stream, or a condition variable) and final detach.

Flow control matches the ring's capacity: a queue of ``size`` bytes holds at most
``size - 1``. Each end keeps its consume queue in its own memory and tells the peer how
much it has dequeued (CREDIT frames carry the running total) whenever a quarter of its
queue is owed or the peer asks (WANT: sent by an end that finds its produce queue full or
waits for space); an end's produce free space is ``produce_size - 1``
minus the bytes it sent that the peer has not reported dequeued, so an enqueue never accepts
more than the peer's consume queue can hold. Differences from one kernel: the free space an
end sees lags the peer's dequeues (by less than a quarter of the queue, and by one frame's
transit once it asks), and bytes enqueued before the peer attaches wait in the creator's
memory until it does.

Who reads the stream: a caller waiting for data or space reads it itself (no hand-off from
another thread per frame); otherwise each end's reader thread does, taking it back after
``READER_TICK`` seconds in which no caller read it (it wakes every tick until detach), so frames (data into the consume queue, credit, WANT, BYE) keep being taken while the
application is busy elsewhere.

Stream (ends named by ``mirror_link``, frames of ``mirror_wire``): the attacher sends
HELLO with payload ``<QQII`` (its produce size, consume size, flags, context id); the
creator answers REFUSE (arg: the VMCI code) and closes, or WELCOME (arg: its context id).
Then DATA (payload: queue bytes), CREDIT (arg: bytes dequeued so far), WANT and BYE (detach).
Between two guests DATA is written in pieces (``mirror_link.write_piece``).
DATA beyond the receiver's free space, a CREDIT above what was sent or going backwards,
anything else or a stream cut inside a frame counts in ``stats_bad_frames``, closes the
stream and is treated as the peer detaching. Each new connection's handshake runs in a thread
of its own: one that says nothing (for ``HELLO_TIMEOUT`` seconds) holds up nobody, and once
the pair has its two ends every further HELLO is refused with VMCI_ERROR_UNAVAILABLE.
"""
import collections
import contextlib
import os
import select
import socket
import struct
import threading
import time
from typing import List, Optional, Tuple

from . import mirror_link, mirror_wire as W
from .constants import (
    VMCI_ERROR_ALREADY_EXISTS,
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_NO_ACCESS,
    VMCI_ERROR_NOT_FOUND,
    VMCI_ERROR_QUEUEPAIR_MISMATCH,
    VMCI_ERROR_QUEUEPAIR_NODATA,
    VMCI_ERROR_QUEUEPAIR_NOSPACE,
    VMCI_ERROR_QUEUEPAIR_NOTATTACHED,
    VMCI_ERROR_TIMEOUT,
    VMCI_ERROR_UNAVAILABLE,
    VMCI_EVENT_QP_PEER_ATTACH,
    VMCI_EVENT_QP_PEER_DETACH,
    VMCI_INVALID_ID,
    VMCI_QPFLAG_ATTACH_ONLY,
    VMCI_QPFLAG_LOCAL,
    VMCI_SUCCESS,
    VMCI_SUCCESS_LAST_DETACH,
    VMCI_SUCCESS_QUEUEPAIR_ATTACH,
    VMCI_SUCCESS_QUEUEPAIR_CREATE,
)
from .errors import (DuplicateEntry, Generic, NoAccess, NotFound, Timeout, Unavailable, VMCIError, check,
                     error_for)
from .handles import VMCIHandle
from .queuepair import PairEnd, QPEvent, _check_args
from .runtime import Runtime, default_runtime
from .transport.pieces import bytes_view as _bytes_view, send_parts

__all__ = ["StreamQueuePair"]

_HELLO = struct.Struct("<QQII")
#: Seconds a new connection has to send its HELLO, and an attacher waits for the answer.
HELLO_TIMEOUT = 10.0
#: Seconds a send may block (the peer's reader drains its socket into its queue).
SEND_TIMEOUT = 30.0
_RECV = 1 << 18
_PIECES = frozenset({W.DATA})  # queue bytes are a stream: DATA payloads are taken as they arrive
#: Seconds the reader thread leaves the stream to callers that read it themselves.
READER_TICK = 0.01


def _capacity(size: int) -> int:
    return size - 1 if size > 0 else 0


class _Chunks:
    """A byte queue kept as the received payloads themselves (no copy until read)."""

    def __init__(self):
        self._chunks: collections.deque = collections.deque()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, chunk: memoryview) -> None:
        if len(chunk):
            self._chunks.append(chunk)
            self._len += len(chunk)

    def copy(self, n: int, into: Optional[memoryview] = None) -> Optional[bytes]:
        """The first ``n`` bytes, copied ``into`` a view (None returned) or returned as bytes."""
        out = into if into is not None else bytearray(n)
        pos = 0
        for chunk in self._chunks:
            if pos == n:
                break
            k = min(len(chunk), n - pos)
            out[pos:pos + k] = chunk[:k]
            pos += k
        return None if into is not None else bytes(out)

    def drop(self, n: int) -> None:
        self._len -= n
        chunks = self._chunks
        while n:
            if len(chunks[0]) <= n:
                n -= len(chunks.popleft())
            else:
                chunks[0] = chunks[0][n:]
                n = 0


class StreamQueuePair(PairEnd):
    """One end of a queue pair over a stream; see the module docstring and ``QueuePair``."""

    def __init__(self, runtime: Runtime, handle: VMCIHandle, created: bool, produce_size: int,
                 consume_size: int, flags: int, peer: int):
        self._runtime = runtime
        self.handle = handle
        self.created = created
        self.produce_size = produce_size
        self.consume_size = consume_size
        self._flags = flags
        self._peer_allowed = peer
        self.peer_id = VMCI_INVALID_ID
        self.stats_bad_frames = 0
        self._cv = threading.Condition()
        self._send_lock = threading.Lock()
        self._in = _Chunks()             # the consume queue
        self._outbox = bytearray()       # enqueued before the peer attached
        self._sent = 0                   # bytes enqueued, in total
        self._peer_consumed = 0          # bytes the peer reported dequeued
        self._consumed = 0               # bytes we dequeued
        self._credited = 0               # ... as last reported to the peer
        self._events: collections.deque = collections.deque()
        self._sock: Optional[socket.socket] = None
        self._piece: Optional[int] = None   # bytes per send() on _sock (mirror_link.write_piece)
        self._listener: Optional[mirror_link.Listener] = None
        self._ever_attached = False
        self._peer_gone = False
        self._detached = False
        self._wake_r, self._wake_w = socket.socketpair()   # written once, at detach; never drained
        self._thread: Optional[threading.Thread] = None
        self._reader = W.FrameReader(_PIECES)
        # The peer's stream is read by whoever holds _rx: the reader thread, or a caller waiting
        # for data or space (``_pump``), which first takes the stream out of the reader thread's
        # epoll (_armed False) so the thread is not woken for bytes the caller reads itself.
        # Lock order: _rx, then _send_lock (only ever tried), then _cv.
        self._rx = threading.Lock()
        self._epoll = select.epoll()
        self._watching = False           # the stream is in the epoll (until it ends)
        self._armed = False              # ... and the reader thread is woken by it
        self._pumped = False             # a caller read the stream since the last tick
        self._poller: Optional[select.poll] = None
        self._asked = False              # WANT sent, no CREDIT since
        self._peer_wants = False         # the peer sent WANT

    # Allocation

    @classmethod
    def alloc(cls, handle=None, produce_size=0, consume_size=0, peer=VMCI_INVALID_ID, flags=0,
              runtime: Optional[Runtime] = None) -> "StreamQueuePair":
        """As ``QueuePair.alloc``: create the pair ``handle`` or attach to it."""
        runtime = runtime if runtime is not None else default_runtime()
        handle = _check_args(handle, produce_size, consume_size, peer, flags)
        me = runtime.transport.local_cid
        for _ in range(3):
            if handle is not None:
                try:
                    return cls._attach(runtime, handle, produce_size, consume_size, flags)
                except NotFound:
                    pass
            if flags & VMCI_QPFLAG_ATTACH_ONLY:
                raise NotFound("no queue pair %s to attach to" % (handle,))
            if handle is not None and handle.context != me:
                raise NotFound("no queue pair %s (pairs are created in their own context)" % (handle,))
            try:
                listener = mirror_link.listen(runtime, mirror_link.QUEUE_PAIR,
                                              None if handle is None else handle.resource)
            except DuplicateEntry:
                if handle is None:
                    raise
                continue
            qp = cls(runtime, listener.handle, True, produce_size, consume_size, flags, peer)
            qp._listener = listener
            qp._start()
            return qp
        raise Unavailable("queue pair %s keeps changing state" % (handle,))

    @classmethod
    def alloc_status(cls, handle=None, produce_size=0, consume_size=0, peer=VMCI_INVALID_ID, flags=0,
                     runtime: Optional[Runtime] = None) -> Tuple[int, Optional["StreamQueuePair"]]:
        try:
            qp = cls.alloc(handle, produce_size, consume_size, peer, flags, runtime)
        except VMCIError as exc:
            return exc.code, None
        return (VMCI_SUCCESS_QUEUEPAIR_CREATE if qp.created else VMCI_SUCCESS_QUEUEPAIR_ATTACH), qp

    @classmethod
    def _attach(cls, runtime, handle, produce_size, consume_size, flags) -> "StreamQueuePair":
        me = runtime.transport.local_cid
        sock = mirror_link.connect(runtime, mirror_link.QUEUE_PAIR, handle)
        try:
            sock.settimeout(HELLO_TIMEOUT)
            sock.sendall(W.encode(W.HELLO, 0, _HELLO.pack(produce_size, consume_size, flags, me)))
            reader = W.FrameReader(_PIECES)
            frames: List[W.Frame] = []
            while not frames:
                data = sock.recv(_RECV)
                if not data:
                    raise NotFound("the creator of %s closed the connection" % (handle,))
                frames = reader.feed(data)
            first = frames[0]
            if first.type == W.REFUSE:
                code = W.decode_code(first.arg)
                raise error_for(code if code < 0 else VMCI_ERROR_UNAVAILABLE, "refused by the creator")
            if first.type != W.WELCOME:
                raise Generic("the creator of %s answered out of turn" % (handle,))
            qp = cls(runtime, handle, False, produce_size, consume_size, flags, VMCI_INVALID_ID)
            qp.peer_id = mirror_link.peer_context(runtime, sock, first.arg & 0xFFFFFFFF)
            if qp.peer_id is None:
                raise NoAccess("the creator of %s is not who it claims" % (handle,))
            qp._sock, qp._piece = sock, mirror_link.write_piece(runtime, sock)
            qp._ever_attached = True
            sock.settimeout(SEND_TIMEOUT)
            qp._handle_frames(frames[1:])
            qp._reader = reader
            qp._watch(sock)
        except VMCIError:
            sock.close()
            raise
        except socket.timeout:
            sock.close()
            raise Timeout("the creator of %s did not answer" % (handle,)) from None
        except W.ProtocolError as exc:
            sock.close()
            raise Generic("the creator of %s sent garbage: %s" % (handle, exc)) from None
        except OSError as exc:
            sock.close()
            raise NotFound("queue pair %s: %s" % (handle, exc)) from None
        except BaseException:
            sock.close()
            raise
        qp._start()
        return qp

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="vsockcompat-qp-stream-%d.%d" % tuple(self.handle))
        self._thread.start()

    # The reader thread

    def _run(self) -> None:
        ep, wake = self._epoll, self._wake_r.fileno()
        ep.register(wake, select.EPOLLIN)
        listener = -1
        if self._listener is not None:
            self._listener.sock.setblocking(False)
            listener = self._listener.sock.fileno()
            ep.register(listener, select.EPOLLIN)
        while not self._detached:
            # Ticks: a caller can take the stream (or _serve add it) while we sleep in here.
            events = ep.poll(READER_TICK)
            if not events:
                self._rearm()
            for fd, _ in events:
                if fd == wake or self._detached:
                    return
                if fd == listener:
                    self._accept()
                elif self._rx.acquire(False):   # else a caller reads it (and has disarmed us)
                    try:
                        if self._armed and not self._receive(self._reader):
                            self._unwatch()
                    finally:
                        self._rx.release()

    def _watch(self, sock: socket.socket) -> None:
        """Put the peer's stream in the reader thread's epoll."""
        with self._rx:
            self._epoll.register(sock, select.EPOLLIN)
            self._watching = self._armed = True

    def _unwatch(self) -> None:
        """The stream is over: nobody reads it any more (``_rx`` held)."""
        if self._watching:
            self._watching = self._armed = False
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(self._sock)

    def _rearm(self) -> None:
        """At a tick of the reader thread while callers read the stream: if none has for a
        whole tick, the reader thread watches it again (frames then wait at most two ticks
        for a reader while the application is busy elsewhere)."""
        if self._rx.acquire(False):
            try:
                if self._pumped:
                    self._pumped = False
                elif self._watching and not self._armed and not self._detached:
                    self._epoll.modify(self._sock, select.EPOLLIN)
                    self._armed = True
            finally:
                self._rx.release()

    def _take_stream(self) -> bool:
        """With ``_rx`` held: take the stream from the reader thread; False if it is over."""
        if not self._watching or self._detached:
            return False
        if self._armed:
            self._epoll.modify(self._sock, 0)
            self._armed = False
        self._pumped = True
        return True

    def _poke(self) -> None:
        """Read what the stream holds now, without waiting, if the reader thread is not
        watching it and nobody else reads it."""
        if not self._armed and self._rx.acquire(False):
            try:
                if self._take_stream() and not self._receive(self._reader):
                    self._unwatch()
            finally:
                self._rx.release()

    def _pump(self, done, timeout: Optional[float]) -> None:
        """With ``_rx`` taken by the caller (and released here): read the peer's stream in the
        calling thread until ``done()`` (called under the condition) is true, the stream ends,
        detach, or ``timeout``. Saves the waiter a hand-off from the reader thread per frame;
        the reader thread stays out of the stream until callers leave it alone (``_rearm``)."""
        try:
            if not self._take_stream():
                return
            if self._poller is None:
                self._poller = select.poll()
                self._poller.register(self._sock, select.POLLIN)
                self._poller.register(self._wake_r, select.POLLIN)
            fd = self._sock.fileno()
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                with self._cv:
                    if done() or self._detached or self._peer_gone:
                        return
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                ready = self._poller.poll(None if left is None else int(left * 1000) + 1)
                if not ready or any(r[0] != fd for r in ready):
                    return   # timed out, or detached
                if not self._receive(self._reader):
                    self._unwatch()
                    return
        finally:
            self._rx.release()

    def _accept(self) -> None:
        """Take a connection; its handshake runs in a thread of its own, so a peer that says
        nothing holds up neither the data stream nor other attachers."""
        try:
            sock, _ = self._listener.sock.accept()
        except OSError:
            return
        threading.Thread(target=self._greet, args=(sock,), daemon=True,
                         name="vsockcompat-qp-greet-%d.%d" % tuple(self.handle)).start()

    def _greet(self, sock: socket.socket) -> None:
        """Read the HELLO, refuse or admit; an admitted stream becomes the peer's."""
        try:
            sock.settimeout(HELLO_TIMEOUT)
            reader = W.FrameReader()
            frames: List[W.Frame] = []
            while not frames:
                data = sock.recv(_RECV)
                if not data:
                    reader.finish()
                    sock.close()
                    return
                frames = reader.feed(data)
            if len(frames) != 1 or frames[0].type != W.HELLO or len(frames[0].payload) != _HELLO.size:
                raise W.ProtocolError("not a HELLO")
            produce, consume, flags, claimed = _HELLO.unpack(frames[0].payload)
            cid = mirror_link.peer_context(self._runtime, sock, claimed)
            with self._cv:
                code = self._admit(produce, consume, flags, cid)
                if code == VMCI_SUCCESS:
                    self._ever_attached = True      # claimed: a concurrent HELLO is refused
            if code != VMCI_SUCCESS:
                sock.sendall(W.encode_code(W.REFUSE, code))
                sock.close()
                return
        except (OSError, W.ProtocolError):
            with self._cv:
                self.stats_bad_frames += 1
            sock.close()
            return
        with self._sending():
            with self._cv:
                if self._detached:
                    sock.close()
                    return
                self._sock, self._piece = sock, mirror_link.write_piece(self._runtime, sock)
                self.peer_id = cid
                self._events.append(QPEvent(VMCI_EVENT_QP_PEER_ATTACH, self.handle, cid))
                outbox, self._outbox = bytes(self._outbox), bytearray()
                self._cv.notify_all()
            try:
                sock.sendall(W.encode(W.WELCOME, self.handle.context))
                sock.settimeout(SEND_TIMEOUT)
            except OSError:
                self._on_peer_gone()
            if outbox and not self._peer_gone:
                self._send_raw([outbox], len(outbox))
            self._watch(sock)

    def _admit(self, produce: int, consume: int, flags: int, cid: int) -> int:
        """The code for an attacher asking with these values (VMCI_SUCCESS to admit it)."""
        if self._ever_attached or self._detached:
            return VMCI_ERROR_UNAVAILABLE
        if cid is None or self._runtime.access.policy.denies(cid, self.handle.context):
            return VMCI_ERROR_NO_ACCESS  # a false claim, or flags that forbid the pair
        if flags & VMCI_QPFLAG_LOCAL:
            if not self._flags & VMCI_QPFLAG_LOCAL or cid != self.handle.context:
                return VMCI_ERROR_INVALID_ARGS
        elif cid == self.handle.context:
            return VMCI_ERROR_ALREADY_EXISTS
        if self._peer_allowed != VMCI_INVALID_ID and self._peer_allowed != cid:
            return VMCI_ERROR_NO_ACCESS
        if produce != self.consume_size or consume != self.produce_size:
            return VMCI_ERROR_QUEUEPAIR_MISMATCH
        if (flags ^ self._flags) & ~VMCI_QPFLAG_ATTACH_ONLY:
            return VMCI_ERROR_QUEUEPAIR_MISMATCH
        return VMCI_SUCCESS

    def _receive(self, reader: W.FrameReader) -> bool:
        """Read from the peer; False once the stream is over."""
        try:
            data = os.read(self._sock.fileno(), _RECV)   # the socket has a timeout: its fd does not block
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        try:
            if not data:
                reader.finish()
                self._on_peer_gone()
                return False
            frames = reader.feed(data)
        except W.ProtocolError:
            self._bad_frame()
            return False
        if not self._handle_frames(frames) or reader.failed:
            self._bad_frame()
            return False
        return not self._peer_gone

    def _handle_frames(self, frames) -> bool:
        with self._cv:
            for frame in frames:
                if frame.type == W.DATA and len(self._in) + len(frame.payload) <= _capacity(self.consume_size):
                    self._in.append(frame.payload)
                elif frame.type == W.CREDIT and self._peer_consumed <= frame.arg <= self._sent:
                    self._peer_consumed = frame.arg
                    self._asked = False
                elif frame.type == W.WANT and not frame.payload:
                    self._peer_wants = True
                elif frame.type == W.BYE and not frame.payload:
                    self._gone_locked()
                    break
                else:
                    return False
            self._cv.notify_all()
            owed = self._peer_wants and self._consumed != self._credited
        if owed:
            self._send_credit(blocking=False)
        return True

    def _bad_frame(self) -> None:
        with self._cv:
            self.stats_bad_frames += 1
        self._on_peer_gone()

    def _on_peer_gone(self) -> None:
        with self._cv:
            self._gone_locked()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _gone_locked(self) -> None:
        if not self._peer_gone:
            self._peer_gone = True
            self._events.append(QPEvent(VMCI_EVENT_QP_PEER_DETACH, self.handle, self.peer_id))
            self._cv.notify_all()

    # Sending

    def _send_raw(self, chunks, total: int) -> None:
        """Send queue bytes (the buffers ``chunks``, ``total`` bytes) as DATA frames; the caller
        holds the send lock."""
        try:
            if total <= W.MAX_PAYLOAD:
                send_parts(self._sock, [W.HEADER.pack(W.MAGIC, W.DATA, 0, 0, 0, total), *chunks],
                           self._piece)
                return
            view = memoryview(b"".join(chunks))
            for pos in range(0, total, W.MAX_PAYLOAD):
                chunk = view[pos:pos + W.MAX_PAYLOAD]
                send_parts(self._sock, [W.HEADER.pack(W.MAGIC, W.DATA, 0, 0, 0, len(chunk)), chunk],
                           self._piece)
        except OSError:
            self._on_peer_gone()

    def _credit_due(self) -> bool:
        """Whether a CREDIT is worth a frame: a quarter of the queue is owed or the peer asked (WANT)."""
        owed = self._consumed - self._credited
        return bool(owed) and (self._peer_wants or owed * 4 >= self.consume_size)

    def _send_credit(self, blocking: bool = True) -> None:
        """Send the CREDIT due, if one is (``_credit_due``). The reader thread never waits for
        the send lock (``blocking`` False): its holder sends the credit after its data."""
        if not self._send_lock.acquire(blocking):
            return
        try:
            self._credit_locked()
        finally:
            self._release_send()

    @contextlib.contextmanager
    def _sending(self):
        """Hold the send lock; see ``_release_send``."""
        self._send_lock.acquire()
        try:
            yield
        finally:
            self._release_send()

    def _release_send(self) -> None:
        """Release the send lock, then serve a WANT that came while it was held (the reader
        sets the flag before it tries the lock, so one of the two sends the credit)."""
        while True:
            self._send_lock.release()
            if not (self._peer_wants and self._consumed != self._credited and not self._peer_gone
                    and self._sock is not None) or not self._send_lock.acquire(False):
                return
            try:
                self._credit_locked()
            except BaseException:
                self._send_lock.release()
                raise

    def _credit_locked(self) -> None:
        with self._cv:
            if not self._credit_due() or self._sock is None or self._peer_gone:
                return
            self._credited = total = self._consumed
            self._peer_wants = False
        try:
            self._sock.sendall(W.encode(W.CREDIT, total))
        except OSError:
            self._on_peer_gone()

    def _ask_credit(self) -> None:
        """Ask the peer for the credit it owes (once until a CREDIT comes); send lock held."""
        with self._cv:
            if self._asked or self._sock is None or self._peer_gone:
                return
            self._asked = True
        try:
            self._sock.sendall(W.encode(W.WANT))
        except OSError:
            self._on_peer_gone()

    # Data

    def _free(self) -> int:
        return _capacity(self.produce_size) - (self._sent - self._peer_consumed)

    def enqueue_status(self, buf) -> int:
        """Write what fits of ``buf``: the count, QUEUEPAIR_NOSPACE, or QUEUEPAIR_NOTATTACHED."""
        view = _bytes_view(buf)

        def take(free):
            n = min(len(view), free)
            return n, (view[:n],)
        return self._write(take)

    def enqueue_many_status(self, bufs) -> int:
        """Write whole buffers while each fits: how many, or a negative code."""
        views = [_bytes_view(b) for b in bufs]

        def take(free):
            n = 0
            for v in views:
                if len(v) > free:
                    break
                free -= len(v)
                n += 1
            return (n, views[:n]) if n or not views else None
        return self._write(take)

    def _write(self, take) -> int:
        """``take(free)`` returns ``(count, chunks)`` or None when nothing fits. Sends happen
        under the send lock, so concurrent writers keep the stream in their reservation order."""
        self._send_lock.acquire()
        try:
            with self._cv:
                if self._detached or self._peer_gone:
                    return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
                free = self._free()
                taken = take(free) if free > 0 else None
                if taken is not None:
                    n, chunks = taken
                    total = sum(len(c) for c in chunks)
                    self._sent += total
                    if self._sock is None:
                        for chunk in chunks:
                            self._outbox += chunk
                        return n
            if taken is None:
                self._ask_credit()
                return VMCI_ERROR_QUEUEPAIR_NOSPACE
            if total:
                self._send_raw(chunks, total)
            return n
        finally:
            self._release_send()

    def _read(self, buf_len: int, consume: bool, into: Optional[memoryview] = None
              ) -> Tuple[int, Optional[bytes]]:
        """``(count, bytes)``, or ``(count, None)`` when copied ``into`` a view, or ``(code, None)``."""
        if not self._in and self._watching:
            self._poke()
        with self._cv:
            if self._detached:
                return VMCI_ERROR_QUEUEPAIR_NOTATTACHED, None
            if not self._in:
                if self._peer_gone:
                    return VMCI_ERROR_QUEUEPAIR_NOTATTACHED, None
                return VMCI_ERROR_QUEUEPAIR_NODATA, None
            n = min(buf_len, len(self._in))
            data = self._in.copy(n, into)
            if consume:
                self._in.drop(n)
                self._consumed += n
                due = self._credit_due()
        if consume and due:
            self._send_credit()
        return n, data

    def dequeue_status(self, buf) -> int:
        """Read into ``buf``: the count, QUEUEPAIR_NODATA, or QUEUEPAIR_NOTATTACHED once drained."""
        return self._read_into(buf, True)

    def peek_status(self, buf) -> int:
        return self._read_into(buf, False)

    def _read_into(self, buf, consume: bool) -> int:
        view = _bytes_view(buf)
        if view.readonly:
            raise BufferError("the destination buffer must be writable")
        return self._read(len(view), consume, view)[0]




    def dequeue(self, n: int) -> bytes:
        """Up to ``n`` bytes; QueuePairNoData when empty."""
        return self._read_bytes(n, True)

    def peek(self, n: int) -> bytes:
        return self._read_bytes(n, False)

    def _read_bytes(self, n, consume: bool) -> bytes:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            from .errors import InvalidArgs
            raise InvalidArgs("a byte count must be an int >= 0")
        rc, data = self._read(n, consume)
        check(rc)
        return data

    def peek_view_status(self, n: int):
        """A read-only view of up to ``n`` ready bytes (a copy: there is no shared ring here),
        or a negative code as ``dequeue_status``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            return VMCI_ERROR_INVALID_ARGS
        rc, data = self._read(n, False)
        return rc if data is None else memoryview(data)

    def consume_status(self, n: int) -> int:
        """Drop the first ``n`` ready bytes (after ``peek_view``): ``n``, or INVALID_ARGS if
        more than is ready, QUEUEPAIR_NOTATTACHED after detach."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            return VMCI_ERROR_INVALID_ARGS
        with self._cv:
            if self._detached:
                return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
            if n > len(self._in):
                return VMCI_ERROR_INVALID_ARGS
            self._in.drop(n)
            self._consumed += n
            due = self._credit_due()
        if due:
            self._send_credit()
        return n

    def peek_view(self, n: int) -> memoryview:
        rc = self.peek_view_status(n)
        if isinstance(rc, int):
            check(rc)
        return rc


    def _query(self, fn) -> int:
        with self._cv:
            if self._detached:
                return check(VMCI_ERROR_QUEUEPAIR_NOTATTACHED)
            return fn()

    def produce_free_space(self) -> int:
        """Bytes ``enqueue`` can write now (``produce_size - 1`` minus what the peer has not read)."""
        return self._query(lambda: max(self._free(), 0))

    def produce_buf_ready(self) -> int:
        """Bytes we wrote that the peer has not read (as far as its credits tell)."""
        return self._query(lambda: self._sent - self._peer_consumed)

    def consume_buf_ready(self) -> int:
        """Bytes ``dequeue`` can read now."""
        return self._query(lambda: len(self._in))

    def consume_free_space(self) -> int:
        """Free bytes in the peer's produce queue, as seen from here."""
        return self._query(lambda: _capacity(self.consume_size) - len(self._in))

    # Events and waits

    def events(self, timeout: float = 0.0) -> List[QPEvent]:
        """Events since the last call; waits up to ``timeout`` seconds (None: forever) for one."""
        if self._watching:
            self._poke()
        with self._cv:
            self._cv.wait_for(lambda: self._events or self._detached, timeout)
            out = list(self._events)
            self._events.clear()
        return out

    def _wait(self, ready, timeout: Optional[float], drain: bool) -> int:
        """Until ``ready()`` is not None. The waiter reads the stream itself when nobody else
        does (``_pump``); it takes ``_rx`` under the condition, so it cannot miss a notify."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cv:
                if self._detached or (not drain and self._peer_gone):
                    return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
                got = ready()
                if got is not None:
                    return got
                if self._peer_gone:
                    return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return VMCI_ERROR_TIMEOUT
                if not (self._watching and self._rx.acquire(False)):
                    self._cv.wait(left)
                    continue
            self._pump(lambda: ready() is not None, left)

    def wait_for_data_status(self, timeout: Optional[float] = None) -> int:
        """Sleep until data is ready: the byte count, VMCI_ERROR_TIMEOUT, or QUEUEPAIR_NOTATTACHED."""
        return self._wait(lambda: len(self._in) or None, timeout, True)

    def wait_for_space_status(self, n: int = 1, timeout: Optional[float] = None) -> int:
        """Sleep until ``n`` bytes are free (0 < n < produce_size): the free count, or a code."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < max(self.produce_size, 1):
            return VMCI_ERROR_INVALID_ARGS
        if self._free() < n and not self._detached:
            with self._sending():
                self._ask_credit()
        return self._wait(lambda: self._free() if self._free() >= n else None, timeout, False)



    # Detach

    def detach_status(self) -> int:
        """VMCI_SUCCESS, VMCI_SUCCESS_LAST_DETACH (no peer left), or NOT_FOUND if already."""
        with self._cv:
            if self._detached:
                return VMCI_ERROR_NOT_FOUND
            self._detached = True
            last = self._peer_gone or not self._ever_attached
            self._cv.notify_all()
        with self._sending():
            if self._sock is not None and not last:
                with contextlib.suppress(OSError):
                    self._sock.sendall(W.encode(W.BYE))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(SEND_TIMEOUT)
        with self._rx:   # a waiter reading the stream has seen the wake-up and let go
            self._epoll.close()
            for sock in (self._sock, self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()
        if self._listener is not None:
            self._listener.close()
        return VMCI_SUCCESS_LAST_DETACH if last else VMCI_SUCCESS

