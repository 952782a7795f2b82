"""libvmci.so.0 and legacy C programs (tests/c/): built here with the system C compiler,
run under ``vsockcompat run``, against each other and against Python peers on both cores."""
import os
import subprocess
import time
import types

import pytest

from conftest import PYTHON, child_env, make_settings
from vsockcompat import clib, ds_client
from vsockcompat.run import elf_info, run_env
from vsockcompat.runtime import Runtime

HERE = os.path.dirname(os.path.abspath(__file__))
C_DIR = os.path.join(HERE, "c")
SRC_DIR = os.path.join(os.path.dirname(HERE), "src")
CC = clib.find_compiler()
RUN = [PYTHON, "-m", "vsockcompat.run"]
PY_APP = [PYTHON, "-m", "vsockcompat", "datagram-app"]
PROGRAMS = ("datagramApp", "sdk_errors")
USAGE = ("datagramApp [-d <VMCI device>] -c|-s\n\t\tMust provide exactly one of -c OR -s.\n"
         "datagramApp -h:\n\tPrints this help message.\n")
SERVER_OUT = ("Running datagram server --- will respond to 3 queries.\n"
              + "Received message: HELLO, SERVER!\n" * 3)
CLIENT_OUT = "Received message: HELLO, CLIENT!\n"
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1"]
SANITIZER_ENV = {
    # Our library is preloaded after the executable's own libasan: allow that order.
    "ASAN_OPTIONS": "verify_asan_link_order=0:detect_leaks=1:abort_on_error=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=0",
}
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:", "SUMMARY:")

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH, and CC unset")


def _cc(args, cwd):
    result = subprocess.run(CC + args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert result.returncode == 0, "%s failed:\n%s" % (" ".join(CC + args), result.stdout)
    return result.stdout


def build(out_dir, extra=()):
    """Build libvmci.so.0 and the legacy programs into out_dir, as a user of the SDK would."""
    lib_dir = os.path.join(out_dir, "lib")
    library = clib.build_libvmci(lib_dir, src_dir=SRC_DIR, extra_cflags=list(extra), extra_ldflags=list(extra))
    programs = {}
    for name in PROGRAMS:
        exe = os.path.join(out_dir, name)
        warnings = _cc(["-Wall", "-Wextra", "-g", "-I", SRC_DIR] + list(extra)
                       + [os.path.join(C_DIR, name + ".c"), "-o", exe, "-L", lib_dir, "-lvmci", "-pthread"],
                       out_dir)
        assert warnings == "", warnings
        programs[name] = exe
    return types.SimpleNamespace(library=library, lib_dir=lib_dir, **programs)


@pytest.fixture(scope="module")
def cbuild(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("clib")))


def env_for(rundir, core_name, library, cid=2, **extra):
    env = child_env(rundir, core_name, cid=cid, VSOCKCOMPAT_LIBVMCI=library, VSOCKCOMPAT_PYTHON=PYTHON, **extra)
    for name in ("LD_PRELOAD", "LD_LIBRARY_PATH"):
        env.pop(name, None)
    return env


def c_app(cbuild, args):
    return RUN + ["--", cbuild.datagramApp] + args


def wait_registered(rundir, core, name="HOST INFO", timeout=30.0):
    runtime = Runtime(make_settings(rundir), core=core)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc, handle = ds_client.lookup_status(name, runtime=runtime)
        if rc == 0:
            return handle
        time.sleep(0.05)
    raise AssertionError("%r was never registered" % name)


