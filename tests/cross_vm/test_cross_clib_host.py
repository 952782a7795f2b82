"""Legacy C programs on the machine's side of the VM boundary: the SDK's datagramApp and
sharedMemApp in C (tests/c/) on libvmci.so.0's hybrid transport (src/vsc_hybrid.c; the region
mirrored through the VMM, src/vsc_mirror*.c), started by ``host_peer.py`` (``start
c-datagram-app``, ``start c-sharedmem-app``), find the discovery daemon there and answer Python
clients in this guest (vsock, stream mode), which find them by name alone. The other way round,
C attachers on the machine reaching regions created in this guest: test_cross_clib_host_attach.py.
Inside the cross bed's guest only (gate: ``conftest.py``)."""
import pytest

from .test_cross_datagram import guest_runtime  # noqa: F401  (a fixture)
from .test_cross_discovery import (QUERIES, client_in_process, guest_env, run_client,
                                   serve_datagram_app_on_the_host, serve_shared_mem_app_on_the_host)

pytestmark = pytest.mark.cross_vm


def test_c_datagram_app_server_on_the_host_python_clients_in_the_guest(core, rundir, guest_runtime, capsys):
    """Three clients, as the server answers three queries: the first a process of its own (the
    command line end to end), the others in this process (a Python start costs seconds under TCG)."""
    clients = [lambda: run_client(guest_env(core, rundir))] + [lambda: client_in_process(guest_runtime, capsys)] * 2
    assert len(clients) == QUERIES
    serve_datagram_app_on_the_host(b"start c-datagram-app %s" % core.NAME.encode(), clients, guest_runtime, capsys)


def test_c_sharedmem_app_server_on_the_host_python_client_in_the_guest(guest_runtime, capsys):
    """The C server's region, mirrored into this guest through the VMM: three readings."""
    serve_shared_mem_app_on_the_host(b"start c-sharedmem-app cython", guest_runtime, capsys)
