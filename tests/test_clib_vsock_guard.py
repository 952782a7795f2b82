"""libvmci.so.0's transport selection on the host, where AF_VSOCK must never be used.

This machine's AF_VSOCK leads to a hypervisor host that is not ours. Every C program here runs
under tests/c/no_vsock_shim.c (LD_PRELOAD, first): ``socket(AF_VSOCK, ...)`` fails and is
recorded, ``/dev/vsock`` is refused (or faked with /dev/null and a CID the test picks), so no
AF_VSOCK socket is ever created whatever the library does. The records prove the order of the
C library's checks: ``auto`` and ``local`` never touch AF_VSOCK; ``vsock`` reads the local CID
first and makes no socket when it is unknown, then only probes ``socket()`` (no connect), as
Python's ``choose_mode`` does; ``hybrid`` never touches it either. The vsock transport's real
behaviour is tested in the guest bed (tests/real_vsock/test_clib_vsock.py); its socket-agnostic
parts (src/vsc_link.c: hellos, verdicts, pumps, stream readers) run here over AF_UNIX
(tests/c/vsock_wire.c), and the whole transport C to C over AF_VSOCK emulated on AF_UNIX.
"""
import os
import shutil
import subprocess

import pytest

from vsockcompat.constants import SIBLING_PIECE, VMCI_DG_HEADERSIZE as HEADER, VMCI_MAX_DG_PAYLOAD_SIZE as MAX
from test_clib import CC, SANITIZE, SANITIZER_ENV, SANITIZER_MARKS, SRC_DIR, _cc, build, env_for

HERE = os.path.dirname(os.path.abspath(__file__))
C_DIR = os.path.join(HERE, "c")
INIT_FAILED = "Failed to init VMCI library.\n"
SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET = 1, 2, 5
NO_CID = ("vsockcompat: the vsock transport cannot run here: the local CID is unknown "
          "(IOCTL_VM_SOCKETS_GET_LOCAL_CID on /dev/vsock failed or no vsock transport gave this kernel a CID)\n")