def ping_pong(server_cmd, client_cmd, rundir, core, server_env, client_env):
    """datagramApp's server and three clients (context 3); returns the server's stderr."""
    server = subprocess.Popen(server_cmd, env=server_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_registered(rundir, core)
        for _ in range(3):
            client = subprocess.run(client_cmd, env=client_env, capture_output=True, text=True, timeout=60)
            assert (client.returncode, client.stdout) == (0, CLIENT_OUT), client.stderr
            assert all(m not in client.stderr for m in SANITIZER_MARKS), client.stderr
        out, err = server.communicate(timeout=60)
        assert (server.returncode, out) == (0, SERVER_OUT), err
        return err, client.stderr
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()


# The library


def test_library_exports_exactly_the_sdk(cbuild):
    info = elf_info(cbuild.library)
    assert info.soname == "libvmci.so.0"
    assert info.defined == set(clib.EXPORTED)
    assert not [n for n in info.needed if n.startswith("libvmci")]


def test_programs_need_libvmci_so_0(cbuild):
    info = elf_info(cbuild.datagramApp)
    assert "libvmci.so.0" in info.needed
    assert {n for n in info.undefined if n.startswith("VMCI")} == {
        "VMCI_InitApp", "VMCI_CleanupApp", "VMCIDatagram_CreateHnd", "VMCIDatagram_DestroyHnd",
        "VMCIDatagram_SendTo", "VMCIDatagram_RecvFrom", "VMCIDs_Lookup", "VMCIDs_Register", "VMCIDs_Unregister"}
    assert {n for n in elf_info(cbuild.sdk_errors).undefined if n.startswith("VMCI")} == set(clib.EXPORTED)


def test_run_env_prepends_and_appends():
    env = run_env("/x/lib/libvmci.so.0", {"LD_LIBRARY_PATH": "/a", "LD_PRELOAD": "libasan.so.8"})
    assert env["LD_LIBRARY_PATH"] == "/x/lib:/a"
    assert env["LD_PRELOAD"] == "libasan.so.8:/x/lib/libvmci.so.0"
    assert env["VSOCKCOMPAT_PYTHON"] == PYTHON


def test_include_dir(cbuild):
    result = subprocess.run([PYTHON, "-c", "from vsockcompat.run import include_dir_main; include_dir_main()"],
                            env=child_env("/tmp", "pure"), capture_output=True, text=True)
    assert os.path.isfile(os.path.join(result.stdout.strip(), "vmcilib.h"))


# vsockcompat run --check


def test_check_lists_the_sdk_symbols(cbuild, rundir):
    result = subprocess.run(RUN + ["--check", cbuild.datagramApp], env=env_for(rundir, "pure", cbuild.library),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == cbuild.datagramApp
    assert "  libvmci.so.0: provided by %s" % cbuild.library in lines
    assert "  SDK symbols needed: 9" in lines
    assert sum(line.endswith("  provided") for line in lines) == 9
    assert lines[-1] == "all 9 SDK symbols are provided"


def test_check_reports_missing_symbols(cbuild, rundir, tmp_path):
    # A program built against another libvmci.so.0 that had a call ours lacks.
    stub_dir = tmp_path / "old"
    stub_dir.mkdir()
    (tmp_path / "stub.c").write_text("int VMCI_InitApp(const char *d) { (void)d; return 0; }\n"
                                     "int VMCIEvent_Subscribe(void) { return 0; }\n")
    _cc(["-shared", "-fPIC", "-Wl,-soname,libvmci.so.0", "-o", str(stub_dir / "libvmci.so"), "stub.c"], str(tmp_path))
    (tmp_path / "prog.c").write_text("int VMCI_InitApp(const char *);\nint VMCIEvent_Subscribe(void);\n"
                                     "int main(void) { return VMCI_InitApp(0) + VMCIEvent_Subscribe(); }\n")
    _cc(["-o", "prog", "prog.c", "-L", str(stub_dir), "-lvmci"], str(tmp_path))
    result = subprocess.run(RUN + ["--check", str(tmp_path / "prog")], env=env_for(rundir, "pure", cbuild.library),
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "    VMCIEvent_Subscribe  MISSING" in result.stdout
    assert "    VMCI_InitApp         provided" in result.stdout
    assert result.stdout.splitlines()[-1] == "1 of 2 SDK symbols are MISSING: VMCIEvent_Subscribe"


def test_check_reports_the_sockets_preload(cbuild, rundir, tmp_path):
    preload = tmp_path / "libvsockcompat-preload.so"
    preload.write_bytes(b"")  # only its presence is reported; --check loads nothing
    base = env_for(rundir, "pure", cbuild.library, VSOCKCOMPAT_LIBPRELOAD=str(preload))

    def preload_line(**extra):
        result = subprocess.run(RUN + ["--check", cbuild.datagramApp], env=dict(base, **extra),
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return [line for line in result.stdout.splitlines() if line.startswith("  VMCI Sockets")]

    assert preload_line() == ["  VMCI Sockets preload: %s" % preload]
    assert preload_line(VSOCKCOMPAT_PRELOAD="0") == ["  VMCI Sockets preload: left out (VSOCKCOMPAT_PRELOAD=0)"]
    assert preload_line(VSOCKCOMPAT_LIBPRELOAD="/no/such.so") == ["  VMCI Sockets preload: NOT BUILT"]
    required = subprocess.run(RUN + ["--check", cbuild.datagramApp],
                              env=dict(base, VSOCKCOMPAT_PRELOAD="1", VSOCKCOMPAT_LIBPRELOAD="/no/such.so"),
                              capture_output=True, text=True)
    assert required.returncode == 2
    assert "VSOCKCOMPAT_PRELOAD=1 but libvsockcompat-preload.so is not at /no/such.so" in required.stderr


def test_check_notices_a_vmci_sockets_program(cbuild, rundir, tmp_path):
    # VMware's inline VMCISock_GetAFValue() opens /dev/vsock: the path is in the binary.
    (tmp_path / "sock.c").write_text('#include <fcntl.h>\nint main(void) { return open("/dev/vsock", O_RDONLY) < 0; }\n')
    _cc(["-o", "sock", "sock.c"], str(tmp_path))
    env = env_for(rundir, "pure", cbuild.library, VSOCKCOMPAT_PRELOAD="0")
    result = subprocess.run(RUN + ["--check", str(tmp_path / "sock")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert ("  VMCI Sockets: the program names /dev/vsock; if it was built with VMware's vmci_sockets.h, its "
            "address family comes from the preload (which it will not get)") in result.stdout.splitlines()
    plain = subprocess.run(RUN + ["--check", cbuild.datagramApp], env=env, capture_output=True, text=True)
    assert "names /dev/vsock" not in plain.stdout


def test_a_program_of_another_abi_is_refused_clearly(cbuild, rundir, tmp_path):
    # The datagramApp binary, relabelled as an AArch64 program (e_machine at offset 18).
    foreign = tmp_path / "datagramApp"
    with open(cbuild.datagramApp, "rb") as f:
        data = bytearray(f.read())
    data[18:20] = (183).to_bytes(2, "little")
    foreign.write_bytes(bytes(data))
    foreign.chmod(0o755)
    assert elf_info(str(foreign)).abi == "64-bit AArch64"
    assert elf_info(cbuild.library).abi == "64-bit x86-64"
    why = "the program is 64-bit AArch64 but libvmci.so.0 is 64-bit x86-64: ld.so cannot load it"
    env = env_for(rundir, "pure", cbuild.library)
    checked = subprocess.run(RUN + ["--check", str(foreign)], env=env, capture_output=True, text=True)
    assert checked.returncode == 1
    assert checked.stdout.splitlines()[-1].startswith(why)
    ran = subprocess.run(RUN + ["--", str(foreign), "-c"], env=env, capture_output=True, text=True, timeout=30)
    assert ran.returncode == 2
    assert ran.stderr.startswith("vsockcompat run: %s: %s" % (foreign, why))


@pytest.mark.parametrize("args, status", [([], 2), (["--check"], 2), (["--bogus", "x"], 2),
                                          (["--check", "/etc/hostname"], 2), (["--check", "/no/such"], 2),
                                          (["--", "/no/such/program"], 127)])
def test_run_bad_usage(cbuild, rundir, args, status):
    result = subprocess.run(RUN + args, env=env_for(rundir, "pure", cbuild.library), capture_output=True, text=True)
    assert result.returncode == status
    assert result.stderr.startswith(("usage:", "vsockcompat run"))


def test_run_without_a_library(rundir):
    env = env_for(rundir, "pure", "/no/such/libvmci.so.0")
    result = subprocess.run(RUN + ["--", "true"], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "libvmci.so.0 not found" in result.stderr


# datagramApp (vmci-sdk.md 7.1) in C


def test_c_server_and_c_clients(cbuild, rundir, core):
    ping_pong(c_app(cbuild, ["-s"]), c_app(cbuild, ["-c", "-d", "/dev/vmci"]), rundir, core,
              env_for(rundir, core.NAME, cbuild.library, cid=2), env_for(rundir, core.NAME, cbuild.library, cid=3))
    late = subprocess.run(c_app(cbuild, ["-c"]), env=env_for(rundir, core.NAME, cbuild.library, cid=3),
                          capture_output=True, text=True, timeout=60)
    assert (late.returncode, late.stdout, late.stderr) == (0, "", "Failed to lookup in discovery service.\n")
    assert sorted(os.listdir(os.path.join(rundir, "c3"))) == [".lock", ".next"]


def test_c_server_and_python_clients(cbuild, rundir, core):
    ping_pong(c_app(cbuild, ["-s"]), PY_APP + ["-c"], rundir, core,
              env_for(rundir, core.NAME, cbuild.library, cid=2), child_env(rundir, core.NAME, cid=3))


def test_python_server_and_c_clients(cbuild, rundir, core):
    ping_pong(PY_APP + ["-s"], c_app(cbuild, ["-c"]), rundir, core,
              child_env(rundir, core.NAME, cid=2), env_for(rundir, core.NAME, cbuild.library, cid=3))


def test_a_second_c_server_cannot_register(cbuild, rundir, core):
    first = subprocess.Popen(PY_APP + ["-s"], env=child_env(rundir, core.NAME), stdout=subprocess.PIPE, text=True)
    try:
        wait_registered(rundir, core)
        second = subprocess.run(c_app(cbuild, ["-s"]), env=env_for(rundir, core.NAME, cbuild.library),
                                capture_output=True, text=True, timeout=60)
        assert (second.returncode, second.stdout) == (0, "")
        assert second.stderr == "Failed to register discovery service. rv = -22\n"
    finally:
        first.kill()
        first.wait()
        first.stdout.close()


@pytest.mark.parametrize("args", [[], ["-s", "-c"], ["-h"], ["-s", "extra"], ["-x"], ["-d"]])
def test_c_usage(cbuild, rundir, args):
    result = subprocess.run(c_app(cbuild, args), env=env_for(rundir, "pure", cbuild.library),
                            capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (255, "")
    # getopt itself names an unknown option or a missing argument first, as in the original.
    assert result.stderr.endswith(USAGE)
    assert result.stderr == USAGE or args in (["-x"], ["-d"])


# Never VSOCKCOMPAT_TRANSPORT=vsock here: on this machine it would reach AF_VSOCK (the vsock
# transport's refusals are proven with AF_VSOCK shut off, in test_clib_vsock_guard.py).
@pytest.mark.parametrize("setting", [{"VSOCKCOMPAT_RUNDIR": "/tmp/" + "y" * 80}, {"VSOCKCOMPAT_CID": "two"},
                                     {"VSOCKCOMPAT_TRANSPORT": "vsock2"}, {"VSOCKCOMPAT_DS_AUTOSTART": "yes"},
                                     {"VSOCKCOMPAT_VSOCK_MODE": "datagram"}])
def test_c_init_failure_exits_254(cbuild, rundir, setting):
    env = env_for(rundir, "pure", cbuild.library)
    env.update(setting)
    # Run the binary directly: the library reads the settings, not `vsockcompat run`.
    env["LD_LIBRARY_PATH"] = cbuild.lib_dir
    result = subprocess.run([cbuild.datagramApp, "-c"], env=env, capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (254, "Failed to init VMCI library.\n")


# Every call's error paths, threads and fork()


EXPECTED_BEFORE_INIT = {
    "create_invalid": 1, "destroy": -20, "send": -20, "recv": -20, "recv_src_invalid": 1, "lookup": -20,
    "lookup_out_invalid": 1, "register": -20, "unregister": -20, "shm_create_invalid": 1,
    "shm_create_addr_null": 1, "shm_query": -20, "shm_attach": -20, "shm_detach": -20, "privileges": -20,
}
EXPECTED = dict(
    {"before_init_" + k: v for k, v in EXPECTED_BEFORE_INIT.items()},
    **{"after_cleanup_" + k: v for k, v in EXPECTED_BEFORE_INIT.items()},
    init=0, init_device=0,
    create_auto_ok=1, create_fixed_ok=1, create_fixed_again_invalid=1,
    send_ok=24 + 5, send_empty=24, send_null_buffer=-2, send_too_large=-2, send_huge_length=-2,
    send_src_not_ours=-2, send_src_invalid=-2, send_hypervisor=-10, send_no_context=-10, send_no_resource=-1,
    recv_ok=5, recv_src_ok=1, recv_payload_ok=1, recv_empty=0, recv_null_buffer=-2, recv_not_ours=-2,
    recv_too_small=-3, recv_too_small_again=-3, recv_after_too_small=10, recv_after_too_small_src_ok=1,
    recv_after_too_small_payload_ok=1,
    send_max=69632, send_max_second=-19, recv_max=69608, recv_max_payload_ok=1,
    queue_full_after=135, queue_full=-19, queue_drained_send=25, queue_drained_recv=1,
    send_to_live=25, destroy=0, destroy_again=-21, destroy_unknown=-21, destroy_invalid=-21,
    send_to_destroyed=-1, send_from_destroyed=-2, recv_destroyed=-2,
    ds_lookup_null_name=-2, ds_lookup_null_out=-2, ds_lookup_long_name=-2, ds_register_long_name=-2,
    ds_unregister_long_name=-2, ds_lookup_longest_name=-21, ds_register_null_name=-2,
    ds_unregister_null_name=-2, ds_register_invalid_handle=-2, ds_lookup_group=0, ds_group_ok=1,
    ds_unregister_group=-7, ds_register=0, ds_register_again=-22, ds_lookup=0, ds_lookup_ok=1,
    ds_lookup_case=-21, ds_lookup_case_out_invalid=1, ds_unregister=0, ds_unregister_again=-21,
    ds_lookup_gone=-21, ds_register_dies_with_handle=0, ds_lookup_destroyed=-21,
    shm_create_invalid=0, shm_create_addr_null=0, shm_create_null_out_invalid=1, shm_query=-21,
    shm_query_null=-2, shm_attach=-21, shm_attach_null=-2, shm_detach=-21,
    priv_ok=0, priv_deny_ok=0, priv_none=-2, priv_negative_count=-2, priv_null_array=-2,
    priv_invalid_resource=-2, priv_invalid_client=-2, priv_unknown=-12, priv_negative=-12,
    threads_send_failures=0, threads_received=400, threads_churn_failures=0,
    recv_across_signal=4, recv_across_signal_sent=28,
    destroy_while_receiving=0, recv_interrupted_by_destroy=-6, hot_send=25, hot_recv=1,
    destroy_while_receiving_hot=0, recv_hot_interrupted_by_destroy=-6, recv_interrupted_by_cleanup=-6, reinit=0,
    fork_child_status=0, fork_parent_recv=5, fork_parent_payload_ok=1, fork_src_ok=1,
    fork_parent_send=26, fork_parent_recv_own=2, fork_parent_destroy=0,
    done=1,
)


def run_sdk_errors(program, env):
    result = subprocess.run(RUN + ["--", program], env=env, capture_output=True, text=True, timeout=90)
    got = dict(line.split("=", 1) for line in result.stdout.splitlines())
    return result, {k: int(v) for k, v in got.items()}


def differences(got):
    return {k: (got.get(k), EXPECTED.get(k)) for k in set(got) | set(EXPECTED) if got.get(k) != EXPECTED.get(k)}


def test_sdk_error_paths(cbuild, rundir, core):
    # The first discovery call finds no daemon: the C library starts one (autostart).
    result, got = run_sdk_errors(cbuild.sdk_errors, env_for(rundir, core.NAME, cbuild.library))
    assert result.returncode == 0, result.stderr
    assert differences(got) == {}, result.stderr
    assert result.stderr == ""
    assert os.path.exists(os.path.join(rundir, "ds.log"))
    assert sorted(os.listdir(os.path.join(rundir, "c2"))) == [".lock", ".next"]


def test_sdk_error_paths_match_the_python_sdk(runtime):
    """The C codes above are the Python side's for the same situations."""
    from vsockcompat.constants import VMCI_MAX_DG_PAYLOAD_SIZE
    from vsockcompat.sdk import VMCILibrary

    lib = VMCILibrary(runtime)
    assert lib.VMCIDatagram_SendTo((2, 1024), (2, 1025), 1, b"x") == EXPECTED["before_init_send"]
    assert lib.VMCIDatagram_DestroyHnd((2, 1024)) == EXPECTED["before_init_destroy"]
    assert lib.VMCI_InitApp(None) == 0
    try:
        a, b = lib.VMCIDatagram_CreateHnd(0), lib.VMCIDatagram_CreateHnd(0)
        assert lib.VMCIDatagram_SendTo(b, a, 5, b"hello") == EXPECTED["send_ok"]
        assert lib.VMCIDatagram_SendTo(b, a, VMCI_MAX_DG_PAYLOAD_SIZE + 1,
                                       bytes(VMCI_MAX_DG_PAYLOAD_SIZE + 1)) == EXPECTED["send_too_large"]
        assert lib.VMCIDatagram_SendTo(b, (2, 5555), 1, b"x") == EXPECTED["send_src_not_ours"]
        assert lib.VMCIDatagram_SendTo((0, 1024), a, 1, b"x") == EXPECTED["send_hypervisor"]
        assert lib.VMCIDatagram_SendTo((77777, 1024), a, 1, b"x") == EXPECTED["send_no_context"]
        assert lib.VMCIDatagram_SendTo((2, 5555), a, 1, b"x") == EXPECTED["send_no_resource"]
        assert lib.VMCIDatagram_SendTo(b, a, 10, b"0123456789") == 34
        assert lib.VMCIDatagram_RecvFrom(b, bytearray(20))[0] == EXPECTED["recv_ok"]
        assert lib.VMCIDatagram_RecvFrom(b, bytearray(4))[0] == EXPECTED["recv_too_small"]
        assert lib.VMCIDatagram_RecvFrom(b, bytearray(10))[0] == EXPECTED["recv_after_too_small"]
        assert lib.VMCIDatagram_RecvFrom((2, 5555), bytearray(4))[0] == EXPECTED["recv_not_ours"]
        assert lib.VMCIDatagram_DestroyHnd(b) == EXPECTED["destroy"]
        assert lib.VMCIDatagram_DestroyHnd(b) == EXPECTED["destroy_again"]
        assert lib.VMCIDatagram_SendTo(b, a, 1, b"x") == EXPECTED["send_to_destroyed"]
        assert lib.VMCIDatagram_SendTo(a, b, 1, b"x") == EXPECTED["send_from_destroyed"]
        assert lib.VMCIDs_Lookup("x" * 301)[0] == EXPECTED["ds_lookup_long_name"]
    finally:
        lib.VMCI_CleanupApp()


# Sanitizers


def _sanitizers_work(tmp_dir):
    src = os.path.join(tmp_dir, "probe.c")
    with open(src, "w") as f:
        f.write("int main(void) { return 0; }\n")
    exe = os.path.join(tmp_dir, "probe")
    built = subprocess.run(CC + SANITIZE + [src, "-o", exe], capture_output=True, text=True)
    if built.returncode != 0:
        return "the C toolchain cannot link -fsanitize=address,undefined: %s" % built.stderr.strip()[:200]
    ran = subprocess.run([exe], capture_output=True, text=True, env=dict(os.environ, **SANITIZER_ENV))
    if ran.returncode != 0:
        return "sanitized programs do not run here: %s" % ran.stderr.strip()[:200]
    return None


@pytest.mark.slow
def test_under_address_and_undefined_behaviour_sanitizers(tmp_path, rundir, core):
    reason = _sanitizers_work(str(tmp_path))
    if reason:
        pytest.skip(reason)
    sb = build(str(tmp_path), SANITIZE)
    server_env = env_for(rundir, core.NAME, sb.library, cid=2, **SANITIZER_ENV)
    client_env = env_for(rundir, core.NAME, sb.library, cid=3, **SANITIZER_ENV)
    server_err, client_err = ping_pong(RUN + ["--", sb.datagramApp, "-s"], RUN + ["--", sb.datagramApp, "-c"],
                                       rundir, core, server_env, client_env)
    assert server_err == "" and client_err == ""
    result, got = run_sdk_errors(sb.sdk_errors, server_env)
    assert result.returncode == 0, result.stderr
    assert not [m for m in SANITIZER_MARKS if m in result.stderr], result.stderr
    assert result.stderr == ""
    assert differences(got) == {}
