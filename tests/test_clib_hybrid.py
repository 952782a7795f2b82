"""libvmci.so.0 on the hybrid transport (src/vsc_hybrid.c), on the host only.

Legacy C programs (tests/c/vsock_probe.c driven line by line, the SDK's datagramApp) run with
``VSOCKCOMPAT_TRANSPORT=hybrid`` against a fake VMM (test_hybrid.FakeVMM: ``CONNECT <port>`` /
``OK <hostport>``, a fake guest behind it), against Python host programs on hybrid (both cores),
and against the hybrid discovery daemon they start themselves. AF_UNIX only: every C program runs
under tests/c/no_vsock_shim.c, whose records must stay empty (no AF_VSOCK socket, no /dev/vsock),
and this process refuses AF_VSOCK (test_hybrid.no_af_vsock).
"""
import os
import socket
import subprocess
import time

import pytest

from vsockcompat import constants as C
from vsockcompat import ds_client
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.handles import VMCIHandle
from vsockcompat.runtime import Runtime
from vsockcompat.transport import vsock as vsock_module

from conftest import PYTHON, child_env
from guest_c_programs import ProbeProcess, fnv1a, probe_pattern
from test_clib import CC, CLIENT_OUT, SERVER_OUT, env_for
from test_clib_vsock_guard import guarded  # noqa: F401  (fixture: library, datagramApp, probe, shim)
from test_hybrid import (GUEST, WAIT, connect_as_guest, frame, hybrid_settings,  # noqa: F401  (fixtures too)
                         no_af_vsock, vmm)

HEADER = C.VMCI_DG_HEADERSIZE
PY_APP = [PYTHON, "-m", "vsockcompat", "datagram-app"]

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH, and CC unset")


@pytest.fixture
def shim_log(tmp_path):
    """Where the C programs' shim records AF_VSOCK attempts; none may happen."""
    log = tmp_path / "no_vsock.log"
    yield str(log)
    assert not log.exists() or log.read_text() == "", "AF_VSOCK was touched: %s" % log.read_text()


def c_env(guarded, rundir, uds, shim_log, cids=None, **extra):
    """A C program's environment on hybrid over the VMM socket(s) ``uds`` (``:``-separated)."""
    env = env_for(rundir, "pure", guarded.library, VSOCKCOMPAT_TRANSPORT="hybrid", VSOCKCOMPAT_HYBRID_UDS=uds,
                  NO_VSOCK_LOG=shim_log, **extra)
    env.update(LD_LIBRARY_PATH=guarded.lib_dir, LD_PRELOAD=guarded.shim)
    if cids is not None:
        env["VSOCKCOMPAT_HYBRID_CID"] = cids
    else:
        env.pop("VSOCKCOMPAT_HYBRID_CID", None)
    return env


def py_env(rundir, core_name, uds, cid=2):
    return child_env(rundir, core_name, cid=cid, VSOCKCOMPAT_TRANSPORT="hybrid", VSOCKCOMPAT_HYBRID_UDS=uds,
                     VSOCKCOMPAT_HYBRID_CID=str(GUEST))


class Probe(ProbeProcess):
    """vsock_probe on hybrid, initialised, with an endpoint (``handle``); ``close()`` is idempotent."""

    def __init__(self, guarded, env, rid=0):
        super().__init__([guarded.probe], env, WAIT)
        assert self.ask("init") == ["0"]
        cid, got = (int(v) for v in self.ask("create %d" % rid))
        assert cid == 2 and got >= (rid or 1024)
        self.handle = VMCIHandle(cid, got)

    def close(self):
        if not self.proc.stdout.closed:
            super().close()


def closed_by_peer(sock):
    """Whether the other end closed ``sock`` (an end of file, or a reset: it closed unread)."""
    sock.settimeout(WAIT)
    try:
        return sock.recv(16) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def probe_on(guarded, rundir, shim_log):
    """``probe_on(uds, **env)``: a started Probe on hybrid; all are closed (exit 0, quiet stderr) at
    teardown (ask for it after ``vmm``, so that they close before the VMM's guest is joined)."""
    started = []

    def start(uds, rid=0, **extra):
        started.append(Probe(guarded, c_env(guarded, rundir, uds, shim_log, **extra), rid))
        return started[-1]
    yield start
    for probe in started:
        probe.close()


# Host -> guest through the VMM, and back through <uds>_<port>

