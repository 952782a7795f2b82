"""Direct links (``transport/streams.py``): the core sends on the connection itself and seals
the link when it is full; a watch thread reads the receiver's verdicts and sees hang-ups.

AF_UNIX SEQPACKET socketpairs stand in for the AF_VSOCK SEQPACKET connection (no AF_VSOCK here).
Their non-blocking sends are all or nothing, so the cut message itself is only seen in the guest
(``tests/real_vsock/test_direct_vsock.py``); what is checked here is that after the first
``EAGAIN`` nothing more reaches the wire until the link is replaced.
"""
import socket
import struct
import threading
import time

import pytest

from vsockcompat.constants import VMCI_DG_HEADERSIZE, VMCI_ERROR_INVALID_ARGS, VMCI_ERROR_NO_RESOURCES
from vsockcompat.handles import VMCIHandle
from vsockcompat.transport.streams import StreamLinks
from vsockcompat.transport.verdicts import encode_verdict

WAIT = 10.0
SRC, DST = VMCIHandle(3, 1025), VMCIHandle(3, 1024)
PAYLOAD = 1000
_SEQ = struct.Struct("<II")  # (sender thread, sequence number) at the start of a test payload


class _Links(StreamLinks):
    """The link half of a transport, as the vsock transport has it in SEQPACKET mode."""

    name = "test"

    def __init__(self, core):
        self._core = core
        self._lock = threading.Lock()
        self._pumps = {}


@pytest.fixture
def rig(core):
    """``(core, links, link, sender, receiver)``: a direct link over a socketpair, its sealing
    core sender, and the receiving end (small buffers, so it fills after a few frames)."""
    vs, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    vs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    receiver.settimeout(WAIT)
    links = _Links(core)
    link = links._start_direct_link(vs, SRC, DST)
    assert link.direct and link.sock is vs
    sender = core.Link(link.sock, link.account, *DST, *SRC)
    sender.seal_when_full()
    link.verdict.watch(sender)
    yield core, links, link, sender, receiver
    sender.close()
    links.disconnect(SRC, link)
    receiver.close()


def _fill(sender, payload=b"x" * PAYLOAD):
    """Send until the link refuses; the number of frames sent."""
    sent = 0
    while True:
        rc = sender.send(payload, len(payload))
        if rc < 0:
            assert rc == VMCI_ERROR_NO_RESOURCES
            return sent
        assert rc == VMCI_DG_HEADERSIZE + len(payload)
        sent += 1
        assert sent < 100000, "the socket never filled"


def _drain(receiver) -> list:
    """The frames waiting on ``receiver``, read without waiting."""
    frames = []
    receiver.setblocking(False)
    try:
        while True:
            frames.append(receiver.recv(70000))
    except BlockingIOError:
        return frames
    finally:
        receiver.settimeout(WAIT)


def test_a_full_link_seals_and_sends_nothing_more_until_it_has_room(rig):
    core, _, _, sender, receiver = rig
    sent = _fill(sender)
    assert sent > 0 and sender.sealed
    assert sender.send(b"y", 1) == VMCI_ERROR_NO_RESOURCES  # still no room: refused at once
    frames = _drain(receiver)  # the receiver drains: the socket has room again
    assert sender.send(b"z", 1) == core.STALE  # sealed: the endpoint must replace the link
    assert len(frames) == sent and all(len(f) == VMCI_DG_HEADERSIZE + PAYLOAD for f in frames)
    assert sender.sealed and _drain(receiver) == []


def test_without_sealing_a_full_link_refuses_then_sends_again(core):
    """The behaviour of pumped and local links is unchanged: EAGAIN refuses only that send."""
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    front.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    links = _Links(core)
    account, page = links._private_account()
    sender = core.Link(front, account, *DST, *SRC)
    try:
        sent = _fill(sender)
        assert not sender.sealed
        back.recv(70000)
        assert sender.send(b"y", 1) == VMCI_DG_HEADERSIZE + 1
        assert len(_drain(back)) == sent
    finally:
        sender.close()
        front.close()
        back.close()
        links._release(account, page)


