"""A C attacher on the machine's side of the VM boundary reaching regions created in this guest.

``host_peer.py`` runs two C clients on libvmci.so.0's hybrid transport (AF_UNIX only, under
tests/c/no_vsock_shim.c): the SDK's sharedMemApp client (``c-sharedmem-client``), which finds
``"HOST TIME"`` in the host's discovery daemon, and a line-driven attacher (``c-attach``). Both
attach through the VMM (``CONNECT <rid>``: src/vsc_mirror.c's hybrid branch, through the real
``vhost-device-vsock``) to regions created here (vsock transport, stream mode, regions mirrored):
by Python in this process on each core, by the Python sharedMemApp server of each core, and by
the C sharedMemApp server built in this guest. A region id nobody serves gets the SDK's
VMCI_ERROR_NOT_FOUND through the real path, within host_peer's bound (``CLIENT_WAIT``). Inside
the cross bed's guest only (gate: ``conftest.py``)::

    python testbed/cross.py run --host-cmd "python tests/cross_vm/host_peer.py" -- \\
        python -m pytest tests/cross_vm/test_cross_clib_host_attach.py -m cross_vm -rs
"""
import contextlib
import sys

import pytest

from vsockcompat import constants as C
from vsockcompat import ds_client
from vsockcompat.apps import sharedmem_app
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.sharedmem import SharedRegion

from .conftest import BED_CID
from .host_peer import CLIENT_WAIT
from .test_cross_datagram import ask, guest_runtime  # noqa: F401  (a fixture)
from .test_cross_discovery import HOST, guest_env
from .test_cross_guests_c import c_programs, serve_shared_mem_app_here, shared_mem_app_server_here  # noqa: F401
from .test_cross_guests_c import sibling_result as client_result

pytestmark = [pytest.mark.cross_vm, pytest.mark.timeout(900)]

#: Seconds for a host C client's answer: its bound, and its first build on the host.
ANSWER_WAIT = CLIENT_WAIT + 120.0
#: sharedMemApp's region size, which its client checks.
APP_SIZE = 128
#: A region beyond one block (64 KiB) and the largest datagram.
REGION = 70000


def text_of(core):
    return "written in CID %d by the %s core" % (BED_CID, core.NAME)


def host_c_client(ep, command):
    """``(status, stdout, stderr)`` of host_peer's C client ``command`` (it answered in time)."""
    ask(ep, HOST, b"ping")                      # the host peer is up
    ep.send(HOST, command)
    return client_result(ep.recv(timeout=ANSWER_WAIT))


@pytest.fixture
def control(guest_runtime):
    with DatagramEndpoint(runtime=guest_runtime) as ep:
        yield ep


@contextlib.contextmanager
def registered_as_host_time(handle, runtime):
    """``handle`` registered here as ``"HOST TIME"``, as the SDK's server does, until the end."""
    assert ds_client.register_status(sharedmem_app.SERVICE_NAME, handle, runtime) == C.VMCI_SUCCESS
    try:
        yield
    finally:
        assert ds_client.unregister_status(sharedmem_app.SERVICE_NAME, runtime) == C.VMCI_SUCCESS


def test_the_c_sdk_client_on_the_host_reads_a_python_region_made_here(core, guest_runtime, control):
    text = text_of(core).encode()
    with SharedRegion.create(APP_SIZE, runtime=guest_runtime) as region:
        assert region.handle.context == BED_CID
        region.buffer[:len(text) + 1] = text + b"\0"
        with registered_as_host_time(region.handle, guest_runtime):
            result = host_c_client(control, b"c-sharedmem-client")
    assert result == (0, (text.decode() + "\n") * sharedmem_app.READINGS, "")


def test_a_c_attacher_on_the_host_reads_a_large_python_region_made_here(core, guest_runtime, control):
    text = text_of(core).encode()
    with SharedRegion.create(REGION, runtime=guest_runtime) as region:
        region.buffer[66000:66000 + len(text)] = text
        rid = region.handle.resource
        status, out, err = host_c_client(control, b"c-attach %d %d %d 66000 %d" % (BED_CID, rid, REGION, len(text)))
        assert (status, out.splitlines(), err) == (0, ["0", "0 %d 0" % REGION, "[%s]" % text.decode(), "0"], "")
        # The C attacher has left: the creator here goes on, a second one attaches again.
        region.buffer[:5] = b"again"
        status, out, err = host_c_client(control, b"c-attach %d %d %d 0 5" % (BED_CID, rid, REGION))
        assert (status, out.splitlines()[2], err) == (0, "[again]", "")


def test_a_region_nobody_serves_is_not_found_through_the_vmm(core, guest_runtime, control):
    """A region id of this guest that was served and no longer is: the line-driven attacher gets
    NOT_FOUND (as with the fake VMM's closed connection, tests/test_clib_hybrid_mirror.py). The
    SDK's client, its handle registered by name, never gets that far: the host's daemon probes
    the guest's port through the VMM at the lookup and drops the dead entry."""
    with SharedRegion.create(APP_SIZE, runtime=guest_runtime) as region:
        gone = region.handle
    status, out, err = host_c_client(control, b"c-attach %d %d %d 0 8" % (BED_CID, gone.resource, APP_SIZE))
    assert (status, out.splitlines(), err) == (
        0, ["0", "%d %d 1" % (C.VMCI_ERROR_NOT_FOUND, APP_SIZE), "unmapped", str(C.VMCI_ERROR_NOT_FOUND)], "")
    assert ds_client.register_status(sharedmem_app.SERVICE_NAME, gone, guest_runtime) == C.VMCI_SUCCESS
    assert host_c_client(control, b"c-sharedmem-client") == (0, "", "Failed to lookup in discovery service.\n")
    assert ds_client.unregister_status(sharedmem_app.SERVICE_NAME, guest_runtime) == C.VMCI_ERROR_NOT_FOUND


def test_python_sharedmem_app_server_here_c_client_on_the_host(core, rundir, control):
    """The SDK pair across the boundary: the Python server of ``core`` here, mirrored, in a
    process of its own; the C client on the host reads three times, in order."""
    env = dict(guest_env(core, rundir), VSOCKCOMPAT_SHM_MODE="mirrored")
    ask(control, HOST, b"ping")
    shared_mem_app_server_here(([sys.executable, "-m", "vsockcompat", "sharedmem-app", "-s"], env),
                               control, HOST, b"c-sharedmem-client")


def test_c_sharedmem_app_server_here_c_client_on_the_host(c_programs, control):
    """The SDK pair in C on both sides: the server built in this guest, the client on the host."""
    ask(control, HOST, b"ping")
    serve_shared_mem_app_here(c_programs, control, HOST, b"c-sharedmem-client")
