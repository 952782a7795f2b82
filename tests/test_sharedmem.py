"""Shared memory regions: the SDK calls, the object API, lifetime, crashes, bad input."""
import errno
import gc as pygc
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import PYTHON, child_env

from vsockcompat import errors, sharedmem
from vsockcompat.constants import (
    VMCI_ERROR_ALREADY_EXISTS,
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_INVALID_SIZE,
    VMCI_ERROR_NOT_FOUND,
    VMCI_ERROR_UNAVAILABLE,
    VMCI_SUCCESS,
)
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.handles import VMCI_INVALID_HANDLE, VMCIHandle
from vsockcompat.sdk import VMCILibrary
from vsockcompat.sharedmem import SHM_DIR, SharedRegion, shm_prefix


def objects(rundir):
    prefix = shm_prefix(rundir)
    return sorted(n[len(prefix):] for n in os.listdir(SHM_DIR) if n.startswith(prefix))


def markers(rundir, cid=2):
    try:
        return sorted(n for n in os.listdir(os.path.join(rundir, "c%d" % cid)) if n.endswith(".shm"))
    except FileNotFoundError:
        return []


@pytest.fixture
def make_lib(make_runtime):
    libs = []

    def make(cid=2):
        library = VMCILibrary(make_runtime(cid))
        assert library.VMCI_InitApp(None) == VMCI_SUCCESS
        libs.append(library)
        return library
    yield make
    for library in libs:
        library.VMCI_CleanupApp()


@pytest.fixture
def lib(make_lib):
    return make_lib()


def test_create_query_attach_detach(fd_guard, make_lib, rundir):
    creator, guest = make_lib(2), make_lib(3)
    handle, view = creator.VMCISharedMem_Create(128)
    assert handle == VMCIHandle(2, 1024)
    assert len(view) == 128 and not view.readonly and bytes(view) == bytes(128)
    assert objects(rundir) == ["2.1024"] and markers(rundir) == ["1024.shm"]
    name = shm_prefix(rundir) + "2.1024"
    assert os.stat(os.path.join(SHM_DIR, name)).st_size == os.sysconf("SC_PAGE_SIZE")
    with open(os.path.join(rundir, "c2", "1024.shm")) as f:
        assert f.read() == "128 %s\n" % name
    assert guest.VMCISharedMem_Query(handle) == (VMCI_SUCCESS, 128)
    rv, other = guest.VMCISharedMem_Attach(handle, 128)
    assert rv == VMCI_SUCCESS and len(other) == 128
    view[:5] = b"hello"
    assert bytes(other[:5]) == b"hello"
    other[127] = 7
    assert view[127] == 7
    assert creator.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    assert guest.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    assert objects(rundir) == [] and markers(rundir) == []


def test_object_api(fd_guard, runtime, make_runtime, rundir):
    with SharedRegion.create(100, runtime=runtime) as region:
        assert (region.handle, region.size, len(region.buffer)) == (VMCIHandle(2, 1024), 100, 100)
        region.buffer[:3] = b"abc"
        with SharedRegion.attach(region.handle, runtime=make_runtime(3)) as other:
            assert other.size == 100 and bytes(other.buffer[:3]) == b"abc"
        assert sharedmem.query(region.handle, runtime) == 100
        assert "size=100" in repr(region)
    assert region.closed and "detached" in repr(region)
    with pytest.raises(errors.NotFound):
        region.buffer
    with pytest.raises(errors.NotFound):
        region.detach()
    with pytest.raises(errors.NotFound):
        SharedRegion.attach(region.handle, runtime=runtime)
    assert objects(rundir) == []


