"""Queue pairs on the local transport, on both cores: alloc/attach rules, data, waits, detach, crashes.

Two ends in one process use two runtimes (contexts 2 and 3); two-process tests
run the attacher in a child (``child_env``), whose core may differ from ours.
Every test checks it leaves no shared-memory object behind.
"""
import errno
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from conftest import CYTHON_AVAILABLE, child_env
from vsockcompat.constants import (
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_NOT_FOUND,
    VMCI_ERROR_QUEUEPAIR_NODATA,
    VMCI_ERROR_QUEUEPAIR_NOSPACE,
    VMCI_ERROR_QUEUEPAIR_NOTATTACHED,
    VMCI_ERROR_TIMEOUT,
    VMCI_EVENT_QP_PEER_ATTACH,
    VMCI_EVENT_QP_PEER_DETACH,
    VMCI_INVALID_ID,
    VMCI_QPFLAG_ATTACH_ONLY,
    VMCI_QPFLAG_LOCAL,
    VMCI_QPFLAG_NONBLOCK,
    VMCI_SUCCESS,
    VMCI_SUCCESS_LAST_DETACH,
    VMCI_SUCCESS_QUEUEPAIR_ATTACH,
    VMCI_SUCCESS_QUEUEPAIR_CREATE,
)
from vsockcompat.errors import (
    AlreadyExists, InvalidArgs, NoAccess, NoResources, NotFound, QueuePairMismatch,
    QueuePairNoData, QueuePairNoSpace, QueuePairNotAttached, Timeout, Unavailable,
)
from vsockcompat.handles import VMCIHandle
from vsockcompat.queuepair import QPEvent, QueuePair, shm_name

pytestmark = pytest.mark.timeout(60)
OTHER_CORE = {"cython": "pure", "pure": "cython" if CYTHON_AVAILABLE else "pure"}

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from vsockcompat.queuepair import QueuePair
    mode, cid, rid, produce, consume = sys.argv[1], *map(int, sys.argv[2:6])
    if mode == "create_and_die":
        QueuePair.alloc((cid, rid), produce, consume)
        os.kill(os.getpid(), signal.SIGKILL)
    qp = QueuePair.alloc((cid, rid), produce, consume, flags=1)
    if mode == "echo":
        while True:
            qp.wait_for_data(20)
            data = qp.dequeue(1 << 20)
            if data == b"quit":
                break
            qp.wait_for_space(len(data), 20)
            qp.enqueue(data.upper())
    elif mode == "stream":
        total, sent = int(sys.argv[6]), 0
        while sent < total:
            chunk = bytes((sent + i) & 0xFF for i in range(min(5000, total - sent)))
            qp.wait_for_space(1, 20)
            sent += qp.enqueue(chunk)
        qp.wait_for_data(20)
        assert qp.dequeue(10) == b"done"
    elif mode == "produce_forever":
        while True:
            qp.wait_for_space(1, 20)
            qp.enqueue(b"z" * 1000)
    elif mode == "consume_forever":
        while True:
            qp.wait_for_data(20)
            qp.dequeue(1 << 20)
    elif mode == "sleep_then_send":
        time.sleep(1.0)
        qp.enqueue(b"wake")
        qp.events(20)
    print(qp.detach(), flush=True)
