"""The cores' ``QueueStream`` (the data path of streamed queue pairs, ``qp_stream``) over
socket pairs on this machine (never AF_VSOCK): framing, partial reads, credit, detach, the
peer going, bad frames, blocking waits, and the two cores on one stream."""
import os
import random
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsockcompat import mirror_wire as W
from vsockcompat._backend import load_core
from vsockcompat.constants import (
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_QUEUEPAIR_NODATA,
    VMCI_ERROR_QUEUEPAIR_NOSPACE,
    VMCI_ERROR_QUEUEPAIR_NOTATTACHED,
    VMCI_ERROR_TIMEOUT,
)

from conftest import CYTHON_AVAILABLE

pytestmark = pytest.mark.timeout(60)
WAIT = 10.0


class Bed:
    """Sockets and wake fds made by a test, closed at its end."""

    def __init__(self):
        self.socks = []
        self.wakes = {}  # QueueStream -> the write end of its wake fd

    def pair(self, kind=socket.SOCK_STREAM):
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        self.socks += [a, b]
        return a, b

    def wake(self):
        return self.pair()

    def stream(self, core, sock, produce=1000, consume=1000, **kw):
        sock.setblocking(False)
        r, w = self.wake()
        qs = core.QueueStream(sock, r.fileno(), produce, consume, **kw)
        self.wakes[qs] = w
        return qs

    def close(self):
        for s in self.socks:
            s.close()


@pytest.fixture
def bed():
    b = Bed()
    yield b
    b.close()


def ends(bed, core, other=None, produce=1000, consume=1000, **kw):
    """Two QueueStreams on one stream: ``core`` at a, ``other`` (default: the same) at b."""
    a, b = bed.pair()
    return (bed.stream(core, a, produce, consume, **kw),
            bed.stream(other or core, b, consume, produce, **kw))


def raw_end(bed, core, produce=1000, consume=1000, **kw):
    """A QueueStream and the raw (blocking) socket at the other end of its stream."""
    a, b = bed.pair()
    b.settimeout(WAIT)
    return bed.stream(core, a, produce, consume, **kw), b


def frames(data):
    return [(f.type, f.arg, bytes(f.payload)) for f in W.FrameReader().feed(data)]


def recv_exactly(sock, n):
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, "stream ended"
        got += chunk
    return got


# Writing: the frames on the wire

def test_a_write_is_one_data_frame(bed, core):
    qs, peer = raw_end(bed, core)
    assert qs.write(b"hello") == 5
    assert frames(recv_exactly(peer, W.HEADER.size + 5)) == [(W.DATA, 0, b"hello")]
    assert (qs.sent, qs.free, qs.pending) == (5, 994, 0)


def test_a_write_takes_what_fits_then_nospace_asks_once(bed, core):
    qs, peer = raw_end(bed, core, produce=10)
    assert qs.write(b"0123456789abc") == 9
    assert qs.write(b"x") == VMCI_ERROR_QUEUEPAIR_NOSPACE
    assert qs.write(b"x") == VMCI_ERROR_QUEUEPAIR_NOSPACE          # WANT already sent
    got = frames(recv_exactly(peer, 2 * W.HEADER.size + 9))
    assert got == [(W.DATA, 0, b"012345678"), (W.WANT, 0, b"")]
    peer.sendall(W.encode(W.CREDIT, 4))
    assert qs.wait_space(4, WAIT) == 4
    assert qs.write(b"wxyz!") == 4


def nothing_more(sock):
    """True when ``sock`` holds no byte now."""
    sock.setblocking(False)
    try:
        return not sock.recv(1)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(WAIT)


def test_a_write_short_of_credit_first_takes_the_credit_already_sent(bed, core):
    qs, peer = raw_end(bed, core, produce=10)
    assert qs.write(b"012345678") == 9
    peer.sendall(W.encode(W.CREDIT, 9))                # nobody pulled it
    assert qs.write(b"abcdefghij") == 9                # not cut to 0 / NOSPACE: no WANT
    assert qs.peer_consumed == 9 and qs.free == 0
    assert frames(recv_exactly(peer, 2 * W.HEADER.size + 18)) == [
        (W.DATA, 0, b"012345678"), (W.DATA, 0, b"abcdefghi")]
    assert nothing_more(peer)
    peer.sendall(W.encode(W.CREDIT, 13))
    assert qs.write_many([b"abc", b"d", b"e"]) == 2    # 4 free once the credit is read
    assert frames(recv_exactly(peer, W.HEADER.size + 4)) == [(W.DATA, 0, b"abcd")]
    assert nothing_more(peer)


