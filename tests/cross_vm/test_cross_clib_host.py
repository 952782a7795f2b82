"""A legacy C program on the machine's side of the VM boundary: the SDK's datagramApp in C
(tests/c/datagramApp.c) on libvmci.so.0's hybrid transport (src/vsc_hybrid.c), started by
``host_peer.py`` (``start c-datagram-app``), finds the discovery daemon there and answers
Python clients in this guest (vsock, stream mode), which find it by name alone. Inside the cross
bed's guest only (gate: ``conftest.py``)."""
import pytest

from .test_cross_datagram import guest_runtime  # noqa: F401  (a fixture)
from .test_cross_discovery import (QUERIES, client_in_process, guest_env, run_client,
                                   serve_datagram_app_on_the_host)

pytestmark = pytest.mark.cross_vm


def test_c_datagram_app_server_on_the_host_python_clients_in_the_guest(core, rundir, guest_runtime, capsys):
    """Three clients, as the server answers three queries: the first a process of its own (the
    command line end to end), the others in this process (a Python start costs seconds under TCG)."""
    clients = [lambda: run_client(guest_env(core, rundir))] + [lambda: client_in_process(guest_runtime, capsys)] * 2
    assert len(clients) == QUERIES
    serve_datagram_app_on_the_host(b"start c-datagram-app %s" % core.NAME.encode(), clients, guest_runtime, capsys)