@pytest.mark.parametrize("size, exc, code", [
    (0, errors.InvalidSize, VMCI_ERROR_INVALID_SIZE),
    (-1, errors.InvalidSize, VMCI_ERROR_INVALID_SIZE),
    (-2**40, errors.InvalidSize, VMCI_ERROR_INVALID_SIZE),
    (1.5, errors.InvalidArgs, VMCI_ERROR_INVALID_ARGS),
    (128.0, errors.InvalidArgs, VMCI_ERROR_INVALID_ARGS),
    ("128", errors.InvalidArgs, VMCI_ERROR_INVALID_ARGS),
    (None, errors.InvalidArgs, VMCI_ERROR_INVALID_ARGS),
    (True, errors.InvalidArgs, VMCI_ERROR_INVALID_ARGS),
])
def test_bad_sizes(lib, runtime, rundir, size, exc, code):
    assert lib.VMCISharedMem_Create(size) == (VMCI_INVALID_HANDLE, None)
    with pytest.raises(exc) as info:
        SharedRegion.create(size, runtime=runtime)
    assert info.value.code == code
    assert objects(rundir) == [] and markers(rundir) == []


@pytest.mark.parametrize("size", [2**40, 2**64, 2**200, "free+1"])
def test_huge_sizes_fail_without_allocating(fd_guard, lib, runtime, rundir, size):
    if size == "free+1":
        st = os.statvfs(SHM_DIR)
        size = st.f_bavail * st.f_frsize + 1
    assert lib.VMCISharedMem_Create(size) == (VMCI_INVALID_HANDLE, None)
    with pytest.raises(errors.NoMem):
        SharedRegion.create(size, runtime=runtime)
    assert objects(rundir) == [] and markers(rundir) == []


def test_the_memory_limit_is_checked_before_allocating(runtime, rundir, monkeypatch):
    monkeypatch.setattr(sharedmem, "_memory_available", lambda: 2 * os.sysconf("SC_PAGE_SIZE"))
    with SharedRegion.create(2 * os.sysconf("SC_PAGE_SIZE"), runtime=runtime):
        pass
    with pytest.raises(errors.NoMem):
        SharedRegion.create(2 * os.sysconf("SC_PAGE_SIZE") + 1, runtime=runtime)
    assert objects(rundir) == []


@pytest.mark.parametrize("call", ["posix_fallocate", "ftruncate"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.ENOMEM, errno.EFBIG])
def test_no_space_in_dev_shm_is_no_mem(fd_guard, lib, runtime, rundir, monkeypatch, call, err):
    def fail(*args):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(os, call, fail)
    with pytest.raises(errors.NoMem):
        SharedRegion.create(128, runtime=runtime)
    assert lib.VMCISharedMem_Create(128) == (VMCI_INVALID_HANDLE, None)
    assert objects(rundir) == [] and markers(rundir) == []
    monkeypatch.undo()
    handle, _ = lib.VMCISharedMem_Create(128)
    assert handle.resource >= 1024
    assert lib.VMCISharedMem_Detach(handle) == VMCI_SUCCESS


def test_attach_size_must_match(fd_guard, make_lib, make_runtime):
    creator, guest = make_lib(2), make_lib(3)
    handle, _ = creator.VMCISharedMem_Create(128)
    for size in (64, 127, 129, 4096, -1, -128):
        assert guest.VMCISharedMem_Attach(handle, size) == (VMCI_ERROR_INVALID_SIZE, None), size
    for size in ("128", 128.0, None, True):
        assert guest.VMCISharedMem_Attach(handle, size) == (VMCI_ERROR_INVALID_ARGS, None), size
    with pytest.raises(errors.InvalidSize):
        SharedRegion.attach(handle, 64, runtime=make_runtime(3))
    rv, view = guest.VMCISharedMem_Attach(handle, 0)  # 0: any size
    assert rv == VMCI_SUCCESS and len(view) == 128


