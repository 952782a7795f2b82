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

from vsockcompat import constants as C
from vsockcompat import ds_client, errors, mirror_link
from vsockcompat._settings import SettingError, Settings
from vsockcompat.constants import DG_HEADER_FORMAT, VMCI_MAX_DG_PAYLOAD_SIZE
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.ds_protocol import decode_reply, encode_request
from vsockcompat.ds_server import DiscoveryServer
from vsockcompat.errors import DstUnreachable, DuplicateEntry, InvalidResource, Timeout
from vsockcompat.handles import VMCI_INVALID_HANDLE, VMCIHandle
from vsockcompat.runtime import Runtime
from vsockcompat.sharedmem import SharedRegion
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
    """A guest (CID ``cid``) whose endpoints echo every datagram back through
    ``<uds>_<src port>`` (or, with ``echo`` False, only record what they receive)."""

    def __init__(self, uds, echo=True, cid=GUEST):
        self.uds = uds
        self.echo = echo
        self.cid = cid
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
            if not self.echo:
                continue
            if back is None:
                back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                back.connect("%s_%d" % (self.uds, hello[1]))
                back.sendall(vsock_module.encode_hello(port))
                self.socks.append(back)
            back.sendall(frame(fields[2:4], (self.cid, port), payload[::-1]))
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


def hybrid_settings(rundir, uds, cid=2):
    """Settings of the hybrid transport in context ``cid``: ``uds`` is the VMM socket of guest
    GUEST, or a list of ``(path, guest CID)``."""
    guests = ((uds, GUEST),) if isinstance(uds, str) else tuple(uds)
    return Settings(no_extensions=False, rundir=rundir, cid=cid, transport="hybrid",
                    ds_autostart=False)._replace(hybrid=guests)


@pytest.fixture
def hybrid_runtime(core, rundir, vmm):
    rt = Runtime(hybrid_settings(rundir, vmm.path), core=core)
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
    rt = Runtime(hybrid_settings(rundir, str(tmp_path / "nothing")), core=core)
    with DatagramEndpoint(runtime=rt) as ep:
        with pytest.raises(DstUnreachable, match="no VMM"):
            rt.transport.connect(ep.handle, VMCIHandle(GUEST, 5000))
        with pytest.raises(DstUnreachable, match="reach guests 3 only"):
            rt.transport.connect(ep.handle, VMCIHandle(4, 5000))
        for dst in ((GUEST, 5000), (4, 5000), (0, 5000)):
            with pytest.raises(DstUnreachable):
                ep.send(dst, b"x")
        # The host's own contexts are reached without the VMM.
        assert ep.send(ep.handle, b"to myself") == 9
        assert ep.recv(timeout=WAIT) == (ep.handle, b"to myself")
        with pytest.raises(InvalidResource, match="on this host"):
            ep.send((2, ep.handle.resource + 1), b"x")


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
        open_transport(base._replace(hybrid=((str(tmp_path / "no" / "such" / "vm.sock"), GUEST),)), core)
    with pytest.raises(TransportUnavailable, match="too long"):
        open_transport(base._replace(hybrid=((str(tmp_path / ("x" * 120)), GUEST),)), core)
    env = {"VSOCKCOMPAT_TRANSPORT": "hybrid", "VSOCKCOMPAT_HYBRID_UDS": "vm.sock",
           "VSOCKCOMPAT_HYBRID_CID": "7"}
    parsed = Settings.from_environ(env)
    assert parsed.hybrid == ((os.path.abspath("vm.sock"), 7),)
    assert Settings.from_environ({}).hybrid == ()
    assert Settings.from_environ(dict(env, VSOCKCOMPAT_HYBRID_CID="")).hybrid == (
        (os.path.abspath("vm.sock"), 3),)  # one socket: its guest is 3 unless told
    for bad in ("2", "x", "4294967295"):
        with pytest.raises(SettingError, match="VSOCKCOMPAT_HYBRID_CID"):
            Settings.from_environ(dict(env, VSOCKCOMPAT_HYBRID_CID=bad))
    with pytest.raises(SettingError, match="VSOCKCOMPAT_VSOCK_MODE"):
        Settings.from_environ({"VSOCKCOMPAT_VSOCK_MODE": "datagram"})
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
    yield Runtime(hybrid_settings(rundir, uds), core=core), guest
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


