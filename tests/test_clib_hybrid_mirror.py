"""libvmci.so.0's mirrored regions on the hybrid transport (src/vsc_mirror*.c over src/vsc_hybrid.c),
on the host only: mirror_link.py's ports, paths, handshake and codes, spoken by C.

A C creator listens at ``<uds>_<rid>`` (where the VMM delivers its guest's connections) and
``<uds>_<rid>.host``; an attacher of a guest's region goes through the VMM (``CONNECT <rid>``).
The "guest" is this machine behind a fake VMM that loops each connection back to ``<uds>_<port>``
(test_hybrid.LoopbackGuest), so an attacher of ``(GUEST, rid)`` reaches the host's creator as the
guest would, and the creator sees it as the guest. C programs run under tests/c/no_vsock_shim.c,
whose records must stay empty; the C peer is test_clib_shm's line-driven probe.
"""
import os
import shutil
import time
import types

import pytest

from vsockcompat import constants as C
from vsockcompat.constants import (VMCI_ERROR_DST_UNREACHABLE, VMCI_ERROR_INVALID_SIZE, VMCI_ERROR_NO_ACCESS,
                                   VMCI_ERROR_NOT_FOUND, VMCI_ERROR_TIMEOUT, VMCI_SUCCESS)
from vsockcompat.runtime import Runtime
from vsockcompat.sdk import VMCILibrary

from test_clib_hybrid import c_env, py_env, shim_log, wait_registered  # noqa: F401  (fixture: shim_log)
from test_clib_mirror import DirectProbe, eventually
from test_clib_shm import PY_APP, cbuild, serve  # noqa: F401  (fixture: cbuild)
from test_clib_vsock_guard import guarded  # noqa: F401  (fixture: the shim)
from test_hybrid import GUEST, hybrid_settings, looped, no_af_vsock  # noqa: F401  (fixtures: looped, no_af_vsock)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def built(cbuild, guarded):
    """test_clib_shm's library and programs, with test_clib_vsock_guard's shim (for c_env)."""
    return types.SimpleNamespace(library=cbuild.library, lib_dir=cbuild.lib_dir, shim=guarded.shim)


@pytest.fixture
def c_on(cbuild, built, rundir, shim_log):
    """``c_on(uds, **env)``: test_clib_shm's probe on hybrid under the shim, initialised; each
    quits with a quiet stderr at teardown."""
    started = []

    def start(uds, wrap=(), **extra):
        probe = DirectProbe(list(wrap) + [cbuild.shm_probe], c_env(built, rundir, uds, shim_log, **extra))
        started.append(probe)
        assert probe("init") == "0"
        return probe
    yield start
    for probe in started:
        assert probe.close() == ""
        assert probe.proc.returncode == 0  # valgrind's 99: a memory error or a definite leak


@pytest.fixture
def pylib(core, rundir, looped):
    """The Python SDK on the host's hybrid transport (context 2), regions mirrored (auto)."""
    lib = VMCILibrary(Runtime(hybrid_settings(rundir, looped.path), core=core))
    assert lib.VMCI_InitApp(None) == VMCI_SUCCESS
    yield lib
    lib.VMCI_CleanupApp()


def paths_of(uds, rid):
    return ["%s_%d%s" % (uds, rid, suffix) for suffix in ("", ".host")]


