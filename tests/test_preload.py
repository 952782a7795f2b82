"""libvsockcompat-preload.so (src/vsc_preload.c) on this machine, where no AF_VSOCK socket may be
made and the real /dev/vsock must not be touched.

The preload opens ``VSOCKCOMPAT_VSOCK_DEVICE`` (a test file here) when a program opens
"/dev/vsock" and recognises that file as the device, so the legacy program's own inline helpers
(tests/c/vmci_sockets_legacy.c, built with -DVSC_HOST_ONLY: no socket code at all, and it exits 3
before any ioctl on a descriptor that is not a regular file) run for real. Socket options are
checked on AF_UNIX sockets only (pass-through); on AF_VSOCK they run in the guest test bed
(tests/real_vsock/test_preload.py).
"""
import errno
import os
import socket
import subprocess
import types

import pytest

from conftest import PYTHON, child_env
from vsockcompat import clib
from vsockcompat.run import elf_info, run_env, sockets_preload

HERE = os.path.dirname(os.path.abspath(__file__))
SRC_DIR = os.path.join(os.path.dirname(HERE), "src")
LEGACY = os.path.join(HERE, "c", "vmci_sockets_legacy.c")
CC = clib.find_compiler()
RUN = [PYTHON, "-m", "vsockcompat.run", "--"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1"]
SANITIZER_ENV = {"ASAN_OPTIONS": "verify_asan_link_order=0:detect_leaks=1",
                 "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:", "SUMMARY:")
INTERPOSED = {"open", "open64", "openat", "openat64", "__open_2", "__open64_2", "__openat_2",
              "__openat64_2", "ioctl", "getsockopt", "setsockopt"}
AF_VSOCK = 40
GET_AF_VALUE = 1976
ANY = 0xFFFFFFFF

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH, and CC unset")


def build(out_dir, extra=()):
    """The preload, libvmci.so.0 (``vsockcompat run`` needs it) and the host-only legacy program."""
    lib_dir = os.path.join(out_dir, "lib")
    preload = clib.build_preload(lib_dir, src_dir=SRC_DIR, extra_cflags=list(extra), extra_ldflags=list(extra))
    library = clib.build_libvmci(lib_dir, src_dir=SRC_DIR)
    exe = os.path.join(out_dir, "vmci_sockets_legacy")
    proc = subprocess.run(CC + ["-std=gnu89", "-Wall", "-Wextra", "-Werror", "-g", "-DVSC_HOST_ONLY"]
                          + list(extra) + [LEGACY, "-o", exe],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout
    device = os.path.join(out_dir, "fake-vsock")
    with open(device, "w"):
        pass
    return types.SimpleNamespace(preload=preload, library=library, exe=exe, device=device)


@pytest.fixture(scope="module")
def pbuild(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("preload")))


def env_for(b, rundir, **extra):
    env = child_env(rundir, "pure", VSOCKCOMPAT_LIBVMCI=b.library, VSOCKCOMPAT_LIBPRELOAD=b.preload,
                    VSOCKCOMPAT_VSOCK_DEVICE=b.device, VSOCKCOMPAT_PYTHON=PYTHON)
    for name in ("LD_PRELOAD", "LD_LIBRARY_PATH", "VSOCKCOMPAT_PRELOAD"):
        env.pop(name, None)
    env.update(extra)
    return env


def run_legacy(b, rundir, mode, prefix=(), **extra):
    proc = subprocess.run(RUN + list(prefix) + [b.exe, mode], env=env_for(b, rundir, **extra),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 3, "the host guard fired: %s" % proc.stderr
    return proc


def parse(stdout):
    """``NAME rc=R errno=E value=V`` lines as {NAME: {"rc": R, ...}}; ``NAME V`` as {NAME: V}."""
    out = {}
    for line in stdout.splitlines():
        name, _, rest = line.partition(" ")
        if "=" in rest:
            out[name] = dict(field.split("=", 1) for field in rest.split())
        else:
            out[name] = rest
    return out


def _errname(code):
    """The C program's spelling (EOPNOTSUPP, which is ENOTSUP's number on Linux)."""
    if not code:
        return "0"
    return "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode[code]


# The library and `vsockcompat run`


def test_preload_exports_only_the_interposed_calls(pbuild):
    info = elf_info(pbuild.preload)
    assert info.defined == INTERPOSED
    assert info.soname is None


def test_run_env_appends_libvmci_then_the_preload():
    env = run_env("/x/lib/libvmci.so.0", {"LD_PRELOAD": "libasan.so.8"}, preload="/x/lib/p.so")
    assert env["LD_PRELOAD"] == "libasan.so.8:/x/lib/libvmci.so.0:/x/lib/p.so"
    assert run_env("/x/lib/libvmci.so.0", {}, preload=None)["LD_PRELOAD"] == "/x/lib/libvmci.so.0"


def test_sockets_preload_setting(pbuild, monkeypatch, tmp_path):
    # The preload's path comes from the environment given, not this process's.
    monkeypatch.setenv(clib.PRELOAD_ENV, str(tmp_path / "missing.so"))
    built = {clib.PRELOAD_ENV: pbuild.preload}
    assert sockets_preload(built) == pbuild.preload
    assert sockets_preload(dict(built, VSOCKCOMPAT_PRELOAD="1")) == pbuild.preload
    assert sockets_preload(dict(built, VSOCKCOMPAT_PRELOAD="0")) is None
    with pytest.raises(ValueError, match="VSOCKCOMPAT_PRELOAD must be 0 or 1"):
        sockets_preload(dict(built, VSOCKCOMPAT_PRELOAD="yes"))
    missing = {clib.PRELOAD_ENV: str(tmp_path / "missing.so")}
    assert sockets_preload(missing) is None                   # unset: only when built
    with pytest.raises(ValueError, match="is not at"):
        sockets_preload(dict(missing, VSOCKCOMPAT_PRELOAD="1"))  # required


@pytest.mark.parametrize("setting, present", [(None, True), ("1", True), ("0", False)])
def test_vsockcompat_run_adds_the_preload_unless_opted_out(pbuild, rundir, setting, present):
    extra = {} if setting is None else {"VSOCKCOMPAT_PRELOAD": setting}
    proc = subprocess.run(RUN + [PYTHON, "-c", "import os; print(os.environ['LD_PRELOAD'])"],
                          env=env_for(pbuild, rundir, **extra), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    entries = proc.stdout.strip().split(":")
    assert entries[0] == pbuild.library
    assert (entries[-1] == pbuild.preload) is present and len(entries) == 1 + present


@pytest.mark.parametrize("setting, message", [("maybe", "must be 0 or 1"), ("1", "is not at")])
def test_vsockcompat_run_refuses_a_bad_preload_setting(pbuild, rundir, tmp_path, setting, message):
    env = env_for(pbuild, rundir, VSOCKCOMPAT_PRELOAD=setting,
                  VSOCKCOMPAT_LIBPRELOAD=str(tmp_path / "missing.so"))
    proc = subprocess.run(RUN + ["true"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


# The legacy program's inline helpers


def test_legacy_helpers_get_af_vsock(pbuild, rundir):
    proc = run_legacy(pbuild, rundir, "helpers")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert parse(proc.stdout) == {
        "af": "40", "fd_kept": "1", "af_again": "40",
        "cid": str(ANY),          # 1977 on a plain file: the kernel's ENOTTY, so VMADDR_CID_ANY
        "version": str(ANY),      # 1972 passes through too: VMCI_SOCKETS_INVALID_VERSION
    }


def test_an_unusable_device_setting_never_falls_back_to_dev_vsock(pbuild, rundir):
    proc = run_legacy(pbuild, rundir, "helpers", VSOCKCOMPAT_VSOCK_DEVICE="/" + "x" * 5000)
    assert proc.returncode == 1, proc.stderr
    assert parse(proc.stdout)["af"] == "-1"


def test_legacy_bad_input(pbuild, rundir):
    proc = run_legacy(pbuild, rundir, "badinput")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    got = parse(proc.stdout)
    assert got.pop("af_null") == {"rc": "-1", "errno": "EFAULT"}
    assert got.pop("af_unmapped") == {"rc": "-1", "errno": "EFAULT"}
    assert got.pop("af") == {"rc": "0", "errno": "0", "value": "40"}
    assert got.pop("af_dup") == {"rc": "0", "errno": "0", "value": "40"}     # identity, not bookkeeping
    # Not the device: the kernel's answers, the argument untouched.
    assert got.pop("pipe_af") == {"rc": "-1", "errno": "ENOTTY", "value": "12345"}
    assert got.pop("pipe_af_null") == {"rc": "-1", "errno": "ENOTTY"}
    assert got.pop("closed_af") == {"rc": "-1", "errno": "EBADF", "value": "12345"}
    assert got.pop("negative_fd_af") == {"rc": "-1", "errno": "EBADF"}
    # Level 40 on AF_UNIX: exactly what this process gets from the kernel without the preload.
    expected = {}
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        for name, call in [("get_trusted", lambda: a.getsockopt(AF_VSOCK, 5, 4)),
                           ("get_cause", lambda: a.getsockopt(AF_VSOCK, 8, 4)),
                           ("set_cause", lambda: a.setsockopt(AF_VSOCK, 8, b"\0" * 4)),
                           ("set_size_short", lambda: a.setsockopt(AF_VSOCK, 0, b"\0" * 4)),
                           ("get_unknown", lambda: a.getsockopt(AF_VSOCK, 99, 4)),
                           ("set_unknown", lambda: a.setsockopt(AF_VSOCK, 99, b"\0" * 4))]:
            try:
                call()
                expected["unix_" + name] = {"rc": "0", "errno": "0"}
            except OSError as exc:
                expected["unix_" + name] = {"rc": "-1", "errno": _errname(exc.errno)}
    assert got == expected


# The interposed calls from a program that is not the legacy one

PROBE = r"""
import fcntl, os, struct, sys
preload, device = sys.argv[1], sys.argv[2]
with open("/proc/self/maps") as maps:
    if preload not in maps.read():
        sys.exit("refusing: the preload is not loaded, /dev/vsock would be the real one")
fd = os.open("/dev/vsock", os.O_RDONLY)
assert os.fstat(fd).st_ino == os.stat(device).st_ino, "not redirected"
print("af", struct.unpack("i", fcntl.ioctl(fd, 1976, b"\0" * 4))[0])
try:
    fcntl.ioctl(fd, 1976, 0)                       # NULL
except OSError as exc:
    print("null", exc.errno)
dirfd = os.open("/", os.O_RDONLY)
fd2 = os.open("/dev/vsock", os.O_RDONLY, dir_fd=dirfd)   # openat
print("openat", os.fstat(fd2).st_ino == os.stat(device).st_ino)
fd3 = os.open(os.path.join(os.path.dirname(device), "created"), os.O_CREAT | os.O_WRONLY, 0o640)
print("mode", oct(os.fstat(fd3).st_mode & 0o777))
try:
    fcntl.ioctl(fd3, 1976, b"\0" * 4)              # another file: untouched
except OSError as exc:
    print("other", exc.errno)
"""


def test_interposed_open_openat_and_ioctl(pbuild, tmp_path):
    env = dict(os.environ, LD_PRELOAD=pbuild.preload, VSOCKCOMPAT_VSOCK_DEVICE=pbuild.device)
    old = os.umask(0o022)
    try:
        proc = subprocess.run([PYTHON, "-c", PROBE, pbuild.preload, pbuild.device], env=env,
                              capture_output=True, text=True, timeout=60)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    assert parse(proc.stdout) == {"af": "40", "null": str(errno.EFAULT), "openat": "True",
                                  "mode": "0o640", "other": str(errno.ENOTTY)}
    os.unlink(os.path.join(os.path.dirname(pbuild.device), "created"))


def test_without_the_setting_other_paths_and_ioctls_pass_through(pbuild, tmp_path):
    path = tmp_path / "plain"
    path.write_bytes(b"x")
    script = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\n"
              "try:\n    fcntl.ioctl(fd, 1976, b'\\0' * 4)\nexcept OSError as e:\n    print(e.errno)\n")
    env = dict(os.environ, LD_PRELOAD=pbuild.preload)
    env.pop("VSOCKCOMPAT_VSOCK_DEVICE", None)
    proc = subprocess.run([PYTHON, "-c", script, str(path)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, str(errno.ENOTTY)), proc.stderr


FORTIFIED = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* Refuses to open "/dev/vsock" unless the preload is mapped (it then opens the test file). */
static int PreloadMapped(void)
{
   char line[4096];
   int found = 0;
   FILE *maps = fopen("/proc/self/maps", "r");

   while (maps != NULL && fgets(line, sizeof line, maps) != NULL) {
      found |= strstr(line, "libvsockcompat-preload") != NULL;
   }
   if (maps != NULL) {
      fclose(maps);
   }
   return found;
}

int main(int argc, char **argv)
{
   int flags = atoi(argv[1]);      /* not a constant: _FORTIFY_SOURCE calls __open_2 */
   struct stat device, got;
   int fd, fd2;

   if (!PreloadMapped() || getenv("VSOCKCOMPAT_VSOCK_DEVICE") == NULL) {
      return 3;
   }
   fd = open("/dev/vsock", flags);
   fd2 = openat(AT_FDCWD, "/dev/vsock", flags);
   if (argc != 3 || fd < 0 || fd2 < 0 || stat(argv[2], &device) != 0) {
      return 1;
   }
   fstat(fd, &got);
   printf("open %d\n", got.st_ino == device.st_ino);
   fstat(fd2, &got);
   printf("openat %d\n", got.st_ino == device.st_ino);
   return 0;
}
"""


def test_fortified_open_entry_points(pbuild, tmp_path):
    src, exe = tmp_path / "fortified.c", str(tmp_path / "fortified")
    src.write_text(FORTIFIED)
    built = subprocess.run(CC + ["-O2", "-D_FORTIFY_SOURCE=2", str(src), "-o", exe], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert {"__open_2", "__openat_2"} <= elf_info(exe).undefined
    env = dict(os.environ, LD_PRELOAD=pbuild.preload, VSOCKCOMPAT_VSOCK_DEVICE=pbuild.device)
    proc = subprocess.run([exe, str(os.O_RDONLY), pbuild.device], env=env, capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "open 1\nopenat 1\n"), proc.stderr


# Sanitizers and valgrind


def _sanitizers_work(tmp_dir):
    src = os.path.join(tmp_dir, "probe.c")
    with open(src, "w") as f:
        f.write("int main(void) { return 0; }\n")
    exe = os.path.join(tmp_dir, "probe")
    if subprocess.run(CC + SANITIZE + [src, "-o", exe], capture_output=True).returncode != 0:
        return "the C toolchain cannot link -fsanitize=address,undefined"
    ran = subprocess.run([exe], capture_output=True, text=True, env=dict(os.environ, **SANITIZER_ENV))
    return None if ran.returncode == 0 else "sanitized programs do not run here"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_preload_under_address_and_undefined_behaviour_sanitizers(tmp_path, rundir):
    reason = _sanitizers_work(str(tmp_path))
    if reason:
        pytest.skip(reason)
    sb = build(str(tmp_path), SANITIZE)
    for mode in ("helpers", "badinput"):
        proc = run_legacy(sb, rundir, mode, **SANITIZER_ENV)
        assert proc.returncode == 0, proc.stderr
        assert not [m for m in SANITIZER_MARKS if m in proc.stderr], proc.stderr
        assert parse(proc.stdout).get("af", {}) in ("40", {"rc": "0", "errno": "0", "value": "40"})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_preload_under_valgrind_memcheck(tmp_path, rundir):
    import test_clib_valgrind as tv
    if tv.VALGRIND is None:
        pytest.skip("valgrind is not installed")
    reason = tv._valgrind_works()
    if reason:
        pytest.skip(reason)
    db = build(str(tmp_path), ["-O0"])
    for mode in ("helpers", "badinput"):
        proc = run_legacy(db, rundir, mode, prefix=[tv.VALGRIND] + tv.MEMCHECK + ["--"])
        assert proc.returncode == 0, proc.stderr
        tv.assert_clean(proc.stderr)
