"""libvmci.so.0's vsock dgram mode (src/vsc_vsock_dgram.c) on the host, over the emulation only.

No kernel here or in the guest bed has a vsock transport with datagrams (only VMware's vmci
transport has), so the mode runs over tests/c/vsock_emulation.c, linked into vsock_probe: with
``VSOCK_EMU_DGRAM=1`` its ``socket(AF_VSOCK, SOCK_DGRAM)`` is an AF_UNIX SOCK_DGRAM socket at
``$VSOCK_EMU_DIR/c<cid>p<port>.d``; without, it fails with ENODEV as under virtio. The real
AF_VSOCK family is never created: the shim tests of tests/test_clib_vsock_guard.py prove the
probes are ``socket()`` calls only (dgram first under ``auto``). The guest bed checks that
``auto`` does not pick dgram under vsock_loopback (tests/real_vsock/test_clib_vsock.py).

A datagram is the payload alone, sent from the endpoint's own socket; the receiver takes the
source from the kernel's address (port 1 of the well-known CID is the discovery service, (1, 1))
and enforces its privileges by dropping; nothing tells the sender.
"""
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from vsockcompat import constants as C
from vsockcompat.ds_protocol import decode_request, encode_reply
from vsockcompat.handles import VMCI_INVALID_HANDLE, VMCIHandle
from test_clib import CC, SANITIZE, SANITIZER_ENV, SANITIZER_MARKS, build, env_for
from test_clib_vsock_guard import EmulatedProbe, build_emulated, emulated, guarded  # noqa: F401  (fixtures)

HEADER, MAX = C.VMCI_DG_HEADERSIZE, C.VMCI_MAX_DG_PAYLOAD_SIZE
INVALID = str(C.VMCI_INVALID_ID)
SERVER_OUT = ("Running datagram server --- will respond to 3 queries.\n"
              + "Received message: HELLO, SERVER!\n" * 3)
