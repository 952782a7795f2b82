"""The vsock transport's dgram mode (``transport/vsock_dgram.py``) on the host, over the AF_UNIX
stand-in for AF_VSOCK (``tests/vsock_standin.py``): no real AF_VSOCK socket is ever made here (the
stand-in refuses them and every test checks that none was attempted). Both cores; the guest
check that vsock_loopback has no datagrams is ``tests/real_vsock/test_vsock_dgram_probe.py``.
"""
import errno
import os
import socket
import struct
import threading
import time

import pytest

import vsock_standin as standin
from conftest import CYTHON_AVAILABLE
from vsockcompat._backend import load_core
from vsockcompat._settings import Settings, SettingError
from vsockcompat.apps import datagram_app
from vsockcompat.constants import (
    DG_HEADER_FORMAT,
    VMCI_ERROR_DST_UNREACHABLE,
    VMCI_ERROR_INVALID_RESOURCE,
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_NO_MEM,
    VMCI_ERROR_NO_RESOURCES,
    VMCI_MAX_DG_PAYLOAD_SIZE,
    VMCI_PRIV_DG_SEND,
)
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat import ds_client
from vsockcompat.ds_server import DiscoveryServer
from vsockcompat.errors import (DstUnreachable, DuplicateEntry, InvalidArgs, InvalidResource,
                                NoAccess, NoMem, NoResources, Timeout)
from vsockcompat.handles import VMCIHandle
from vsockcompat.runtime import Runtime
from vsockcompat.sdk import VMCILibrary
from vsockcompat.transport import TransportUnavailable
from vsockcompat.transport import vsock as vsock_module
from vsockcompat.transport import vsock_dgram
from vsockcompat.transport.vsock_dgram import sendto_error

WAIT = 10.0
HOST = 2


@pytest.fixture
def emu(monkeypatch, rundir):
    """The stand-in, installed before any socket is made: a host kernel (CID 2) with datagrams."""
    directory = os.path.join(rundir, "emu")
    os.mkdir(directory)
    attempts = standin.install(monkeypatch, directory, cid=HOST, dgram=True)
    assert standin.installed()
    yield directory
    assert attempts == [], "a real AF_VSOCK socket was asked for"


def vsock_settings(rundir, cid=HOST, mode="dgram"):
    return Settings(no_extensions=False, rundir=rundir, cid=cid, transport="vsock",
                    ds_autostart=False, vsock_mode=mode)


@pytest.fixture
def make_dgram_runtime(core, rundir, emu):
    def make(cid=HOST, on_core=None):
        rt = Runtime(vsock_settings(rundir, cid), core=on_core or core)
        assert rt.transport.mode == "dgram" and "sendto" in rt.transport.features
        return rt
    return make


@pytest.fixture
def pair(make_dgram_runtime):
    rt = make_dgram_runtime()
    with DatagramEndpoint(runtime=rt) as a, DatagramEndpoint(runtime=rt) as b:
        yield a, b


