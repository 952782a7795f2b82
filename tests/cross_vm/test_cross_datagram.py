"""Datagrams across a VM boundary: this guest (vsock transport, stream mode, CID 3) and a process
on the machine (hybrid transport, ``host_peer.py``), through QEMU's vhost-user-vsock and the
``vhost-device-vsock`` daemon. Inside the cross bed's guest only (gate: ``conftest.py``).

    python testbed/cross.py run --host-cmd "python tests/cross_vm/host_peer.py" -- \\
        python -m pytest tests/cross_vm -m cross_vm -rs

Every pair of cores: the guest's core is the ``core`` fixture, the host's is ``host_core``.
"""
import time

import pytest

from vsockcompat._settings import Settings
from vsockcompat.constants import VMCI_HOST_CONTEXT_ID, VMCI_MAX_DG_PAYLOAD_SIZE
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.errors import DstUnreachable, InvalidResource, Timeout
from vsockcompat.handles import VMCIHandle
from vsockcompat.runtime import Runtime

from .conftest import BED_CID
from .host_peer import HOST_RIDS

pytestmark = pytest.mark.cross_vm

#: Seconds for the host peer to come up (it starts before the boot; normally already there).
READY_WAIT = 60.0
#: The longest suffix the host peer adds to an echo.
SUFFIX_MAX = b" from 4294967295:4294967295"
WAIT = 30.0


@pytest.fixture(params=sorted(HOST_RIDS), ids=["host-c", "host-py"])
def host(request):
    """The host endpoint of one host core."""
    return VMCIHandle(VMCI_HOST_CONTEXT_ID, HOST_RIDS[request.param])


@pytest.fixture
def guest_runtime(core, rundir):
    rt = Runtime(Settings(no_extensions=False, rundir=rundir, cid=BED_CID, transport="vsock",
                          vsock_mode="stream", ds_autostart=False), core=core)
    assert rt.transport.name == "vsock" and rt.transport.local_cid == BED_CID
    return rt


def ask(ep, dst, payload):
    """Send ``payload`` to ``dst`` until the host peer is there, then return its reply."""
    deadline = time.monotonic() + READY_WAIT
    while True:
        try:
            ep.send(dst, payload)
            return ep.recv(timeout=WAIT)
        except (DstUnreachable, InvalidResource):
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def test_guest_to_host_and_back(guest_runtime, host):
    with DatagramEndpoint(runtime=guest_runtime) as ep:
        assert ep.handle.context == BED_CID
        reply = ask(ep, host, b"ping")
        assert reply.src == host
        assert reply.payload == b"ping from %d:%d" % (BED_CID, ep.handle.resource)
        sizes = [1 + 97 * i for i in range(20)] + [VMCI_MAX_DG_PAYLOAD_SIZE - len(SUFFIX_MAX)]
        for i, size in enumerate(sizes):
            payload = bytes([i]) * size
            ep.send(host, payload)
            got = ep.recv(timeout=WAIT)
            assert got.src == host
            assert got.payload == payload + b" from %d:%d" % (BED_CID, ep.handle.resource)


def test_host_initiated(guest_runtime, host):
    """The host sends first to an endpoint that never sent to it: the host side connects in."""
    with DatagramEndpoint(runtime=guest_runtime) as control, \
            DatagramEndpoint(runtime=guest_runtime) as callee:
        ask(control, host, b"hello")
        control.send(host, b"call %d" % callee.handle.resource)
        got = callee.recv(timeout=WAIT)
        assert got.src == host
        assert got.payload == b"host calls %d" % callee.handle.resource
        with pytest.raises(Timeout):
            control.recv(timeout=0.5)


def test_host_to_a_guest_port_nobody_listens_on(guest_runtime, host):
    """The VMM closes instead of answering ``OK``: the host's send fails with a typed error (here
    reported back by the host peer) in bounded time, and the host endpoint keeps serving."""
    with DatagramEndpoint(runtime=guest_runtime) as control:
        ask(control, host, b"hello")
        with DatagramEndpoint(runtime=guest_runtime) as gone:
            free = gone.handle.resource
        control.send(host, b"call %d" % free)
        got = control.recv(timeout=WAIT)
        assert got.src == host
        assert got.payload == b"call %d failed: InvalidResource" % free
        assert ask(control, host, b"still there").payload.startswith(b"still there from ")
