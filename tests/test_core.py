"""The data-plane cores: frame codec, queue account, send/recv fast paths.

Each test runs on both cores; the interop tests pair a sender of one core
with a receiver of the other on one socket and one account page.
"""
import json
import mmap
import os
import select
import socket
import tempfile
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CYTHON_AVAILABLE
from vsockcompat._backend import load_core
from vsockcompat.constants import (
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_NO_RESOURCES,
    VMCI_MAX_DATAGRAM_QUEUE_SIZE,
    VMCI_MAX_DG_PAYLOAD_SIZE,
)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "datagram_frames.json")
u32 = st.integers(0, 0xFFFFFFFF)

with open(GOLDEN) as f:
    FRAMES = json.load(f)

both_cores = pytest.mark.skipif(not CYTHON_AVAILABLE, reason="the Cython core is not built")


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


class Page:
    """An account page in a real file (senders flock it), closed at teardown."""

    def __init__(self, core, limit=VMCI_MAX_DATAGRAM_QUEUE_SIZE):
        self.fd, self.path = tempfile.mkstemp(prefix="vscacct")
        os.ftruncate(self.fd, core.ACCOUNT_SIZE)
        self.map = mmap.mmap(self.fd, core.ACCOUNT_SIZE)
        self.accounts = []
        self.account(core).initialise(limit)

    def account(self, core):
        account = core.Account(self.fd, self.map)
        self.accounts.append(account)
        return account

    def close(self):
        for account in self.accounts:
            account.release_memory()
        self.map.close()
        os.close(self.fd)
        os.unlink(self.path)


@pytest.fixture
def page(core):
    p = Page(core)
    yield p
    p.close()


@pytest.mark.parametrize("case", FRAMES, ids=lambda c: c["payload"][:8] or "empty")
def test_encode_matches_golden_frames(core, case):
    payload = bytes.fromhex(case["payload"])
    assert core.encode_datagram(*case["dst"], *case["src"], payload).hex() == case["frame"]
    assert core.encode_header(*case["dst"], *case["src"], len(payload)).hex() == case["frame"][:48]


