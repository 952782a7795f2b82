"""libvmci.so.0 on the hybrid transport (src/vsc_hybrid.c), on the host only.

Legacy C programs (tests/c/vsock_probe.c driven line by line, the SDK's datagramApp) run with
``VSOCKCOMPAT_TRANSPORT=hybrid`` against a fake VMM (test_hybrid.FakeVMM: ``CONNECT <port>`` /
``OK <hostport>``, a fake guest behind it), against Python host programs on hybrid (both cores),
and against the hybrid discovery daemon they start themselves. AF_UNIX only: every C program runs
under tests/c/no_vsock_shim.c, whose records must stay empty (no AF_VSOCK socket, no /dev/vsock),
and this process refuses AF_VSOCK (test_hybrid.no_af_vsock).
"""
import fcntl
import os
import select
import shutil
import socket
import subprocess
import time

import pytest

from vsockcompat import constants as C
from vsockcompat import ds_client, errors
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.ds_protocol import encode_request
from vsockcompat.handles import VMCI_INVALID_HANDLE, VMCIHandle
from vsockcompat.runtime import Runtime
from vsockcompat.transport import vsock as vsock_module

from conftest import PYTHON, child_env
from guest_c_programs import ProbeProcess, fnv1a, probe_pattern
from test_clib import CC, CLIENT_OUT, SERVER_OUT, env_for
from test_clib_vsock_guard import guarded  # noqa: F401  (fixture: library, datagramApp, probe, shim)
from test_hybrid import (GUEST, WAIT, EchoGuest, FakeVMM, connect_as_guest, frame, guest_asks,  # noqa: F401
                         guest_reply, hybrid_settings, no_af_vsock, stop_vmm, vmm)

HEADER = C.VMCI_DG_HEADERSIZE
PY_APP = [PYTHON, "-m", "vsockcompat", "datagram-app"]

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH, and CC unset")


@pytest.fixture
def shim_log(tmp_path):
    """Where the C programs' shim records AF_VSOCK attempts; none may happen."""
    log = tmp_path / "no_vsock.log"
    yield str(log)
    assert not log.exists() or log.read_text() == "", "AF_VSOCK was touched: %s" % log.read_text()


def c_env(guarded, rundir, uds, shim_log, cids=None, **extra):
    """A C program's environment on hybrid over the VMM socket(s) ``uds`` (``:``-separated)."""
    env = env_for(rundir, "pure", guarded.library, VSOCKCOMPAT_TRANSPORT="hybrid", VSOCKCOMPAT_HYBRID_UDS=uds,
                  NO_VSOCK_LOG=shim_log, **extra)
    env.update(LD_LIBRARY_PATH=guarded.lib_dir, LD_PRELOAD=guarded.shim)
    if cids is not None:
        env["VSOCKCOMPAT_HYBRID_CID"] = cids
    else:
        env.pop("VSOCKCOMPAT_HYBRID_CID", None)
    return env


def py_env(rundir, core_name, uds, cid=2):
    return child_env(rundir, core_name, cid=cid, VSOCKCOMPAT_TRANSPORT="hybrid", VSOCKCOMPAT_HYBRID_UDS=uds,
                     VSOCKCOMPAT_HYBRID_CID=str(GUEST))


class Probe(ProbeProcess):
    """vsock_probe on hybrid, initialised, with an endpoint (``handle``); ``close()`` is idempotent."""

    def __init__(self, guarded, env, rid=0, wrap=()):
        super().__init__(list(wrap) + [guarded.probe], env, WAIT * (6 if wrap else 1))
        assert self.ask("init") == ["0"]
        cid, got = (int(v) for v in self.ask("create %d" % rid))
        assert cid == 2 and got >= (rid or 1024)
        self.handle = VMCIHandle(cid, got)

    def close(self):
        if not self.proc.stdout.closed:
            super().close()


def closed_by_peer(sock):
    """Whether the other end closed ``sock`` (an end of file, or a reset: it closed unread)."""
    sock.settimeout(WAIT)
    try:
        return sock.recv(16) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def probe_on(guarded, rundir, shim_log):
    """``probe_on(uds, **env)``: a started Probe on hybrid; all are closed (exit 0, quiet stderr) at
    teardown (ask for it after ``vmm``, so that they close before the VMM's guest is joined)."""
    started = []

    def start(uds, rid=0, wrap=(), **extra):
        started.append(Probe(guarded, c_env(guarded, rundir, uds, shim_log, **extra), rid, wrap))
        return started[-1]
    yield start
    for probe in started:
        probe.close()