def test_c_reaches_a_guest_through_the_vmm_and_hears_back(vmm, probe_on):
    probe = probe_on(vmm.path)
    rid = probe.handle.resource
    assert os.path.exists("%s_%d" % (vmm.path, rid)) and os.path.exists("%s_%d.host" % (vmm.path, rid))
    assert probe.ask("say %d 5000 hello, guest" % GUEST) == [str(len("hello, guest") + HEADER)]
    assert probe.ask("recvtext", 3) == ["12", str(GUEST), "5000", "tseug ,olleh"]
    guest = vmm.guest.received
    assert guest.get(timeout=WAIT) == ("hello", (False, rid))
    fields, payload = guest.get(timeout=WAIT)[1:]
    assert fields == (GUEST, 5000, 2, rid, len(payload)) and payload == b"hello, guest"
    for size in (0, 1, 4096, C.VMCI_MAX_DG_PAYLOAD_SIZE):
        assert probe.ask("send %d 5000 %d" % (GUEST, size)) == [str(size + HEADER)]
        assert probe.ask("recvsum") == [str(size), str(GUEST), "5000", str(fnv1a(probe_pattern(size)[::-1]))]
    assert vmm.connects == [5000]  # one link per destination
    probe.close()
    assert not os.path.exists("%s_%d" % (vmm.path, rid))


@pytest.mark.parametrize("answer, code", [
    ("close", C.VMCI_ERROR_INVALID_RESOURCE),      # the VMM closes: the guest refused
    ("silent", C.VMCI_ERROR_TIMEOUT),              # no answer within the handshake's bound
    (b"ERR no listener\n", C.VMCI_ERROR_DST_UNREACHABLE),
    (b"OK\n", C.VMCI_ERROR_DST_UNREACHABLE),
    (b"OK -1\n", C.VMCI_ERROR_DST_UNREACHABLE),
    (b"OK 99999999999\n", C.VMCI_ERROR_DST_UNREACHABLE),
    (b"ok 12\n", C.VMCI_ERROR_DST_UNREACHABLE),
    (b"OK 12", C.VMCI_ERROR_TIMEOUT),              # no newline: still waiting when the time is up
    (b"A" * 100, C.VMCI_ERROR_DST_UNREACHABLE),
], ids=["no-answer", "silent", "err", "no-port", "negative", "too-big", "lowercase", "unterminated", "garbage"])
def test_bad_handshakes_give_the_codes_and_the_endpoint_goes_on(vmm, probe_on, answer, code):
    vmm.answer = lambda port: answer if port == 5000 else "ok"
    probe = probe_on(vmm.path)
    assert probe.ask("send %d 5000 10" % GUEST) == [str(code)]
    assert probe.ask("say %d 5001 fine" % GUEST) == [str(4 + HEADER)]
    assert probe.ask("recvtext", 3) == ["4", str(GUEST), "5001", "enif"]


def test_unreachable_destinations(probe_on, tmp_path):
    """No VMM at the socket, a CID behind no socket, context 0; a free host port; the host's own
    contexts are reached without any VMM."""
    probe = probe_on(str(tmp_path / "nothing.vsock"))
    me = probe.handle
    for cid in (GUEST, 4, 0, C.VMCI_INVALID_ID):
        assert probe.ask("send %d 5000 1" % cid) == [str(C.VMCI_ERROR_DST_UNREACHABLE)], cid
    assert probe.ask("send 2 %d 1" % (me.resource + 1)) == [str(C.VMCI_ERROR_INVALID_RESOURCE)]
    assert probe.ask("send 1 1 1") == [str(C.VMCI_ERROR_INVALID_RESOURCE)]  # no daemon, none started by a send
    assert probe.ask("send 2 %d 9" % me.resource) == [str(9 + HEADER)]
    assert probe.ask("recv") == ["9", "2", str(me.resource), "1"]


def test_guest_input_is_judged_by_the_path_it_arrived_on(vmm, probe_on):
    """At <uds>_<rid> the sender is the VMM's guest (a hello claiming context 1 is refused, a frame
    claiming another source is dropped with its connection); at .host a process of this user,
    context 1 if its hello says so."""
    probe = probe_on(vmm.path)
    me = tuple(probe.handle)
    hello = vsock_module.encode_hello
    claims_ds = connect_as_guest(vmm, me[1], hello(1, well_known=True) + frame(me, (1, 1), b"I am the DS"))
    forged = connect_as_guest(vmm, me[1], hello(5007) + frame(me, (4, 5007), b"I am guest 4"))
    honest = connect_as_guest(vmm, me[1], hello(5008) + frame(me, (GUEST, 5008), b"honest"))
    assert probe.ask("recvtext", 3) == ["6", str(GUEST), "5008", "honest"]
    for sock in (claims_ds, forged):
        assert closed_by_peer(sock)  # refused, or dropped: closed
        sock.close()
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.connect("%s_%d.host" % (vmm.path, me[1]))
    host.sendall(hello(1, well_known=True) + frame(me, (1, 1), b"the DS"))
    assert probe.ask("recvtext", 3) == ["6", "1", "1", "the DS"]
    for sock in (honest, host):
        sock.close()
