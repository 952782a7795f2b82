"""The vsock transport's modes over real AF_VSOCK, inside the guest test bed only (marker ``vsock``).

``VSOCKCOMPAT_VSOCK_MODE=stream``: SOCK_STREAM connections carrying the hello and frames back to
back (the fallback for devices without SEQPACKET); ``auto`` picks SEQPACKET on vsock_loopback.
Both cores. Raw AF_VSOCK sockets come only from the gate-checked ``vsock_socket`` factory.

Run them:  python testbed/guest.py run -- python -m pytest tests/real_vsock -m vsock -rs
"""
import select
import socket
import struct

import pytest

from vsockcompat._settings import Settings
from vsockcompat.constants import DG_HEADER_FORMAT, VMCI_MAX_DG_PAYLOAD_SIZE
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.errors import DstUnreachable, InvalidResource, NoResources, Timeout
from vsockcompat.handles import VMCIHandle
from vsockcompat.runtime import Runtime
from vsockcompat.transport.vsock import encode_hello

from .conftest import VMADDR_CID_LOCAL

pytestmark = pytest.mark.vsock

WAIT = 30.0


def runtime(core, rundir, mode):
    return Runtime(Settings(no_extensions=False, rundir=rundir, cid=2, transport="vsock",
                            ds_autostart=False)._replace(vsock_mode=mode), core=core)


@pytest.fixture
def stream_runtime(core, rundir):
    rt = runtime(core, rundir, "stream")
    assert rt.transport.mode == "stream"
    return rt


@pytest.fixture
def pair(stream_runtime):
    with DatagramEndpoint(runtime=stream_runtime) as a, DatagramEndpoint(runtime=stream_runtime) as b:
        yield a, b


def frame(dst, src, payload, size=None):
    return struct.pack(DG_HEADER_FORMAT, *dst, *src, len(payload) if size is None else size) + payload


def settle(ep, seconds=3.0):
    with pytest.raises(Timeout):
        ep.recv(timeout=seconds)


def test_auto_is_seqpacket_on_loopback(core, rundir):
    assert runtime(core, rundir, "auto").transport.mode == "seqpacket"
    assert runtime(core, rundir, "seqpacket").transport.mode == "seqpacket"


@pytest.mark.parametrize("size", [0, 1, 4096, VMCI_MAX_DG_PAYLOAD_SIZE], ids=["0", "1", "4k", "max"])
def test_exchange_in_stream_mode(pair, size):
    a, b = pair
    data = bytes((i * 7 + size) & 0xFF for i in range(size))
    assert a.send(b.handle, data) == size
    assert b.recv(timeout=WAIT) == (a.handle, data)
    assert b.send(a.handle, data[::-1]) == size
    assert a.recv(timeout=WAIT) == (b.handle, data[::-1])


def test_fifo_many_frames_one_connect(stream_runtime, pair, monkeypatch):
    a, b = pair
    connects = []
    real_connect = stream_runtime.transport.connect
    monkeypatch.setattr(stream_runtime.transport, "connect",
                        lambda src, dst: connects.append(dst) or real_connect(src, dst))
    sizes = [(i * 997) % 9000 for i in range(300)]
    for batch in range(0, len(sizes), 20):  # within the kernel's buffers (see the next test)
        for i in range(batch, batch + 20):
            a.send(b.handle, i.to_bytes(4, "little") * (sizes[i] // 4 + 1))
        for i in range(batch, batch + 20):
            got = b.recv(timeout=WAIT)
            assert got.src == a.handle and got.payload == i.to_bytes(4, "little") * (sizes[i] // 4 + 1)
    assert connects == [b.handle]


def test_a_sender_that_outruns_the_receiver_gets_no_resources(pair):
    """The bound is the kernel's: the link's AF_UNIX pair, the vsock stream, the reader's pair."""
    a, b = pair
    payload = bytearray(VMCI_MAX_DG_PAYLOAD_SIZE)
    sent = 0
    with pytest.raises(NoResources):
        for i in range(1000):
            payload[:4] = i.to_bytes(4, "little")
            a.send(b.handle, payload)
            sent += 1
    for i in range(sent):
        got = b.recv(timeout=WAIT)
        assert int.from_bytes(got.payload[:4], "little") == i and got.payload[4:] == bytes(len(payload) - 4)
    print("stream back-pressure: %d sent before NO_RESOURCES, all received in order" % sent)
    a.send(b.handle, b"after")
    assert b.recv(timeout=WAIT).payload == b"after"
    assert b.stats.bad_frames == 0 and b.stats.forged == 0


def test_modes_do_not_mix(core, rundir):
    """A vsock port has one socket type: a SEQPACKET sender cannot reach a stream endpoint."""
    with DatagramEndpoint(runtime=runtime(core, rundir, "stream")) as receiver, \
            DatagramEndpoint(runtime=runtime(core, rundir, "seqpacket")) as sender:
        with pytest.raises((InvalidResource, DstUnreachable)):
            sender.send(receiver.handle, b"wrong type")


def test_raw_stream_bad_input_is_dropped_and_counted(pair, vsock_socket):
    a, b = pair
    me = tuple(b.handle)
    sent = [
        encode_hello(6001) + b"garbage that is not a frame at all",
        encode_hello(6002) + frame(me, (VMADDR_CID_LOCAL, 6002), b"x" * 10, size=100),
        encode_hello(6003) + frame(me, (VMADDR_CID_LOCAL, 6003), b"", size=1 << 40),
        encode_hello(6004) + frame(me, (7, 6004), b"I am in context 7"),
        encode_hello(6005) + frame(me, (VMADDR_CID_LOCAL, a.handle.resource), b"I am a"),
        frame(me, (VMADDR_CID_LOCAL, 6006), b"no hello"),
        b"VSC0" + encode_hello(6007)[4:],
    ]
    socks = []
    for data in sent:
        sock = vsock_socket(socket.SOCK_STREAM)
        sock.connect((VMADDR_CID_LOCAL, b.handle.resource))
        sock.sendall(data)
        socks.append(sock)
    for sock in socks[:3]:
        sock.shutdown(socket.SHUT_WR)
    settle(b)
    assert b.stats.bad_frames == 3 and b.stats.forged == 2, b.stats
    assert b.stats.refused_connections == 2 and b.stats.received == 0, b.stats
    a.send(b.handle, b"still serving")
    assert b.recv(timeout=WAIT) == (a.handle, b"still serving")


def test_a_stream_peer_that_closes_is_reported_by_the_next_send(stream_runtime):
    a = DatagramEndpoint(runtime=stream_runtime)
    b = DatagramEndpoint(runtime=stream_runtime)
    try:
        a.send(b.handle, b"first")
        assert b.recv(timeout=WAIT).payload == b"first"
        link = a._links[b.handle].link.sock
        b.close()
        poller = select.poll()
        poller.register(link, select.POLLIN)
        assert poller.poll(WAIT * 1000), "the closed receiver's hang-up never reached the link"
        with pytest.raises(InvalidResource):
            a.send(b.handle, b"second")
    finally:
        a.close()
        b.close()


def test_stream_endpoint_identity(stream_runtime, pair):
    a, b = pair
    assert a.handle.context == VMADDR_CID_LOCAL and stream_runtime.transport.endpoint_alive(a.handle)
    assert not stream_runtime.transport.endpoint_alive(VMCIHandle(3, a.handle.resource))
