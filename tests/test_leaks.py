"""Leak checks: thousands of create/use/destroy cycles of each resource leave the process as they found it.

Counted with psutil before and after (after a warm-up, so caches and lazily
built state are already there): file descriptors, threads and this runtime
directory's /dev/shm objects must be equal, RSS may grow by at most
RSS_BOUND, and the runtime directory must hold nothing but the per-context
allocation files (.lock, .next).
"""
import gc
import os
import threading
import time

import psutil
import pytest

from vsockcompat import constants as C
from vsockcompat import ds_client
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.ds_server import DiscoveryServer
from vsockcompat.handles import VMCIHandle
from vsockcompat.queuepair import QueuePair, shm_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

RSS_BOUND = 20 << 20  # bytes
ENDPOINT_CYCLES = 10_000
DISCOVERY_CYCLES = 1_000
QP_CYCLES = 2_000
REGION_CYCLES = 2_000
WARM_UP = 100


def _shm_objects(rundir):
    prefix = shm_name(rundir, VMCIHandle(0, 0))[:-len("qp.0.0")]
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


def _leftovers(rundir):
    """Files in the runtime directory other than allocation state and the daemon's."""
    out = []
    for cdir in sorted(os.listdir(rundir)):
        path = os.path.join(rundir, cdir)
        if os.path.isdir(path):
            out += ["%s/%s" % (cdir, n) for n in os.listdir(path) if n not in (".lock", ".next")]
    return out


class Counters:
    def __init__(self, rundir, keep=frozenset()):
        self.proc = psutil.Process()
        self.rundir = rundir
        self.keep = keep

    def snapshot(self):
        gc.collect()
        return {"fds": self.proc.num_fds(), "threads": threading.active_count(),
                "os_threads": self.proc.num_threads(), "shm": _shm_objects(self.rundir),
                "rss": self.proc.memory_info().rss}

    def settled_snapshot(self, quiet=0.2, limit=5.0):
        """A snapshot once the descriptor count has not changed for ``quiet`` seconds, so a
        thread still closing connections (the discovery daemon's) is not counted mid-way."""
        deadline = time.monotonic() + limit
        snap = self.snapshot()
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.02)
            again = self.snapshot()
            if again["fds"] != snap["fds"]:
                stable_since = time.monotonic()
            snap = again
            if time.monotonic() - stable_since >= quiet:
                break
        return snap

    def check(self, cycle, count, label):
        for i in range(WARM_UP):
            cycle(i)
        before = self.snapshot()
        for i in range(count):
            cycle(WARM_UP + i)
        after = self.snapshot()
        growth = after["rss"] - before["rss"]
        print("%s: %d cycles: fds %d -> %d, threads %d -> %d, shm %d -> %d, RSS %+.1f MiB"
              % (label, count, before["fds"], after["fds"], before["os_threads"], after["os_threads"],
                 len(before["shm"]), len(after["shm"]), growth / 2**20))
        # Growth is a leak; fewer means the first snapshot caught something transient.
        assert after["fds"] <= before["fds"], "file descriptors leaked"
        assert after["threads"] <= before["threads"], "threads leaked"
        assert after["os_threads"] <= before["os_threads"], "OS threads leaked"
        assert set(after["shm"]) <= set(before["shm"]), "shared memory objects leaked"
        assert growth < RSS_BOUND, "RSS grew by %d bytes" % growth
        assert set(_leftovers(self.rundir)) == set(self.keep), "runtime directory not clean"


def test_endpoint_cycles(make_runtime, rundir):
    host, guest = make_runtime(cid=2), make_runtime(cid=3)
    buf = bytearray(256)
    tx = DatagramEndpoint(runtime=guest)

    def cycle(i):
        # A fresh endpoint, a fresh link to it, one datagram each way, and both destroyed.
        with DatagramEndpoint(runtime=host) as rx:
            tx.send(rx.handle, b"cycle %d" % i)
            n, src = rx.recv_into(buf, timeout=5)
            assert src == tx.handle and bytes(buf[:n]) == b"cycle %d" % i
            rx.send(src, b"back")
            assert tx.recv(timeout=5).payload == b"back"
            rx.forget(src)
        tx.forget(rx.handle)

    try:
        Counters(rundir, keep={"c3/%d" % tx.handle.resource, "c3/%d.acct" % tx.handle.resource}).check(
            cycle, ENDPOINT_CYCLES, "endpoints")
    finally:
        tx.close()
    assert _leftovers(rundir) == []


def test_discovery_cycles(make_runtime, rundir):
    server = DiscoveryServer(make_runtime(cid=1), tick=0.05)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = make_runtime(ds_autostart=False)
    try:
        with DatagramEndpoint(runtime=client) as ep:
            def cycle(i):
                name = "leak-%d" % (i % 7)
                assert ds_client.register_status(name, ep.handle, client) == C.VMCI_SUCCESS
                assert ds_client.lookup_status(name, client) == (C.VMCI_SUCCESS, ep.handle)
                assert ds_client.unregister_status(name, client) == C.VMCI_SUCCESS

            counters = Counters(rundir)
            for i in range(WARM_UP):
                cycle(i)
            before = counters.settled_snapshot()
            for i in range(DISCOVERY_CYCLES):
                cycle(WARM_UP + i)
            after = counters.settled_snapshot()
            growth = after["rss"] - before["rss"]
            print("discovery: %d cycles: fds %d -> %d, threads %d -> %d, RSS %+.1f MiB"
                  % (DISCOVERY_CYCLES, before["fds"], after["fds"], before["os_threads"],
                     after["os_threads"], growth / 2**20))
            assert after["fds"] <= before["fds"]
            assert after["os_threads"] <= before["os_threads"]
            assert growth < RSS_BOUND
            assert server.stats["requests"] == 3 * (DISCOVERY_CYCLES + WARM_UP)
            assert len(server._registry) == 1
    finally:
        server.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert _leftovers(rundir) == []


def test_queue_pair_cycles(make_runtime, rundir):
    host, guest = make_runtime(cid=2), make_runtime(cid=3)
    out = bytearray(4096)

    def cycle(i):
        a = QueuePair.alloc(None, produce_size=8192, consume_size=8192, runtime=host)
        b = QueuePair.alloc(a.handle, produce_size=8192, consume_size=8192, runtime=guest)
        assert b.enqueue(b"x" * 3000) == 3000 and a.enqueue(b"y" * 100) == 100
        assert a.dequeue_into(out) == 3000 and b.dequeue(4096) == b"y" * 100
        assert b.detach() == C.VMCI_SUCCESS
        assert a.detach() == C.VMCI_SUCCESS_LAST_DETACH

    Counters(rundir).check(cycle, QP_CYCLES, "queue pairs")


def test_shared_region_cycles(make_runtime, rundir):
    sharedmem = pytest.importorskip("vsockcompat.sharedmem")
    host, guest = make_runtime(cid=2), make_runtime(cid=3)

    def cycle(i):
        region = sharedmem.SharedRegion.create(10000, runtime=host)
        region.buffer[:4] = b"ping"
        other = sharedmem.SharedRegion.attach(region.handle, runtime=guest)
        assert bytes(other.buffer[:4]) == b"ping"
        region.detach()
        other.detach()

    counters = Counters(rundir)
    shm_prefix = sharedmem.shm_prefix(rundir)

    def objects():
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(shm_prefix))

    assert objects() == []
    counters.check(cycle, REGION_CYCLES, "shared regions")
    assert objects() == []