def test_a_python_guest_attacher_mirrors_a_c_creator(looped, c_on, pylib):
    c = c_on(looped.path)
    handle = tuple(c.ints("create 70000"))
    rid = handle[1]
    assert handle[0] == 2 and rid >= 1024 and all(os.path.exists(p) for p in paths_of(looped.path, rid))
    assert c("write 2 %d 0 fromC" % rid) == "ok"
    assert pylib.VMCISharedMem_Query((GUEST, rid)) == (VMCI_SUCCESS, 70000)  # the guest's view of it
    rv, view = pylib.VMCISharedMem_Attach((GUEST, rid), 70000)
    assert rv == VMCI_SUCCESS and bytes(view[:6]) == b"fromC\0"
    assert looped.connects == [rid, rid]  # the query, then the attach: through the VMM
    view[66000:66006] = b"fromPy"
    eventually(lambda: c("read 2 %d 66000 6" % rid) == "[fromPy]", "the guest's write never came")
    assert c("write 2 %d 100 again" % rid) == "ok"
    eventually(lambda: bytes(view[100:105]) == b"again", "the C creator's write never came")
    # A host process reaches the same region at its .host path, not through the VMM.
    rv, host_view = pylib.VMCISharedMem_Attach(handle, 0)
    assert rv == VMCI_SUCCESS and bytes(host_view[66000:66006]) == b"fromPy" and looped.connects == [rid, rid]
    host_view.release()
    assert pylib.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    # The creator detaches first; its process serves the attacher until it leaves, then the paths go.
    assert c("detach 2 %d" % rid) == "0"
    assert c("detach 2 %d" % rid) == str(VMCI_ERROR_NOT_FOUND)
    view.release()
    assert pylib.VMCISharedMem_Detach((GUEST, rid)) == VMCI_SUCCESS
    eventually(lambda: not any(os.path.exists(p) for p in paths_of(looped.path, rid)),
               "the C creator's paths outlived its last user")
    assert pylib.VMCISharedMem_Query((GUEST, rid)) == (VMCI_ERROR_NOT_FOUND, 0)


def test_a_c_guest_attacher_mirrors_a_python_creator(looped, c_on, pylib):
    handle, view = pylib.VMCISharedMem_Create(100000)
    rid = handle[1]
    view[:7] = b"fromPy\0"
    view[99990:99995] = b"tail\0"
    c = c_on(looped.path)
    assert c.ints("query %d %d" % (GUEST, rid)) == [VMCI_SUCCESS, 100000]
    assert c.ints("attach %d %d 0" % (GUEST, rid)) == [VMCI_SUCCESS, 100000, 0]
    assert looped.connects == [rid, rid]
    assert c("read %d %d 99990 8" % (GUEST, rid)) == "[tail]"
    view[70000:70006] = b"later\0"
    eventually(lambda: c("read %d %d 70000 8" % (GUEST, rid)) == "[later]", "the creator's write never came")
    assert c("write %d %d 500 fromC" % (GUEST, rid)) == "ok"
    eventually(lambda: bytes(view[500:505]) == b"fromC", "the attacher's write never came")
    # The host's own handle: at the .host path, no VMM.
    assert c.ints("attach 2 %d 100000" % rid) == [VMCI_SUCCESS, 100000, 0]
    assert c("read 2 %d 500 5" % rid) == "[fromC]" and looped.connects == [rid, rid]
    for cid in (GUEST, 2):
        assert c("detach %d %d" % (cid, rid)) == "0"
    assert c("detach %d %d" % (GUEST, rid)) == str(VMCI_ERROR_NOT_FOUND)  # a detached handle
    view.release()
    assert pylib.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    eventually(lambda: c.ints("attach %d %d 0" % (GUEST, rid))[0] == VMCI_ERROR_NOT_FOUND,
               "the Python creator kept serving after its users left")


@pytest.mark.parametrize("answer, code", [
    ("close", VMCI_ERROR_NOT_FOUND),               # the VMM closes at once: nothing listens there
    (b"ERR no listener\n", VMCI_ERROR_DST_UNREACHABLE),
    (b"OK\n", VMCI_ERROR_DST_UNREACHABLE),
    (b"OK x\n", VMCI_ERROR_DST_UNREACHABLE),
    (b"A" * 100, VMCI_ERROR_DST_UNREACHABLE),
], ids=["closes", "err", "no-port", "not-a-port", "garbage"])
def test_bad_handshakes_give_python_codes(looped, c_on, pylib, answer, code):
    handle, view = pylib.VMCISharedMem_Create(64)
    rid = handle[1]
    looped.answer = lambda port: answer
    c = c_on(looped.path)
    assert c.ints("attach %d %d 64" % (GUEST, rid)) == [code, 64, 1]
    assert c.ints("query %d %d" % (GUEST, rid)) == [code, 0]
    assert pylib.VMCISharedMem_Attach((GUEST, rid), 64) == (code, None)  # what Python says
    looped.answer = lambda port: "ok"
    assert c.ints("attach %d %d 64" % (GUEST, rid)) == [VMCI_SUCCESS, 64, 0]  # and it goes on
    assert c("detach %d %d" % (GUEST, rid)) == "0"
    view.release()
    assert pylib.VMCISharedMem_Detach(handle) == VMCI_SUCCESS


