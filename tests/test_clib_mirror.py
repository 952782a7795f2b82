"""libvmci.so.0's mirrored shared memory (VMCISharedMem_* with VSOCKCOMPAT_SHM_MODE=mirrored,
src/vsc_mirror.c): the protocol of vsockcompat/mirror.py spoken by C, so a C attacher mirrors a
Python creator's region and a Python attacher a C creator's, on both cores, on the local
transport (the vsock run is tests/real_vsock/test_clib_mirror_vsock.py). The C peer is
test_clib_shm's line-driven probe."""
import os
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import PYTHON, child_env, make_settings
from test_clib_shm import PY_APP, Probe, build, c_app, markers, objects, serve
from test_clib_shm import cbuild, probe as shm_probe  # noqa: F401 (fixtures)
from test_clib import CC, SANITIZE, SANITIZER_ENV, SANITIZER_MARKS, SRC_DIR, _cc, _sanitizers_work, env_for
from test_mirror import CREATOR, closed_by_peer
from vsockcompat.constants import (SIBLING_PIECE, VMCI_ERROR_ALREADY_EXISTS, VMCI_ERROR_DEVICE_NOT_FOUND,
                                   VMCI_ERROR_INVALID_SIZE, VMCI_ERROR_NOT_FOUND,
                                   VMCI_SUCCESS)
from vsockcompat import constants as C, mirror_link, mirror_wire as W
from vsockcompat.handles import VMCIHandle
from vsockcompat.mirror import MirroredRegion
from vsockcompat.runtime import Runtime
from vsockcompat.sdk import VMCILibrary

pytestmark = [pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH, and CC unset"),
              pytest.mark.timeout(120)]
MIRRORED = {"VSOCKCOMPAT_SHM_MODE": "mirrored"}
#: Seconds within which a write must show on the other side (the contract: one 10 ms scan plus
#: transit; generous for a loaded machine).
WAIT = 20.0


@pytest.fixture
def pylib(core, rundir):
    """The Python SDK in context 3, regions mirrored, on the test's core."""
    lib = VMCILibrary(Runtime(make_settings(rundir, cid=3)._replace(shm_mode="mirrored"), core=core))
    assert lib.VMCI_InitApp(None) == VMCI_SUCCESS
    yield lib
    lib.VMCI_CleanupApp()


@pytest.fixture
def probe(shm_probe):
    """test_clib_shm's C probe (one command a line) with regions mirrored."""
    return lambda cid=2: shm_probe(cid=cid, **MIRRORED)


@pytest.fixture
def clean(rundir):
    """No shm object or marker is ever made, and no stream endpoint is left behind."""
    yield
    assert objects(rundir) == [] and markers(rundir) == []
    left = [n for cdir in os.listdir(rundir) if os.path.isdir(os.path.join(rundir, cdir))
            for n in os.listdir(os.path.join(rundir, cdir)) if ".mir" in n or n.startswith(".stream")]
    assert left == []


