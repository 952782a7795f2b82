"""A fault-injecting local transport for tests: drop, delay, truncate or reorder frames.

``install(runtime, Faults(...))`` replaces the runtime's transport with a
``FaultyTransport``: a LocalTransport whose ``connect()`` hands the core one end
of a socketpair instead of the real link. A proxy thread per link reads each
frame the core wrote and forwards it on the real link (bound at the real
name, so the receiver still identifies the sender), after deciding, with a
seeded random generator, to drop it, delay it, cut it short or hold it back
behind the next frame. Both cores write through the file descriptor, so the
faults apply to the Cython and the pure core alike.

What the faults mean for the receiver: a dropped frame never arrives; a
truncated one arrives shorter than its header says (the receiver counts it in
``stats.bad_frames`` and drops that connection, so frames behind it on the
same link are lost too, and the sender reconnects on its next send). Frames the
core had already written to a link whose proxy stops are counted in ``frames``
and ``stranded``: so once a sender's links are closed, ``frames`` is exactly the
number of frames its core accepted. The
sender's core reserved each frame's full size in the receiver's queue account
when it sent it; dropped or truncated bytes are never released, as on a wire
that loses data, so tests keep their volume far below the 139,264-byte bound.
"""
import random
import select
import socket
import threading
import time
from typing import Dict, NamedTuple

from vsockcompat.transport.base import Link
from vsockcompat.transport.local import LocalTransport


class Faults(NamedTuple):
    """Probabilities per frame (0..1), the longest delay in seconds, and the seed."""

    drop: float = 0.0
    truncate: float = 0.0
    delay: float = 0.0  # probability of a delay
    max_delay: float = 0.01
    reorder: float = 0.0  # probability of holding a frame back behind the next one
    seed: int = 0


class FaultStats:
    __slots__ = ("frames", "forwarded", "dropped", "truncated", "delayed", "reordered", "stranded",
                 "links")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def __repr__(self):
        return "FaultStats(%s)" % ", ".join("%s=%d" % (n, getattr(self, n)) for n in self.__slots__)


_MAX_FRAME = 1 << 17


class _Proxy:
    def __init__(self, transport: "FaultyTransport", real: socket.socket, inner: socket.socket):
        self.transport = transport
        self.real = real
        self.inner = inner
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="faulty-proxy", daemon=True)
        self.thread.start()

    def _forward(self, frame: bytes) -> bool:
        try:
            self.real.send(frame)
        except OSError:
            return False
        self.transport.stats.forwarded += 1
        return True

    def run(self) -> None:
        faults, stats, rng = self.transport.faults, self.transport.stats, self.transport.rng
        held = None
        poller = select.poll()
        poller.register(self.inner.fileno(), select.POLLIN)
        ok = True
        try:
            while ok and not self.stop.is_set():
                if not poller.poll(20):
                    if held is not None:
                        ok, held = self._forward(held), None
                    continue
                try:
                    frame = self.inner.recv(_MAX_FRAME)
                except OSError:
                    break
                if not frame:
                    break  # the core's end was closed
                with self.transport.lock:
                    stats.frames += 1
                    roll = [rng.random() for _ in range(4)]
                    cut = rng.randrange(1, len(frame)) if len(frame) > 1 else 1
                    pause = rng.uniform(0, faults.max_delay)
                if roll[0] < faults.drop:
                    stats.dropped += 1
                    continue
                if roll[1] < faults.truncate and len(frame) > 1:
                    stats.truncated += 1
                    frame = frame[:cut]
                if roll[2] < faults.delay:
                    stats.delayed += 1
                    time.sleep(pause)
                if held is None and roll[3] < faults.reorder:
                    stats.reordered += 1
                    held = frame
                    continue
                ok = self._forward(frame)
                if ok and held is not None:
                    ok, held = self._forward(held), None
            if ok and held is not None:
                self._forward(held)
        finally:
            # The receiver hung up (or we were told to stop): the core sees its link gone.
            try:
                self.inner.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._count_stranded()

    def _count_stranded(self) -> None:
        """Count the frames the core wrote before the shutdown that nobody will forward."""
        self.inner.setblocking(False)
        while True:
            try:
                frame = self.inner.recv(_MAX_FRAME)
            except OSError:
                return
            if not frame:
                return
            with self.transport.lock:
                self.transport.stats.frames += 1
                self.transport.stats.stranded += 1


class FaultyTransport(LocalTransport):
    """A LocalTransport whose outgoing links pass through a fault-injecting proxy."""

    name = "local"

    def __init__(self, rundir: str, cid: int, core, faults: Faults):
        super().__init__(rundir, cid, core)
        self.faults = faults
        self.rng = random.Random(faults.seed)
        self.lock = threading.Lock()
        self.stats = FaultStats()
        self._proxies: Dict[int, _Proxy] = {}

    def connect(self, src, dst) -> Link:
        link = super().connect(src, dst)
        link.sock.setblocking(True)
        link.sock.settimeout(5)
        core_end, proxy_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        core_end.setblocking(False)
        proxy = _Proxy(self, link.sock, proxy_end)
        self._proxies[core_end.fileno()] = proxy
        self.stats.links += 1
        return Link(core_end, link.account, link.page)

    def disconnect(self, src, link: Link) -> None:
        proxy = self._proxies.pop(link.sock.fileno(), None)
        link.sock.close()
        if proxy is None:
            return super().disconnect(src, link)
        proxy.stop.set()
        proxy.thread.join(5)
        proxy.inner.close()
        super().disconnect(src, Link(proxy.real, link.account, link.page))


def install(runtime, faults: Faults) -> FaultyTransport:
    """Make ``runtime`` use a FaultyTransport (call before its transport is first used)."""
    s = runtime.settings
    transport = FaultyTransport(s.rundir, s.cid, runtime.core, faults)
    runtime._transport = transport
    return transport
