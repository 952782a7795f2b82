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
from vsockcompat.constants import VMCI_ERROR_NO_ACCESS, VMCI_HOST_CONTEXT_ID, VMCI_MAX_DG_PAYLOAD_SIZE
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


def open_guest_runtime(core, rundir):
    """A runtime of this guest on ``core``: the vsock transport in stream mode, context 3."""
    rt = Runtime(Settings(no_extensions=False, rundir=rundir, cid=BED_CID, transport="vsock",
                          vsock_mode="stream", ds_autostart=False), core=core)
    assert rt.transport.name == "vsock" and rt.transport.local_cid == BED_CID
    return rt


@pytest.fixture
def guest_runtime(core, rundir):
    return open_guest_runtime(core, rundir)


def ask(ep, dst, payload, ready_wait=READY_WAIT):
    """Send ``payload`` to ``dst`` until the peer is there, then return its reply."""
    deadline = time.monotonic() + ready_wait
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


def _send_until(ep, dst, payload, done):
    """Send until ``done(status)``: the host's verdict crosses the VM boundary meanwhile."""
    deadline = time.monotonic() + WAIT
    while True:
        rc = ep.send_status(dst, payload, len(payload))
        if done(rc):
            return rc
        assert time.monotonic() < deadline, "the host's verdict never arrived (last status %d)" % rc
        time.sleep(0.05)


def test_a_guest_the_host_denies_gets_no_access_and_then_in_again(guest_runtime, host):
    """The host's privileges live on the host: its verdicts tell the guest's cached link."""
    with DatagramEndpoint(runtime=guest_runtime) as control, \
            DatagramEndpoint(runtime=guest_runtime) as sender:
        assert ask(sender, host, b"before").payload.startswith(b"before from ")
        link = sender._links[host]
        rid = sender.handle.resource
        assert ask(control, host, b"deny %d" % rid).payload == b"deny %d" % rid
        try:
            assert _send_until(sender, host, b"denied", lambda rc: rc == VMCI_ERROR_NO_ACCESS) \
                == VMCI_ERROR_NO_ACCESS
            assert sender._links[host] is link
        finally:  # the next test's endpoints may get the same resource ids
            assert ask(control, host, b"allow %d" % rid).payload == b"allow %d" % rid
        assert _send_until(sender, host, b"after", lambda rc: rc > 0) > 0
        # What left before the verdict arrived reached the host after the denial: dropped there.
        assert sender.recv(timeout=WAIT).payload == b"after from %d:%d" % (BED_CID, rid)
        assert sender._links[host] is link
