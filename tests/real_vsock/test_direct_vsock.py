"""Direct links over real AF_VSOCK SEQPACKET (``transport/streams.py``), in the guest bed only.

The core sends each datagram on the vsock connection itself; a full connection seals the link
(the kernel may have cut the message): the connection is shut down for writing, the sender gets
NoResources until the receiver has read everything sent before the cut and closed the
connection at its end, then a fresh link. Nothing the sender was told it sent is lost or
arrives twice, nothing refused or torn arrives, and the order is kept across the seal. Against
receivers of both Python cores and the C library's (``tests/c/vsock_probe.c``). Behind the gate
of ``conftest.py`` (marker ``vsock``).

Run them:  python testbed/guest.py run -- python -m pytest tests/real_vsock/test_direct_vsock.py -m vsock -rs
"""
import struct
import tempfile
import threading
import time

import pytest

from vsockcompat.constants import AF_VSOCK
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.errors import NoResources, Timeout
from vsockcompat.run import command

from .test_clib_vsock import Probe, c_env, pattern, progs  # noqa: F401  (the C programs' fixture)
from .test_vsock_discovery import vsock_env, vsock_runtime as make_vsock_runtime
from .test_vsock_transport import vsock_runtime, pair  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.vsock, pytest.mark.timeout(600)]

WAIT = 30.0
BIG = 60000  # bigger than what is left of a nearly full link buffer (139,263 bytes): the kernel cuts it
_SEQ = struct.Struct("<II")  # (sender thread, sequence number) at the start of a payload


def _numbered(seq, size=BIG):
    return seq.to_bytes(4, "little") + bytes(size - 4)


def _number(payload):
    return int.from_bytes(payload[:4], "little")


def _fill(send):
    """Call ``send(seq)`` for seq = 0, 1, ... until it is refused; (the accepted, the refused one)."""
    accepted = []
    for seq in range(1000):
        try:
            send(seq)
        except NoResources:
            return accepted, seq
        accepted.append(seq)
    pytest.fail("the receiver's buffer never filled")


def _send_until_accepted(send):
    """Call ``send()`` until it is not refused (the receiver closes the sealed connection)."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            return send()
        except NoResources:
            assert time.monotonic() < deadline, "still refused after %s s" % WAIT
            time.sleep(0.01)


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


def test_a_full_direct_link_is_refused_until_drained_and_keeps_the_order(pair):
    a, b = pair
    accepted, refused = _fill(lambda seq: a.send(b.handle, _numbered(seq)))
    sender = a._links[b.handle].sender
    assert accepted and sender.sealed
    for seq in range(refused + 1, refused + 4):  # the receiver reads nothing: still refused
        with pytest.raises(NoResources):
            a.send(b.handle, _numbered(seq))
    got = [b.recv(timeout=WAIT).payload for _ in accepted]
    assert [_number(p) for p in got] == accepted
    assert all(len(p) == BIG and p[4:] == bytes(BIG - 4) for p in got)
    with pytest.raises(NoResources):  # all read, but not the end: the sealed link stays
        a.send(b.handle, _numbered(refused + 4))
    with pytest.raises(Timeout):  # b reads the end (nothing cut is delivered) and closes
        b.recv(timeout=2)
    after = refused + 5
    _send_until_accepted(lambda: a.send(b.handle, _numbered(after)))
    assert a._links[b.handle].sender is not sender
    assert _number(b.recv(timeout=WAIT).payload) == after
    assert _drain(b) == []  # no refused datagram, no cut one, none twice
    assert b.stats.bad_frames == 0 and b.stats.forged == 0


def test_senders_that_retry_keep_fifo_across_seals(pair):
    """Threads sending numbered sequences, each retrying a refused datagram until accepted,
    while the receiver reads: every datagram arrives once, each sender's in order."""
    a, b = pair
    senders, count = 3, 60
    got, seals = [], set()
    refused = threading.Event()

    def receive():
        refused.wait(WAIT)  # the link fills (and seals) first, however fast this reader is
        for _ in range(senders * count):
            got.append(b.recv(timeout=WAIT).payload)

    def send(me):
        for seq in range(count):
            payload = _SEQ.pack(me, seq) + bytes(20000)

            def once():
                try:
                    a.send(b.handle, payload)
                except NoResources:
                    state = a._links.get(b.handle)
                    if state is not None and state.sender.sealed:
                        seals.add(id(state.sender))
                    refused.set()
                    raise
            _send_until_accepted(once)

    threads = [threading.Thread(target=receive)] + [threading.Thread(target=send, args=(me,))
                                                    for me in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 10)
    assert not any(thread.is_alive() for thread in threads)
    seen = [[] for _ in range(senders)]
    for payload in got:
        me, seq = _SEQ.unpack_from(payload)
        assert len(payload) == _SEQ.size + 20000
        seen[me].append(seq)
    assert seen == [list(range(count))] * senders
    assert seals, "the link never sealed: the test proved nothing"
    assert b.stats.bad_frames == 0


def test_the_c_library_receiver_drains_a_sealed_link_in_order(rundir, progs):  # noqa: F811
    """vsock_probe (libvmci.so.0) receives: it closes the sealed connection at its end too.
    Sequence numbers travel as lengths (the probe checks its byte pattern, not our numbers)."""
    size = BIG + 1000
    data = pattern(size)
    with tempfile.TemporaryDirectory(prefix="vsc", dir="/tmp") as c_rundir:
        argv, env = command([progs["vsock_probe"]], c_env(vsock_env(c_rundir, "cython", "seqpacket"), progs))
        probe = Probe(argv, env).start()
        try:
            with DatagramEndpoint(runtime=make_vsock_runtime("cython", rundir, "seqpacket")) as a:
                dst = probe.handle
                accepted, refused = _fill(lambda seq: a.send(dst, data[:BIG + seq]))
                assert accepted and a._links[dst].sender.sealed
                with pytest.raises(NoResources):
                    a.send(dst, data[:BIG + refused + 1])
                mine = [str(a.handle.context), str(a.handle.resource), "1"]
                for seq in accepted:
                    assert probe.ask("recv") == [str(BIG + seq)] + mine
                with pytest.raises(NoResources):
                    a.send(dst, data[:BIG + refused + 2])
                probe.proc.stdin.write("recv\n")  # reads the end, closes, then waits
                probe.proc.stdin.flush()
                after = refused + 3
                _send_until_accepted(lambda: a.send(dst, data[:BIG + after]))
                assert probe.proc.stdout.readline().split() == ["recv=%d" % (BIG + after)] + mine
        finally:
            probe.close()


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
