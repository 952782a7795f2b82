"""libvmci.so.0 on the vsock transport, over real AF_VSOCK, inside the guest test bed only.

Legacy C programs (tests/c/datagramApp.c, tests/c/vsock_probe.c) run with
``VSOCKCOMPAT_TRANSPORT=vsock`` against the discovery daemon and Python peers of both cores,
in SEQPACKET (what ``auto`` picks here: vsock_loopback has no datagrams, so no ``dgram`` mode) and
STREAM mode: the setups of the ``daemon`` fixture (tests/real_vsock/test_vsock_discovery.py). Every
process is in context 1 (vsock_loopback).

A Python start takes 10-40 s under TCG, so the C programs are executed directly with the argv and
environment ``vsockcompat run`` would exec them with (``vsockcompat.run.command``, the function
``vsockcompat run`` itself uses), computed once per setup; ``test_vsockcompat_run_itself_on_vsock``
starts one through ``vsockcompat run`` and checks the process it became got that environment.

Every test is marked ``vsock``: the gate of ``conftest.py`` skips it everywhere but inside the
guest booted by ``testbed/guest.py``, and ``_require_gate`` checks it again right before each C
program that opens AF_VSOCK sockets is started. On the host, tests/test_clib_vsock_guard.py
proves that the C library refuses the vsock transport there without making an AF_VSOCK socket.

Run them:  python3 testbed/guest.py run --timeout 900 -- env PYTHONPATH=$PWD \
               python3 -m pytest tests/real_vsock/test_clib_vsock.py -m vsock -rs -x
"""
import errno
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types

import pytest

from vsockcompat import clib
from vsockcompat import constants as C
from vsockcompat._backend import load_core
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.errors import NoAccess
from vsockcompat.handles import VMCIHandle
from vsockcompat.run import command
from vsockcompat.sdk import VMCILibrary

from guest_c_programs import ProbeProcess, build_programs, probe_pattern as pattern

from .conftest import VMADDR_CID_LOCAL
from .test_preload import _require_gate
from .test_vsock_discovery import APP, daemon, vsock_env, vsock_runtime  # noqa: F401  (daemon: the fixture)
from .test_vsock_transport import frame, hello, settle

# The first test of a setup also builds the programs and starts its daemon (Python is slow under TCG).
pytestmark = [pytest.mark.vsock, pytest.mark.timeout(600)]

RUN = [sys.executable, "-m", "vsockcompat.run", "--"]
PROGRAMS = ("datagramApp", "vsock_probe")
SERVER_FIRST = "Running datagram server --- will respond to 3 queries.\n"
SERVER_GOT = "Received message: HELLO, SERVER!\n"
CLIENT_OUT = "Received message: HELLO, CLIENT!\n"
MAX = C.VMCI_MAX_DG_PAYLOAD_SIZE
#: Seconds a program may take: under TCG on a loaded machine a Python start alone can take 40 s.
WAIT = 180.0
DG_SEND = C.VMCI_PRIV_DG_SEND


@pytest.fixture(scope="module")
def progs(tmp_path_factory):
    """libvmci.so.0 (the package's when built, else built here) and the C programs, built with the guest's cc."""
    cc = clib.find_compiler()
    if cc is None:
        pytest.skip("no C compiler in the guest")
    return build_programs(cc, str(tmp_path_factory.mktemp("cvsock")), PROGRAMS)


def c_env(env, progs):
    return dict(env, VSOCKCOMPAT_LIBVMCI=progs["library"])


@pytest.fixture(scope="module")
def c_run(daemon, progs):
    """Per setup, computed once: ``env``, what ``vsockcompat run`` execs the C programs with, and
    each program's argv (``c_run.datagramApp``, ``c_run.vsock_probe``); ``py_env`` for Python peers."""
    _, env, _ = daemon
    py_env = c_env(env, progs)
    run_env = command([progs["vsock_probe"]], py_env)[1]  # the same for every program
    return types.SimpleNamespace(env=run_env, py_env=py_env,
                                 **{name: command([progs[name]], py_env)[0] for name in PROGRAMS})


