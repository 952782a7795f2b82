"""Legacy VMCI Sockets binaries for real, inside the guest test bed: tests/c/vmci_sockets_legacy.c
(VMware's 2008 helpers compiled in: ioctl 1976 on /dev/vsock for the family, SO_VMCI_* at level
"af value") gets af -1 from mainline Linux and runs under ``vsockcompat run`` with
libvsockcompat-preload.so, over vsock_loopback (CID 1).

Every test is marked ``vsock``: the gate of ``conftest.py`` skips it everywhere but inside the
guest booted by ``testbed/guest.py``, and ``_require_gate`` checks the gate again right before each
program that opens /dev/vsock or makes an AF_VSOCK socket is started.

Run them:  python3 testbed/guest.py run --timeout 800 -- python3 -m pytest tests/real_vsock \
               -m vsock -rs -q -p no:cacheprovider -k preload
"""
import os
import select
import subprocess
import sys

import pytest

import vsockcompat

from vsockcompat import clib
from vsockcompat.run import command

from .conftest import VMADDR_CID_LOCAL, gate

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
REPO = os.path.dirname(TESTS)
SRC_DIR = os.path.join(REPO, "src")
# Children import vsockcompat from where this process did (source tree or site-packages).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(vsockcompat.__file__)))
LEGACY = os.path.join(TESTS, "c", "vmci_sockets_legacy.c")
PORT = 0x5650                  # any fixed port: the guest is ours alone
TIMEOUT = 60
ANY = 0xFFFFFFFF
vsock = pytest.mark.vsock

# SO_VMCI_* on an AF_VSOCK stream socket under the preload (README.rst, "VMCI Sockets binaries").
OPTIONS = {
    "get_buffer_size": {"rc": "0", "errno": "0", "value": str(256 * 1024)},
    "set_buffer_max": {"rc": "0", "errno": "0"},
    "set_buffer_min": {"rc": "0", "errno": "0"},
    "set_buffer_size": {"rc": "0", "errno": "0"},
    "get_buffer_size_after": {"rc": "0", "errno": "0", "value": "32768"},
    "buffer_size_clamped": {"rc": "0", "errno": "0", "value": str(1 << 20)},
    "set_buffer_size_short": {"rc": "-1", "errno": "EINVAL"},
    "get_buffer_min_short": {"rc": "-1", "errno": "EINVAL"},
    "set_connect_timeout": {"rc": "0", "errno": "0"},
    "get_connect_timeout": {"rc": "0", "errno": "0", "value": "3"},
    "get_peer_host_vm_id": {"rc": "-1", "errno": "ENOPROTOOPT"},
    "set_service_label": {"rc": "-1", "errno": "ENOPROTOOPT"},
    "get_service_label": {"rc": "-1", "errno": "ENOPROTOOPT"},
    "get_trusted": {"rc": "0", "errno": "0", "value": None},     # 1 as root, 0 otherwise
    "trusted_len": "4",
    "get_trusted_short": {"rc": "-1", "errno": "EINVAL"},
    "get_trusted_null": {"rc": "-1", "errno": "EFAULT"},
    "get_trusted_null_len": {"rc": "-1", "errno": "EFAULT"},
    "get_trusted_unmapped": {"rc": "-1", "errno": "EFAULT"},
    "set_trusted": {"rc": "-1", "errno": "ENOPROTOOPT"},
    "set_nonblock_txrx": {"rc": "-1", "errno": "ENOPROTOOPT"},
    "get_nonblock_txrx": {"rc": "-1", "errno": "ENOPROTOOPT"},
    "get_disconnect_cause": {"rc": "-1", "errno": "ENOPROTOOPT"},
    "set_disconnect_cause": {"rc": "-1", "errno": "ENOPROTOOPT"},
    "get_unknown": {"rc": "-1", "errno": "ENOPROTOOPT"},
    "set_unknown": {"rc": "-1", "errno": "ENOPROTOOPT"},
    "dgram_socket": {"rc": "-1", "errno": "ENODEV"},              # vsock_loopback has no datagrams
}


def _require_gate():
    reason = gate()
    if reason is not None:
        pytest.fail("the vsock gate is closed (%s): refusing to run an AF_VSOCK program" % reason,
                    pytrace=False)