def raw(emu, cid, port):
    """A raw datagram socket of another sender at ``c<cid>p<port>.d`` (a kernel of CID ``cid``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(emu, "c%dp%d.d" % (cid, port)))
    sock.settimeout(WAIT)
    return sock


def path_of(emu, handle):
    return os.path.join(emu, "c%dp%d.d" % (HOST, handle.resource))


# The stand-in and the settings


def test_the_standin_is_active_and_real_af_vsock_is_refused(emu):
    assert vsock_module._vsock_socket is standin.standin_socket
    with pytest.raises(OSError) as info:
        socket.socket(standin.AF_VSOCK, socket.SOCK_DGRAM)
    assert info.value.errno == errno.EAFNOSUPPORT
    assert standin._NoVsock.attempts and standin._NoVsock.attempts.pop()  # recorded, then cleared
    probe = vsock_module._vsock_socket(socket.SOCK_DGRAM)
    assert isinstance(probe, standin.StandinSocket) and probe.family == standin.AF_VSOCK
    probe.close()


@pytest.mark.parametrize("value, expected", [("dgram", "dgram"), ("", "auto"), ("auto", "auto")])
def test_settings_take_the_dgram_mode(value, expected):
    assert Settings.from_environ({"VSOCKCOMPAT_VSOCK_MODE": value}).vsock_mode == expected


@pytest.mark.parametrize("value", ["DGRAM", "datagram", "dgram ", "seqpacket,dgram", "vmci"])
def test_settings_refuse_bad_mode_names(value):
    with pytest.raises(SettingError, match="VSOCKCOMPAT_VSOCK_MODE"):
        Settings.from_environ({"VSOCKCOMPAT_VSOCK_MODE": value})
    with pytest.raises(TransportUnavailable, match="unknown vsock mode"):
        vsock_module.choose_mode(value)


def test_auto_takes_dgram_where_the_kernel_has_datagrams(emu, core):
    assert vsock_module.choose_mode("auto") == "dgram"
    assert vsock_module.VsockTransport(core).mode == "dgram"


def test_auto_takes_seqpacket_where_dgram_sockets_fail_with_enodev(emu, monkeypatch, core):
    monkeypatch.setenv("VSOCK_EMU_DGRAM", "0")
    made = []
    real = standin.standin_socket

    def recording(kind=socket.SOCK_SEQPACKET):
        made.append(kind & 0xF)
        return real(kind)

    monkeypatch.setattr(vsock_module, "_vsock_socket", recording)
    assert vsock_module.choose_mode("auto") == "seqpacket"
    assert made == [socket.SOCK_DGRAM, socket.SOCK_SEQPACKET]  # socket() only, in this order
    with pytest.raises(TransportUnavailable) as info:
        vsock_module.VsockTransport(core, mode="dgram")
    assert "SOCK_DGRAM" in str(info.value) and "Errno %d" % errno.ENODEV in str(info.value)
    assert "VMCI" in str(info.value) and "seqpacket or stream" in str(info.value)


# Endpoints and datagrams


def test_datagramapp_over_dgram_with_discovery(make_dgram_runtime, core, capsys):
    """The SDK sample, server and client, found through a discovery daemon on (1, 1)."""
    daemon = DiscoveryServer(make_dgram_runtime(cid=1), tick=0.2)
    assert daemon._endpoint.handle == VMCIHandle(1, 1)
    serving = threading.Thread(target=daemon.serve_forever)
    serving.start()
    try:
        server_lib = VMCILibrary(make_dgram_runtime())
        server = threading.Thread(target=datagram_app.main, args=(["-s"],), kwargs={"lib": server_lib})
        server.start()
        deadline = time.monotonic() + WAIT
        while ds_client.lookup_status("HOST INFO", make_dgram_runtime())[0] != 0:
            assert time.monotonic() < deadline, "the server never registered"
            time.sleep(0.05)
        for _ in range(datagram_app.QUERIES):
            assert datagram_app.main(["-c"], lib=VMCILibrary(make_dgram_runtime())) == 0
        server.join(WAIT)
        assert not server.is_alive()
    finally:
        daemon.stop()
        serving.join(WAIT)
    out, err = capsys.readouterr()
    assert err == ""
    assert out.count("Received message: HELLO, CLIENT!\n") == datagram_app.QUERIES
    assert out.count("Received message: HELLO, SERVER!\n") == datagram_app.QUERIES


def test_discovery_register_and_lookup_through_the_daemon(make_dgram_runtime):
    daemon = DiscoveryServer(make_dgram_runtime(cid=1), tick=0.2)
    serving = threading.Thread(target=daemon.serve_forever)
    serving.start()
    try:
        rt = make_dgram_runtime()
        with DatagramEndpoint(runtime=rt) as ep:
            ds_client.register("dgram service", ep.handle, rt, timeout=WAIT)
            assert ds_client.lookup("dgram service", rt, timeout=WAIT) == ep.handle
            entry = daemon._registry[b"dgram service"]
            assert entry.owner == HOST  # the kernel's address said context 2
            ds_client.unregister("dgram service", rt, timeout=WAIT)
            assert ds_client.lookup_status("dgram service", rt, timeout=WAIT)[0] < 0
    finally:
        daemon.stop()
        serving.join(WAIT)


def test_a_datagram_is_the_payload_only_sent_from_the_endpoints_port(pair, emu):
    a, _ = pair
    receiver = raw(emu, HOST, 5000)
    try:
        assert a.send(VMCIHandle(HOST, 5000), b"just the payload") == 16
        data, path = receiver.recvfrom(100)
        assert data == b"just the payload"
        assert path == path_of(emu, a.handle)  # the kernel stamps the sender's rid
        assert a.stats.sent == 1
    finally:
        receiver.close()


def test_exchange_both_ways_with_the_sources_from_the_kernel(pair):
    a, b = pair
    for i in range(20):
        a.send(b.handle, b"ping %d" % i)
        got = b.recv(timeout=WAIT)
        assert got == (a.handle, b"ping %d" % i)
        b.send(got.src, b"pong %d" % i)
        assert a.recv(timeout=WAIT) == (b.handle, b"pong %d" % i)
    assert b.last_peer.handle == a.handle


def test_the_cores_interoperate_in_dgram_mode(make_dgram_runtime, core):
    if not CYTHON_AVAILABLE:
        pytest.skip("the Cython core is not built (pure install)")
    other = load_core("pure" if core.NAME == "cython" else "cython")
    with DatagramEndpoint(runtime=make_dgram_runtime()) as a, \
            DatagramEndpoint(runtime=make_dgram_runtime(on_core=other)) as b:
        a.send(b.handle, b"across cores")
        assert b.recv(timeout=WAIT) == (a.handle, b"across cores")
        b.send(a.handle, b"and back")
        assert a.recv(timeout=WAIT) == (b.handle, b"and back")


def test_the_largest_payload_arrives_whole_and_a_larger_one_is_refused(pair):
    a, b = pair
    big = bytes(range(256)) * (VMCI_MAX_DG_PAYLOAD_SIZE // 256) + b"z" * (VMCI_MAX_DG_PAYLOAD_SIZE % 256)
    assert len(big) == 69608
    assert a.send(b.handle, big) == len(big)
    assert b.recv(timeout=WAIT) == (a.handle, big)
    with pytest.raises(InvalidArgs):
        a.send(b.handle, big + b"!")
    assert a.send_status(b.handle, big + b"!", len(big) + 1) == VMCI_ERROR_INVALID_ARGS
    assert a.send_status(b.handle, b"abc", 4) == VMCI_ERROR_INVALID_ARGS
    assert a.send_status(b.handle, b"abc", -1) == VMCI_ERROR_INVALID_ARGS
    with pytest.raises(Timeout):
        b.recv(timeout=0.3)  # nothing of the refused ones arrived


def test_a_payload_too_big_for_the_buffer_stays_queued(pair):
    """The SDK's truncation rule (RecvFrom): NO_MEM, and the datagram waits for a bigger buffer."""
    a, b = pair
    a.send(b.handle, b"x" * 3000)
    with pytest.raises(NoMem):
        b.recv_into(bytearray(100), timeout=WAIT)
    assert b.recv_status(bytearray(10))[0] == VMCI_ERROR_NO_MEM
    assert b.recv(timeout=WAIT) == (a.handle, b"x" * 3000)


