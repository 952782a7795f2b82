"""Queue pairs carried over a stream, for kernels that share no pages
(``VSOCKCOMPAT_SHM_MODE=mirrored``, the default on the vsock transport).

``StreamQueuePair`` has ``QueuePair``'s API and results: create/attach with mirrored
sizes and the same checks (QUEUEPAIR_MISMATCH, peer restriction, ATTACH_ONLY, LOCAL, a
third end refused), partial enqueue, NOSPACE / NODATA, peek, the four space/ready
queries, PEER_ATTACH / PEER_DETACH events, blocking waits (in the kernel: a poll of the
stream, or a condition variable before the peer is there) and final detach.

Flow control matches the ring's capacity: a queue of ``size`` bytes holds at most
``size - 1``. Each end keeps its consume queue in its own memory and tells the peer how
much it has dequeued (CREDIT frames carry the running total) whenever a quarter of its
queue is owed or the peer asks (WANT: sent by an end that finds its produce queue full or
waits for space); an end's produce free space is ``produce_size - 1``
minus the bytes it sent that the peer has not reported dequeued, so an enqueue never accepts
more than the peer's consume queue can hold (an enqueue that finds it short first reads the
CREDIT frames already in its socket). Each end's kernel holds its whole consume queue plus a
quarter for frame headers (``mirror_link.hold`` on a vsock stream: the default 256 KiB would
otherwise stop the peer's sends before the queue's credit does). Differences from one kernel: the free space an
end sees lags the peer's dequeues (by less than a quarter of the queue, and by one frame's
transit once it asks), and bytes enqueued before the peer attaches wait in the creator's
memory until it does.

The data path is the core's ``QueueStream`` (``_cqstream.pxi`` / ``_pure_qstream.py``): the
frame parse and gather, the copies and the credit accounting, one ``sendmsg`` per write, and
a dequeue that reads the socket straight into the caller's buffer when its consume queue is
empty (each read taking the next header and what follows it, up to ``read_ahead`` bytes, so
small frames come many to a read). This module does the handshake, events and threads around it. Who reads the stream: a
caller that dequeues or waits (waits sleep in the core's poll); otherwise each end's reader
thread does, taking it back after ``READER_TICK`` seconds in which no caller read it (it wakes
every tick until detach), so frames (credit, WANT, BYE, and data into the consume queue) keep
being taken while the application is busy elsewhere. While callers only write (an enqueue
reads the stream itself only when short of credit), the reader thread reads it once a tick
rather than at each frame's arrival: a writer is not interrupted for every CREDIT.

Stream (ends named by ``mirror_link``, frames of ``mirror_wire``): the attacher sends
HELLO with payload ``<QQII`` (its produce size, consume size, flags, context id); the
creator answers REFUSE (arg: the VMCI code) and closes, or WELCOME (arg: its context id).
Then DATA (payload: queue bytes), CREDIT (arg: bytes dequeued so far), WANT and BYE (detach).
Between two guests DATA is written in pieces (``mirror_link.write_piece`` sets the core's
``max_send``).
DATA beyond the receiver's free space, a CREDIT above what was sent or going backwards,
anything else or a stream cut inside a frame counts in ``stats_bad_frames``, closes the
stream and is treated as the peer detaching. Each new connection's handshake runs in a thread
of its own: one that says nothing (for ``HELLO_TIMEOUT`` seconds) holds up nobody, and once
the pair has its two ends every further HELLO is refused with VMCI_ERROR_UNAVAILABLE.
"""
import collections
import contextlib
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
from .errors import (DuplicateEntry, Generic, InvalidArgs, NoAccess, NotFound, Timeout, Unavailable, VMCIError,
                     check, error_for)
from .handles import VMCIHandle
from .queuepair import PairEnd, QPEvent, _check_args
from .runtime import Runtime, default_runtime
from .transport.pieces import bytes_view as _bytes_view

__all__ = ["StreamQueuePair"]

