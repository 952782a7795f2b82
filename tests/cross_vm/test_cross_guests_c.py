"""libvmci.so.0 between two sibling guests: a C program (tests/c/vsock_probe.c) in this guest
(CID 3) and ``guest_peer.py``'s Python endpoints in the second (CID 4), behind one
``vhost-device-vsock``, exchange the largest datagram (69,608 bytes) both ways in stream mode.
``vhost-device-vsock`` 0.3.0 drops a packet between siblings bigger than one receive buffer of the
other guest, so this passes only if both sides write in pieces (``SIBLING_PIECE``: the C library
in src/vsc_link.c, Python in ``vsockcompat/transport/pieces.py``). Only with the second guest:

    python testbed/cross.py run --guests 2 --peer-cmd "python tests/cross_vm/guest_peer.py" \\
        --host-cmd "python tests/cross_vm/host_peer.py" -- \\
        python -m pytest tests/cross_vm/test_cross_guests_c.py -m cross_vm -rs

The C program runs directly with the environment ``vsockcompat run`` would give it
(``vsockcompat.run.command``).
"""
import hashlib
import os
import time

import pytest

from vsockcompat import clib
from vsockcompat.constants import VMCI_MAX_DG_PAYLOAD_SIZE as MAX
from vsockcompat.run import command

from guest_c_programs import ProbeProcess, build_programs, fnv1a, probe_pattern

from .conftest import BED_CID, SIBLING_CID, gate
from .guest_peer import SIBLING_RIDS, pattern
from .test_cross_guests import SIBLING_WAIT, sibling_core  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.cross_vm, pytest.mark.timeout(900)]

WAIT = 120.0


@pytest.fixture(scope="module")
def probe_cmd(tmp_path_factory):
    """vsock_probe built with this guest's cc, and what ``vsockcompat run`` would exec it with."""
    cc = clib.find_compiler()
    if cc is None:
        pytest.fail("no C compiler in the guest", pytrace=False)
    built = build_programs(cc, str(tmp_path_factory.mktemp("cguest")), ["vsock_probe"])
    rundir = str(tmp_path_factory.mktemp("rundir"))
    env = dict(os.environ, VSOCKCOMPAT_LIBVMCI=built["library"], VSOCKCOMPAT_TRANSPORT="vsock",
               VSOCKCOMPAT_VSOCK_MODE="stream", VSOCKCOMPAT_DS_AUTOSTART="0", VSOCKCOMPAT_RUNDIR=rundir,
               VSOCKCOMPAT_CID=str(BED_CID))
    return command([built["vsock_probe"]], env)


def test_c_library_and_python_sibling_exchange_the_largest_datagram(sibling_core, probe_cmd):
    peer = SIBLING_RIDS[sibling_core]
    reason = gate()  # checked again right before a program that makes AF_VSOCK sockets starts
    if reason is not None:
        pytest.fail("the cross-VM gate is closed (%s): refusing to run an AF_VSOCK program" % reason,
                    pytrace=False)
    probe = ProbeProcess(*probe_cmd, wait=WAIT)
    try:
        assert probe.ask("init") == ["0"]
        cid, rid = (int(v) for v in probe.ask("create 0"))
        assert cid == BED_CID
        deadline = time.monotonic() + SIBLING_WAIT
        while int(probe.ask("say %d %d ping" % (SIBLING_CID, peer))[0]) < 0:    # until the sibling is up
            assert time.monotonic() < deadline, "the second guest's %s endpoint never answered" % sibling_core
            time.sleep(1.0)
        echo = "ping from %d:%d" % (BED_CID, rid)
        assert probe.ask("recvtext", 3) == [str(len(echo)), str(SIBLING_CID), str(peer), echo]
        # C -> Python: "digest " and the pattern, 69,608 bytes in all; the sibling answers their hash
        assert probe.ask("sendpre %d %d %d digest" % (SIBLING_CID, peer, MAX)) == [str(MAX + 24)]
        body = probe_pattern(MAX)[len(b"digest "):]
        reply = "%d %s" % (len(body), hashlib.sha256(body).hexdigest())
        assert probe.ask("recvtext", 3) == [str(len(reply)), str(SIBLING_CID), str(peer), reply]
        # Python -> C: 69,608 bytes of the sibling's pattern
        assert probe.ask("say %d %d bulk %d 5" % (SIBLING_CID, peer, MAX)) == [str(24 + len("bulk %d 5" % MAX))]
        assert probe.ask("recvsum") == [str(MAX), str(SIBLING_CID), str(peer), str(fnv1a(pattern(MAX, 5)))]
    finally:
        probe.close()
