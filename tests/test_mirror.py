"""Mirrored shared memory (``VSOCKCOMPAT_SHM_MODE=mirrored``) on the local transport: the
coherence contract of ``vsockcompat.mirror``, the SDK calls, bad input and faults."""
import itertools
import os
import signal
import socket
import statistics
import subprocess
import textwrap
import threading
import time

import pytest

from conftest import PYTHON, child_env, make_settings

from vsockcompat import mirror, mirror_link, mirror_wire as W
from vsockcompat._settings import SettingError, Settings
from vsockcompat import constants as C, errors
from vsockcompat.constants import (
    VMCI_ERROR_ALREADY_EXISTS,
    VMCI_ERROR_INVALID_SIZE,
    VMCI_ERROR_NOT_FOUND,
    VMCI_SUCCESS,
)
from vsockcompat.errors import Generic, InvalidArgs, InvalidSize, NoMem, NotFound
from vsockcompat.handles import VMCI_INVALID_HANDLE, VMCIHandle
from vsockcompat.mirror import MirroredRegion
from vsockcompat.runtime import Runtime
from vsockcompat.sdk import VMCILibrary
from vsockcompat.sharedmem import SHM_DIR, SharedRegion, query, shm_prefix

pytestmark = pytest.mark.timeout(90)
WAIT = 20.0


@pytest.fixture
def make_mirrored(core, rundir):
    def make(cid=2):
        return Runtime(make_settings(rundir, cid=cid)._replace(shm_mode="mirrored"), core=core)
    return make


@pytest.fixture
def two(make_mirrored):
    return make_mirrored(2), make_mirrored(3)


def eventually(predicate, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.002)


def files(rundir, cid=2):
    try:
        return sorted(os.listdir(os.path.join(rundir, "c%d" % cid)))
    except FileNotFoundError:
        return []


# Selection

def test_the_setting():
    assert Settings.from_environ({}).shm_mode == "auto"
    for mode in ("auto", "shared", "mirrored"):
        assert Settings.from_environ({"VSOCKCOMPAT_SHM_MODE": mode}).shm_mode == mode
    assert Settings.from_environ({"VSOCKCOMPAT_SHM_MODE": ""}).shm_mode == "auto"
    with pytest.raises(SettingError, match="VSOCKCOMPAT_SHM_MODE must be one of"):
        Settings.from_environ({"VSOCKCOMPAT_SHM_MODE": "mirror"})


def test_auto_is_shared_on_the_local_transport(runtime, make_mirrored):
    assert not mirror_link.mirrored(runtime)
    assert mirror_link.mirrored(make_mirrored())
    with SharedRegion.create(10, runtime=runtime) as shared:
        assert isinstance(shared, SharedRegion)
    with SharedRegion.create(10, runtime=make_mirrored()) as mirrored:
        assert isinstance(mirrored, MirroredRegion)