def test_unknown_handles(fd_guard, lib):
    for handle in [(2, 5000), (2, 1024), (77, 1024), (2, 0), VMCI_INVALID_HANDLE]:
        assert lib.VMCISharedMem_Query(handle) == (VMCI_ERROR_NOT_FOUND, 0), handle
        assert lib.VMCISharedMem_Attach(handle, 128) == (VMCI_ERROR_NOT_FOUND, None), handle
        assert lib.VMCISharedMem_Attach(handle, 0) == (VMCI_ERROR_NOT_FOUND, None), handle
        assert lib.VMCISharedMem_Detach(handle) == VMCI_ERROR_NOT_FOUND, handle
    for bad in ["h", None, (2, -1), (2, 2**32), (1, 2, 3)]:
        assert lib.VMCISharedMem_Query(bad) == (VMCI_ERROR_INVALID_ARGS, 0), bad
        assert lib.VMCISharedMem_Attach(bad, 128) == (VMCI_ERROR_INVALID_ARGS, None), bad
        assert lib.VMCISharedMem_Detach(bad) == VMCI_ERROR_INVALID_ARGS, bad


def test_detached_handles_and_double_detach(fd_guard, make_lib, rundir):
    creator, guest = make_lib(2), make_lib(3)
    handle, _ = creator.VMCISharedMem_Create(128)
    assert creator.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    assert creator.VMCISharedMem_Detach(handle) == VMCI_ERROR_NOT_FOUND
    assert guest.VMCISharedMem_Query(handle) == (VMCI_ERROR_NOT_FOUND, 0)
    assert guest.VMCISharedMem_Attach(handle, 128) == (VMCI_ERROR_NOT_FOUND, None)
    assert guest.VMCISharedMem_Detach(handle) == VMCI_ERROR_NOT_FOUND
    assert objects(rundir) == []


def test_a_library_maps_a_region_once(make_lib):
    creator, guest = make_lib(2), make_lib(3)
    handle, _ = creator.VMCISharedMem_Create(128)
    assert creator.VMCISharedMem_Attach(handle, 128) == (VMCI_ERROR_ALREADY_EXISTS, None)
    assert guest.VMCISharedMem_Attach(handle, 128)[0] == VMCI_SUCCESS
    assert guest.VMCISharedMem_Attach(handle, 128) == (VMCI_ERROR_ALREADY_EXISTS, None)


def test_calls_before_init(runtime):
    library = VMCILibrary(runtime)
    assert library.VMCISharedMem_Create(128) == (VMCI_INVALID_HANDLE, None)
    assert library.VMCISharedMem_Query((2, 1024)) == (VMCI_ERROR_UNAVAILABLE, 0)
    assert library.VMCISharedMem_Attach((2, 1024), 128) == (VMCI_ERROR_UNAVAILABLE, None)
    assert library.VMCISharedMem_Detach((2, 1024)) == VMCI_ERROR_UNAVAILABLE


def test_cleanup_detaches_every_region(fd_guard, runtime, rundir):
    library = VMCILibrary(runtime)
    library.VMCI_InitApp(None)
    handles = [library.VMCISharedMem_Create(64 * (i + 1))[0] for i in range(3)]
    assert objects(rundir) == ["2.%d" % h.resource for h in handles]
    library.VMCI_CleanupApp()
    assert objects(rundir) == [] and markers(rundir) == []
    assert library.VMCISharedMem_Detach(handles[0]) == VMCI_ERROR_UNAVAILABLE


def test_the_region_outlives_its_creators_detach(fd_guard, make_lib, rundir):
    creator, guest, third = make_lib(2), make_lib(3), make_lib(4)
    handle, view = creator.VMCISharedMem_Create(128)
    view[:4] = b"kept"
    rv, other = guest.VMCISharedMem_Attach(handle, 128)
    assert rv == VMCI_SUCCESS
    assert creator.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    assert objects(rundir) == ["2.1024"] and markers(rundir) == ["1024.shm"]
    assert bytes(other[:4]) == b"kept"
    assert third.VMCISharedMem_Query(handle) == (VMCI_SUCCESS, 128)
    rv, late = third.VMCISharedMem_Attach(handle, 128)
    assert rv == VMCI_SUCCESS and bytes(late[:4]) == b"kept"
    assert guest.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    assert objects(rundir) == ["2.1024"]
    assert third.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    assert objects(rundir) == [] and markers(rundir) == []
    assert third.VMCISharedMem_Query(handle) == (VMCI_ERROR_NOT_FOUND, 0)


