"""The hybrid transport (host side of Firecracker / Cloud Hypervisor / vhost-user-vsock), on both cores.

A fake VMM written here stands in for the VMM: a Unix listener at the VMM socket path that speaks
the ``CONNECT <port>\\n`` / ``OK <hostport>\\n`` handshake and hands each connection to a fake
guest; the guest's replies come back, as the VMM would deliver them, through
``<uds_path>_<port>``. Only AF_UNIX is used: AF_VSOCK is refused for the whole module.
"""
import contextlib
import os
import queue
import select
import socket
import struct
import threading
import time

import pytest

from vsockcompat._settings import SettingError, Settings
from vsockcompat.constants import DG_HEADER_FORMAT, VMCI_MAX_DG_PAYLOAD_SIZE
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.errors import DstUnreachable, DuplicateEntry, InvalidResource, Timeout
from vsockcompat.handles import VMCIHandle
from vsockcompat.runtime import Runtime
from vsockcompat.transport import TransportUnavailable, open_transport
from vsockcompat.transport import hybrid as hybrid_module
from vsockcompat.transport import streams
from vsockcompat.transport import vsock as vsock_module
from vsockcompat.transport.hybrid import HybridTransport

AF_VSOCK = 40
GUEST = 3
FRAME = struct.Struct(DG_HEADER_FORMAT)
WAIT = 10.0