def test_a_write_that_fits_leaves_the_stream_unread(bed, core):
    qs, peer = raw_end(bed, core, produce=100)
    assert qs.write(b"x" * 10) == 10
    peer.sendall(W.encode(W.CREDIT, 10))
    assert qs.write(b"y" * 10) == 10 and qs.peer_consumed == 0   # enough credit: no read
    assert qs.pull() == core.QS_CREDIT and qs.peer_consumed == 10


@pytest.mark.parametrize("end", [W.encode(W.BYE), b"", W.encode(W.CREDIT, 99)],
                         ids=["bye", "closed", "bad-credit"])
def test_a_write_short_of_credit_finds_the_peer_gone(bed, core, end):
    qs, peer = raw_end(bed, core, produce=10)
    assert qs.write(b"x" * 9) == 9
    if end:
        peer.sendall(end)
    else:
        peer.shutdown(socket.SHUT_WR)
    assert qs.write(b"y") == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    assert qs.write_many([b"y"]) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    assert qs.state == core.QS_GONE | (core.QS_BAD if end == W.encode(W.CREDIT, 99) else 0)
    assert qs.sent == 9


def test_any_contiguous_buffer_is_written_as_bytes(bed, core):
    import array
    qs, peer = raw_end(bed, core)
    assert qs.write(array.array("I", [1, 2])) == 8
    assert frames(recv_exactly(peer, W.HEADER.size + 8))[0][2] == struct.pack("=II", 1, 2)


def test_write_many_takes_whole_buffers(bed, core):
    qs, peer = raw_end(bed, core, produce=11)
    assert qs.write_many([]) == 0
    assert qs.write_many([b"abc", memoryview(b"defg"), bytearray(b"hijk")]) == 2
    assert frames(recv_exactly(peer, W.HEADER.size + 7)) == [(W.DATA, 0, b"abcdefg")]
    assert qs.write_many([b"0123"]) == VMCI_ERROR_QUEUEPAIR_NOSPACE   # 3 free
    assert qs.write_many([b"", b"xyz", b"!"]) == 2


def test_a_write_above_the_frame_limit_is_cut_into_frames(bed, core):
    size = W.MAX_PAYLOAD + 5
    qs, peer = raw_end(bed, core, produce=size + 1)
    data = os.urandom(size)
    t = threading.Thread(target=lambda: out.append(recv_exactly(peer, size + 2 * W.HEADER.size)))
    out = []
    t.start()
    assert qs.write(data) == size
    t.join(WAIT)
    got = frames(out[0])
    assert [len(p) for _, _, p in got] == [W.MAX_PAYLOAD, 5] and b"".join(p for _, _, p in got) == data


def test_max_send_bounds_each_send(bed, core):
    a, b = bed.pair(socket.SOCK_SEQPACKET)     # each send stays one packet: its size shows
    qs = bed.stream(core, a, 100000, 100000)
    assert qs.max_send == 0
    qs.max_send = 1000
    assert qs.write(b"y" * 2500) == 2500
    qs.ask()
    b.settimeout(WAIT)
    sizes, data = [], b""
    while len(data) < 2500 + 2 * W.HEADER.size:
        packet = b.recv(65536)
        sizes.append(len(packet))
        data += packet
    assert max(sizes) <= 1000 and sum(sizes) == len(data)
    assert frames(data) == [(W.DATA, 0, b"y" * 2500), (W.WANT, 0, b"")]


# Reading

def test_a_dequeue_reads_across_frames_and_pieces(bed, core):
    qs, peer = raw_end(bed, core)
    stream = W.encode(W.DATA, 0, b"abc") + W.encode(W.DATA, 0, b"") + W.encode(W.DATA, 0, b"defgh")
    buf = bytearray(100)
    got = b""
    for i in range(len(stream)):        # one byte at a time: headers and payloads in pieces
        peer.sendall(stream[i:i + 1])
        n = qs.read_into(buf)
        assert n == VMCI_ERROR_QUEUEPAIR_NODATA or n > 0
        got += bytes(buf[:max(n, 0)])
    assert got == b"abcdefgh" and qs.unread == 0