def test_concurrent_senders_keep_their_order_and_nothing_follows_the_seal(rig):
    core, _, _, sender, receiver = rig
    counts = [0] * 4

    def send(me):
        seq = 0
        while True:
            payload = _SEQ.pack(me, seq) + b"p" * 200
            rc = sender.send(payload, len(payload))
            if rc < 0:
                assert rc == VMCI_ERROR_NO_RESOURCES
                counts[me] = seq
                return
            seq += 1

    threads = [threading.Thread(target=send, args=(me,)) for me in range(len(counts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert sender.sealed
    frames = _drain(receiver)
    assert len(frames) == sum(counts)
    seen = [[] for _ in counts]
    for frame in frames:
        me, seq = _SEQ.unpack_from(frame, VMCI_DG_HEADERSIZE)
        seen[me].append(seq)
    assert seen == [list(range(n)) for n in counts]
    assert sender.send(b"late", 4) == core.STALE and _drain(receiver) == []


def _until(condition, what):
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_the_watch_takes_a_denial_and_its_lifting(rig):
    core, _, link, sender, receiver = rig
    receiver.send(encode_verdict(True))
    _until(lambda: link.verdict.denied, "the watch never took the denial")
    assert sender.send(b"a", 1) == core.STALE  # the endpoint then reads the verdict: NO_ACCESS
    assert link.verdict.watch(sender) is True
    receiver.send(encode_verdict(False))
    _until(lambda: not link.verdict.denied, "the watch never took the lifting")
    assert link.verdict.watch(sender) is False
    assert sender.send(b"b", 1) == VMCI_DG_HEADERSIZE + 1
    assert receiver.recv(100)[VMCI_DG_HEADERSIZE:] == b"b"
    assert not link.verdict.ended


def test_a_receiver_gone_ends_the_watch_and_the_sends(rig):
    core, links, link, sender, receiver = rig
    receiver.close()
    _until(lambda: link.verdict.ended, "the watch never saw the hang-up")
    assert sender.send(b"a", 1) == core.PEER_GONE
    assert not link.verdict.garbled


def test_garbage_from_the_receiver_ends_the_link(rig):
    core, _, link, sender, receiver = rig
    receiver.send(b"VSV1 but not a verdict")
    _until(lambda: link.verdict.ended, "the watch never ended")
    assert link.verdict.garbled
    assert sender.send(b"a", 1) == core.PEER_GONE  # shut down: the endpoint replaces the link


def test_disconnect_ends_the_watch_and_keeps_what_was_sent(core):
    vs, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    receiver.settimeout(WAIT)
    links = _Links(core)
    link = links._start_direct_link(vs, SRC, DST)
    sender = core.Link(link.sock, link.account, *DST, *SRC)
    sender.seal_when_full()
    watch = links._pumps[id(vs)][1]
    try:
        assert sender.send(b"last words", 10) == VMCI_DG_HEADERSIZE + 10
        sender.close()
        links.disconnect(SRC, link)
        assert not watch.is_alive() and link.verdict.ended and vs.fileno() == -1
        assert id(vs) not in links._pumps
        assert receiver.recv(100)[VMCI_DG_HEADERSIZE:] == b"last words"
        assert receiver.recv(100) == b""
    finally:
        receiver.close()


def test_a_sealing_link_refuses_bad_input_before_and_after_the_seal(rig):
    _, _, _, sender, receiver = rig
    for _ in range(2):
        assert sender.send(b"abc", 4) == VMCI_ERROR_INVALID_ARGS
        assert sender.send(b"abc", -1) == VMCI_ERROR_INVALID_ARGS
        with pytest.raises(TypeError):
            sender.send(None, 1)
        if not sender.sealed:
            _fill(sender)
    assert sender.sealed
    assert all(len(f) == VMCI_DG_HEADERSIZE + PAYLOAD for f in _drain(receiver))