# Host -> guest through the VMM, and back through <uds>_<port>

def test_c_reaches_a_guest_through_the_vmm_and_hears_back(vmm, probe_on):
    probe = probe_on(vmm.path)
    rid = probe.handle.resource
    assert os.path.exists("%s_%d" % (vmm.path, rid)) and os.path.exists("%s_%d.host" % (vmm.path, rid))
    assert probe.ask("say %d 5000 hello, guest" % GUEST) == [str(len("hello, guest") + HEADER)]
    assert probe.ask("recvtext", 3) == ["12", str(GUEST), "5000", "tseug ,olleh"]
    guest = vmm.guest.received
    assert guest.get(timeout=WAIT) == ("hello", (False, rid))
    fields, payload = guest.get(timeout=WAIT)[1:]
    assert fields == (GUEST, 5000, 2, rid, len(payload)) and payload == b"hello, guest"
    for size in (0, 1, 4096, C.VMCI_MAX_DG_PAYLOAD_SIZE):
        assert probe.ask("send %d 5000 %d" % (GUEST, size)) == [str(size + HEADER)]
        assert probe.ask("recvsum") == [str(size), str(GUEST), "5000", str(fnv1a(probe_pattern(size)[::-1]))]
    assert vmm.connects == [5000]  # one link per destination
    probe.close()
    assert not os.path.exists("%s_%d" % (vmm.path, rid))


@pytest.mark.parametrize("answer, code", [
    ("close", C.VMCI_ERROR_INVALID_RESOURCE),      # the VMM closes: the guest refused
    ("silent", C.VMCI_ERROR_TIMEOUT),              # no answer within the handshake's bound
    (b"ERR no listener\n", C.VMCI_ERROR_DST_UNREACHABLE),
    (b"OK\n", C.VMCI_ERROR_DST_UNREACHABLE),
    (b"OK -1\n", C.VMCI_ERROR_DST_UNREACHABLE),
    (b"OK 99999999999\n", C.VMCI_ERROR_DST_UNREACHABLE),
    (b"ok 12\n", C.VMCI_ERROR_DST_UNREACHABLE),
    (b"OK 12", C.VMCI_ERROR_TIMEOUT),              # no newline: still waiting when the time is up
    (b"A" * 100, C.VMCI_ERROR_DST_UNREACHABLE),
], ids=["no-answer", "silent", "err", "no-port", "negative", "too-big", "lowercase", "unterminated", "garbage"])
def test_bad_handshakes_give_the_codes_and_the_endpoint_goes_on(vmm, probe_on, answer, code):
    vmm.answer = lambda port: answer if port == 5000 else "ok"
    probe = probe_on(vmm.path)
    assert probe.ask("send %d 5000 10" % GUEST) == [str(code)]
    assert probe.ask("say %d 5001 fine" % GUEST) == [str(4 + HEADER)]
    assert probe.ask("recvtext", 3) == ["4", str(GUEST), "5001", "enif"]


def test_unreachable_destinations(probe_on, tmp_path):
    """No VMM at the socket, a CID behind no socket, context 0; a free host port; the host's own
    contexts are reached without any VMM."""
    probe = probe_on(str(tmp_path / "nothing.vsock"))
    me = probe.handle
    for cid in (GUEST, 4, 0, C.VMCI_INVALID_ID):
        assert probe.ask("send %d 5000 1" % cid) == [str(C.VMCI_ERROR_DST_UNREACHABLE)], cid
    assert probe.ask("send 2 %d 1" % (me.resource + 1)) == [str(C.VMCI_ERROR_INVALID_RESOURCE)]
    assert probe.ask("send 1 1 1") == [str(C.VMCI_ERROR_INVALID_RESOURCE)]  # no daemon, none started by a send
    assert probe.ask("send 2 %d 9" % me.resource) == [str(9 + HEADER)]
    assert probe.ask("recv") == ["9", "2", str(me.resource), "1"]