def test_one_read_takes_many_small_frames(bed, core):
    qs, peer = raw_end(bed, core, consume=1 << 16)
    stream = b"".join(W.encode(W.DATA, 0, bytes([i]) * 10) for i in range(50)) + W.encode(W.CREDIT, 0)
    peer.sendall(stream)
    assert qs.wait_data(WAIT) == 500             # one read: the 51 frames (read ahead)
    assert qs.counts["recvmsg"] == 1 and qs.ready == 500
    buf = bytearray(1000)
    assert qs.read_into(buf) == 500 and buf[:500] == b"".join(bytes([i]) * 10 for i in range(50))
    assert qs.counts["recvmsg"] == 2             # and one that finds the socket empty
    qs.read_ahead = 0                            # without: a read per header, as the frames come
    peer.sendall(stream)
    assert qs.wait_data(WAIT) == 10 and qs.read_into(buf) == 500
    assert qs.counts["recvmsg"] > 50


def test_a_read_takes_the_next_header_and_payload_with_the_rest(bed, core):
    qs, peer = raw_end(bed, core, consume=1 << 16)
    peer.sendall(W.encode(W.DATA, 0, b"a" * 3000) + W.encode(W.DATA, 0, b"b" * 3000))
    buf = bytearray(4000)
    assert qs.read_into(buf) == 4000 and buf == b"a" * 3000 + b"b" * 1000
    assert qs.counts["recvmsg"] == 1 and qs.ready == 2000 and qs.unread == 2000
    assert qs.read_bytes(5000) == b"b" * 2000


def test_read_ahead_across_the_end_of_the_ring(bed, core):
    """Frames parsed where the circular consume queue wraps: the bytes in order, whole."""
    qs, peer = raw_end(bed, core, consume=1 << 20)
    qs.read_ahead = 5000
    rng = random.Random(3)
    sent, out, buf = bytearray(), bytearray(), bytearray(7000)
    while len(sent) < 400000:
        chunk = b""
        for _ in range(rng.randrange(1, 8)):
            payload = os.urandom(rng.randrange(0, 3000))
            sent += payload
            chunk += W.encode(W.DATA, 0, payload) + (W.encode(W.CREDIT, 0) if rng.random() < 0.2 else b"")
        peer.sendall(chunk)
        assert not qs.pull() & core.QS_GONE
        n = qs.read_into(buf)
        out += buf[:max(n, 0)]
        assert qs.ready < 30000
    peer.shutdown(socket.SHUT_WR)
    while qs.wait_data(WAIT) > 0:
        out += buf[:qs.read_into(buf)]
    assert bytes(out) == bytes(sent) and qs.state == core.QS_GONE


_OPS = st.sampled_from(["into", "peek", "pull", "bytes"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=12),
       controls=st.lists(st.sampled_from([b"", W.encode(W.CREDIT, 0), W.encode(W.WANT)]), min_size=1),
       cuts=st.lists(st.integers(1, 400), min_size=1, max_size=20),
       ops=st.lists(_OPS, min_size=1, max_size=20), bufsize=st.integers(1, 700),
       ahead=st.sampled_from([0, 1, 7, 19, 20, 21, 64, 4096]))
