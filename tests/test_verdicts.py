"""Verdicts (``transport/verdicts.py``): the parsers, a link's verdict state with each core's
sender, and the link pump reading them, over AF_UNIX stand-ins (no AF_VSOCK here)."""
import errno
import mmap
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsockcompat.transport import streams
from vsockcompat.transport.verdicts import (
    DENIED,
    MAY_SEND,
    VERDICT,
    VERDICT_MAGIC,
    LinkVerdict,
    decode_verdict,
    encode_verdict,
    split_verdicts,
)

WAIT = 10.0


def test_verdict_wire_format():
    assert encode_verdict(True) == b"VSV1\x01\x00\x00\x00"
    assert encode_verdict(False) == b"VSV1\x00\x00\x00\x00"
    assert (VERDICT_MAGIC, MAY_SEND, DENIED) == (0x31565356, 0, 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=24), st.booleans())
def test_the_verdict_decoder_accepts_exactly_well_formed_verdicts(data, truncated):
    verdict = decode_verdict(data, truncated)
    well_formed = (not truncated and len(data) == 8 and data[:4] == b"VSV1"
                   and data[4:] in (b"\0\0\0\0", b"\1\0\0\0"))
    assert (verdict is not None) == well_formed
    if well_formed:
        assert verdict == (data[4] == 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=20), st.data())
def test_verdicts_split_from_a_stream_cut_anywhere(verdicts, data):
    wire = b"".join(encode_verdict(v) for v in verdicts)
    cut = data.draw(st.integers(0, len(wire)))
    first = split_verdicts(wire[:cut])
    assert first is not None and first[1] == cut - cut % 8
    rest = split_verdicts(wire[first[1]:])
    assert first[0] + rest[0] == verdicts and first[1] + rest[1] == len(wire)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_stream_bytes_split_or_are_refused(data):
    split = split_verdicts(data)
    if split is None:
        whole = data[: len(data) - len(data) % 8]
        assert any(decode_verdict(whole[i:i + 8]) is None for i in range(0, len(whole), 8))
    else:
        verdicts, used = split
        assert used == len(data) - len(data) % 8 and len(verdicts) == used // 8
        assert b"".join(encode_verdict(v) for v in verdicts) == data[:used]


# A link's verdict with the core's sender: STALE (nothing sent) while denied or once changed.

@pytest.fixture
def link(core):
    page = mmap.mmap(-1, core.ACCOUNT_SIZE)
    account = core.Account(-1, page)
    account.initialise(1 << 62)
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    front.setblocking(False)
    back.settimeout(WAIT)
    sender = core.Link(front, account, 7, 1024, 7, 1025)
    yield core, page, sender, back
    sender.close()
    front.close()
    back.close()
    account.release_memory()
    page.close()


@pytest.mark.parametrize("stream", [False, True], ids=["seqpacket", "stream"])
def test_a_link_verdict_stops_and_restarts_its_sender(link, stream):
    core, page, sender, back = link
    verdict = LinkVerdict(page, stream)
    assert verdict.watch(sender) is False
    assert sender.send(b"a", 1) == 25 and back.recv(100)[24:] == b"a"
    assert verdict.apply(encode_verdict(False)) and sender.send(b"b", 1) == 25  # no change: no STALE
    back.recv(100)
    assert verdict.apply(encode_verdict(True))
    assert verdict.denied and sender.send(b"c", 1) == core.STALE
    for _ in range(3):  # while denied, every send comes back STALE, sending nothing
        assert verdict.watch(sender) is True
        assert sender.send(b"c", 1) == core.STALE
    assert verdict.apply(encode_verdict(False))
    assert sender.send(b"d", 1) == core.STALE
    assert verdict.watch(sender) is False
    assert sender.send(b"d", 1) == 25 and back.recv(100)[24:] == b"d"
    assert not verdict.garbled