def test_guest_input_is_judged_by_the_path_it_arrived_on(vmm, probe_on):
    """At <uds>_<rid> the sender is the VMM's guest (a hello claiming context 1 is refused, a frame
    claiming another source is dropped with its connection); at .host a process of this user,
    context 1 if its hello says so."""
    probe = probe_on(vmm.path)
    me = tuple(probe.handle)
    hello = vsock_module.encode_hello
    probe.proc.stdin.write("recvtext\n")  # receiving (so accepting and reading) from now on
    probe.proc.stdin.flush()
    claims_ds = connect_as_guest(vmm, me[1], hello(1, well_known=True) + frame(me, (1, 1), b"I am the DS"))
    forged = connect_as_guest(vmm, me[1], hello(5007) + frame(me, (4, 5007), b"I am guest 4"))
    for sock in (claims_ds, forged):
        assert closed_by_peer(sock)  # refused, or dropped: closed
        sock.close()
    honest = connect_as_guest(vmm, me[1], hello(5008) + frame(me, (GUEST, 5008), b"honest"))
    assert probe.proc.stdout.readline() == "recvtext=6 %d 5008 honest\n" % GUEST
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.connect("%s_%d.host" % (vmm.path, me[1]))
    host.sendall(hello(1, well_known=True) + frame(me, (1, 1), b"the DS"))
    assert probe.ask("recvtext", 3) == ["6", "1", "1", "the DS"]
    for sock in (honest, host):
        sock.close()


# C and Python host programs on hybrid (both cores), at each other's .host paths

def test_c_and_python_host_programs_both_ways(core, rundir, vmm, probe_on):
    probe = probe_on(vmm.path)
    host = Runtime(hybrid_settings(rundir, vmm.path), core=core)
    well_known = Runtime(hybrid_settings(rundir, vmm.path, cid=1), core=core)
    with DatagramEndpoint(runtime=host) as ep, DatagramEndpoint(runtime=well_known) as ds_like:
        assert ep.send(probe.handle, b"from python") == len(b"from python")
        assert probe.ask("recvtext", 3) == ["11", "2", str(ep.handle.resource), "from python"]
        assert probe.ask("say 2 %d from c" % ep.handle.resource) == [str(6 + HEADER)]
        assert ep.recv(timeout=WAIT) == (probe.handle, b"from c")
        for size in (0, C.VMCI_MAX_DG_PAYLOAD_SIZE):
            assert probe.ask("send 2 %d %d" % (ep.handle.resource, size)) == [str(size + HEADER)]
            assert ep.recv(timeout=WAIT) == (probe.handle, probe_pattern(size))
            assert ep.send(probe.handle, probe_pattern(size)) == size
            assert probe.ask("recv") == [str(size), "2", str(ep.handle.resource), "1"]
        # Context 1 is the host's too: its hello says so at .host, and C answers it there.
        assert ds_like.send(probe.handle, b"from 1") == 6
        assert probe.ask("echo") == [str(6 + HEADER)]
        assert ds_like.recv(timeout=WAIT) == (probe.handle, b"from 1")
        # A C receiver's privileges reach the Python sender as a verdict.
        assert probe.ask("deny 2 %d" % ep.handle.resource) == ["0"]
        deadline = time.monotonic() + WAIT
        while ep.send_status(probe.handle, b"x", 1) != C.VMCI_ERROR_NO_ACCESS and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ep.send_status(probe.handle, b"x", 1) == C.VMCI_ERROR_NO_ACCESS
    assert vmm.connects == []  # host programs never go through the VMM


# The discovery service: the C program starts the hybrid daemon; host and guest both use it

def test_c_starts_the_hybrid_daemon_and_host_and_guest_find_its_name(core, rundir, tmp_path, probe_on):
    uds = str(tmp_path / "vm.vsock")
    guest = EchoGuest(uds, echo=False)
    fake = FakeVMM(uds, guest)
    try:
        probe = probe_on(os.path.relpath(uds), VSOCKCOMPAT_DS_AUTOSTART="1")  # made absolute for the daemon
        assert probe.ask("register C SERVICE") == ["0"]
        assert os.path.exists(os.path.join(rundir, "ds.pid"))
        assert os.path.exists(uds + "_1") and os.path.exists(uds + "_1.host")
        assert probe.ask("lookup C SERVICE") == ["0", "2", str(probe.handle.resource)]
        host = Runtime(hybrid_settings(rundir, uds)._replace(ds_autostart=False), core=core)
        assert ds_client.lookup_status("C SERVICE", runtime=host) == (C.VMCI_SUCCESS, probe.handle)
        ask = guest_asks(fake, 5000, encode_request(C.VMCI_DS_ACTION_LOOKUP, 7, VMCI_INVALID_HANDLE, "C SERVICE"))
        reply = guest_reply(fake, 5000)
        assert (reply.msgid, reply.code, reply.handle) == (7, C.VMCI_SUCCESS, probe.handle)
        ask.close()
        assert probe.ask("register C SERVICE") == [str(C.VMCI_ERROR_ALREADY_EXISTS)]
        assert probe.ask("unregister C SERVICE") == ["0"]
        assert probe.ask("lookup C SERVICE")[0] == str(C.VMCI_ERROR_NOT_FOUND)
        assert probe.ask("lookup %s" % ("x" * (C.VMCI_DS_MAX_NAME_LEN + 1)))[0] == str(C.VMCI_ERROR_INVALID_ARGS)
    finally:
        stop_vmm(fake, guest)


