"""Mirrored shared memory and streamed queue pairs over real AF_VSOCK, inside the guest test bed
only (marker ``vsock``): what ``VSOCKCOMPAT_SHM_MODE=auto`` picks on the vsock transport.

In the bed every process is in context 1 (vsock_loopback), so queue pairs between two of its
processes carry ``VMCI_QPFLAG_LOCAL``, as two processes of one VM did on VMCI. Raw AF_VSOCK
sockets come only from the gate-checked ``vsock_socket`` factory.

Run them:  python testbed/guest.py run -- python -m pytest tests/real_vsock -m vsock -rs -k mirror
"""
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import vsockcompat

from vsockcompat import constants as C
from vsockcompat import ds_client, mirror_link
from vsockcompat._settings import Settings
from vsockcompat.mirror import MirroredRegion
from vsockcompat.qp_stream import StreamQueuePair
from vsockcompat.queuepair import QueuePair
from vsockcompat.runtime import Runtime
from vsockcompat.sharedmem import SharedRegion, query

from .conftest import VMADDR_CID_LOCAL

pytestmark = pytest.mark.vsock

# Children import vsockcompat from where this process did (source tree or site-packages).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(vsockcompat.__file__)))
START_TIMEOUT = 90.0  # Python starts slowly under TCG
WAIT = 60.0
READING = re.compile(r"[A-Z][a-z]{2} [A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d \S+ \d{4}")


def vsock_env(rundir, core_name):
    env = dict(os.environ)
    env.update(VSOCKCOMPAT_RUNDIR=rundir, VSOCKCOMPAT_TRANSPORT="vsock", VSOCKCOMPAT_CID="2",
               VSOCKCOMPAT_DS_AUTOSTART="0", VSOCKCOMPAT_NO_EXTENSIONS="1" if core_name == "pure" else "0")
    env.pop("VSOCKCOMPAT_SHM_MODE", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture
def rt(core, rundir):
    runtime = Runtime(Settings(no_extensions=False, rundir=rundir, cid=2, transport="vsock",
                               ds_autostart=False), core=core)
    assert runtime.transport.name == "vsock" and mirror_link.mirrored(runtime)
    return runtime


def run_child(code, env, *args, timeout=START_TIMEOUT):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)] + [str(a) for a in args],
                         env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_region_is_mirrored_between_processes(rt, core, rundir):
    with SharedRegion.create(3 * 4096 + 5, runtime=rt) as region:
        assert isinstance(region, MirroredRegion)
        assert region.handle.context == VMADDR_CID_LOCAL and region.handle.resource >= 1024
        region.buffer[:6] = b"server"
        region.buffer[3 * 4096:] = b"12345"
        assert query(region.handle, runtime=rt) == 3 * 4096 + 5
        out = run_child("""
            import sys
            import vsockcompat as vmci
            h = vmci.VMCIHandle(int(sys.argv[1]), int(sys.argv[2]))
            assert vmci.VMCI_InitApp() == 0
            rv, size = vmci.VMCISharedMem_Query(h)
            assert vmci.VMCISharedMem_Attach(h, size - 1)[0] == vmci.VMCI_ERROR_INVALID_SIZE
            rv, view = vmci.VMCISharedMem_Attach(h, size)
            assert rv == 0, rv
            print(size, bytes(view[:6]).decode(), bytes(view[3 * 4096:]).decode())
            view[4096:4101] = b"reply"
            assert vmci.VMCISharedMem_Detach(h) == 0   # flushes the reply first
            assert vmci.VMCISharedMem_Detach(h) == vmci.VMCI_ERROR_NOT_FOUND
        """, vsock_env(rundir, core.NAME), *region.handle)
        assert out.split() == [str(3 * 4096 + 5), "server", "12345"]
        deadline = time.monotonic() + WAIT
        while bytes(region.buffer[4096:4101]) != b"reply":
            assert time.monotonic() < deadline, "the attacher's write never came"
            time.sleep(0.01)


def test_the_delay_and_flush_points_over_vsock(rt):
    """Measures (prints, never asserts) the creator->attacher delay over real vsock."""
    with SharedRegion.create(128, runtime=rt) as a, SharedRegion.attach(a.handle, runtime=rt) as b:
        delays = []
        for i in range(1, 21):
            stamp = b"%08d" % i
            a.buffer[:8] = stamp
            start = time.monotonic()
            while bytes(b.buffer[:8]) != stamp:
                assert time.monotonic() - start < WAIT
                time.sleep(0.001)
            delays.append(time.monotonic() - start)
        delays.sort()
        print("\nvsock mirror delay: median %.1f ms, max %.1f ms" % (delays[10] * 1e3, delays[-1] * 1e3))
        b.buffer[64:70] = b"synced"
        b.sync()
        assert bytes(a.buffer[64:70]) == b"synced"
        a.buffer[0:4] = b"back"
        a.sync()
        assert bytes(b.buffer[0:4]) == b"back"