# The host's contexts 1 and 2, and the discovery daemon across the VMM

def test_host_processes_reach_each_other_and_context_1_only_from_the_host(core, rundir, vmm):
    host = Runtime(hybrid_settings(rundir, vmm.path), core=core)
    well_known = Runtime(hybrid_settings(rundir, vmm.path, cid=1), core=core)
    assert well_known.transport.local_cid == 1
    with DatagramEndpoint(runtime=host) as a, DatagramEndpoint(40001, runtime=well_known) as svc:
        assert svc.handle == VMCIHandle(1, 40001)
        a.send(svc.handle, b"to context 1")
        got = svc.recv(timeout=WAIT)
        assert got == (a.handle, b"to context 1") and svc.last_peer.pid == os.getpid()
        svc.send(a.handle, b"from context 1")  # its hello says "VSW1": believed on the host path
        assert a.recv(timeout=WAIT) == (svc.handle, b"from context 1")
        assert host.transport.endpoint_alive(svc.handle) and host.transport.endpoint_alive(VMCIHandle(2, 40001))
        # Through the guest's path the same claim is refused, and a host source is forged.
        claim = connect_as_guest(vmm, a.handle.resource, vsock_module.encode_hello(40001, well_known=True)
                                 + frame(a.handle, svc.handle, b"I am context 1"))
        forged = connect_as_guest(vmm, a.handle.resource, vsock_module.encode_hello(40001)
                                  + frame(a.handle, (2, 40001), b"I am the host"))
        with pytest.raises(Timeout):
            a.recv(timeout=2)
        assert a.stats.refused_connections == 1 and a.stats.forged == 1, a.stats
        claim.close()
        forged.close()
    assert not host.transport.endpoint_alive(VMCIHandle(1, 40001))
    with pytest.raises(TransportUnavailable, match="context 2"):
        HybridTransport(core, [(vmm.path, GUEST)], context=3)


def test_guest_endpoints_are_probed_through_the_vmm(hybrid_runtime, vmm):
    transport = hybrid_runtime.transport
    with DatagramEndpoint(runtime=hybrid_runtime) as ep:
        assert transport.endpoint_alive(VMCIHandle(GUEST, 5000))
        assert vmm.guest.received.get(timeout=WAIT) == ("hello", (False, ep.handle.resource))
        for answer, alive in (("close", False), (b"nonsense\n", False), ("silent", True)):
            vmm.answer = lambda port: answer
            assert transport.endpoint_alive(VMCIHandle(GUEST, 5000)) is alive, answer
        assert not transport.endpoint_alive(VMCIHandle(GUEST + 1, 5000))
    vmm.close()
    assert not transport.endpoint_alive(VMCIHandle(GUEST, 5000))
    vmm.close = lambda: None


@pytest.fixture
def ds_vmm(tmp_path):
    """A VMM whose guest only records what reaches it."""
    uds = str(tmp_path / "vm.vsock")
    guest = EchoGuest(uds, echo=False)
    fake = FakeVMM(uds, guest)
    yield fake
    stop_vmm(fake, guest)


def stop_vmm(fake, guest):
    """Close the fake VMM, end its guest's connections and threads."""
    fake.close()
    for sock in guest.socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    for thread in guest.threads:
        thread.join(WAIT)
    for sock in guest.socks:
        sock.close()