@pytest.fixture(autouse=True)
def no_af_vsock(monkeypatch):
    real_socket = socket.socket

    class Guarded(real_socket):
        def __init__(self, family=-1, *args, **kwargs):
            if family == AF_VSOCK:
                raise AssertionError("an AF_VSOCK socket was created")
            super().__init__(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", Guarded)
    monkeypatch.setattr(hybrid_module, "HANDSHAKE_TIMEOUT", 1.0)
    monkeypatch.setattr(streams, "HELLO_TIMEOUT", 1.0)


def frame(dst, src, payload, size=None):
    return FRAME.pack(*dst, *src, len(payload) if size is None else size) + payload


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_frame(sock):
    header = recv_exact(sock, FRAME.size)
    if len(header) < FRAME.size:
        return None
    fields = FRAME.unpack(header)
    return fields, recv_exact(sock, fields[4])


class FakeVMM:
    """A VMM's hybrid-vsock socket. ``answer(port)`` says what to do with ``CONNECT port``:
    ``"ok"`` (answer ``OK``, then hand the stream to ``guest``), ``"close"``, ``"silent"``, or
    bytes to answer verbatim."""

    def __init__(self, path, guest):
        self.path = path
        self.guest = guest
        self.answer = lambda port: "ok"
        self.connects = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(16)
        self._stop_r, self._stop_w = os.pipe()
        self._held = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        next_port = 1 << 30
        while True:
            if any(fd == self._stop_r for fd, _ in poller.poll()):
                return
            conn, _ = self._sock.accept()
            conn.settimeout(WAIT)
            line = b""
            while not line.endswith(b"\n"):
                byte = conn.recv(1)
                if not byte:
                    break
                line += byte
            port = int(line.split()[1])
            self.connects.append(port)
            what = self.answer(port)
            if what == "ok":
                conn.sendall(b"OK %d\n" % next_port)
                next_port += 1
                self.guest(port, conn)
            elif what == "close":
                conn.close()
            elif what == "silent":
                self._held.append(conn)
            else:
                conn.sendall(what)
                self._held.append(conn)

    def close(self):
        os.write(self._stop_w, b"x")
        self._thread.join(WAIT)
        for sock in self._held:
            sock.close()
        self._sock.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


class EchoGuest:
    """A guest whose endpoints echo every datagram back through ``<uds>_<src port>``."""

    def __init__(self, uds):
        self.uds = uds
        self.received = queue.Queue()
        self.threads = []
        self.socks = []

    def __call__(self, port, conn):
        thread = threading.Thread(target=self._serve, args=(port, conn), daemon=True)
        self.threads.append(thread)
        thread.start()

    def _serve(self, port, conn):
        self.socks.append(conn)
        hello = vsock_module.decode_hello(recv_exact(conn, 8))
        self.received.put(("hello", hello))
        back = None
        while True:
            got = read_frame(conn)
            if got is None:
                break
            fields, payload = got
            self.received.put(("frame", fields, payload))
            if back is None:
                back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                back.connect("%s_%d" % (self.uds, hello[1]))
                back.sendall(vsock_module.encode_hello(port))
                self.socks.append(back)
            back.sendall(frame(fields[2:4], (GUEST, port), payload[::-1]))
        conn.close()
        if back is not None:
            back.close()


@pytest.fixture
def vmm(tmp_path):
    uds = str(tmp_path / "vm.vsock")
    guest = EchoGuest(uds)
    fake = FakeVMM(uds, guest)
    yield fake
    fake.close()
    for thread in guest.threads:
        thread.join(WAIT)


@pytest.fixture
def hybrid_runtime(core, rundir, vmm):
    settings = Settings(no_extensions=False, rundir=rundir, cid=2, transport="hybrid",
                        ds_autostart=False)._replace(hybrid_uds=vmm.path, hybrid_cid=GUEST)
    rt = Runtime(settings, core=core)
    assert isinstance(rt.transport, HybridTransport) and rt.transport.local_cid == 2
    return rt


def connect_as_guest(vmm, rid, data):
    """A guest-initiated connection to host port ``rid``, as the VMM delivers it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect("%s_%d" % (vmm.path, rid))
    sock.sendall(data)
    return sock


def test_round_trip_host_to_guest_and_back(hybrid_runtime, vmm):
    with DatagramEndpoint(runtime=hybrid_runtime) as ep:
        assert ep.handle.context == 2 and os.path.exists("%s_%d" % (vmm.path, ep.handle.resource))
        guest_ep = VMCIHandle(GUEST, 5000)
        for size in (0, 1, 4096, VMCI_MAX_DG_PAYLOAD_SIZE):
            data = bytes((i * 7 + size) & 0xFF for i in range(size))
            assert ep.send(guest_ep, data) == size
            got = ep.recv(timeout=WAIT)
            assert got.src == guest_ep and got.payload == data[::-1]
        guest = vmm.guest.received
        assert guest.get(timeout=WAIT) == ("hello", (False, ep.handle.resource))
        fields, payload = guest.get(timeout=WAIT)[1:]
        assert fields[:4] == (GUEST, 5000, 2, ep.handle.resource) and payload == b""
        assert vmm.connects == [5000]  # one connect per destination
    assert not os.path.exists("%s_%d" % (vmm.path, ep.handle.resource))


def test_fifo_many_datagrams_one_connect(hybrid_runtime, vmm):
    with DatagramEndpoint(runtime=hybrid_runtime) as ep:
        for i in range(200):
            ep.send((GUEST, 6000), b"%d" % i)
        for i in range(200):
            assert ep.recv(timeout=WAIT) == ((GUEST, 6000), (b"%d" % i)[::-1])
        assert vmm.connects == [6000]
        assert ep.stats.received == 200


def test_two_host_endpoints_through_the_guest(hybrid_runtime, vmm):
    with DatagramEndpoint(runtime=hybrid_runtime) as a, DatagramEndpoint(runtime=hybrid_runtime) as b:
        a.send((GUEST, 7000), b"to a")
        b.send((GUEST, 7001), b"to b")
        assert a.recv(timeout=WAIT).payload == b"a ot"
        assert b.recv(timeout=WAIT).payload == b"b ot"


@pytest.mark.parametrize("answer, error", [
    ("close", InvalidResource),
    ("silent", Timeout),
    (b"ERR no listener\n", DstUnreachable),
    (b"OK\n", DstUnreachable),
    (b"OK -1\n", DstUnreachable),
    (b"OK 99999999999\n", DstUnreachable),
    (b"ok 12\n", DstUnreachable),
    (b"OK 12", Timeout),  # no newline: still waiting when the time is up
    (b"A" * 100, DstUnreachable),
], ids=["no-answer", "silent", "err", "no-port", "negative", "too-big", "lowercase",
        "unterminated", "garbage"])
def test_bad_handshakes_fail_clearly_in_bounded_time(hybrid_runtime, vmm, answer, error):
    vmm.answer = lambda port: answer
    with DatagramEndpoint(runtime=hybrid_runtime) as ep:
        with pytest.raises(error) as info:
            hybrid_runtime.transport.connect(ep.handle, VMCIHandle(GUEST, 5000))
        assert vmm.path in str(info.value) and "CONNECT 5000" in str(info.value)
        assert ep.send_status(VMCIHandle(GUEST, 5000), b"x", 1) == error.code
        assert ep._links == {}


def test_no_vmm_and_foreign_contexts_are_unreachable(core, rundir, tmp_path):
    rt = Runtime(Settings(no_extensions=False, rundir=rundir, cid=2, transport="hybrid",
                          ds_autostart=False)._replace(hybrid_uds=str(tmp_path / "nothing"),
                                                       hybrid_cid=GUEST), core=core)
    with DatagramEndpoint(runtime=rt) as ep:
        with pytest.raises(DstUnreachable, match="no VMM"):
            rt.transport.connect(ep.handle, VMCIHandle(GUEST, 5000))
        with pytest.raises(DstUnreachable, match="its guest is 3"):
            rt.transport.connect(ep.handle, VMCIHandle(4, 5000))
        for dst in ((GUEST, 5000), (4, 5000), (2, ep.handle.resource)):
            with pytest.raises(DstUnreachable):
                ep.send(dst, b"x")


def test_guest_initiated_bad_input_is_dropped_and_counted(hybrid_runtime, vmm):
    hello = vsock_module.encode_hello
    with DatagramEndpoint(runtime=hybrid_runtime) as ep:
        me = tuple(ep.handle)
        socks = [
            connect_as_guest(vmm, me[1], hello(5001) + b"garbage that is not a frame at all"),
            connect_as_guest(vmm, me[1], hello(5002) + frame(me, (GUEST, 5002), b"x" * 10, size=100)),
            connect_as_guest(vmm, me[1], hello(5003) + frame(me, (GUEST, 5003), b"", size=1 << 40)),
            connect_as_guest(vmm, me[1], hello(5004) + frame(me, (4, 5004), b"I am guest 4")),
            connect_as_guest(vmm, me[1], hello(5005) + frame(me, (GUEST, 1), b"I am port 1")),
            connect_as_guest(vmm, me[1], hello(5006) + frame((2, me[1] + 1), (GUEST, 5006), b"not you")),
            connect_as_guest(vmm, me[1], frame(me, (GUEST, 5007), b"no hello")),
            connect_as_guest(vmm, me[1], hello(1, well_known=True) + frame(me, (1, 1), b"I am the DS")),
        ]
        for sock in socks[:3]:
            sock.shutdown(socket.SHUT_WR)  # the truncated ones end their streams
        with pytest.raises(Timeout):
            ep.recv(timeout=3)
        assert ep.stats.bad_frames == 3 and ep.stats.forged == 3, ep.stats
        assert ep.stats.refused_connections == 2 and ep.stats.received == 0, ep.stats
        honest = connect_as_guest(vmm, me[1], hello(5008) + frame(me, (GUEST, 5008), b"honest"))
        assert ep.recv(timeout=WAIT) == ((GUEST, 5008), b"honest")
        for sock in socks + [honest]:
            sock.close()


def test_explicit_rid_duplicate_and_stale_socket_file(hybrid_runtime, vmm):
    path = "%s_%d" % (vmm.path, 40000)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a file nobody listens on: reclaimed
    with DatagramEndpoint(40000, runtime=hybrid_runtime) as ep:
        assert ep.handle == VMCIHandle(2, 40000)
        with pytest.raises(DuplicateEntry):
            DatagramEndpoint(40000, runtime=hybrid_runtime)
        assert hybrid_runtime.transport.endpoint_alive(ep.handle)
    assert not os.path.exists(path)
    assert not hybrid_runtime.transport.endpoint_alive(VMCIHandle(2, 40000))


def test_a_guest_that_goes_away_is_reported_by_the_next_send(hybrid_runtime, vmm):
    with DatagramEndpoint(runtime=hybrid_runtime) as ep:
        ep.send((GUEST, 5000), b"first")
        assert ep.recv(timeout=WAIT).payload == b"tsrif"
        link = ep._links[VMCIHandle(GUEST, 5000)].link.sock
        for sock in list(vmm.guest.socks):
            with contextlib.suppress(OSError):  # the guest closes the others once one ends
                sock.shutdown(socket.SHUT_RDWR)
        poller = select.poll()
        poller.register(link, select.POLLIN)
        assert poller.poll(WAIT * 1000), "the guest's hang-up never reached the link"
        vmm.answer = lambda port: "close"  # and it no longer listens
        with pytest.raises(InvalidResource):
            ep.send((GUEST, 5000), b"second")


def test_reply_parsing():
    assert hybrid_module.parse_reply(b"OK 1073741824\n") == 1 << 30
    for bad in (b"OK 1073741824", b"OK 1\n\n", b" OK 1\n", b"OK 4294967296\n", b"OK +1\n", b""):
        assert hybrid_module.parse_reply(bad) is None


def test_selection_and_settings(core, rundir, tmp_path, monkeypatch):
    base = Settings(no_extensions=False, rundir=rundir, cid=2, transport="hybrid", ds_autostart=False)
    with pytest.raises(TransportUnavailable, match="VSOCKCOMPAT_HYBRID_UDS"):
        open_transport(base, core)
    with pytest.raises(TransportUnavailable, match="does not exist"):
        open_transport(base._replace(hybrid_uds=str(tmp_path / "no" / "such" / "vm.sock")), core)
    with pytest.raises(TransportUnavailable, match="too long"):
        open_transport(base._replace(hybrid_uds=str(tmp_path / ("x" * 120))), core)
    env = {"VSOCKCOMPAT_TRANSPORT": "hybrid", "VSOCKCOMPAT_HYBRID_UDS": "vm.sock",
           "VSOCKCOMPAT_HYBRID_CID": "7"}
    parsed = Settings.from_environ(env)
    assert parsed.hybrid_uds == os.path.abspath("vm.sock") and parsed.hybrid_cid == 7
    assert Settings.from_environ({}).hybrid_cid == 3 and Settings.from_environ({}).hybrid_uds is None
    for bad in ("2", "x", "4294967295"):
        with pytest.raises(SettingError, match="VSOCKCOMPAT_HYBRID_CID"):
            Settings.from_environ(dict(env, VSOCKCOMPAT_HYBRID_CID=bad))
    with pytest.raises(SettingError, match="VSOCKCOMPAT_VSOCK_MODE"):
        Settings.from_environ({"VSOCKCOMPAT_VSOCK_MODE": "dgram"})
    assert Settings.from_environ({"VSOCKCOMPAT_VSOCK_MODE": "stream"}).vsock_mode == "stream"


def test_no_threads_or_files_left_behind(hybrid_runtime, vmm, fd_guard):
    before = threading.active_count()
    for _ in range(3):
        with DatagramEndpoint(runtime=hybrid_runtime) as ep:
            ep.send((GUEST, 5000), b"x")
            assert ep.recv(timeout=WAIT).payload == b"x"
    for thread in vmm.guest.threads:
        thread.join(WAIT)
    assert threading.active_count() <= before
    assert sorted(os.listdir(os.path.dirname(vmm.path))) == [os.path.basename(vmm.path)]


# Verdicts: the receiver tells a denied sender so, on the link's own stream (transport/verdicts.py).

def _verdict_bytes(sock, n):
    sock.settimeout(WAIT)
    return recv_exact(sock, 8 * n)


def test_a_host_receiver_tells_a_denied_guest_and_then_lets_it_in(hybrid_runtime, vmm):
    from vsockcompat.constants import VMCI_PRIV_DG_SEND
    from vsockcompat.transport.verdicts import encode_verdict
    hello = vsock_module.encode_hello
    with DatagramEndpoint(runtime=hybrid_runtime) as ep:
        me, guest = tuple(ep.handle), VMCIHandle(GUEST, 5001)
        hybrid_runtime.access.change(ep.handle, lambda acl: acl.add(guest, [], [VMCI_PRIV_DG_SEND]))
        sock = connect_as_guest(vmm, me[1], hello(5001) + frame(me, guest, b"denied"))
        with pytest.raises(Timeout):
            ep.recv(timeout=2)  # accepts, tells, drops
        assert ep.stats.denied == 1 and ep.stats.received == 0, ep.stats
        assert _verdict_bytes(sock, 1) == encode_verdict(True)
        hybrid_runtime.access.change(ep.handle, lambda acl: acl.remove_all(guest))
        assert _verdict_bytes(sock, 1) == encode_verdict(False)  # at once, with no receive
        sock.sendall(frame(me, guest, b"welcome"))
        assert ep.recv(timeout=WAIT) == (guest, b"welcome")
        sock.close()


class VerdictGuest:
    """A guest that hands each host link's stream to the test (after reading its hello)."""

    def __init__(self):
        self.links = queue.Queue()
        self.socks = []

    def __call__(self, port, conn):
        conn.settimeout(WAIT)
        self.socks.append(conn)
        self.links.put((vsock_module.decode_hello(recv_exact(conn, 8)), conn))


@pytest.fixture
def verdict_vmm(core, rundir, tmp_path):
    uds = str(tmp_path / "vm.vsock")
    guest = VerdictGuest()
    fake = FakeVMM(uds, guest)
    settings = Settings(no_extensions=False, rundir=rundir, cid=2, transport="hybrid",
                        ds_autostart=False)._replace(hybrid_uds=uds, hybrid_cid=GUEST)
    yield Runtime(settings, core=core), guest
    fake.close()
    for sock in guest.socks:
        sock.close()


def _send_until(ep, dst, payload, expected):
    """Send until the status is ``expected`` (the verdict crosses a thread); the statuses seen."""
    seen = []
    deadline = time.monotonic() + WAIT
    while not seen or seen[-1] != expected:
        assert time.monotonic() < deadline, "send never returned %d: %s" % (expected, seen[-5:])
        seen.append(ep.send_status(dst, payload, len(payload)))
        time.sleep(0.01)
    return seen


def test_a_host_sender_gets_no_access_while_the_guest_denies_it(verdict_vmm):
    from vsockcompat import constants as C
    from vsockcompat.errors import NoAccess
    from vsockcompat.transport.verdicts import encode_verdict
    rt, guest = verdict_vmm
    dst = VMCIHandle(GUEST, 5000)
    with DatagramEndpoint(runtime=rt) as ep:
        assert ep.send(dst, b"first") == 5  # a link starts allowed
        hello, conn = guest.links.get(timeout=WAIT)
        assert hello == (False, ep.handle.resource) and read_frame(conn)[1] == b"first"
        conn.sendall(encode_verdict(True))
        seen = _send_until(ep, dst, b"while denied", C.VMCI_ERROR_NO_ACCESS)
        with pytest.raises(NoAccess, match="denied DG_SEND"):
            ep.send(dst, b"while denied")  # the cached link, not a new one
        assert guest.links.empty()
        conn.sendall(encode_verdict(False))
        _send_until(ep, dst, b"again", len(b"again") + 24)
        sent = sum(rc > 0 for rc in seen)  # before the verdict reached the link: the race
        assert [read_frame(conn)[1] for _ in range(sent + 1)] == [b"while denied"] * sent + [b"again"]
        assert guest.links.empty() and ep.stats.bad_verdicts == 0


def test_a_guest_that_writes_garbage_loses_its_link_and_is_counted(verdict_vmm):
    rt, guest = verdict_vmm
    dst = VMCIHandle(GUEST, 5000)
    with DatagramEndpoint(runtime=rt) as ep:
        ep.send(dst, b"first")
        _, conn = guest.links.get(timeout=WAIT)
        conn.sendall(b"not a verdict at all")
        link = ep._links[dst].link.sock
        poller = select.poll()
        poller.register(link, select.POLLIN)
        assert poller.poll(WAIT * 1000), "the link did not end"
        ep.send(dst, b"second")  # a fresh link
        _, fresh = guest.links.get(timeout=WAIT)
        assert read_frame(fresh)[1] == b"second"
        assert ep.stats.bad_verdicts == 1, ep.stats