def test_garbage_on_a_mirror_stream_is_dropped(rt, vsock_socket):
    with SharedRegion.create(100, runtime=rt) as a:
        sock = vsock_socket(socket.SOCK_STREAM)
        sock.connect((VMADDR_CID_LOCAL, a.handle.resource))
        sock.sendall(b"\xde\xad\xbe\xef" * 10)
        while sock.recv(4096):
            pass
        deadline = time.monotonic() + WAIT
        while a.stats.bad_frames != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with SharedRegion.attach(a.handle, 100, runtime=rt) as b:    # still serving
            a.buffer[:2] = b"ok"
            a.sync()
            assert bytes(b.buffer[:2]) == b"ok"


QP_CHILD = """
    import hashlib, sys
    from vsockcompat.queuepair import QueuePair
    mode, cid, rid, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    qp = QueuePair.alloc((cid, rid), 65536, 65536, flags=1 | 2)   # ATTACH_ONLY | LOCAL
    print(type(qp).__name__, flush=True)
    data = bytes(i & 0xFF for i in range(1 << 16)) * 4
    sent = 0
    while mode == "forever" or sent < total:
        qp.wait_for_space(1, 60)
        sent += qp.enqueue(memoryview(data)[sent % len(data):][:65536])
    qp.wait_for_data(60)
    assert qp.dequeue(10) == b"done"
    print(qp.detach(), flush=True)
"""