""")


@pytest.fixture
def two(make_runtime, rundir, fd_guard):
    """Runtimes of contexts 2 and 3; fails if a shared-memory object of this rundir is left."""
    yield make_runtime(2), make_runtime(3)
    prefix = shm_name(rundir, VMCIHandle(0, 0)).rsplit(".qp.", 1)[0] + ".qp."
    left = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    assert not left, "shared memory left behind: %s" % left


def spawn(rundir, core_name, mode, qp, *extra):
    h = qp.handle
    args = [sys.executable, "-c", CHILD, mode, str(h.context), str(h.resource),
            str(qp.consume_size), str(qp.produce_size)] + [str(x) for x in extra]
    return subprocess.Popen(args, env=child_env(rundir, core_name, cid=3),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=20):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out


def reap(proc):
    proc.kill()
    proc.communicate(timeout=20)


def attached(qp, timeout=20):
    events = qp.events(timeout)
    assert events[:1] == [QPEvent(VMCI_EVENT_QP_PEER_ATTACH, qp.handle, 3)], events
    return events


# Same process: allocation rules


def test_create_attach_and_mirrored_data(two):
    r2, r3 = two
    a = QueuePair.alloc(None, 100, 50, runtime=r2)
    assert a.created and a.handle.context == 2 and a.handle.resource >= 1024
    b = QueuePair.alloc(a.handle, 50, 100, runtime=r3)
    assert not b.created and b.peer_id == 2
    assert a.events() == [QPEvent(VMCI_EVENT_QP_PEER_ATTACH, a.handle, 3)]
    assert b.events() == []
    assert a.produce_free_space() == 99 and b.consume_free_space() == 99
    assert a.enqueue(b"x" * 150) == 99
    assert b.consume_buf_ready() == 99
    assert b.peek(3) == b"xxx"
    assert b.dequeue(10) == b"x" * 10
    assert b.enqueue(b"hello") == 5
    buf = bytearray(3)
    assert a.dequeue_into(buf) == 3 and buf == b"hel"
    assert a.dequeue(10) == b"lo"
    with pytest.raises(QueuePairNoData):
        a.dequeue(1)
    assert a.dequeue_status(buf) == VMCI_ERROR_QUEUEPAIR_NODATA
    assert b.enqueue(b"y" * 49) == 49
    with pytest.raises(QueuePairNoSpace):
        b.enqueue(b"y")
    assert b.enqueue_status(b"y") == VMCI_ERROR_QUEUEPAIR_NOSPACE
    assert len(b.dequeue(1000)) == 89
    assert a.enqueue_many([b"1" * 40] * 3) == 2
    assert b.dequeue(100) == b"1" * 80
    assert b.detach() == VMCI_SUCCESS
    assert a.detach() == VMCI_SUCCESS_LAST_DETACH


def test_alloc_status_codes(two):
    r2, r3 = two
    rc, a = QueuePair.alloc_status(None, 10, 10, runtime=r2)
    assert rc == VMCI_SUCCESS_QUEUEPAIR_CREATE
    rc, b = QueuePair.alloc_status(a.handle, 10, 10, runtime=r3)
    assert rc == VMCI_SUCCESS_QUEUEPAIR_ATTACH
    assert QueuePair.alloc_status(a.handle, 10, 10, runtime=r3) == (Unavailable.code, None)
    b.detach()
    a.detach()


def test_mismatched_sizes_and_flags(two):
    r2, r3 = two
    with QueuePair.alloc(None, 100, 50, runtime=r2) as a:
        with pytest.raises(QueuePairMismatch):
            QueuePair.alloc(a.handle, 100, 50, runtime=r3)
        with pytest.raises(QueuePairMismatch):
            QueuePair.alloc(a.handle, 50, 101, runtime=r3)
        with pytest.raises(InvalidArgs):
            QueuePair.alloc(a.handle, 50, 100, flags=VMCI_QPFLAG_LOCAL, runtime=r3)
        with QueuePair.alloc(a.handle, 50, 100, flags=VMCI_QPFLAG_ATTACH_ONLY, runtime=r3):
            pass


def test_attach_only_on_a_missing_pair(two):
    r2, r3 = two
    with pytest.raises(NotFound):
        QueuePair.alloc((2, 5000), 10, 10, flags=VMCI_QPFLAG_ATTACH_ONLY, runtime=r3)
    with pytest.raises(NotFound):
        QueuePair.alloc((2, 5000), 10, 10, flags=VMCI_QPFLAG_ATTACH_ONLY, runtime=r2)
    with pytest.raises(NotFound):  # a missing pair of another context is not created for it
        QueuePair.alloc((2, 5000), 10, 10, runtime=r3)
    with QueuePair.alloc((2, 5000), 10, 10, runtime=r2) as a:
        assert a.created and a.handle == (2, 5000)


def test_peer_restriction_and_third_party(two, make_runtime):
    r2, r3 = two
    r4 = make_runtime(4)
    with QueuePair.alloc(None, 10, 10, peer=4, runtime=r2) as a:
        with pytest.raises(NoAccess):
            QueuePair.alloc(a.handle, 10, 10, runtime=r3)
        with QueuePair.alloc(a.handle, 10, 10, runtime=r4):
            with pytest.raises(Unavailable):
                QueuePair.alloc(a.handle, 10, 10, runtime=r3)
            with pytest.raises(Unavailable):
                QueuePair.alloc(a.handle, 10, 10, runtime=r2)
    with QueuePair.alloc(None, 10, 10, runtime=r2) as a:
        with pytest.raises(AlreadyExists):  # the creator's own context, without LOCAL
            QueuePair.alloc(a.handle, 10, 10, runtime=r2)


def test_local_pair_in_one_context(two):
    r2, _ = two
    with QueuePair.alloc(None, 10, 20, flags=VMCI_QPFLAG_LOCAL, runtime=r2) as a:
        with QueuePair.alloc(a.handle, 20, 10, flags=VMCI_QPFLAG_LOCAL, runtime=r2) as b:
            assert a.enqueue(b"abc") == 3 and b.dequeue(3) == b"abc"


@pytest.mark.parametrize("sizes, error", [
    ((0, 0), InvalidArgs), ((-1, 10), InvalidArgs), ((10, -5), InvalidArgs),
    ((1.5, 10), InvalidArgs), (("10", 10), InvalidArgs), ((None, 10), InvalidArgs),
    ((True, 10), InvalidArgs), ((1 << 70, 10), NoResources),
    ((64 << 20, (64 << 20) + 1), NoResources),
])
def test_bad_sizes(two, sizes, error):
    with pytest.raises(error):
        QueuePair.alloc(None, *sizes, runtime=two[0])
    assert QueuePair.alloc_status(None, *sizes, runtime=two[0]) == (error.code, None)


@pytest.mark.parametrize("flags", [VMCI_QPFLAG_NONBLOCK, 0x10, -1, 1.0])
def test_unknown_flags(two, flags):
    with pytest.raises(InvalidArgs):
        QueuePair.alloc(None, 10, 10, flags=flags, runtime=two[0])


def test_largest_pair(two):
    with QueuePair.alloc(None, 64 << 20, 64 << 20, runtime=two[0]) as a:
        assert a.produce_free_space() == (64 << 20) - 1


def test_pair_memory_is_allocated_and_mapped_at_alloc(two, rundir):
    # As the kernel, the pair's pages exist from its creation; both ends map them
    # populated, so writing the whole ring takes no page faults (without: one per page).
    r2, r3 = two
    size = 1 << 20
    with QueuePair.alloc(None, 4096, size, runtime=r2) as a, \
            QueuePair.alloc(a.handle, size, 4096, runtime=r3) as b:
        st = os.stat(os.path.join("/dev/shm", shm_name(rundir, a.handle)))
        assert st.st_blocks * 512 >= st.st_size >= size
        data = bytes(range(256)) * (size // 256 - 1)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        assert b.enqueue(data) == len(data)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        assert faults < size // 4096 // 8, "%d page faults writing %d pages" % (faults, size // 4096)
        view = a.peek_view(size)
        assert view == data[:len(view)]
        a.consume(len(view))


def test_alloc_without_memory_is_no_resources(two, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "posix_fallocate", full)
        with pytest.raises(NoResources):
            QueuePair.alloc(None, 1 << 20, 4096, runtime=two[0])
    with QueuePair.alloc(None, 1 << 20, 4096, runtime=two[0]) as a:  # nothing was left half-made
        assert a.produce_free_space() == (1 << 20) - 1


def test_one_sided_pair(two):
    r2, r3 = two
    with QueuePair.alloc(None, 10, 0, runtime=r2) as a, QueuePair.alloc(a.handle, 0, 10, runtime=r3) as b:
        assert a.enqueue(b"abc") == 3 and b.dequeue(5) == b"abc"
        assert b.enqueue_status(b"x") == VMCI_ERROR_QUEUEPAIR_NOSPACE
        assert b.produce_free_space() == 0


# Detach


def test_operations_after_detach(two):
    r2, r3 = two
    a = QueuePair.alloc(None, 10, 10, runtime=r2)
    b = QueuePair.alloc(a.handle, 10, 10, runtime=r3)
    assert a.detach() == VMCI_SUCCESS
    assert a.enqueue_status(b"x") == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    assert a.dequeue_status(bytearray(1)) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    for call in (lambda: a.enqueue(b"x"), lambda: a.dequeue(1), lambda: a.peek(1),
                 a.produce_free_space, a.consume_buf_ready, lambda: a.wait_for_data(1)):
        with pytest.raises(QueuePairNotAttached):
            call()
    with pytest.raises(NotFound):
        a.detach()
    assert a.detach_status() == VMCI_ERROR_NOT_FOUND
    assert b.detach() == VMCI_SUCCESS_LAST_DETACH


def test_peer_detach_drains_then_not_attached(two):
    r2, r3 = two
    a = QueuePair.alloc(None, 10, 10, runtime=r2)
    b = QueuePair.alloc(a.handle, 10, 10, runtime=r3)
    b.enqueue(b"last")
    assert b.detach() == VMCI_SUCCESS
    assert a.events() == [QPEvent(VMCI_EVENT_QP_PEER_ATTACH, a.handle, 3),
                          QPEvent(VMCI_EVENT_QP_PEER_DETACH, a.handle, 3)]
    assert a.enqueue_status(b"x") == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    assert a.wait_for_data(1) == 4
    assert a.dequeue(2) == b"la" and a.dequeue(5) == b"st"
    with pytest.raises(QueuePairNotAttached):
        a.dequeue(1)
    with pytest.raises(QueuePairNotAttached):
        a.wait_for_space(1, 1)
    assert a.detach() == VMCI_SUCCESS_LAST_DETACH


def test_creator_alone_detaches_last_and_frees_everything(two, rundir):
    with QueuePair.alloc(None, 10, 10, runtime=two[0]) as a:
        assert os.path.exists(os.path.join("/dev/shm", shm_name(rundir, a.handle)))
    assert a.detached
    assert not [n for n in os.listdir(os.path.join(rundir, "c2")) if ".qp" in n]


def test_handle_is_reused_only_after_detach(two):
    r2, _ = two
    a = QueuePair.alloc(None, 10, 10, runtime=r2)
    b = QueuePair.alloc(None, 10, 10, runtime=r2)
    assert a.handle != b.handle
    handle = a.handle
    a.detach()
    with QueuePair.alloc(handle, 10, 10, runtime=r2) as c:
        assert c.created
    b.detach()


# Zero-copy reads


def test_peek_view_and_consume(two):
    r2, r3 = two
    with QueuePair.alloc(None, 16, 10, runtime=r2) as a, QueuePair.alloc(a.handle, 10, 16, runtime=r3) as b:
        assert b.peek_view_status(4) == VMCI_ERROR_QUEUEPAIR_NODATA
        with pytest.raises(QueuePairNoData):
            b.peek_view(4)
        assert a.enqueue(b"abcdefghijkl") == 12
        view = b.peek_view(100)
        assert view.readonly and bytes(view) == b"abcdefghijkl"
        assert bytes(b.peek_view(3)) == b"abc" and b.consume_buf_ready() == 12
        assert b.consume(5) == 5
        with pytest.raises(ValueError):
            view[0]  # released by consume
        assert a.produce_free_space() == 15 - 7
        assert a.enqueue(b"0123456789") == 8  # 4 bytes up to the wrap point, 4 after it
        assert bytes(b.peek_view(100)) == b"fghijkl0123"
        assert b.consume(11) == 11
        assert bytes(b.peek_view(100)) == b"4567"
        assert b.consume_status(5) == VMCI_ERROR_INVALID_ARGS  # more than is ready: nothing consumed
        with pytest.raises(InvalidArgs):
            b.consume(5)
        assert b.consume_buf_ready() == 4 and b.consume(4) == 4 and b.consume(0) == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "3", None, True])
def test_peek_view_and_consume_refuse_bad_counts(two, bad):
    r2, r3 = two
    with QueuePair.alloc(None, 16, 10, runtime=r2) as a, QueuePair.alloc(a.handle, 10, 16, runtime=r3) as b:
        a.enqueue(b"abc")
        assert b.peek_view_status(bad) == VMCI_ERROR_INVALID_ARGS
        assert b.consume_status(bad) == VMCI_ERROR_INVALID_ARGS
        assert b.consume_status(1 << 70) == VMCI_ERROR_INVALID_ARGS
        with pytest.raises(InvalidArgs):
            b.peek_view(bad)
        assert b.consume_buf_ready() == 3


def test_views_after_detach(two, rundir):
    r2, r3 = two
    a = QueuePair.alloc(None, 16, 10, runtime=r2)
    b = QueuePair.alloc(a.handle, 10, 16, runtime=r3)
    a.enqueue(b"abcdefgh")
    view = b.peek_view(8)
    kept = b.peek_view(8)[2:6]  # a slice cannot be released: it keeps the mapping alive
    assert b.detach() == VMCI_SUCCESS
    with pytest.raises(ValueError):
        bytes(view)
    assert bytes(kept) == b"cdef"  # stale but mapped: never an out-of-bounds read
    assert b.peek_view_status(1) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    assert b.consume_status(0) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    with pytest.raises(QueuePairNotAttached):
        b.peek_view(1)
    with pytest.raises(QueuePairNotAttached):
        b.consume(1)
    assert a.detach() == VMCI_SUCCESS_LAST_DETACH
    assert not os.path.exists(os.path.join("/dev/shm", shm_name(rundir, a.handle)))
    assert bytes(kept) == b"cdef"
    del kept  # the last view goes: the mapping and its descriptor with it


def test_peer_detach_drains_in_place_then_not_attached(two):
    r2, r3 = two
    a = QueuePair.alloc(None, 10, 10, runtime=r2)
    b = QueuePair.alloc(a.handle, 10, 10, runtime=r3)
    b.enqueue(b"last")
    assert b.detach() == VMCI_SUCCESS
    assert bytes(a.peek_view(10)) == b"last" and a.consume(4) == 4
    assert a.peek_view_status(10) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    assert a.detach() == VMCI_SUCCESS_LAST_DETACH


def test_consume_wakes_a_writer_waiting_for_space(two):
    r2, r3 = two
    with QueuePair.alloc(None, 10, 10, runtime=r2) as a, QueuePair.alloc(a.handle, 10, 10, runtime=r3) as b:
        a.enqueue(b"x" * 9)
        assert len(b.peek_view(5)) == 5
        timer = threading.Timer(0.3, b.consume, (5,))
        timer.start()
        start = time.monotonic()
        assert a.wait_for_space(5, 10) == 5
        assert time.monotonic() - start < 1.5
        timer.join()


# Blocking helpers


def test_a_sleeping_peer_gets_one_bell_per_sleep(two):
    # Each bell costs the ringer a send and the sleeper a recv: a writer that keeps
    # writing while the reader is still waking rings once, and again after it re-arms.
    r2, r3 = two
    with QueuePair.alloc(None, 64, 64, runtime=r2) as a, QueuePair.alloc(a.handle, 64, 64, runtime=r3) as b:
        attached(a)

        def bells():
            n = 0
            while True:
                try:
                    n += len(a._bell.recv(64, socket.MSG_DONTWAIT))
                except BlockingIOError:
                    return n

        for _ in range(3):
            assert a.ring.arm_wait(r2.core.QP_WAITING_READ, 1) == 0  # a is about to sleep
            for _ in range(4):
                assert b.enqueue(b"x") == 1
            assert bells() == 1
            a.ring.set_waiting(0)
            assert a.dequeue(64) == b"xxxx"
            assert b.enqueue(b"y") == 1  # nobody sleeps: no bell
            assert bells() == 0 and a.dequeue(64) == b"y"


def test_wait_for_data_times_out(two):
    r2, r3 = two
    with QueuePair.alloc(None, 10, 10, runtime=r2) as a, QueuePair.alloc(a.handle, 10, 10, runtime=r3):
        start = time.monotonic()
        with pytest.raises(Timeout):
            a.wait_for_data(0.3)
        assert 0.25 < time.monotonic() - start < 3
        assert a.wait_for_data_status(0) == VMCI_ERROR_TIMEOUT
        assert a.wait_for_space(5, 0) == 9
        with pytest.raises(InvalidArgs):
            a.wait_for_space(10, 0)


def test_wait_for_space_wakes_when_the_peer_reads(two):
    r2, r3 = two
    with QueuePair.alloc(None, 10, 10, runtime=r2) as a, QueuePair.alloc(a.handle, 10, 10, runtime=r3) as b:
        a.enqueue(b"x" * 9)
        timer = threading.Timer(0.3, b.dequeue, (5,))
        timer.start()
        start = time.monotonic()
        assert a.wait_for_space(5, 10) == 5
        assert time.monotonic() - start < 1.5
        timer.join()


# Two processes


def test_two_processes_echo(two, rundir, core):
    a = QueuePair.alloc(None, 4096, 4096, runtime=two[0])
    child = spawn(rundir, core.NAME, "echo", a)
    try:
        attached(a)
        for msg in (b"hello", b"queue pair", b"x" * 3000):
            assert a.enqueue(msg) == len(msg)
            got = b""
            while len(got) < len(msg):
                a.wait_for_data(10)
                got += a.dequeue(4096)
            assert got == msg.upper()
        a.enqueue(b"quit")
        assert finish(child).strip() == str(VMCI_SUCCESS)
        assert a.events(10) == [QPEvent(VMCI_EVENT_QP_PEER_DETACH, a.handle, 3)]
    finally:
        reap(child)
        assert a.detach() == VMCI_SUCCESS_LAST_DETACH


def test_stream_across_processes_and_cores(two, rundir, core):
    """A child on the other core streams 1 MiB through a 4 KiB queue."""
    total = 1 << 20
    a = QueuePair.alloc(None, 16, 4000, runtime=two[0])
    child = spawn(rundir, OTHER_CORE[core.NAME], "stream", a, total)
    try:
        got = bytearray()
        buf = bytearray(4096)
        while len(got) < total:
            a.wait_for_data(10)
            n = a.dequeue_into(buf)
            got += buf[:n]
        assert got == bytes(i & 0xFF for i in range(total))
        a.enqueue(b"done")
        assert finish(child).strip() == str(VMCI_SUCCESS)
    finally:
        reap(child)
        a.detach()


def test_in_place_stream_across_processes_and_cores(two, rundir, core):
    """The same stream from a child on the other core, read in place with peek_view + consume."""
    total = 1 << 20
    a = QueuePair.alloc(None, 16, 4000, runtime=two[0])
    child = spawn(rundir, OTHER_CORE[core.NAME], "stream", a, total)
    try:
        got = bytearray()
        while len(got) < total:
            a.wait_for_data(10)
            view = a.peek_view(4096)
            n = len(view)
            got += view
            assert a.consume(n) == n
        assert got == bytes(i & 0xFF for i in range(total))
        a.enqueue(b"done")
        assert finish(child).strip() == str(VMCI_SUCCESS)
    finally:
        reap(child)
        a.detach()


def test_wait_for_data_sleeps_in_the_kernel(two, rundir, core):
    a = QueuePair.alloc(None, 64, 64, runtime=two[0])
    child = spawn(rundir, core.NAME, "sleep_then_send", a)
    try:
        attached(a)
        me = psutil.Process()
        cpu0, start = sum(me.cpu_times()[:2]), time.monotonic()
        assert a.wait_for_data(10) == 4
        cpu, elapsed = sum(me.cpu_times()[:2]) - cpu0, time.monotonic() - start
        assert elapsed > 0.5, "woke before the child sent anything"
        assert cpu < 0.15 * elapsed, "spent %.3f s of CPU in a %.3f s wait" % (cpu, elapsed)
        assert a.dequeue(10) == b"wake"
    finally:
        a.detach()
        finish(child)


@pytest.mark.parametrize("mode", ["produce_forever", "consume_forever"])
def test_peer_killed_mid_transfer(two, rundir, core, mode):
    """SIGKILL the child mid-transfer: we get PEER_DETACH and clean errors, and never hang."""
    a = QueuePair.alloc(None, 8192, 8192, runtime=two[0])
    child = spawn(rundir, core.NAME, mode, a)
    try:
        attached(a)
        for _ in range(20):
            if mode == "produce_forever":
                a.wait_for_data(10)
                a.dequeue(5000)
            else:
                a.wait_for_space(1, 10)
                a.enqueue(b"q" * 5000)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, "the survivor did not notice the dead peer"
            if mode == "produce_forever":
                rc = a.wait_for_data_status(10)
                if rc > 0:
                    a.dequeue(rc)
                    continue
            else:
                rc = a.wait_for_space_status(1, 10)
                if rc > 0:
                    a.enqueue_status(b"q" * rc)
                    continue
            break
        assert rc == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        assert QPEvent(VMCI_EVENT_QP_PEER_DETACH, a.handle, 3) in a.events()
        assert a.enqueue_status(b"x") == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        assert a.dequeue_status(bytearray(10)) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    finally:
        reap(child)
        assert a.detach() == VMCI_SUCCESS_LAST_DETACH


def test_pair_of_dead_ends_is_reclaimed(two, rundir, core):
    child = subprocess.Popen([sys.executable, "-c", CHILD, "create_and_die", "2", "3000", "10", "10"],
                             env=child_env(rundir, core.NAME, cid=2), stderr=subprocess.PIPE)
    _, err = child.communicate(timeout=20)
    assert child.returncode == -signal.SIGKILL, err
    assert os.path.exists(os.path.join("/dev/shm", shm_name(rundir, VMCIHandle(2, 3000))))
    with pytest.raises(NotFound):  # its creator is gone: nothing to attach to
        QueuePair.alloc((2, 3000), 10, 10, runtime=two[1])
    with QueuePair.alloc((2, 3000), 10, 10, runtime=two[0]) as a:
        assert a.created and a.peer_id == VMCI_INVALID_ID
        assert a.consume_buf_ready() == 0
