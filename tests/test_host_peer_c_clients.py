"""host_peer.py's host C clients (``c-attach``, ``c-sharedmem-client``; tests/cross_vm), on the
host only: the line-driven C attacher reaches a Python region of "the guest" through a fake VMM
that loops back to this machine (test_hybrid.looped), a region nobody serves gives the SDK's
code, a client that outlives ``CLIENT_WAIT`` is killed and said so, and an AF_VSOCK attempt the
shim records fails the answer. AF_UNIX only: the shim refuses AF_VSOCK sockets before the kernel
sees them. The bed's run of the same commands is tests/cross_vm/test_cross_clib_host_attach.py."""
import types

import pytest

from vsockcompat.constants import VMCI_ERROR_NOT_FOUND, VMCI_ERROR_TIMEOUT, VMCI_SUCCESS

from cross_vm import host_peer
from test_clib import CC
from test_clib_hybrid_mirror import pylib  # noqa: F401  (a fixture: the Python SDK, regions "the guest's")
from test_hybrid import GUEST, looped, no_af_vsock  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH, and CC unset")]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """One ``host_peer.Samples`` for the module: its C clients are built once."""
    return host_peer.Samples(str(tmp_path_factory.mktemp("host-c-clients")))


@pytest.fixture
def ask(samples, rundir, looped, monkeypatch):
    """``ask(payload)``: host_peer's answer to a datagram of the guest GUEST, in the environment
    the bed gives the host peer (hybrid over the fake VMM's socket)."""
    for name, value in (("VSOCKCOMPAT_TRANSPORT", "hybrid"), ("VSOCKCOMPAT_HYBRID_UDS", looped.path),
                        ("VSOCKCOMPAT_HYBRID_CID", str(GUEST)), ("VSOCKCOMPAT_RUNDIR", rundir)):
        monkeypatch.setenv(name, value)
    return lambda payload: host_peer.answer(None, types.SimpleNamespace(payload=payload), None, samples, GUEST)


def result(reply):
    """``(status, stdout lines, stderr)`` of a host C client's answer."""
    assert not reply.startswith(b"failed: "), reply
    status, _, output = reply.partition(b"\n")
    out, _, err = output.partition(b"\0")
    return int(status), out.decode().splitlines(), err.decode()


def test_c_attach_reads_a_region_through_the_vmm(ask, pylib, looped):
    handle, view = pylib.VMCISharedMem_Create(70000)
    view[66000:66012] = b"written here"
    assert result(ask(b"c-attach %d %d 70000 66000 12" % (GUEST, handle[1]))) == (
        0, ["0", "0 70000 0", "[written here]", "0"], "")
    assert looped.connects == [handle[1]]
    view.release()
    assert pylib.VMCISharedMem_Detach(handle) == VMCI_SUCCESS


def test_c_attach_to_a_region_nobody_serves_is_not_found(ask, looped):
    assert result(ask(b"c-attach %d 99999 128 0 8" % GUEST)) == (
        0, ["0", "%d 128 1" % VMCI_ERROR_NOT_FOUND, "unmapped", str(VMCI_ERROR_NOT_FOUND)], "")
    assert looped.connects == [99999]


def test_a_silent_vmm_is_a_timeout_within_the_bound(ask, looped):
    looped.answer = lambda port: "silent"
    status, lines, err = result(ask(b"c-attach %d 5000 64 0 8" % GUEST))
    assert (status, lines[:2], err) == (0, ["0", "%d 64 1" % VMCI_ERROR_TIMEOUT], "")


def test_a_client_past_the_bound_is_killed(ask, looped, monkeypatch):
    looped.answer = lambda port: "silent"     # the handshake takes 10 s, the bound is shorter
    monkeypatch.setattr(host_peer, "CLIENT_WAIT", 2.0)
    assert ask(b"c-attach %d 5000 64 0 8" % GUEST) == b"failed: shm_probe killed after 2 s"


def test_an_af_vsock_attempt_fails_the_answer(ask, monkeypatch):
    """The vsock transport asked for: the C library's /dev/vsock (and any socket(AF_VSOCK)) is
    refused by the shim and recorded, and the answer is a failure whatever the client printed."""
    monkeypatch.setenv("VSOCKCOMPAT_TRANSPORT", "vsock")
    reply = ask(b"c-attach %d 5000 64 0 8" % GUEST)
    assert reply.startswith(b"failed: AF_VSOCK touched: open "), reply


def test_the_sdk_client_without_a_registration(ask):
    """sharedMemApp's client finds no "HOST TIME" (no discovery daemon answers): the SDK's text."""
    assert result(ask(b"c-sharedmem-client")) == (0, [], "Failed to lookup in discovery service.\n")


def test_a_malformed_c_attach_request_is_refused_before_any_client_runs(ask):
    """A word that is no number raises ValueError, which serve() reports and counts."""
    with pytest.raises(ValueError):
        ask(b"c-attach 3 x 64 0 8")