def parse(stdout):
    out = {}
    for line in stdout.splitlines():
        name, _, rest = line.partition(" ")
        out[name] = dict(f.split("=", 1) for f in rest.split()) if "=" in rest else rest
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The preload and the legacy program, built with the guest's cc; libvmci.so.0 for
    ``vsockcompat run`` (the package's when built, else built here)."""
    cc = clib.find_compiler()
    if cc is None:
        pytest.fail("no C compiler in the guest", pytrace=False)
    out = str(tmp_path_factory.mktemp("preload"))
    preload = clib.build_preload(os.path.join(out, "lib"), src_dir=SRC_DIR)
    library = clib.library_path() or clib.build_libvmci(os.path.join(out, "lib"), src_dir=SRC_DIR)
    exe = os.path.join(out, "vmci_sockets_legacy")
    proc = subprocess.run(cc + ["-std=gnu89", "-Wall", "-Wextra", "-Werror", LEGACY, "-o", exe],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout
    env = dict(os.environ, VSOCKCOMPAT_LIBVMCI=library, VSOCKCOMPAT_LIBPRELOAD=preload,
               VSOCKCOMPAT_PRELOAD="1", PYTHONPATH=os.pathsep.join(
                   p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p))
    for name in ("LD_PRELOAD", "VSOCKCOMPAT_VSOCK_DEVICE"):
        env.pop(name, None)
    # "cli" goes through `vsockcompat run` itself (a Python start, tens of seconds under TCG);
    # "run" and "run_env" are what it would exec (vsockcompat.run.command, computed here once).
    run, run_env = command([exe], env)
    return {"exe": exe, "env": env, "cli": [sys.executable, "-m", "vsockcompat.run", "--", exe],
            "run": run, "run_env": run_env}


def _run(argv, env):
    _require_gate()
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=TIMEOUT, env=env)


@vsock
@pytest.mark.timeout(600)           # includes building the preload and the program
def test_preload_legacy_binary_fails_without_it(built):
    proc = _run([built["exe"], "helpers"], built["env"])
    assert proc.returncode == 1, proc.stderr
    got = parse(proc.stdout)
    assert got["af"] == "-1" and got["fd_kept"] == "0"         # mainline: ioctl 1976 is ENOTTY
    assert int(got["cid"]) == VMADDR_CID_LOCAL                  # 1977 works without help
    proc = _run([built["exe"], "options"], built["env"])
    assert proc.returncode == 4 and "VMCISock_GetAFValue: -1" in proc.stderr


@vsock
@pytest.mark.timeout(600)
def test_preload_legacy_helpers_under_vsockcompat_run(built):
    proc = _run(built["cli"] + ["helpers"], built["env"])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert parse(proc.stdout) == {"af": "40", "fd_kept": "1", "af_again": "40",
                                  "cid": str(VMADDR_CID_LOCAL), "version": str(ANY)}


@vsock
def test_preload_legacy_bad_input_on_the_real_device(built):
    proc = _run(built["run"] + ["badinput"], built["run_env"])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    got = parse(proc.stdout)
    assert got["af_null"] == {"rc": "-1", "errno": "EFAULT"}
    assert got["af_unmapped"] == {"rc": "-1", "errno": "EFAULT"}
    assert got["af"]["value"] == "40" and got["af_dup"]["value"] == "40"
    assert got["pipe_af"] == {"rc": "-1", "errno": "ENOTTY", "value": "12345"}


@vsock
def test_preload_legacy_options(built):
    proc = _run(built["run"] + ["options"], built["run_env"])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    got = parse(proc.stdout)
    trusted = got["get_trusted"].pop("value")
    assert trusted == ("1" if os.geteuid() == 0 else "0")
    expected = dict(OPTIONS, get_trusted={"rc": "0", "errno": "0"})
    assert got == expected


@vsock
def test_preload_legacy_stream_echo_over_cid_1(built):
    text = "hello from a 2008 VMCI Sockets binary"
    _require_gate()
    server = subprocess.Popen(built["run"] + ["server", str(PORT)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=built["run_env"])
    try:
        ready, _, _ = select.select([server.stdout], [], [], TIMEOUT)
        assert ready, "the server did not start listening"
        first = server.stdout.readline()
        assert first == "listening on cid 1 port %d\n" % PORT, first + server.stderr.read()
        client = _run(built["run"] + ["client", str(VMADDR_CID_LOCAL), str(PORT), text],
                      built["run_env"])
        assert client.returncode == 0, client.stderr
        assert client.stdout == text + "\n"
        rest, err = server.communicate(timeout=TIMEOUT)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, err
    assert rest == "echoed %d bytes to cid 1\n" % len(text)
