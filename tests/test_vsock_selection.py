"""Transport selection and the vsock transport's host-safe parts (runs on any machine).

This machine's AF_VSOCK leads to a hypervisor host that is not ours: every test here runs with
``socket.socket`` patched to refuse AF_VSOCK and ``/dev/vsock`` patched shut, so no AF_VSOCK
socket is ever created. The vsock transport's real behaviour is tested in the guest test bed
(tests/real_vsock/test_vsock_transport.py).
"""
import errno
import os
import select
import socket
import struct
import threading

import pytest

from vsockcompat._settings import Settings
from vsockcompat.constants import DG_HEADER_FORMAT, VMCI_MAX_DG_PAYLOAD_SIZE
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.handles import VMCIHandle
from vsockcompat.runtime import Runtime
from vsockcompat.transport import LocalTransport, TransportUnavailable, open_transport
from vsockcompat.transport.base import Peer
from vsockcompat.transport import streams
from vsockcompat.transport import vsock as vsock_module

AF_VSOCK = 40


@pytest.fixture
def vsock_refused(monkeypatch):
    """socket.socket(AF_VSOCK, ...) raises EAFNOSUPPORT and is recorded; /dev/vsock cannot be
    opened. Returns the list of AF_VSOCK requests."""
    real_socket, real_open = socket.socket, os.open
    requests = []

    class Guarded(real_socket):
        def __init__(self, family=-1, *args, **kwargs):
            if family == AF_VSOCK:
                requests.append((family, args, kwargs))
                raise OSError(errno.EAFNOSUPPORT, "AF_VSOCK refused by the test")
            super().__init__(family, *args, **kwargs)

    def guarded_open(path, *args, **kwargs):
        if os.fspath(path) == "/dev/vsock":
            raise AssertionError("/dev/vsock was opened")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", Guarded)
    monkeypatch.setattr(os, "open", guarded_open)
    return requests


def virtio_like(kind=socket.SOCK_SEQPACKET):
    """A stand-in for ``_vsock_socket`` on a kernel without a datagram transport (virtio,
    loopback): SOCK_DGRAM fails with ENODEV, other types give an AF_UNIX SEQPACKET socket."""
    if kind & 0xF == socket.SOCK_DGRAM:
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def settings(rundir, transport):
    return Settings(no_extensions=False, rundir=rundir, cid=2, transport=transport,
                    ds_autostart=False)


@pytest.mark.parametrize("name", ["auto", "local"])
def test_auto_and_local_are_the_local_transport_without_af_vsock(vsock_refused, core, rundir, name):
    transport = open_transport(settings(rundir, name), core)
    assert isinstance(transport, LocalTransport) and transport.name == "local"
    # and the whole path of an endpoint on it
    rt = Runtime(settings(rundir, name), core=core)
    with DatagramEndpoint(runtime=rt) as a, DatagramEndpoint(runtime=rt) as b:
        a.send(b.handle, b"x")
        assert b.recv(timeout=5).payload == b"x"
    assert vsock_refused == []


def test_vsock_is_attempted_only_when_asked(vsock_refused, core, rundir):
    with pytest.raises(TransportUnavailable) as info:
        open_transport(settings(rundir, "vsock"), core)
    assert "SOCK_SEQPACKET" in str(info.value) and "Errno %d" % errno.EAFNOSUPPORT in str(info.value)
    # auto probes DGRAM, then SEQPACKET, then STREAM: socket() only, nothing bound or connected
    kinds = [request[1][0] & 0xF for request in vsock_refused]
    assert kinds == [socket.SOCK_DGRAM, socket.SOCK_SEQPACKET, socket.SOCK_STREAM]


def test_vsock_runtime_reports_unavailable(vsock_refused, core, rundir):
    rt = Runtime(settings(rundir, "vsock"), core=core)
    with pytest.raises(TransportUnavailable):
        DatagramEndpoint(runtime=rt)


def test_vsock_without_a_local_cid_is_unavailable(vsock_refused, monkeypatch, core):
    monkeypatch.setattr(vsock_module, "_vsock_socket", virtio_like)
    monkeypatch.setattr(vsock_module, "read_local_cid", lambda device="": vsock_module.VMADDR_CID_ANY)
    with pytest.raises(TransportUnavailable, match="local CID"):
        vsock_module.VsockTransport(core)
    assert vsock_refused == []


# identify(): the hello, checked over an AF_UNIX SEQPACKET pair standing in for a connection.