def test_a_silent_vmm_is_a_timeout(looped, c_on, pylib):
    handle, view = pylib.VMCISharedMem_Create(64)
    looped.answer = lambda port: "silent"
    c = c_on(looped.path)
    started = time.monotonic()
    assert c.ints("attach %d %d 64" % (GUEST, handle[1])) == [VMCI_ERROR_TIMEOUT, 64, 1]
    assert time.monotonic() - started < 3 * 10  # mirror_link.CONNECT_TIMEOUT (10 s), with room
    view.release()
    assert pylib.VMCISharedMem_Detach(handle) == VMCI_SUCCESS


def test_unreachable_and_wrong_regions(core, rundir, tmp_path, looped, c_on, pylib):
    """No VMM socket, a CID behind no socket, a wrong size, a host region nobody serves: the codes
    of Python's hybrid transport."""
    nothing = str(tmp_path / "nothing.vsock")
    lonely = c_on(nothing)
    py_lonely = VMCILibrary(Runtime(hybrid_settings(rundir, nothing), core=core))
    assert py_lonely.VMCI_InitApp(None) == VMCI_SUCCESS
    try:
        for cid in (GUEST, 4):  # no VMM listens; a CID behind none of the sockets
            assert lonely.ints("attach %d 5000 0" % cid) == [VMCI_ERROR_DST_UNREACHABLE, 0, 1]
            assert py_lonely.VMCISharedMem_Attach((cid, 5000), 0) == (VMCI_ERROR_DST_UNREACHABLE, None)
        assert lonely.ints("attach 2 5000 0") == [VMCI_ERROR_NOT_FOUND, 0, 1]
        assert py_lonely.VMCISharedMem_Attach((2, 5000), 0) == (VMCI_ERROR_NOT_FOUND, None)
    finally:
        py_lonely.VMCI_CleanupApp()
    c = c_on(looped.path)
    rid = c.ints("create 128")[1]
    assert c.ints("attach %d %d 0" % (4, rid)) == [VMCI_ERROR_DST_UNREACHABLE, 0, 1]  # another CID's region
    assert pylib.VMCISharedMem_Attach((GUEST, rid), 127) == (VMCI_ERROR_INVALID_SIZE, None)
    other = c_on(looped.path)
    assert other.ints("attach %d %d 129" % (GUEST, rid)) == [VMCI_ERROR_INVALID_SIZE, 129, 1]
    assert c("detach 2 %d" % rid) == "0"
    eventually(lambda: other.ints("attach %d %d 128" % (GUEST, rid))[0] == VMCI_ERROR_NOT_FOUND,
               "a detached region still answered")


def test_privileges_hold_on_hybrid_both_ways(looped, c_on, pylib):
    """SM_ATTACH denied to the guest: its attach through the VMM is refused (NO_ACCESS), the host's
    own at .host is not; a C creator's denial binds a Python guest, a Python creator's a C one."""
    c = c_on(looped.path)
    mine = tuple(c.ints("create 256"))
    assert c("deny 2 %d %d" % (mine[1], GUEST)) == "0"
    assert pylib.VMCISharedMem_Attach((GUEST, mine[1]), 256) == (VMCI_ERROR_NO_ACCESS, None)
    rv, view = pylib.VMCISharedMem_Attach(mine, 256)
    assert rv == VMCI_SUCCESS
    view.release()
    assert pylib.VMCISharedMem_Detach(mine) == VMCI_SUCCESS
    theirs, region = pylib.VMCISharedMem_Create(256)
    assert pylib.VMCIResource_AddClientPrivileges(theirs, (GUEST, 0), [], [C.VMCI_PRIV_SM_ATTACH]) == VMCI_SUCCESS
    assert c.ints("attach %d %d 256" % (GUEST, theirs[1])) == [VMCI_ERROR_NO_ACCESS, 256, 1]
    assert c.ints("attach 2 %d 256" % theirs[1]) == [VMCI_SUCCESS, 256, 0]
    assert c("detach 2 %d" % theirs[1]) == "0"
    assert c("detach 2 %d" % mine[1]) == "0"
    region.release()
    assert pylib.VMCISharedMem_Detach(theirs) == VMCI_SUCCESS


