"""The ``vsock`` transport over real AF_VSOCK, inside the guest test bed only (marker ``vsock``).

Every test here is behind the gate of ``conftest.py``: it runs only in the guest that
``testbed/guest.py run`` boots (vsock_loopback, no way out) and skips everywhere else before any
fixture runs. Raw AF_VSOCK sockets come only from the gate-checked ``vsock_socket`` factory.
Endpoints use CID 1 (the bed's local CID), on both cores.

Run them:  python testbed/guest.py run -- python -m pytest tests/real_vsock -m vsock -rs
"""
import select
import socket

import pytest

from vsockcompat._settings import Settings
from vsockcompat.constants import VMCI_MAX_DG_PAYLOAD_SIZE
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.errors import DuplicateEntry, InvalidResource, NoResources, Timeout
from vsockcompat.handles import VMCIHandle
from vsockcompat.runtime import Runtime

from .conftest import VMADDR_CID_LOCAL

pytestmark = pytest.mark.vsock

VMADDR_CID_ANY = 0xFFFFFFFF
WAIT = 30.0


@pytest.fixture
def vsock_runtime(core, rundir):
    """A runtime on the test's core whose transport is ``vsock``."""
    rt = Runtime(Settings(no_extensions=False, rundir=rundir, cid=2, transport="vsock",
                          ds_autostart=False), core=core)
    from vsockcompat.transport.vsock import VsockTransport
    assert isinstance(rt.transport, VsockTransport)
    return rt


@pytest.fixture
def pair(vsock_runtime):
    with DatagramEndpoint(runtime=vsock_runtime) as a, DatagramEndpoint(runtime=vsock_runtime) as b:
        yield a, b


def hello(rid):
    from vsockcompat.transport.vsock import HELLO, HELLO_MAGIC
    return HELLO.pack(HELLO_MAGIC, rid)


def raw_client(vsock_socket, dst_rid):
    sock = vsock_socket(socket.SOCK_SEQPACKET)
    sock.connect((VMADDR_CID_LOCAL, dst_rid))
    return sock


def frame(dst, src, payload, size=None):
    from vsockcompat.constants import DG_HEADER_FORMAT
    import struct
    return struct.pack(DG_HEADER_FORMAT, dst[0], dst[1], src[0], src[1],
                       len(payload) if size is None else size) + payload


def settle(ep, seconds=3.0):
    """Let ``ep`` process what reached it; nothing deliverable is expected."""
    with pytest.raises(Timeout):
        ep.recv(timeout=seconds)


def test_transport_identity(vsock_runtime, pair):
    a, b = pair
    transport = vsock_runtime.transport
    assert transport.name == "vsock" and transport.local_cid == VMADDR_CID_LOCAL
    assert a.handle.context == b.handle.context == VMADDR_CID_LOCAL
    assert a.handle.resource >= 1024 and b.handle.resource >= 1024
    assert a.handle != b.handle
    assert transport.endpoint_alive(a.handle)
    assert not transport.endpoint_alive(VMCIHandle(3, a.handle.resource))


@pytest.mark.parametrize("size", [0, 1, VMCI_MAX_DG_PAYLOAD_SIZE], ids=["0", "1", "max"])
def test_exchange_over_cid_1(pair, size):
    a, b = pair
    data = bytes((i * 7 + size) & 0xFF for i in range(size))
    assert a.send(b.handle, data) == size
    got = b.recv(timeout=WAIT)
    assert got.payload == data and got.src == VMCIHandle(VMADDR_CID_LOCAL, a.handle.resource)
    assert b.send(a.handle, data[::-1]) == size
    got = a.recv(timeout=WAIT)
    assert got.payload == data[::-1] and got.src == b.handle


def test_fifo_with_one_connect_per_destination(vsock_runtime, pair, monkeypatch):
    a, b = pair
    transport = vsock_runtime.transport
    connects = []
    real_connect = transport.connect

    def counting(src, dst):
        connects.append(dst)
        return real_connect(src, dst)

    monkeypatch.setattr(transport, "connect", counting)
    n = 200
    for i in range(n):
        a.send(b.handle, b"%d" % i)
    for i in range(n):
        got = b.recv(timeout=WAIT)
        assert got.payload == b"%d" % i and got.src == a.handle
    assert connects == [b.handle]
    assert b.stats.received == n and a.stats.sent == n


def test_explicit_rid_and_duplicate(vsock_runtime):
    with DatagramEndpoint(40000, runtime=vsock_runtime) as ep:
        assert ep.handle == VMCIHandle(VMADDR_CID_LOCAL, 40000)
        with pytest.raises(DuplicateEntry):
            DatagramEndpoint(40000, runtime=vsock_runtime)
    with DatagramEndpoint(40000, runtime=vsock_runtime) as again:   # free once closed
        assert again.handle.resource == 40000


def test_auto_rid_skips_a_port_in_use(vsock_runtime, vsock_socket):
    transport = vsock_runtime.transport
    taken = transport._next_rid
    holder = vsock_socket(socket.SOCK_SEQPACKET)
    holder.bind((VMADDR_CID_ANY, taken))
    with DatagramEndpoint(runtime=vsock_runtime) as ep:
        assert ep.handle.resource > taken


