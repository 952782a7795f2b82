"""Mirrored shared memory: a region owned by its creator and mirrored to its attachers
over a stream, for kernels that share no pages (``VSOCKCOMPAT_SHM_MODE=mirrored``, the
default on the vsock transport).

Every user holds a private copy of the region. Coherence contract:

- **Creator to attachers.** Each side compares its copy with the copy it last mirrored
  (diffing 64 KiB blocks, then 64-byte lines, ``LINE``) every ``interval`` seconds (default ``INTERVAL``,
  10 ms; stretched to ten times the scan time for regions so large that a scan takes more
  than a tenth of it) and sends the changed lines. So every attacher sees each write of
  the creator within one interval plus the stream's transit time, without any call.
- **Attacher to creator.** An attacher's changed lines are forwarded the same way to the
  creator, which applies them and relays them to the other attachers at once.
- **Order and conflicts.** The creator's copy is the authority: updates are applied there
  in the order they arrive, and every copy converges to it once writers pause. A side sends
  its own pending changes before it applies a received update, and an attacher does not
  apply received bytes over bytes it sent that the creator had not applied yet (the creator
  acknowledges, ACK n, the updates of each attacher it applied), so each copy resolves a
  conflict as the creator does and no write is lost unsent. The unit is the 64-byte line:
  two users writing different bytes of one line at the same time conflict as if each had
  written the whole line (the one the creator applies last wins), so give concurrent
  writers their own lines. A reader can see a write of several lines half done unless
  writer and reader meet at ``sync``.
- **Flush points.** ``sync()`` returns once its writes have reached the other side and the
  other side's pending writes have come back: on the creator, every attacher's copy then
  holds what the creator's copy held at the call (and their earlier writes are in it); on
  an attacher, the creator's copy holds its writes and its own copy holds the creator's
  copy as of the moment the creator answered. ``detach`` of an attacher flushes its
  writes first.
- **Lifetime.** The region lives while its creator's process runs and somebody is
  attached: after the creator's ``detach`` its process keeps serving the attachers until
  the last one detaches. When the creator's process dies the attachers keep their last
  copy; ``sync`` then raises ``NotFound`` and ``query`` / new attaches find nothing.

The stream (``mirror_link`` names its ends, ``mirror_wire`` its frames): the attacher sends
HELLO (arg: the size it asks for, 0 for any; payload: u32 its context id); the creator
answers REFUSE (arg: a VMCI code) and closes, or SIZE (arg: the size), the whole region as
UPDATE frames (arg: offset) and FLUSHED 0. Then either side sends UPDATE, the creator
ACK n after applying an attacher's n-th update; FLUSH n asks the
other side to send its pending changes and answer FLUSHED n; BYE ends an attacher's
session. QUERY is answered by SIZE and a close. Between two guests the UPDATE frames are
written in pieces (``mirror_link.write_piece``). A frame that is not one, an update out of
range, a frame out of turn or a stream cut inside a frame is counted in
``stats.bad_frames`` and its connection closed; the creator keeps serving the others. A
connection that says nothing for ``HELLO_TIMEOUT`` seconds, or an attacher that reads nothing
for ``SEND_TIMEOUT`` seconds while the creator sends, is dropped (``stats.dropped``). Scans
run on a timer (every ``interval``) while anybody is connected, which is the price of noticing
plain memory writes without a call; a creator alone sleeps until somebody connects.
"""
import atexit
import collections
import contextlib
import mmap
import selectors
import socket
import struct
import threading
import time
import weakref
from typing import Dict, List, Optional, Tuple

import psutil

from . import mirror_link, mirror_wire as W
from .mirror_diff import LINE, PAGE, Shadow, outside
from .constants import MIRROR_INTERVAL_MS, VMCI_ERROR_INVALID_SIZE
from .errors import Generic, NoAccess, NoMem, NotFound, Timeout, VMCIError, error_for
from .handles import VMCIHandle, as_handle
from .runtime import Runtime, default_runtime
from .transport.pieces import send_all

__all__ = ["MirroredRegion", "MirrorStats", "query", "INTERVAL", "LINE"]

