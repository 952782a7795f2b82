"""Real AF_VSOCK, inside the guest test bed: the kernel facts the vsock transport will rely on.

Tests marked ``vsock`` run only where the gate of ``conftest.py`` opens (inside the guest booted
by ``testbed/guest.py``, with ``vsock_loopback`` and no way out); everywhere else they skip with
the reason. The unmarked tests at the top check the gate itself and run everywhere.

Run them:  python testbed/guest.py run -- python -m pytest tests/real_vsock -m vsock
"""
import errno
import fcntl
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading

import pytest

from vsockcompat.constants import VMCI_MAX_DG_PAYLOAD_SIZE, VMCI_MAX_DG_SIZE
from vsockcompat.datagram import DatagramEndpoint

from bed_gates import IOCTL_VM_SOCKETS_GET_LOCAL_CID

from .conftest import AF_VSOCK, VMADDR_CID_LOCAL, gate

VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_PORT_ANY = 0xFFFFFFFF
LAST_RESERVED_PORT = 1023
LISTEN_PORT = 0x5643          # any fixed port: the guest is ours alone
IN_BED = os.environ.get("VSOCKCOMPAT_TESTBED") == "1"
vsock = pytest.mark.vsock


# ---------------------------------------------------------------- the gate (runs everywhere)

@pytest.fixture
def no_vsock(monkeypatch):
    """Makes creating an AF_VSOCK socket, or opening /dev/vsock, fail the test."""
    real_socket, real_open = socket.socket, os.open

    class Guarded(real_socket):
        def __init__(self, family=-1, *args, **kwargs):
            if family == AF_VSOCK:
                raise AssertionError("an AF_VSOCK socket was created")
            super().__init__(family, *args, **kwargs)

    def guarded_open(path, *args, **kwargs):
        if os.fspath(path) == "/dev/vsock":
            raise AssertionError("/dev/vsock was opened")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", Guarded)
    monkeypatch.setattr(os, "open", guarded_open)


def fake_sysfs(root, modules=(), virtio=()):
    for name in modules:
        os.makedirs(os.path.join(root, "module", name))
    for i, kind in enumerate(virtio):
        os.makedirs(os.path.join(root, "bus", "virtio", "devices", "virtio%d" % i))
        with open(os.path.join(root, "bus", "virtio", "devices", "virtio%d" % i, "device"), "w") as f:
            f.write("0x%04x\n" % kind)
    return str(root)


def test_gate_needs_the_testbed_variable(no_vsock):
    for environ in ({}, {"VSOCKCOMPAT_TESTBED": "0"}, {"VSOCKCOMPAT_TESTBED": "yes"}):
        assert "VSOCKCOMPAT_TESTBED=1" in gate(environ)


@pytest.mark.parametrize("modules, virtio, expected", [
    ((), (), "vsock_loopback is not loaded"),
    (("vsock", "vmw_vsock_virtio_transport"), (), "vsock_loopback is not loaded"),
    (("vsock_loopback", "vmw_vsock_virtio_transport"), (), "vmw_vsock_virtio_transport loaded"),
    (("vsock_loopback", "vmw_vsock_vmci_transport"), (), "vmw_vsock_vmci_transport loaded"),
    (("vsock_loopback", "hv_sock"), (), "hv_sock loaded"),
    (("vsock_loopback",), (1, 19), "virtio vsock device virtio1 present"),
    (("vsock_loopback",), (1, 2), "cannot read the local CID"),
], ids=["nothing", "host-like", "virtio", "vmci", "hyperv", "builtin-virtio", "no-dev"])
def test_gate_closes_on_each_condition(no_vsock, tmp_path, modules, virtio, expected):
    sysfs = fake_sysfs(tmp_path, modules, virtio)
    assert expected in gate({"VSOCKCOMPAT_TESTBED": "1"}, sysfs=sysfs,
                            dev=str(tmp_path / "no-such-device"))


@pytest.mark.skipif(IN_BED, reason="inside the guest test bed, where the gate is open")
def test_gate_is_closed_on_this_machine_even_with_the_variable(no_vsock, monkeypatch):
    monkeypatch.setenv("VSOCKCOMPAT_TESTBED", "1")
    reason = gate()
    assert reason is not None and "VSOCKCOMPAT_TESTBED" not in reason, reason


