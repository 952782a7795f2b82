"""A legacy C program on the machine's side of the VM boundary: the SDK's datagramApp in C
(tests/c/datagramApp.c) on libvmci.so.0's hybrid transport (src/vsc_hybrid.c), started by
``host_peer.py`` (``start c-datagram-app``), finds the discovery daemon there and answers
Python clients in this guest (vsock, stream mode), which find it by name alone. Inside the cross
bed's guest only (gate: ``conftest.py``)."""
import pytest

from vsockcompat import constants as C
from vsockcompat import ds_client
from vsockcompat.datagram import DatagramEndpoint

from .test_cross_datagram import WAIT, ask, guest_runtime  # noqa: F401  (a fixture)
from .test_cross_discovery import (CLIENT_TEXT, HOST, QUERIES, SERVER_TEXT, client_in_process,  # noqa: F401
                                   guest_env, run_client, vmm_ports_past_the_daemons)

pytestmark = pytest.mark.cross_vm


def test_c_datagram_app_server_on_the_host_python_clients_in_the_guest(core, rundir, guest_runtime, capsys):
    """Three clients, as the server answers three queries: the first a process of its own (the
    command line end to end), the others in this process (a Python start costs seconds under TCG)."""
    clients = [lambda: run_client(guest_env(core, rundir))] + [lambda: client_in_process(guest_runtime, capsys)] * 2
    assert len(clients) == QUERIES
    with DatagramEndpoint(runtime=guest_runtime) as control:
        started = ask(control, HOST, b"start c-datagram-app %s" % core.NAME.encode())
        assert started.payload == b"started: Running datagram server --- will respond to 3 queries."
        try:
            rc, server = ds_client.lookup_status("HOST INFO", guest_runtime)
            assert rc == C.VMCI_SUCCESS and server.context == C.VMCI_HOST_CONTEXT_ID
            assert ds_client.unregister_status("HOST INFO", guest_runtime) == C.VMCI_ERROR_NO_ACCESS
            for client in clients:
                assert client() == (0, CLIENT_TEXT, "")
        finally:
            control.send(HOST, b"result")
            result = control.recv(timeout=WAIT).payload
        status, _, output = result.partition(b"\n")
        out, _, err = output.partition(b"\0")
        assert (int(status), out.decode(), err.decode()) == (0, SERVER_TEXT, "")
    assert client_in_process(guest_runtime, capsys) == (0, "", "Failed to lookup in discovery service.\n")
