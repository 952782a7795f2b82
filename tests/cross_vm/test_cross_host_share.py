"""A region two host programs share on the hybrid transport, attached from this guest too: the
host peer creates it and runs a second host program that attaches at its ``.host`` path and
writes; this guest (vsock, stream mode) attaches through the VMM and sees both writes, and its
own write reaches the creator. Inside the cross bed's guest only (gate: ``conftest.py``)."""
import pytest

from vsockcompat import constants as C
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.handles import VMCIHandle
from vsockcompat.sharedmem import SharedRegion

from .host_peer import SHARE_SIZE
from .test_cross_datagram import ask, guest_runtime, host  # noqa: F401  (fixtures)

pytestmark = pytest.mark.cross_vm


def test_a_region_of_two_host_programs_reaches_the_guest(guest_runtime, host):
    with DatagramEndpoint(runtime=guest_runtime) as ep:
        reply = ask(ep, host, b"share").payload
        word, rid, status, stderr = reply.split(b" ", 3)
        assert (word, status) == (b"shared", b"0"), reply
        handle = VMCIHandle(C.VMCI_HOST_CONTEXT_ID, int(rid))
        with SharedRegion.attach(handle, SHARE_SIZE, runtime=guest_runtime) as region:
            assert bytes(region.buffer[:7]) == b"creator"
            assert bytes(region.buffer[64:72]) == b"attacher"
            region.buffer[128:133] = b"guest"
            region.sync()
            assert ask(ep, host, b"peek %d 128 5" % handle.resource).payload == b"guest"
