"""Fixtures shared by the whole suite.

Every behavioural test takes ``core`` (directly or through ``runtime``) and so
runs against both the Cython core (id ``cython``) and the pure core (``py``).
Each test gets its own short runtime directory; any discovery daemon started
in it is stopped at teardown.
"""
import os
import shutil
import signal
import sys
import tempfile
import time

import psutil
import pytest

from vsockcompat._backend import load_core
from vsockcompat._settings import Settings
from vsockcompat.runtime import Runtime

import vsockcompat

# Children import vsockcompat from where this process did (source tree or site-packages).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(vsockcompat.__file__)))


def pytest_addoption(parser):
    parser.addoption("--no-c-extensions", action="store_true", default=False,
                     help="run only the pure-Python core")


def _cython_available():
    try:
        load_core("cython")
    except ImportError:
        return False
    return True


CYTHON_AVAILABLE = _cython_available()


@pytest.fixture(params=["cython", "pure"], ids=["c", "py"])
def core(request):
    if request.param == "cython":
        if request.config.getoption("--no-c-extensions"):
            pytest.skip("--no-c-extensions given")
        if not CYTHON_AVAILABLE:
            pytest.skip("the Cython core is not built (pure install)")
    return load_core(request.param)


def _stop_daemons(rundir):
    pidfile = os.path.join(rundir, "ds.pid")
    try:
        with open(pidfile) as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(5)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        proc.kill()


SESSION_RUNDIRS = []


@pytest.fixture
def rundir():
    """A fresh, short runtime directory (Unix socket paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="vsc", dir="/tmp")
    SESSION_RUNDIRS.append(path)
    yield path
    _stop_daemons(path)
    shutil.rmtree(path, ignore_errors=True)


def make_settings(rundir, cid=2, no_extensions=False, ds_autostart=True, **more):
    return Settings(no_extensions=no_extensions, rundir=rundir, cid=cid, transport="local",
                    ds_autostart=ds_autostart, **more)


@pytest.fixture
def make_runtime(core, rundir):
    """``make_runtime(cid=2)``: a runtime on the test's core and runtime directory."""
    def make(cid=2, **kwargs):
        return Runtime(make_settings(rundir, cid=cid, **kwargs), core=core)
    return make


@pytest.fixture
def runtime(make_runtime):
    return make_runtime()


@pytest.fixture
def spawned_daemons(monkeypatch):
    """The discovery daemons the client starts during the test (``ds_client._spawn`` counted)."""
    from vsockcompat import ds_client

    spawned = []
    real_spawn = ds_client._spawn

    def counting_spawn(rt):
        proc = real_spawn(rt)
        spawned.append(proc)
        return proc

    monkeypatch.setattr(ds_client, "_spawn", counting_spawn)
    return spawned


def child_env(rundir, core_name, cid=2, **extra):
    """Environment for a subprocess that uses vsockcompat on the same runtime directory and core."""
    env = dict(os.environ)
    env.update(VSOCKCOMPAT_RUNDIR=rundir, VSOCKCOMPAT_CID=str(cid), VSOCKCOMPAT_TRANSPORT="local",
               VSOCKCOMPAT_NO_EXTENSIONS="1" if core_name == "pure" else "0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


@pytest.fixture
def fd_guard():
    """Fails the test if it leaves file descriptors open."""
    proc = psutil.Process()
    before = proc.num_fds()
    yield
    deadline = time.monotonic() + 2
    while proc.num_fds() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.num_fds() <= before, "file descriptors leaked: %d -> %d" % (before, proc.num_fds())


PYTHON = sys.executable


@pytest.fixture(scope="session", autouse=True)
def shm_leak_guard():
    """Fails the session if a /dev/shm object of one of its runtime directories outlives the
    directory (nothing can reclaim it then), and removes such objects. Only this session's
    directories are judged, so sessions running at the same time do not disturb each other."""
    from vsockcompat.sharedmem import SHM_DIR, shm_prefix

    yield
    prefixes = tuple(shm_prefix(path) for path in SESSION_RUNDIRS)
    names = os.listdir(SHM_DIR) if os.path.isdir(SHM_DIR) else []
    leaked = sorted(n for n in names if prefixes and n.startswith(prefixes))
    for name in leaked:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass
    if leaked:
        pytest.fail("shared memory objects left in %s: %s" % (SHM_DIR, ", ".join(leaked)), pytrace=False)