def test_shared_mode_keeps_the_codes_of_no_shared_memory(looped, c_on):
    c = c_on(looped.path, VSOCKCOMPAT_SHM_MODE="shared")
    assert c("create 128") == "invalid 1"
    assert c.ints("attach %d 5000 128" % GUEST) == [C.VMCI_ERROR_UNAVAILABLE, 128, 1]
    assert looped.connects == []


@pytest.mark.parametrize("server_side", ["c", "python"])
def test_shared_mem_app_between_c_and_python_on_hybrid(cbuild, built, core, rundir, looped, shim_log, server_side):
    """sharedMemApp (vmci-sdk.md 7.2) on the host's hybrid transport, its region mirrored (auto):
    a C server with a Python client, and back; the C side starts the hybrid discovery daemon."""
    c_cmd, c_environ = [cbuild.sharedMemApp], c_env(built, rundir, looped.path, shim_log, VSOCKCOMPAT_DS_AUTOSTART="1")
    py_environ = py_env(rundir, core.NAME, looped.path)
    server_cmd, server_env = (c_cmd, c_environ) if server_side == "c" else (PY_APP, py_environ)
    client_cmd, client_env = (PY_APP, py_environ) if server_side == "c" else (c_cmd, c_environ)
    if server_side == "python":
        py_environ["VSOCKCOMPAT_DS_AUTOSTART"] = "1"
    serve(server_cmd + ["-s"], server_env, [(client_cmd + ["-c"], client_env)], rundir, core,
          registered=lambda: wait_registered(rundir, looped.path, core, "HOST TIME"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_a_hybrid_mirror_session_under_valgrind(looped, c_on, pylib):
    """A C creator with a Python guest attacher, a C guest attacher of a Python region, a refused
    handshake: no memory error and no definite leak (valgrind's exit status 99, checked at teardown)."""
    # A creator's thread serves until its attacher's BYE arrives: a thread the quitting probe may
    # leave is no leak (its stack is "possibly lost"), so only definite leaks are shown and count.
    wrap = ["valgrind", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite",
            "--show-possibly-lost=no", "--quiet"]
    c = c_on(looped.path, wrap=wrap)
    rid = c.ints("create 4096")[1]
    rv, view = pylib.VMCISharedMem_Attach((GUEST, rid), 4096)
    assert rv == VMCI_SUCCESS
    view[10:14] = b"pyth"
    eventually(lambda: c("read 2 %d 10 4" % rid) == "[pyth]", "the guest's write never came")
    theirs, region = pylib.VMCISharedMem_Create(4096)
    assert c.ints("attach %d %d 4096" % (GUEST, theirs[1])) == [VMCI_SUCCESS, 4096, 0]
    assert c("write %d %d 0 fromC" % (GUEST, theirs[1])) == "ok"
    eventually(lambda: bytes(region[:5]) == b"fromC", "the C attacher's write never came")
    looped.answer = lambda port: "close"
    assert c.ints("attach %d 5000 64" % GUEST) == [VMCI_ERROR_NOT_FOUND, 64, 1]
    assert c("detach %d %d" % (GUEST, theirs[1])) == "0"
    view.release()
    region.release()
    assert pylib.VMCISharedMem_Detach((GUEST, rid)) == VMCI_SUCCESS
    assert pylib.VMCISharedMem_Detach(theirs) == VMCI_SUCCESS
    assert c("detach 2 %d" % rid) == "0"