def test_a_queue_pair_transfer_between_processes(rt, core, rundir):
    total = 4 << 20
    a = QueuePair.alloc(None, 65536, 65536, flags=C.VMCI_QPFLAG_LOCAL, runtime=rt)
    assert isinstance(a, StreamQueuePair)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(QP_CHILD), "count", str(a.handle.context), str(a.handle.resource), str(total)],
                             env=vsock_env(rundir, core.NAME), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "StreamQueuePair\n"
        assert a.events(WAIT)[0].event == C.VMCI_EVENT_QP_PEER_ATTACH
        digest, got, buf = hashlib.sha256(), 0, bytearray(1 << 16)
        start = time.monotonic()
        while got < total:
            assert a.wait_for_data(WAIT) > 0
            assert a.consume_buf_ready() <= 65535
            n = a.dequeue_into(buf)
            digest.update(buf[:n])
            got += n
        elapsed = time.monotonic() - start
        data = bytes(i & 0xFF for i in range(1 << 16)) * 4
        expected = hashlib.sha256((data * (total // len(data) + 1))[:total]).digest()
        assert digest.digest() == expected
        print("\nqueue pair over vsock: %.1f MB/s" % (total / elapsed / 1e6))
        a.enqueue(b"done")
        out, err = child.communicate(timeout=WAIT)
        assert child.returncode == 0, err
        assert out.strip() == str(C.VMCI_SUCCESS)
        assert a.events(WAIT)[-1].event == C.VMCI_EVENT_QP_PEER_DETACH
        assert a.detach() == C.VMCI_SUCCESS_LAST_DETACH
    finally:
        child.kill()
        child.communicate()
        if not a.detached:
            a.detach()


def test_a_peer_killed_mid_transfer_over_vsock(rt, core, rundir):
    a = QueuePair.alloc(None, 65536, 65536, flags=C.VMCI_QPFLAG_LOCAL, runtime=rt)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(QP_CHILD), "forever", str(a.handle.context), str(a.handle.resource), "0"],
                             env=vsock_env(rundir, core.NAME), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "StreamQueuePair\n"
        for _ in range(5):
            a.wait_for_data(WAIT)
            a.dequeue(1 << 16)
        child.send_signal(signal.SIGKILL)
        child.wait(WAIT)
        deadline = time.monotonic() + WAIT
        while True:
            assert time.monotonic() < deadline, "the survivor did not notice the dead peer"
            rc = a.wait_for_data_status(WAIT)
            if rc <= 0:
                break
            a.dequeue(rc)
        assert rc == C.VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        assert C.VMCI_EVENT_QP_PEER_DETACH in [e.event for e in a.events()]
        assert a.enqueue_status(b"x") == C.VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    finally:
        child.kill()
        child.communicate()
        assert a.detach() == C.VMCI_SUCCESS_LAST_DETACH


@pytest.fixture
def daemon(core, rundir):
    """A discovery daemon on vsock in its own process; yields once it answers at (1, 1)."""
    log = open(rundir + ".ds.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "vsockcompat", "ds"], env=vsock_env(rundir, core.NAME),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    rt = Runtime(Settings(no_extensions=False, rundir=rundir, cid=2, transport="vsock",
                          ds_autostart=False), core=core)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while ds_client.lookup_status(C.VMCI_PUBLIC_GROUP_NAME, rt, timeout=5)[0] != C.VMCI_SUCCESS:
            assert proc.poll() is None, "the daemon exited with %s" % proc.returncode
            assert time.monotonic() < deadline, "the daemon did not answer"
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        with open(rundir + ".ds.log", "rb") as f:
            sys.stderr.write(f.read().decode("utf-8", "replace"))
        os.unlink(rundir + ".ds.log")


CLIENT = """
import sys
from vsockcompat.apps import sharedmem_app
print("ready", flush=True)
sys.stdin.readline()
sys.exit(sharedmem_app.main(["-c"]))
"""


def test_shared_mem_app_pair_over_vsock(daemon, core, rundir):
    """sharedMemApp (vmci-sdk.md 7.2), server and client in two processes, region mirrored.

    Python takes longer to start under TCG than the server's 10 s, so the client process is
    started first and runs the sample's client code once the server has said it runs."""
    env = vsock_env(rundir, core.NAME)
    client = subprocess.Popen([sys.executable, "-c", CLIENT], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = subprocess.Popen([sys.executable, "-m", "vsockcompat", "sharedmem-app", "-s"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline() == "ready\n"
        assert server.stdout.readline() == "Running shared memory server for 10 seconds.\n"
        client.stdin.write("\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=START_TIMEOUT)
        assert (client.returncode, err) == (0, "")
        readings = out.split("\n")
        assert len(readings) == 4 and readings[3] == "", readings
        assert all(READING.fullmatch(r) for r in readings[:3]), readings
        assert readings[0] != readings[2]         # the server's writes reach the client
        assert server.wait(START_TIMEOUT) == 0
        assert server.stderr.read() == "0.1.2.3.4.5.6.7.8.9.\n"
    finally:
        for proc in (client, server):
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def test_a_queue_pair_stream_buffers_a_whole_queue_in_the_kernel(rt):
    """Both ends' vsock streams hold their consume queue plus headers in the kernel (the
    creator's through its listener, whose accepted stream inherits the size)."""
    from vsockcompat.qp_stream import _kernel_buffer
    a = QueuePair.alloc(None, 1 << 18, 1 << 19, flags=C.VMCI_QPFLAG_LOCAL, runtime=rt)
    b = QueuePair.alloc(a.handle, 1 << 19, 1 << 18, flags=C.VMCI_QPFLAG_LOCAL, runtime=rt)
    try:
        assert b.enqueue(b"x" * 300000) == 300000     # a queue bigger than the default buffer
        got = 0
        while got < 300000:
            a.wait_for_data(WAIT)
            got += len(a.dequeue(1 << 20))
        for end, consume in ((a, 1 << 19), (b, 1 << 18)):
            size = end._sock.getsockopt(C.AF_VSOCK, C.SO_VM_SOCKETS_BUFFER_SIZE)
            assert size == _kernel_buffer(consume) > 1 << 18
    finally:
        b.detach()
        a.detach()


def test_queue_pair_stream_throughput_against_raw_vsock(rt, vsock_socket):
    """Prints (never asserts) queue-pair throughput over vsock against a raw AF_VSOCK
    SOCK_STREAM between the same two threads, in one run."""
    total, chunk = 4 << 20, 1 << 16
    payload = os.urandom(chunk)

    listener = vsock_socket(socket.SOCK_STREAM)
    listener.bind((0xFFFFFFFF, 0x5644))
    listener.listen(1)
    sender = vsock_socket(socket.SOCK_STREAM)
    sender.connect((VMADDR_CID_LOCAL, 0x5644))
    receiver, _ = listener.accept()
    vsock_socket.adopt(receiver)

    def send_raw():
        for _ in range(total // chunk):
            sender.sendall(payload)

    start = time.monotonic()
    thread = threading.Thread(target=send_raw)
    thread.start()
    got, buf = 0, bytearray(chunk)
    while got < total:
        got += receiver.recv_into(buf)
    thread.join()
    raw = total / (time.monotonic() - start)

    a = QueuePair.alloc(None, 1 << 18, 1 << 18, flags=C.VMCI_QPFLAG_LOCAL, runtime=rt)
    b = QueuePair.alloc(a.handle, 1 << 18, 1 << 18, flags=C.VMCI_QPFLAG_LOCAL, runtime=rt)

    def send_qp():
        sent = 0
        while sent < total:
            b.wait_for_space(1, WAIT)
            sent += b.enqueue(payload)

    start = time.monotonic()
    thread = threading.Thread(target=send_qp)
    thread.start()
    got = 0
    while got < total:
        a.wait_for_data(WAIT)
        got += a.dequeue_into(buf)
    thread.join()
    qp = total / (time.monotonic() - start)
    b.detach()
    a.detach()
    print("\nvsock stream throughput, 64 KiB writes: raw %.1f MB/s, queue pair %.1f MB/s (%.0f%%)"
          % (raw / 1e6, qp / 1e6, 100 * qp / raw))