class FakeConn:
    """An accepted connection: a SEQPACKET socket whose peer address is a vsock (cid, port)."""

    def __init__(self, sock, peer):
        self._sock, self._peer = sock, peer

    def getpeername(self):
        return self._peer

    def fileno(self):
        return self._sock.fileno()

    def recvmsg(self, *args):
        return self._sock.recvmsg(*args)


@pytest.fixture
def transport(vsock_refused, monkeypatch, core):
    monkeypatch.setattr(vsock_module, "_vsock_socket", virtio_like)
    monkeypatch.setattr(vsock_module, "HELLO_TIMEOUT", 0.05)
    yield vsock_module.VsockTransport(core, cid=7)
    assert vsock_refused == []


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


HELLO = vsock_module.HELLO
MAGIC = vsock_module.HELLO_MAGIC


def test_hello_wire_format():
    assert HELLO.pack(MAGIC, 1025) == b"VSC1\x01\x04\x00\x00"


@pytest.mark.parametrize("peer_cid, expected_cid", [(1, 7), (7, 7), (3, 3), (2, 2)])
def test_identify_takes_the_context_from_the_kernel_and_the_rid_from_the_hello(
        transport, pair, peer_cid, expected_cid):
    client, server = pair
    client.send(HELLO.pack(MAGIC, 4321))
    client.send(b"a datagram frame stays queued")
    peer = transport.identify(FakeConn(server, (peer_cid, 99999)), VMCIHandle(7, 1024))
    assert peer.handle == VMCIHandle(expected_cid, 4321)
    assert server.recv(100) == b"a datagram frame stays queued"


@pytest.mark.parametrize("hello", [
    b"", b"VSC1", HELLO.pack(MAGIC, 5) + b"x", HELLO.pack(MAGIC ^ 1, 5),
    HELLO.pack(MAGIC, 0xFFFFFFFF), b"\0" * 24 + b"payload",
], ids=["empty", "short", "long", "magic", "invalid-rid", "frame-first"])
def test_identify_refuses_a_bad_hello(transport, pair, hello):
    client, server = pair
    client.send(hello)
    assert transport.identify(FakeConn(server, (1, 5000)), VMCIHandle(7, 1024)) is None


def test_identify_refuses_a_silent_connection(transport, pair):
    _, server = pair
    assert transport.identify(FakeConn(server, (1, 5000)), VMCIHandle(7, 1024)) is None


def test_endpoint_alive_only_for_our_own_bound_endpoints(transport):
    assert transport.local_cid == 7
    assert not transport.endpoint_alive(VMCIHandle(7, 1024))
    assert not transport.endpoint_alive(VMCIHandle(2, 1024))


def test_links_refuse_impossible_destinations_before_any_socket(transport, vsock_refused):
    from vsockcompat.errors import DstUnreachable, InvalidResource
    with pytest.raises(DstUnreachable):
        transport.connect(VMCIHandle(7, 1024), VMCIHandle(0, 1024))
    with pytest.raises(DstUnreachable):
        transport.connect(VMCIHandle(7, 1024), VMCIHandle(0xFFFFFFFF, 1024))
    with pytest.raises(InvalidResource):
        transport.connect(VMCIHandle(7, 1024), VMCIHandle(1, 0xFFFFFFFF))


# The link pump, over AF_UNIX stand-ins: whole messages forwarded, and it ends on either side.

def _pump_rig():
    import threading
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    vs, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pump = threading.Thread(target=vsock_module._pump, args=(back, vs), daemon=True)
    pump.start()
    return front, vs, receiver, pump


def test_pump_forwards_whole_messages_and_stops_when_the_link_closes():
    front, vs, receiver, pump = _pump_rig()
    receiver.settimeout(5)
    messages = [b"\1" * 24, b"\2" * 69632, b"\3" * 30]
    for message in messages:
        front.send(message)
    assert [receiver.recv(70000) for _ in messages] == messages
    front.close()
    pump.join(5)
    assert not pump.is_alive()
    vs.close()
    receiver.close()


def test_pump_stops_and_closes_the_link_when_the_receiver_hangs_up():
    import select
    front, vs, receiver, pump = _pump_rig()
    receiver.close()
    pump.join(5)
    assert not pump.is_alive()
    poller = select.poll()
    poller.register(front, select.POLLIN)
    assert poller.poll(1000)
    with pytest.raises(OSError) as info:
        front.send(b"x" * 24)
    assert info.value.errno in (errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED)
    front.close()
    vs.close()