CLIENT_OUT = "Received message: HELLO, CLIENT!\n"
VALGRIND = ["valgrind", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite", "--quiet"]

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH, and CC unset")


@pytest.fixture
def emu(tmp_path):
    path = tmp_path / "emu"
    path.mkdir()
    return str(path)


def probes(guarded, exe, rundir, emu, n, mode="dgram", wrap=(), **settings):
    """n vsock_probe processes on the emulated kernel of CID 1 (datagrams enabled unless
    VSOCK_EMU_DGRAM says otherwise), initialised."""
    settings.setdefault("VSOCK_EMU_DGRAM", "1")
    started = [EmulatedProbe(guarded, exe, rundir, emu, mode, wrap, **settings) for _ in range(n)]
    for probe in started:
        assert probe.ask("init") == ["0"]
    return started


def dgram_session(guarded, exe, rundir, emu, wrap=(), **settings):
    """Three C processes in dgram mode: datagrams both ways, the largest one, truncation, a denied
    sender's datagrams dropped, errors; every probe's (status, rest of stdout, stderr)."""
    a, b, c = probes(guarded, exe, rundir, emu, 3, wrap=wrap, **settings)
    try:
        assert a.ask("create 0") == ["1", "1024"]
        assert b.ask("create 0") == ["1", "1025"]  # 1024 is taken: the next port
        assert c.ask("create 0") == ["1", "1026"]
        assert sorted(os.listdir(emu)) == ["c1p1024.d", "c1p1025.d", "c1p1026.d"]  # DGRAM sockets only
        # the largest datagram both ways; the source is the kernel's address of the sender's socket
        assert a.ask("send 1 1025 %d" % MAX) == [str(MAX + HEADER)]
        assert b.ask("recv") == [str(MAX), "1", "1024", "1"]
        assert b.ask("send 1 1024 7") == [str(7 + HEADER)]
        assert a.ask("recv") == ["7", "1", "1025", "1"]
        assert a.ask("send 1 1025 0") == [str(HEADER)]
        assert b.ask("recv") == ["0", "1", "1024", "1"]
        # too small a buffer: VMCI_ERROR_NO_MEM and the datagram stays for the next receive
        assert a.ask("send 1 1025 300") == [str(300 + HEADER)]
        assert b.ask("recvn 299") == [str(C.VMCI_ERROR_NO_MEM), INVALID, INVALID, "0"]
        assert b.ask("recvn 300") == ["300", "1", "1024", "1"]
        # b denies a: a's datagram is read and dropped (a cannot know), c's arrives; lifted, a's again
        assert b.ask("deny 1 1024") == ["0"]
        assert a.ask("say 1 1025 from a, denied") == [str(len("from a, denied") + HEADER)]
        assert c.ask("say 1 1025 from c") == [str(len("from c") + HEADER)]
        assert b.ask("recvtext") == [str(len("from c")), "1", "1026", "from", "c"]
        assert b.ask("allow 1 1024") == ["0"]
        assert a.ask("say 1 1025 from a, allowed") == [str(len("from a, allowed") + HEADER)]
        assert b.ask("recvtext") == [str(len("from a, allowed")), "1", "1024", "from", "a,", "allowed"]
        # errors
        assert a.ask("send 1 1025 %d" % (MAX + 1)) == [str(C.VMCI_ERROR_INVALID_ARGS)]
        assert a.ask("send 1 4242 1") == [str(C.VMCI_ERROR_INVALID_RESOURCE)]  # nobody holds the port
        assert a.ask("send 0 5 1") == a.ask("send 3 5 1") == [str(C.VMCI_ERROR_DST_UNREACHABLE)]
        assert a.ask("send 1 %d 1" % C.VMCI_INVALID_ID) == [str(C.VMCI_ERROR_INVALID_RESOURCE)]
        assert a.ask("shm") == ["0", "-21", "-21", "-21"]  # regions mirrored over streams (auto), 4242 unserved
        # no discovery service holds port 1 of the well-known CID
        assert a.ask("lookup anything") == [str(C.VMCI_ERROR_DST_UNREACHABLE), INVALID, INVALID]
        # resource 1 is the discovery service's in dgram mode: only context 1's process may take it
        assert c.ask("create 1") == [INVALID, INVALID]
        assert not os.path.exists(os.path.join(emu, "c1p1.d"))
        assert c.ask("create 1025") == [INVALID, INVALID]  # b's port: taken
    finally:
        results = a.close(), b.close(), c.close()
    return results


def test_c_to_c_in_dgram_mode(guarded, emulated, rundir, emu):
    for status, out, err in dgram_session(guarded, emulated, rundir, emu):
        assert (status, out, err) == (0, "", "")


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_c_to_c_in_dgram_mode_under_valgrind(guarded, emulated, rundir, emu):
    for status, out, err in dgram_session(guarded, emulated, rundir, emu, VALGRIND):
        assert (status, out, err) == (0, "", "")


def test_c_to_c_in_dgram_mode_under_the_sanitizers(rundir, emu, tmp_path):
    built = build(str(tmp_path), SANITIZE)
    exe = build_emulated("vsock_probe", built.lib_dir, str(tmp_path), SANITIZE)
    for status, out, err in dgram_session(built, exe, rundir, emu, **SANITIZER_ENV):
        assert status == 0 and out == "", err
        assert all(mark not in err for mark in SANITIZER_MARKS), err


def test_a_full_receiver_gives_no_resources_until_it_reads(guarded, emulated, rundir, emu):
    """The queue bound is the receiving kernel's socket buffer: a send that would block is
    VMCI_ERROR_NO_RESOURCES at once, and sends go through again once the receiver reads."""
    a, b = probes(guarded, emulated, rundir, emu, 2)
    try:
        assert a.ask("create 0") == ["1", "1024"]
        assert b.ask("create 0") == ["1", "1025"]
        assert a.ask("sendwait 1 1025 %d" % C.VMCI_ERROR_NO_RESOURCES) == [str(C.VMCI_ERROR_NO_RESOURCES)]
        assert b.ask("recv") == ["1", "1", "1024", "0"]  # the one byte "x" of sendwait
        assert a.ask("send 1 1025 3") == [str(3 + HEADER)]
    finally:
        results = a.close(), b.close()
    assert results == ((0, "", ""),) * 2


def test_only_context_1_takes_resource_1_and_its_datagrams_are_from_1_1(guarded, emulated, rundir, emu):
    """The process speaking for context 1 (VSOCKCOMPAT_CID=1, the discovery daemon's) may bind
    resource 1; what it sends from there arrives as from (1, 1), from the kernel's address alone."""
    ds, = probes(guarded, emulated, rundir, emu, 1, VSOCKCOMPAT_CID="1")
    client, = probes(guarded, emulated, rundir, emu, 1)
    try:
        assert ds.ask("create 1") == ["1", "1"]
        assert client.ask("create 1") == [INVALID, INVALID]
        assert client.ask("create 0") == ["1", "1024"]
        assert client.ask("send 1 1 4") == [str(4 + HEADER)]
        assert ds.ask("echo") == [str(4 + HEADER)]
        assert client.ask("recv") == ["4", "1", "1", "1"]
    finally:
        results = ds.close(), client.close()
    assert results == ((0, "", ""),) * 2


@pytest.mark.parametrize("dgram,suffix", [("1", ".d"), ("0", "")])
def test_auto_takes_dgram_where_such_sockets_can_be_made(guarded, emulated, rundir, emu, dgram, suffix):
    """auto: DGRAM when the kernel creates such a socket (a vmci kernel), else SEQPACKET (virtio)."""
    a, b = probes(guarded, emulated, rundir, emu, 2, mode="auto", VSOCK_EMU_DGRAM=dgram)
    try:
        assert a.ask("create 0") == ["1", "1024"]
        assert b.ask("create 0") == ["1", "1025"]
        assert sorted(os.listdir(emu)) == ["c1p1024" + suffix, "c1p1025" + suffix]
        assert a.ask("send 1 1025 9") == [str(9 + HEADER)]
        assert b.ask("recv") == ["9", "1", "1024", "1"]
    finally:
        results = a.close(), b.close()
    assert results == ((0, "", ""),) * 2


def test_explicit_dgram_without_datagram_sockets_fails_init(guarded, emulated, rundir, emu):
    probe = EmulatedProbe(guarded, emulated, rundir, emu, "dgram")  # VSOCK_EMU_DGRAM unset: ENODEV
    assert probe.ask("init") == [str(C.VMCI_ERROR_DEVICE_NOT_FOUND)]
    assert probe.close() == (0, "", "vsockcompat: the vsock transport cannot run here: AF_VSOCK SOCK_DGRAM "
                                    "sockets cannot be created here: No such device\n")
    assert os.listdir(emu) == []


def test_dgram_and_seqpacket_endpoints_cannot_reach_each_other(guarded, emulated, rundir, emu):
    """A vsock port has one socket type: both sides must run the same mode (auto picks the same)."""
    d, = probes(guarded, emulated, rundir, emu, 1)
    s, = probes(guarded, emulated, rundir, emu, 1, mode="seqpacket")
    try:
        assert d.ask("create 5000") == ["1", "5000"]
        assert s.ask("create 5001") == ["1", "5001"]
        assert d.ask("send 1 5001 1") == [str(C.VMCI_ERROR_INVALID_RESOURCE)]
        assert s.ask("send 1 5000 1") == [str(C.VMCI_ERROR_INVALID_RESOURCE)]
    finally:
        results = d.close(), s.close()
    assert results == ((0, "", ""),) * 2


# The discovery service in dgram mode. Its daemon is Python's (vsockcompat/ds_server.py), whose
# dgram mode is not in this tree yet: the stand-in below answers at port 1 of CID 1 with the
# daemon's wire (vsockcompat/ds_protocol.py) and a plain registry, enough for the C client's
# part: requests to (1, 1), replies taken as from (1, 1) by their source port alone.

class DiscoveryStandIn:
    """A registry answering DS requests on the emulated DGRAM port 1 of CID 1, in a thread."""

    def __init__(self, emu, cid=1):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(os.path.join(emu, "c%dp%d.d" % (cid, C.VMCI_DS_RESOURCE_ID)))
        self.registry = {C.VMCI_PUBLIC_GROUP_NAME.encode(): VMCIHandle(C.VMCI_HOST_CONTEXT_ID, 1023)}
        self.sources = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            payload, path = self.sock.recvfrom(C.VMCI_MAX_DG_PAYLOAD_SIZE)
            if not payload:
                return
            self.sources.append(os.path.basename(path))
            req = decode_request(payload)
            handle, code = VMCI_INVALID_HANDLE, C.VMCI_SUCCESS
            if req.action == C.VMCI_DS_ACTION_LOOKUP:
                handle = self.registry.get(req.name, VMCI_INVALID_HANDLE)
                code = C.VMCI_SUCCESS if req.name in self.registry else C.VMCI_ERROR_NOT_FOUND
            elif req.action == C.VMCI_DS_ACTION_REGISTER:
                code = C.VMCI_ERROR_ALREADY_EXISTS if req.name in self.registry else C.VMCI_SUCCESS
                self.registry.setdefault(req.name, req.handle)
            else:
                code = C.VMCI_SUCCESS if self.registry.pop(req.name, None) else C.VMCI_ERROR_NOT_FOUND
            self.sock.sendto(encode_reply(req.msgid, code, handle), path)

    def close(self):
        stop = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        stop.sendto(b"", self.sock.getsockname())
        stop.close()
        self.thread.join(10)
        self.sock.close()


def app_env(guarded, rundir, emu):
    env = env_for(rundir, "pure", guarded.library)
    env.update(LD_LIBRARY_PATH=guarded.lib_dir, VSOCKCOMPAT_TRANSPORT="vsock", VSOCKCOMPAT_VSOCK_MODE="dgram",
               VSOCK_EMU_DIR=emu, VSOCK_EMU_DGRAM="1", VSOCKCOMPAT_DS_AUTOSTART="0")
    return env


@pytest.fixture(scope="module")
def datagram_app_emu(guarded, tmp_path_factory):
    """The SDK's datagramApp with the emulation linked in."""
    return build_emulated("datagramApp", guarded.lib_dir, str(tmp_path_factory.mktemp("appemu")))


def test_datagram_app_c_to_c_in_dgram_mode(guarded, datagram_app_emu, rundir, emu):
    ds = DiscoveryStandIn(emu)
    env = app_env(guarded, rundir, emu)
    try:
        server = subprocess.Popen([datagram_app_emu, "-s"], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while b"HOST INFO" not in ds.registry:  # the server registers before it serves
                assert server.poll() is None and time.monotonic() < deadline, server.communicate()
                time.sleep(0.05)
            for _ in range(3):
                client = subprocess.run([datagram_app_emu, "-c"], env=env, capture_output=True, text=True,
                                        timeout=60)
                assert (client.returncode, client.stdout, client.stderr) == (0, CLIENT_OUT, "")
            assert server.communicate(timeout=60) == (SERVER_OUT, "")
            assert server.returncode == 0
        finally:
            if server.poll() is None:
                server.kill()
                server.communicate()
    finally:
        ds.close()
    # every request came from a DGRAM endpoint of the C library (the kernel's address, no hello)
    assert ds.sources and all(name.startswith("c1p") and name.endswith(".d") for name in ds.sources)
    assert b"HOST INFO" not in ds.registry  # the server unregistered when it ended


def test_a_guest_and_its_host_in_dgram_mode(guarded, emulated, rundir, emu):
    """A guest kernel (CID 3) and its host (CID 2) sharing the emulation: sources are the kernels'
    CIDs, and the discovery service is port 1 of CID 2 for the guest, its replies (1, 1)."""
    ds = DiscoveryStandIn(emu, cid=2)
    guest, peer = probes(guarded, emulated, rundir, emu, 2, VSOCK_EMU_CID="3")
    host, = probes(guarded, emulated, rundir, emu, 1, VSOCK_EMU_CID="2")
    try:
        assert guest.ask("create 0") == ["3", "1024"]
        assert host.ask("create 0") == ["2", "1024"]
        assert guest.ask("send 2 1024 %d" % MAX) == [str(MAX + HEADER)]
        assert host.ask("recv") == [str(MAX), "3", "1024", "1"]
        assert host.ask("send 3 1024 5") == [str(5 + HEADER)]
        assert guest.ask("recv") == ["5", "2", "1024", "1"]
        # the C client takes a reply only from (1, 1): port 1 of the well-known CID is that
        assert guest.ask("lookup " + C.VMCI_PUBLIC_GROUP_NAME) == ["0", "2", "1023"]
        assert guest.ask("register guest svc") == ["0"]
        assert ds.registry[b"guest svc"] == VMCIHandle(3, 1024)
        # nothing holds (4, 1024): the emulation cannot tell a missing kernel from a missing port
        assert host.ask("send 4 1024 1") == [str(C.VMCI_ERROR_INVALID_RESOURCE)]
        # context 1 lives on the host: a guest's own port 1 is an ordinary endpoint of the guest
        assert peer.ask("create 1") == ["3", "1"]
        assert peer.ask("send 3 1024 7") == [str(7 + HEADER)]
        assert guest.ask("recv") == ["7", "3", "1", "1"]
    finally:
        results = guest.close(), peer.close(), host.close()
        ds.close()
    assert results == ((0, "", ""),) * 3
    assert ds.sources and all(name.startswith("c3p") and name.endswith(".d") for name in ds.sources)
