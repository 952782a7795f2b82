"""The data-plane cores: frame codec, queue account, send/recv fast paths.

Each test runs on both cores; the interop tests pair a sender of one core
with a receiver of the other on one socket and one account page.
"""
import json
import mmap
import os
import socket
import tempfile

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


def test_a_lock_holder_that_dies_does_not_wedge_senders(core, page, pair):
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
    assert core.send_datagram(a, page.accounts[0], 1, 2, 3, 4, b"alive", 5) == 29


def test_a_frame_over_the_sdk_maximum_is_bad(core, page, pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    payload = bytes(VMCI_MAX_DG_PAYLOAD_SIZE + 1)
    a.send(core.encode_header(1, 2, 3, 4, len(payload)) + payload)
    buf, spill = bytearray(64), bytearray(VMCI_MAX_DG_PAYLOAD_SIZE + 1)
    assert core.recv_datagram(b, page.accounts[0], buf, spill) == (core.BAD_FRAME, None)
