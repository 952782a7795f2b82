"""Direct links over real AF_VSOCK SEQPACKET (``transport/streams.py``), in the guest bed only.

The core sends each datagram on the vsock connection itself; a full connection seals the link
(the kernel may have cut the message), the sender gets NoResources until the receiver drained,
then a fresh link: nothing the sender was told it sent is lost, nothing arrives torn. Behind the
gate of ``conftest.py`` (marker ``vsock``), on both cores.

Run them:  python testbed/guest.py run -- python -m pytest tests/real_vsock/test_direct_vsock.py -m vsock -rs
"""
import struct
import threading

import pytest

from vsockcompat.constants import AF_VSOCK
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.errors import NoResources, Timeout

from .test_vsock_transport import vsock_runtime, pair  # noqa: F401  (fixtures)

pytestmark = pytest.mark.vsock

WAIT = 30.0
BIG = 60000  # bigger than what is left of a nearly full 256 KiB buffer: the kernel cuts it
_SEQ = struct.Struct("<II")  # (sender thread, sequence number) at the start of a payload


def _drain(endpoint) -> list:
    """Every payload waiting for ``endpoint`` (until none comes for 3 s)."""
    payloads = []
    while True:
        try:
            payloads.append(endpoint.recv(timeout=3).payload)
        except Timeout:
            return payloads


def test_seqpacket_links_are_direct_without_a_pump(vsock_runtime, pair):
    a, b = pair
    assert vsock_runtime.transport.mode == "seqpacket"
    a.send(b.handle, b"ping")
    assert b.recv(timeout=WAIT).payload == b"ping"
    link = a._links[b.handle].link
    assert link.direct and link.sock.family == AF_VSOCK
    names = [thread.name for thread in threading.enumerate()]
    assert not any("-link-" in name for name in names), names  # no pump thread
    assert any("-watch-" in name for name in names), names


def test_a_full_direct_link_seals_until_drained_and_loses_nothing(pair):
    a, b = pair
    payload = bytearray(BIG)
    sent = 0
    with pytest.raises(NoResources):
        for seq in range(1000):
            payload[:4] = seq.to_bytes(4, "little")
            a.send(b.handle, payload)
            sent += 1
    sender = a._links[b.handle].sender
    assert sender.sealed
    for _ in range(3):  # the receiver reads nothing: still refused, nothing more sent
        with pytest.raises(NoResources):
            a.send(b.handle, b"refused")
    got = _drain(b)
    assert [int.from_bytes(p[:4], "little") for p in got] == list(range(sent))
    assert all(len(p) == BIG and p[4:] == bytes(BIG - 4) for p in got)
    assert b.stats.bad_frames == 0 and b.stats.forged == 0
    a.send(b.handle, b"after")  # drained: a fresh link
    assert b.recv(timeout=WAIT).payload == b"after"
    assert a._links[b.handle].sender is not sender


def test_concurrent_senders_on_a_direct_link_keep_their_order(pair):
    a, b = pair
    counts = [0] * 3

    def send(me):
        seq = 0
        try:
            while seq < 500:
                a.send(b.handle, _SEQ.pack(me, seq) + bytes(20000))
                seq += 1
        except NoResources:
            pass
        counts[me] = seq

    threads = [threading.Thread(target=send, args=(me,)) for me in range(len(counts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    seen = [[] for _ in counts]
    for payload in _drain(b):
        me, seq = _SEQ.unpack_from(payload)
        assert len(payload) == _SEQ.size + 20000
        seen[me].append(seq)
    assert seen == [list(range(n)) for n in counts]
    assert b.stats.bad_frames == 0


def test_pumped_and_direct_links_interoperate(core, rundir):
    """The benchmark's pumped links (``direct_links = False``) and direct links speak one wire."""
    from vsockcompat._settings import Settings
    from vsockcompat.runtime import Runtime

    def runtime(direct):
        rt = Runtime(Settings(no_extensions=False, rundir=rundir, cid=2, transport="vsock",
                              ds_autostart=False), core=core)
        rt.transport.direct_links = direct
        return rt

    with DatagramEndpoint(runtime=runtime(True)) as direct, \
            DatagramEndpoint(runtime=runtime(False)) as pumped:
        for n in range(20):
            direct.send(pumped.handle, b"d%d" % n)
            got = pumped.recv(timeout=WAIT)
            assert got.payload == b"d%d" % n and got.src == direct.handle
            pumped.send(got.src, b"p%d" % n)
            assert direct.recv(timeout=WAIT).payload == b"p%d" % n
        assert direct._links[pumped.handle].link.direct
        assert not pumped._links[direct.handle].link.direct
