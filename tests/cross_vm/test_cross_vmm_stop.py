"""A guest's discovery names die with its VMM, across a real VM boundary. Only with a VMM per
guest (``testbed/cross.py run --guests 2 --vmm-per-guest``: CID 4 behind a ``vhost-device-vsock``
of its own, so stopping it leaves this guest's; without it the test skips):

    python testbed/cross.py run --guests 2 --vmm-per-guest \\
        --peer-cmd "python tests/cross_vm/guest_peer.py" \\
        --host-cmd "python tests/cross_vm/host_peer.py" -- \\
        python -m pytest tests/cross_vm/test_cross_vmm_stop.py -m cross_vm -rs

CID 4 (``guest_peer.py``) registers a datagram endpoint per core in the host's discovery daemon
(``sibling_name``); this guest, which must be the one to check, finds them, and the host reaches
them through CID 4's VMM (``relay``). Then the host stops CID 4's VMM (``stop-vmm 4``: the bed's
daemon for CID 4 only, ``testbed/vmm_stop.py``). Within ``GONE_WAIT`` seconds CID 4's names are
NOT_FOUND from this guest and from the host, while this guest's own names stay; a datagram from
the host to CID 4's old handles is ``DstUnreachable`` (no VMM listens for that guest any more:
the host-side test of the same rule is ``tests/test_hybrid.py``'s
``test_one_daemon_serves_both_guests``, with fake VMMs).

Stopping a VMM cannot be undone within a run, so this is one test over every pair of cores
(this guest's, CID 4's endpoint's), each checked before and after the one stop.
"""
import os
import time

import pytest

from vsockcompat import constants as C
from vsockcompat import ds_client
from vsockcompat._backend import load_core
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.handles import VMCIHandle

from .conftest import BED_CID, SIBLING_CID
from .guest_peer import SIBLING_RIDS, sibling_name
from .host_peer import HOST_RIDS, built_cores
from .test_cross_datagram import WAIT, ask, open_guest_runtime
from .test_cross_guests import SIBLING_WAIT

pytestmark = [pytest.mark.cross_vm, pytest.mark.timeout(900)]   # CID 4 may boot minutes late

#: Set by the bed for this guest when CID 4 runs behind a VMM of its own (testbed/cross.py).
OWN_VMM_ENV = "VSOCKCOMPAT_CROSS_OWN_VMM"
HOST = VMCIHandle(C.VMCI_HOST_CONTEXT_ID, HOST_RIDS["cython"])
#: Seconds within which CID 4's names must be gone once its VMM stopped.
GONE_WAIT = 30.0
NOT_FOUND = (C.VMCI_ERROR_NOT_FOUND, VMCIHandle(C.VMCI_INVALID_ID, C.VMCI_INVALID_ID))


def lookup_until(name, runtime, code, seconds):
    """``(code, handle)`` of looking ``name`` up, again every half second until the answer's code
    is ``code`` or ``seconds`` passed."""
    deadline = time.monotonic() + seconds
    while True:
        found = ds_client.lookup_status(name, runtime)
        if found[0] == code or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_a_guests_names_die_with_its_vmm(rundir):
    if os.environ.get(OWN_VMM_ENV) != str(SIBLING_CID):
        pytest.skip("CID %d has no VMM of its own: run testbed/cross.py run --guests 2 "
                    "--vmm-per-guest --peer-cmd \"python tests/cross_vm/guest_peer.py\" ..."
                    % SIBLING_CID)
    runtimes = {name: open_guest_runtime(load_core(name), rundir)
                for name in built_cores(("cython", "pure"), "vmm-stop")}
    theirs = {core: (sibling_name(core), VMCIHandle(SIBLING_CID, rid))
              for core, rid in SIBLING_RIDS.items()}
    services = {core: DatagramEndpoint(runtime=rt) for core, rt in runtimes.items()}
    try:
        with DatagramEndpoint(runtime=runtimes["pure"]) as control:
            for core, rt in runtimes.items():
                ours = b"own vmm %s" % core.encode()
                assert ds_client.register_status(ours, services[core].handle, rt) == C.VMCI_SUCCESS
                for name, handle in theirs.values():
                    assert lookup_until(name, rt, C.VMCI_SUCCESS, SIBLING_WAIT) == (
                        C.VMCI_SUCCESS, handle)
            for name, handle in theirs.values():
                relayed = ask(control, HOST, b"relay %d %d ping" % tuple(handle)).payload
                assert relayed.startswith(b"reply ping from %d:" % C.VMCI_HOST_CONTEXT_ID)
            # Bad input: the asking guest's own VMM, a CID the bed gave no VMM, not a CID.
            for cid in (b"%d" % BED_CID, b"0%d" % BED_CID, b"7", b"x"):
                control.send(HOST, b"stop-vmm " + cid)
                assert control.recv(timeout=WAIT).payload.startswith(b"refused: ")
            control.send(HOST, b"stop-vmm %d" % SIBLING_CID)
            stopped = control.recv(timeout=WAIT).payload
            assert stopped.startswith(b"stopped: "), stopped
            stopped_at = time.monotonic()
            for core, rt in runtimes.items():
                for name, _ in theirs.values():
                    assert lookup_until(name, rt, C.VMCI_ERROR_NOT_FOUND, GONE_WAIT) == NOT_FOUND
                assert ds_client.lookup_status(b"own vmm %s" % core.encode(), rt) == (
                    C.VMCI_SUCCESS, services[core].handle)
            print("CID %d's names NOT_FOUND %.1f s after its VMM stopped"
                  % (SIBLING_CID, time.monotonic() - stopped_at))
            for name, handle in theirs.values():
                control.send(HOST, b"lookup " + name)
                assert control.recv(timeout=WAIT).payload == b"%d %d:%d" % (
                    C.VMCI_ERROR_NOT_FOUND, C.VMCI_INVALID_ID, C.VMCI_INVALID_ID)
                control.send(HOST, b"relay %d %d ping" % tuple(handle))
                assert control.recv(timeout=WAIT).payload == b"failed: DstUnreachable"
    finally:
        for core, service in services.items():
            ds_client.unregister_status(b"own vmm %s" % core.encode(), runtimes[core])
            service.close()
