"""The discovery service across a VM boundary: the daemon runs on the machine (hybrid transport,
context 1, started by ``host_peer.py``), this guest reaches it at (2, 1) over vsock (stream mode).
The SDK's datagramApp and sharedMemApp (its region mirrored) run their servers on the machine and
their clients here, finding each other by name alone. Inside the cross bed's guest only (gate:
``conftest.py``).

Every pair of cores: the guest's core is the ``core`` fixture, the host server's is ``host_core``.
"""
import os
import subprocess
import sys
import time

import pytest

import vsockcompat
from vsockcompat import constants as C
from vsockcompat import ds_client
from vsockcompat.apps import datagram_app, sharedmem_app
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.handles import VMCIHandle
from vsockcompat.sdk import VMCILibrary

from .conftest import BED_CID
from .host_peer import HOST_RIDS
from .test_cross_datagram import WAIT, ask, guest_runtime  # noqa: F401  (a fixture)

pytestmark = pytest.mark.cross_vm

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(vsockcompat.__file__)))
APP = [sys.executable, "-m", "vsockcompat", "datagram-app"]
QUERIES = 3
CLIENT_TEXT = "Received message: HELLO, CLIENT!\n"
SERVER_TEXT = ("Running datagram server --- will respond to 3 queries.\n"
               + "Received message: HELLO, SERVER!\n" * QUERIES)
#: The host's datagramApp server's handle, as this guest finds it: context 2.
HOST = VMCIHandle(C.VMCI_HOST_CONTEXT_ID, HOST_RIDS["cython"])


@pytest.fixture(params=sorted(HOST_RIDS), ids=["host-c", "host-py"])
def host_core(request):
    return request.param


def guest_env(core, rundir):
    """What a program in this guest needs to find the host's daemon: vsock, stream mode."""
    env = dict(os.environ, VSOCKCOMPAT_TRANSPORT="vsock", VSOCKCOMPAT_VSOCK_MODE="stream",
               VSOCKCOMPAT_RUNDIR=rundir, VSOCKCOMPAT_DS_AUTOSTART="0",
               VSOCKCOMPAT_NO_EXTENSIONS="1" if core.NAME == "pure" else "0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    return env


def run_client(env):
    """``vsockcompat datagram-app -c`` in a process of its own: ``(status, stdout, stderr)``."""
    proc = subprocess.run(APP + ["-c"], env=env, capture_output=True, text=True, timeout=WAIT)
    return proc.returncode, proc.stdout, proc.stderr


def client_in_process(runtime, capsys, app=datagram_app):
    """The same sample client run in this process (a Python start costs seconds under TCG)."""
    capsys.readouterr()
    status = app.main(["-c"], lib=VMCILibrary(runtime))
    out, err = capsys.readouterr()
    return status, out, err


def test_datagram_app_server_on_the_host_client_in_the_guest(core, host_core, rundir, guest_runtime,
                                                             capsys):
    """Three clients, as the server answers three queries: the first a process of its own when
    both sides run the same core (the command line end to end), the others in this process."""
    env = guest_env(core, rundir)
    clients = [lambda: client_in_process(guest_runtime, capsys)] * QUERIES
    if core.NAME == host_core:
        clients[0] = lambda: run_client(env)
    serve_datagram_app_on_the_host(b"start datagram-app %s" % host_core.encode(), clients, guest_runtime, capsys)


def serve_datagram_app_on_the_host(start, clients, guest_runtime, capsys):
    """Have ``host_peer.py`` run a datagramApp server (its command ``start``), check the host's
    name from here (found, in the host context, not removable by a guest), run ``clients`` (one
    per query, each giving ``(status, out, err)``), then check the server's own exit and texts,
    and that it unregistered its name on the way out."""
    assert len(clients) == QUERIES
    with DatagramEndpoint(runtime=guest_runtime) as control:
        started = ask(control, HOST, start)
        assert started.payload == b"started: Running datagram server --- will respond to 3 queries."
        try:
            rc, server = ds_client.lookup_status("HOST INFO", guest_runtime)
            assert rc == C.VMCI_SUCCESS and server.context == C.VMCI_HOST_CONTEXT_ID
            # A guest may not remove the host's name.
            assert ds_client.unregister_status("HOST INFO", guest_runtime) == C.VMCI_ERROR_NO_ACCESS
            for client in clients:
                assert client() == (0, CLIENT_TEXT, "")
        finally:
            control.send(HOST, b"result")
            result = control.recv(timeout=WAIT).payload
        status, _, output = result.partition(b"\n")
        out, _, err = output.partition(b"\0")
        assert (int(status), out.decode(), err.decode()) == (0, SERVER_TEXT, "")
    assert client_in_process(guest_runtime, capsys) == (
        0, "", "Failed to lookup in discovery service.\n")


def test_public_group_and_a_guest_registration_that_dies_with_its_endpoint(core, guest_runtime):
    rc, group = ds_client.lookup_status(C.VMCI_PUBLIC_GROUP_NAME, guest_runtime)
    assert (rc, group) == (C.VMCI_SUCCESS, VMCIHandle(C.VMCI_HOST_CONTEXT_ID,
                                                     C.VMCI_RESERVED_RESOURCE_ID_MAX))
    name = b"guest service %s" % core.NAME.encode()
    with DatagramEndpoint(runtime=guest_runtime) as control:
        with DatagramEndpoint(runtime=guest_runtime) as service:
            assert service.handle.context == BED_CID
            assert ds_client.register_status(name, service.handle, guest_runtime) == C.VMCI_SUCCESS
            assert ds_client.register_status(name, service.handle, guest_runtime) == \
                C.VMCI_ERROR_ALREADY_EXISTS
            found = ask(control, HOST, b"lookup " + name).payload
            assert found == b"0 %d:%d" % tuple(service.handle)      # the host finds it too
        control.send(HOST, b"lookup " + name)
        assert control.recv(timeout=WAIT).payload == b"%d 4294967295:4294967295" % (
            C.VMCI_ERROR_NOT_FOUND)
    assert ds_client.lookup_status(name, guest_runtime)[0] == C.VMCI_ERROR_NOT_FOUND


def test_sharedmem_app_server_on_the_host_client_in_the_guest(core, guest_runtime, capsys):
    """The host's region, mirrored here: three readings of the time the server writes each
    second. The host server runs the guest's core (a server takes 10 s)."""
    serve_shared_mem_app_on_the_host(b"start sharedmem-app %s" % core.NAME.encode(), guest_runtime, capsys)


def serve_shared_mem_app_on_the_host(start, guest_runtime, capsys):
    """Have ``host_peer.py`` run a sharedMemApp server (its command ``start``), run the Python
    client in this process, check its three readings and the server's exit and texts."""
    with DatagramEndpoint(runtime=guest_runtime) as control:
        started = ask(control, HOST, start)
        assert started.payload == b"started: Running shared memory server for 10 seconds."
        try:
            status, out, err = client_in_process(guest_runtime, capsys, sharedmem_app)
        finally:
            control.send(HOST, b"result")
            result = control.recv(timeout=WAIT).payload
    assert (status, err) == (0, "")
    readings = out.splitlines()
    assert len(readings) == sharedmem_app.READINGS, out
    times = [time.strptime(line, sharedmem_app.TIME_FORMAT) for line in readings]
    assert times == sorted(times)
    status, _, output = result.partition(b"\n")
    out, _, err = output.partition(b"\0")
    assert (int(status), out.decode(), err.decode()) == (
        0, "Running shared memory server for 10 seconds.\n", "0.1.2.3.4.5.6.7.8.9.\n")
