"""libvmci.so.0 between two sibling guests: a C program (tests/c/vsock_probe.c) in this guest
(CID 3) and ``guest_peer.py``'s Python endpoints in the second (CID 4), behind one
``vhost-device-vsock``, exchange the largest datagram (69,608 bytes) both ways in stream mode.
Then shared memory mirrored across the guests (``VSOCKCOMPAT_SHM_MODE=mirrored``, over vsock
streams): the SDK's sharedMemApp server in C here (the region's creator), its client in CID 4,
in C and in Python on both cores, with the SDK's texts, exit statuses and three readings; and a
C creator's 70,000-byte region attached, read whole and rewritten whole by CID 4, and a C
attacher to CID 4's region of that size writing 4,000 bytes at once (welcomes and updates cross
only in pieces).
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
import subprocess
import time

import pytest

from vsockcompat import clib
from vsockcompat.constants import VMCI_MAX_DG_PAYLOAD_SIZE as MAX
from vsockcompat.apps import sharedmem_app
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.handles import VMCIHandle
from vsockcompat.run import command

from guest_c_programs import ProbeProcess, build_programs, fnv1a, probe_pattern
from test_clib_shm import PROBE_SOURCE, Probe

from .conftest import BED_CID, SIBLING_CID, gate
from .guest_peer import SIBLING_RIDS, digest, pattern
from .test_cross_datagram import ask, guest_runtime  # noqa: F401  (a fixture)
from .test_cross_guests import SIBLING_WAIT, sibling_core  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.cross_vm, pytest.mark.timeout(900)]

WAIT = 120.0


@pytest.fixture(scope="module")
def c_programs(tmp_path_factory):
    """vsock_probe, sharedMemApp and test_clib_shm's probe built with this guest's cc, and the
    environment ``vsockcompat run`` gives them here (stream mode, context 3, regions mirrored)."""
    cc = clib.find_compiler()
    if cc is None:
        pytest.fail("no C compiler in the guest", pytrace=False)
    out = str(tmp_path_factory.mktemp("cguest"))
    shm_probe = os.path.join(out, "shm_probe.c")
    with open(shm_probe, "w") as f:
        f.write(PROBE_SOURCE)
    built = build_programs(cc, out, ["vsock_probe", "sharedMemApp", "shm_probe"], sources={"shm_probe": shm_probe})
    env = dict(os.environ, VSOCKCOMPAT_LIBVMCI=built["library"], VSOCKCOMPAT_TRANSPORT="vsock",
               VSOCKCOMPAT_VSOCK_MODE="stream", VSOCKCOMPAT_DS_AUTOSTART="0",
               VSOCKCOMPAT_RUNDIR=str(tmp_path_factory.mktemp("rundir")), VSOCKCOMPAT_CID=str(BED_CID),
               VSOCKCOMPAT_SHM_MODE="mirrored")
    return built, env


@pytest.fixture(scope="module")
def probe_cmd(c_programs):
    """What ``vsockcompat run`` would exec vsock_probe with."""
    built, env = c_programs
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


# Shared memory mirrored between the guests: a C creator here, attachers in CID 4.

#: Seconds for CID 4 to build the C sharedMemApp with its compiler (under TCG).
BUILD_WAIT = 600.0


def gate_or_fail():
    reason = gate()  # checked again right before a program that makes AF_VSOCK sockets starts
    if reason is not None:
        pytest.fail("the cross-VM gate is closed (%s): refusing to run an AF_VSOCK program" % reason,
                    pytrace=False)


def sibling_result(reply):
    """``(status, stdout, stderr)`` of a client CID 4 ran (``guest_peer.py``'s answer)."""
    assert not reply.payload.startswith(b"failed: "), reply.payload
    status, _, output = reply.payload.partition(b"\n")
    out, _, err = output.partition(b"\0")
    return int(status), out.decode(), err.decode()


def serve_shared_mem_app_here(c_programs, ep, greeter, client_command):
    """Run the C sharedMemApp server here while CID 4 (``greeter``) runs the client
    ``client_command``; see ``shared_mem_app_server_here``."""
    built, env = c_programs
    shared_mem_app_server_here(command([built["sharedMemApp"], "-s"], env), ep, greeter, client_command)


def shared_mem_app_server_here(server_cmd, ep, greeter, client_command):
    """Run a sharedMemApp server here (``server_cmd``: its argv and environment) while the peer
    ``greeter`` (CID 4's guest peer, or the host peer) runs the client ``client_command``; check
    the server's texts and status, and the client's: status 0, nothing on stderr, three readings
    of the time, in order (the region crossed the boundary). The client starts once the server
    wrote its first reading (its ``0.`` on stderr, a second after): the SDK's server announces
    itself before that write, and a client quick enough to attach in between reads zeros first."""
    argv, env = server_cmd
    gate_or_fail()
    server = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = server.stdout.readline()       # printed once "HOST TIME" is registered
        # One write of "0." (unbuffered in C, flushed in Python); read past the text layer, as
        # communicate() reads the rest.
        written = os.read(server.stderr.fileno(), 2).decode() if first else ""
        if (first, written) != ("Running shared memory server for 10 seconds.\n", "0."):
            rest, server_err = server.communicate(timeout=WAIT)
            pytest.fail("the server did not start: status %s, stdout %r, stderr %r"
                        % (server.returncode, first + rest, written + server_err), pytrace=False)
        ep.send(greeter, client_command)
        status, out, err = sibling_result(ep.recv(timeout=WAIT))
        rest, server_err = server.communicate(timeout=WAIT)
        server_err = written + server_err
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert (server.returncode, rest, server_err) == (0, "", "0.1.2.3.4.5.6.7.8.9.\n")
    assert (status, err) == (0, ""), out
    readings = out.splitlines()
    assert len(readings) == sharedmem_app.READINGS, out
    times = [time.strptime(line, sharedmem_app.TIME_FORMAT) for line in readings]
    assert times == sorted(times)


@pytest.fixture
def sibling(guest_runtime):
    """A datagram endpoint here and CID 4's endpoint (on its pure core) once it answers."""
    if os.environ.get("VSOCKCOMPAT_CROSS_SIBLING") != str(SIBLING_CID):
        pytest.skip("no second guest: run testbed/cross.py run --guests 2 ...")
    greeter = VMCIHandle(SIBLING_CID, SIBLING_RIDS["pure"])
    with DatagramEndpoint(runtime=guest_runtime) as ep:
        ask(ep, greeter, b"ping", ready_wait=SIBLING_WAIT)
        yield ep, greeter


def test_c_shared_mem_app_server_here_c_client_in_the_sibling(c_programs, sibling):
    ep, greeter = sibling
    ep.send(greeter, b"c-sharedmem-app build")
    assert ep.recv(timeout=BUILD_WAIT).payload == b"built"
    serve_shared_mem_app_here(c_programs, ep, greeter, b"c-sharedmem-app client")


def test_c_shared_mem_app_server_here_python_client_in_the_sibling(c_programs, sibling_core, guest_runtime):
    greeter = VMCIHandle(SIBLING_CID, SIBLING_RIDS[sibling_core])
    with DatagramEndpoint(runtime=guest_runtime) as ep:
        ask(ep, greeter, b"ping", ready_wait=SIBLING_WAIT)
        serve_shared_mem_app_here(c_programs, ep, greeter, b"sharedmem-app client")


class ShmProbe(Probe):
    """test_clib_shm's probe, executed here directly as ``vsockcompat run`` would."""

    def __init__(self, argv, env):
        gate_or_fail()
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)


