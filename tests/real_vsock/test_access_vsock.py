"""Access control over real AF_VSOCK, inside the guest test bed only (marker ``vsock``).

On vsock the kernel vouches for the peer CID and the hello names the sending port;
privileges live in the owning process (no shared runtime directory across kernels),
so its receive path enforces them, and senders of the same runtime see the denial
at once. Both cores.
"""
import pytest

from vsockcompat import constants as C
from vsockcompat.datagram import Datagram, DatagramEndpoint
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