def test_unknown_port_is_invalid_resource(vsock_runtime, pair):
    a, _ = pair
    with DatagramEndpoint(runtime=vsock_runtime) as gone:
        dst = gone.handle
    with pytest.raises(InvalidResource):
        a.send(dst, b"anyone?")
    assert a.send_status(dst, b"x", 1) == InvalidResource.code


def test_a_peer_that_closes_is_reported_by_the_next_send(vsock_runtime):
    a = DatagramEndpoint(runtime=vsock_runtime)
    b = DatagramEndpoint(runtime=vsock_runtime)
    try:
        a.send(b.handle, b"first")
        assert b.recv(timeout=WAIT).payload == b"first"
        link = a._links[b.handle].link.sock
        b.close()
        poller = select.poll()
        poller.register(link, select.POLLIN | select.POLLHUP)
        assert poller.poll(WAIT * 1000), "the closed receiver's reset never reached the link"
        with pytest.raises(InvalidResource):
            a.send(b.handle, b"second")
        assert b.handle not in a._links
    finally:
        a.close()
        b.close()


def test_raw_client_speaking_the_wire_format_is_served(pair, vsock_socket):
    _, b = pair
    sock = raw_client(vsock_socket, b.handle.resource)
    sock.send(hello(5555))
    sock.send(frame(b.handle, (VMADDR_CID_LOCAL, 5555), b"raw but honest"))
    got = b.recv(timeout=WAIT)
    assert got == (VMCIHandle(VMADDR_CID_LOCAL, 5555), b"raw but honest")


def test_frames_that_contradict_the_hello_are_dropped_and_counted(pair, vsock_socket):
    a, b = pair
    liar = raw_client(vsock_socket, b.handle.resource)
    liar.send(hello(5555))
    liar.send(frame(b.handle, (VMADDR_CID_LOCAL, a.handle.resource), b"I am a"))
    other_context = raw_client(vsock_socket, b.handle.resource)
    other_context.send(hello(5556))
    other_context.send(frame(b.handle, (7, 5556), b"I am in context 7"))
    wrong_dst = raw_client(vsock_socket, b.handle.resource)
    wrong_dst.send(hello(5557))
    wrong_dst.send(frame((VMADDR_CID_LOCAL, b.handle.resource + 1), (VMADDR_CID_LOCAL, 5557), b"?"))
    settle(b)
    assert b.stats.forged == 3 and b.stats.received == 0
    # The endpoint keeps serving, and the liar's connection is gone.
    a.send(b.handle, b"honest")
    assert b.recv(timeout=WAIT) == (a.handle, b"honest")
    liar.settimeout(WAIT)
    try:
        assert liar.recv(10) == b""
    except ConnectionResetError:
        pass


def test_garbage_truncated_and_helloless_are_dropped(pair, vsock_socket):
    a, b = pair
    garbage = raw_client(vsock_socket, b.handle.resource)
    garbage.send(hello(6001))
    garbage.send(b"garbage")
    truncated = raw_client(vsock_socket, b.handle.resource)
    truncated.send(hello(6002))
    truncated.send(frame(b.handle, (VMADDR_CID_LOCAL, 6002), b"x" * 50, size=100))
    no_hello = raw_client(vsock_socket, b.handle.resource)
    no_hello.send(frame(b.handle, (VMADDR_CID_LOCAL, 6004), b"who am I"))
    bad_magic = raw_client(vsock_socket, b.handle.resource)
    bad_magic.send(b"VSC0" + hello(6005)[4:])
    settle(b)
    assert b.stats.bad_frames == 2 and b.stats.refused_connections == 2, b.stats
    assert b.stats.received == 0
    a.send(b.handle, b"still serving")
    assert b.recv(timeout=WAIT) == (a.handle, b"still serving")


def test_an_oversized_frame_is_dropped(pair, vsock_socket):
    _, b = pair
    oversized = raw_client(vsock_socket, b.handle.resource)
    oversized.send(hello(6003))
    oversized.send(frame(b.handle, (VMADDR_CID_LOCAL, 6003), b"y" * (VMCI_MAX_DG_PAYLOAD_SIZE + 1)))
    try:
        got = b.recv(timeout=3)
    except Timeout:
        got = None
    assert got is None and b.stats.bad_frames == 1


def test_a_sender_that_outruns_the_receiver_gets_no_resources(pair):
    """Over vsock the bound is the kernel's connection buffer, not the SDK's 139,264 bytes."""
    a, b = pair
    payload = bytearray(VMCI_MAX_DG_PAYLOAD_SIZE)
    sent = 0
    with pytest.raises(NoResources):
        for i in range(1000):
            payload[:4] = i.to_bytes(4, "little")
            a.send(b.handle, payload)
            sent += 1
    received, last = 0, -1
    while True:
        try:
            got = b.recv(timeout=3)
        except Timeout:
            break
        index = int.from_bytes(got.payload[:4], "little")
        assert index > last and got.payload[4:] == bytes(len(payload) - 4)
        last = index
        received += 1
    print("back-pressure: %d sent before NO_RESOURCES, %d received intact, stats %r"
          % (sent, received, b.stats))
    assert sent >= 1 and received >= 1
    # After draining, the sender is served again (reconnecting if the kernel split a message).
    a.send(b.handle, b"after")
    assert b.recv(timeout=WAIT).payload == b"after"