INNER_TEST = textwrap.dedent('''
    import os, socket, pytest

    _real = socket.socket

    class _Guarded(_real):
        def __init__(self, family=-1, *args, **kwargs):
            if family == 40:
                open(os.path.join(os.path.dirname(__file__), "vsock-socket-made"), "w").close()
                raise AssertionError("an AF_VSOCK socket was created")
            super().__init__(family, *args, **kwargs)

    socket.socket = _Guarded

    @pytest.fixture
    def witness():
        open(os.path.join(os.path.dirname(__file__), "fixture-ran"), "w").close()

    @pytest.mark.vsock
    def test_marked(witness, vsock_socket):
        vsock_socket(socket.SOCK_STREAM)
''')


def run_inner(tmp_path, testbed_variable, status=0):
    """A pytest run of one marked test with the gate's conftest; returns its output."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name, source in (("conftest.py", here), ("bed_gates.py", os.path.dirname(here))):
        with open(os.path.join(source, name)) as f:
            (tmp_path / name).write_text(f.read())
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VSOCKCOMPAT_TESTBED",
                                                                    "PYTEST_"))}
    if testbed_variable:
        env["VSOCKCOMPAT_TESTBED"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs",
                           "-q", str(tmp_path)], cwd=str(tmp_path), env=env, timeout=100,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert not (tmp_path / "vsock-socket-made").exists(), proc.stdout
    assert not (tmp_path / "fixture-ran").exists(), "a fixture ran before the gate:\n" + proc.stdout
    assert proc.returncode == status and "1 skipped" in proc.stdout, proc.stdout
    return proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(IN_BED, reason="the gate's own proof runs on the host (about 40 s under TCG)")
def test_marked_test_skips_before_its_fixtures_without_the_variable(tmp_path):
    assert "VSOCKCOMPAT_TESTBED=1 is not set" in run_inner(tmp_path, testbed_variable=False)


@pytest.mark.slow
@pytest.mark.skipif(IN_BED, reason="inside the guest test bed, where the gate is open")
def test_marked_test_skips_here_even_with_the_variable(tmp_path):
    """VSOCKCOMPAT_TESTBED=1 set by hand on a machine that is not the bed: skipped, no socket,
    and the session fails so that nobody mistakes it for a run of the real-vsock tests."""
    out = run_inner(tmp_path, testbed_variable=True, status=1)
    assert "vsock_loopback is not loaded" in out or "could leave this machine" in out, out
    assert "the test bed is broken" in out, out


# ---------------------------------------------------------------- real AF_VSOCK (guest only)

def listen(vsock_socket, kind, port=VMADDR_PORT_ANY):
    server = vsock_socket(kind)
    server.bind((VMADDR_CID_ANY, port))
    server.listen(4)
    return server, server.getsockname()[1]


def connected(vsock_socket, kind):
    """(client, accepted, accept's address, listening port) over CID 1."""
    server, port = listen(vsock_socket, kind)
    client = vsock_socket(kind)
    client.connect((VMADDR_CID_LOCAL, port))
    accepted, addr = server.accept()
    vsock_socket.adopt(accepted)
    accepted.settimeout(client.gettimeout())
    return client, accepted, addr, port


def recv_exactly(sock, n):
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 16))
        assert chunk, "EOF after %d of %d bytes" % (got, n)
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@vsock
def test_stream_echo_on_cid_1(vsock_socket):
    client, accepted, _, _ = connected(vsock_socket, socket.SOCK_STREAM)

    def echo():
        while True:
            data = accepted.recv(1 << 16)
            if not data:
                return
            accepted.sendall(data)

    echoer = threading.Thread(target=echo, daemon=True)
    echoer.start()
    for size in (1, 4096, 1 << 20):        # 1 MiB: more than the 256 KiB vsock buffer
        data = os.urandom(size)
        sender = threading.Thread(target=client.sendall, args=(data,), daemon=True)
        sender.start()
        assert recv_exactly(client, size) == data
        sender.join(10)
    client.shutdown(socket.SHUT_WR)
    echoer.join(10)
    assert not echoer.is_alive()


