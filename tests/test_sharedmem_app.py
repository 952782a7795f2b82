"""sharedMemApp (vmci-sdk.md section 7.2): texts, timings, exit statuses, two processes."""
import os
import re
import subprocess
import time

import pytest

from conftest import PYTHON, child_env

from vsockcompat.apps import sharedmem_app
from vsockcompat.constants import VMCI_SUCCESS
from vsockcompat.sdk import VMCILibrary
from vsockcompat.sharedmem import SHM_DIR, shm_prefix

APP = [PYTHON, "-m", "vsockcompat", "sharedmem-app"]
USAGE = ("sharedMemApp [-d <VMCI device>] -c|-s\n\t\tMust provide exactly one of -c OR -s.\n"
         "sharedMemApp -h:\n\tPrints this help message.\n")
READING = re.compile(r"[A-Z][a-z]{2} [A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d \S+ \d{4}")


def run(args, env, timeout=60):
    return subprocess.run(APP + args, env=env, capture_output=True, text=True, timeout=timeout)


def objects(rundir):
    return [n for n in os.listdir(SHM_DIR) if n.startswith(shm_prefix(rundir))]


@pytest.fixture
def lib(runtime):
    library = VMCILibrary(runtime)
    assert library.VMCI_InitApp(None) == VMCI_SUCCESS
    yield library
    library.VMCI_CleanupApp()


@pytest.mark.slow
def test_server_and_client_in_separate_processes_and_contexts(rundir, core):
    server = subprocess.Popen(APP + ["-s"], env=child_env(rundir, core.NAME, cid=2),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "Running shared memory server for 10 seconds.\n"
        started = time.monotonic()
        client = run(["-c", "-d", "/dev/vmci"], child_env(rundir, core.NAME, cid=3))
        assert time.monotonic() - started >= 3  # three readings one second apart
        assert (client.returncode, client.stderr) == (0, "")
        readings = client.stdout.split("\n")
        assert len(readings) == 4 and readings[3] == ""
        assert all(READING.fullmatch(r) for r in readings[:3]), readings
        assert readings[0] != readings[2]  # the server writes every second
        assert server.wait(30) == 0
        assert time.monotonic() - started >= 9
        assert server.stderr.read() == "0.1.2.3.4.5.6.7.8.9.\n"
        assert server.stdout.read() == ""
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
        server.stdout.close()
        server.stderr.close()
    assert objects(rundir) == []
    late = run(["-c"], child_env(rundir, core.NAME, cid=3))
    assert (late.returncode, late.stdout, late.stderr) == (0, "", "Failed to lookup in discovery service.\n")


@pytest.mark.parametrize("args", [[], ["-s", "-c"], ["-h"], ["-x"], ["-c", "extra"], ["-d"]])
def test_usage(rundir, core, args):
    result = run(args, child_env(rundir, core.NAME))
    assert (result.returncode, result.stdout, result.stderr) == (255, "", USAGE)  # exit(-1)


def test_init_failure_exits_254(core):
    result = run(["-s"], child_env("/tmp/" + "y" * 80, core.NAME))
    assert (result.returncode, result.stderr) == (254, "Failed to init VMCI library.\n")


def test_client_rejects_a_region_of_the_wrong_size(lib, rundir, core):
    handle, _ = lib.VMCISharedMem_Create(64)
    assert lib.VMCIDs_Register("HOST TIME", handle) == VMCI_SUCCESS
    result = run(["-c"], child_env(rundir, core.NAME, cid=3))
    assert (result.returncode, result.stdout, result.stderr) == (
        0, "", "Got wrong size of shared memory region.\nShould be 128, got 64\n")


def test_client_cannot_query_a_name_that_is_not_a_region(lib, rundir, core):
    handle = lib.VMCIDatagram_CreateHnd(0)
    assert lib.VMCIDs_Register("HOST TIME", handle) == VMCI_SUCCESS
    result = run(["-c"], child_env(rundir, core.NAME, cid=3))
    assert (result.returncode, result.stdout, result.stderr) == (
        0, "", "Failed to query size of shared memory region.\n")


def test_a_second_server_cannot_register(lib, rundir, core):
    handle, _ = lib.VMCISharedMem_Create(128)
    assert lib.VMCIDs_Register("HOST TIME", handle) == VMCI_SUCCESS
    result = run(["-s"], child_env(rundir, core.NAME))
    assert (result.returncode, result.stdout, result.stderr) == (
        0, "", "Failed to register discovery service. rv = -22\n")
    assert objects(rundir) == [shm_prefix(rundir) + "2.1024"]  # the second server detached its region


def test_attach_failure_text(runtime, capsys):
    class NoAttach(VMCILibrary):
        def VMCIDs_Lookup(self, name):
            return VMCI_SUCCESS, (2, 1024)

        def VMCISharedMem_Query(self, handle):
            return VMCI_SUCCESS, 128

        def VMCISharedMem_Attach(self, handle, size):
            return -21, None

    assert sharedmem_app.main(["-c"], lib=NoAttach(runtime)) == 0
    assert capsys.readouterr() == ("", "Failed to attach to shared memory region. rv = -21\n")


def test_create_failure_text(runtime, capsys, monkeypatch):
    monkeypatch.setattr(sharedmem_app, "REGION_SIZE", 0)
    assert sharedmem_app.main(["-s"], lib=VMCILibrary(runtime)) == 0
    assert capsys.readouterr() == ("", "Failed to create server shared memory region.\n")