#: Seconds between two scans for changed pages.
INTERVAL = MIRROR_INTERVAL_MS / 1000
#: Seconds a new connection has to say HELLO or QUERY.
HELLO_TIMEOUT = 5.0
#: Seconds a send may block before the connection is given up.
SEND_TIMEOUT = 10.0
#: Default seconds ``sync`` waits.
SYNC_TIMEOUT = 30.0
_CID = struct.Struct("<I")
_RECV = 1 << 18
_live: "weakref.WeakSet[MirroredRegion]" = weakref.WeakSet()


class MirrorStats:
    """Counters of one side of a mirrored region."""

    __slots__ = ("attached", "bad_frames", "dropped", "bytes_sent", "bytes_received", "scans")

    def __init__(self):
        self.attached = self.bad_frames = self.dropped = 0
        self.bytes_sent = self.bytes_received = self.scans = 0

    def __repr__(self):
        return "MirrorStats(%s)" % ", ".join("%s=%d" % (k, getattr(self, k)) for k in self.__slots__)


def _updates(runs) -> bytes:
    return b"".join(W.encode(W.UPDATE, off, data) for off, data in runs)


def _valid_update(frame: W.Frame, size: int) -> bool:
    return frame.arg + len(frame.payload) <= size and len(frame.payload) > 0


class _SyncRequest:
    def __init__(self, seq: int):
        self.seq = seq
        self.done = threading.Event()
        self.waiting: set = set()
        self.error: Optional[VMCIError] = None


class _Conn:
    def __init__(self, sock: socket.socket, piece: Optional[int]):
        self.sock = sock
        self.piece = piece   # bytes per send() (mirror_link.write_piece)
        self.reader = W.FrameReader()
        self.attached = False
        self.since = time.monotonic()
        self.cid = 0
        self.applied = 0     # UPDATE frames of this attacher applied here


class _Loop:
    """The thread of one side: owns its socket(s), scans, sends and receives."""

    def __init__(self, region: "MirroredRegion", name: str):
        self.region = region
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        self.requests: collections.deque = collections.deque()
        self.stopping = False
        self.thread = threading.Thread(target=self._main, daemon=True, name=name)
        self.next_scan = 0.0

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            self.wake_w.send(b"\0")

    def _main(self) -> None:
        try:
            self.run()
        finally:
            self.sel.close()
            self.wake_r.close()
            self.wake_w.close()

    def _tick_due(self) -> bool:
        return time.monotonic() >= self.next_scan

    def _scanned(self, started: float) -> None:
        took = time.monotonic() - started
        self.next_scan = time.monotonic() + max(self.region.interval, 10 * took)

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self.wake_r.recv(4096):
                pass