class Probe(ProbeProcess):
    """A running vsock_probe (``ask``, ``close``), its gate checked first; ``start()`` makes its endpoint."""

    def __init__(self, argv, env):
        _require_gate()
        super().__init__(argv, env, WAIT)

    def start(self):
        assert self.ask("init") == ["0"]
        cid, rid = (int(v) for v in self.ask("create 0"))
        assert cid == VMADDR_CID_LOCAL and rid >= 1024
        self.handle = VMCIHandle(cid, rid)
        return self


@pytest.fixture
def probe(c_run):
    p = Probe(c_run.vsock_probe, c_run.env).start()
    yield p
    p.close()


def _run_client(cmd, env):
    client = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WAIT)
    assert (client.returncode, client.stdout, client.stderr) == (0, CLIENT_OUT, "")


def _wait_registered(rt, server, name="HOST INFO"):
    """Wait until the server registered ``name`` (a C program's stdout is a buffered pipe)."""
    from vsockcompat import ds_client
    deadline = time.monotonic() + WAIT
    while ds_client.lookup_status(name, rt, timeout=5)[0] != C.VMCI_SUCCESS:
        assert server.poll() is None, server.communicate()
        assert time.monotonic() < deadline, "%r was never registered" % name
        time.sleep(0.2)


def _environ_of(pid):
    with open("/proc/%d/environ" % pid, "rb") as f:
        return dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if item)


def test_vsockcompat_run_itself_on_vsock(progs):
    """``vsockcompat run -- vsock_probe`` (one Python start): the process it becomes runs on our
    library with the environment ``command`` computes (what the other tests execute directly), and
    exchanges the largest datagram both ways with a Python endpoint over vsock (no daemon needed)."""
    try:
        core = load_core("cython")
    except ImportError:
        core = load_core("pure")
    rundir = tempfile.mkdtemp(prefix="vsc", dir="/tmp")
    env = c_env(vsock_env(rundir, core.NAME), progs)
    _require_gate()
    probe = Probe(RUN + [progs["vsock_probe"]], env)
    try:
        probe.start()   # its first answer: the exec happened and libvmci.so.0 initialised
        got = _environ_of(probe.proc.pid)
        _, expected = command([progs["vsock_probe"]], env)
        for name in ("LD_LIBRARY_PATH", "LD_PRELOAD", "VSOCKCOMPAT_TRANSPORT", "VSOCKCOMPAT_PYTHON"):
            assert got.get(name) == expected.get(name), name
        with open("/proc/%d/maps" % probe.proc.pid) as f:
            assert os.path.realpath(progs["library"]) in {os.path.realpath(line.split()[-1])
                                                          for line in f if line.rstrip().endswith(".so.0")}
        with DatagramEndpoint(runtime=vsock_runtime(core, rundir)) as ep:
            assert probe.ask("send 1 %d %d" % (ep.handle.resource, MAX)) == [str(MAX + C.VMCI_DG_HEADERSIZE)]
            got = ep.recv(timeout=WAIT)
            assert (got.src, got.payload == pattern(MAX)) == (probe.handle, True)
            ep.send(probe.handle, pattern(MAX))
            assert probe.ask("recv") == [str(MAX), "1", str(ep.handle.resource), "1"]
    finally:
        probe.close()
        shutil.rmtree(rundir, ignore_errors=True)