def test_mirrored_mode_never_creates_an_af_vsock_socket(two, monkeypatch):
    real = socket.socket

    class Guarded(real):
        def __init__(self, family=-1, *args, **kwargs):
            assert family != mirror_link.AF_VSOCK, "an AF_VSOCK socket was created"
            super().__init__(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", Guarded)
    with SharedRegion.create(100, runtime=two[0]) as a, SharedRegion.attach(a.handle, runtime=two[1]) as b:
        a.buffer[:2] = b"ok"
        a.sync()
        assert bytes(b.buffer[:2]) == b"ok"


# The coherence contract

def test_create_query_attach_snapshot(fd_guard, two, rundir):
    a = SharedRegion.create(10000, runtime=two[0])
    assert a.handle.context == 2 and a.handle.resource >= 1024 and a.size == 10000
    assert len(a.buffer) == 10000 and bytes(a.buffer) == bytes(10000)
    assert query(a.handle, runtime=two[1]) == 10000
    a.buffer[:5] = b"hello"
    a.buffer[9995:] = b"world"
    b = SharedRegion.attach(a.handle, 10000, runtime=two[1])
    assert (b.handle, b.size, b.created) == (a.handle, 10000, False)
    assert bytes(b.buffer[:5]) == b"hello" and bytes(b.buffer[9995:]) == b"world"
    b.detach()
    a.detach()
    # The creator's server ends once it has seen b's BYE (asynchronous: slow under load).
    eventually(lambda: not a._loop.thread.is_alive(), "the creator kept serving")
    with pytest.raises(NotFound):
        query(a.handle, runtime=two[1])
    assert not [n for n in files(rundir) if ".mir" in n]


def test_creator_writes_reach_attachers_without_a_call(two):
    """Measures the delay (printed, not asserted): each write of the creator shows up in the
    attacher's copy within about one scan interval."""
    with SharedRegion.create(128, runtime=two[0]) as a, SharedRegion.attach(a.handle, runtime=two[1]) as b:
        delays = []
        for i in range(1, 31):
            stamp = b"%08d" % i
            a.buffer[:8] = stamp
            start = time.monotonic()
            eventually(lambda: bytes(b.buffer[:8]) == stamp, "write %d never reached the attacher" % i)
            delays.append(time.monotonic() - start)
        print("\nmirror delay creator->attacher (interval %.0f ms): median %.1f ms, max %.1f ms"
              % (mirror.INTERVAL * 1e3, statistics.median(delays) * 1e3, max(delays) * 1e3))


def test_attacher_writes_reach_the_creator_and_the_other_attachers(make_mirrored):
    rt2, rt3, rt4 = make_mirrored(2), make_mirrored(3), make_mirrored(4)
    with SharedRegion.create(3 * 4096, runtime=rt2) as a, \
            SharedRegion.attach(a.handle, runtime=rt3) as b, SharedRegion.attach(a.handle, runtime=rt4) as c:
        b.buffer[5000:5004] = b"from"
        eventually(lambda: bytes(a.buffer[5000:5004]) == b"from", "the creator never saw it")
        eventually(lambda: bytes(c.buffer[5000:5004]) == b"from", "the other attacher never saw it")
        assert a.stats.attached == 2


def test_sync_is_a_flush_point_both_ways(two):
    with SharedRegion.create(64 * 1024, runtime=two[0]) as a, \
            SharedRegion.attach(a.handle, runtime=two[1]) as b:
        for i in range(20):
            a.buffer[i * 3000:i * 3000 + 4] = b"c%03d" % i
            a.sync()
            assert bytes(b.buffer[i * 3000:i * 3000 + 4]) == b"c%03d" % i
            b.buffer[i * 3000 + 10:i * 3000 + 14] = b"a%03d" % i
            b.sync()
            assert bytes(a.buffer[i * 3000 + 10:i * 3000 + 14]) == b"a%03d" % i


def test_a_large_region_converges(two):
    size = 3 * (1 << 20) + 123
    data = os.urandom(size)
    with SharedRegion.create(size, runtime=two[0]) as a, SharedRegion.attach(a.handle, size, runtime=two[1]) as b:
        a.buffer[:] = data
        a.sync()
        assert bytes(b.buffer) == data
        b.buffer[100:200] = bytes(100)
        b.buffer[size - 10:] = b"0123456789"
        b.sync()
        expected = data[:100] + bytes(100) + data[200:size - 10] + b"0123456789"
        assert bytes(a.buffer) == expected
        assert a.stats.bytes_received == 3 * mirror.LINE + size % mirror.LINE  # lines 1-3 and the last


def test_concurrent_writers_converge_to_the_creators_copy(make_mirrored):
    rts = [make_mirrored(cid) for cid in (2, 3, 4)]
    with SharedRegion.create(8192, runtime=rts[0]) as a, SharedRegion.attach(a.handle, runtime=rts[1]) as b, \
            SharedRegion.attach(a.handle, runtime=rts[2]) as c:
        def writer(region, tag):
            for i in range(200):
                region.buffer[i % 64] = tag
                region.buffer[100 + (i % 7)] = (tag + i) & 0xFF
        threads = [threading.Thread(target=writer, args=(r, t)) for r, t in ((a, 1), (b, 2), (c, 3))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in (b, c):
            r.sync()
        a.sync()
        assert bytes(b.buffer) == bytes(a.buffer) == bytes(c.buffer)


# Lifetime

def test_the_region_outlives_its_creators_detach(fd_guard, two, rundir):
    a = SharedRegion.create(100, runtime=two[0])
    a.buffer[:4] = b"kept"
    b = SharedRegion.attach(a.handle, runtime=two[1])
    a.detach()
    with pytest.raises(NotFound):
        a.buffer
    assert query(a.handle, runtime=two[1]) == 100
    b.buffer[:3] = b"new"
    b.sync()
    with SharedRegion.attach(a.handle, runtime=two[1]) as c:
        assert bytes(c.buffer[:4]) == b"newt"
    b.detach()
    eventually(lambda: not a._loop.thread.is_alive(), "the creator kept serving")
    with pytest.raises(NotFound):
        query(a.handle, runtime=two[1])
    assert not [n for n in files(rundir) if ".mir" in n]


def test_double_detach_and_use_after_detach(fd_guard, two):
    a = SharedRegion.create(10, runtime=two[0])
    b = SharedRegion.attach(a.handle, runtime=two[1])
    b.detach()
    a.detach()
    for region in (a, b):
        assert region.closed
        with pytest.raises(NotFound):
            region.detach()
        with pytest.raises(NotFound):
            region.buffer
        with pytest.raises(NotFound):
            region.sync()


# Bad input

@pytest.mark.parametrize("size, exc", [(0, InvalidSize), (-1, InvalidSize), (1.5, InvalidArgs),
                                       ("10", InvalidArgs), (True, InvalidArgs)])
def test_bad_sizes(two, size, exc):
    with pytest.raises(exc):
        SharedRegion.create(size, runtime=two[0])


def test_a_huge_size_is_no_mem(two, rundir):
    with pytest.raises(NoMem):
        SharedRegion.create(1 << 50, runtime=two[0])
    assert not [n for n in files(rundir) if ".mir" in n]


def test_attach_with_the_wrong_size_and_to_nothing(fd_guard, two):
    with SharedRegion.create(100, runtime=two[0]) as a:
        with pytest.raises(InvalidSize):
            SharedRegion.attach(a.handle, 99, runtime=two[1])
        with pytest.raises(InvalidSize):
            SharedRegion.attach(a.handle, 101, runtime=two[1])
        assert a.stats.attached == 0
        with SharedRegion.attach(a.handle, 100, runtime=two[1]):
            pass
    with pytest.raises(NotFound):
        SharedRegion.attach(a.handle, runtime=two[1])
    with pytest.raises(NotFound):
        SharedRegion.attach((5, 4000), runtime=two[1])
    with pytest.raises(NotFound):
        query((2, 4000), runtime=two[1])


def test_the_sdk_calls_keep_their_shapes(fd_guard, two):
    server, client = VMCILibrary(two[0]), VMCILibrary(two[1])
    assert server.VMCI_InitApp() == client.VMCI_InitApp() == VMCI_SUCCESS
    try:
        handle, view = server.VMCISharedMem_Create(128)
        assert handle != VMCI_INVALID_HANDLE and isinstance(view, memoryview) and len(view) == 128
        assert client.VMCISharedMem_Query(handle) == (VMCI_SUCCESS, 128)
        assert client.VMCISharedMem_Attach(handle, 64) == (VMCI_ERROR_INVALID_SIZE, None)
        rv, mirror_view = client.VMCISharedMem_Attach(handle, 128)
        assert rv == VMCI_SUCCESS and len(mirror_view) == 128
        assert client.VMCISharedMem_Attach(handle, 128) == (VMCI_ERROR_ALREADY_EXISTS, None)
        view[:4] = b"TIME"
        eventually(lambda: bytes(mirror_view[:4]) == b"TIME", "the client never saw the write")
        assert client.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
        assert client.VMCISharedMem_Detach(handle) == VMCI_ERROR_NOT_FOUND
        assert server.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
        assert client.VMCISharedMem_Query(handle) == (VMCI_ERROR_NOT_FOUND, 0)
        assert client.VMCISharedMem_Query(VMCIHandle(2, 9999)) == (VMCI_ERROR_NOT_FOUND, 0)
    finally:
        client.VMCI_CleanupApp()
        server.VMCI_CleanupApp()


# Faults on the stream

_RAW_NAMES = itertools.count()


def raw(rundir, handle, cid=3):
    """A hand-made peer, bound in context ``cid``'s directory as the library binds."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    os.makedirs(os.path.join(rundir, "c%d" % cid), exist_ok=True)
    name = os.path.join(rundir, "c%d" % cid, ".raw-%d" % next(_RAW_NAMES))
    sock.bind(name)
    os.unlink(name)
    sock.connect(os.path.join(rundir, "c%d" % handle.context, "%d.mir.sock" % handle.resource))
    return sock


def unbound_raw(rundir, handle):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.connect(os.path.join(rundir, "c%d" % handle.context, "%d.mir.sock" % handle.resource))
    return sock


def closed_by_peer(sock):
    """Reads until the creator closes; returns what it sent."""
    got = b""
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return got
        got += data


HELLO = W.encode(W.HELLO, 0, b"\3\0\0\0")


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.0\r\n\r\n" + bytes(20),
    W.HEADER.pack(W.MAGIC, 99, 0, 0, 0, 0),
    W.HEADER.pack(W.MAGIC, W.HELLO, 0, 0, 0, W.MAX_PAYLOAD + 1),
    W.encode(W.UPDATE, 0, b"x"),                       # before HELLO
    HELLO + W.encode(W.UPDATE, 100, b"x"),             # out of range
    HELLO + W.encode(W.UPDATE, 0, b""),                # empty update
    HELLO + W.encode(W.SIZE, 1),                       # out of turn
    HELLO + W.encode(W.HELLO, 0, b"\3\0\0\0"),         # twice
], ids=["text", "type", "oversize", "early-update", "range", "empty", "turn", "hello-twice"])
def test_garbage_is_dropped_counted_and_closed(fd_guard, two, rundir, garbage):
    with SharedRegion.create(100, runtime=two[0]) as a:
        with raw(rundir, a.handle) as sock:
            sock.sendall(garbage)
            closed_by_peer(sock)
        eventually(lambda: a.stats.bad_frames == 1, "the bad frame was not counted")
        with SharedRegion.attach(a.handle, runtime=two[1]) as b:  # the creator keeps serving
            a.buffer[:2] = b"ok"
            a.sync()
            assert bytes(b.buffer[:2]) == b"ok"
        eventually(lambda: a.stats.attached == 0, "the detach was not noticed")


def test_a_truncated_frame_is_counted(two, rundir):
    with SharedRegion.create(100, runtime=two[0]) as a:
        with raw(rundir, a.handle) as sock:
            sock.sendall(HELLO)
            closed = W.FrameReader()
            sock.settimeout(WAIT)
            while not any(f.type == W.FLUSHED for f in closed.feed(sock.recv(4096))):
                pass
            sock.sendall(W.encode(W.UPDATE, 0, b"abcdef")[:-2])
        eventually(lambda: a.stats.bad_frames == 1 and a.stats.attached == 0, "not counted")
        assert bytes(a.buffer[:4]) == bytes(4)


def test_a_silent_connection_is_dropped(two, rundir, monkeypatch):
    monkeypatch.setattr(mirror, "HELLO_TIMEOUT", 0.2)
    with SharedRegion.create(100, runtime=two[0]) as a:
        with raw(rundir, a.handle) as sock:
            assert closed_by_peer(sock) == b""
        assert a.stats.dropped == 1


def test_a_garbage_creator_fails_the_attach_cleanly(fd_guard, two, rundir, make_mirrored):
    path = os.path.join(rundir, "c2", "4321.mir.sock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as fake:
        fake.bind(path)
        fake.listen(1)

        def serve():
            conn, _ = fake.accept()
            with conn:
                conn.recv(100)
                conn.sendall(b"\xff" * 40)
        t = threading.Thread(target=serve)
        t.start()
        with pytest.raises(Generic):
            SharedRegion.attach((2, 4321), runtime=two[1])
        t.join()


CREATOR = textwrap.dedent("""
    import sys, time
    from vsockcompat.sharedmem import SharedRegion
    region = SharedRegion.create(int(sys.argv[1]))
    region.buffer[:5] = b"alive"
    print(region.handle.resource, flush=True)
    while True:
        region.buffer[8:16] = b"%08d" % (int(time.monotonic() * 100) % 10 ** 8)
        time.sleep(0.01)
""")

ATTACHER = textwrap.dedent("""
    import sys, time
    from vsockcompat.sharedmem import SharedRegion
    region = SharedRegion.attach((2, int(sys.argv[1])))
    print(bytes(region.buffer[:5]).decode(), flush=True)
    while True:
        region.buffer[20:28] = b"%08d" % (int(time.monotonic() * 100) % 10 ** 8)
        time.sleep(0.01)
""")


def test_a_killed_creator_leaves_attachers_their_copy(fd_guard, two, rundir, core):
    env = child_env(rundir, core.NAME, cid=2, VSOCKCOMPAT_SHM_MODE="mirrored")
    child = subprocess.Popen([PYTHON, "-c", CREATOR, "4096"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        rid = int(child.stdout.readline())
        b = SharedRegion.attach((2, rid), 4096, runtime=two[1])
        assert bytes(b.buffer[:5]) == b"alive"
        b.sync()
        child.send_signal(signal.SIGKILL)
        child.wait(WAIT)
        eventually(lambda: b.peer_lost, "the attacher did not notice")
        with pytest.raises(NotFound):
            b.sync()
        assert bytes(b.buffer[:5]) == b"alive"       # the last copy stays readable
        b.detach()
        with pytest.raises(NotFound):
            query((2, rid), runtime=two[1])
        assert "%d.mir" % rid in files(rundir)
        with MirroredRegion.create(10, runtime=two[0], resource=rid) as again:   # reclaimed
            assert again.handle == (2, rid)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def test_a_killed_attacher_is_dropped_and_the_creator_keeps_serving(fd_guard, two, rundir, core):
    with SharedRegion.create(4096, runtime=two[0]) as a:
        a.buffer[:5] = b"alive"
        env = child_env(rundir, core.NAME, cid=3, VSOCKCOMPAT_SHM_MODE="mirrored")
        child = subprocess.Popen([PYTHON, "-c", ATTACHER, str(a.handle.resource)], env=env,
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline() == "alive\n"
            eventually(lambda: bytes(a.buffer[20:28]) != bytes(8), "the attacher's writes never came")
            a.sync()
            child.send_signal(signal.SIGKILL)
            child.wait(WAIT)
            eventually(lambda: a.stats.attached == 0, "the creator did not notice")
            a.sync()                                     # no one left to wait for: returns
            with SharedRegion.attach(a.handle, runtime=two[1]) as b:
                assert bytes(b.buffer[:5]) == b"alive"
        finally:
            child.kill()
            child.wait()
            child.stdout.close()


def test_no_shared_memory_objects_are_used(two, rundir):
    with SharedRegion.create(1 << 16, runtime=two[0]) as a, SharedRegion.attach(a.handle, runtime=two[1]):
        assert not [n for n in os.listdir(SHM_DIR) if n.startswith(shm_prefix(rundir))]


@pytest.mark.slow
def test_shared_mem_app_pair_in_mirrored_mode(rundir, core):
    """sharedMemApp (vmci-sdk.md 7.2) with its region mirrored: same texts, readings change."""
    import re
    app = [PYTHON, "-m", "vsockcompat", "sharedmem-app"]
    env = {cid: child_env(rundir, core.NAME, cid=cid, VSOCKCOMPAT_SHM_MODE="mirrored") for cid in (2, 3)}
    server = subprocess.Popen(app + ["-s"], env=env[2], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "Running shared memory server for 10 seconds.\n"
        client = subprocess.run(app + ["-c"], env=env[3], capture_output=True, text=True, timeout=60)
        assert (client.returncode, client.stderr) == (0, "")
        readings = client.stdout.split("\n")
        assert len(readings) == 4 and readings[3] == ""
        reading = re.compile(r"[A-Z][a-z]{2} [A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d \S+ \d{4}")
        assert all(reading.fullmatch(r) for r in readings[:3]), readings
        assert readings[0] != readings[2]
        assert server.wait(30) == 0
        assert server.stderr.read() == "0.1.2.3.4.5.6.7.8.9.\n"
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
        server.stdout.close()
        server.stderr.close()


# The pieces

def test_the_diff_reports_changed_lines_once():
    from vsockcompat.mirror_diff import BLOCK, LINE, Shadow, outside
    buf = bytearray(3 * BLOCK + 10)
    shadow = Shadow(memoryview(buf))
    assert shadow.changes() == []
    buf[5] = 1
    buf[BLOCK - 1:BLOCK + 1] = b"ab"                 # across a block boundary: one run
    buf[-1] = 2                                      # the short last line
    runs = shadow.changes()
    assert [(off, len(data)) for off, data in runs] == [
        (0, LINE), (BLOCK - LINE, 2 * LINE), (3 * BLOCK, 10)]
    assert shadow.changes() == []
    shadow.apply(100, b"xyz")                        # received: written, not reported back
    assert bytes(buf[100:103]) == b"xyz" and shadow.changes() == []
    assert outside(10, b"0123456789", [(12, 14), (18, 30)]) == [(10, b"01"), (14, b"4567")]
    assert outside(10, b"0123", [(0, 100)]) == []


def test_the_frame_reader():
    frames = W.encode(W.UPDATE, 7, b"abc") + W.encode(W.BYE)
    reader = W.FrameReader()
    got = reader.feed(frames[:5]) + reader.feed(frames[5:])
    assert [(f.type, f.arg, bytes(f.payload)) for f in got] == [(W.UPDATE, 7, b"abc"), (W.BYE, 0, b"")]
    reader.finish()
    reader = W.FrameReader()
    got = reader.feed(W.encode(W.BYE) + b"\0" * 20)  # good frames first: returned, then failed
    assert [f.type for f in got] == [W.BYE] and reader.failed
    with pytest.raises(W.ProtocolError):
        reader.feed(b"")
    reader = W.FrameReader()
    reader.feed(W.encode(W.UPDATE, 0, b"abc")[:-1])
    with pytest.raises(W.ProtocolError):
        reader.finish()
    with pytest.raises(ValueError):
        W.encode(W.DATA, 0, bytes(W.MAX_PAYLOAD + 1))
    assert W.decode_code(W.HEADER.unpack(W.encode_code(W.REFUSE, -24))[4]) == -24


@pytest.mark.parametrize("pieces", [frozenset(), frozenset({W.DATA})], ids=["whole", "pieces"])
def test_the_frame_reader_at_every_cut(pieces):
    """Frames cut anywhere, in two or three feeds: whole frames come out as sent; with
    ``pieces``, DATA payloads come out as they arrive, in order, and nothing else changes."""
    frames = [(W.DATA, 0, bytes(range(50))), (W.CREDIT, 9, b""), (W.DATA, 0, b"xyz"), (W.BYE, 0, b"")]
    stream = b"".join(W.encode(*f) for f in frames)
    for i in range(len(stream) + 1):
        for j in (i, min(i + 7, len(stream)), min(i + 33, len(stream))):
            reader = W.FrameReader(pieces)
            got = []
            for part in (stream[:i], stream[i:j], stream[j:]):
                got += [(f.type, f.arg, bytes(f.payload)) for f in reader.feed(part)]
                assert reader.pending or reader.feed(b"") == []
            reader.finish()
            if not pieces:
                assert got == frames
            else:
                assert [g for g in got if g[0] != W.DATA] == [f for f in frames if f[0] != W.DATA]
                assert all(g[2] for g in got if g[0] == W.DATA)
                data = [g for g in got if g[0] in (W.DATA, W.CREDIT)]
                cut = data.index((W.CREDIT, 9, b""))
                assert b"".join(g[2] for g in data[:cut]) == bytes(range(50))
                assert b"".join(g[2] for g in data[cut + 1:]) == b"xyz"
    reader = W.FrameReader(pieces)
    reader.feed(stream[:W.HEADER.size + 10])
    assert reader.pending == (40 if pieces else W.HEADER.size + 10)
    with pytest.raises(W.ProtocolError):
        reader.finish()


# Access control on the creator's side

def test_an_attacher_that_lies_about_its_context_is_refused(two, rundir):
    with SharedRegion.create(64, runtime=two[0]) as a:
        with unbound_raw(rundir, a.handle) as sock:
            sock.sendall(HELLO)
            got = closed_by_peer(sock)
        frame = W.HEADER.unpack(got[:W.HEADER.size])
        assert frame[1] == W.REFUSE and W.decode_code(frame[4]) == C.VMCI_ERROR_NO_ACCESS
        assert a.stats.attached == 0


def test_flags_and_sm_attach_are_enforced_by_the_creator(make_mirrored, rundir):
    with open(os.path.join(rundir, "policy.toml"), "w") as f:
        f.write('[contexts.3]\nflags = ["restricted"]\n\n[contexts.4]\nflags = ["trusted"]\n')
    host, restricted, trusted, plain = (make_mirrored(cid) for cid in (2, 3, 4, 5))
    with SharedRegion.create(64, runtime=host) as a:
        with pytest.raises(errors.NoAccess):
            SharedRegion.attach(a.handle, runtime=restricted)
        host.access.change(a.handle, lambda acl: acl.add(VMCIHandle(5, 0), [], [C.VMCI_PRIV_SM_ATTACH]))
        with pytest.raises(errors.NoAccess):
            SharedRegion.attach(a.handle, runtime=plain)
        with SharedRegion.attach(a.handle, runtime=trusted) as b:
            a.buffer[:2] = b"ok"
            a.sync()
            assert bytes(b.buffer[:2]) == b"ok"
