"""Fault injection: kill -9 at random (seeded) points, and a lossy socket layer (tests/faulty.py).

Every wait is bounded; the survivors must get the SDK's codes or events, never hang.
"""
import json
import os
import random
import signal
import struct
import subprocess
import threading
import time

import psutil
import pytest

from conftest import PYTHON, child_env
from faulty import Faults, install
from vsockcompat import constants as C
from vsockcompat import ds_client
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.handles import VMCIHandle
from vsockcompat.queuepair import QueuePair, shm_name

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]

SEEDS = [11, 23]
_SEQ = struct.Struct("<IQ")


def _kill(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _stop(proc):
    """SIGTERM, then as _kill."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    _kill(proc)


def _spawn(rundir, core, cid, script, *args):
    return subprocess.Popen([PYTHON, "-c", script] + [str(a) for a in args], env=child_env(
        rundir, core.NAME, cid=cid, VSOCKCOMPAT_DS_AUTOSTART="0"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def _ready_line(proc, timeout=15.0):
    """The child's first stdout line (it prints one when set up)."""
    result = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert result and result[0], "child did not get ready: %s" % (
        proc.stderr.read().decode() if proc.poll() is not None else "still running")
    return result[0].decode().strip()


def _shm_objects(rundir):
    prefix = shm_name(rundir, VMCIHandle(0, 0))[:-len("qp.0.0")]
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


# Datagrams

@pytest.mark.parametrize("seed", SEEDS)
def test_sender_killed_mid_stream(runtime, rundir, core, seed):
    """What arrives from a sender killed at a random point is a prefix of what it sent, in order."""
    rng = random.Random(seed)
    with DatagramEndpoint(runtime=runtime) as rx:
        sender = subprocess.Popen(
            [PYTHON, "-m", "vsockcompat.soak", "--child", "sender", "--rundir", rundir, "--core", core.NAME,
             "--deadline", repr(time.time() + 30), "--parent", str(os.getpid()), "--index", "0",
             "--count", "10000000", "--dst", str(rx.handle.resource)],
            env=child_env(rundir, core.NAME), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            rx.recv(timeout=15)  # it runs
            time.sleep(rng.uniform(0.0, 0.3))
            sender.send_signal(signal.SIGKILL)
            sender.wait(10)
        finally:
            _kill(sender)
        seqs = [0]
        buf = bytearray(128)
        while True:
            n, src = rx.recv_status(buf, timeout=0.5)
            if n < 0:
                assert n == C.VMCI_ERROR_TIMEOUT
                break
            seqs.append(_SEQ.unpack_from(buf)[1])
        assert seqs == list(range(len(seqs))), "not a prefix in order"
        with DatagramEndpoint(runtime=runtime) as other:
            other.send(rx.handle, b"still here")
            assert rx.recv(timeout=5).payload == b"still here"


RECEIVER = """
import sys, time
import vsockcompat
from vsockcompat.datagram import DatagramEndpoint
ep = DatagramEndpoint(5000)
print(ep.handle.resource, flush=True)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        ep.recv(timeout=0.5)
    except vsockcompat.VMCIError:
        pass
"""


@pytest.mark.parametrize("seed", SEEDS)
def test_receiver_killed(runtime, rundir, core, seed):
    """A sender to a receiver killed at a random point gets INVALID_RESOURCE, never hangs.

    At most 1,103 datagrams of 124 bytes: the receiver's queue bound is never reached,
    whatever it managed to read (see the next test for a full queue).
    """
    rng = random.Random(seed)
    receiver = _spawn(rundir, core, 3, RECEIVER)
    try:
        dst = VMCIHandle(3, int(_ready_line(receiver)))
        killer = threading.Timer(rng.uniform(0.0, 0.3), receiver.send_signal, (signal.SIGKILL,))
        codes = []
        with DatagramEndpoint(runtime=runtime) as tx:
            killer.start()
            for _ in range(1100):
                t0 = time.monotonic()
                rc = tx.send_status(dst, b"x" * 100, 100)
                assert time.monotonic() - t0 < 2, "a send blocked"
                codes.append(rc)
                if rc < 0:
                    break
                time.sleep(0.0003)
            killer.join()
            receiver.wait(10)
            assert all(c == 124 for c in codes[:-1]), set(codes)
            assert codes[-1] in (124, C.VMCI_ERROR_INVALID_RESOURCE)
            # Gone for good: every later send says so, at once.
            for _ in range(3):
                t0 = time.monotonic()
                assert tx.send_status(dst, b"x", 1) == C.VMCI_ERROR_INVALID_RESOURCE
                assert time.monotonic() - t0 < 2
    finally:
        _kill(receiver)


SLEEPING_RECEIVER = """
import time
from vsockcompat.datagram import DatagramEndpoint
ep = DatagramEndpoint(5000)
print(ep.handle.resource, flush=True)
time.sleep(30)
"""


def test_receiver_killed_with_a_full_queue(runtime, rundir, core):
    receiver = _spawn(rundir, core, 3, SLEEPING_RECEIVER)
    try:
        dst = VMCIHandle(3, int(_ready_line(receiver)))
        with DatagramEndpoint(runtime=runtime) as tx:
            while tx.send_status(dst, bytes(1000), 1000) > 0:
                pass
            assert tx.send_status(dst, bytes(1000), 1000) == C.VMCI_ERROR_NO_RESOURCES
            _kill(receiver)
            assert tx.send_status(dst, bytes(1000), 1000) == C.VMCI_ERROR_INVALID_RESOURCE
    finally:
        _kill(receiver)


# Queue pairs and shared memory

QP_WRITER = """
import sys, time
from vsockcompat.handles import VMCIHandle
from vsockcompat.queuepair import QueuePair
qp = QueuePair.alloc(VMCIHandle(2, int(sys.argv[1])), produce_size=65536, consume_size=4096)
print("attached", flush=True)
pattern = bytes(i % 251 for i in range(251 * 64))
off = 0
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    start = off % 251
    rc = qp.enqueue_status(pattern[start:start + 4000])
    if rc > 0:
        off += rc
    else:
        qp.wait_for_space_status(4000, timeout=0.2)
"""

QP_CREATOR = """
import time
from vsockcompat.queuepair import QueuePair
qp = QueuePair.alloc(None, produce_size=65536, consume_size=4096)
print(qp.handle.resource, flush=True)
pattern = bytes(i % 251 for i in range(251 * 64))
off = 0
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    start = off % 251
    rc = qp.enqueue_status(pattern[start:start + 4000])
    if rc > 0:
        off += rc
    else:
        qp.wait_for_space_status(4000, timeout=0.2)
"""


def _read_until_gone(qp, rng):
    """Read (slowly at random) until NOTATTACHED; return the bytes and the codes seen."""
    got = bytearray()
    buf = bytearray(3000)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rc = qp.dequeue_status(buf)
        if rc > 0:
            got += buf[:rc]
        elif rc == C.VMCI_ERROR_QUEUEPAIR_NOTATTACHED:
            return bytes(got)
        else:
            assert rc == C.VMCI_ERROR_QUEUEPAIR_NODATA, rc
            if rng.random() < 0.5:
                time.sleep(0.002)  # a slow reader: the writer is often blocked on a full queue
            qp.wait_for_data_status(timeout=0.5)
    raise AssertionError("no NOTATTACHED within 30 s")


def _check_pattern(data):
    assert data == bytes(i % 251 for i in range(len(data))), "the survivor read corrupted or reordered bytes"


@pytest.mark.parametrize("seed", SEEDS)
def test_queue_pair_attacher_killed(runtime, rundir, core, seed):
    rng = random.Random(seed)
    qp = QueuePair.alloc(None, produce_size=4096, consume_size=65536, runtime=runtime)
    writer = _spawn(rundir, core, 3, QP_WRITER, qp.handle.resource)
    try:
        assert _ready_line(writer) == "attached"
        threading.Timer(rng.uniform(0.0, 0.3), writer.send_signal, (signal.SIGKILL,)).start()
        data = _read_until_gone(qp, rng)
        writer.wait(10)
        _check_pattern(data)
        events = qp.events(timeout=5)
        assert [e.event for e in events][-1:] == [C.VMCI_EVENT_QP_PEER_DETACH]
        assert qp.enqueue_status(b"late") == C.VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        assert qp.dequeue_status(bytearray(10)) == C.VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        assert qp.wait_for_data_status(timeout=1) == C.VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        assert qp.detach_status() == C.VMCI_SUCCESS_LAST_DETACH
    finally:
        _kill(writer)
        if not qp.detached:
            qp.detach_status()
    assert _shm_objects(rundir) == []


@pytest.mark.parametrize("seed", SEEDS)
def test_queue_pair_creator_killed(make_runtime, rundir, core, seed):
    """kill -9 of the shared-memory creator: the attacher drains, gets PEER_DETACH and NOTATTACHED."""
    rng = random.Random(seed)
    creator = _spawn(rundir, core, 2, QP_CREATOR)
    qp = None
    try:
        handle = VMCIHandle(2, int(_ready_line(creator)))
        qp = QueuePair.alloc(handle, produce_size=4096, consume_size=65536, runtime=make_runtime(cid=3))
        threading.Timer(rng.uniform(0.0, 0.3), creator.send_signal, (signal.SIGKILL,)).start()
        data = _read_until_gone(qp, rng)
        creator.wait(10)
        _check_pattern(data)
        assert C.VMCI_EVENT_QP_PEER_DETACH in [e.event for e in qp.events(timeout=5)]
        assert qp.enqueue_status(b"late") == C.VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        assert qp.detach_status() == C.VMCI_SUCCESS_LAST_DETACH
    finally:
        _kill(creator)
        if qp is not None and not qp.detached:
            qp.detach_status()
    assert _shm_objects(rundir) == []
    # The id is free again.
    with QueuePair.alloc(handle, produce_size=4096, consume_size=4096, runtime=make_runtime(cid=2)) as again:
        assert again.created


REGION_CREATOR = """
import time
from vsockcompat.sharedmem import SharedRegion
r = SharedRegion.create(8192)
r.buffer[:5] = b"hello"
print(r.handle.resource, flush=True)
time.sleep(30)
"""


def test_shared_memory_creator_killed(make_runtime, rundir, core):
    sharedmem = pytest.importorskip("vsockcompat.sharedmem")
    creator = _spawn(rundir, core, 2, REGION_CREATOR)
    try:
        handle = VMCIHandle(2, int(_ready_line(creator)))
        rt = make_runtime(cid=3)
        region = sharedmem.SharedRegion.attach(handle, runtime=rt)
        _kill(creator)
        assert bytes(region.buffer[:5]) == b"hello", "the region stays for the survivor"
        region.buffer[5:8] = b"!!!"
        assert sharedmem.query(handle, runtime=rt) == 8192
        region.detach()
        assert not sharedmem.region_alive(handle, runtime=rt)
    finally:
        _kill(creator)
    assert [n for n in os.listdir("/dev/shm") if n.startswith(sharedmem.shm_prefix(rundir))] == []


# The discovery daemon

DAEMON = [PYTHON, "-m", "vsockcompat.ds_server", "--quiet"]

REGISTRANT = """
import sys, time
from vsockcompat import ds_client
from vsockcompat.datagram import DatagramEndpoint
ep = DatagramEndpoint()
assert ds_client.register_status(sys.argv[1], ep.handle) == 0
print("registered", flush=True)
time.sleep(30)
"""


def _start_daemon(rundir, core, client):
    proc = subprocess.Popen(DAEMON, env=child_env(rundir, core.NAME, cid=1), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while not client.transport.endpoint_alive(VMCIHandle(1, 1)):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("seed", SEEDS)
def test_daemon_killed_and_restarted(make_runtime, rundir, core, seed):
    """Entries of live registrants come back after kill -9 and restart; dead ones are gone."""
    rng = random.Random(seed)
    client = make_runtime(ds_autostart=False)
    daemon = _start_daemon(rundir, core, client)
    live_child = dead_child = None
    procs = [daemon]
    try:
        with DatagramEndpoint(runtime=client) as ep, DatagramEndpoint(runtime=client) as closing:
            assert ds_client.register_status("live", ep.handle, client) == C.VMCI_SUCCESS
            assert ds_client.register_status("plain", (2, 7000), client) == C.VMCI_SUCCESS
            assert ds_client.register_status("closing", closing.handle, client) == C.VMCI_SUCCESS
            live_child = _spawn(rundir, core, 5, REGISTRANT, "child-live")
            dead_child = _spawn(rundir, core, 6, REGISTRANT, "child-dead")
            procs += [live_child, dead_child]
            assert _ready_line(live_child) == "registered"
            assert _ready_line(dead_child) == "registered"

            # Clients hammer the daemon while it is killed at a random point.
            codes, slow, stop = [], [], threading.Event()

            def hammer():
                while not stop.is_set():
                    t0 = time.monotonic()
                    rc, _ = ds_client.lookup_status("live", client, timeout=1.0)
                    if time.monotonic() - t0 > 3:
                        slow.append(time.monotonic() - t0)
                    codes.append(rc)

            thread = threading.Thread(target=hammer, daemon=True)
            thread.start()
            time.sleep(rng.uniform(0.05, 0.5))
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(10)
            # During the outage: an error at once, no hang.
            t0 = time.monotonic()
            rc, handle = ds_client.lookup_status("live", client, timeout=2.0)
            assert rc in (C.VMCI_ERROR_INVALID_RESOURCE, C.VMCI_ERROR_DST_UNREACHABLE) and handle.is_invalid
            assert time.monotonic() - t0 < 3
            _kill(dead_child)
            closing.close()
            stop.set()
            thread.join(10)
            assert not thread.is_alive() and not slow, slow
            assert set(codes) <= {C.VMCI_SUCCESS, C.VMCI_ERROR_INVALID_RESOURCE, C.VMCI_ERROR_TIMEOUT,
                                  C.VMCI_ERROR_DST_UNREACHABLE}, set(codes)
            assert C.VMCI_SUCCESS in codes

            # A client with autostart brings a new daemon, which recovers the live entries.
            auto = make_runtime(ds_autostart=True)
            # Retried: ds_client's autostart can report (1, 1) alive a moment before the new daemon
            # listens (the transport publishes an endpoint's account before binding its socket),
            # and that first call then gets INVALID_RESOURCE.
            deadline = time.monotonic() + 15
            while True:
                rc, handle = ds_client.lookup_status("live", auto, timeout=10)
                if rc != C.VMCI_ERROR_INVALID_RESOURCE or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert (rc, handle) == (C.VMCI_SUCCESS, ep.handle)
            assert ds_client.lookup_status("plain", client) == (C.VMCI_SUCCESS, (2, 7000))
            assert ds_client.lookup_status("child-live", client)[0] == C.VMCI_SUCCESS
            assert ds_client.lookup_status("child-dead", client)[0] == C.VMCI_ERROR_NOT_FOUND
            assert ds_client.lookup_status("closing", client)[0] == C.VMCI_ERROR_NOT_FOUND
            assert ds_client.lookup_status("vmci public group", client)[0] == C.VMCI_SUCCESS
            with open(os.path.join(rundir, "ds.registry.json")) as f:
                names = {e["name"] for e in json.load(f)}
            assert names == {"vmci public group", "live", "plain", "child-live"}
            # The recovered entries are owned as before: the owner may still unregister.
            assert ds_client.unregister_status("live", client) == C.VMCI_SUCCESS
            assert ds_client.register_status("child-dead", (2, 7001), client) == C.VMCI_SUCCESS
    finally:
        for proc in procs:
            _kill(proc)


def test_daemon_survives_a_damaged_registry(make_runtime, rundir, core):
    client = make_runtime(ds_autostart=False)
    os.makedirs(rundir, exist_ok=True)
    with DatagramEndpoint(runtime=client) as ep:
        me = psutil.Process()
        from vsockcompat.transport.local import process_start_ticks
        good = {"name": "good", "handle": list(ep.handle), "owner": 2, "pid": me.pid,
                "start": process_start_ticks(me.pid), "watch_endpoint": True, "registered_at": 1.0}
        records = [good, {"name": 5}, "junk", None, dict(good, name="reused-pid", start=1),
                   dict(good, name="bad-handle", handle=[2]), dict(good, name="no-start", start=None),
                   dict(good, name="x" * 400), dict(good, name="vmci public group", handle=[9, 9])]
        with open(os.path.join(rundir, "ds.registry.json"), "w") as f:
            json.dump(records, f)
        with open(os.path.join(rundir, "ds.registry.json.999999.tmp"), "w") as f:
            f.write("half a rewr")
        daemon = _start_daemon(rundir, core, client)
        try:
            assert ds_client.lookup_status("good", client) == (C.VMCI_SUCCESS, ep.handle)
            for name in ("reused-pid", "bad-handle", "no-start"):
                assert ds_client.lookup_status(name, client)[0] == C.VMCI_ERROR_NOT_FOUND
            assert ds_client.lookup_status("vmci public group", client) == (C.VMCI_SUCCESS, (2, 1023))
            assert not os.path.exists(os.path.join(rundir, "ds.registry.json.999999.tmp"))
        finally:
            _stop(daemon)
        # Garbage that is not JSON at all: the daemon starts empty.
        with open(os.path.join(rundir, "ds.registry.json"), "wb") as f:
            f.write(b"\xff\x00{[")
        daemon = _start_daemon(rundir, core, client)
        try:
            assert ds_client.lookup_status("good", client)[0] == C.VMCI_ERROR_NOT_FOUND
        finally:
            _stop(daemon)


# A lossy socket layer

def _send_seq(tx, rx, count):
    """Send ``count`` numbered datagrams, receiving as they come; (accepted, received)."""
    accepted, got = [], []
    for seq in range(count):
        rc = tx.send_status(rx.handle, _SEQ.pack(0, seq), _SEQ.size)
        if rc >= 0:
            accepted.append(seq)
        else:
            assert rc in (C.VMCI_ERROR_INVALID_RESOURCE, C.VMCI_ERROR_NO_RESOURCES), rc
        time.sleep(0.0005)
        got += _drain(rx, 0)
    return accepted, got + _drain(rx, 0.5)


def _drain(rx, wait):
    seqs = []
    buf = bytearray(1024)
    while True:
        n, src = rx.recv_status(buf, timeout=wait)
        if n < 0:
            assert n == C.VMCI_ERROR_TIMEOUT
            return seqs
        assert n == _SEQ.size
        seqs.append(_SEQ.unpack_from(buf)[1])


@pytest.mark.parametrize("faults", [
    Faults(truncate=0.05, seed=1),
    Faults(drop=0.2, seed=2),
    Faults(delay=0.3, max_delay=0.005, seed=3),
    Faults(reorder=0.2, seed=4),
    Faults(drop=0.05, truncate=0.02, delay=0.1, max_delay=0.002, reorder=0.05, seed=5),
], ids=["truncate", "drop", "delay", "reorder", "all"])
def test_lossy_links(make_runtime, faults, fd_guard):
    rx_rt = make_runtime()
    tx_rt = make_runtime(cid=3)
    transport = install(tx_rt, faults)
    with DatagramEndpoint(runtime=rx_rt) as rx:
        with DatagramEndpoint(runtime=tx_rt) as tx:
            accepted, got = _send_seq(tx, rx, 300)
        stats = transport.stats
        assert stats.frames == len(accepted), stats
        assert len(set(got)) == len(got), "a datagram arrived twice"
        assert set(got) <= set(accepted)
        if faults.reorder == 0:
            assert got == sorted(got), "order per sender"
        if faults.drop == faults.truncate == 0:
            assert sorted(got) == accepted, "nothing lost without loss"
        if faults.truncate:
            assert stats.truncated > 0
            assert 0 < rx.stats.bad_frames <= stats.truncated
            assert stats.links > 1, "the sender reconnected after the receiver dropped its link"
        else:
            assert rx.stats.bad_frames == 0
        if faults.reorder:
            assert stats.reordered > 0
            if faults.drop == faults.truncate == 0:
                assert got != accepted
        # The receiver keeps serving a clean sender.
        with DatagramEndpoint(runtime=rx_rt) as clean:
            clean.send(rx.handle, b"clean")
            assert rx.recv(timeout=5).payload == b"clean"
