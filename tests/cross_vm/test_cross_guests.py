"""Guest <-> guest across a real VM boundary: this guest (CID 3) and a second one (CID 4) behind
the same ``vhost-device-vsock`` daemon, which carries their connections to each other (siblings
in its one group). Both run the vsock transport in stream mode; CID 4 runs ``guest_peer.py``.
Only with the second guest (gate: ``conftest.py``; without it the tests skip):

    python testbed/cross.py run --guests 2 --peer-cmd "python tests/cross_vm/guest_peer.py" \\
        --host-cmd "python tests/cross_vm/host_peer.py" -- python -m pytest tests/cross_vm -m cross_vm -rs

One exchange per pair of cores (the guest's core is the ``core`` fixture, CID 4's is
``sibling_core``): CID 3 asks CID 4 to look its own endpoint up in the host's discovery daemon
(one for both guests; ``test_cross_multivmm.py`` checks that it is one), then sends
to the handle found a 4-byte and a 1,024-byte datagram, and checks the echoes and both sides'
view of the other's handle. Then large traffic, which ``vhost-device-vsock`` 0.3.0 loses unless
written in pieces (it forwards a packet between siblings whole into one receive buffer of the
other guest: ``vsockcompat/transport/pieces.py``): datagrams of 3,800 bytes to the maximum payload
both ways, a queue-pair stream write of 20,000 bytes both ways, and a 64 KiB mirrored region
written whole by each side.
"""
import os

import pytest

from vsockcompat.constants import VMCI_MAX_DG_PAYLOAD_SIZE, VMCI_SUCCESS
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.handles import VMCIHandle
from vsockcompat.queuepair import QueuePair
from vsockcompat.sharedmem import SharedRegion

from .conftest import BED_CID, SIBLING_CID
from .guest_peer import QP_SIZE, SIBLING_RIDS, digest, pattern, sibling_name
from .test_cross_datagram import WAIT, ask, guest_runtime  # noqa: F401  (a fixture)

pytestmark = pytest.mark.cross_vm

#: Seconds for the second guest to come up: it boots beside this one, under TCG often later.
SIBLING_WAIT = 300.0


@pytest.fixture(params=sorted(SIBLING_RIDS), ids=["sibling-c", "sibling-py"])
def sibling_core(request):
    if os.environ.get("VSOCKCOMPAT_CROSS_SIBLING") != str(SIBLING_CID):
        pytest.skip("no sibling guest (with --vmm-per-guest CID 4 has a VMM of its own, which "
                    "does not carry its packets to CID 3): run testbed/cross.py run --guests 2 "
                    "--peer-cmd \"python tests/cross_vm/guest_peer.py\" ...")
    return request.param


def test_guest_to_guest_found_through_discovery(sibling_core, guest_runtime):
    greeter = VMCIHandle(SIBLING_CID, SIBLING_RIDS[sibling_core])
    with DatagramEndpoint(runtime=guest_runtime) as ep:
        assert ep.handle.context == BED_CID
        found = ask(ep, greeter, b"lookup " + sibling_name(sibling_core),
                    ready_wait=SIBLING_WAIT)
        assert found.src == greeter
        assert found.payload == b"%d %d:%d" % (VMCI_SUCCESS, SIBLING_CID, SIBLING_RIDS[sibling_core])
        suffix = b" from %d:%d" % (BED_CID, ep.handle.resource)
        for payload in (b"ping", bytes(range(256)) * 4):
            ep.send(greeter, payload)
            got = ep.recv(timeout=WAIT)
            assert got.src == greeter
            assert got.payload == payload + suffix


# Large traffic: every write between the guests goes in pieces (transport/pieces.py).

#: Sizes both ways: from the first size seen lost before the fix (3,800) to the maximum payload.
LARGE_SIZES = (3800, 4100, 8000, VMCI_MAX_DG_PAYLOAD_SIZE)
#: Bytes of the queue-pair write each way (one write: more than a piece, less than the queues).
QP_WRITE = 20000


def test_guest_to_guest_large_datagrams_both_ways(sibling_core, guest_runtime):
    greeter = VMCIHandle(SIBLING_CID, SIBLING_RIDS[sibling_core])
    with DatagramEndpoint(runtime=guest_runtime) as ep:
        ask(ep, greeter, b"ping", ready_wait=SIBLING_WAIT)
        for seed, size in enumerate(LARGE_SIZES):
            body = pattern(size - len(b"digest "), seed)
            ep.send(greeter, b"digest " + body)                     # CID 3 -> CID 4: ``size`` bytes
            got = ep.recv(timeout=WAIT)
            assert got.src == greeter and got.payload == digest(body), size
            ep.send(greeter, b"bulk %d %d" % (size, seed))           # CID 4 -> CID 3: ``size`` bytes
            got = ep.recv(timeout=WAIT)
            assert got.src == greeter and len(got.payload) == size
            assert got.payload == pattern(size, seed)


def test_guest_to_guest_queue_pair_stream_both_ways(sibling_core, guest_runtime):
    """CID 3 creates a queue pair and writes ``QP_WRITE`` bytes; CID 4 attaches, reads them and
    writes them back in one enqueue."""
    greeter = VMCIHandle(SIBLING_CID, SIBLING_RIDS[sibling_core])
    data = pattern(QP_WRITE, 11)
    with DatagramEndpoint(runtime=guest_runtime) as ep:
        ask(ep, greeter, b"ping", ready_wait=SIBLING_WAIT)
        qp = QueuePair.alloc(None, QP_SIZE, QP_SIZE, runtime=guest_runtime)
        try:
            assert qp.enqueue(data) == QP_WRITE        # sent in one write once CID 4 attaches
            ep.send(greeter, b"qp-echo %d %d" % (qp.handle.resource, QP_WRITE))
            reply = ep.recv(timeout=WAIT)
            assert reply.src == greeter and reply.payload == digest(data)
            got = bytearray()
            while len(got) < QP_WRITE:
                qp.wait_for_data(WAIT)
                got += qp.dequeue(QP_WRITE - len(got))
            assert bytes(got) == data
        finally:
            qp.detach()


#: Bytes of the mirrored region each side writes whole (its UPDATE frames are bigger than a piece).
REGION_SIZE = 65536


def test_guest_to_guest_mirrored_region_both_ways(sibling_core, guest_runtime):
    """CID 3 creates a region and fills it; CID 4 attaches (the contents cross), checks them and
    fills the region with its own pattern, which CID 3 then holds."""
    greeter = VMCIHandle(SIBLING_CID, SIBLING_RIDS[sibling_core])
    with DatagramEndpoint(runtime=guest_runtime) as ep:
        ask(ep, greeter, b"ping", ready_wait=SIBLING_WAIT)
        region = SharedRegion.create(REGION_SIZE, runtime=guest_runtime)
        try:
            region.buffer[:] = pattern(REGION_SIZE, 21)
            ep.send(greeter, b"mirror-echo %d %d 22" % (region.handle.resource, REGION_SIZE))
            reply = ep.recv(timeout=WAIT)
            assert reply.src == greeter and reply.payload == digest(pattern(REGION_SIZE, 21))
            assert bytes(region.buffer) == pattern(REGION_SIZE, 22)
        finally:
            region.detach()