def test_without_autostart_no_daemon_is_started(rundir, vmm, probe_on):
    probe = probe_on(vmm.path, VSOCKCOMPAT_DS_AUTOSTART="0")
    assert probe.ask("lookup NOBODY")[0] == str(C.VMCI_ERROR_INVALID_RESOURCE)
    assert not os.path.exists(os.path.join(rundir, "ds.pid"))


# The SDK's datagramApp: C on one side, Python on the other, both on hybrid

def wait_registered(rundir, uds, core, name="HOST INFO"):
    host = Runtime(hybrid_settings(rundir, uds)._replace(ds_autostart=False), core=core)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rc, handle = ds_client.lookup_status(name, runtime=host)
        if rc == C.VMCI_SUCCESS:
            return handle
        time.sleep(0.05)
    raise AssertionError("%r was never registered" % name)


@pytest.mark.parametrize("server_side", ["c", "python"])
def test_datagram_app_between_c_and_python_on_hybrid(guarded, core, rundir, vmm, shim_log, server_side):
    c_cmd = [guarded.datagramApp]
    c_environ = c_env(guarded, rundir, vmm.path, shim_log, VSOCKCOMPAT_DS_AUTOSTART="1")
    py_environ = py_env(rundir, core.NAME, vmm.path)
    server_cmd, server_env = (c_cmd, c_environ) if server_side == "c" else (PY_APP, py_environ)
    client_cmd, client_env = (PY_APP, py_environ) if server_side == "c" else (c_cmd, c_environ)
    server = subprocess.Popen(server_cmd + ["-s"], env=server_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        handle = wait_registered(rundir, vmm.path, core)
        assert handle.context == 2
        for _ in range(3):
            client = subprocess.run(client_cmd + ["-c"], env=client_env, capture_output=True, text=True, timeout=60)
            assert (client.returncode, client.stdout, client.stderr) == (0, CLIENT_OUT, "")
        out, err = server.communicate(timeout=60)
        assert (server.returncode, out, err) == (0, SERVER_OUT, "")
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    late = subprocess.run(client_cmd + ["-c"], env=client_env, capture_output=True, text=True, timeout=60)
    assert (late.returncode, late.stdout, late.stderr) == (0, "", "Failed to lookup in discovery service.\n")
    assert vmm.connects == []


def test_two_vmm_sockets_route_by_cid_and_name_their_guests(tmp_path, probe_on):
    paths = [str(tmp_path / "a.vsock"), str(tmp_path / "b.vsock")]
    guests = [EchoGuest(paths[0], cid=3), EchoGuest(paths[1], cid=4)]
    vmms = [FakeVMM(path, guest) for path, guest in zip(paths, guests)]
    try:
        probe = probe_on(":".join(paths), cids="3:4")
        rid = probe.handle.resource
        assert all(os.path.exists("%s_%d%s" % (p, rid, s)) for p in paths for s in ("", ".host"))
        assert probe.ask("say 4 6000 to four") == [str(7 + HEADER)]
        assert probe.ask("recvtext", 3) == ["7", "4", "6000", "ruof ot"]
        assert probe.ask("say 3 6000 to three") == [str(8 + HEADER)]
        assert probe.ask("recvtext", 3) == ["8", "3", "6000", "eerht ot"]
        assert probe.ask("send 5 6000 1") == [str(C.VMCI_ERROR_DST_UNREACHABLE)]
        assert (vmms[0].connects, vmms[1].connects) == ([6000], [6000])
        assert probe.ask("shm") == ["0"] + [str(C.VMCI_ERROR_NOT_FOUND)] * 3  # mirrored; nobody at (2, 4242)
        probe.close()
    finally:
        for fake, guest in zip(vmms, guests):
            stop_vmm(fake, guest)


@pytest.mark.parametrize("settings, why", [
    ({"VSOCKCOMPAT_HYBRID_UDS": ""}, "the hybrid transport needs VSOCKCOMPAT_HYBRID_UDS"),
    ({"VSOCKCOMPAT_HYBRID_UDS": "{d}/a:"}, "VSOCKCOMPAT_HYBRID_UDS has an empty path in"),
    ({"VSOCKCOMPAT_HYBRID_UDS": "{d}/a:{d}/b"}, "VSOCKCOMPAT_HYBRID_CID must give one guest CID per socket"),
    ({"VSOCKCOMPAT_HYBRID_UDS": "{d}/a:{d}/b", "VSOCKCOMPAT_HYBRID_CID": "3"},
     "VSOCKCOMPAT_HYBRID_CID must give one guest CID per socket"),
    ({"VSOCKCOMPAT_HYBRID_UDS": "{d}/a:{d}/b", "VSOCKCOMPAT_HYBRID_CID": "3:3"}, "names a guest CID twice"),
    ({"VSOCKCOMPAT_HYBRID_UDS": "{d}/a:{d}/./a", "VSOCKCOMPAT_HYBRID_CID": "3:4"}, "names a socket twice"),
    ({"VSOCKCOMPAT_HYBRID_CID": "2"}, "VSOCKCOMPAT_HYBRID_CID must hold decimal guest CIDs"),
    ({"VSOCKCOMPAT_HYBRID_CID": "x"}, "VSOCKCOMPAT_HYBRID_CID must hold decimal guest CIDs"),
    ({"VSOCKCOMPAT_HYBRID_CID": "4294967295"}, "VSOCKCOMPAT_HYBRID_CID must hold decimal guest CIDs"),
    ({"VSOCKCOMPAT_HYBRID_UDS": "{d}/missing/a"}, "the directory of the VMM socket does not exist"),
    ({"VSOCKCOMPAT_HYBRID_UDS": "{d}/" + "x" * 100}, "too long for Unix socket paths with a port suffix"),
    ({"VSOCKCOMPAT_CID": "3"}, "on the hybrid transport a process is in context 2 (the host) or 1"),
], ids=["unset", "empty-path", "cids-missing", "cids-short", "cid-twice", "path-twice", "cid-2", "cid-text",
        "cid-invalid", "no-dir", "too-long", "context-3"])
def test_bad_hybrid_settings_fail_init_with_why(guarded, rundir, tmp_path, shim_log, settings, why):
    d = str(tmp_path)
    env = c_env(guarded, rundir, os.path.join(d, "vm.vsock"), shim_log)
    env.update({name: value.format(d=d) for name, value in settings.items()})
    result = subprocess.run([guarded.datagramApp, "-c"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 254
    first, second = result.stderr.splitlines()
    assert first.startswith("vsockcompat: ") and why in first and second == "Failed to init VMCI library."


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_a_hybrid_session_under_valgrind(vmm, probe_on):
    """Links through the VMM and between host programs, a refused guest, a refused handshake:
    no memory error and no definite leak (valgrind's exit status 99, checked by close())."""
    wrap = ["valgrind", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite", "--quiet"]
    vmm.answer = lambda port: "close" if port == 5001 else "ok"
    a, b = probe_on(vmm.path, wrap=wrap), probe_on(vmm.path, wrap=wrap)
    assert a.ask("say %d 5000 via the vmm" % GUEST) == [str(11 + HEADER)]
    assert a.ask("recvtext", 3) == ["11", str(GUEST), "5000", "mmv eht aiv"]
    assert a.ask("send %d 5001 1" % GUEST) == [str(C.VMCI_ERROR_INVALID_RESOURCE)]
    assert a.ask("say 2 %d to b" % b.handle.resource) == [str(4 + HEADER)]
    assert b.ask("echo") == [str(4 + HEADER)]
    assert a.ask("recvtext", 3) == ["4", "2", str(b.handle.resource), "to b"]
    claim = connect_as_guest(vmm, b.handle.resource, vsock_module.encode_hello(1, well_known=True))
    honest = connect_as_guest(vmm, b.handle.resource, vsock_module.encode_hello(5009)
                              + frame(tuple(b.handle), (GUEST, 5009), b"ok"))
    assert b.ask("recvtext", 3) == ["2", str(GUEST), "5009", "ok"]
    assert closed_by_peer(claim)
    for sock in (claim, honest):
        sock.close()
    a.close()
    b.close()


def test_resource_ids_are_shared_with_python_and_dead_ones_reclaimed(core, rundir, vmm, probe_on, guarded, shim_log):
    """One id space for every host program of the VMM sockets: a live endpoint holds its id (the
    SDK's invalid handle for a second one), the socket files of a killed program are reclaimed."""
    first = probe_on(vmm.path, rid=40000)
    host = Runtime(hybrid_settings(rundir, vmm.path), core=core)
    with pytest.raises(errors.DuplicateEntry):
        DatagramEndpoint(40000, runtime=host)
    with DatagramEndpoint(40001, runtime=host):
        assert first.ask("create 40001") == [str(C.VMCI_INVALID_ID)] * 2
    first.proc.kill()
    first.proc.wait()
    assert os.path.exists("%s_40000.host" % vmm.path)  # left behind by the killed program
    second = probe_on(vmm.path, rid=40000)
    assert second.handle == (2, 40000)
    with DatagramEndpoint(runtime=host) as ep:
        assert ep.send(second.handle, b"reclaimed") == 9
        assert second.ask("recvtext", 3) == ["9", "2", str(ep.handle.resource), "reclaimed"]
    first.proc.stdin.close()
    first.proc.stdout.close()
    first.proc.stderr.close()


@pytest.mark.parametrize("shm_mode, codes", [
    ("auto", ["0"] + [str(C.VMCI_ERROR_NOT_FOUND)] * 3),
    ("mirrored", ["0"] + [str(C.VMCI_ERROR_NOT_FOUND)] * 3),
    ("shared", ["1", str(C.VMCI_ERROR_UNAVAILABLE), str(C.VMCI_ERROR_UNAVAILABLE), str(C.VMCI_ERROR_NOT_FOUND)]),
])
def test_shared_memory_on_hybrid_is_mirrored_unless_shared_is_asked(vmm, probe_on, shm_mode, codes):
    """libvmci.so.0 mirrors regions on hybrid as Python does (auto and mirrored; the region
    tests are test_clib_hybrid_mirror.py); VSOCKCOMPAT_SHM_MODE=shared gives the codes of no
    shared memory, as on vsock. The probe creates a region and asks for (2, 4242), where nobody is."""
    probe = probe_on(vmm.path, VSOCKCOMPAT_SHM_MODE=shm_mode)
    assert probe.ask("shm") == codes
    assert vmm.connects == []


def test_c_claims_a_port_under_the_same_lock_as_python(vmm, probe_on):
    """A C program claims a port under the claim lock of transport/hybrid.py (flock on the VMM
    sockets' directory): while another process holds it, an endpoint's creation waits, and it
    completes, on a port of its own, once the lock is let go."""
    probe = probe_on(vmm.path)
    fd = os.open(os.path.dirname(vmm.path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        probe.proc.stdin.write("create 0\n")
        probe.proc.stdin.flush()
        assert select.select([probe.proc.stdout], [], [], 0.5)[0] == []  # waiting for the lock
    finally:
        os.close(fd)
    assert select.select([probe.proc.stdout], [], [], WAIT)[0], "the claim did not go on after the lock was let go"
    cid, rid = (int(v) for v in probe.proc.stdout.readline().split("=")[1].split())
    assert cid == 2 and rid not in (probe.handle.resource, C.VMCI_INVALID_ID)


def test_a_host_context_the_policy_gives_another_user_is_refused(rundir, vmm, probe_on):
    with open(os.path.join(rundir, "policy.toml"), "w") as f:
        f.write("[contexts.1]\nuid = %d\n" % (os.getuid() + 1))
    probe = probe_on(vmm.path)
    me = tuple(probe.handle)
    hello = vsock_module.encode_hello
    socks = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    for sock, (rid, well_known, text) in zip(socks, [(1, True, b"as context 1"), (7, False, b"as context 2")]):
        sock.connect("%s_%d.host" % (vmm.path, me[1]))
        sock.sendall(hello(rid, well_known) + frame(me, (1 if well_known else 2, rid), text))
    assert probe.ask("recvtext", 3) == ["12", "2", "7", "as context 2"]
    assert closed_by_peer(socks[0])
    for sock in socks:
        sock.close()