#: Bytes of the region CID 4 reads and rewrites whole: beyond one piece, one block (64 KiB)
#: and the largest datagram.
REGION = 70000


def test_a_c_creators_region_crosses_to_the_sibling_whole_both_ways(c_programs, sibling_core, guest_runtime):
    """CID 4 attaches to a C region here (its whole contents come as UPDATE frames from the C
    server: in pieces, or the link stalls), hashes it, writes all of it and syncs (the C creator
    applied it all), detaches."""
    built, env = c_programs
    greeter = VMCIHandle(SIBLING_CID, SIBLING_RIDS[sibling_core])
    probe = ShmProbe(*command([built["shm_probe"]], env))
    try:
        assert probe("init") == "0"
        h = tuple(probe.ints("create %d" % REGION))
        assert h[0] == BED_CID
        assert probe("write %d %d 0 fromC" % h) == "ok"
        assert probe("write %d %d %d tail" % (h + (REGION - 10,))) == "ok"
        expected = bytearray(REGION)
        expected[:5], expected[REGION - 10:REGION - 6] = b"fromC", b"tail"
        with DatagramEndpoint(runtime=guest_runtime) as ep:
            ask(ep, greeter, b"ping", ready_wait=SIBLING_WAIT)
            ep.send(greeter, b"mirror-echo %d %d 1" % (h[1], REGION))
            assert ep.recv(timeout=WAIT).payload == digest(bytes(expected))
        written = pattern(REGION, 1)                  # byte i is (i + 1) % 256
        for offset in (64, 65856, 69952):             # where the pattern reads "ABCDE"
            assert probe("read %d %d %d 5" % (h + (offset,))) == "[%s]" % written[offset:offset + 5].decode()
        assert probe("detach %d %d" % h) == "0"
    finally:
        assert probe.close() == ""


#: A C attacher's one write: more than a piece (SIBLING_PIECE), within the probe's line.
C_WRITE = 4000


def test_a_c_attacher_to_a_sibling_region_reads_it_whole_and_writes_in_pieces(c_programs, sibling_core,
                                                                              guest_runtime):
    """The C attacher here gets CID 4's whole region (its welcome in pieces from Python), then
    writes 4,000 bytes at once: the C attacher's UPDATE frames cross only in pieces."""
    built, env = c_programs
    greeter = VMCIHandle(SIBLING_CID, SIBLING_RIDS[sibling_core])
    with DatagramEndpoint(runtime=guest_runtime) as ep:
        rid = int(ask(ep, greeter, b"mirror-offer %d 1" % REGION, ready_wait=SIBLING_WAIT).payload)
        h = (SIBLING_CID, rid)
        probe = ShmProbe(*command([built["shm_probe"]], env))
        try:
            assert probe("init") == "0"
            assert probe.ints("attach %d %d %d" % (h + (REGION,))) == [0, REGION, 0]
            offered = pattern(REGION, 1)
            for offset in (64, 65856, 69952):
                assert probe("read %d %d %d 5" % (h + (offset,))) == "[%s]" % offered[offset:offset + 5].decode()
            text = bytes(ord("0") + i % 10 for i in range(C_WRITE))
            assert probe("write %d %d 1000 %s" % (h + (text.decode(),))) == "ok"
            assert probe("detach %d %d" % h) == "0"           # flushes its writes first
        finally:
            assert probe.close() == ""
        expected = digest(offered[:1000] + text + offered[1000 + C_WRITE:])
        deadline = time.monotonic() + WAIT
        while True:
            ep.send(greeter, b"mirror-digest %d" % rid)
            got = ep.recv(timeout=WAIT).payload
            if got == expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        ep.send(greeter, b"mirror-drop %d" % rid)
        assert ep.recv(timeout=WAIT).payload == b"dropped"
        assert got == expected, "the C attacher's write never reached CID 4 whole"