def test_an_oversized_datagram_from_a_foreign_sender_is_dropped_and_counted(pair, emu):
    _, b = pair
    sender = raw(emu, 3, 7000)
    try:
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sender.sendto(b"o" * (VMCI_MAX_DG_PAYLOAD_SIZE + 1), path_of(emu, b.handle))
        sender.sendto(b"fits", path_of(emu, b.handle))
        assert b.recv(timeout=WAIT) == (VMCIHandle(3, 7000), b"fits")
        assert b.stats.bad_frames == 1 and b.stats.received == 1
    finally:
        sender.close()


FRAME = struct.Struct(DG_HEADER_FORMAT)


def test_a_forged_source_is_impossible_the_kernel_address_decides(pair, emu):
    """A payload shaped like an SDK frame claiming another source is only payload."""
    _, b = pair
    forged = FRAME.pack(b.handle.context, b.handle.resource, HOST, 4242, 5) + b"hello"
    guest = raw(emu, 3, 6000)
    own = raw(emu, 1, 6001)  # CID 1 is this kernel
    try:
        guest.sendto(forged, path_of(emu, b.handle))
        assert b.recv(timeout=WAIT) == (VMCIHandle(3, 6000), forged)
        own.sendto(b"local", path_of(emu, b.handle))
        assert b.recv(timeout=WAIT) == (VMCIHandle(HOST, 6001), b"local")
        assert b.stats.forged == 0
    finally:
        guest.close()
        own.close()