def test_a_stream_cut_anywhere_parses_the_same(core, sizes, controls, cuts, ops, bufsize, ahead):
    """DATA and control frames, sent in pieces cut at any byte and read through any mix of
    dequeue, peek and pull, with any read-ahead: every payload byte once, in order. (No
    wait: it counts a frame whose header came as on its way, which these cuts make false.)"""
    a, b = socket.socketpair()
    r, w = socket.socketpair()
    try:
        a.setblocking(False)
        b.setblocking(False)
        qs = core.QueueStream(a, r.fileno(), 1000, 1 << 16)
        qs.read_ahead = ahead
        payload = b"".join(bytes((i + j) % 251 for j in range(n)) for i, n in enumerate(sizes))
        stream, pos = b"", 0
        for i, n in enumerate(sizes):
            stream += W.encode(W.DATA, 0, payload[pos:pos + n]) + controls[i % len(controls)]
            pos += n
        out, buf = bytearray(), bytearray(bufsize)
        for i in range(0, 1 << 30):
            start = sum(cuts[k % len(cuts)] for k in range(i))
            if start >= len(stream):
                break
            piece = stream[start:start + cuts[i % len(cuts)]]
            while piece:
                try:
                    piece = piece[b.send(piece):]
                except BlockingIOError:      # the socket holds many small pieces: read some
                    big = bytearray(1 << 16)
                    out += big[:max(qs.read_into(big), 0)]
            op = ops[i % len(ops)]
            if op == "into":
                n = qs.read_into(buf)
                out += buf[:max(n, 0)]
            elif op == "peek":
                n = qs.read_into(buf, False)
                assert n < 0 or payload[len(out):len(out) + n] == buf[:n]
            elif op == "pull":
                assert not qs.pull() & core.QS_GONE
            else:
                got = qs.read_bytes(bufsize)
                out += got if isinstance(got, bytes) else b""
        b.shutdown(socket.SHUT_WR)
        while qs.wait_data(WAIT) > 0:
            out += buf[:max(qs.read_into(buf), 0)]
        assert bytes(out) == payload and qs.state == core.QS_GONE
    finally:
        for sock in (a, b, r, w):
            sock.close()


def test_a_short_buffer_leaves_the_rest(bed, core):
    qs, peer = raw_end(bed, core)
    peer.sendall(W.encode(W.DATA, 0, b"0123456789"))
    buf = bytearray(4)
    assert qs.wait_data(WAIT) == 10
    assert [qs.read_into(buf) for _ in range(2)] == [4, 4] and buf == b"4567"
    assert qs.read_into(buf) == 2 and buf[:2] == b"89"
    assert qs.read_into(buf) == VMCI_ERROR_QUEUEPAIR_NODATA


def test_peek_and_read_bytes_and_consume(bed, core):
    qs, peer = raw_end(bed, core)
    peer.sendall(W.encode(W.DATA, 0, b"abcdef"))
    assert qs.wait_data(WAIT) == 6
    buf = bytearray(3)
    assert qs.read_into(buf, False) == 3 and buf == b"abc"
    assert qs.read_bytes(4, False) == b"abcd" and qs.ready >= 4
    assert qs.consume(7) == VMCI_ERROR_INVALID_ARGS
    assert qs.consume(2) == 2
    assert qs.read_bytes(10) == b"cdef"
    assert qs.read_bytes(1) == VMCI_ERROR_QUEUEPAIR_NODATA
    assert qs.read_bytes(-1) == VMCI_ERROR_INVALID_ARGS


def test_pull_fills_the_consume_queue_and_reports(bed, core):
    qs, peer = raw_end(bed, core)
    assert qs.pull() == 0
    peer.sendall(W.encode(W.DATA, 0, b"xy"))
    deadline = time.monotonic() + WAIT
    news = 0
    while not news & core.QS_DATA:
        assert time.monotonic() < deadline
        news |= qs.pull()
    assert qs.ready == 2 and qs.pull() == 0
    assert qs.write(b"12345") == 5
    peer.sendall(W.encode(W.CREDIT, 5))
    while not news & core.QS_CREDIT:
        assert time.monotonic() < deadline
        news |= qs.pull()
    assert qs.peer_consumed == 5 and qs.free == 999


# Credit

def test_credit_goes_back_per_quarter_queue(bed, core):
    qs, peer = raw_end(bed, core, consume=400)
    peer.sendall(W.encode(W.DATA, 0, b"a" * 300))
    buf = bytearray(99)
    assert qs.wait_data(WAIT) == 300
    assert qs.read_into(buf) == 99                   # 99 * 4 < 400: nothing owed yet
    assert qs.read_into(bytearray(1)) == 1           # 100: a quarter
    assert frames(recv_exactly(peer, W.HEADER.size)) == [(W.CREDIT, 100, b"")]
    assert qs.read_into(bytearray(200)) == 200
    assert frames(recv_exactly(peer, W.HEADER.size)) == [(W.CREDIT, 300, b"")]
    peer.sendall(W.encode(W.DATA, 0, b"b" * 5) + W.encode(W.WANT))
    assert qs.wait_data(WAIT) == 5 and qs.read_into(bytearray(5)) == 5
    qs.pull()                                        # the WANT read (if not yet): what is owed goes at once
    assert frames(recv_exactly(peer, W.HEADER.size)) == [(W.CREDIT, 305, b"")]