WIRE_SOURCES = ("vsc_link.c", "vsc_dgram.c")

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH, and CC unset")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """libvmci.so.0, datagramApp, vsock_probe and the shim, built here."""
    out = str(tmp_path_factory.mktemp("guard"))
    built = build(out)
    built.shim = os.path.join(out, "no_vsock_shim.so")
    _cc(["-Wall", "-Wextra", "-shared", "-fPIC", os.path.join(C_DIR, "no_vsock_shim.c"), "-o", built.shim,
         "-ldl"], out)
    built.probe = os.path.join(out, "vsock_probe")
    _cc(["-Wall", "-Wextra", "-I", SRC_DIR, os.path.join(C_DIR, "vsock_probe.c"), "-o", built.probe,
         "-L", built.lib_dir, "-lvmci"], out)
    return built


def run_guarded(guarded, rundir, tmp_path, args, stdin=None, **settings):
    """Run a program under the shim; (result, the shim's records as (what, value) pairs)."""
    log = tmp_path / "no_vsock.log"
    env = env_for(rundir, "pure", guarded.library)
    env.update(LD_LIBRARY_PATH=guarded.lib_dir, LD_PRELOAD=guarded.shim, NO_VSOCK_LOG=str(log))
    for name, value in settings.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    result = subprocess.run(args, env=env, input=stdin, capture_output=True, text=True, timeout=60)
    records = [tuple(line.split()) for line in log.read_text().splitlines()] if log.exists() else []
    return result, [(what, int(value)) for what, value in records]


@pytest.mark.parametrize("transport", [None, "", "auto", "local"])
def test_auto_and_local_never_touch_af_vsock(guarded, rundir, tmp_path, transport):
    script = "init\ncreate 0\nsend 2 %d 5\nrecv\nquit\n"
    result, records = run_guarded(guarded, rundir, tmp_path, [guarded.probe], stdin=script % 1024,
                                  VSOCKCOMPAT_TRANSPORT=transport, NO_VSOCK_CID="3")
    assert result.stdout.splitlines() == ["init=0", "create=2 1024", "send=29", "recv=5 2 1024 1"], result.stderr
    assert records == []


def test_vsock_without_a_local_cid_refuses_before_any_socket(guarded, rundir, tmp_path):
    result, records = run_guarded(guarded, rundir, tmp_path, [guarded.datagramApp, "-c"],
                                  VSOCKCOMPAT_TRANSPORT="vsock")
    assert (result.returncode, result.stderr) == (254, NO_CID + INIT_FAILED)
    assert records == [("open", 0)]


AUTO_PROBES = [SOCK_DGRAM, SOCK_SEQPACKET, SOCK_STREAM]


@pytest.mark.parametrize("mode,probes", [(None, AUTO_PROBES), ("auto", AUTO_PROBES), ("dgram", [SOCK_DGRAM]),
                                         ("seqpacket", [SOCK_SEQPACKET]), ("stream", [SOCK_STREAM])])
def test_vsock_probes_socket_types_by_creating_sockets_only(guarded, rundir, tmp_path, mode, probes):
    """A kernel with a CID (faked) whose AF_VSOCK sockets cannot be made: the probes are socket()
    calls, nothing is connected, and the library refuses with the reasons."""
    result, records = run_guarded(guarded, rundir, tmp_path, [guarded.datagramApp, "-c"],
                                  VSOCKCOMPAT_TRANSPORT="vsock", VSOCKCOMPAT_VSOCK_MODE=mode, NO_VSOCK_CID="3")
    names = {SOCK_DGRAM: "DGRAM", SOCK_SEQPACKET: "SEQPACKET", SOCK_STREAM: "STREAM"}
    why = "; ".join("AF_VSOCK SOCK_%s sockets cannot be created here: Address family not supported by protocol"
                    % names[kind] for kind in probes)
    assert (result.returncode, result.stderr) == (
        254, "vsockcompat: the vsock transport cannot run here: %s\n" % why + INIT_FAILED)
    assert records == [("open", 0), ("ioctl", 1977)] + [("socket", kind) for kind in probes]


@pytest.mark.parametrize("cid", ["3", "4294967294"])
def test_context_1_is_refused_on_a_guest_kernel(guarded, rundir, tmp_path, cid):
    result, records = run_guarded(guarded, rundir, tmp_path, [guarded.datagramApp, "-c"],
                                  VSOCKCOMPAT_TRANSPORT="vsock", VSOCKCOMPAT_CID="1", NO_VSOCK_CID=cid)
    assert (result.returncode, result.stderr) == (
        254, "vsockcompat: context 1 (the discovery service) is served by the host, not by a guest "
             "(local CID %s)\n" % cid + INIT_FAILED)
    assert records == [("open", 0), ("ioctl", 1977)]


def test_hybrid_never_touches_af_vsock(guarded, rundir, tmp_path):
    """The hybrid transport (src/vsc_hybrid.c) is AF_UNIX only; its traffic is tested in
    tests/test_clib_hybrid.py."""
    result, records = run_guarded(guarded, rundir, tmp_path, [guarded.probe], stdin="init\ncreate 0\nsend 2 1024 5\n"
                                  "recv\nsend 3 5000 1\nquit\n", VSOCKCOMPAT_TRANSPORT="hybrid",
                                  VSOCKCOMPAT_HYBRID_UDS=str(tmp_path / "vm.sock"), NO_VSOCK_CID="3")
    assert result.stdout.splitlines() == ["init=0", "create=2 1024", "send=29", "recv=5 2 1024 1", "send=-10"]
    assert records == []


def test_hybrid_without_a_vmm_socket_fails_closed_with_a_message(guarded, rundir, tmp_path):
    result, records = run_guarded(guarded, rundir, tmp_path, [guarded.datagramApp, "-c"],
                                  VSOCKCOMPAT_TRANSPORT="hybrid", VSOCKCOMPAT_HYBRID_UDS=None)
    assert result.returncode == 254
    assert result.stderr == ("vsockcompat: the hybrid transport needs VSOCKCOMPAT_HYBRID_UDS, the path of the "
                             "VMM's hybrid-vsock Unix socket\n" + INIT_FAILED)
    assert records == []
    # VMCI_InitApp's code, through every call: the documented init error
    probe, _ = run_guarded(guarded, rundir, tmp_path, [guarded.probe], stdin="init\nquit\n",
                           VSOCKCOMPAT_TRANSPORT="hybrid", VSOCKCOMPAT_HYBRID_UDS=None)
    assert probe.stdout == "init=-39\n"


# The socket-agnostic wire (tests/c/vsock_wire.c), plain, under the sanitizers and valgrind


def build_wire(out_dir, extra=()):
    exe = os.path.join(out_dir, "vsock_wire")
    _cc(["-std=c11", "-Wall", "-Wextra", "-g", "-pthread", "-I", SRC_DIR] + list(extra)
        + [os.path.join(C_DIR, "vsock_wire.c")] + [os.path.join(SRC_DIR, s) for s in WIRE_SOURCES] + ["-o", exe],
        out_dir)
    return exe


def check_wire(result):
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines and lines[-1] == "all ok", result.stdout + result.stderr
    assert [line for line in lines if not line.endswith("=ok") and line != "all ok"] == []
    return lines


def test_wire_hellos_verdicts_pumps_and_stream_readers(tmp_path):
    lines = check_wire(subprocess.run([build_wire(str(tmp_path))], capture_output=True, text=True, timeout=120))
    assert len(lines) > 10


def test_wire_under_the_sanitizers(tmp_path):
    exe = build_wire(str(tmp_path), SANITIZE)
    result = subprocess.run([exe], capture_output=True, text=True, timeout=300, env=dict(os.environ, **SANITIZER_ENV))
    check_wire(result)
    assert all(mark not in result.stderr for mark in SANITIZER_MARKS), result.stderr


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_wire_under_valgrind(tmp_path):
    exe = build_wire(str(tmp_path))
    result = subprocess.run(["valgrind", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite",
                             "--quiet", exe], capture_output=True, text=True, timeout=600)
    check_wire(result)


# The whole C vsock transport, C <-> C, over AF_VSOCK emulated on AF_UNIX (tests/c/vsock_emulation.c,
# linked into the program: its socket() and friends are the ones libvmci.so.0 calls)

EMULATED = ("socket", "socketpair", "bind", "connect", "accept4", "getpeername", "getsockname", "open", "ioctl",
            "send", "sendto", "sendmsg", "write", "recvfrom", "recvmsg")


def build_emulated(program, lib_dir, out, extra=()):
    """tests/c/<program>.c linked with the emulation and the libvmci.so.0 of lib_dir: its path."""
    exe = os.path.join(out, program + "_emu")
    _cc(["-Wall", "-Wextra", "-rdynamic", "-I", SRC_DIR] + list(extra)
        + [os.path.join(C_DIR, program + ".c"), os.path.join(C_DIR, "vsock_emulation.c"), "-o", exe,
           "-L", lib_dir, "-lvmci", "-ldl"], out)
    # Fail closed: the program itself must define every call it emulates.
    symbols = subprocess.run(["nm", "-D", "--defined-only", exe], capture_output=True, text=True, check=True).stdout
    assert {line.split()[-1] for line in symbols.splitlines()} >= set(EMULATED)
    return exe


@pytest.fixture(scope="module")
def emulated(guarded, tmp_path_factory):
    return build_emulated("vsock_probe", guarded.lib_dir, str(tmp_path_factory.mktemp("emu")))


class EmulatedProbe:
    """vsock_probe on the emulated vsock transport, driven line by line."""

    def __init__(self, guarded, exe, rundir, emu_dir, mode, wrap=(), **emu):
        env = env_for(rundir, "pure", guarded.library)
        env.update(LD_LIBRARY_PATH=guarded.lib_dir, VSOCKCOMPAT_TRANSPORT="vsock", VSOCKCOMPAT_VSOCK_MODE=mode,
                   VSOCK_EMU_DIR=emu_dir, VSOCKCOMPAT_DS_AUTOSTART="1", **emu)
        self.proc = subprocess.Popen(list(wrap) + [exe], env=env, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer.startswith(line.split()[0] + "="), (line, answer, self.proc.poll())
        return answer.split("=", 1)[1].split()

    def close(self):
        out, err = self.proc.communicate("quit\n", timeout=60)
        return self.proc.returncode, out, err


def emulated_session(guarded, exe, rundir, tmp_path, mode, wrap=()):
    """Two C processes on the emulated vsock: datagrams both ways, the largest one, verdicts both
    ways, errors; returns both probes' (status, rest of stdout, stderr)."""
    emu = str(tmp_path / "emu")
    os.mkdir(emu)
    a = EmulatedProbe(guarded, exe, rundir, emu, mode, wrap)
    b = EmulatedProbe(guarded, exe, rundir, emu, mode, wrap)
    try:
        assert a.ask("init") == b.ask("init") == ["0"]
        assert a.ask("create 0") == ["1", "1024"]
        assert b.ask("create 0") == ["1", "1025"]  # 1024 is taken: the next port
        assert a.ask("send 1 1025 69608") == ["69632"]
        assert b.ask("recv") == ["69608", "1", "1024", "1"]
        assert b.ask("send 1 1024 7") == ["31"]
        assert a.ask("recv") == ["7", "1", "1025", "1"]
        # b denies a: a learns it from b's verdict, and again once lifted
        assert b.ask("deny 1 1024") == ["0"]
        assert a.ask("sendwait 1 1025 -7") == ["-7"]
        assert b.ask("allow 1 1024") == ["0"]
        assert a.ask("sendwait 1 1025 1") == ["25"]
        assert b.ask("recv") == ["1", "1", "1024", "0"]  # one byte "x", not the pattern
        # errors
        assert a.ask("send 1 4242 1") == ["-1"]
        assert a.ask("send 0 5 1") == a.ask("send 3 5 1") == ["-10"]
        assert a.ask("send 1 1025 69609") == ["-2"]
        # Regions are mirrored over vsock streams (VSOCKCOMPAT_SHM_MODE=auto): Create works, nobody
        # serves 4242; with VSOCKCOMPAT_SHM_MODE=shared there is no shared memory across kernels.
        assert a.ask("shm") == ["0", "-21", "-21", "-21"]
        shared = EmulatedProbe(guarded, exe, rundir, emu, mode, wrap, VSOCKCOMPAT_SHM_MODE="shared")
        assert shared.ask("init") == ["0"] and shared.ask("create 0")[0] == "1"
        assert shared.ask("shm") == ["1", "-20", "-20", "-21"]
        assert shared.close()[0] == 0
        assert a.ask("lookup anything") == ["-1", "4294967295", "4294967295"]  # no daemon, none started
        assert not os.path.exists(os.path.join(rundir, "ds.log"))
    finally:
        results = a.close(), b.close()
    return results


@pytest.mark.parametrize("mode", ["seqpacket", "stream"])
def test_c_to_c_over_emulated_vsock(guarded, emulated, rundir, tmp_path, mode):
    for status, out, err in emulated_session(guarded, emulated, rundir, tmp_path, mode):
        assert (status, out, err) == (0, "", "")


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
@pytest.mark.parametrize("mode", ["seqpacket", "stream"])
def test_c_to_c_over_emulated_vsock_under_valgrind(guarded, emulated, rundir, tmp_path, mode):
    wrap = ["valgrind", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite", "--quiet"]
    for status, out, err in emulated_session(guarded, emulated, rundir, tmp_path, mode, wrap):
        assert (status, out, err) == (0, "", "")


# Sibling guests (vsockcompat/transport/pieces.py): between two distinct guest CIDs a stream link
# writes in send() calls of at most SIBLING_PIECE bytes; to the host (CID 2) or on loopback, whole.
# Each probe is a kernel of its own CID on the emulation, logging the size of every send().

def sends_of(log):
    """The sizes of the send() calls a probe made on its emulated vsock sockets."""
    lines = log.read_text().splitlines() if log.exists() else []
    assert all(line.startswith("send ") for line in lines), lines
    return [int(line.split()[1]) for line in lines]


@pytest.mark.parametrize("mode", ["stream", "seqpacket"])
def test_writes_between_sibling_guests_are_cut_into_pieces(guarded, emulated, rundir, tmp_path, mode):
    emu = tmp_path / "emu"
    emu.mkdir()
    logs = {cid: tmp_path / ("sends%d" % cid) for cid in (2, 3, 4)}
    probes = {cid: EmulatedProbe(guarded, emulated, rundir, str(emu), mode, VSOCK_EMU_CID=str(cid),
                                 VSOCK_EMU_SENDS=str(logs[cid])) for cid in (2, 3, 4)}
    host, guest, sibling = probes[2], probes[3], probes[4]
    try:
        for cid, probe in probes.items():
            assert probe.ask("init") == ["0"]
            assert probe.ask("create %d" % (5000 + cid)) == [str(cid), str(5000 + cid)]
        # guest 3 <-> guest 4: the largest datagram arrives whole both ways
        assert guest.ask("send 4 5004 %d" % MAX) == [str(MAX + HEADER)]
        assert sibling.ask("recv") == [str(MAX), "3", "5003", "1"]
        assert sibling.ask("send 3 5003 %d" % MAX) == [str(MAX + HEADER)]
        assert guest.ask("recv") == [str(MAX), "4", "5004", "1"]
        sibling_sends = sends_of(logs[3]), sends_of(logs[4])
        # guest 3 <-> the host (CID 2): not siblings
        assert guest.ask("send 2 5002 %d" % MAX) == [str(MAX + HEADER)]
        assert host.ask("recv") == [str(MAX), "3", "5003", "1"]
        assert host.ask("send 3 5003 %d" % MAX) == [str(MAX + HEADER)]
        assert guest.ask("recv") == [str(MAX), "2", "5002", "1"]
    finally:
        results = [probe.close() for probe in probes.values()]
    assert results == [(0, "", "")] * 3
    to_host, from_host = sends_of(logs[3])[len(sibling_sends[0]):], sends_of(logs[2])
    for sends in sibling_sends:
        assert sum(sends) >= MAX + HEADER
        if mode == "stream":
            assert max(sends) == SIBLING_PIECE      # every write cut, the frame in full pieces
        else:
            assert MAX + HEADER in sends            # a SEQPACKET message is one packet: never cut
    for sends in (to_host, from_host):
        assert MAX + HEADER in sends                # to and from the host: whole