def eventually(predicate, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_c_attaches_to_a_python_creator(clean, probe, pylib, rundir):
    handle, view = pylib.VMCISharedMem_Create(100000)
    view[:7] = b"fromPy\0"
    view[99990:99995] = b"tail\0"
    c = probe(cid=2)
    assert c("init") == "0"
    assert c.ints("query %d %d" % handle) == [VMCI_SUCCESS, 100000]
    assert c.ints("attach %d %d 99999" % handle) == [VMCI_ERROR_INVALID_SIZE, 99999, 1]
    assert c.ints("attach %d %d 0" % handle) == [VMCI_SUCCESS, 100000, 0]   # 0 takes any size
    assert c.ints("attach %d %d 100000" % handle) == [VMCI_ERROR_ALREADY_EXISTS, 100000, 1]
    # The welcome carried the whole region, beyond the first 64 KiB block too.
    assert c("read %d %d 0 16" % handle) == "[fromPy]"
    assert c("read %d %d 99990 8" % handle) == "[tail]"
    # The creator's writes reach the C copy with no call on either side.
    view[70000:70006] = b"later\0"
    eventually(lambda: c("read %d %d 70000 8" % handle) == "[later]", "the creator's write never came")
    # The C attacher's plain stores reach the creator.
    assert c("write %d %d 500 fromC" % handle) == "ok"
    eventually(lambda: bytes(view[500:505]) == b"fromC", "the attacher's write never came")
    assert objects(rundir) == []                                     # no POSIX shm anywhere
    assert c("detach %d %d" % handle) == "0"
    assert c("detach %d %d" % handle) == str(VMCI_ERROR_NOT_FOUND)
    view.release()
    assert pylib.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    gone(c, handle)
    assert c.ints("attach %d %d 0" % handle) == [VMCI_ERROR_NOT_FOUND, 0, 1]


def test_python_attaches_to_a_c_creator(clean, probe, pylib, rundir):
    c = probe(cid=2)
    assert c("init") == "0"
    handle = tuple(c.ints("create 70000"))
    assert handle[0] == 2 and handle[1] >= 1024
    assert c("write %d %d 0 fromC" % handle) == "ok"
    assert c("write %d %d 69990 end" % handle) == "ok"
    assert pylib.VMCISharedMem_Query(handle) == (VMCI_SUCCESS, 70000)
    assert c.ints("query %d %d" % handle) == [VMCI_SUCCESS, 70000]
    rv, view = pylib.VMCISharedMem_Attach(handle, 69999)
    assert (rv, view) == (VMCI_ERROR_INVALID_SIZE, None)
    rv, view = pylib.VMCISharedMem_Attach(handle, 70000)
    assert rv == VMCI_SUCCESS and len(view) == 70000
    assert bytes(view[:6]) == b"fromC\0" and bytes(view[69990:69993]) == b"end"
    assert c("write %d %d 100 again" % handle) == "ok"
    eventually(lambda: bytes(view[100:105]) == b"again", "the C creator's write never came")
    view[66000:66006] = b"fromPy"
    eventually(lambda: c("read %d %d 66000 6" % handle) == "[fromPy]", "the Python write never came")
    # The creator detaches first: its process serves the attacher until it leaves.
    assert c("detach %d %d" % handle) == "0"
    assert c("detach %d %d" % handle) == str(VMCI_ERROR_NOT_FOUND)
    view[0:4] = b"stay"
    assert pylib.VMCISharedMem_Query(handle) == (VMCI_SUCCESS, 70000)
    view.release()
    assert pylib.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    eventually(lambda: pylib.VMCISharedMem_Query(handle) == (VMCI_ERROR_NOT_FOUND, 0),
               "the C creator kept serving after the last attacher left")


@pytest.fixture
def mirrored_rt(core, rundir):
    return Runtime(make_settings(rundir, cid=3)._replace(shm_mode="mirrored"), core=core)


def test_sync_is_a_flush_point_with_a_c_attacher(clean, probe, mirrored_rt):
    """No waiting: once the Python creator's sync() returns, the writes of both sides crossed."""
    with MirroredRegion.create(4096, runtime=mirrored_rt) as region:
        h = tuple(region.handle)
        c = probe(cid=2)
        assert c("init") == "0"
        assert c.ints("attach %d %d 4096" % h) == [VMCI_SUCCESS, 4096, 0]
        writes_cross_at_sync(c, h, region)
        assert c("detach %d %d" % h) == "0"
    gone(c, h)


def test_sync_is_a_flush_point_with_a_c_creator(clean, probe, mirrored_rt):
    c = probe(cid=2)
    assert c("init") == "0"
    h = tuple(c.ints("create 4096"))
    with MirroredRegion.attach(h, 4096, runtime=mirrored_rt) as region:
        writes_cross_at_sync(c, h, region)
    assert c("detach %d %d" % h) == "0"
    gone(c, h)


def py_gone(pylib, h):
    eventually(lambda: pylib.VMCISharedMem_Query(h) == (VMCI_ERROR_NOT_FOUND, 0), "the region outlived its users")


def gone(c, h):
    """Wait until the region h, whose users all detached, stops answering (its creator may still
    have been serving an attacher whose goodbye was on its way); its files go first."""
    eventually(lambda: c.ints("query %d %d" % tuple(h)) == [VMCI_ERROR_NOT_FOUND, 0], "the region outlived its users")


def writes_cross_at_sync(c, h, region):
    """The C side writes line 0, Python line 1, then Python syncs: each sees the other's, at once."""
    for i in range(5):
        assert c("write %d %d 0 c%d" % (h + (i,))) == "ok"
        region.buffer[64:67] = b"p%d\0" % i
        region.sync()
        assert bytes(region.buffer[:2]) == b"c%d" % i
        assert c("read %d %d 64 3" % h) == "[p%d]" % i


def test_privileges_bind_both_ways(clean, probe, pylib):
    """SM_ATTACH denied: a C creator refuses a Python attacher (at HELLO), a C attacher is refused
    a Python creator's region; the privileges are the runtime directory's, as on shared memory."""
    c = probe(cid=2)
    assert c("init") == "0"
    mine = VMCIHandle(*c.ints("create 64"))
    assert c("deny %d %d 3" % tuple(mine)) == "0"          # the C library knows its mirrored region
    assert pylib.VMCISharedMem_Attach(mine, 64)[0] == C.VMCI_ERROR_NO_ACCESS
    with mirror_link.connect(pylib._runtime, mirror_link.REGION, mine) as sock:   # past any check of ours
        sock.sendall(W.encode(W.HELLO, 0, struct.pack("<I", 3)))
        assert frames(read_to_end(sock)) == [(W.REFUSE, C.VMCI_ERROR_NO_ACCESS & (2 ** 64 - 1), b"")]
    theirs, view = pylib.VMCISharedMem_Create(64)
    assert pylib.VMCIResource_AddClientPrivileges(theirs, (2, 0), [], [C.VMCI_PRIV_SM_ATTACH]) == VMCI_SUCCESS
    assert c.ints("attach %d %d 0" % tuple(theirs)) == [C.VMCI_ERROR_NO_ACCESS, 0, 1]
    view.release()
    assert pylib.VMCISharedMem_Detach(theirs) == VMCI_SUCCESS
    assert c("detach %d %d" % tuple(mine)) == "0"


#: VMCIResource_AddClientPrivileges by a region's creator on its own mirrored region, in order:
#: (allow, deny, code), the same from C and from Python (vsockcompat/privileges.py's codes).
OWN_REGION_PRIVILEGES = (
    ((), (C.VMCI_PRIV_SM_ATTACH,), VMCI_SUCCESS),
    ((C.VMCI_PRIV_DG_SEND,), (), C.VMCI_ERROR_INVALID_PRIV),   # not a region's privilege
    ((), (C.VMCI_PRIV_ASSIGN_CLIENT,), C.VMCI_ERROR_INVALID_PRIV),
    ((99,), (), C.VMCI_ERROR_INVALID_PRIV),                   # names no privilege
    ((), (-1,), C.VMCI_ERROR_INVALID_PRIV),
    ((), (), C.VMCI_ERROR_INVALID_ARGS),                      # nothing to set
    ((C.VMCI_PRIV_CH_PRIV,) * 2, (), VMCI_SUCCESS),           # an owner's privilege, twice
)


def own_region_privileges_match(c, mine, pylib, theirs, client_of_c, client_of_py):
    """Each call of OWN_REGION_PRIVILEGES from the C creator of ``mine`` and the Python creator of
    ``theirs`` (each granting the other's context) gives the expected code; then the bad handles
    and counts. Leaves ``client_of_c`` denied SM_ATTACH on ``mine`` and the reverse."""
    for allow, deny, code in OWN_REGION_PRIVILEGES:
        assert c.priv(mine, client_of_c, allow, deny) == code, (allow, deny)
        assert pylib.VMCIResource_AddClientPrivileges(theirs, client_of_py, allow, deny) == code, (allow, deny)
    deny = (C.VMCI_PRIV_SM_ATTACH,)
    for bad in ((mine[0], mine[1] + 5000), (C.VMCI_INVALID_ID, C.VMCI_INVALID_ID)):
        assert c.priv(bad, client_of_c, (), deny) == C.VMCI_ERROR_INVALID_ARGS
        assert pylib.VMCIResource_AddClientPrivileges(bad, client_of_py, (), deny) == C.VMCI_ERROR_INVALID_ARGS
    invalid = (C.VMCI_INVALID_ID, C.VMCI_INVALID_ID)
    assert c.priv(mine, invalid, (), deny) == C.VMCI_ERROR_INVALID_ARGS
    assert pylib.VMCIResource_AddClientPrivileges(theirs, invalid, (), deny) == C.VMCI_ERROR_INVALID_ARGS
    for counts in ((-1, 1), (0, -1), (-5, 0)):                 # only C has counts
        assert c.priv(mine, client_of_c, (), deny, counts=counts) == C.VMCI_ERROR_INVALID_ARGS, counts


def denied_then_allowed(c, mine, pylib, theirs, view, client_of_c, client_of_py):
    """After own_region_privileges_match: each creator refuses the other's attach (NO_ACCESS at
    HELLO), then allows it again and the attach succeeds; both attachers detach (``view``, the
    Python creator's, is released; the creators stay)."""
    assert pylib.VMCISharedMem_Attach(mine, 64)[0] == C.VMCI_ERROR_NO_ACCESS
    assert c.ints("attach %d %d 0" % theirs) == [C.VMCI_ERROR_NO_ACCESS, 0, 1]
    assert c.priv(mine, client_of_c, (C.VMCI_PRIV_SM_ATTACH,)) == VMCI_SUCCESS
    assert pylib.VMCIResource_AddClientPrivileges(theirs, client_of_py, [C.VMCI_PRIV_SM_ATTACH]) == VMCI_SUCCESS
    rc, mapped = pylib.VMCISharedMem_Attach(mine, 64)
    assert rc == VMCI_SUCCESS and len(mapped) == 64
    assert c.ints("attach %d %d 0" % theirs) == [VMCI_SUCCESS, 64, 0]
    mapped.release()
    view.release()
    assert c("detach %d %d" % theirs) == "0"
    assert pylib.VMCISharedMem_Detach(mine) == VMCI_SUCCESS


def test_a_c_creator_sets_privileges_on_its_region_with_the_python_codes(clean, probe, pylib):
    """The C library's AddClientPrivileges on its own mirrored region answers what Python's does
    on its own, call for call, and both creators enforce the result at HELLO; allowing again
    lets the attacher in. Another context's region may not be changed (NO_ACCESS, as files tell)
    until its creator grants CH_PRIV."""
    c = probe(cid=2)
    assert c("init") == "0"
    mine = tuple(c.ints("create 64"))
    theirs, view = pylib.VMCISharedMem_Create(64)
    assert c.priv(theirs, (2, 0), (C.VMCI_PRIV_SM_ATTACH,)) == C.VMCI_ERROR_NO_ACCESS   # not its own
    assert pylib.VMCIResource_AddClientPrivileges(mine, (3, 0), [C.VMCI_PRIV_SM_ATTACH]) == C.VMCI_ERROR_NO_ACCESS
    own_region_privileges_match(c, mine, pylib, tuple(theirs), (3, 0), (2, 0))
    denied_then_allowed(c, mine, pylib, tuple(theirs), view, (3, 0), (2, 0))
    assert c.priv(theirs, (4, 0), (), (C.VMCI_PRIV_SM_ATTACH,)) == VMCI_SUCCESS   # CH_PRIV was granted
    assert pylib.VMCISharedMem_Detach(theirs) == VMCI_SUCCESS
    assert c("detach %d %d" % mine) == "0"


def test_two_c_attachers_see_each_others_writes_through_a_python_creator(clean, probe, pylib):
    handle, view = pylib.VMCISharedMem_Create(4096)
    a, b = probe(cid=2), probe(cid=4)
    for c in (a, b):
        assert c("init") == "0"
        assert c.ints("attach %d %d 4096" % handle) == [VMCI_SUCCESS, 4096, 0]
    assert a("write %d %d 0 fromA" % handle) == "ok"
    assert b("write %d %d 64 fromB" % handle) == "ok"   # its own line
    eventually(lambda: b("read %d %d 0 8" % handle) == "[fromA]", "A's write never reached B")
    eventually(lambda: a("read %d %d 64 8" % handle) == "[fromB]", "B's write never reached A")
    eventually(lambda: bytes(view[:5]) + bytes(view[64:69]) == b"fromAfromB", "the creator missed one")
    for c in (a, b):
        assert c("cleanup") == "ok"                     # CleanupApp detaches (flushes) all
    view.release()
    assert pylib.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    py_gone(pylib, handle)


def test_unknown_handles_and_codes(clean, probe, pylib):
    c = probe(cid=2)
    assert c("init") == "0"
    assert c.ints("query 3 99999") == [VMCI_ERROR_NOT_FOUND, 0]
    assert c.ints("attach 3 99999 0") == [VMCI_ERROR_NOT_FOUND, 0, 1]
    assert c.ints("query 77 1024") == [VMCI_ERROR_NOT_FOUND, 0]        # no such context
    assert c("detach 3 99999") == str(VMCI_ERROR_NOT_FOUND)
    assert c("create 0") == "invalid 1"


def test_a_killed_python_creator_gives_the_c_attacher_clean_errors(clean, probe, rundir, core):
    env = child_env(rundir, core.NAME, cid=3, **MIRRORED)
    child = subprocess.Popen([PYTHON, "-c", CREATOR, "4096"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        rid = int(child.stdout.readline())
        c = probe(cid=2)
        assert c("init") == "0"
        assert c.ints("attach 3 %d 4096" % rid) == [VMCI_SUCCESS, 4096, 0]
        assert c("read 3 %d 0 5" % rid) == "[alive]"
        eventually(lambda: c("read 3 %d 8 8" % rid) != "[]", "the creator's ticks never came")
        child.send_signal(signal.SIGKILL)
        child.wait(WAIT)
        assert c("read 3 %d 0 5" % rid) == "[alive]"                     # the last copy stays
        assert c("write 3 %d 100 orphan" % rid) == "ok"                 # writes go nowhere, no crash
        assert c.ints("query 3 %d" % rid) == [VMCI_ERROR_NOT_FOUND, 0]
        assert c("detach 3 %d" % rid) == "0"
        assert c.ints("attach 3 %d 0" % rid) == [VMCI_ERROR_NOT_FOUND, 0, 1]
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    reclaim(rundir, core, (3, rid))


def reclaim(rundir, core, handle):
    """A dead creator's files stay until an allocation of its id reclaims them."""
    assert "%d.mir" % handle[1] in os.listdir(os.path.join(rundir, "c%d" % handle[0]))
    runtime = Runtime(make_settings(rundir, cid=handle[0])._replace(shm_mode="mirrored"), core=core)
    with MirroredRegion.create(10, runtime=runtime, resource=handle[1]) as again:
        assert again.handle == handle


def test_a_killed_c_creator_gives_python_attachers_not_found(clean, probe, pylib, rundir, core):
    c = probe(cid=2)
    assert c("init") == "0"
    handle = tuple(c.ints("create 256"))
    assert c("write %d %d 0 hello" % handle) == "ok"
    rv, view = pylib.VMCISharedMem_Attach(handle, 256)
    assert rv == VMCI_SUCCESS and bytes(view[:5]) == b"hello"
    c.proc.kill()
    c.proc.wait()
    eventually(lambda: pylib.VMCISharedMem_Query(handle) == (VMCI_ERROR_NOT_FOUND, 0), "the query hung on")
    assert bytes(view[:5]) == b"hello"
    view.release()
    assert pylib.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    reclaim(rundir, core, handle)


@pytest.mark.slow
def test_shared_mem_app_c_server_with_c_and_python_clients(clean, cbuild, rundir, core):
    """sharedMemApp (vmci-sdk.md 7.2) with its region mirrored: the SDK texts, a new reading each second."""
    serve(c_app(cbuild, ["-s"]), env_for(rundir, core.NAME, cbuild.library, cid=2, **MIRRORED),
          [(c_app(cbuild, ["-c"]), env_for(rundir, core.NAME, cbuild.library, cid=3, **MIRRORED)),
           (PY_APP + ["-c"], child_env(rundir, core.NAME, cid=4, **MIRRORED))], rundir, core)


@pytest.mark.slow
def test_shared_mem_app_python_server_with_a_c_client(clean, cbuild, rundir, core):
    serve(PY_APP + ["-s"], child_env(rundir, core.NAME, cid=2, **MIRRORED),
          [(c_app(cbuild, ["-c"]), env_for(rundir, core.NAME, cbuild.library, cid=3, **MIRRORED))], rundir, core)


# C <-> C over the C vsock transport, on AF_VSOCK emulated over AF_UNIX (tests/c/vsock_emulation.c,
# linked into the probe: the host never opens a real AF_VSOCK socket)


@pytest.fixture(scope="module")
def emulated_probe(cbuild):
    exe = cbuild.shm_probe + "_emu"
    _cc(["-Wall", "-Wextra", "-rdynamic", "-I", SRC_DIR, cbuild.shm_probe + ".c",
         os.path.join(os.path.dirname(os.path.abspath(__file__)), "c", "vsock_emulation.c"),
         "-o", exe, "-L", cbuild.lib_dir, "-lvmci", "-ldl", "-pthread"], os.path.dirname(exe))
    return exe


class DirectProbe(Probe):
    """The probe executed directly with env (no ``vsockcompat run``, whose Python checks settings
    first); ``exe`` is its path, or a command line ending with it (under valgrind, say)."""

    def __init__(self, exe, env):
        self.proc = subprocess.Popen([exe] if isinstance(exe, str) else list(exe), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)


def EmulatedProbe(exe, rundir, library, emu_dir, kcid):
    """The probe in a kernel of CID kcid on the emulated vsock, regions mirrored (auto)."""
    env = env_for(rundir, "pure", library)
    env.update(LD_LIBRARY_PATH=os.path.dirname(library), VSOCKCOMPAT_TRANSPORT="vsock",
               VSOCK_EMU_DIR=emu_dir, VSOCK_EMU_CID=str(kcid), VSOCKCOMPAT_DS_AUTOSTART="0",
               VSOCK_EMU_SENDS=os.path.join(emu_dir, "sends"))
    return DirectProbe(exe, env)


@pytest.mark.parametrize("kcids", [(1, 1), (3, 4)], ids=["loopback", "sibling-guests"])
def test_c_creator_and_c_attacher_over_emulated_vsock(cbuild, emulated_probe, rundir, tmp_path, kcids):
    """Between two guests (CIDs 3 and 4) every send() is cut to VSC_SIBLING_PIECE bytes."""
    emu = str(tmp_path / "emu")
    os.mkdir(emu)
    a = EmulatedProbe(emulated_probe, rundir, cbuild.library, emu, kcids[0])
    b = EmulatedProbe(emulated_probe, rundir, cbuild.library, emu, kcids[1])
    try:
        assert a("init") == b("init") == "0"
        h = tuple(a.ints("create 200000"))
        assert h[0] == kcids[0] and h[1] >= 1024
        assert a("write %d %d 150000 fromA" % h) == "ok"
        assert b.ints("query %d %d" % h) == [VMCI_SUCCESS, 200000]
        assert b.ints("attach %d %d 1" % h) == [VMCI_ERROR_INVALID_SIZE, 1, 1]
        assert b.ints("attach %d %d 200000" % h) == [VMCI_SUCCESS, 200000, 0]
        assert b("read %d %d 150000 5" % h) == "[fromA]"
        assert b("write %d %d 0 fromB" % h) == "ok"
        eventually(lambda: a("read %d %d 0 5" % h) == "[fromB]", "B's write never reached the creator")
        assert a("write %d %d 199990 last" % h) == "ok"
        eventually(lambda: b("read %d %d 199990 4" % h) == "[last]", "A's write never reached B")
        assert b.ints("query %d 4242" % h[0]) == [VMCI_ERROR_NOT_FOUND, 0]
        assert a("detach %d %d" % h) == "0"
        assert b.ints("query %d %d" % h) == [VMCI_SUCCESS, 200000]   # served until B leaves
        assert b("detach %d %d" % h) == "0"
        eventually(lambda: b.ints("query %d %d" % h) == [VMCI_ERROR_NOT_FOUND, 0], "served after the last left")
    finally:
        errors = a.close(), b.close()
    assert errors == ("", "")
    with open(os.path.join(emu, "sends")) as f:
        sends = [int(line.split()[1]) for line in f]
    if kcids == (3, 4):
        assert max(sends) == SIBLING_PIECE                      # the 200000-byte welcome, cut
    else:
        assert max(sends) > 200000                              # written whole


def test_a_bad_shm_mode_refuses_init(cbuild, rundir):
    env = env_for(rundir, "pure", cbuild.library, VSOCKCOMPAT_SHM_MODE="mirror")
    c = DirectProbe(cbuild.shm_probe, dict(env, LD_LIBRARY_PATH=cbuild.lib_dir))
    assert c("init") == str(VMCI_ERROR_DEVICE_NOT_FOUND)   # as for any bad setting
    assert c.close() == ""


@pytest.mark.parametrize("sanitized", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["plain", "sanitizers"])
def test_threads_fork_and_teardown(clean, tmp_path, shm_probe, pylib, sanitized):
    """Both sides' threads, a forked child, CleanupApp; also under ASan/UBSan (leaks included)."""
    extra = {}
    if sanitized:
        reason = _sanitizers_work(str(tmp_path))
        if reason:
            pytest.skip(reason)
        extra = dict(build=build(str(tmp_path), SANITIZE), **SANITIZER_ENV)
    c = shm_probe(**extra, **MIRRORED)
    assert c("init") == "0"
    assert c("create 0") == "invalid 1"
    mine = "%d %d" % tuple(c.ints("create 300"))
    assert c("write %s 0 parent" % mine) == "ok"
    handle, view = pylib.VMCISharedMem_Create(100000)
    theirs = "%d %d" % tuple(handle)
    assert c.ints("attach %s 7" % theirs) == [VMCI_ERROR_INVALID_SIZE, 7, 1]
    assert c.ints("attach %s 0" % theirs) == [0, 100000, 0]
    assert c("write %s 99990 12345678" % theirs) == "ok"
    eventually(lambda: bytes(view[99990:99998]) == b"12345678", "the write never came")
    assert c("detach %s" % theirs) == "0"
    # A forked child forgets the parent's regions, then attaches to the parent's own as a peer.
    assert c("fork " + mine) == "0"
    eventually(lambda: c("read %s 0 300" % mine) == "[child!]", "the child's write never came")
    assert c("threads " + theirs) == "0"
    assert c.ints("detach 2 5000") == [VMCI_ERROR_NOT_FOUND]
    assert c("cleanup") == "ok"
    view.release()
    assert pylib.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    py_gone(pylib, handle)
    err = c.close()
    assert not [m for m in SANITIZER_MARKS if m in err], err
    assert err == ""


# Bad peers: whatever a peer sends, the C side answers with a clean code or drops it, never
# crashes or hangs, and keeps serving the others.


def read_to_end(sock):
    sock.settimeout(WAIT)
    return closed_by_peer(sock)


def frames(data):
    return [(f.type, f.arg, bytes(f.payload)) for f in W.FrameReader().feed(data)]


def test_a_c_creator_drops_bad_peers_and_keeps_serving(clean, probe, mirrored_rt):
    c = probe(cid=2)
    assert c("init") == "0"
    h = VMCIHandle(*c.ints("create 4096"))
    assert c("write %d %d 0 keep" % tuple(h)) == "ok"

    def session(data):
        with mirror_link.connect(mirrored_rt, mirror_link.REGION, h) as sock:
            sock.sendall(data)
            return frames(read_to_end(sock))
    me = struct.pack("<I", 3)
    assert session(b"\0" * W.HEADER.size) == []                                 # not a frame
    assert session(W.HEADER.pack(W.MAGIC, 99, 0, 0, 0, 0)) == []                # unknown type
    assert session(W.HEADER.pack(W.MAGIC, W.HELLO, 1, 0, 0, 4) + me) == []     # reserved bits
    assert session(W.encode(W.HELLO, 0, b"xx")) == []                           # short HELLO
    assert session(W.encode(W.UPDATE, 0, b"x")) == []                           # out of turn
    assert session(W.encode(W.QUERY, 0, b"x")) == []
    assert session(W.encode(W.HELLO, 0, struct.pack("<I", 7))) == [(W.REFUSE, C.VMCI_ERROR_NO_ACCESS & (2 ** 64 - 1),
                                                                  b"")]        # not our context
    assert session(W.encode(W.HELLO, 5, me)) == [(W.REFUSE, C.VMCI_ERROR_INVALID_SIZE & (2 ** 64 - 1), b"")]
    # Attached, then an update beyond the region: the welcome, then dropped.
    got = session(W.encode(W.HELLO, 4096, me) + W.encode(W.UPDATE, 4090, b"12345678"))
    assert [t for t, _, _ in got] == [W.SIZE, W.UPDATE, W.FLUSHED]
    assert got[1][2][:4] == b"keep"
    got = session(W.encode(W.HELLO, 0, me) + W.encode(W.BYE, 0, b"x"))        # a BYE with a payload
    assert [t for t, _, _ in got] == [W.SIZE, W.UPDATE, W.FLUSHED]
    # A connection that says nothing is dropped after the hello timeout; meanwhile others are served.
    with mirror_link.connect(mirrored_rt, mirror_link.REGION, h) as silent:
        assert session(W.encode(W.QUERY)) == [(W.SIZE, 4096, b"")]
        with MirroredRegion.attach(h, 4096, runtime=mirrored_rt) as region:
            assert bytes(region.buffer[:4]) == b"keep"
        assert read_to_end(silent) == b""
    assert c("detach %d %d" % tuple(h)) == "0"


@pytest.fixture
def fake_creator(rundir):
    """A listener where a region (3, 5000) of the local transport would be: ``serve(reply)`` answers
    the next connection's first bytes with reply (bytes, or a function of the received frame) and
    closes it, on a thread."""
    os.makedirs(os.path.join(rundir, "c3"), exist_ok=True)
    path = os.path.join(rundir, "c3", "5000.mir.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    threads = []

    def serve(reply, hold=0.0):
        def run():
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(WAIT)
                data = conn.recv(64)
                conn.sendall(reply(W.FrameReader().feed(data)[0]) if callable(reply) else reply)
                time.sleep(hold)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)
    yield serve
    for t in threads:
        t.join(WAIT)
    listener.close()
    os.unlink(path)


def test_a_c_attacher_gets_clean_codes_from_a_bad_creator(clean, probe, fake_creator):
    c = probe(cid=2)
    assert c("init") == "0"
    welcome = W.encode(W.SIZE, 4096) + W.encode(W.FLUSHED, 0)
    for reply, code in ((b"garbage that is not a frame", C.VMCI_ERROR_GENERIC),
                        (W.encode(W.SIZE, 0) + W.encode(W.FLUSHED, 0), C.VMCI_ERROR_GENERIC),
                        (W.encode(W.FLUSHED, 0), C.VMCI_ERROR_GENERIC),                    # out of turn
                        (W.encode(W.SIZE, 1 << 33) + W.encode(W.FLUSHED, 0), VMCI_ERROR_INVALID_SIZE),
                        (W.encode(W.SIZE, 4096) + W.encode(W.UPDATE, 4095, b"xx"), C.VMCI_ERROR_GENERIC),
                        (W.encode_code(W.REFUSE, C.VMCI_ERROR_NO_ACCESS), C.VMCI_ERROR_NO_ACCESS),
                        (W.encode(W.REFUSE, 5), C.VMCI_ERROR_GENERIC),                     # not a code
                        (W.encode(W.SIZE, 4096), VMCI_ERROR_NOT_FOUND),                    # closed early
                        (welcome[:30], VMCI_ERROR_NOT_FOUND)):                             # cut in a frame
        fake_creator(reply)
        assert c.ints("attach 3 5000 0") == [code, 0, 1], reply
    for reply, code in ((b"junk" * 10, C.VMCI_ERROR_GENERIC), (W.encode(W.UPDATE, 0, b"x"), C.VMCI_ERROR_GENERIC),
                        (W.encode(W.SIZE, 1 << 33), VMCI_ERROR_INVALID_SIZE), (b"", VMCI_ERROR_NOT_FOUND)):
        fake_creator(reply)
        assert c.ints("query 3 5000") == [code, 0], reply
    # Attached, then garbage: the attacher's copy stays, its calls still answer.
    fake_creator(lambda hello: W.encode(W.SIZE, 4096) + W.encode(W.UPDATE, 0, b"seen")
                 + W.encode(W.FLUSHED, 0) + b"\xff" * 40, hold=0.5)
    assert c.ints("attach 3 5000 4096") == [VMCI_SUCCESS, 4096, 0]
    assert c("read 3 5000 0 4") == "[seen]"
    assert c("write 3 5000 0 more") == "ok"
    assert c("detach 3 5000") == "0"
    # The HELLO a C attacher sends: its asked size and its context.
    fake_creator(lambda hello: W.encode(W.SIZE, hello.arg) + W.encode(W.FLUSHED, 0)
                 + W.encode(W.UPDATE, 0, bytes(hello.payload)) if hello.type == W.HELLO else b"")
    assert c.ints("attach 3 5000 100") == [VMCI_SUCCESS, 100, 0]
    eventually(lambda: c("read 3 5000 0 1") == "[\x02]", "the HELLO did not carry context 2")
    assert c("detach 3 5000") == "0"
