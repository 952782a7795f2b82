"""Transport selection and the vsock transport's host-safe parts (runs on any machine).

This machine's AF_VSOCK leads to a hypervisor host that is not ours: every test here runs with
``socket.socket`` patched to refuse AF_VSOCK and ``/dev/vsock`` patched shut, so no AF_VSOCK
socket is ever created. The vsock transport's real behaviour is tested in the guest test bed
(tests/real_vsock/test_vsock_transport.py).
"""
import errno
import os
import socket

import pytest

from vsockcompat._settings import Settings
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.handles import VMCIHandle
from vsockcompat.runtime import Runtime
from vsockcompat.transport import LocalTransport, TransportUnavailable, open_transport
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
    assert len(vsock_refused) == 1 and vsock_refused[0][1][0] & socket.SOCK_SEQPACKET


def test_vsock_runtime_reports_unavailable(vsock_refused, core, rundir):
    rt = Runtime(settings(rundir, "vsock"), core=core)
    with pytest.raises(TransportUnavailable):
        DatagramEndpoint(runtime=rt)


def test_vsock_without_a_local_cid_is_unavailable(vsock_refused, monkeypatch, core):
    monkeypatch.setattr(vsock_module, "_vsock_socket",
                        lambda: socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))
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
    monkeypatch.setattr(vsock_module, "_vsock_socket",
                        lambda: socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))
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
