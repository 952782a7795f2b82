"""libvmci.so.0's mirrored shared memory over real AF_VSOCK streams, inside the guest test bed
only (marker ``vsock``): a C attacher to a Python creator's region and a Python attacher to a C
creator's, on both cores, with ``VSOCKCOMPAT_SHM_MODE`` unset (``auto`` mirrors on vsock). The C
peer is test_clib_shm's line-driven probe, built with the guest's compiler and executed directly
(``LD_LIBRARY_PATH``; a Python start under TCG is slow), its gate checked right before.

Run them:  flock /tmp/vsc-guest.lock python3 testbed/guest.py run --timeout 900 -- env PYTHONPATH=$PWD \
               python3 -m pytest tests/real_vsock/test_clib_mirror_vsock.py -m vsock -rs -x
"""
import os
import subprocess
import time

import pytest

from vsockcompat import clib
from vsockcompat import constants as C
from vsockcompat.constants import (VMCI_ERROR_INVALID_SIZE, VMCI_ERROR_NOT_FOUND, VMCI_SUCCESS)
from vsockcompat.errors import InvalidSize
from vsockcompat.mirror import MirroredRegion
from vsockcompat.sdk import VMCILibrary
from vsockcompat.sharedmem import SharedRegion, query

from test_clib_mirror import denied_then_allowed, own_region_privileges_match
from test_clib_shm import Probe, build

from .conftest import VMADDR_CID_LOCAL
from .test_mirror_vsock import rt  # noqa: F401 (the fixture: a vsock runtime in context 2, mirrored)
from .test_preload import _require_gate

pytestmark = [pytest.mark.vsock, pytest.mark.timeout(600)]
WAIT = 60.0


@pytest.fixture(scope="module")
def cbuild(tmp_path_factory):
    if clib.find_compiler() is None:
        pytest.skip("no C compiler in the guest")
    return build(str(tmp_path_factory.mktemp("cmirror")))


class DirectProbe(Probe):
    """The probe on the vsock transport, executed directly (no ``vsockcompat run``)."""

    def __init__(self, program, rundir, library):
        _require_gate()
        env = dict(os.environ, VSOCKCOMPAT_RUNDIR=rundir, VSOCKCOMPAT_TRANSPORT="vsock", VSOCKCOMPAT_CID="2",
                   VSOCKCOMPAT_DS_AUTOSTART="0", LD_LIBRARY_PATH=os.path.dirname(library))
        env.pop("VSOCKCOMPAT_SHM_MODE", None)
        env.pop("LD_PRELOAD", None)
        self.proc = subprocess.Popen([program], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)


@pytest.fixture
def probe(cbuild, rundir):
    p = DirectProbe(cbuild.shm_probe, rundir, cbuild.library)
    assert p("init") == "0"
    yield p
    assert p.close() == ""


def eventually(predicate, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_c_attacher_mirrors_a_python_region_over_vsock(rt, probe):
    with SharedRegion.create(70000, runtime=rt) as region:
        assert isinstance(region, MirroredRegion)
        h = tuple(region.handle)
        assert h[0] == VMADDR_CID_LOCAL
        region.buffer[:6] = b"fromPy"
        region.buffer[69990:69994] = b"tail"
        assert probe.ints("query %d %d" % h) == [VMCI_SUCCESS, 70000]
        assert probe.ints("attach %d %d 69999" % h) == [VMCI_ERROR_INVALID_SIZE, 69999, 1]
        assert probe.ints("attach %d %d 0" % h) == [VMCI_SUCCESS, 70000, 0]
        assert probe("read %d %d 0 6" % h) == "[fromPy]"
        assert probe("read %d %d 69990 4" % h) == "[tail]"
        region.buffer[66000:66005] = b"later"
        eventually(lambda: probe("read %d %d 66000 5" % h) == "[later]", "the creator's write never came")
        assert probe("write %d %d 100 fromC" % h) == "ok"
        eventually(lambda: bytes(region.buffer[100:105]) == b"fromC", "the attacher's write never came")
        assert probe("detach %d %d" % h) == "0"
        assert probe("detach %d %d" % h) == str(VMCI_ERROR_NOT_FOUND)
    eventually(lambda: probe.ints("query %d %d" % h) == [VMCI_ERROR_NOT_FOUND, 0], "the region outlived its users")


def test_a_python_attacher_mirrors_a_c_region_over_vsock(rt, probe):
    h = tuple(probe.ints("create 5000"))
    assert h[0] == VMADDR_CID_LOCAL and h[1] >= 1024
    assert probe("write %d %d 0 fromC" % h) == "ok"
    assert query(h, runtime=rt) == 5000
    with pytest.raises(InvalidSize):
        SharedRegion.attach(h, 4999, runtime=rt)
    with SharedRegion.attach(h, 5000, runtime=rt) as region:
        assert bytes(region.buffer[:5]) == b"fromC"
        assert probe("write %d %d 4000 again" % h) == "ok"
        eventually(lambda: bytes(region.buffer[4000:4005]) == b"again", "the C creator's write never came")
        region.buffer[64:70] = b"fromPy"
        eventually(lambda: probe("read %d %d 64 6" % h) == "[fromPy]", "the Python write never came")
        assert probe("detach %d %d" % h) == "0"          # its process serves us until we leave
        region.sync()
    eventually(lambda: probe.ints("query %d %d" % h) == [VMCI_ERROR_NOT_FOUND, 0], "the C creator kept serving")


def test_a_c_creator_sets_privileges_on_its_region_over_vsock(rt, probe):
    """Over vsock the privileges of a C creator's region live in its process (src/vsc_acl_memory.c),
    as a Python creator's do (access.AccessControl without files): the same codes call for call,
    SM_ATTACH enforced at HELLO both ways (an attacher in this kernel is context 1), allowed again
    after. Another process's region is unknown to this one: VMCI_ERROR_INVALID_ARGS from both."""
    lib = VMCILibrary(rt)
    assert lib.VMCI_InitApp(None) == VMCI_SUCCESS
    try:
        mine = tuple(probe.ints("create 64"))
        theirs, view = lib.VMCISharedMem_Create(64)
        here = (VMADDR_CID_LOCAL, 0)
        assert probe.priv(theirs, here, (C.VMCI_PRIV_SM_ATTACH,)) == C.VMCI_ERROR_INVALID_ARGS
        assert lib.VMCIResource_AddClientPrivileges(mine, here, [C.VMCI_PRIV_SM_ATTACH]) == C.VMCI_ERROR_INVALID_ARGS
        own_region_privileges_match(probe, mine, lib, tuple(theirs), here, here)
        denied_then_allowed(probe, mine, lib, tuple(theirs), view, here, here)
        assert lib.VMCISharedMem_Detach(theirs) == VMCI_SUCCESS
        assert probe("detach %d %d" % mine) == "0"
        # Its privileges died with it: the id is unknown again.
        eventually(lambda: probe.ints("query %d %d" % mine) == [VMCI_ERROR_NOT_FOUND, 0], "the C creator kept serving")
        assert probe.priv(mine, here, (), (C.VMCI_PRIV_SM_ATTACH,)) == C.VMCI_ERROR_INVALID_ARGS
    finally:
        lib.VMCI_CleanupApp()