class _Server(_Loop):
    """The creator's side: accepts attachers, mirrors to them, applies their writes."""

    def __init__(self, region: "MirroredRegion", listener: mirror_link.Listener):
        super().__init__(region, "vsockcompat-mirror-%d.%d" % tuple(region.handle))
        self.listener = listener
        listener.sock.setblocking(False)
        self.sel.register(listener.sock, selectors.EVENT_READ, "listen")
        self.conns: Dict[int, _Conn] = {}
        self.syncs: List[_SyncRequest] = []

    def run(self) -> None:
        region = self.region
        try:
            while True:
                if self.stopping and not any(c.attached for c in self.conns.values()):
                    return
                # Alone, the creator has nobody to mirror to: it sleeps until a connection comes.
                timeout = max(0.0, self.next_scan - time.monotonic()) if self.conns else None
                for key, _ in self.sel.select(timeout):
                    if key.data == "listen":
                        self._accept()
                    elif key.data is None:
                        self._drain_wake()
                    else:
                        self._receive(key.data)
                while self.requests:
                    self._start_sync(self.requests.popleft())
                if self._tick_due() and self.conns:
                    self._broadcast_changes()
                self._expire_hellos()
        finally:
            for conn in list(self.conns.values()):
                self._close(conn)
            for req in self.syncs:
                req.done.set()
            self.listener.close()
            region._served()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        sock.settimeout(SEND_TIMEOUT)
        conn = _Conn(sock, mirror_link.write_piece(self.region._runtime, sock))
        self.conns[sock.fileno()] = conn
        self.sel.register(sock, selectors.EVENT_READ, conn)

    def _expire_hellos(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self.conns.values() if not c.attached and now - c.since > HELLO_TIMEOUT]:
            self.region.stats.dropped += 1
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if self.conns.pop(conn.sock.fileno(), None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        if conn.attached:
            self.region.stats.attached -= 1
        conn.sock.close()
        for req in self.syncs:
            req.waiting.discard(conn)
        self._finish_syncs()

    def _bad(self, conn: _Conn) -> None:
        self.region.stats.bad_frames += 1
        self._close(conn)

    def _send(self, conn: _Conn, data: bytes) -> bool:
        try:
            send_all(conn.sock, data, conn.piece)
        except OSError:
            self.region.stats.dropped += 1
            self._close(conn)
            return False
        return True

    def _broadcast_changes(self, exclude: Optional[_Conn] = None) -> None:
        started = time.monotonic()
        runs = self.region._shadow.changes()
        self.region.stats.scans += 1
        if runs:
            self._relay(runs, exclude)
        self._scanned(started)

    def _relay(self, runs, exclude: Optional[_Conn] = None) -> None:
        data = _updates(runs)
        count = sum(len(d) for _, d in runs)
        for conn in [c for c in self.conns.values() if c.attached and c is not exclude]:
            if self._send(conn, data):
                self.region.stats.bytes_sent += count

    def _receive(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_RECV, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            try:
                conn.reader.finish()
            except W.ProtocolError:
                self._bad(conn)
                return
            self._close(conn)
            return
        try:
            frames = conn.reader.feed(data)
        except W.ProtocolError:
            self._bad(conn)
            return
        scanned, applied = False, conn.applied
        for frame in frames:
            if conn.sock.fileno() not in self.conns:
                return
            if not conn.attached:
                self._greet(conn, frame)
            elif frame.type == W.UPDATE and _valid_update(frame, self.region.size):
                if not scanned:
                    self._broadcast_changes()
                    scanned = True
                self.region._shadow.apply(frame.arg, frame.payload)
                self.region.stats.bytes_received += len(frame.payload)
                conn.applied += 1
                self._relay([(frame.arg, frame.payload)], exclude=conn)
            elif frame.type == W.FLUSH:
                self._broadcast_changes()
                self._send(conn, W.encode(W.FLUSHED, frame.arg))
            elif frame.type == W.FLUSHED:
                for req in self.syncs:
                    if req.seq == frame.arg:
                        req.waiting.discard(conn)
                self._finish_syncs()
            elif frame.type == W.BYE and not frame.payload:
                self._close(conn)
                return
            else:
                self._bad(conn)
                return
        if conn.applied != applied and conn.sock.fileno() in self.conns:
            # What we send this attacher from now on reflects its updates so far.
            self._send(conn, W.encode(W.ACK, conn.applied))
        if conn.reader.failed and conn.sock.fileno() in self.conns:
            self._bad(conn)

    def _greet(self, conn: _Conn, frame: W.Frame) -> None:
        size = self.region.size
        if frame.type == W.QUERY and not frame.payload:
            self._send(conn, W.encode(W.SIZE, size))
            self._close(conn)
        elif frame.type == W.HELLO and len(frame.payload) == _CID.size:
            if frame.arg not in (0, size):
                self._send(conn, W.encode_code(W.REFUSE, VMCI_ERROR_INVALID_SIZE))
                self._close(conn)
                return
            runtime = self.region._runtime
            conn.cid = mirror_link.peer_context(runtime, conn.sock, _CID.unpack(frame.payload)[0])
            try:
                if conn.cid is None:
                    raise NoAccess("the attacher's claimed context is not its own")
                runtime.access.check_attach(conn.cid, self.region.handle)
            except VMCIError as exc:
                self._send(conn, W.encode_code(W.REFUSE, exc.code))
                self._close(conn)
                return
            self._broadcast_changes()
            welcome = W.encode(W.SIZE, size) + _updates(self.region._shadow.everything())
            if self._send(conn, welcome + W.encode(W.FLUSHED, 0)):
                conn.attached = True
                self.region.stats.attached += 1
        else:
            self._bad(conn)

    def _start_sync(self, req: _SyncRequest) -> None:
        self._broadcast_changes()
        self.syncs.append(req)
        for conn in [c for c in self.conns.values() if c.attached]:
            req.waiting.add(conn)
            self._send(conn, W.encode(W.FLUSH, req.seq))
        self._finish_syncs()

    def _finish_syncs(self) -> None:
        for req in [r for r in self.syncs if not r.waiting]:
            self.syncs.remove(req)
            req.done.set()


class _Client(_Loop):
    """An attacher's side: forwards its writes, applies the creator's."""

    def __init__(self, region: "MirroredRegion", sock: socket.socket, reader: W.FrameReader):
        super().__init__(region, "vsockcompat-mirror-client-%d.%d" % tuple(region.handle))
        self.sock = sock
        self.piece = mirror_link.write_piece(region._runtime, sock)   # bytes per send()
        self.reader = reader
        self.sel.register(sock, selectors.EVENT_READ, "peer")
        self.pending: Dict[int, _SyncRequest] = {}
        self.lost = False
        self.sent = 0        # UPDATE frames sent
        self.unacked: collections.deque = collections.deque()   # (number, start, end)

    def run(self) -> None:
        try:
            while not self.lost:
                if self.stopping:
                    self._flush_changes()
                    with contextlib.suppress(OSError):
                        self.sock.sendall(W.encode(W.BYE))
                    return
                timeout = max(0.0, self.next_scan - time.monotonic())
                for key, _ in self.sel.select(timeout):
                    if key.data is None:
                        self._drain_wake()
                    else:
                        self._receive()
                while self.requests and not self.lost:
                    req = self.requests.popleft()
                    self.pending[req.seq] = req
                    self._flush_changes()
                    self._send(W.encode(W.FLUSH, req.seq))
                if self._tick_due() and not self.lost:
                    self._flush_changes()
        finally:
            self.lost = True
            self.sock.close()
            for req in list(self.pending.values()) + list(self.requests):
                req.error = NotFound("the creator of region %s is gone" % (tuple(self.region.handle),))
                req.done.set()

    def _send(self, data: bytes) -> None:
        if self.lost:
            return
        try:
            send_all(self.sock, data, self.piece)
        except OSError:
            self.lost = True

    def _flush_changes(self) -> None:
        started = time.monotonic()
        runs = self.region._shadow.changes()
        self.region.stats.scans += 1
        if runs:
            self._send(_updates(runs))
            for offset, data in runs:
                self.sent += 1
                self.unacked.append((self.sent, offset, offset + len(data)))
            self.region.stats.bytes_sent += sum(len(d) for _, d in runs)
        self._scanned(started)

    def _receive(self) -> None:
        try:
            data = self.sock.recv(_RECV, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        try:
            if not data:
                self.reader.finish()
                self.lost = True
                return
            frames = self.reader.feed(data)
        except W.ProtocolError:
            self.region.stats.bad_frames += 1
            self.lost = True
            return
        scanned = False
        for frame in frames:
            if frame.type == W.UPDATE and _valid_update(frame, self.region.size):
                if not scanned:
                    self._flush_changes()
                    scanned = True
                # Bytes we sent that the creator had not applied when it sent this will be
                # applied there after it: they win, here as there.
                holes = [(start, end) for _, start, end in self.unacked]
                for offset, data in outside(frame.arg, frame.payload, holes):
                    self.region._shadow.apply(offset, data)
                self.region.stats.bytes_received += len(frame.payload)
            elif frame.type == W.ACK and frame.arg <= self.sent:
                while self.unacked and self.unacked[0][0] <= frame.arg:
                    self.unacked.popleft()
            elif frame.type == W.FLUSH:
                self._flush_changes()
                self._send(W.encode(W.FLUSHED, frame.arg))
            elif frame.type == W.FLUSHED and frame.arg in self.pending:
                self.pending.pop(frame.arg).done.set()
            else:
                self.region.stats.bad_frames += 1
                self.lost = True
                return
        if self.reader.failed:
            self.region.stats.bad_frames += 1
            self.lost = True


def _handshake(sock: socket.socket, size: int, cid: int) -> Tuple[int, W.FrameReader, list]:
    """Send HELLO, read SIZE, the contents and FLUSHED 0: ``(size, reader, updates)``."""
    sock.sendall(W.encode(W.HELLO, size, _CID.pack(cid)))
    reader = W.FrameReader()
    actual, updates = None, []
    while True:
        try:
            data = sock.recv(_RECV)
        except socket.timeout:
            raise Timeout("the creator did not answer within %g s" % sock.gettimeout()) from None
        if not data:
            raise NotFound("the creator closed the connection while attaching")
        try:
            frames = reader.feed(data)
        except W.ProtocolError as exc:
            raise Generic("the creator sent garbage: %s" % exc) from None
        for frame in frames:
            if actual is None and frame.type == W.REFUSE:
                code = W.decode_code(frame.arg)
                raise error_for(code if code < 0 else -1, "the creator refused the attach")
            if actual is None and frame.type == W.SIZE and frame.arg > 0:
                actual = frame.arg
            elif actual is not None and frame.type == W.UPDATE and _valid_update(frame, actual):
                updates.append((frame.arg, frame.payload))
            elif actual is not None and frame.type == W.FLUSHED and frame.arg == 0:
                return actual, reader, updates
            else:
                raise Generic("the creator sent frame type %d out of turn" % frame.type)


def _check_memory(size: int) -> None:
    """NoMem unless a private copy of ``size`` bytes fits in the memory available."""
    if size > psutil.virtual_memory().available:
        raise NoMem("%d bytes of memory are not available for a region copy" % size)


class MirroredRegion:
    """One user's copy of a mirrored region; the same surface as ``SharedRegion`` plus
    ``sync()`` and ``stats``. See the module's coherence contract.

    ``handle``, ``size``, ``buffer`` (a writable memoryview of exactly ``size`` bytes,
    ``NotFound`` once detached), ``created``, ``detach()``, context manager.
    """

    def __init__(self, runtime: Runtime, handle: VMCIHandle, size: int, created: bool,
                 interval: float):
        self._runtime = runtime
        self.handle = handle
        self.size = size
        self.created = created
        self.interval = interval
        self.stats = MirrorStats()
        self._mmap = mmap.mmap(-1, -(-size // PAGE) * PAGE)
        self._inner = memoryview(self._mmap)[:size]
        self._view = memoryview(self._mmap)[:size]
        self._shadow = Shadow(self._inner)
        self._loop: Optional[_Loop] = None
        self._seq = 0
        self._lock = threading.Lock()
        self._detached = False
        self._gone = threading.Event()
        _live.add(self)

    @classmethod
    def create(cls, size: int, runtime: Optional[Runtime] = None, resource: Optional[int] = None,
               interval: float = INTERVAL) -> "MirroredRegion":
        """Create a zeroed region of ``size`` bytes (checked by the caller) and serve it."""
        runtime = runtime if runtime is not None else default_runtime()
        _check_memory(size)
        listener = mirror_link.listen(runtime, mirror_link.REGION, resource)
        try:
            region = cls(runtime, listener.handle, size, True, interval)
            region._loop = _Server(region, listener)
        except BaseException:
            listener.close()
            raise
        region._loop.thread.start()
        return region

    @classmethod
    def attach(cls, handle, size: Optional[int] = None, runtime: Optional[Runtime] = None,
               interval: float = INTERVAL) -> "MirroredRegion":
        """Attach to the region ``handle``; ``size``, if given, must be its size (InvalidSize)."""
        handle = as_handle(handle)
        runtime = runtime if runtime is not None else default_runtime()
        sock = mirror_link.connect(runtime, mirror_link.REGION, handle)
        try:
            actual, reader, updates = _handshake(sock, size or 0, runtime.transport.local_cid)
            _check_memory(actual)
            region = cls(runtime, handle, actual, False, interval)
            for offset, data in updates:
                region._shadow.apply(offset, data)
            sock.settimeout(SEND_TIMEOUT)
            region._loop = _Client(region, sock, reader)
        except VMCIError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise NotFound("region %s: %s" % (tuple(handle), exc)) from None
        except BaseException:
            sock.close()
            raise
        region._loop.thread.start()
        return region

    @property
    def buffer(self) -> memoryview:
        if self._detached:
            raise NotFound("region %s is detached" % (tuple(self.handle),))
        return self._view

    @property
    def closed(self) -> bool:
        return self._detached

    @property
    def peer_lost(self) -> bool:
        """For an attacher: whether the creator's stream is gone."""
        return isinstance(self._loop, _Client) and self._loop.lost

    def sync(self, timeout: Optional[float] = None) -> None:
        """A flush point (see the module's contract); Timeout, or NotFound once detached or
        (attacher) once the creator is gone."""
        if self._detached:
            raise NotFound("region %s is detached" % (tuple(self.handle),))
        loop = self._loop
        with self._lock:
            self._seq += 1
            req = _SyncRequest(self._seq)
        if isinstance(loop, _Client) and loop.lost:
            raise NotFound("the creator of region %s is gone" % (tuple(self.handle),))
        loop.requests.append(req)
        loop.wake()
        if not req.done.wait(SYNC_TIMEOUT if timeout is None else timeout):
            raise Timeout("region %s: no answer to sync" % (tuple(self.handle),))
        if req.error is not None:
            raise req.error

    def detach(self) -> None:
        """Stop using the region; ``NotFound`` if already detached. An attacher's writes are
        flushed first; a creator's process serves the remaining attachers until they leave."""
        with self._lock:
            if self._detached:
                raise NotFound("region %s is already detached" % (tuple(self.handle),))
            self._detached = True
        _live.discard(self)
        loop = self._loop
        loop.stopping = True
        loop.wake()
        if isinstance(loop, _Client) or not self.stats.attached:
            loop.thread.join(SEND_TIMEOUT)
        if isinstance(loop, _Client):
            self._release()

    def _served(self) -> None:
        """The creator's server ended (detached and no attacher left)."""
        self._gone.set()
        self._release()

    def _release(self) -> None:
        for view in (self._view, self._inner):
            with contextlib.suppress(BufferError):
                view.release()
        with contextlib.suppress(BufferError):
            self._mmap.close()

    def __enter__(self) -> "MirroredRegion":
        return self

    def __exit__(self, *exc) -> None:
        if not self._detached:
            self.detach()

    def __repr__(self):
        return "<MirroredRegion %s size=%d %s%s>" % (
            tuple(self.handle), self.size, "creator" if self.created else "attacher",
            " detached" if self._detached else "")


@atexit.register
def _detach_all() -> None:
    """At exit, attachers flush their last writes (a creator's process ends its region)."""
    for region in list(_live):
        with contextlib.suppress(Exception):
            if region._loop is not None:
                region.detach()


def query(handle, runtime: Optional[Runtime] = None) -> int:
    """The size of the mirrored region ``handle``, asked of its creator; NotFound if none."""
    handle = as_handle(handle)
    runtime = runtime if runtime is not None else default_runtime()
    sock = mirror_link.connect(runtime, mirror_link.REGION, handle)
    with sock:
        try:
            sock.sendall(W.encode(W.QUERY))
            reader = W.FrameReader()
            while True:
                data = sock.recv(64)
                if not data:
                    raise NotFound("region %s did not answer" % (tuple(handle),))
                frames = reader.feed(data)
                if frames:
                    if frames[0].type != W.SIZE or frames[0].arg <= 0:
                        raise Generic("region %s answered out of turn" % (tuple(handle),))
                    return frames[0].arg
        except socket.timeout:
            raise Timeout("region %s did not answer" % (tuple(handle),)) from None
        except (OSError, W.ProtocolError) as exc:
            raise NotFound("region %s: %s" % (tuple(handle), exc)) from None
