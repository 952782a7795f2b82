"""The discovery service and datagramApp over real AF_VSOCK, inside the guest test bed only.

The daemon (``vsockcompat ds`` with ``VSOCKCOMPAT_TRANSPORT=vsock``) serves context 1 at vsock
port 1, the sample's server and clients run in processes of their own, all on the test's core.
In the bed every process is in context 1 (vsock_loopback); the CID mapping for a real host and
its guests is checked on the host (tests/test_vsock_selection.py).

Run them:  python testbed/guest.py run -- python -m pytest tests/real_vsock -m vsock -rs
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import vsockcompat

from vsockcompat import constants as C
from vsockcompat import ds_client
from vsockcompat._backend import load_core
from vsockcompat._settings import Settings
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.handles import VMCIHandle
from vsockcompat.runtime import Runtime

pytestmark = pytest.mark.vsock

# Children import vsockcompat from where this process did (source tree or site-packages).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(vsockcompat.__file__)))
APP = [sys.executable, "-m", "vsockcompat", "datagram-app"]
START_TIMEOUT = 90.0  # Python starts slowly under TCG
WAIT = 60.0


def vsock_env(rundir, core_name, mode="auto"):
    env = dict(os.environ)
    env.update(VSOCKCOMPAT_RUNDIR=rundir, VSOCKCOMPAT_TRANSPORT="vsock", VSOCKCOMPAT_CID="2",
               VSOCKCOMPAT_VSOCK_MODE=mode, VSOCKCOMPAT_DS_AUTOSTART="0",
               VSOCKCOMPAT_NO_EXTENSIONS="1" if core_name == "pure" else "0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    return env


def vsock_runtime(core, rundir, mode="auto"):
    return Runtime(Settings(no_extensions=False, rundir=rundir, cid=2, transport="vsock",
                            ds_autostart=False)._replace(vsock_mode=mode), core=core)


# One daemon per (core, mode), shared by the module's tests: Python starts slowly under TCG.
# datagramApp runs on both cores in SEQPACKET (what auto picks here) and on Cython in STREAM.
SETUPS = [("cython", "seqpacket"), ("pure", "seqpacket"), ("cython", "stream")]


@pytest.fixture(scope="module", params=SETUPS, ids=["-".join(s) for s in SETUPS])
def daemon(request):
    """A discovery daemon on vsock in its own process; yields ``(rt, env)`` once it answers at (1, 1)."""
    core_name, mode = request.param
    try:
        core = load_core(core_name)
    except ImportError:
        pytest.skip("the Cython core is not built")
    rundir = tempfile.mkdtemp(prefix="vsc", dir="/tmp")
    env = vsock_env(rundir, core_name, mode)
    log = open(rundir + ".ds.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "vsockcompat", "ds"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    rt = vsock_runtime(core, rundir, mode)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            rc, handle = ds_client.lookup_status(C.VMCI_PUBLIC_GROUP_NAME, rt, timeout=5)
            if rc == C.VMCI_SUCCESS:
                break
            assert proc.poll() is None, "the daemon exited with %s" % proc.returncode
            assert time.monotonic() < deadline, "the daemon did not answer within %gs" % START_TIMEOUT
            time.sleep(0.2)
        yield rt, env, proc
    finally:
        proc.terminate()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        with open(rundir + ".ds.log", "rb") as f:
            sys.stderr.write(f.read().decode("utf-8", "replace"))
        os.unlink(rundir + ".ds.log")
        shutil.rmtree(rundir, ignore_errors=True)


def test_register_lookup_unregister_across_processes(daemon):
    rt, env, proc = daemon
    assert rt.transport.mode == env["VSOCKCOMPAT_VSOCK_MODE"]
    rc, group = ds_client.lookup_status(C.VMCI_PUBLIC_GROUP_NAME, rt)
    assert (rc, group) == (C.VMCI_SUCCESS, VMCIHandle(C.VMCI_HOST_CONTEXT_ID, C.VMCI_RESERVED_RESOURCE_ID_MAX))
    with DatagramEndpoint(runtime=rt) as ep:
        assert ds_client.register_status("vsock service", ep.handle, rt) == C.VMCI_SUCCESS
        assert ds_client.register_status("vsock service", ep.handle, rt) == C.VMCI_ERROR_ALREADY_EXISTS
        assert ds_client.lookup_status("vsock service", rt) == (C.VMCI_SUCCESS, ep.handle)
        # another process finds it too
        code = ("import vsockcompat.ds_client as d; rc, h = d.lookup_status('vsock service'); "
                "print(rc, h.context, h.resource)")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=WAIT)
        assert out.stdout.split() == ["0", str(ep.handle.context), str(ep.handle.resource)], out.stderr
        assert ds_client.unregister_status("vsock service", rt) == C.VMCI_SUCCESS
        assert ds_client.lookup_status("vsock service", rt)[0] == C.VMCI_ERROR_NOT_FOUND
    assert proc.poll() is None


def test_datagram_app_server_and_clients_in_separate_processes(daemon):
    _, env, _ = daemon
    server = subprocess.Popen(APP + ["-s"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "Running datagram server --- will respond to 3 queries.\n"
        for _ in range(3):
            client = subprocess.run(APP + ["-c"], env=env, capture_output=True, text=True, timeout=WAIT)
            assert (client.returncode, client.stdout, client.stderr) == (
                0, "Received message: HELLO, CLIENT!\n", "")
            assert server.stdout.readline() == "Received message: HELLO, SERVER!\n"
        assert server.wait(WAIT) == 0
        assert server.stderr.read() == ""
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
        server.stdout.close()
        server.stderr.close()
    late = subprocess.run(APP + ["-c"], env=env, capture_output=True, text=True, timeout=WAIT)
    assert (late.returncode, late.stdout, late.stderr) == (0, "", "Failed to lookup in discovery service.\n")


def test_without_a_daemon_a_call_fails_at_once_and_starts_none(core, rundir):
    rt = Runtime(Settings(no_extensions=False, rundir=rundir, cid=2, transport="vsock",
                          ds_autostart=True), core=core)
    rc, handle = ds_client.lookup_status("anything", rt, timeout=5)
    assert rc == C.VMCI_ERROR_INVALID_RESOURCE and handle.is_invalid
    assert not os.path.exists(os.path.join(rundir, "ds.pid"))
