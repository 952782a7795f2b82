"""One discovery daemon on the machine for two guests, CIDs 3 (here) and 4, behind one
``vhost-device-vsock``: with ``--guests 2`` the bed runs the host command (``host_peer.py``) once
with both VMM sockets, so its hybrid transport, and the daemon it starts, serve both guests.

A name registered here is found from CID 4, and CID 4's from here; neither guest may remove the
other's (NO_ACCESS). The SDK's datagramApp runs its server here and its client in CID 4
(``guest_peer.py``), which finds the server by name alone through the host's daemon. Only with
the second guest (gate: ``conftest.py``; without it the tests skip):

    python testbed/cross.py run --guests 2 --peer-cmd "python tests/cross_vm/guest_peer.py" \\
        --host-cmd "python tests/cross_vm/host_peer.py" -- \\
        python -m pytest tests/cross_vm/test_cross_multivmm.py -m cross_vm -rs

Every pair of cores: this guest's is the ``core`` fixture, CID 4's is ``sibling_core``.
"""
import threading
import time

import pytest

from vsockcompat import constants as C
from vsockcompat import ds_client
from vsockcompat.apps import datagram_app
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.handles import VMCIHandle
from vsockcompat.sdk import VMCILibrary

from .conftest import BED_CID, SIBLING_CID
from .guest_peer import SIBLING_RIDS, sibling_name
from .test_cross_datagram import WAIT, ask, guest_runtime  # noqa: F401  (a fixture)
from .test_cross_discovery import CLIENT_TEXT, SERVER_TEXT
from .test_cross_guests import SIBLING_WAIT, sibling_core  # noqa: F401  (a fixture)

pytestmark = pytest.mark.cross_vm

NOT_FOUND = b"%d 4294967295:4294967295" % C.VMCI_ERROR_NOT_FOUND


def lookup_until_found(name, runtime, seconds):
    """``(code, handle)`` of looking ``name`` up, again each second until it is found or
    ``seconds`` passed (CID 4 registers its names once it is up)."""
    deadline = time.monotonic() + seconds
    while True:
        rc, handle = ds_client.lookup_status(name, runtime)
        if rc == C.VMCI_SUCCESS or time.monotonic() > deadline:
            return rc, handle
        time.sleep(1.0)


def test_names_cross_between_the_guests_through_one_daemon(core, sibling_core, guest_runtime):
    sibling = VMCIHandle(SIBLING_CID, SIBLING_RIDS[sibling_core])
    theirs = sibling_name(sibling_core)
    assert lookup_until_found(theirs, guest_runtime, SIBLING_WAIT) == (C.VMCI_SUCCESS, sibling)
    assert ds_client.unregister_status(theirs, guest_runtime) == C.VMCI_ERROR_NO_ACCESS
    ours = b"multivmm %s" % core.NAME.encode()
    with DatagramEndpoint(runtime=guest_runtime) as control, \
            DatagramEndpoint(runtime=guest_runtime) as service:
        assert ds_client.register_status(ours, service.handle, guest_runtime) == C.VMCI_SUCCESS
        try:
            found = ask(control, sibling, b"lookup " + ours, ready_wait=SIBLING_WAIT)
            assert found.src == sibling
            assert found.payload == b"%d %d:%d" % (C.VMCI_SUCCESS, BED_CID, service.handle.resource)
            control.send(sibling, b"unregister " + ours)
            assert control.recv(timeout=WAIT).payload == b"%d" % C.VMCI_ERROR_NO_ACCESS
            assert ds_client.lookup_status(ours, guest_runtime) == (C.VMCI_SUCCESS, service.handle)
        finally:
            rc = ds_client.unregister_status(ours, guest_runtime)
        assert rc == C.VMCI_SUCCESS
        control.send(sibling, b"lookup " + ours)
        assert control.recv(timeout=WAIT).payload == NOT_FOUND
    assert ds_client.lookup_status(theirs, guest_runtime) == (C.VMCI_SUCCESS, sibling)


def test_datagram_app_server_here_client_in_the_sibling(core, sibling_core, guest_runtime, capsys):
    """The server answers three queries: three clients, each run by CID 4 on its ``sibling_core``
    endpoint's runtime, find it by name through the host's daemon and talk to it directly."""
    sibling = VMCIHandle(SIBLING_CID, SIBLING_RIDS[sibling_core])
    capsys.readouterr()
    ended = {}
    lib = VMCILibrary(guest_runtime)
    server = threading.Thread(target=lambda: ended.update(status=datagram_app.main(["-s"], lib=lib)),
                              daemon=True)
    server.start()
    try:
        rc, handle = lookup_until_found(datagram_app.SERVICE_NAME, guest_runtime, WAIT)
        assert rc == C.VMCI_SUCCESS and handle.context == BED_CID
        with DatagramEndpoint(runtime=guest_runtime) as control:
            for _ in range(datagram_app.QUERIES):
                reply = ask(control, sibling, b"datagram-app client", ready_wait=SIBLING_WAIT)
                assert reply.payload == b"0\n%s\0" % CLIENT_TEXT.encode()
    finally:
        server.join(WAIT)
        if server.is_alive():   # a failure above: its handle destroyed, the server's receive fails
            lib.VMCI_CleanupApp()
            server.join(WAIT)
    assert not server.is_alive() and ended == {"status": 0}
    assert capsys.readouterr() == (SERVER_TEXT, "")
    # The server unregistered its name on the way out: CID 4's client no longer finds it.
    with DatagramEndpoint(runtime=guest_runtime) as control:
        reply = ask(control, sibling, b"datagram-app client")
        assert reply.payload == b"0\n\0Failed to lookup in discovery service.\n"