def test_a_want_is_answered_by_the_reader_of_the_stream(bed, core):
    qs, peer = raw_end(bed, core, consume=1000)
    peer.sendall(W.encode(W.DATA, 0, b"z" * 10))
    assert qs.wait_data(WAIT) == 10 and qs.read_into(bytearray(10)) == 10   # owed 10: kept
    peer.sendall(W.encode(W.WANT))
    deadline = time.monotonic() + WAIT
    while qs.pull() == 0:
        assert time.monotonic() < deadline
    assert frames(recv_exactly(peer, W.HEADER.size)) == [(W.CREDIT, 10, b"")]


def test_flow_control_between_two_ends(bed, core):
    a, b = ends(bed, core, produce=100, consume=100)
    assert a.write(b"x" * 150) == 99 and a.write(b"x") == VMCI_ERROR_QUEUEPAIR_NOSPACE
    assert b.wait_data(WAIT) == 99 and b.read_into(bytearray(30)) == 30
    assert a.wait_space(30, WAIT) == 30
    assert a.write(b"y" * 40) == 30


# Blocking waits

def test_waits_time_out(bed, core):
    a, b = ends(bed, core, produce=10)
    start = time.monotonic()
    assert b.wait_data(0.05) == VMCI_ERROR_TIMEOUT
    assert a.write(b"x" * 9) == 9
    assert a.wait_space(1, 0.05) == VMCI_ERROR_TIMEOUT
    assert time.monotonic() - start >= 0.09
    assert a.wait_space(0) == VMCI_ERROR_INVALID_ARGS


def waiting(call):
    """``call()`` started in a thread: ``(thread, results)``, the result appended once it returns."""
    got = []
    t = threading.Thread(target=lambda: got.append(call()))
    t.start()
    return t, got


def test_a_wait_after_an_empty_dequeue_sees_what_came_since(bed, core):
    qs, peer = raw_end(bed, core)
    assert qs.read_into(bytearray(10)) == VMCI_ERROR_QUEUEPAIR_NODATA      # the socket: empty
    peer.sendall(W.encode(W.DATA, 0, b"late"))
    assert qs.wait_data(0) == 4                        # no sleep asked for: it reads first
    assert qs.read_into(bytearray(10)) == 4
    assert qs.read_into(bytearray(10)) == VMCI_ERROR_QUEUEPAIR_NODATA
    peer.sendall(W.encode(W.DATA, 0, b"later"))
    assert qs.wait_data(WAIT) == 5                     # it polls first: the bytes are there
    assert qs.read_bytes(10) == b"later"
    assert qs.wait_data(0.05) == VMCI_ERROR_TIMEOUT


def test_a_wait_sleeps_until_data_and_counts_the_frame(bed, core):
    qs, peer = raw_end(bed, core)
    t, got = waiting(lambda: qs.wait_data(WAIT))
    time.sleep(0.1)
    assert t.is_alive()
    peer.sendall(W.encode(W.DATA, 0, b"0123456789")[:W.HEADER.size + 3])   # the header and 3 bytes
    t.join(WAIT)
    assert got == [10]                       # the frame's bytes are on their way
    threading.Timer(0.1, lambda: peer.sendall(b"3456789")).start()
    buf = bytearray(100)
    assert qs.read_into(buf) == 10 and buf[:10] == b"0123456789"   # waits for the promised rest


def test_the_wake_fd_ends_a_wait(bed, core):
    qs, _peer = raw_end(bed, core)
    t, got = waiting(lambda: qs.wait_data(None))
    time.sleep(0.1)
    assert not qs.close()                    # a thread sleeps inside: nothing freed
    bed.wakes[qs].send(b"\0")
    t.join(WAIT)
    assert got == [core.WAKE]
    assert qs.close()


def test_a_waiter_wakes_when_another_thread_reads_its_bytes(bed, core):
    """Two threads on one end: one waits for data while the other, waiting for space, takes
    the stream's bytes into the consume queue; the first is woken (the kick pipe)."""
    a, b = ends(bed, core, produce=100, consume=100)
    assert b.write(b"q" * 99) == 99
    t, got = waiting(lambda: a.wait_data(WAIT))
    assert b.wait_space(1, 0.2) == VMCI_ERROR_TIMEOUT
    t.join(WAIT)
    assert got and got[0] > 0