def test_disconnect_lets_the_pump_forward_what_was_sent(transport):
    """A reply sent just before its link is closed (the daemon's forget) still leaves."""
    src, dst = VMCIHandle(7, 1), VMCIHandle(7, 1024)
    for i in range(50):
        vs, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        link = transport._start_link(vs, src, dst, stream=False)
        link.sock.send(b"reply %d" % i)
        transport.disconnect(src, link)
        receiver.settimeout(5)
        assert receiver.recv(100) == b"reply %d" % i
        assert receiver.recv(100) == b""
        receiver.close()


# The well-known context (the discovery service at (1, 1)): served by the host.

@pytest.mark.parametrize("local_cid, expected", [(1, 1), (2, 1), (3, 2), (0xFFFFFFFE, 2)])
def test_context_1_is_reached_on_the_host(local_cid, expected):
    assert vsock_module.well_known_cid(local_cid) == expected


def test_a_guest_cannot_serve_context_1(vsock_refused, monkeypatch, core):
    monkeypatch.setattr(vsock_module, "_vsock_socket", virtio_like)
    with pytest.raises(TransportUnavailable, match="served by the host"):
        vsock_module.VsockTransport(core, cid=3, context=1)
    with pytest.raises(TransportUnavailable, match="not in 5"):
        vsock_module.VsockTransport(core, cid=3, context=5)
    host = vsock_module.VsockTransport(core, cid=2, context=1)
    assert host.local_cid == 1 and host.kernel_cid == 2
    assert host.vsock_address(VMCIHandle(1, 1)) == (1, 1)
    guest = vsock_module.VsockTransport(core, cid=3)
    assert guest.vsock_address(VMCIHandle(1, 1)) == (2, 1)
    assert guest.vsock_address(VMCIHandle(4, 1500)) == (4, 1500)


def test_hello_of_the_well_known_context():
    assert vsock_module.encode_hello(1, well_known=True) == b"VSW1\x01\x00\x00\x00"
    assert vsock_module.decode_hello(b"VSW1\x01\x00\x00\x00") == (True, 1)
    assert vsock_module.decode_hello(b"VSC1\x01\x04\x00\x00") == (False, 1025)
    assert vsock_module.parse_hello(b"VSW1\x01\x00\x00\x00") is None  # not a plain hello


@pytest.mark.parametrize("peer_cid, accepted", [(1, True), (7, True), (2, True), (3, False), (8, False)])
def test_only_the_host_or_this_kernel_may_claim_context_1(transport, pair, peer_cid, accepted):
    client, server = pair
    client.send(vsock_module.encode_hello(1, well_known=True))
    peer = transport.identify(FakeConn(server, (peer_cid, 99999)), VMCIHandle(7, 1024))
    assert (peer.handle if peer else None) == (VMCIHandle(1, 1) if accepted else None)


def test_daemon_transport():
    from vsockcompat.ds_server import daemon_transport
    assert [daemon_transport(n) for n in ("auto", "local", "vsock", "hybrid")] == [
        "local", "local", "vsock", "hybrid"]


def test_open_transport_passes_the_well_known_context_and_the_mode(vsock_refused, monkeypatch, core, rundir):
    made = []
    monkeypatch.setattr(vsock_module, "VsockTransport", lambda core, **kw: made.append(kw) or kw)
    open_transport(settings(rundir, "vsock")._replace(cid=1, vsock_mode="stream"), core)
    open_transport(settings(rundir, "vsock"), core)
    assert made == [{"context": 1, "mode": "stream"}, {"context": None, "mode": "auto"}]


# Modes: chosen by creating sockets only.

@pytest.mark.parametrize("refused, requested, expected", [
    ((), "auto", "dgram"), ((socket.SOCK_DGRAM,), "auto", "seqpacket"),
    ((socket.SOCK_DGRAM, socket.SOCK_SEQPACKET), "auto", "stream"),
    ((), "stream", "stream"), ((), "seqpacket", "seqpacket"), ((), "dgram", "dgram"),
])
def test_choose_mode(monkeypatch, refused, requested, expected):
    made = []

    def fake(kind=socket.SOCK_SEQPACKET):
        made.append(kind)
        if kind in refused:
            raise OSError(errno.ESOCKTNOSUPPORT, "refused")
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    monkeypatch.setattr(vsock_module, "_vsock_socket", fake)
    assert vsock_module.choose_mode(requested) == expected


def test_choose_mode_reports_what_cannot_be_made(vsock_refused):
    with pytest.raises(TransportUnavailable, match="SOCK_STREAM"):
        vsock_module.choose_mode("stream")
    with pytest.raises(TransportUnavailable, match="SOCK_DGRAM"):
        vsock_module.choose_mode("dgram")
    with pytest.raises(TransportUnavailable, match="unknown vsock mode"):
        vsock_module.choose_mode("datagram")