def test_a_stream_verdict_may_come_in_pieces(link):
    _, page, sender, _ = link
    verdict = LinkVerdict(page, stream=True)
    wire = encode_verdict(True) + encode_verdict(False) + encode_verdict(True)
    for i in range(0, len(wire), 3):
        assert verdict.apply(wire[i:i + 3])
    assert verdict.denied and not verdict.garbled


@pytest.mark.parametrize("stream, data", [
    (False, b"VSV1"), (False, VERDICT.pack(VERDICT_MAGIC, 2)), (False, encode_verdict(True) + b"x"),
    (True, VERDICT.pack(VERDICT_MAGIC ^ 1, 0)), (True, encode_verdict(True) + b"VSC1\0\0\0\0"),
], ids=["short", "word", "long", "stream-magic", "stream-then-garbage"])
def test_garbage_verdicts_are_refused_and_change_nothing(link, stream, data):
    _, page, sender, _ = link
    verdict = LinkVerdict(page, stream)
    verdict.watch(sender)
    assert verdict.apply(data) is False
    assert verdict.garbled and not verdict.denied


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=12), st.booleans().map(encode_verdict)), max_size=12))
def test_a_stream_verdict_follows_any_bytes_or_refuses_them(link, chunks):
    """Whatever a receiver writes, in whatever pieces: the last whole verdict, or the link ends."""
    _, page, sender, _ = link
    verdict = LinkVerdict(page, stream=True)
    verdict.watch(sender)
    taken = []  # a new LinkVerdict each time: the shared link only lends its page and sender
    for chunk in chunks:
        taken.append(verdict.apply(chunk))
        if not taken[-1]:
            assert verdict.apply(encode_verdict(True)) is False  # the pump stops; so does the state
            break
    split = split_verdicts(b"".join(chunks))
    if split is None:
        assert verdict.garbled and taken[-1] is False and all(taken[:-1])
    else:
        assert all(taken) and not verdict.garbled
        assert verdict.denied == (split[0][-1] if split[0] else False)


# The pump reads the verdicts the receiver writes back on the link's connection.

def _pump_rig(core, stream):
    page = mmap.mmap(-1, core.ACCOUNT_SIZE)
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kind = socket.SOCK_STREAM if stream else socket.SOCK_SEQPACKET
    vs, receiver = socket.socketpair(socket.AF_UNIX, kind)
    verdict = LinkVerdict(page, stream)
    pump = threading.Thread(target=streams._pump, args=(back, vs, stream, verdict), daemon=True)
    pump.start()
    return page, front, vs, receiver, verdict, pump


def _until(condition):
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "the pump never took the verdict"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True], ids=["seqpacket", "stream"])
def test_the_pump_takes_verdicts_and_keeps_forwarding(core, stream):
    page, front, vs, receiver, verdict, pump = _pump_rig(core, stream)
    receiver.settimeout(WAIT)
    receiver.send(encode_verdict(True))
    _until(lambda: verdict.denied)
    front.send(b"x" * 24)
    assert receiver.recv(100) == b"x" * 24
    receiver.send(encode_verdict(False))
    _until(lambda: not verdict.denied)
    front.close()
    pump.join(WAIT)
    assert not pump.is_alive() and verdict.ended and not verdict.garbled
    for sock in (vs, receiver):
        sock.close()
    page.close()


@pytest.mark.parametrize("stream", [False, True], ids=["seqpacket", "stream"])
def test_the_pump_ends_the_link_on_garbage_from_the_receiver(core, stream):
    page, front, vs, receiver, verdict, pump = _pump_rig(core, stream)
    receiver.send(b"VSV1 but not a verdict")
    pump.join(WAIT)
    assert not pump.is_alive() and verdict.garbled and verdict.ended
    with pytest.raises(OSError) as info:
        front.send(b"x" * 24)
    assert info.value.errno in (errno.EPIPE, errno.ECONNRESET)
    for sock in (front, vs, receiver):
        sock.close()
    page.close()