def test_a_source_the_kernel_cannot_name_is_dropped(pair, emu):
    _, b = pair
    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stranger.bind(os.path.join(emu, "not-a-port"))
    try:
        stranger.sendto(b"who?", path_of(emu, b.handle))
        deadline = time.monotonic() + WAIT
        while b._listener.unknown == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(Timeout):
            b.recv(timeout=0.2)
    finally:
        stranger.close()


def test_port_1_of_this_kernel_is_the_discovery_service(pair, emu):
    _, b = pair
    daemon_port = raw(emu, HOST, 1)
    try:
        daemon_port.sendto(b"from (1, 1)", path_of(emu, b.handle))
        assert b.recv(timeout=WAIT) == (VMCIHandle(1, 1), b"from (1, 1)")
    finally:
        daemon_port.close()


@pytest.mark.parametrize("kernel, address, expected", [
    (2, (1, 1), (1, 1)), (2, (2, 1), (1, 1)), (2, (1, 1500), (2, 1500)), (2, (3, 1), (3, 1)),
    (2, (3, 1500), (3, 1500)), (3, (2, 1), (1, 1)), (3, (3, 1), (3, 1)), (3, (1, 1), (3, 1)),
    (3, (2, 1500), (2, 1500)), (3, (4, 1), (4, 1)), (2, (0xFFFFFFFF, 5), None),
    (2, (5, 0xFFFFFFFF), None), (2, "a path", None),
])
def test_sources_from_kernel_addresses(emu, core, kernel, address, expected):
    transport = vsock_module.VsockTransport(core, cid=kernel, mode="dgram")
    source = transport.dgram_source(address)
    assert (tuple(source) if source is not None else None) == expected


def test_resource_1_belongs_to_context_1_in_dgram_mode(make_dgram_runtime):
    with pytest.raises(NoAccess, match="discovery service"):
        DatagramEndpoint(1, runtime=make_dgram_runtime())
    well_known = make_dgram_runtime(cid=1)
    with pytest.raises(NoAccess, match="only resource 1"):
        DatagramEndpoint(2000, runtime=well_known)
    with DatagramEndpoint(1, runtime=well_known) as ds:
        assert ds.handle == VMCIHandle(1, 1)


def test_a_port_in_use_and_a_privileged_port(make_dgram_runtime, monkeypatch):
    rt = make_dgram_runtime()
    with DatagramEndpoint(4000, runtime=rt) as a:
        assert a.handle == VMCIHandle(HOST, 4000)
        with pytest.raises(DuplicateEntry):
            DatagramEndpoint(4000, runtime=rt)
    with DatagramEndpoint(4000, runtime=rt):  # free again once closed
        pass
    monkeypatch.setattr(standin, "has_bind_capability", lambda: False)
    with pytest.raises(NoAccess):
        DatagramEndpoint(500, runtime=rt)
    with DatagramEndpoint(runtime=rt) as auto:
        assert auto.handle.resource >= 1024


def test_a_denied_sender_is_dropped_and_counted(make_dgram_runtime):
    """The receiver enforces DG_SEND; the sender (another runtime) is not told."""
    with DatagramEndpoint(runtime=make_dgram_runtime()) as a, \
            DatagramEndpoint(runtime=make_dgram_runtime()) as b:
        a.send(b.handle, b"allowed")
        assert b.recv(timeout=WAIT).payload == b"allowed"
        b._runtime.access.change(b.handle, lambda acl: acl.add(a.handle, [], [VMCI_PRIV_DG_SEND]))
        a.send(b.handle, b"denied")  # no channel back: the send succeeds
        with pytest.raises(Timeout):
            b.recv(timeout=0.5)
        assert b.stats.denied == 1
        b._runtime.access.change(b.handle, lambda acl: acl.remove(a.handle, [VMCI_PRIV_DG_SEND]))
        a.send(b.handle, b"allowed again")
        assert b.recv(timeout=WAIT).payload == b"allowed again"
        assert b.stats.denied == 1