def test_a_blocked_write_finishes_once_the_peer_reads(bed, core):
    size = 4 << 20
    a, b = ends(bed, core, produce=size + 1, consume=size + 1)
    data = os.urandom(size)
    out = bytearray()

    def read():
        buf = bytearray(1 << 16)
        while len(out) < size:
            if b.wait_data(WAIT) < 0:
                return
            n = b.read_into(buf)
            out.extend(buf[:max(n, 0)])
    t = threading.Thread(target=read)
    t.start()
    assert a.write(data) == size and a.pending == 0
    t.join(WAIT)
    assert bytes(out) == data


def test_a_peer_that_never_reads_is_given_up_after_the_send_timeout(bed, core):
    qs, peer = raw_end(bed, core, produce=8 << 20, send_timeout=0.2)
    assert qs.write(b"s" * (4 << 20)) == 4 << 20      # reserved; the rest stays unsendable
    assert qs.state == core.QS_GONE
    assert qs.write(b"x") == VMCI_ERROR_QUEUEPAIR_NOTATTACHED


# Detach and the peer going

def test_bye_follows_the_data_and_ends_the_peer(bed, core):
    a, b = ends(bed, core)
    assert a.write(b"last") == 4
    assert a.bye() == 0
    assert a.write(b"x") == a.read_into(bytearray(1)) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    assert b.wait_data(WAIT) == 4 and b.read_bytes(10) == b"last"
    assert b.wait_data(WAIT) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    assert b.state == core.QS_GONE
    assert b.write(b"x") == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    assert a.close() and b.close()
    assert a.read_bytes(1) == b.read_into(bytearray(1)) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED


def test_a_peer_gone_without_bye(bed, core):
    qs, peer = raw_end(bed, core)
    peer.sendall(W.encode(W.DATA, 0, b"ok"))
    peer.close()
    assert qs.wait_data(WAIT) == 2 and qs.read_bytes(2) == b"ok"
    assert qs.wait_data(WAIT) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    assert qs.state == core.QS_GONE and qs.wait_space(1, WAIT) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED


@pytest.mark.parametrize("bad,cut", [
    (W.encode(W.DATA, 0, b"x" * 10), b""),             # beyond the 9 bytes left
    (W.encode(W.CREDIT, 1), b""),                      # credit for bytes never sent
    (W.encode(W.HELLO, 0, b""), b""),                  # out of turn
    (W.encode(W.WANT, 0, b"p"), b""),                  # a control frame with a payload
    (b"\0" * W.HEADER.size, b""),                      # not a frame
    (struct.pack("<IBBHQI", W.MAGIC, W.DATA, 1, 0, 0, 0), b""),      # reserved bits set
    (struct.pack("<IBBHQI", W.MAGIC, W.DATA, 0, 0, 0, W.MAX_PAYLOAD + 1), b""),
    (W.encode(W.DATA, 0, b"abc")[:-1], b"ab"),         # cut inside a frame: what came is data
    (W.encode(W.DATA, 0, b"abc")[:7], b""),            # cut inside a header
], ids=["overrun", "credit", "turn", "payload", "zeros", "reserved", "oversized", "cut", "cut-header"])
def test_a_bad_frame_cuts_the_peer_off(bed, core, bad, cut):
    qs, peer = raw_end(bed, core, consume=12)
    peer.sendall(W.encode(W.DATA, 0, b"ok") + bad)
    peer.shutdown(socket.SHUT_WR)
    # one read takes it all (read ahead); a cut frame's announced rest counts until the end shows
    assert qs.wait_data(WAIT) == (5 if cut else 2)
    assert qs.read_bytes(5) == b"ok" + cut
    assert qs.read_into(bytearray(4)) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    assert qs.state == core.QS_GONE | core.QS_BAD
    assert qs.wait_data(WAIT) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED


def test_credit_going_backwards_is_a_bad_frame(bed, core):
    qs, peer = raw_end(bed, core)
    assert qs.write(b"12345") == 5
    peer.sendall(W.encode(W.CREDIT, 4) + W.encode(W.CREDIT, 3))
    assert qs.wait_space(999, WAIT) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    assert qs.state == core.QS_GONE | core.QS_BAD and qs.peer_consumed == 4