@vsock
def test_seqpacket_keeps_message_boundaries(vsock_socket):
    client, accepted, _, _ = connected(vsock_socket, socket.SOCK_SEQPACKET)
    sizes = (1, 7, 4096, 65536, VMCI_MAX_DG_SIZE, 3)
    assert VMCI_MAX_DG_SIZE == 69632
    messages = [bytes([i + 1]) * size for i, size in enumerate(sizes)]
    for message in messages:
        assert client.send(message) == len(message)
    for message in messages:
        assert accepted.recv(VMCI_MAX_DG_SIZE + 4096) == message
    # and back, the other way
    accepted.send(b"reply")
    assert client.recv(100) == b"reply"


@vsock
def test_seqpacket_short_buffer_truncates_one_message(vsock_socket):
    client, accepted, _, _ = connected(vsock_socket, socket.SOCK_SEQPACKET)
    client.send(b"x" * 100)
    client.send(b"next")
    data, _, flags, _ = accepted.recvmsg(10)
    assert data == b"x" * 10 and flags & socket.MSG_TRUNC
    assert accepted.recv(100) == b"next", "the rest of the long message is dropped"


@vsock
def test_dgram_is_not_offered(vsock_socket):
    with pytest.raises(OSError) as info:
        vsock_socket(socket.SOCK_DGRAM)
    assert info.value.errno == errno.ENODEV


@vsock
def test_local_cid_ioctl_says_1():
    fd = os.open("/dev/vsock", os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = fcntl.ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, b"\0" * 4)
    finally:
        os.close(fd)
    assert struct.unpack("I", raw)[0] == VMADDR_CID_LOCAL


@vsock
@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET],
                         ids=["stream", "seqpacket"])
def test_peer_addresses_carry_the_cid(vsock_socket, kind):
    client, accepted, addr, port = connected(vsock_socket, kind)
    client_port = client.getsockname()[1]
    assert accepted.getpeername() == addr == (VMADDR_CID_LOCAL, client_port)
    assert client.getpeername() == (VMADDR_CID_LOCAL, port)
    # The client's own address does not name its CID: the transport must ask the ioctl.
    assert client.getsockname() == (VMADDR_CID_ANY, client_port)


@vsock
def test_listener_on_a_port_and_an_ephemeral_client_port(vsock_socket):
    server, port = listen(vsock_socket, socket.SOCK_STREAM, LISTEN_PORT)
    assert port == LISTEN_PORT
    assert server.getsockname() == (VMADDR_CID_ANY, LISTEN_PORT)
    client = vsock_socket(socket.SOCK_STREAM)
    client.connect((VMADDR_CID_LOCAL, LISTEN_PORT))
    accepted, _ = server.accept()
    vsock_socket.adopt(accepted)
    client_port = client.getsockname()[1]
    assert LAST_RESERVED_PORT < client_port < VMADDR_PORT_ANY
    assert client_port != LISTEN_PORT
    other = vsock_socket(socket.SOCK_STREAM)
    with pytest.raises(OSError) as info:
        other.bind((VMADDR_CID_ANY, LISTEN_PORT))
    assert info.value.errno == errno.EADDRINUSE


@vsock
def test_connect_to_a_port_without_listener_fails_at_once(vsock_socket):
    """No listener: the peer answers with a reset. Linux 6.1's loopback reports EPROTO (seen in
    the bed), other kernels ECONNRESET: the transport maps both to "destination unreachable"."""
    _, port = listen(vsock_socket, socket.SOCK_STREAM)
    client = vsock_socket(socket.SOCK_STREAM)
    with pytest.raises(OSError) as info:
        client.connect((VMADDR_CID_LOCAL, port + 1 if port + 1 < VMADDR_PORT_ANY else 1024))
    assert info.value.errno in (errno.ECONNRESET, errno.EPROTO), info.value


@vsock
def test_the_package_works_under_the_guest_kernel(runtime):
    """A few of the local-transport tests, under the guest's kernel, on both cores."""
    with DatagramEndpoint(runtime=runtime) as server, DatagramEndpoint(runtime=runtime) as client:
        assert client.send(server.handle, b"ping from the guest") == 19
        datagram = server.recv(timeout=30)
        assert datagram.payload == b"ping from the guest" and datagram.src == client.handle
        client_payload = os.urandom(VMCI_MAX_DG_PAYLOAD_SIZE)
        server.send(client.handle, client_payload)
        assert client.recv(timeout=30).payload == client_payload