def test_a_receiver_gone(pair):
    a, b = pair
    gone = b.handle
    b.close()
    with pytest.raises(InvalidResource):  # VMCI's INVALID_RESOURCE arrives as EHOSTUNREACH
        a.send(gone, b"anyone?")
    assert a.send_status(gone, b"anyone?", 7) == VMCI_ERROR_INVALID_RESOURCE


def test_impossible_destinations(pair):
    a, _ = pair
    with pytest.raises(DstUnreachable):
        a.send(VMCIHandle(0, 1024), b"x")
    with pytest.raises(DstUnreachable):
        a.send(VMCIHandle(0xFFFFFFFF, 1024), b"x")
    with pytest.raises(InvalidResource):
        a.send(VMCIHandle(HOST, 0xFFFFFFFF), b"x")
    with pytest.raises(InvalidResource):
        a.send(VMCIHandle(77, 1024), b"x")  # nothing holds that port (the stand-in: EHOSTUNREACH)
    assert a.stats.sent == 0


def test_a_full_kernel_buffer_gives_no_resources_and_loses_nothing_accepted(pair):
    a, b = pair
    accepted = 0
    payload = b"q" * 1000
    while True:
        try:
            a.send(b.handle, struct.pack("<I", accepted) + payload)
        except NoResources:
            break
        accepted += 1
        assert accepted < 100000, "the receiver's buffers never filled"
    # The status form says the same, unless the receiver's reader made room meanwhile.
    last = struct.pack("<I", accepted) + payload
    rc = a.send_status(b.handle, last, len(last))
    if rc >= 0:
        accepted += 1
    else:
        assert rc == VMCI_ERROR_NO_RESOURCES
    got = [struct.unpack_from("<I", b.recv(timeout=WAIT).payload)[0] for _ in range(accepted)]
    assert got == list(range(accepted))
    with pytest.raises(Timeout):
        b.recv(timeout=0.3)
    a.send(b.handle, b"room again")
    assert b.recv(timeout=WAIT).payload == b"room again"


def test_more_sources_than_pairs_are_all_delivered(pair, emu, monkeypatch):
    monkeypatch.setattr(vsock_dgram, "MAX_SOURCES", 2)
    _, b = pair
    senders = [raw(emu, 3 + i, 8000 + i) for i in range(5)]
    try:
        for rounds in range(3):
            for i, sender in enumerate(senders):
                sender.sendto(b"%d.%d" % (i, rounds), path_of(emu, b.handle))
        got = {}
        for _ in range(15):
            datagram = b.recv(timeout=WAIT)
            got.setdefault(datagram.src, []).append(datagram.payload)
        assert got == {VMCIHandle(3 + i, 8000 + i): [b"%d.%d" % (i, r) for r in range(3)] for i in range(5)}
        assert len(b._listener._pairs) <= 2
    finally:
        for sender in senders:
            sender.close()


def test_closing_an_endpoint_frees_its_port_threads_and_descriptors(make_dgram_runtime, emu, fd_guard):
    def readers():
        return [t for t in threading.enumerate() if t.name.endswith("-dgram") and t.is_alive()]

    rt = make_dgram_runtime()
    with DatagramEndpoint(runtime=rt) as a, DatagramEndpoint(runtime=rt) as b:
        a.send(b.handle, b"x")
        assert b.recv(timeout=WAIT).payload == b"x"
        paths = [path_of(emu, b.handle), path_of(emu, b.handle)[:-2]]  # its DGRAM and STREAM ports
        assert all(os.path.exists(p) for p in paths)
        assert len(readers()) == 2
    assert not any(os.path.exists(p) for p in paths)
    assert readers() == []


