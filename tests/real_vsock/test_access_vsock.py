"""Access control over real AF_VSOCK, inside the guest test bed only (marker ``vsock``).

On vsock the kernel vouches for the peer CID and the hello names the sending port;
privileges live in the owning process (no shared runtime directory across kernels),
so its receive path enforces them, and senders of the same runtime see the denial
at once. Both cores.
"""
import os

import pytest

from vsockcompat import constants as C
from vsockcompat.datagram import Datagram, DatagramEndpoint
from vsockcompat.errors import NoAccess
from vsockcompat.handles import VMCIHandle
from vsockcompat.sdk import VMCILibrary

from .conftest import VMADDR_CID_LOCAL
from .test_vsock_transport import frame, hello, raw_client, settle, vsock_runtime  # noqa: F401

pytestmark = pytest.mark.vsock
DG_SEND = C.VMCI_PRIV_DG_SEND


def test_a_denied_sender_gets_no_access_over_vsock(vsock_runtime):
    lib = VMCILibrary(vsock_runtime)
    assert lib.VMCI_InitApp() == C.VMCI_SUCCESS
    try:
        server, client = lib.VMCIDatagram_CreateHnd(0), lib.VMCIDatagram_CreateHnd(0)
        assert server.context == VMADDR_CID_LOCAL
        assert lib.VMCIDatagram_SendTo(server, client, 2, b"ok") > 0
        assert lib.VMCIDatagram_RecvFrom(server, bytearray(8)) == (2, client)
        assert lib.VMCIResource_AddClientPrivileges(server, client, [], [DG_SEND]) == C.VMCI_SUCCESS
        assert lib.VMCIDatagram_SendTo(server, client, 2, b"no") == C.VMCI_ERROR_NO_ACCESS
        assert lib.VMCIResource_CheckClientPrivilege(server, client, DG_SEND) == C.VMCI_ERROR_NO_ACCESS
        assert lib.VMCIResource_RemoveAllClientPrivileges(server, client) == C.VMCI_SUCCESS
        assert lib.VMCIDatagram_SendTo(server, client, 3, b"yes") > 0
        assert lib.VMCIDatagram_RecvFrom(server, bytearray(8)) == (3, client)
    finally:
        lib.VMCI_CleanupApp()


def test_a_raw_vsock_sender_that_is_denied_is_dropped_and_counted(vsock_runtime, vsock_socket):
    with DatagramEndpoint(runtime=vsock_runtime) as victim, DatagramEndpoint(runtime=vsock_runtime) as friend:
        denied = VMCIHandle(VMADDR_CID_LOCAL, 7001)
        vsock_runtime.access.change(victim.handle, lambda acl: acl.add(denied, [], [DG_SEND]))
        raw = raw_client(vsock_socket, victim.handle.resource)
        raw.send(hello(7001))
        raw.send(frame(tuple(victim.handle), (VMADDR_CID_LOCAL, 7001), b"denied"))
        settle(victim, 2.0)
        assert victim.stats.denied == 1
        friend.send(victim.handle, b"still serving")
        assert victim.recv(timeout=30) == Datagram(friend.handle, b"still serving")
        raw.close()


def _write_policy(rundir, text):
    with open(os.path.join(rundir, "policy.toml"), "w") as f:
        f.write(text)


def test_restricted_contexts_are_refused_over_vsock(core, rundir):
    """Everything here is CID 1: a policy that restricts context 1 (and does not trust it)
    forbids it every interaction, so each kind of resource must refuse with the SDK code."""
    from vsockcompat.queuepair import QueuePair
    from vsockcompat.sharedmem import SharedRegion
    from .test_vsock_discovery import vsock_runtime as make_vsock_runtime

    _write_policy(rundir, '[contexts.1]\nflags = ["restricted"]\n')
    a, b = make_vsock_runtime(core, rundir), make_vsock_runtime(core, rundir)
    lib = VMCILibrary(a)
    assert lib.VMCI_InitApp() == C.VMCI_SUCCESS
    try:
        server, client = lib.VMCIDatagram_CreateHnd(0), lib.VMCIDatagram_CreateHnd(0)
        assert lib.VMCIDatagram_SendTo(server, client, 2, b"no") == C.VMCI_ERROR_NO_ACCESS
        region = SharedRegion.create(64, runtime=a)
        try:
            with pytest.raises(NoAccess):
                SharedRegion.attach(region.handle, runtime=b)
        finally:
            region.detach()
        pair = QueuePair.alloc(None, 4096, 4096, runtime=a)
        try:
            with pytest.raises(NoAccess):
                QueuePair.alloc(pair.handle, 4096, 4096, runtime=b)
        finally:
            pair.detach()
    finally:
        lib.VMCI_CleanupApp()


def test_the_creator_refuses_a_denied_attacher_over_vsock(core, rundir):
    from vsockcompat.sharedmem import SharedRegion
    from .test_vsock_discovery import vsock_runtime as make_vsock_runtime

    a, b = make_vsock_runtime(core, rundir), make_vsock_runtime(core, rundir)
    region = SharedRegion.create(64, runtime=a)
    try:
        with SharedRegion.attach(region.handle, runtime=b) as allowed:
            assert len(allowed.buffer) == 64
        a.access.change(region.handle, lambda acl: acl.add(VMCIHandle(VMADDR_CID_LOCAL, 0), [],
                                                           [C.VMCI_PRIV_SM_ATTACH]))
        with pytest.raises(NoAccess):  # b's own library sees no privileges: the creator refuses
            SharedRegion.attach(region.handle, runtime=b)
    finally:
        region.detach()


def test_the_strict_discovery_rule_over_vsock(core, rundir):
    import subprocess
    import sys
    import time
    from vsockcompat import ds_client
    from .test_vsock_discovery import START_TIMEOUT, WAIT, vsock_env
    from .test_vsock_discovery import vsock_runtime as make_vsock_runtime

    _write_policy(rundir, '[discovery]\nregister = "trusted"\n\n[contexts.1]\nflags = []\n')
    proc = subprocess.Popen([sys.executable, "-m", "vsockcompat", "ds"], env=vsock_env(rundir, core.NAME),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rt = make_vsock_runtime(core, rundir)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while ds_client.lookup_status(C.VMCI_PUBLIC_GROUP_NAME, rt, timeout=5)[0] != C.VMCI_SUCCESS:
            assert proc.poll() is None and time.monotonic() < deadline, "the daemon did not answer"
            time.sleep(0.2)
        with DatagramEndpoint(runtime=rt) as ep:
            assert ds_client.register_status("strict", ep.handle, rt) == C.VMCI_ERROR_NO_ACCESS
            assert ds_client.lookup_status("strict", rt)[0] == C.VMCI_ERROR_NOT_FOUND
    finally:
        proc.terminate()
        proc.wait(WAIT)