_HELLO = struct.Struct("<QQII")
#: Seconds a new connection has to send its HELLO, and an attacher waits for the answer.
HELLO_TIMEOUT = 10.0
#: Seconds a send may block (the peer's reader drains its socket into its queue).
SEND_TIMEOUT = 30.0
_RECV = 1 << 18
#: Seconds the reader thread leaves the stream to callers that read it themselves.
READER_TICK = 0.01


def _kernel_buffer(consume_size: int) -> int:
    """Bytes of stream our kernel should hold for us (``mirror_link.hold``): a whole consume
    queue plus a quarter for the frame headers, so that the queue's credit, not the kernel's,
    is what makes the peer wait."""
    return consume_size + consume_size // 4


def _capacity(size: int) -> int:
    return size - 1 if size > 0 else 0


def _count(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidArgs("a byte count must be an int >= 0")


def _read_answer(sock: socket.socket, handle) -> W.Frame:
    """The creator's answer to HELLO: exactly one header (WELCOME and REFUSE carry no
    payload), so what follows it is left in the socket for the data path."""
    got = b""
    while len(got) < W.HEADER.size:
        data = sock.recv(W.HEADER.size - len(got))
        if not data:
            raise NotFound("the creator of %s closed the connection" % (handle,))
        got += data
    frames = W.FrameReader().feed(got)
    if not frames:
        raise Generic("the creator of %s answered out of turn" % (handle,))
    return frames[0]


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
        self._qs = None                  # the core's QueueStream, once the peer is there
        self._outbox = bytearray()       # enqueued before the peer attached
        self._events: collections.deque = collections.deque()
        self._sock: Optional[socket.socket] = None
        self._listener: Optional[mirror_link.Listener] = None
        self._ever_attached = False
        self._peer_gone = False
        self._detached = False
        self._wake_r, self._wake_w = socket.socketpair()   # written once, at detach; never drained
        self._thread: Optional[threading.Thread] = None
        self._epoll = select.epoll()
        self._watching = False           # the stream is in the reader thread's epoll (until it ends)
        self._armed = False              # ... and wakes it (set and cleared by that thread only)
        self._pumped = False             # a caller read the stream since the reader thread's last tick
        self._wrote = False              # ... or wrote (a write reads it only when short of credit)

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
            with contextlib.suppress(OSError):      # accepted streams inherit it
                mirror_link.hold(listener.sock, _kernel_buffer(consume_size))
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
            with contextlib.suppress(OSError):      # before HELLO, which tells the creator's kernel
                mirror_link.hold(sock, _kernel_buffer(consume_size))
            sock.settimeout(HELLO_TIMEOUT)
            sock.sendall(W.encode(W.HELLO, 0, _HELLO.pack(produce_size, consume_size, flags, me)))
            first = _read_answer(sock, handle)
            if first.type == W.REFUSE:
                code = W.decode_code(first.arg)
                raise error_for(code if code < 0 else VMCI_ERROR_UNAVAILABLE, "refused by the creator")
            if first.type != W.WELCOME:
                raise Generic("the creator of %s answered out of turn" % (handle,))
            qp = cls(runtime, handle, False, produce_size, consume_size, flags, VMCI_INVALID_ID)
            qp.peer_id = mirror_link.peer_context(runtime, sock, first.arg & 0xFFFFFFFF)
            if qp.peer_id is None:
                raise NoAccess("the creator of %s is not who it claims" % (handle,))
            qp._ever_attached = True
            qp._open(sock)
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

    def _open(self, sock: socket.socket, outbox: bytes = b"") -> None:
        """The peer is there: its stream becomes the core's data path (the one place a
        ``QueueStream`` is made), bytes enqueued before first."""
        sock.setblocking(False)
        qs = self._runtime.core.QueueStream(sock, self._wake_r.fileno(), self.produce_size,
                                            self.consume_size, SEND_TIMEOUT)
        qs.max_send = self._max_send(sock)
        if outbox:
            qs.write(outbox)
        self._sock, self._qs = sock, qs
        self._epoll.register(sock, select.EPOLLIN)
        self._watching = True

    def _max_send(self, sock: socket.socket) -> int:
        """Bytes one send of the stream may carry: ``mirror_link.write_piece`` between two guests
        (vhost-device-vsock loses bigger packets there), else 0, unbounded."""
        return mirror_link.write_piece(self._runtime, sock) or 0

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
        self._armed = True
        while not self._detached:
            # Ticks: callers take the stream (``_pumped``) while we sleep in here.
            events = ep.poll(READER_TICK)
            if not events:
                self._tick()
            for fd, _ in events:
                if fd == wake or self._detached:
                    return
                if fd == listener:
                    self._accept()
                else:
                    self._readable()

    def _readable(self) -> None:
        """The stream has bytes: read them into the consume queue, unless callers read it."""
        news = self._runtime.core.QS_BUSY if self._pumped or self._wrote else self._qs.pull()
        if news & self._runtime.core.QS_BUSY:
            self._arm(False)
        elif news & self._runtime.core.QS_GONE:
            self._sync()

    def _tick(self) -> None:
        """A quiet tick: if no caller read the stream for a whole tick, watch it again (frames
        then wait at most two ticks for a reader while the application is busy elsewhere);
        if callers only wrote, read what the stream holds now, once a tick (their writes read
        it only when short of credit, and the peer's CREDIT frames need no wake-up each); send
        what the socket could not take earlier."""
        qs = self._qs
        if qs is None:
            return
        if qs.pending:
            qs.flush(0)
        if self._pumped:
            self._pumped = self._wrote = False
        elif self._wrote:
            self._wrote = False
            if qs.pull() & self._runtime.core.QS_GONE:
                self._sync()
        elif not self._armed:
            self._arm(True)

    def _arm(self, on: bool) -> None:
        """Whether the stream wakes the reader thread (called by that thread only)."""
        if self._watching:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.modify(self._sock, select.EPOLLIN if on else 0)
                self._armed = on

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
        with self._cv:
            if self._detached:
                sock.close()
                return
            self.peer_id = cid
            self._events.append(QPEvent(VMCI_EVENT_QP_PEER_ATTACH, self.handle, cid))
            try:
                sock.sendall(W.encode(W.WELCOME, self.handle.context))
            except OSError:
                self._sock = sock
                self._gone_locked(False)
                return
            # Writers see ``_qs`` set only now, after the bytes enqueued so far: stream order.
            self._open(sock, bytes(self._outbox))
            self._outbox = bytearray()
            self._cv.notify_all()

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

    # The peer going

    def _sync(self) -> None:
        """Turn what the core saw (the peer gone, a bad frame) into the event and the stream's end."""
        qs = self._qs
        if qs is None or self._peer_gone or not qs.state & self._runtime.core.QS_GONE:
            return
        with self._cv:
            if self._peer_gone:
                return
            self._gone_locked(bool(qs.state & self._runtime.core.QS_BAD))

    def _gone_locked(self, bad: bool) -> None:
        """The peer is gone (``_cv`` held): count, event, and the stream cut both ways."""
        self._peer_gone = True
        if bad:
            self.stats_bad_frames += 1
        self._events.append(QPEvent(VMCI_EVENT_QP_PEER_DETACH, self.handle, self.peer_id))
        self._cv.notify_all()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if self._watching:
            self._watching = False
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(self._sock)

    # Data

    def enqueue_status(self, buf) -> int:
        """Write what fits of ``buf``: the count, QUEUEPAIR_NOSPACE, or QUEUEPAIR_NOTATTACHED."""
        qs = self._qs
        if qs is None:
            return self._enqueue_early([_bytes_view(buf)], False)
        self._wrote = True
        rc = qs.write(buf)
        if rc < 0:
            self._sync()
        return rc

    def enqueue_many_status(self, bufs) -> int:
        """Write whole buffers while each fits: how many, or a negative code."""
        qs = self._qs
        if qs is None:
            return self._enqueue_early([_bytes_view(b) for b in bufs], True)
        self._wrote = True
        rc = qs.write_many(bufs)
        if rc < 0:
            self._sync()
        return rc

    def _enqueue_early(self, views, whole: bool) -> int:
        """Before the peer attached: keep what fits in the outbox (``whole``: whole buffers)."""
        with self._cv:
            if self._qs is not None:
                return self.enqueue_many_status(views) if whole else self.enqueue_status(views[0])
            if self._detached or self._peer_gone:
                return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
            free = _capacity(self.produce_size) - len(self._outbox)
            if not whole:
                n = min(len(views[0]), free)
                if free <= 0:
                    return VMCI_ERROR_QUEUEPAIR_NOSPACE
                self._outbox += views[0][:n]
                return n
            if not views:
                return 0
            n = 0
            for v in views:
                if len(v) > free or free <= 0:
                    break
                free -= len(v)
                self._outbox += v
                n += 1
            return n if n else VMCI_ERROR_QUEUEPAIR_NOSPACE

    def _no_stream(self) -> int:
        return VMCI_ERROR_QUEUEPAIR_NOTATTACHED if self._detached else VMCI_ERROR_QUEUEPAIR_NODATA

    def dequeue_status(self, buf) -> int:
        """Read into ``buf``: the count, QUEUEPAIR_NODATA, or QUEUEPAIR_NOTATTACHED once drained."""
        qs = self._qs
        if qs is None:
            return self._read_into(buf, True)
        self._pumped = True                  # the hot path: one call into the core
        rc = qs.read_into(buf)
        if rc < 0:
            self._sync()
        return rc

    def peek_status(self, buf) -> int:
        return self._read_into(buf, False)

    def _read_into(self, buf, consume: bool) -> int:
        qs = self._qs
        if qs is None:
            if _bytes_view(buf).readonly:
                raise BufferError("the destination buffer must be writable")
            return self._no_stream()
        self._pumped = True
        rc = qs.read_into(buf, consume)
        if rc < 0:
            self._sync()
        return rc

    def _read_bytes(self, n, consume: bool):
        """``bytes`` of up to ``n`` ready bytes, or a negative code."""
        qs = self._qs
        if qs is None:
            return self._no_stream()
        self._pumped = True
        rc = qs.read_bytes(n, consume)
        if isinstance(rc, int):
            self._sync()
        return rc

    def dequeue(self, n: int) -> bytes:
        """Up to ``n`` bytes; QueuePairNoData when empty."""
        _count(n)
        rc = self._read_bytes(n, True)
        return check(rc) if isinstance(rc, int) else rc

    def peek(self, n: int) -> bytes:
        _count(n)
        rc = self._read_bytes(n, False)
        return check(rc) if isinstance(rc, int) else rc

    def peek_view_status(self, n: int):
        """A read-only view of up to ``n`` ready bytes (a copy: there is no shared ring here),
        or a negative code as ``dequeue_status``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            return VMCI_ERROR_INVALID_ARGS
        rc = self._read_bytes(n, False)
        return rc if isinstance(rc, int) else memoryview(rc)

    def consume_status(self, n: int) -> int:
        """Drop the first ``n`` ready bytes (after ``peek_view``): ``n``, or INVALID_ARGS if
        more than is ready, QUEUEPAIR_NOTATTACHED after detach."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            return VMCI_ERROR_INVALID_ARGS
        qs = self._qs
        if qs is None:
            return VMCI_ERROR_QUEUEPAIR_NOTATTACHED if self._detached else VMCI_ERROR_INVALID_ARGS if n else 0
        return qs.consume(n)

    def peek_view(self, n: int) -> memoryview:
        rc = self.peek_view_status(n)
        if isinstance(rc, int):
            check(rc)
        return rc

    def _query(self, early, fn) -> int:
        if self._detached:
            return check(VMCI_ERROR_QUEUEPAIR_NOTATTACHED)
        qs = self._qs
        if qs is None:
            with self._cv:
                if self._qs is None:
                    return early()
                qs = self._qs
        return fn(qs)

    def _pull(self, qs) -> None:
        """Read what the stream holds now (for the queries and events)."""
        if qs.pull() & self._runtime.core.QS_GONE or qs.state:
            self._sync()

    def stream_counts(self) -> dict:
        """The data path's counts (``QueueStream.counts``: sendmsg and recvmsg calls, DATA,
        CREDIT and WANT frames sent), all 0 before the peer attached. For benchmarks."""
        qs = self._qs
        if qs is None:
            return dict.fromkeys(W.QS_COUNTS, 0)
        return qs.counts

    def produce_free_space(self) -> int:
        """Bytes ``enqueue`` can write now (``produce_size - 1`` minus what the peer has not read)."""
        return self._query(lambda: max(_capacity(self.produce_size) - len(self._outbox), 0),
                           lambda qs: max(qs.free, 0))

    def produce_buf_ready(self) -> int:
        """Bytes we wrote that the peer has not read (as far as its credits tell)."""
        return self._query(lambda: len(self._outbox), lambda qs: qs.sent - qs.peer_consumed)

    def consume_buf_ready(self) -> int:
        """Bytes ``dequeue`` can read now."""
        def ready(qs):
            self._pull(qs)
            return qs.ready
        return self._query(lambda: 0, ready)

    def consume_free_space(self) -> int:
        """Free bytes in the peer's produce queue, as seen from here."""
        def free(qs):
            self._pull(qs)
            return _capacity(self.consume_size) - qs.ready
        return self._query(lambda: _capacity(self.consume_size), free)

    # Events and waits

    def events(self, timeout: float = 0.0) -> List[QPEvent]:
        """Events since the last call; waits up to ``timeout`` seconds (None: forever) for one."""
        qs = self._qs
        if qs is not None and not self._peer_gone and not self._detached:
            self._pull(qs)
        with self._cv:
            self._cv.wait_for(lambda: self._events or self._detached, timeout)
            out = list(self._events)
            self._events.clear()
        return out

    def _wait(self, space: int, timeout: Optional[float]) -> int:
        """Until data is ready (``space`` 0) or ``space`` bytes are free: before the peer is
        there on the condition, then in the core's poll of the stream."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._qs is None:
            with self._cv:
                while self._qs is None:
                    if self._detached or self._peer_gone:
                        return VMCI_ERROR_QUEUEPAIR_NOTATTACHED
                    free = _capacity(self.produce_size) - len(self._outbox)
                    if space and free >= space:
                        return free
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return VMCI_ERROR_TIMEOUT
                    self._cv.wait(left)
        qs = self._qs
        self._pumped = True
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        rc = qs.wait_space(space, left) if space else qs.wait_data(left)
        if rc < 0:
            self._sync()
            if rc == self._runtime.core.WAKE:
                rc = VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        return rc

    def wait_for_data_status(self, timeout: Optional[float] = None) -> int:
        """Sleep until data is ready: the byte count, VMCI_ERROR_TIMEOUT, or QUEUEPAIR_NOTATTACHED."""
        return self._wait(0, timeout)

    def wait_for_space_status(self, n: int = 1, timeout: Optional[float] = None) -> int:
        """Sleep until ``n`` bytes are free (0 < n < produce_size): the free count, or a code."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < max(self.produce_size, 1):
            return VMCI_ERROR_INVALID_ARGS
        return self._wait(n, timeout)

    # Detach

    def detach_status(self) -> int:
        """VMCI_SUCCESS, VMCI_SUCCESS_LAST_DETACH (no peer left), or NOT_FOUND if already."""
        with self._cv:
            if self._detached:
                return VMCI_ERROR_NOT_FOUND
            self._detached = True
            last = self._peer_gone or not self._ever_attached
            self._cv.notify_all()
            qs = self._qs
        if qs is not None:
            qs.bye(not last, SEND_TIMEOUT)     # BYE after every byte enqueued
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(SEND_TIMEOUT)
        if qs is not None:
            while not qs.close():              # a waiter in the core's poll has seen the wake-up
                time.sleep(0.001)
        self._epoll.close()
        for sock in (self._sock, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._listener is not None:
            self._listener.close()
        return VMCI_SUCCESS_LAST_DETACH if last else VMCI_SUCCESS