@contextlib.contextmanager
def serving_ds(core, rundir, guests):
    """A discovery daemon of context 1 on the hybrid transport over ``guests`` (a VMM socket
    path, or ``(path, cid)`` pairs), serving in a thread."""
    srv = DiscoveryServer(Runtime(hybrid_settings(rundir, guests, cid=1), core=core), tick=0.05)
    thread = threading.Thread(target=srv.serve_forever, name="hybrid-ds", daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.stop()
        thread.join(WAIT)
    assert not thread.is_alive()


@pytest.fixture
def hybrid_ds(core, rundir, ds_vmm):
    with serving_ds(core, rundir, ds_vmm.path) as srv:
        yield srv


def guest_asks(vmm, rid, payload, src=None, well_known=False):
    """The guest's endpoint ``rid`` sends ``payload`` to (1, 1) (the VMM delivers it at
    ``<uds>_1``); returns the connection (close it)."""
    src = (vmm.guest.cid, rid) if src is None else src
    return connect_as_guest(vmm, 1, vsock_module.encode_hello(rid, well_known)
                            + frame((1, 1), src, payload))


def guest_reply(vmm, rid):
    """The daemon's reply to the guest's endpoint ``rid``: it came through ``CONNECT rid`` on a
    connection whose hello speaks for (1, 1), as every connection the daemon opens does."""
    hellos = []
    while True:
        item = vmm.guest.received.get(timeout=WAIT)
        if item[0] == "hello":
            hellos.append(item[1])
        elif item[1][:2] == (vmm.guest.cid, rid):
            assert item[1][2:4] == (1, 1) and hellos and set(hellos) == {(True, 1)}, hellos
            return decode_reply(item[2])


def test_daemon_serves_the_host_and_the_guest(hybrid_ds, core, rundir, ds_vmm):
    host = Runtime(hybrid_settings(rundir, ds_vmm.path), core=core)
    with DatagramEndpoint(runtime=host) as server:
        assert ds_client.register_status("HOST INFO", server.handle, host) == C.VMCI_SUCCESS
        assert ds_client.lookup_status("HOST INFO", host) == (C.VMCI_SUCCESS, server.handle)
        entry = hybrid_ds._registry[b"HOST INFO"]
        assert (entry.owner, entry.pid, entry.watch_endpoint) == (2, os.getpid(), True)
        ask = guest_asks(ds_vmm, 5000, encode_request(C.VMCI_DS_ACTION_LOOKUP, 7, VMCI_INVALID_HANDLE,
                                                      "HOST INFO"))
        reply = guest_reply(ds_vmm, 5000)
        assert (reply.msgid, reply.code, reply.handle) == (7, C.VMCI_SUCCESS, server.handle)
        # The guest registers its endpoint: the entry lives while the VMM says it listens.
        reg = guest_asks(ds_vmm, 5001, encode_request(C.VMCI_DS_ACTION_REGISTER, 8, (GUEST, 6000),
                                                      "GUEST SVC"))
        assert guest_reply(ds_vmm, 5001).code == C.VMCI_SUCCESS
        entry = hybrid_ds._registry[b"GUEST SVC"]
        assert (entry.owner, entry.pid, entry.watch_endpoint) == (GUEST, 0, True)
        assert ds_client.lookup_status("GUEST SVC", host) == (C.VMCI_SUCCESS, (GUEST, 6000))
        # The guest may not remove the host's entry; the host may remove the guest's.
        unreg = guest_asks(ds_vmm, 5002, encode_request(C.VMCI_DS_ACTION_UNREGISTER, 9,
                                                        VMCI_INVALID_HANDLE, "HOST INFO"))
        assert guest_reply(ds_vmm, 5002).code == C.VMCI_ERROR_NO_ACCESS
        # The guest's endpoint goes away (the VMM refuses its port): so does its entry.
        ds_vmm.answer = lambda port: "close" if port == 6000 else "ok"
        assert ds_client.lookup_status("GUEST SVC", host)[0] == C.VMCI_ERROR_NOT_FOUND
        assert ds_client.unregister_status("HOST INFO", host) == C.VMCI_SUCCESS
        for sock in (ask, reg, unreg):
            sock.close()


def test_daemon_drops_bad_guest_input_and_keeps_serving(hybrid_ds, core, rundir, ds_vmm):
    host = Runtime(hybrid_settings(rundir, ds_vmm.path), core=core)
    lookup = encode_request(C.VMCI_DS_ACTION_LOOKUP, 11, VMCI_INVALID_HANDLE, C.VMCI_PUBLIC_GROUP_NAME)
    garbage = connect_as_guest(ds_vmm, 1, vsock_module.encode_hello(5000) + b"not a frame, garbage")
    garbage.shutdown(socket.SHUT_WR)
    noise = connect_as_guest(ds_vmm, 1, b"\xff" * 64)  # no hello at all
    socks = [garbage, noise,
             guest_asks(ds_vmm, 1, lookup, src=(1, 1), well_known=True),   # claims context 1
             guest_asks(ds_vmm, 5003, encode_request(C.VMCI_DS_ACTION_REGISTER, 12, (2, 5003), "X"),
                        src=(2, 5003)),                                    # claims the host
             guest_asks(ds_vmm, 5004, struct.pack("<iiiiI", 0, 13, 0, 0, 9999) + b"short")]
    reply = guest_reply(ds_vmm, 5004)
    assert (reply.msgid, reply.code) == (13, C.VMCI_ERROR_INVALID_ARGS)
    stats = hybrid_ds._endpoint.stats
    for _ in range(100):  # the daemon counts them as it reads them: wait for all, then compare
        if stats.bad_frames >= 1 and stats.refused_connections >= 2 and stats.forged >= 1:
            break
        time.sleep(0.1)
    assert (stats.bad_frames, stats.refused_connections, stats.forged) == (1, 2, 1), stats
    assert hybrid_ds.stats["malformed"] == 1 and b"X" not in hybrid_ds._registry
    assert ds_client.lookup_status(C.VMCI_PUBLIC_GROUP_NAME, host) == (C.VMCI_SUCCESS, (2, 1023))
    honest = guest_asks(ds_vmm, 5005, lookup)
    assert guest_reply(ds_vmm, 5005).code == C.VMCI_SUCCESS
    for sock in socks + [honest]:
        sock.close()


# Mirrored regions through the VMM

class LoopbackGuest:
    """A "guest" that is this machine: each connection the VMM hands over for guest port P is
    relayed to ``<uds>_P``, as if the guest's listener at P were the host's."""

    def __init__(self, uds):
        self.uds = uds
        self.threads = []
        self.socks = []

    def __call__(self, port, conn):
        out = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            out.connect("%s_%d" % (self.uds, port))
        except OSError:
            out.close()
            conn.close()
            return
        conn.settimeout(None)
        self.socks += [conn, out]
        for a, b in ((conn, out), (out, conn)):
            thread = threading.Thread(target=self._relay, args=(a, b), daemon=True)
            self.threads.append(thread)
            thread.start()

    @staticmethod
    def _relay(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def mirrors_both_ways(region, other):
    """The creator's write reaches the attacher's copy, and the attacher's the creator's."""
    region.buffer[:5] = b"hello"
    region.sync()
    assert bytes(other.buffer[:5]) == b"hello"
    other.buffer[32:37] = b"world"
    other.sync()
    assert bytes(region.buffer[32:37]) == b"world"


@pytest.fixture
def looped(tmp_path):
    """A fake VMM whose guest GUEST is this host again (LoopbackGuest)."""
    uds = str(tmp_path / "vm.vsock")
    loop = LoopbackGuest(uds)
    fake = FakeVMM(uds, loop)
    yield fake
    stop_vmm(fake, loop)


def test_mirrored_region_reaches_the_guest_through_the_vmm(core, rundir, looped):
    """The creator listens where the VMM delivers the guest's connections; the attacher (here
    the host again, behind a VMM that loops back) reaches it with ``CONNECT``, and the creator
    sees the guest's context."""
    fake, uds = looped, looped.path
    creator_rt = Runtime(hybrid_settings(rundir, uds), core=core)
    attacher_rt = Runtime(hybrid_settings(rundir, uds), core=core)
    assert mirror_link.mirrored(creator_rt)
    region = SharedRegion.create(128, runtime=creator_rt)
    try:
        rid = region.handle.resource
        assert region.handle.context == 2 and os.path.exists("%s_%d" % (uds, rid))
        with pytest.raises(DuplicateEntry):
            DatagramEndpoint(rid, runtime=creator_rt)       # one id space with endpoints
        other = SharedRegion.attach((GUEST, rid), runtime=attacher_rt)
        assert fake.connects == [rid]
        mirrors_both_ways(region, other)
        other.detach()
        with pytest.raises(DstUnreachable, match="guest"):
            SharedRegion.attach((GUEST + 4, rid), runtime=attacher_rt)
        fake.answer = lambda port: "close"
        with pytest.raises(errors.NotFound):
            SharedRegion.attach((GUEST, rid), runtime=attacher_rt)
    finally:
        region.detach()
    # The creator serves until its attacher's detach reached its thread; then the path goes.
    path, deadline = "%s_%d" % (uds, rid), time.monotonic() + WAIT
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(path)


# Several VMM sockets: one transport (and one discovery daemon) routed by guest CID

SIBLING = 4


@pytest.fixture
def two_vmms(tmp_path):
    """Guests 3 and 4, each behind a VMM socket of its own; their endpoints echo (``echo``
    True) or only record."""
    made = []

    def make(echo=True):
        for cid in (GUEST, SIBLING):
            uds = str(tmp_path / ("vm%d.vsock" % cid))
            guest = EchoGuest(uds, echo=echo, cid=cid)
            made.append((FakeVMM(uds, guest), guest))
        return [fake for fake, _ in made]

    yield make
    for fake, guest in made:
        stop_vmm(fake, guest)


def guests_of(vmms):
    return [(vmm.path, vmm.guest.cid) for vmm in vmms]


def test_links_route_by_guest_cid_to_their_vmm_socket(core, rundir, two_vmms):
    vmm3, vmm4 = two_vmms()
    rt = Runtime(hybrid_settings(rundir, guests_of((vmm3, vmm4))), core=core)
    assert rt.transport.guest_cids == (GUEST, SIBLING)
    with DatagramEndpoint(runtime=rt) as ep:
        for cid in (GUEST, SIBLING, GUEST):
            assert ep.send((cid, 5000), b"to %d" % cid) == 4
            got = ep.recv(timeout=WAIT)
            assert got == ((cid, 5000), (b"to %d" % cid)[::-1])  # back through <its uds>_<rid>
        assert (vmm3.connects, vmm4.connects) == ([5000], [5000])  # one link per guest, cached
        assert vmm3.guest.received.get(timeout=WAIT) == ("hello", (False, ep.handle.resource))
        assert vmm4.guest.received.get(timeout=WAIT) == ("hello", (False, ep.handle.resource))
        assert rt.transport.endpoint_alive(VMCIHandle(SIBLING, 5000))
        vmm4.answer = lambda port: "close"
        assert not rt.transport.endpoint_alive(VMCIHandle(SIBLING, 5000))
        assert rt.transport.endpoint_alive(VMCIHandle(GUEST, 5000))  # asked its own VMM
    assert (vmm3.connects, vmm4.connects) == ([5000] * 2, [5000] * 3)  # the link, then probes


def test_a_cid_behind_no_socket_is_dst_unreachable_at_once(core, rundir, two_vmms):
    vmm3, vmm4 = two_vmms()
    rt = Runtime(hybrid_settings(rundir, guests_of((vmm3, vmm4))), core=core)
    with DatagramEndpoint(runtime=rt) as ep:
        for cid in (5, 0, 0xFFFFFFFE):
            started = time.monotonic()
            with pytest.raises(DstUnreachable, match="reach guests 3, 4 only") as info:
                ep.send((cid, 5000), b"x")
            assert info.value.code == C.VMCI_ERROR_DST_UNREACHABLE == -10
            assert ep.send_status(VMCIHandle(cid, 5000), b"x", 1) == C.VMCI_ERROR_DST_UNREACHABLE
            assert time.monotonic() - started < hybrid_module.HANDSHAKE_TIMEOUT  # never waits for a VMM
        assert not rt.transport.endpoint_alive(VMCIHandle(5, 5000))
        with pytest.raises(DstUnreachable, match="reach guests 3, 4 only"):
            mirror_link.connect(rt, mirror_link.REGION, VMCIHandle(5, 5000))
        assert vmm3.connects == vmm4.connects == [] and ep._links == {}


def test_an_endpoint_listens_on_every_socket_and_knows_who_came_through_which(core, rundir,
                                                                             two_vmms):
    vmm3, vmm4 = two_vmms()
    rt = Runtime(hybrid_settings(rundir, guests_of((vmm3, vmm4))), core=core)
    hello = vsock_module.encode_hello
    with DatagramEndpoint(runtime=rt) as ep:
        me = tuple(ep.handle)
        paths = ["%s_%d%s" % (vmm.path, me[1], suffix) for vmm in (vmm3, vmm4) for suffix in ("", ".host")]
        assert all(os.path.exists(path) for path in paths)
        socks = [connect_as_guest(vmm3, me[1], hello(7003) + frame(me, (GUEST, 7003), b"from 3")),
                 connect_as_guest(vmm4, me[1], hello(7004) + frame(me, (SIBLING, 7004), b"from 4"))]
        got = sorted([ep.recv(timeout=WAIT), ep.recv(timeout=WAIT)])
        assert got == [((GUEST, 7003), b"from 3"), ((SIBLING, 7004), b"from 4")]
        # The socket it came through says who it is, whatever the frame claims.
        socks += [connect_as_guest(vmm4, me[1], hello(7005) + frame(me, (GUEST, 7005), b"I am 3")),
                  connect_as_guest(vmm3, me[1], hello(7006) + frame(me, (SIBLING, 7006), b"I am 4"))]
        with pytest.raises(Timeout):
            ep.recv(timeout=2)
        assert ep.stats.forged == 2 and ep.stats.received == 2, ep.stats
        for sock in socks:
            sock.close()
    assert not any(os.path.exists(path) for path in paths)
    # A port one socket's leftover listener holds is taken for the whole transport.
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.bind("%s_%d" % (vmm4.path, 40000))
    holder.listen(1)
    with pytest.raises(DuplicateEntry, match="vm4.vsock_40000"):
        DatagramEndpoint(40000, runtime=rt)
    holder.close()
    assert not os.path.exists("%s_%d" % (vmm3.path, 40000))


def test_stream_listeners_take_either_guest_and_name_it(core, rundir, two_vmms, monkeypatch):
    vmm3, vmm4 = two_vmms()
    transport = Runtime(hybrid_settings(rundir, guests_of((vmm3, vmm4))), core=core).transport
    rid, listener = transport.listen_stream(None)
    try:
        assert listener.paths == ("%s_%d" % (vmm3.path, rid), "%s_%d" % (vmm4.path, rid),
                                  "%s_%d.host" % (vmm3.path, rid), "%s_%d.host" % (vmm4.path, rid))
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        seen = []
        for vmm in (vmm4, vmm3):
            sock = connect_as_guest(vmm, rid, b"")
            assert poller.poll(WAIT * 1000)
            conn, _ = listener.accept()
            seen.append(transport.stream_peer_context(conn))
            conn.close()
            sock.close()
        assert seen == [SIBLING, GUEST] and not poller.poll(0)
        with pytest.raises(DuplicateEntry):
            transport.listen_stream(rid)
    finally:
        listener.close()
        for path in listener.paths:
            os.unlink(path)


@pytest.fixture
def looping_vmms(tmp_path):
    """Guests 3 and 4 behind VMM sockets of their own, each a guest that loops back to this host
    (``LoopbackGuest``): the fake VMMs."""
    made = []
    for cid in (GUEST, SIBLING):
        uds = str(tmp_path / ("vm%d.vsock" % cid))
        loop = LoopbackGuest(uds)
        made.append((FakeVMM(uds, loop), loop))
    yield [fake for fake, _ in made]
    for fake, loop in made:
        stop_vmm(fake, loop)


def test_a_region_reaches_the_guest_of_the_cid_it_names(core, rundir, looping_vmms):
    """The attacher's CONNECT goes to the VMM of the CID it names, and the creator, listening
    on both sockets, serves it."""
    guests = list(zip([fake.path for fake in looping_vmms], (GUEST, SIBLING)))
    creator_rt = Runtime(hybrid_settings(rundir, guests), core=core)
    attacher_rt = Runtime(hybrid_settings(rundir, guests), core=core)
    region = SharedRegion.create(64, runtime=creator_rt)
    try:
        rid = region.handle.resource
        other = SharedRegion.attach((SIBLING, rid), runtime=attacher_rt)
        assert [fake.connects for fake in looping_vmms] == [[], [rid]]
        mirrors_both_ways(region, other)
        other.detach()
    finally:
        region.detach()


def test_one_daemon_serves_both_guests(core, rundir, two_vmms):
    vmm3, vmm4 = two_vmms(echo=False)
    host = Runtime(hybrid_settings(rundir, guests_of((vmm3, vmm4))), core=core)
    register = lambda msgid, handle, name: encode_request(C.VMCI_DS_ACTION_REGISTER, msgid, handle, name)
    with serving_ds(core, rundir, guests_of((vmm3, vmm4))) as srv:
        socks = [guest_asks(vmm3, 5001, register(1, (GUEST, 6000), "SVC OF 3"))]
        assert guest_reply(vmm3, 5001).code == C.VMCI_SUCCESS
        socks.append(guest_asks(vmm4, 5001, register(2, (SIBLING, 6000), "SVC OF 4")))
        assert guest_reply(vmm4, 5001).code == C.VMCI_SUCCESS
        assert [(srv._registry[n].owner, srv._registry[n].watch_endpoint)
                for n in (b"SVC OF 3", b"SVC OF 4")] == [(GUEST, True), (SIBLING, True)]
        # Guest 4 finds guest 3's name; the reply goes back through guest 4's VMM.
        socks.append(guest_asks(vmm4, 5002, encode_request(C.VMCI_DS_ACTION_LOOKUP, 3,
                                                           VMCI_INVALID_HANDLE, "SVC OF 3")))
        reply = guest_reply(vmm4, 5002)
        assert (reply.msgid, reply.code, reply.handle) == (3, C.VMCI_SUCCESS, (GUEST, 6000))
        # Neither guest may remove the other's name; a claim to be guest 3 through 4's socket is forged.
        socks.append(guest_asks(vmm4, 5003, encode_request(C.VMCI_DS_ACTION_UNREGISTER, 4,
                                                           VMCI_INVALID_HANDLE, "SVC OF 3")))
        assert guest_reply(vmm4, 5003).code == C.VMCI_ERROR_NO_ACCESS
        socks.append(guest_asks(vmm3, 5003, encode_request(C.VMCI_DS_ACTION_UNREGISTER, 5,
                                                           VMCI_INVALID_HANDLE, "SVC OF 4")))
        assert guest_reply(vmm3, 5003).code == C.VMCI_ERROR_NO_ACCESS
        socks.append(guest_asks(vmm4, 5004, encode_request(C.VMCI_DS_ACTION_UNREGISTER, 6,
                                                           VMCI_INVALID_HANDLE, "SVC OF 3"),
                                src=(GUEST, 5004)))
        deadline = time.monotonic() + WAIT
        while srv._endpoint.stats.forged < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv._endpoint.stats.forged == 1 and b"SVC OF 3" in srv._registry
        assert ds_client.lookup_status("SVC OF 3", host) == (C.VMCI_SUCCESS, (GUEST, 6000))
        # Guest 3's VMM stops: its names go, guest 4's stay.
        stop_vmm(vmm3, vmm3.guest)
        vmm3.close = lambda: None
        assert ds_client.lookup_status("SVC OF 3", host)[0] == C.VMCI_ERROR_NOT_FOUND
        assert ds_client.lookup_status("SVC OF 4", host) == (C.VMCI_SUCCESS, (SIBLING, 6000))
        for sock in socks:
            sock.close()


def test_a_queue_pair_peer_is_the_guest_of_the_socket_it_came_through(core, rundir, looping_vmms):
    """A streamed queue pair of the host listens on both VMM sockets; its creator learns the
    attacher's context from the socket the connection came through (here guest 4's)."""
    from vsockcompat.constants import VMCI_EVENT_QP_PEER_ATTACH
    from vsockcompat.queuepair import QPEvent, QueuePair
    guests = list(zip([fake.path for fake in looping_vmms], (GUEST, SIBLING)))
    a = QueuePair.alloc(None, 100, 200, runtime=Runtime(hybrid_settings(rundir, guests), core=core))
    try:
        b = QueuePair.alloc((SIBLING, a.handle.resource), 200, 100,
                            runtime=Runtime(hybrid_settings(rundir, guests), core=core))
        assert a.events(WAIT) == [QPEvent(VMCI_EVENT_QP_PEER_ATTACH, a.handle, SIBLING)]
        assert [fake.connects for fake in looping_vmms] == [[], [a.handle.resource]]
        assert b.enqueue(b"through 4") == 9
        assert a.wait_for_data(WAIT) == 9 and a.dequeue(9) == b"through 4"
        assert b.peer_id == SIBLING  # and the attacher knows whom it reached
        b.detach()
    finally:
        a.detach()


def test_a_transport_built_by_hand_refuses_what_cannot_route(core, tmp_path):
    a, b = str(tmp_path / "a.vsock"), str(tmp_path / "b.vsock")
    for guests, message in (([], "at least one VMM socket"),
                            ([(a, 3), (b, 3)], "a guest CID of its own"),
                            ([(a, 3), (a, 4)], "a path and a guest CID of its own"),
                            ([(a, 3), (b, 2)], "guest CID 2 is not a guest's")):
        with pytest.raises(TransportUnavailable, match=message):
            HybridTransport(core, guests)
    assert HybridTransport(core, [(a, 3), (b, 4)]).guest_cids == (3, 4)