def test_a_sender_denied_in_its_own_runtime_is_refused_at_once(pair):
    a, b = pair  # one runtime: the sender sees the receiver's privileges
    b._runtime.access.change(b.handle, lambda acl: acl.add(a.handle, [], [VMCI_PRIV_DG_SEND]))
    with pytest.raises(NoAccess):
        a.send(b.handle, b"no")
    assert a.stats.sent == 0


def test_a_source_whose_pair_the_endpoint_dropped_gets_a_fresh_one(pair, emu):
    _, b = pair
    sender = raw(emu, 3, 9000)
    try:
        sender.sendto(b"first", path_of(emu, b.handle))
        assert b.recv(timeout=WAIT) == (VMCIHandle(3, 9000), b"first")
        (fd,) = [fd for fd, (_, peer) in b._conns.items() if peer.handle == VMCIHandle(3, 9000)]
        with b._recv_lock:
            b._drop_conn(fd)  # as the endpoint does with a connection it gives up
        sender.sendto(b"second", path_of(emu, b.handle))
        assert b.recv(timeout=WAIT) == (VMCIHandle(3, 9000), b"second")
    finally:
        sender.close()


def test_an_endpoint_holds_its_stream_port_too_so_a_handle_names_one_thing(make_dgram_runtime, emu):
    rt = make_dgram_runtime()
    region = standin.standin_socket(socket.SOCK_STREAM)  # where a mirrored region would listen
    region.bind((standin.VMADDR_CID_ANY, 1024))
    other = raw(emu, HOST, 1025)  # a DGRAM port someone else holds
    try:
        with pytest.raises(DuplicateEntry):
            DatagramEndpoint(1024, runtime=rt)
        with DatagramEndpoint(runtime=rt) as ep:
            assert ep.handle.resource == 1026  # 1024's stream port and 1025's datagram port are taken
            late_region = standin.standin_socket(socket.SOCK_STREAM)
            with pytest.raises(OSError) as info:
                late_region.bind((standin.VMADDR_CID_ANY, 1026))
            assert info.value.errno == errno.EADDRINUSE
            late_region.close()
    finally:
        region.close()
        other.close()


def test_a_receiver_closed_while_its_buffers_are_full(pair):
    """Its reader waits on a full pair; closing it must not hang, and the sender sees it gone."""
    a, b = pair
    while True:
        try:
            a.send(b.handle, b"f" * 1000)
        except NoResources:
            break
    gone = b.handle
    started = time.monotonic()
    b.close()
    assert time.monotonic() - started < WAIT
    with pytest.raises(InvalidResource):
        a.send(gone, b"anyone?")


@pytest.mark.parametrize("code, dst, local_cid, expected", [
    (errno.EHOSTUNREACH, VMCIHandle(HOST, 1024), HOST, VMCI_ERROR_INVALID_RESOURCE),
    (errno.EHOSTUNREACH, VMCIHandle(1, 1), HOST, VMCI_ERROR_DST_UNREACHABLE),
    (errno.EHOSTUNREACH, VMCIHandle(1, 1), 1, VMCI_ERROR_DST_UNREACHABLE),
    (errno.EHOSTUNREACH, VMCIHandle(1, 7), 3, VMCI_ERROR_DST_UNREACHABLE),
    (errno.EHOSTUNREACH, VMCIHandle(1, 1024), 1, VMCI_ERROR_INVALID_RESOURCE),  # a loopback kernel's own
    (errno.EINVAL, VMCIHandle(77, 1024), HOST, VMCI_ERROR_DST_UNREACHABLE),
    (errno.ENOMEM, VMCIHandle(HOST, 1024), HOST, VMCI_ERROR_NO_MEM),
    (errno.EMSGSIZE, VMCIHandle(HOST, 1024), HOST, VMCI_ERROR_INVALID_ARGS),
    (errno.EAGAIN, VMCIHandle(HOST, 1024), HOST, None),
])
def test_sendto_errnos_undo_vmci_transports_mapping(code, dst, local_cid, expected):
    """vmci_transport's errnos (vmci-sdk.md 10.2) back to the SDK's codes; None: a link's mapping."""
    error = sendto_error(OSError(code, os.strerror(code)), dst, 5, local_cid)
    assert (error.code if error is not None else None) == expected
