"""Queue pairs over a stream (``VSOCKCOMPAT_SHM_MODE=mirrored``) on the local transport: the
``QueuePair`` API and results, flow control, events, faults and bad input."""
import hashlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import child_env, make_settings
from test_queuepair import CHILD

from vsockcompat import mirror_wire as W
from vsockcompat import constants as C, errors
from vsockcompat.constants import (
    VMCI_ERROR_INVALID_ARGS,
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
from vsockcompat.errors import (
    AlreadyExists, InvalidArgs, NoAccess, NoResources, NotFound, QueuePairMismatch,
    QueuePairNoData, QueuePairNoSpace, QueuePairNotAttached, Unavailable,
)
from vsockcompat.qp_stream import StreamQueuePair
from vsockcompat.queuepair import QPEvent, QueuePair
from vsockcompat.runtime import Runtime

pytestmark = pytest.mark.timeout(90)
WAIT = 20.0


@pytest.fixture
def make_mirrored(core, rundir):
    def make(cid=2):
        return Runtime(make_settings(rundir, cid=cid)._replace(shm_mode="mirrored"), core=core)
    return make


@pytest.fixture
def two(make_mirrored, fd_guard, rundir):
    yield make_mirrored(2), make_mirrored(3)
    left = [n for n in os.listdir(os.path.join(rundir, "c2")) if ".qst" in n] \
        if os.path.isdir(os.path.join(rundir, "c2")) else []
    assert not left, "files left behind: %s" % left


def pair(two, produce=100, consume=200, flags=0):
    a = QueuePair.alloc(None, produce, consume, flags=flags, runtime=two[0])
    b = QueuePair.alloc(a.handle, consume, produce, flags=flags, runtime=two[1])
    assert a.events(WAIT) == [QPEvent(VMCI_EVENT_QP_PEER_ATTACH, a.handle, 3)]
    return a, b


# Allocation

def test_mirrored_mode_gives_stream_pairs(two):
    a, b = pair(two)
    assert isinstance(a, StreamQueuePair) and isinstance(b, StreamQueuePair)
    assert (a.created, b.created, a.handle, b.handle) == (True, False, a.handle, a.handle)
    assert (a.produce_size, a.consume_size, b.produce_size, b.consume_size) == (100, 200, 200, 100)
    assert (a.peer_id, b.peer_id) == (3, 2)
    assert b.events() == []
    assert b.detach() == VMCI_SUCCESS
    assert a.events(WAIT) == [QPEvent(VMCI_EVENT_QP_PEER_DETACH, a.handle, 3)]
    assert a.detach() == VMCI_SUCCESS_LAST_DETACH
    assert a.detach_status() == b.detach_status() == VMCI_ERROR_NOT_FOUND


def test_stream_counts_are_the_data_paths(make_mirrored, fd_guard):
    a = QueuePair.alloc(None, 100, 100, runtime=make_mirrored(2))
    assert a.stream_counts() == {"sendmsg": 0, "recvmsg": 0, "DATA": 0, "CREDIT": 0, "WANT": 0}
    assert a.enqueue(b"early") == 5                        # kept until the peer is there
    b = QueuePair.alloc(a.handle, 100, 100, runtime=make_mirrored(3))
    assert b.wait_for_data_status(WAIT) == 5 and b.dequeue(5) == b"early"
    assert a.enqueue(b"late") == 4
    assert b.wait_for_data_status(WAIT) == 4 and b.dequeue(4) == b"late"
    assert a.stream_counts()["DATA"] == 2 and a.stream_counts()["sendmsg"] >= 2
    assert b.stream_counts()["DATA"] == 0 and b.stream_counts()["recvmsg"] >= 2
    b.detach()
    a.detach()


def test_alloc_status_codes(two):
    rc, a = QueuePair.alloc_status(None, 10, 10, runtime=two[0])
    assert rc == VMCI_SUCCESS_QUEUEPAIR_CREATE
    assert QueuePair.alloc_status(a.handle, 11, 10, runtime=two[1]) == (VMCI_ERROR_QUEUEPAIR_MISMATCH, None)
    rc, b = QueuePair.alloc_status(a.handle, 10, 10, runtime=two[1])
    assert rc == VMCI_SUCCESS_QUEUEPAIR_ATTACH
    b.detach()
    a.detach()


def test_allocation_rules(make_mirrored, two):
    rt4 = make_mirrored(4)
    a = QueuePair.alloc(None, 10, 20, peer=3, runtime=two[0])
    with pytest.raises(QueuePairMismatch):
        QueuePair.alloc(a.handle, 10, 20, runtime=two[1])
    with pytest.raises(InvalidArgs):     # LOCAL attaches only to a LOCAL pair of its context
        QueuePair.alloc(a.handle, 20, 10, flags=VMCI_QPFLAG_LOCAL, runtime=two[1])
    with pytest.raises(NoAccess):
        QueuePair.alloc(a.handle, 20, 10, runtime=rt4)
    with pytest.raises(AlreadyExists):
        QueuePair.alloc(a.handle, 20, 10, runtime=two[0])
    b = QueuePair.alloc(a.handle, 20, 10, flags=VMCI_QPFLAG_ATTACH_ONLY, runtime=two[1])
    with pytest.raises(Unavailable):
        QueuePair.alloc(a.handle, 20, 10, runtime=two[1])
    with pytest.raises(NotFound):
        QueuePair.alloc((2, 5000), 20, 10, flags=VMCI_QPFLAG_ATTACH_ONLY, runtime=two[1])
    with pytest.raises(NotFound):
        QueuePair.alloc((5, 5000), 20, 10, runtime=two[1])
    b.detach()
    with pytest.raises(Unavailable):   # a detached pair takes no new attacher
        QueuePair.alloc(a.handle, 20, 10, runtime=two[1])
    a.detach()


def test_local_pairs_in_one_context(two):
    a = QueuePair.alloc(None, 10, 10, flags=VMCI_QPFLAG_LOCAL, runtime=two[0])
    with pytest.raises(InvalidArgs):
        QueuePair.alloc(a.handle, 10, 10, flags=VMCI_QPFLAG_LOCAL, runtime=two[1])
    with QueuePair.alloc(a.handle, 10, 10, flags=VMCI_QPFLAG_LOCAL, runtime=two[0]) as b:
        assert b.enqueue(b"local") == 5
        assert a.wait_for_data(WAIT) == 5 and a.dequeue(10) == b"local"
    a.detach()


def test_a_given_free_id_is_created(two):
    with QueuePair.alloc((2, 3000), 10, 10, runtime=two[0]) as a:
        assert a.created and a.handle == (2, 3000)


@pytest.mark.parametrize("args, exc", [
    ((None, 0, 0), InvalidArgs), ((None, -1, 10), InvalidArgs), ((None, 1.5, 10), InvalidArgs),
    ((None, 10, 10, VMCI_INVALID_ID, 0x100), InvalidArgs), ((None, 10, 10, -5), InvalidArgs),
    ((None, 1 << 27, 1), NoResources),
])
def test_bad_arguments(two, args, exc):
    with pytest.raises(exc):
        QueuePair.alloc(*args, runtime=two[0])


# Data and flow control

def test_capacity_partial_enqueue_and_codes(two):
    a, b = pair(two, produce=100, consume=50)
    assert a.produce_free_space() == 99 and b.produce_free_space() == 49
    assert a.enqueue(b"x" * 150) == 99
    assert a.enqueue_status(b"y") == VMCI_ERROR_QUEUEPAIR_NOSPACE
    with pytest.raises(QueuePairNoSpace):
        a.enqueue(b"y")
    assert a.produce_buf_ready() == 99 and a.produce_free_space() == 0
    assert b.wait_for_data(WAIT) > 0
    deadline = time.monotonic() + WAIT
    while b.consume_buf_ready() < 99:
        assert time.monotonic() < deadline
        b.wait_for_data(WAIT)
        time.sleep(0.001)
    assert b.consume_free_space() == 0
    assert b.peek(10) == b"x" * 10 and b.consume_buf_ready() == 99
    buf = bytearray(40)
    assert b.dequeue_into(buf) == 40 and buf == b"x" * 40
    assert a.wait_for_space(40, WAIT) == 40
    assert a.enqueue(b"z" * 41) == 40
    assert b.dequeue(59) == b"x" * 59
    assert a.wait_for_space(59, WAIT) == 59
    got = b""
    while len(got) < 40:
        b.wait_for_data(WAIT)
        got += b.dequeue(40)
    assert got == b"z" * 40
    assert b.dequeue_status(bytearray(10)) == VMCI_ERROR_QUEUEPAIR_NODATA
    with pytest.raises(QueuePairNoData):
        b.dequeue(10)
    assert b.wait_for_data_status(0.05) == VMCI_ERROR_TIMEOUT
    assert a.wait_for_space_status(0) == a.wait_for_space_status(100) == VMCI_ERROR_INVALID_ARGS
    with pytest.raises(BufferError):
        b.dequeue_into(b"readonly")
    with pytest.raises(InvalidArgs):
        b.dequeue(-1)
    b.detach()
    a.detach()


def test_enqueue_many_takes_whole_buffers(two):
    a, b = pair(two, produce=32, consume=32)
    assert a.enqueue_many([b"0123456789"] * 5) == 3
    assert a.enqueue_many_status([b"0123456789"]) == VMCI_ERROR_QUEUEPAIR_NOSPACE
    assert a.enqueue_many([b"a"]) == 1
    assert b.wait_for_data(WAIT) and b.peek_view(100).tobytes().startswith(b"0123456789")
    deadline = time.monotonic() + WAIT
    while b.consume_buf_ready() < 31:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert b.consume(30) == 30 and b.consume_status(2) == VMCI_ERROR_INVALID_ARGS
    assert b.dequeue(10) == b"a"
    b.detach()
    a.detach()


def test_bytes_enqueued_before_the_attach_are_delivered(two):
    a = QueuePair.alloc(None, 100, 100, runtime=two[0])
    assert a.enqueue(b"early") == 5 and a.produce_free_space() == 94
    b = QueuePair.alloc(a.handle, 100, 100, runtime=two[1])
    assert b.wait_for_data(WAIT) == 5 and b.dequeue(100) == b"early"
    assert b.enqueue(b"back") == 4
    assert a.wait_for_data(WAIT) == 4 and a.dequeue(100) == b"back"
    b.detach()
    a.detach()


def test_a_bulk_transfer_never_overruns_the_peer(two):
    """4 MiB both ways through 64 KiB queues: every byte arrives in order, and neither side
    ever holds more than its queue's capacity."""
    size, total = 1 << 16, 4 << 20
    a, b = pair(two, produce=size, consume=size)
    data = os.urandom(total)
    high = [0, 0]

    def produce(qp, side):
        sent = 0
        while sent < total:
            qp.wait_for_space(1, WAIT)
            sent += qp.enqueue(data[sent:sent + 100000])
            high[side] = max(high[side], qp.produce_buf_ready())

    def consume(qp, out):
        digest, got = hashlib.sha256(), 0
        buf = bytearray(50000)
        while got < total:
            qp.wait_for_data(WAIT)
            assert qp.consume_buf_ready() <= size - 1
            n = qp.dequeue_into(buf)
            digest.update(buf[:n])
            got += n
        out.append(digest.digest())

    results = []
    threads = [threading.Thread(target=produce, args=(a, 0)), threading.Thread(target=produce, args=(b, 1)),
               threading.Thread(target=consume, args=(a, results)),
               threading.Thread(target=consume, args=(b, results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [hashlib.sha256(data).digest()] * 2
    assert max(high) <= size - 1
    b.detach()
    a.detach()


def test_blocking_waits_sleep(two):
    a, b = pair(two)
    woke = []
    t = threading.Thread(target=lambda: woke.append(a.wait_for_data(WAIT)))
    t.start()
    time.sleep(0.2)
    assert not woke
    b.enqueue(b"wake")
    t.join(WAIT)
    assert woke == [4]
    b.detach()
    a.detach()


def test_waiters_in_several_threads(two):
    """Several threads wait on one end: one of them reads the stream itself, the others sleep
    on the condition; all see what arrives, and a detach of that end wakes every waiter."""
    a, b = pair(two)
    got = []
    threads = [threading.Thread(target=lambda: got.append(a.wait_for_data(WAIT))) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    assert not got
    b.enqueue(b"data")
    for t in threads:
        t.join(WAIT)
    assert got == [4, 4, 4] and a.dequeue(10) == b"data"
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(a.wait_for_data_status(None))) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    assert a.detach() == VMCI_SUCCESS
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert codes == [VMCI_ERROR_QUEUEPAIR_NOTATTACHED] * 3
    b.detach()


def test_frames_keep_coming_after_a_waiter_read_the_stream(two):
    """A waiter reads the stream itself; once it leaves, the reader thread takes the stream
    back, so a later detach of the peer reaches an ``events`` wait with no reader in sight."""
    a, b = pair(two)
    b.enqueue(b"data")
    assert a.wait_for_data(WAIT) == 4 and a.dequeue(10) == b"data"
    got = []
    t = threading.Thread(target=lambda: got.extend(a.events(WAIT)))
    t.start()
    time.sleep(0.2)
    b.detach()
    t.join(WAIT)
    assert got == [QPEvent(VMCI_EVENT_QP_PEER_DETACH, a.handle, 3)]
    a.detach()


# Detach and faults

def test_after_the_peer_detaches(two):
    a, b = pair(two)
    b.enqueue(b"last words")
    assert b.detach() == VMCI_SUCCESS
    assert a.events(WAIT) == [QPEvent(VMCI_EVENT_QP_PEER_DETACH, a.handle, 3)]
    assert a.enqueue_status(b"x") == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    assert a.wait_for_space_status(1, WAIT) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    assert a.dequeue(100) == b"last words"           # drained first
    assert a.dequeue_status(bytearray(10)) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    assert a.wait_for_data_status(WAIT) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    with pytest.raises(QueuePairNotAttached):
        a.dequeue(1)
    assert a.detach() == VMCI_SUCCESS_LAST_DETACH
    for qp in (a, b):
        assert qp.detached
        assert qp.enqueue_status(b"x") == qp.dequeue_status(bytearray(1)) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        with pytest.raises(QueuePairNotAttached):
            qp.produce_free_space()
        with pytest.raises(NotFound):
            qp.detach()


def test_a_creator_alone_detaches_last(two):
    a = QueuePair.alloc(None, 10, 10, runtime=two[0])
    assert a.detach() == VMCI_SUCCESS_LAST_DETACH


def spawn(rundir, core_name, mode, qp, *extra):
    h = qp.handle
    args = [sys.executable, "-c", CHILD, mode, str(h.context), str(h.resource),
            str(qp.consume_size), str(qp.produce_size)] + [str(x) for x in extra]
    return subprocess.Popen(args, env=child_env(rundir, core_name, cid=3, VSOCKCOMPAT_SHM_MODE="mirrored"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_echo_with_another_process(two, rundir, core):
    a = QueuePair.alloc(None, 4096, 4096, runtime=two[0])
    child = spawn(rundir, core.NAME, "echo", a)
    try:
        assert a.events(WAIT)[0].event == VMCI_EVENT_QP_PEER_ATTACH
        for i in range(50):
            msg = b"message %d" % i
            a.wait_for_space(len(msg), WAIT)
            a.enqueue(msg)
            got = b""
            while len(got) < len(msg):
                a.wait_for_data(WAIT)
                got += a.dequeue(100)
            assert got == msg.upper()
        a.enqueue(b"quit")
        out, err = child.communicate(timeout=WAIT)
        assert child.returncode == 0, err
        assert out.strip() == str(VMCI_SUCCESS)
        assert a.events(WAIT) == [QPEvent(VMCI_EVENT_QP_PEER_DETACH, a.handle, 3)]
    finally:
        child.kill()
        child.communicate()
        a.detach()


@pytest.mark.parametrize("mode", ["produce_forever", "consume_forever"])
def test_peer_killed_mid_transfer(two, rundir, core, mode):
    """SIGKILL the child mid-transfer: PEER_DETACH, what it sent is drained, clean errors, no hang."""
    a = QueuePair.alloc(None, 8192, 8192, runtime=two[0])
    child = spawn(rundir, core.NAME, mode, a)
    try:
        assert a.events(WAIT)[0].event == VMCI_EVENT_QP_PEER_ATTACH
        for _ in range(20):
            if mode == "produce_forever":
                a.wait_for_data(WAIT)
                a.dequeue(5000)
            else:
                a.wait_for_space(1, WAIT)
                a.enqueue(b"q" * 5000)
        child.send_signal(signal.SIGKILL)
        child.wait(WAIT)
        deadline = time.monotonic() + WAIT
        while True:
            assert time.monotonic() < deadline, "the survivor did not notice the dead peer"
            if mode == "produce_forever":
                rc = a.wait_for_data_status(WAIT)
                if rc > 0:
                    a.dequeue(rc)
                    continue
            else:
                rc = a.wait_for_space_status(1, WAIT)
                if rc > 0:
                    a.enqueue_status(b"q" * rc)
                    continue
            break
        assert rc == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        assert QPEvent(VMCI_EVENT_QP_PEER_DETACH, a.handle, 3) in a.events()
        assert a.enqueue_status(b"x") == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
        assert a.dequeue_status(bytearray(10)) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    finally:
        child.kill()
        child.communicate()
        assert a.detach() == VMCI_SUCCESS_LAST_DETACH


_RAW_NAMES = itertools.count()


def raw(rundir, handle, cid=3):
    """A hand-made peer, bound in context ``cid``'s directory as the library binds."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    os.makedirs(os.path.join(rundir, "c%d" % cid), exist_ok=True)
    name = os.path.join(rundir, "c%d" % cid, ".raw-%d" % next(_RAW_NAMES))
    sock.bind(name)
    os.unlink(name)
    sock.connect(os.path.join(rundir, "c%d" % handle.context, "%d.qst.sock" % handle.resource))
    return sock


def unbound_raw(rundir, handle):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.connect(os.path.join(rundir, "c%d" % handle.context, "%d.qst.sock" % handle.resource))
    return sock


def hello(produce, consume, flags=0, cid=3):
    import struct
    return W.encode(W.HELLO, 0, struct.pack("<QQII", produce, consume, flags, cid))


def drain(sock):
    got = b""
    while True:
        data = sock.recv(4096)
        if not data:
            return got
        got += data


@pytest.mark.parametrize("garbage", [b"garbage" * 10, W.encode(W.DATA, 0, b"x"), hello(1, 2)[:-3]],
                         ids=["text", "not-hello", "truncated"])
def test_garbage_before_the_attach_is_refused(two, rundir, garbage):
    a = QueuePair.alloc(None, 10, 20, runtime=two[0])
    with raw(rundir, a.handle) as sock:
        sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)
        drain(sock)
    deadline = time.monotonic() + WAIT
    while a.stats_bad_frames != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with QueuePair.alloc(a.handle, 20, 10, runtime=two[1]) as b:   # still serving
        assert b.enqueue(b"ok") == 2
        assert a.wait_for_data(WAIT) == 2
    a.detach()


@pytest.mark.parametrize("frame", [
    W.encode(W.DATA, 0, b"x" * 10),        # beyond the 9 bytes the queue holds
    W.encode(W.CREDIT, 1),                 # credit for bytes never sent
    W.encode(W.HELLO, 0, b""),             # out of turn
    b"\0" * 20,                            # not a frame
], ids=["overrun", "credit", "turn", "zeros"])
def test_a_misbehaving_peer_is_cut_off(two, rundir, frame):
    a = QueuePair.alloc(None, 10, 10, runtime=two[0])
    with raw(rundir, a.handle) as sock:
        sock.sendall(hello(10, 10))
        assert W.FrameReader().feed(sock.recv(100))[0].type == W.WELCOME
        sock.sendall(W.encode(W.DATA, 0, b"ok"))
        sock.sendall(frame)
        drain(sock)
    assert [e.event for e in a.events(WAIT)][-1] == VMCI_EVENT_QP_PEER_DETACH
    assert a.stats_bad_frames == 1
    assert a.dequeue(10) == b"ok"
    assert a.enqueue_status(b"x") == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    assert a.detach() == VMCI_SUCCESS_LAST_DETACH


def test_a_creator_that_sends_garbage_fails_the_attach(two, rundir):
    path = os.path.join(rundir, "c2", "4321.qst.sock")
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
        from vsockcompat.errors import Generic
        with pytest.raises(Generic):
            QueuePair.alloc((2, 4321), 10, 10, flags=VMCI_QPFLAG_ATTACH_ONLY, runtime=two[1])
        t.join()
    os.unlink(path)


def test_a_silent_connection_holds_up_nobody(two, rundir):
    a = QueuePair.alloc(None, 10, 10, runtime=two[0])
    with raw(rundir, a.handle) as silent:
        with QueuePair.alloc(a.handle, 10, 10, runtime=two[1]) as b:
            assert b.enqueue(b"through") == 7
            assert a.wait_for_data(WAIT) == 7
        silent.sendall(hello(10, 10))          # too late: the pair has its two ends
        reply = W.FrameReader().feed(drain(silent))
        assert [(f.type, W.decode_code(f.arg)) for f in reply] == [(W.REFUSE, VMCI_ERROR_UNAVAILABLE)]
    a.detach()


def test_credit_comes_when_asked(two):
    """Credit is returned a quarter of the queue at a time, or when the producer asks (it finds
    the queue full or waits for space): it never waits for credit the consumer owes."""
    a, b = pair(two, produce=1000, consume=1000)
    assert a.enqueue(b"x" * 2000) == 999
    deadline = time.monotonic() + WAIT
    while b.consume_buf_ready() < 999:
        assert time.monotonic() < deadline
        b.wait_for_data(WAIT)
        time.sleep(0.001)
    assert len(b.dequeue(100)) == 100          # owed 100: less than a quarter, queue not empty
    assert a.wait_for_space(100, WAIT) == 100  # a asks; b's reader answers
    assert a.enqueue(b"y" * 100) == 100
    assert len(b.dequeue(50)) == 50
    rc = a.enqueue_status(b"z")                # full as far as a knows: NOSPACE, and it asks
    assert rc == VMCI_ERROR_QUEUEPAIR_NOSPACE
    assert a.wait_for_space(50, WAIT) == 50
    b.detach()
    a.detach()


# Access control on the creator's side

def test_an_attacher_that_lies_about_its_context_is_refused(two, rundir):
    a = QueuePair.alloc(None, 100, 200, runtime=two[0])
    try:
        with unbound_raw(rundir, a.handle) as sock:
            sock.sendall(hello(200, 100))
            got = drain(sock)
        frame = W.HEADER.unpack(got[:W.HEADER.size])
        assert frame[1] == W.REFUSE and W.decode_code(frame[4]) == C.VMCI_ERROR_NO_ACCESS
        b = QueuePair.alloc(a.handle, 200, 100, runtime=two[1])
        b.detach()
    finally:
        a.detach()


def test_a_restricted_attacher_is_refused_by_the_creator(make_mirrored, rundir):
    with open(os.path.join(rundir, "policy.toml"), "w") as f:
        f.write('[contexts.3]\nflags = ["restricted"]\n')
    host, restricted = make_mirrored(2), make_mirrored(3)
    a = QueuePair.alloc(None, 100, 200, runtime=host)
    try:
        with pytest.raises(errors.NoAccess):
            QueuePair.alloc(a.handle, 200, 100, runtime=restricted)
    finally:
        a.detach()


class FakeVsockStream:
    """Stands for an AF_VSOCK socket (none is made on this machine): its buffer options."""
    family = C.AF_VSOCK

    def __init__(self, size=1 << 18, top=1 << 18):
        self.opts = {C.SO_VM_SOCKETS_BUFFER_SIZE: size, C.SO_VM_SOCKETS_BUFFER_MAX_SIZE: top}
        self.calls = []

    def getsockopt(self, level, name):
        assert level == C.AF_VSOCK
        return self.opts[name]

    def setsockopt(self, level, name, value):
        assert level == C.AF_VSOCK
        self.calls.append((name, value))
        if name == C.SO_VM_SOCKETS_BUFFER_SIZE and value > self.opts[C.SO_VM_SOCKETS_BUFFER_MAX_SIZE]:
            value = self.opts[C.SO_VM_SOCKETS_BUFFER_MAX_SIZE]   # as the kernel clamps it
        self.opts[name] = value


def test_hold_raises_the_vsock_buffer_to_the_queue_it_carries():
    from vsockcompat import mirror_link
    from vsockcompat.qp_stream import _kernel_buffer
    sock = FakeVsockStream()
    mirror_link.hold(sock, _kernel_buffer(1 << 18))
    want = (1 << 18) + (1 << 16)                     # the queue and a quarter for the headers
    assert sock.calls == [(C.SO_VM_SOCKETS_BUFFER_MAX_SIZE, want), (C.SO_VM_SOCKETS_BUFFER_SIZE, want)]
    small = FakeVsockStream(size=1 << 20, top=1 << 21)
    mirror_link.hold(small, _kernel_buffer(4096))    # never lowered
    assert small.calls == [] and small.opts[C.SO_VM_SOCKETS_BUFFER_SIZE] == 1 << 20
    a, b = socket.socketpair()
    with a, b:
        mirror_link.hold(a, 1 << 30)                 # not vsock: untouched
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < 1 << 30


def test_an_end_that_only_writes_still_answers_the_peers_want(two):
    """While the application only enqueues (never short of credit, so its writes do not read
    the stream), its reader thread still takes the peer's WANT within a tick or two."""
    a, b = pair(two, produce=1 << 20, consume=1000)
    assert b.enqueue(b"y" * 100) == 100
    assert a.wait_for_data(WAIT) == 100 and a.dequeue(100) == b"y" * 100   # 100 owed: < a quarter
    assert b.enqueue(b"z" * 1000) == 899 and b.produce_free_space() == 0
    stop = threading.Event()

    def write_only():
        while not stop.is_set():
            assert a.enqueue(b"w") == 1
            time.sleep(0.0005)

    writer = threading.Thread(target=write_only)
    writer.start()
    try:
        # A tick or two; far less than the time jitter takes to leave a tick without a write.
        assert b.wait_for_space(50, 2.0) == 100
    finally:
        stop.set()
        writer.join()
    assert a.produce_free_space() > 0
    b.detach()
    a.detach()