# Bad input

def test_bad_arguments(bed, core):
    a, _ = bed.pair()
    r, _w = bed.wake()
    for size in (-1, 1 << 64):
        with pytest.raises(OverflowError):
            core.QueueStream(a, r.fileno(), size, 10)
    with pytest.raises(TypeError):
        core.QueueStream(a, r.fileno(), "10", 10)
    qs = bed.stream(core, a)
    with pytest.raises(BufferError):
        qs.read_into(b"read-only")
    with pytest.raises(TypeError):
        qs.write("text")
    with pytest.raises(TypeError):
        qs.write_many([b"ok", 5])
    assert qs.wait_space(0, 0) == VMCI_ERROR_INVALID_ARGS


def test_zero_size_queues_hold_nothing(bed, core):
    a, b = ends(bed, core, produce=0, consume=0)
    assert a.free == 0 and a.write(b"x") == VMCI_ERROR_QUEUEPAIR_NOSPACE
    assert b.wait_data(0.05) == VMCI_ERROR_TIMEOUT


# The two cores on one stream

@pytest.mark.skipif(not CYTHON_AVAILABLE, reason="the Cython core is not built (pure install)")
@pytest.mark.parametrize("writer,reader", [("cython", "pure"), ("pure", "cython")], ids=["c-py", "py-c"])
def test_the_cores_interoperate(bed, writer, reader):
    wcore, rcore = load_core(writer), load_core(reader)
    size = 1 << 14
    a, b = ends(bed, wcore, rcore, produce=size, consume=size)
    rng = random.Random(7)
    data = os.urandom(1 << 20)
    out = bytearray()
    t = threading.Thread(target=lambda: _read_all(b, out, len(data)))
    t.start()
    pos = 0
    while pos < len(data):
        k = rng.choice((1, 7, 100, 4096, 20000))
        n = a.write(data[pos:pos + k])
        if n == VMCI_ERROR_QUEUEPAIR_NOSPACE:
            assert a.wait_space(1, WAIT) > 0
            continue
        assert n > 0
        pos += n
    assert a.bye() == 0
    t.join(WAIT)
    assert bytes(out) == data and b.wait_data(WAIT) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED


def _read_all(qs, out, total):
    """Dequeue into ``out`` until it holds ``total`` bytes or the stream ends."""
    buf = bytearray(5000)
    while len(out) < total:
        if qs.wait_data(WAIT) < 0:
            return
        n = qs.read_into(buf)
        if n > 0:
            out.extend(buf[:n])


def test_counts_report_the_system_calls_and_the_frames_sent(bed, core):
    qs, peer = raw_end(bed, core, produce=10, consume=8)
    assert qs.counts == {"sendmsg": 0, "recvmsg": 0, "DATA": 0, "CREDIT": 0, "WANT": 0}
    assert qs.write(b"0123") == 4                          # one frame, one sendmsg, no read
    assert qs.counts == {"sendmsg": 1, "recvmsg": 0, "DATA": 1, "CREDIT": 0, "WANT": 0}
    assert qs.write_many([b"ab", b"cd", b"e"]) == 3        # one frame of three buffers
    assert qs.write(b"xyz") == VMCI_ERROR_QUEUEPAIR_NOSPACE  # the credit read first (empty), then WANT
    after = qs.counts
    assert (after["sendmsg"], after["DATA"], after["WANT"], after["CREDIT"]) == (3, 2, 1, 0)
    assert after["recvmsg"] >= 1
    assert frames(recv_exactly(peer, 3 * W.HEADER.size + 9)) == [
        (W.DATA, 0, b"0123"), (W.DATA, 0, b"abcde"), (W.WANT, 0, b"")]
    peer.sendall(W.encode(W.DATA, 0, b"12") + W.encode(W.DATA, 0, b"345"))
    buf = bytearray(8)
    assert qs.read_into(buf) == 5                          # 5 of 8: a quarter is owed, CREDIT
    assert qs.counts["CREDIT"] == 1 and qs.counts["recvmsg"] > after["recvmsg"]
    assert frames(recv_exactly(peer, W.HEADER.size)) == [(W.CREDIT, 5, b"")]
    qs.counts["DATA"] = 99                                 # a copy: the counts are not changed
    assert qs.counts["DATA"] == 2