# The stream receiver: a StreamListener over an AF_UNIX stream listener standing in for vsock.

FRAME = struct.Struct(DG_HEADER_FORMAT)


def frame(dst, src, payload, size=None):
    return FRAME.pack(*dst, *src, len(payload) if size is None else size) + payload


@pytest.fixture
def stream_listener(tmp_path, monkeypatch):
    monkeypatch.setattr(streams, "HELLO_TIMEOUT", 0.5)
    path = str(tmp_path / "l")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    listener = vsock_module.StreamListener(
        sock, lambda conn, hello: None if hello[0] else Peer(VMCIHandle(9, hello[1]), 0, None), "test")
    clients = []

    def connect(data=b""):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        client.sendall(data)
        clients.append(client)
        return client

    def accept():
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        assert poller.poll(5000), "no connection was handed over"
        front, _ = listener.accept()
        front.settimeout(5)
        return front, listener.peer(front)

    yield connect, accept, listener
    listener.close()
    for client in clients:
        client.close()


def test_stream_frames_become_whole_messages(stream_listener):
    connect, accept, _ = stream_listener
    frames = [frame((7, 1024), (9, 5000), bytes([i]) * size)
              for i, size in enumerate((0, 1, 4096, VMCI_MAX_DG_PAYLOAD_SIZE))]
    client = connect(HELLO.pack(MAGIC, 5000))
    for f in frames:  # in pieces that do not follow frame boundaries
        data = f
        while data:
            client.sendall(data[:1000])
            data = data[1000:]
    front, peer = accept()
    assert peer.handle == VMCIHandle(9, 5000)
    for f in frames:
        assert front.recv(VMCI_MAX_DG_PAYLOAD_SIZE + 100) == f
    client.close()
    assert front.recv(100) == b""
    front.close()


@pytest.mark.parametrize("data, expected", [
    (frame((7, 1), (9, 1), b"", size=VMCI_MAX_DG_PAYLOAD_SIZE + 1), "header"),
    (frame((7, 1), (9, 1), b"x" * 10, size=100), "partial"),
    (frame((7, 1), (9, 1), b"")[:10], "partial"),
])
def test_bad_stream_frames_are_forwarded_short_and_end_the_stream(stream_listener, data, expected):
    connect, accept, _ = stream_listener
    client = connect(HELLO.pack(MAGIC, 1) + data)
    client.shutdown(socket.SHUT_WR)
    front, peer = accept()
    assert peer.handle == VMCIHandle(9, 1)
    got = front.recv(VMCI_MAX_DG_PAYLOAD_SIZE + 100)
    assert got == (data[:24] if expected == "header" else data)
    assert front.recv(100) == b""
    front.close()


@pytest.mark.parametrize("hello", [b"", b"VSC1", HELLO.pack(MAGIC ^ 1, 5), vsock_module.encode_hello(1, True)],
                         ids=["silent", "short", "magic", "refused-claim"])
def test_stream_without_a_valid_hello_is_handed_over_refused(stream_listener, hello):
    connect, accept, _ = stream_listener
    connect(hello)
    front, peer = accept()
    assert peer is None
    front.close()


def test_stream_listener_close_ends_readers_and_waiting_connections(stream_listener):
    connect, accept, listener = stream_listener
    connect(HELLO.pack(MAGIC, 1) + frame((7, 1), (9, 1), b"x"))
    connect(HELLO.pack(MAGIC, 2))
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    assert poller.poll(5000)
    before = threading.active_count()
    listener.close()
    assert threading.active_count() < before


@pytest.mark.parametrize("name, child", [("vsock_pingpong", ["--serve", "--rundir", "/nonexistent"]),
                                         ("vsock_qp_stream", ["--produce", "--rundir", "/nonexistent"])])
def test_the_vsock_benchmarks_refuse_outside_the_guest(vsock_refused, monkeypatch, capsys, name, child):
    import importlib.util
    import sys
    benchmarks = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    monkeypatch.setattr(sys, "path", [benchmarks] + sys.path)  # as when run as a script
    monkeypatch.delitem(sys.modules, "vsock_pingpong", raising=False)
    spec = importlib.util.spec_from_file_location(name, os.path.join(benchmarks, name + ".py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.delenv("VSOCKCOMPAT_TESTBED", raising=False)
    assert bench.main(["--quick"]) == 2
    assert bench.main(child) == 2
    assert "%s: refusing to run" % name in capsys.readouterr().err
    assert vsock_refused == []
