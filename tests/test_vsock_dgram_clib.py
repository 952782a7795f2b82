"""Python and C endpoints in the vsock transport's dgram mode meet on the host.

The Python stand-in for AF_VSOCK (``tests/vsock_standin.py``, in this process) and the C one
(``tests/c/vsock_emulation.c``, linked into ``vsock_probe``) put port P of CID C at the same
AF_UNIX path, so a Python endpoint and a C endpoint of one emulated kernel exchange datagrams and
find each other through a Python discovery daemon, with no real AF_VSOCK anywhere.
"""
import threading

import pytest

from test_clib import CC
from test_clib_vsock_guard import EmulatedProbe, emulated, guarded  # noqa: F401  (fixtures)
from test_vsock_dgram import HOST, WAIT, emu, make_dgram_runtime  # noqa: F401  (fixtures)
from vsockcompat.constants import VMCI_ERROR_INVALID_RESOURCE, VMCI_MAX_DG_PAYLOAD_SIZE, VMCI_PRIV_DG_SEND
from vsockcompat import ds_client
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.ds_server import DiscoveryServer
from vsockcompat.errors import InvalidResource, Timeout
from vsockcompat.handles import VMCIHandle


pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH, and CC unset")


def pattern(n: int) -> bytes:
    """vsock_probe's payload of ``n`` bytes."""
    return bytes((i * 7 + 3) & 0xFF for i in range(n))


@pytest.fixture
def daemon(make_dgram_runtime):
    server = DiscoveryServer(make_dgram_runtime(cid=1), tick=0.2)
    serving = threading.Thread(target=server.serve_forever)
    serving.start()
    yield server
    server.stop()
    serving.join(WAIT)


@pytest.fixture
def c_probe(guarded, emulated, rundir, emu):
    probe = EmulatedProbe(guarded, emulated, rundir, emu, "dgram", VSOCK_EMU_CID=str(HOST),
                          VSOCK_EMU_DGRAM="1")
    assert probe.ask("init") == ["0"]
    yield probe
    status, out, err = probe.close()
    assert (status, out, err) == (0, "", "")


def test_python_and_c_dgram_endpoints_exchange_and_find_each_other(c_probe, daemon, make_dgram_runtime):
    rt = make_dgram_runtime()
    with DatagramEndpoint(runtime=rt) as py:
        c = VMCIHandle(*(int(word) for word in c_probe.ask("create 0")))
        assert c.context == HOST and c != py.handle
        assert c_probe.ask("send %d %d %d" % (*py.handle, VMCI_MAX_DG_PAYLOAD_SIZE)) == ["69632"]
        assert py.recv(timeout=WAIT) == (c, pattern(VMCI_MAX_DG_PAYLOAD_SIZE))
        py.send(c, pattern(1000))
        assert c_probe.ask("recv") == ["1000", str(HOST), str(py.handle.resource), "1"]
        ds_client.register("python service", py.handle, rt, timeout=WAIT)
        assert c_probe.ask("lookup python service") == ["0", str(HOST), str(py.handle.resource)]
        assert c_probe.ask("register c service") == ["0"]
        assert ds_client.lookup("c service", rt, timeout=WAIT) == c


def test_python_and_c_agree_on_a_receiver_gone_and_python_drops_a_denied_c_sender(
        c_probe, make_dgram_runtime):
    with DatagramEndpoint(runtime=make_dgram_runtime()) as py:
        c = VMCIHandle(*(int(word) for word in c_probe.ask("create 0")))
        with DatagramEndpoint(runtime=make_dgram_runtime()) as gone:
            gone_handle = gone.handle
        assert c_probe.ask("send %d %d 5" % gone_handle) == [str(VMCI_ERROR_INVALID_RESOURCE)]
        with pytest.raises(InvalidResource):
            py.send(gone_handle, b"x")
        py._runtime.access.change(py.handle, lambda acl: acl.add(c, [], [VMCI_PRIV_DG_SEND]))
        assert c_probe.ask("send %d %d 5" % tuple(py.handle)) == ["29"]  # no channel back: sent
        with pytest.raises(Timeout):
            py.recv(timeout=0.5)
        assert py.stats.denied == 1