@pytest.mark.parametrize("case", FRAMES, ids=lambda c: c["payload"][:8] or "empty")
def test_decode_golden_frames(core, case):
    frame = bytes.fromhex(case["frame"])
    assert core.decode_header(frame) == (*case["dst"], *case["src"], len(case["payload"]) // 2)


def test_decode_rejects_a_short_header(core):
    with pytest.raises(ValueError, match="24 bytes"):
        core.decode_header(b"\0" * 23)


@pytest.mark.parametrize("bad", [-1, 2**32])
def test_encode_rejects_ids_out_of_range(core, bad):
    with pytest.raises(OverflowError):
        core.encode_header(bad, 0, 0, 0, 0)
    with pytest.raises(OverflowError):
        core.encode_datagram(0, 0, 0, bad, b"")


@settings(max_examples=200, deadline=None)
@given(u32, u32, u32, u32, st.binary(max_size=300))
def test_codec_round_trip_and_cores_agree(dc, dr, sc, sr, payload):
    frames = set()
    for name in ("cython", "pure") if CYTHON_AVAILABLE else ("pure",):
        core = load_core(name)
        frame = core.encode_datagram(dc, dr, sc, sr, payload)
        assert core.decode_header(frame) == (dc, dr, sc, sr, len(payload))
        assert frame[24:] == payload
        frames.add(frame)
    assert len(frames) == 1


def test_account_starts_empty_and_closes(core, page):
    account = page.accounts[0]
    assert account.is_valid()
    assert account.limit == VMCI_MAX_DATAGRAM_QUEUE_SIZE
    assert account.queued() == 0 and not account.closed
    account.mark_closed()
    assert account.closed


def test_account_rejects_a_short_page(core):
    with pytest.raises(ValueError):
        core.Account(0, bytearray(16))


def test_account_of_foreign_bytes_is_not_valid(core):
    account = core.Account(0, bytearray(core.ACCOUNT_SIZE))
    try:
        assert not account.is_valid()
    finally:
        account.release_memory()


def test_send_and_receive_one_datagram(core, page, pair):
    a, b = pair
    account = page.accounts[0]
    assert core.send_datagram(a, account, 2, 1025, 3, 1024, b"hello!", 5) == 29
    assert account.queued() == 29
    buf, spill = bytearray(16), bytearray(VMCI_MAX_DG_PAYLOAD_SIZE + 1)
    status, fields = core.recv_datagram(b, account, buf, spill)
    assert (status, fields) == (29, (2, 1025, 3, 1024, 5))
    assert bytes(buf[:5]) == b"hello"
    assert account.queued() == 0
    assert core.recv_datagram(b, account, buf, spill) == (core.AGAIN, None)


def test_payload_larger_than_buffer_spills_without_loss(core, page, pair):
    a, b = pair
    account = page.accounts[0]
    payload = bytes(range(200))
    core.send_datagram(a, account, 1, 2, 3, 4, payload, len(payload))
    buf, spill = bytearray(50), bytearray(VMCI_MAX_DG_PAYLOAD_SIZE + 1)
    status, fields = core.recv_datagram(b, account, buf, spill)
    assert status == 224 and fields[4] == 200
    assert bytes(buf) + bytes(spill[:150]) == payload


def test_queue_bound_is_exact(core, page, pair):
    a, b = pair
    account = page.accounts[0]
    big = bytes(VMCI_MAX_DG_PAYLOAD_SIZE)
    assert core.send_datagram(a, account, 1, 2, 3, 4, big, len(big)) == 69632
    # A second maximal datagram would make the queue reach 139,264 bytes: refused.
    assert core.send_datagram(a, account, 1, 2, 3, 4, big, len(big)) == VMCI_ERROR_NO_RESOURCES
    room = VMCI_MAX_DATAGRAM_QUEUE_SIZE - 69632 - 1 - 24
    assert core.send_datagram(a, account, 1, 2, 3, 4, big, room) == room + 24
    assert account.queued() == VMCI_MAX_DATAGRAM_QUEUE_SIZE - 1
    assert core.send_datagram(a, account, 1, 2, 3, 4, b"", 0) == VMCI_ERROR_NO_RESOURCES


@pytest.mark.parametrize("length", [-1, 6, VMCI_MAX_DG_PAYLOAD_SIZE + 1])
def test_send_rejects_bad_lengths(core, page, pair, length):
    a, _ = pair
    payload = b"x" * 5 if length != VMCI_MAX_DG_PAYLOAD_SIZE + 1 else bytes(length)
    assert core.send_datagram(a, page.accounts[0], 1, 2, 3, 4, payload, length) == VMCI_ERROR_INVALID_ARGS
    assert page.accounts[0].queued() == 0


def test_send_to_a_closed_account_reports_peer_gone(core, page, pair):
    a, _ = pair
    page.accounts[0].mark_closed()
    assert core.send_datagram(a, page.accounts[0], 1, 2, 3, 4, b"x", 1) == core.PEER_GONE


def test_send_after_the_peer_closed_reports_peer_gone_and_rolls_back(core, page, pair):
    a, b = pair
    b.close()
    assert core.send_datagram(a, page.accounts[0], 1, 2, 3, 4, b"x", 1) == core.PEER_GONE
    assert page.accounts[0].queued() == 0


@pytest.mark.parametrize("raw", [b"short", (b"\0" * 16) + (99).to_bytes(8, "little") + b"abc"])
def test_malformed_frames_are_reported(core, page, pair, raw):
    a, b = pair
    a.send(raw)
    buf, spill = bytearray(64), bytearray(VMCI_MAX_DG_PAYLOAD_SIZE + 1)
    assert core.recv_datagram(b, page.accounts[0], buf, spill) == (core.BAD_FRAME, None)


def test_orderly_close_is_peer_gone(core, page, pair):
    a, b = pair
    a.close()
    buf, spill = bytearray(64), bytearray(VMCI_MAX_DG_PAYLOAD_SIZE + 1)
    assert core.recv_datagram(b, page.accounts[0], buf, spill) == (core.PEER_GONE, None)


@both_cores
@pytest.mark.parametrize("sender,receiver", [("cython", "pure"), ("pure", "cython")])
def test_cores_interoperate_on_one_socket_and_account(pair, sender, receiver):
    tx, rx = load_core(sender), load_core(receiver)
    page = Page(tx)
    try:
        a, b = pair
        tx_account, rx_account = page.account(tx), page.account(rx)
        buf, spill = bytearray(4096), bytearray(VMCI_MAX_DG_PAYLOAD_SIZE + 1)
        for i in range(50):
            payload = bytes([i]) * (i * 37)
            assert tx.send_datagram(a, tx_account, 2, 7, 3, 9, payload, len(payload)) == 24 + len(payload)
            assert rx_account.queued() == 24 + len(payload)
            status, fields = rx.recv_datagram(b, rx_account, buf, spill)
            assert fields == (2, 7, 3, 9, len(payload)) and bytes(buf[: len(payload)]) == payload
            assert tx_account.queued() == 0
    finally:
        page.close()


def test_link_sends_until_closed(core, page, pair):
    a, b = pair
    link = core.Link(a, page.accounts[0], 2, 7, 3, 9)
    assert link.send(b"abc", 3) == 27
    assert link.send(b"abc", 4) == VMCI_ERROR_INVALID_ARGS
    link.close()
    assert link.send(b"abc", 3) == core.PEER_GONE
    buf, spill = bytearray(8), bytearray(VMCI_MAX_DG_PAYLOAD_SIZE + 1)
    assert core.recv_datagram(b, page.accounts[0], buf, spill) == (27, (2, 7, 3, 9, 3))


@both_cores
def test_the_account_lock_excludes_across_cores_and_threads(tmp_path):
    import threading
    cy, py = load_core("cython"), load_core("pure")
    page = Page(py, limit=1 << 20)
    socks = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(4)]
    try:
        links = [core.Link(s[0], page.account(core), 1, 2, 3, 4)
                 for core, s in zip((cy, py, cy, py), socks)]
        for a, _ in socks:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
        sent = [0] * 4

        def flood(i):
            for _ in range(300):
                if links[i].send(b"x" * 100, 100) > 0:
                    sent[i] += 1

        threads = [threading.Thread(target=flood, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # Every reservation was counted exactly once: no update was lost between cores.
        assert page.accounts[0].queued() == sum(sent) * 124 == 4 * 300 * 124
    finally:
        for a, b in socks:
            a.close()
            b.close()
        page.close()


HOLD_LOCK_AND_DIE = """
import mmap, os, sys
from vsockcompat import _pure
fd = os.open(sys.argv[1], os.O_RDWR)
account = _pure.Account(fd, mmap.mmap(fd, _pure.ACCOUNT_SIZE))
assert _pure._acquire(account.lock) == 0
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("by", ["send_datagram", "link"])
def test_a_lock_holder_that_dies_does_not_wedge_senders(core, page, pair, by):
    import subprocess
    import sys
    from conftest import PACKAGE_PARENT
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK_AND_DIE, page.path], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=PACKAGE_PARENT))
    try:
        assert child.stdout.readline() == "locked\n"
        child.kill()
        child.wait(10)
    finally:
        child.stdin.close()
        child.stdout.close()
    a, _ = pair
    if by == "link":  # the pure Link's trylock finds the dead holder (EOWNERDEAD) itself
        assert core.Link(a, page.accounts[0], 1, 2, 3, 4).send(b"alive", 5) == 29
    else:
        assert core.send_datagram(a, page.accounts[0], 1, 2, 3, 4, b"alive", 5) == 29
    assert page.accounts[0].queued() == 29


def test_a_link_send_waits_for_the_account_lock_another_thread_holds(core, page, pair):
    """The pure Link tries the lock first holding the GIL; when it is busy it must wait for it
    with the GIL released (the holder here is a thread of the same process)."""
    from vsockcompat import _pure
    a, b = pair
    holder = page.account(load_core("pure"))  # the same mutex, whichever core's account page.accounts[0] is
    link = core.Link(a, page.accounts[0], 1, 2, 3, 4)
    assert _pure._acquire(holder.lock) == 0
    result = []
    sender = threading.Thread(target=lambda: result.append(link.send(b"after", 5)))
    try:
        sender.start()
        sender.join(0.2)
        assert result == [] and page.accounts[0].queued() == 0, "sent while another thread held the lock"
        assert not select.select([b], [], [], 0)[0]
    finally:
        _pure._mutex_unlock(holder.lock)
        sender.join(10)
    assert result == [29] and page.accounts[0].queued() == 29
    assert b.recv(100) == core.encode_datagram(1, 2, 3, 4, b"after")


def test_a_frame_over_the_sdk_maximum_is_bad(core, page, pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    payload = bytes(VMCI_MAX_DG_PAYLOAD_SIZE + 1)
    a.send(core.encode_header(1, 2, 3, 4, len(payload)) + payload)
    buf, spill = bytearray(64), bytearray(VMCI_MAX_DG_PAYLOAD_SIZE + 1)
    assert core.recv_datagram(b, page.accounts[0], buf, spill) == (core.BAD_FRAME, None)


# The receiver (vsc_rx / Receiver): what DatagramEndpoint.recv_status gets in one call.

ACL_EPOCH_WORD = 7  # VSC_ACCT_OFF_ACL_EPOCH / 8


class Rx:
    """A Receiver of one core over a page, a listener, a wake pipe and one sender connection
    (blocking, as endpoints accept them, so that the receiver may read it hot)."""

    def __init__(self, core, page, tmp_path, sender_core=None, blocking=True, tag="tag-3"):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(tmp_path / "listener"))
        self.listener.listen(4)
        self.listener.setblocking(False)
        self.wake_r, self.wake_w = os.pipe()
        self.account = page.account(core)
        self.rx = core.Receiver(self.listener, self.wake_r, self.account, 2, 1025)
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.b.setblocking(blocking)
        self.a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
        self.rx.add(self.b, 3, 1024, tag)
        self.link = (sender_core or core).Link(self.a, page.account(sender_core or core), 2, 1025, 3, 1024)
        self.words = memoryview(page.map).cast("Q")
        self.buf, self.spill = bytearray(256), bytearray(VMCI_MAX_DG_PAYLOAD_SIZE + 1)

    def take(self, timeout=1.0):
        return self.rx.take(self.buf, self.spill, timeout)

    def close(self):
        self.words.release()
        self.rx.close()
        for s in (self.a, self.b, self.listener):
            s.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


@pytest.fixture
def rx(core, page, tmp_path):
    r = Rx(core, page, tmp_path)
    yield r
    r.close()


def test_take_returns_the_payload_length_and_the_connections_tag(core, rx):
    assert rx.link.send(b"hello", 5) == 29
    assert rx.take() == (5, "tag-3")
    assert bytes(rx.buf[:5]) == b"hello" and rx.rx.last_fd == rx.b.fileno()
    assert rx.account.queued() == 0
    assert rx.take(0) == (core.AGAIN, None)


def test_recv_returns_the_frame_size_without_the_delivery_checks(core, rx):
    rx.rx.deny(rx.b.fileno(), True)  # take would drop it; recv reads frames only
    assert rx.link.send(b"hello", 5) == 29
    assert rx.rx.recv(rx.buf, rx.spill, 1.0) == 29
    assert bytes(rx.buf[:5]) == b"hello" and rx.rx.last_fd == rx.b.fileno()
    assert rx.account.queued() == 0
    os.write(rx.wake_w, b"\0")
    assert rx.rx.recv(rx.buf, rx.spill, 1.0) == core.WAKE
    os.read(rx.wake_r, 1)
    assert rx.rx.recv(rx.buf, rx.spill, 0) == core.AGAIN


def test_take_reports_a_payload_that_spills_past_the_buffer(core, rx):
    payload = bytes(range(256)) * 2
    assert rx.link.send(payload, 512) == 536
    assert rx.take() == (512, "tag-3")
    assert bytes(rx.buf) + bytes(rx.spill[:256]) == payload


def test_denied_connections_are_read_zeroed_and_dropped(core, rx):
    rx.rx.deny(rx.b.fileno(), True)
    assert rx.link.send(b"secret", 6) == 30
    assert rx.take() == (core.DENIED, None)
    assert bytes(rx.buf[:6]) == bytes(6) and rx.account.queued() == 0
    rx.rx.deny(rx.b.fileno(), False)
    assert rx.link.send(b"public", 6) == 30
    assert rx.take() == (6, "tag-3")


def test_an_acl_epoch_change_rechecks_before_delivery(core, rx):
    calls = []

    def recheck():
        calls.append(rx.words[ACL_EPOCH_WORD])
        rx.rx.deny(rx.b.fileno(), True)

    rx.rx.watch_acl(recheck)
    assert rx.link.send(b"a", 1) == 25
    assert rx.take() == (1, "tag-3") and calls == []
    rx.words[ACL_EPOCH_WORD] += 1
    assert rx.link.send(b"b", 1) == 25
    assert rx.take() == (core.DENIED, None) and calls == [1]
    rx.rx.deny(rx.b.fileno(), False)
    rx.rx.acl_changed()  # forced, the word unchanged
    assert rx.link.send(b"c", 1) == 25
    assert rx.take() == (core.DENIED, None) and calls == [1, 1]


def test_a_link_watching_the_acl_epoch_goes_stale(core, rx):
    rx.link.watch_acl()
    assert rx.link.send(b"x", 1) == 25
    rx.words[ACL_EPOCH_WORD] += 1
    assert rx.link.send(b"x", 1) == core.STALE
    assert rx.account.queued() == 25  # nothing was sent or reserved
    assert rx.take() == (1, "tag-3") and rx.take(0) == (core.AGAIN, None)


@pytest.mark.parametrize("sender", ["cython", "pure"])
def test_a_stream_is_delivered_in_order_and_released_one_frame_at_a_time(core, page, tmp_path, sender):
    """A streaming sender's frames may be read ahead (recvmmsg in the C core), but each
    leaves the queue account only when it is handed out, so the bound stays exact."""
    if sender == "cython" and not CYTHON_AVAILABLE:
        pytest.skip("the Cython core is not built")
    r = Rx(core, page, tmp_path, load_core(sender))
    try:
        count = 200
        for i in range(count):
            assert r.link.send(i.to_bytes(2, "little") * 20, 40) == 64
        for i in range(count):
            assert r.account.queued() == (count - i) * 64
            assert r.take() == (40, "tag-3")
            assert bytes(r.buf[:40]) == i.to_bytes(2, "little") * 20
        assert r.account.queued() == 0 and r.take(0) == (core.AGAIN, None)
    finally:
        r.close()


def test_removing_a_streaming_connection_releases_what_was_read_ahead(core, rx):
    for _ in range(40):
        assert rx.link.send(b"y" * 8, 8) == 32
    assert rx.take() == (8, "tag-3")
    rx.rx.remove(rx.b.fileno())
    # The C core read 16 frames at once; the 15 not handed out are released with the connection.
    assert rx.account.queued() == (24 if core.NAME == "cython" else 39) * 32
    assert rx.take(0) == (core.AGAIN, None)


def test_a_bad_frame_inside_a_stream_ends_that_connection_only_there(core, rx):
    for i in range(5):
        assert rx.link.send(bytes([i]), 1) == 25
    rx.a.send(core.encode_header(2, 1025, 3, 1024, 9) + b"short")  # length disagrees
    for i in range(5):
        assert rx.take() == (1, "tag-3") and rx.buf[0] == i
    assert rx.take() == (core.BAD_FRAME, None) and rx.rx.last_fd == rx.b.fileno()


def test_a_forged_frame_inside_a_stream_is_reported(core, rx):
    for i in range(3):
        assert rx.link.send(bytes([i]), 1) == 25
    rx.a.send(core.encode_datagram(2, 1025, 9, 9, b"x"))
    for i in range(3):
        assert rx.take() == (1, "tag-3")
    assert rx.take() == (core.FORGED, None)


# A hot connection: the only one, and its last read delivered a frame. A receive that
# would wait blocks in recvmsg on it alone (SO_RCVTIMEO bounds that), then waits with epoll.

def _make_hot(core, rx):
    assert rx.link.send(b"a", 1) == 25
    assert rx.take() == (1, "tag-3")
    # A frame the account does not show, so that only a read of the connection finds it.
    rx.a.send(core.encode_datagram(2, 1025, 3, 1024, b"b"))
    os.write(rx.wake_w, b"\0")


def test_a_hot_receive_reads_its_connection_first_then_sees_a_wake_up(core, rx):
    _make_hot(core, rx)
    assert rx.take(None) == (1, "tag-3") and rx.buf[0] == ord("b")
    assert rx.take(None) == (core.WAKE, None), "the bounded hot read gave way to epoll"


def test_a_caller_timeout_below_the_hot_minimum_waits_with_epoll(core, rx):
    _make_hot(core, rx)
    assert rx.take(0.05) == (core.WAKE, None)  # served before any connection
    os.read(rx.wake_r, 1)
    assert rx.take(0.05) == (1, "tag-3") and rx.buf[0] == ord("b")
    assert rx.take(0.05) == (core.AGAIN, None)


@pytest.mark.parametrize("spill_size", [VMCI_MAX_DG_PAYLOAD_SIZE + 1, 16])
def test_a_hot_read_reports_oversized_and_truncated_frames_and_goes_on(core, rx, spill_size):
    """A hot read with a spill that holds any SDK frame (the endpoints') needs no MSG_TRUNC
    (the pure core uses readv there): what does not fit is over the maximum. With a smaller
    spill, truncation is what tells."""
    spill = bytearray(spill_size)
    assert rx.link.send(b"a", 1) == 25
    assert rx.rx.take(rx.buf, spill, 1.0) == (1, "tag-3")  # now hot: the next reads block on it
    too_big = VMCI_MAX_DG_PAYLOAD_SIZE + 1
    truncated = len(rx.buf) + spill_size + 1  # more than header, buffer and spill hold
    fits = min(len(rx.buf) + spill_size, VMCI_MAX_DG_PAYLOAD_SIZE)  # all they hold, or the maximum
    frames = [(too_big, core.BAD_FRAME), (truncated, core.BAD_FRAME), (fits, fits), (3, 3)]
    for size, _ in frames:
        rx.a.send(core.encode_datagram(2, 1025, 3, 1024, bytes([size % 251]) * size))
    # A header that claims what the buffers hold, over a longer frame: cut to the claimed size,
    # it would pass, were the cut not seen.
    rx.a.send(core.encode_header(2, 1025, 3, 1024, fits) + bytes(fits + 10))
    frames.append((fits + 10, core.BAD_FRAME))
    for size, expected in frames:
        status, tag = rx.rx.take(rx.buf, spill, 1.0)
        if expected < 0:
            assert (status, tag) == (expected, None), size
        else:
            assert (status, tag) == (expected, "tag-3"), size
            assert bytes(rx.buf[:min(size, len(rx.buf))]) == bytes([size % 251]) * min(size, len(rx.buf))
    assert rx.rx.take(rx.buf, spill, 0) == (core.AGAIN, None)


@pytest.mark.parametrize("blocking", [True, False])
def test_a_new_sender_is_seen_while_the_receiver_waits_on_a_hot_one(core, page, tmp_path, blocking):
    r = Rx(core, page, tmp_path, blocking=blocking)
    second = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        assert r.link.send(b"a", 1) == 25
        assert r.take() == (1, "tag-3")
        result = []
        waiter = threading.Thread(target=lambda: result.append(r.take(60)))
        waiter.start()
        time.sleep(0.05)  # most likely blocked on the first connection by now
        second.connect(str(tmp_path / "listener"))
        waiter.join(10)
        if waiter.is_alive():
            r.link.send(b"x", 1)  # release it, then fail
            waiter.join(10)
        assert result == [(core.ACCEPT, None)]
        conn, _ = r.listener.accept()
        conn.setblocking(True)
        r.rx.add(conn, 4, 1024, "tag-4")
        second.send(core.encode_datagram(2, 1025, 4, 1024, b"second"))
        assert r.take() == (6, "tag-4") and bytes(r.buf[:6]) == b"second"
        assert r.link.send(b"c", 1) == 25
        assert r.take() == (1, "tag-3")
        r.rx.remove(conn.fileno())
        conn.close()
    finally:
        second.close()
        r.close()


# Frame sizes around VSC_COPY_MAX (src/vsc_dgram.h): the C core sends a frame that small with one
# send() of a contiguous copy, and reads with one recv() into a frame buffer while the frames it
# reads stay that small (then copies the payload out), else with sendmsg/recvmsg and iovecs.
COPY_MAX = 8192


@pytest.mark.parametrize("length", [0, 1, COPY_MAX, COPY_MAX + 1, VMCI_MAX_DG_PAYLOAD_SIZE])
def test_a_link_sends_exactly_the_frame_on_both_sides_of_the_copy_limit(core, page, pair, length):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    link = core.Link(a, page.account(core), 2, 1025, 3, 1024)
    payload = bytes((i * 7) % 251 for i in range(length))
    assert link.send(payload, length) == 24 + length
    assert b.recv(VMCI_MAX_DG_PAYLOAD_SIZE + 100) == core.encode_datagram(2, 1025, 3, 1024, payload)


@pytest.mark.parametrize("timeout", [10.0, 0.05], ids=["hot", "epoll"])
def test_frames_of_changing_sizes_arrive_whole_on_both_read_paths(core, rx, timeout):
    """Small and large frames in turn, each alone on the connection (the account does not show
    it, so nothing is read ahead), read hot (a long wait) or after epoll_wait (a wait below the
    hot minimum): each arrives whole, spilling past the 256-byte buffer when it must, whether
    the C core guessed its size right (recv into its frame buffer, or recvmsg) or not."""
    assert rx.link.send(b"a", 1) == 25
    assert rx.take() == (1, "tag-3")
    for length in (1, 20000, 30000, 8, COPY_MAX, COPY_MAX + 1, 0, VMCI_MAX_DG_PAYLOAD_SIZE, 2):
        payload = bytes((i * 7 + length) % 256 for i in range(length))
        rx.a.send(core.encode_datagram(2, 1025, 3, 1024, payload))
        assert rx.take(timeout) == (length, "tag-3"), length
        assert bytes(rx.buf[:length]) + bytes(rx.spill[:max(0, length - 256)]) == payload, length


@pytest.mark.parametrize("excess", [1, 100])
def test_a_frame_over_the_sdk_maximum_read_hot_is_bad(core, rx, excess):
    assert rx.link.send(b"a", 1) == 25
    assert rx.take() == (1, "tag-3")
    payload = bytes(VMCI_MAX_DG_PAYLOAD_SIZE + excess)
    rx.a.send(core.encode_header(2, 1025, 3, 1024, len(payload)) + payload)
    assert rx.take(10.0) == (core.BAD_FRAME, None) and rx.rx.last_fd == rx.b.fileno()


@both_cores
def test_both_cores_have_the_same_receiver_and_link_additions():
    import inspect
    cy, py = load_core("cython"), load_core("pure")
    for cls, names in {"Receiver": ("add", "deny", "watch_acl", "acl_changed", "take"),
                       "Link": ("watch_acl",)}.items():
        for name in names:
            a, b = getattr(getattr(cy, cls), name), getattr(getattr(py, cls), name)
            params = [[p.name for p in inspect.signature(f).parameters.values()] for f in (a, b)]
            assert params[0] == params[1], "%s.%s" % (cls, name)
    assert (cy.DENIED, cy.STALE) == (py.DENIED, py.STALE)


def test_the_receiver_stays_readable_while_frames_wait_for_delivery(core, rx):
    """fileno() is for select/poll users: frames read ahead must keep it readable."""
    import select
    for _ in range(20):
        assert rx.link.send(b"z", 1) == 25
    for left in range(20, 0, -1):
        assert select.select([rx.rx.fileno()], [], [], 0)[0], "%d frames wait unseen" % left
        assert rx.take(0) == (1, "tag-3")
    assert not select.select([rx.rx.fileno()], [], [], 0)[0]
    assert rx.take(0) == (core.AGAIN, None)


def test_asking_for_fileno_late_still_shows_frames_read_ahead(core, rx):
    import select
    for _ in range(20):
        assert rx.link.send(b"w", 1) == 25
    assert rx.take(0) == (1, "tag-3")  # the C core read ahead before anyone polled
    fd = rx.rx.fileno()
    for _ in range(19):
        assert select.select([fd], [], [], 0)[0]
        assert rx.take(0) == (1, "tag-3")
    assert not select.select([fd], [], [], 0)[0]


def test_a_hot_connection_shows_its_frames_to_a_late_poller(core, rx):
    """A connection read hot while nobody polled (the C core takes it out of the epoll set
    then) is watched again once fileno() is asked: its next frame makes the receiver readable.
    Asking may make it readable once before (a receive then finds nothing)."""
    assert rx.link.send(b"a", 1) == 25
    assert rx.take(10.0) == (1, "tag-3")  # a long wait: now hot
    fd = rx.rx.fileno()
    if select.select([fd], [], [], 0)[0]:
        assert rx.take(0) == (core.AGAIN, None)
    assert not select.select([fd], [], [], 0)[0]
    assert rx.link.send(b"b", 1) == 25
    assert select.select([fd], [], [], 5)[0], "the hot connection's frame went unseen"
    assert rx.take(0) == (1, "tag-3") and rx.buf[0] == ord("b")
    assert not select.select([fd], [], [], 0)[0]


def test_a_removed_hot_connections_descriptor_can_serve_a_new_connection(core, rx):
    """The hot connection removed (and closed), a new one on the same descriptor number is
    watched: a wait with epoll sees its frames."""
    assert rx.link.send(b"a", 1) == 25
    assert rx.take(10.0) == (1, "tag-3")
    old = rx.b.fileno()
    rx.rx.remove(old)
    rx.b.close()
    rx.a.close()
    rx.a, rx.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if rx.b.fileno() != old:  # the lowest free number: the old one, unless a thread took it
        rx.a, rx.b = rx.b, rx.a
    rx.rx.add(rx.b, 3, 1024, "tag-5")
    rx.a.send(core.encode_datagram(2, 1025, 3, 1024, b"new"))
    assert rx.take(0.05) == (3, "tag-5") and bytes(rx.buf[:3]) == b"new"  # via epoll_wait
    rx.a.send(core.encode_datagram(2, 1025, 3, 1024, b"hot"))
    assert rx.take(10.0) == (3, "tag-5") and bytes(rx.buf[:3]) == b"hot"
    assert rx.take(0.05) == (core.AGAIN, None)


def _epoll_targets(epfd):
    """The descriptors the epoll instance epfd watches (/proc/self/fdinfo)."""
    with open("/proc/self/fdinfo/%d" % epfd) as f:
        return {int(line.split()[1]) for line in f if line.startswith("tfd:")}


def _new_epoll_fds(before):
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + name) == "anon_inode:[eventpoll]":
                fds.add(int(name))
        except OSError:
            pass
    return fds - before


@pytest.mark.skipif(not os.path.isdir("/proc/self/fdinfo"), reason="needs /proc/self/fdinfo")
def test_the_c_receiver_watches_a_hot_connection_only_while_someone_may_poll(core, page, tmp_path):
    """vsc_rx parks the hot connection (out of the epoll set, so that its frames wake only
    the reader) while nobody polls, and puts it back for a wait on everything or a poller.
    (What a poller sees is the same on both cores: the tests above.)"""
    if core.__name__ != "vsockcompat._cvsc":
        pytest.skip("the C receiver's epoll set: the pure core has no such optimisation")
    before = _new_epoll_fds(set())
    r = Rx(core, page, tmp_path)
    try:
        (epfd,) = _new_epoll_fds(before)
        conn = r.b.fileno()
        assert conn in _epoll_targets(epfd)
        assert r.link.send(b"a", 1) == 25
        assert r.take(10.0) == (1, "tag-3")
        assert conn not in _epoll_targets(epfd), "the hot connection stayed in the epoll set"
        assert r.take(0.05) == (core.AGAIN, None)  # a wait below the hot minimum sees everything
        assert conn in _epoll_targets(epfd)
        assert r.link.send(b"b", 1) == 25
        assert r.take(10.0) == (1, "tag-3")
        assert conn not in _epoll_targets(epfd)
        assert r.rx.fileno() == epfd  # someone may poll now
        assert r.link.send(b"c", 1) == 25
        assert r.take(10.0) == (1, "tag-3")
        assert conn in _epoll_targets(epfd)
    finally:
        r.close()


def test_the_pure_receivers_tuning_is_the_c_cores():
    """The pure core copies three of vsc_rx's tuning values; they must stay the C header's."""
    import re
    import struct
    from vsockcompat import _pure
    header = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "vsc_dgram.h")
    with open(header, encoding="utf-8") as f:
        defines = dict(re.findall(r"^#define (VSC_RX_\w+) (\d+)$", f.read(), re.M))
    assert int(defines["VSC_RX_SKIPS"]) == _pure._SKIP_MAX
    assert int(defines["VSC_RX_HOT_MS"]) * 1000 == struct.unpack("@ll", _pure._HOT_TIMEOUT)[1]
    assert int(defines["VSC_RX_HOT_MIN_WAIT_MS"]) / 1000 == _pure._HOT_MIN_WAIT