@pytest.mark.parametrize("server_is_c", [True, False], ids=["c-server", "python-server"])
def test_datagram_app_c_and_python_over_vsock(daemon, c_run, server_is_c):
    """The SDK sample: a C server answers C and Python clients; a Python server answers C clients."""
    rt, _, _ = daemon
    c_app, py_app = (c_run.datagramApp, c_run.env), (APP, c_run.py_env)
    argv, env = c_app if server_is_c else py_app
    _require_gate()
    server = subprocess.Popen(argv + ["-s"], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_registered(rt, server)
        for argv, env in ([c_app, py_app, c_app] if server_is_c else [c_app, c_app, c_app]):
            _run_client(argv + ["-c"], env)
        out, err = server.communicate(timeout=WAIT)
        assert (server.returncode, out, err) == (0, SERVER_FIRST + SERVER_GOT * 3, "")
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()


def test_discovery_big_datagrams_and_errors_against_python(daemon, probe):
    rt, env, _ = daemon
    with DatagramEndpoint(runtime=rt) as ep:
        # discovery through the daemon, both ways
        assert probe.ask("lookup " + C.VMCI_PUBLIC_GROUP_NAME) == ["0", "2", "1023"]
        assert probe.ask("register c probe") == ["0"]
        from vsockcompat import ds_client
        assert ds_client.lookup_status("c probe", rt) == (C.VMCI_SUCCESS, probe.handle)
        assert probe.ask("register c probe") == [str(C.VMCI_ERROR_ALREADY_EXISTS)]
        # the largest datagram, C -> Python and back
        assert probe.ask("send 1 %d %d" % (ep.handle.resource, MAX)) == [str(MAX + C.VMCI_DG_HEADERSIZE)]
        got = ep.recv(timeout=WAIT)
        assert (got.src, got.payload == pattern(MAX)) == (probe.handle, True)
        ep.send(probe.handle, pattern(MAX))
        assert probe.ask("recv") == [str(MAX), "1", str(ep.handle.resource), "1"]
        assert probe.ask("send 1 %d 0" % ep.handle.resource) == [str(C.VMCI_DG_HEADERSIZE)]
        assert ep.recv(timeout=WAIT).payload == b""
        # errors, as Python's vsock transport gives them
        assert probe.ask("send 1 %d %d" % (ep.handle.resource, MAX + 1)) == [str(C.VMCI_ERROR_INVALID_ARGS)]
        assert probe.ask("send 0 5 1") == [str(C.VMCI_ERROR_DST_UNREACHABLE)]
        assert probe.ask("send 1 4242 1") == [str(C.VMCI_ERROR_INVALID_RESOURCE)]
        # regions are mirrored on vsock (VSOCKCOMPAT_SHM_MODE=auto): Create works, nobody serves 4242
        assert probe.ask("shm") == ["0"] + [str(C.VMCI_ERROR_NOT_FOUND)] * 3
        assert probe.ask("unregister c probe") == ["0"]
        assert probe.ask("lookup c probe") == [str(C.VMCI_ERROR_NOT_FOUND), str(C.VMCI_INVALID_ID),
                                               str(C.VMCI_INVALID_ID)]
    # the Python endpoint is gone: its port refuses
    assert probe.ask("send 1 %d 1" % ep.handle.resource) == [str(C.VMCI_ERROR_INVALID_RESOURCE)]


def test_verdicts_both_ways(daemon, probe):
    """A Python receiver that denies the C sender: NO_ACCESS from its verdict, SUCCESS once lifted;
    a C receiver that denies a Python sender: the same, from the C library's verdicts."""
    rt, _, _ = daemon
    lib = VMCILibrary(rt)
    assert lib.VMCI_InitApp() == C.VMCI_SUCCESS
    try:
        server = lib.VMCIDatagram_CreateHnd(0)
        assert probe.ask("send 1 %d 2" % server.resource) == ["26"]
        # received: the endpoint has accepted the C link, so it can tell that sender its verdicts
        assert lib.VMCIDatagram_RecvFrom(server, bytearray(8)) == (2, probe.handle)
        assert lib.VMCIResource_AddClientPrivileges(server, probe.handle, [], [DG_SEND]) == C.VMCI_SUCCESS
        assert probe.ask("sendwait 1 %d %d" % (server.resource, C.VMCI_ERROR_NO_ACCESS)) == [
            str(C.VMCI_ERROR_NO_ACCESS)]
        assert lib.VMCIResource_AddClientPrivileges(server, probe.handle, [DG_SEND], []) == C.VMCI_SUCCESS
        assert probe.ask("sendwait 1 %d 1" % server.resource) == ["25"]
    finally:
        lib.VMCI_CleanupApp()
    with DatagramEndpoint(runtime=rt) as ep:
        ep.send(probe.handle, pattern(5))
        assert probe.ask("recv") == ["5", "1", str(ep.handle.resource), "1"]
        assert probe.ask("deny 1 %d" % ep.handle.resource) == ["0"]
        _send_until(ep, probe.handle, denied=True)
        assert probe.ask("allow 1 %d" % ep.handle.resource) == ["0"]
        _send_until(ep, probe.handle, denied=False)
        assert probe.ask("recv") == ["3", "1", str(ep.handle.resource), "1"]


def _send_until(ep, dst, denied):
    """Send 3 pattern bytes until the send is refused (denied) or succeeds (not denied)."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            ep.send(dst, pattern(3))
            if not denied:
                return
        except NoAccess:
            if denied:
                return
        assert time.monotonic() < deadline, "the verdict never came"
        time.sleep(0.02)


def test_bad_peers_are_dropped_and_the_c_endpoint_keeps_serving(daemon, probe, vsock_socket):
    rt, _, _ = daemon
    kind = socket.SOCK_STREAM if rt.transport.mode == "stream" else socket.SOCK_SEQPACKET
    me = tuple(probe.handle)
    bad = [
        hello(7001) + frame(me, (VMADDR_CID_LOCAL + 4, 7001), b"forged context"),
        hello(7002) + frame(me, (VMADDR_CID_LOCAL, 7002), b"short", size=500),
        b"\x00" * 5,
    ]
    for payload in bad:
        raw = vsock_socket(kind)
        raw.connect((VMADDR_CID_LOCAL, probe.handle.resource))
        if kind == socket.SOCK_STREAM:
            raw.sendall(payload)
        else:
            for part in (payload[:8], payload[8:]) if len(payload) > 8 else (payload,):
                raw.send(part)
        raw.close()
    with DatagramEndpoint(runtime=rt) as ep:
        settle(ep, 1.0)
        ep.send(probe.handle, pattern(9))
        assert probe.ask("recv") == ["9", "1", str(ep.handle.resource), "1"]


def test_auto_is_not_dgram_under_vsock_loopback_and_explicit_dgram_fails(progs, vsock_socket):
    """vsock_loopback has no datagram transport: the kernel refuses a SOCK_DGRAM socket (ENODEV,
    net/vmw_vsock/af_vsock.c vsock_assign_transport), so the C library's ``auto`` takes SEQPACKET
    (a SEQPACKET peer connects to its endpoint) and an explicit ``dgram`` fails VMCI_InitApp with
    VMCI_ERROR_DEVICE_NOT_FOUND and the kernel's reason."""
    with pytest.raises(OSError) as refused:
        vsock_socket(socket.SOCK_DGRAM)
    assert refused.value.errno == errno.ENODEV
    rundir = tempfile.mkdtemp(prefix="vsc", dir="/tmp")
    try:
        env = c_env(vsock_env(rundir, "pure"), progs)
        argv, run_env = command([progs["vsock_probe"]], env)
        probe = Probe(argv, run_env).start()
        try:
            raw = vsock_socket(socket.SOCK_SEQPACKET)
            raw.connect((VMADDR_CID_LOCAL, probe.handle.resource))  # a SEQPACKET listener
        finally:
            probe.close()
        argv, run_env = command([progs["vsock_probe"]], c_env(vsock_env(rundir, "pure", mode="dgram"), progs))
        _require_gate()
        init = subprocess.run(argv, env=run_env, input="init\nquit\n", capture_output=True, text=True, timeout=WAIT)
        assert (init.returncode, init.stdout) == (0, "init=%d\n" % C.VMCI_ERROR_DEVICE_NOT_FOUND)
        assert init.stderr == ("vsockcompat: the vsock transport cannot run here: AF_VSOCK SOCK_DGRAM sockets "
                               "cannot be created here: %s\n" % os.strerror(errno.ENODEV))
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