def test_views_held_past_detach_do_not_leak(fd_guard, runtime, rundir):
    region = SharedRegion.create(128, runtime=runtime)
    piece = region.buffer[:4]
    region.detach()
    assert objects(rundir) == []
    piece[:4] = b"safe"
    del piece


def test_a_forgotten_region_is_detached(fd_guard, runtime, rundir):
    region = SharedRegion.create(128, runtime=runtime)
    del region
    pygc.collect()
    assert objects(rundir) == [] and markers(rundir) == []


CHILD = textwrap.dedent("""
    import sys, vsockcompat as v
    assert v.VMCI_InitApp(None) == 0
    rv, view = v.VMCISharedMem_Attach(v.VMCIHandle(int(sys.argv[1]), int(sys.argv[2])), 0)
    assert rv == 0, rv
    print(bytes(view[:6]).decode(), flush=True)
    view[:6] = b"child!"
    print("written", flush=True)
    sys.stdin.readline()
    view[:6] = b"again!"
    print("written", flush=True)
    sys.stdin.readline()
    v.VMCI_CleanupApp()
""")


def test_writes_are_visible_across_processes_without_a_call(fd_guard, runtime, rundir, core):
    region = SharedRegion.create(4096, runtime=runtime)
    region.buffer[:6] = b"parent"
    child = subprocess.Popen([PYTHON, "-c", CHILD, "2", str(region.handle.resource)],
                             env=child_env(rundir, core.NAME, cid=3), text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == "parent\n"
        assert child.stdout.readline() == "written\n"
        view = region.buffer
        assert bytes(view[:6]) == b"child!"
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline() == "written\n"
        assert bytes(view[:6]) == b"again!"
        del view
        region.detach()
        assert objects(rundir) == ["2.1024"]
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()
    assert objects(rundir) == [] and markers(rundir) == []


CREATOR = textwrap.dedent("""
    import sys, time, vsockcompat as v
    assert v.VMCI_InitApp(None) == 0
    handle, view = v.VMCISharedMem_Create(128)
    print(handle.resource, flush=True)
    time.sleep(60)
""")


def _orphan(rundir, core):
    child = subprocess.Popen([PYTHON, "-c", CREATOR], env=child_env(rundir, core.NAME, cid=2),
                             stdout=subprocess.PIPE, text=True)
    try:
        rid = int(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert objects(rundir) == ["2.%d" % rid] and markers(rundir) == ["%d.shm" % rid]
    return VMCIHandle(2, rid)


def test_a_killed_creators_region_is_reclaimed_by_gc(fd_guard, lib, runtime, rundir, core):
    handle = _orphan(rundir, core)
    assert lib.VMCISharedMem_Query(handle) == (VMCI_ERROR_NOT_FOUND, 0)
    assert not sharedmem.region_alive(handle, runtime)
    assert sharedmem.gc(runtime) == [handle]
    assert objects(rundir) == [] and markers(rundir) == []
    assert sharedmem.gc(runtime) == []


def test_a_killed_creators_region_is_reclaimed_by_the_cli(rundir, core):
    handle = _orphan(rundir, core)
    result = subprocess.run([PYTHON, "-m", "vsockcompat", "gc"], env=child_env(rundir, core.NAME),
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (
        0, "reclaimed shared memory region (2, %d)\n" % handle.resource, "")
    assert objects(rundir) == []
    again = subprocess.run([PYTHON, "-m", "vsockcompat", "gc"], env=child_env(rundir, core.NAME),
                           capture_output=True, text=True, timeout=60)
    assert again.stdout == "nothing to reclaim\n"


def test_a_killed_creators_region_is_reclaimed_by_the_next_create(fd_guard, lib, rundir, core):
    orphan = _orphan(rundir, core)
    handle, _ = lib.VMCISharedMem_Create(128)
    assert handle == VMCIHandle(2, orphan.resource + 1)
    assert objects(rundir) == ["2.%d" % handle.resource]
    assert markers(rundir) == ["%d.shm" % handle.resource]


def test_a_killed_creators_id_is_reused(fd_guard, runtime, rundir, core):
    orphan = _orphan(rundir, core)
    sharedmem.SharedRegion.create(1, runtime=runtime).detach()  # registers the kind in this process
    with DatagramEndpoint(orphan.resource, runtime=runtime) as ep:
        assert ep.handle == orphan
    assert objects(rundir) == [] and markers(rundir) == []


def test_an_object_without_a_marker_is_reclaimed(fd_guard, runtime, rundir):
    name = os.path.join(SHM_DIR, shm_prefix(rundir) + "2.1024")
    os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    os.makedirs(os.path.join(rundir, "c2"))
    assert sharedmem.gc(runtime) == [VMCIHandle(2, 1024)]
    assert objects(rundir) == []
    os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    with SharedRegion.create(128, runtime=runtime) as region:  # replaces the orphan of its id
        assert region.handle == VMCIHandle(2, 1024)
        assert os.stat(name).st_size == os.sysconf("SC_PAGE_SIZE")
    assert objects(rundir) == []


def test_regions_and_endpoints_share_resource_ids(fd_guard, runtime, rundir):
    with DatagramEndpoint(runtime=runtime) as ep1:
        region = SharedRegion.create(128, runtime=runtime)
        with DatagramEndpoint(runtime=runtime) as ep2:
            assert [ep1.handle.resource, region.handle.resource, ep2.handle.resource] == [1024, 1025, 1026]
            with pytest.raises(errors.DuplicateEntry):
                DatagramEndpoint(region.handle.resource, runtime=runtime)
            with pytest.raises(errors.NotFound):
                SharedRegion.attach(ep1.handle, runtime=runtime)
        region.detach()
        with DatagramEndpoint(1025, runtime=runtime) as ep3:
            assert ep3.handle == region.handle


def test_region_alive(runtime, make_runtime):
    region = SharedRegion.create(16, runtime=runtime)
    assert sharedmem.region_alive(region.handle, make_runtime(1))
    assert not sharedmem.region_alive((2, 9999), runtime)
    region.detach()
    assert not sharedmem.region_alive(region.handle, runtime)


def test_the_facade_exports_the_shared_memory_api():
    import vsockcompat as vmci
    assert vmci.SharedRegion is SharedRegion
    for name in ("Create", "Query", "Attach", "Detach"):
        assert callable(getattr(vmci, "VMCISharedMem_" + name))
    assert sys.modules["vsockcompat.sharedmem"] is sharedmem


def test_an_explicit_endpoint_id_never_takes_a_live_regions_id(make_runtime, rundir, core):
    from vsockcompat.datagram import DatagramEndpoint
    from vsockcompat.runtime import Runtime
    from vsockcompat.sharedmem import SharedRegion
    region = SharedRegion.create(64, runtime=make_runtime())
    try:
        fresh = Runtime(make_runtime().settings, core=core)  # has never touched shared memory
        with pytest.raises(errors.DuplicateEntry):
            DatagramEndpoint(region.handle.resource, runtime=fresh)
    finally:
        region.detach()


def test_the_transport_sees_regions_as_live_resources(runtime):
    from vsockcompat.sharedmem import SharedRegion
    region = SharedRegion.create(64, runtime=runtime)
    handle = region.handle
    assert runtime.transport.resource_alive(handle)
    assert not runtime.transport.endpoint_alive(handle)
    region.detach()
    assert not runtime.transport.resource_alive(handle)


def test_a_name_dies_with_its_region(make_runtime, rundir, core):
    from vsockcompat import ds_client
    from vsockcompat.sharedmem import SharedRegion
    runtime = make_runtime()
    region = SharedRegion.create(128, runtime=runtime)
    ds_client.register("HOST TIME", region.handle, runtime)
    assert ds_client.lookup("HOST TIME", runtime) == region.handle
    region.detach()
    with pytest.raises(errors.NotFound):
        ds_client.lookup("HOST TIME", runtime)
