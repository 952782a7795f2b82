"""src/vmci_sockets.h, the VMCI Sockets compatibility header (vmci-sdk.md section 10.1): compile only.

This machine's /dev/vsock leads to a hypervisor host that is not ours, so nothing built here from
the header is ever run: its helpers, and vsock_echo, would touch AF_VSOCK. The compiler's own
static assertions check the constants; the real run is tests/real_vsock/test_vmci_sockets.py,
inside the guest test bed.
"""
import os
import re
import shutil
import subprocess

import pytest

from vsockcompat import clib

HERE = os.path.dirname(os.path.abspath(__file__))
SRC_DIR = os.path.join(os.path.dirname(HERE), "src")
HEADER = os.path.join(SRC_DIR, "vmci_sockets.h")
ECHO = os.path.join(HERE, "c", "vsock_echo.c")
CC = clib.find_compiler()
CXX = next((shutil.which(name) for name in (os.environ.get("CXX"), "c++", "g++", "clang++")
            if name and shutil.which(name)), None)
WARN = ["-Wall", "-Wextra", "-Wpedantic", "-Werror"]

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH, and CC unset")

# Every helper is called (so that it is instantiated and type-checked) from a function that
# nothing calls: compiled with -fsyntax-only, never run.
USES_EVERY_HELPER = """
#include "vmci_sockets.h"

int vsc_use_every_helper(void);
int vsc_use_every_helper(void)
{
   int fd = -2;
   int af = VMCISock_GetAFValue();
   int af2 = VMCISock_GetAFValueFd(&fd);
   unsigned int cid = VMCISock_GetLocalCID();
   unsigned int version = VMCISock_Version();
   struct sockaddr_vm addr;

   VMCISock_ReleaseAFValueFd(fd);
   (void)VMCISock_GetAFValueFd(NULL);
   addr.svm_family = (sa_family_t)af;
   addr.svm_cid = cid;
   addr.svm_port = VMADDR_PORT_ANY;
   return af + af2 + (int)addr.svm_port + (int)VMCI_SOCKETS_VERSION_EPOCH(version)
          + (int)VMCI_SOCKETS_VERSION_MAJOR(version) + (int)VMCI_SOCKETS_VERSION_MINOR(version);
}
"""

ASSERT = "typedef char vsc_assert_%d[(%s) ? 1 : -1];"

# Against <linux/vm_sockets.h>, included first and on its own terms.
LINUX_CHECKS = [
    "SO_VMCI_BUFFER_SIZE == SO_VM_SOCKETS_BUFFER_SIZE && SO_VMCI_BUFFER_SIZE == 0",
    "SO_VMCI_BUFFER_MIN_SIZE == SO_VM_SOCKETS_BUFFER_MIN_SIZE && SO_VMCI_BUFFER_MIN_SIZE == 1",
    "SO_VMCI_BUFFER_MAX_SIZE == SO_VM_SOCKETS_BUFFER_MAX_SIZE && SO_VMCI_BUFFER_MAX_SIZE == 2",
    "SO_VMCI_PEER_HOST_VM_ID == SO_VM_SOCKETS_PEER_HOST_VM_ID && SO_VMCI_PEER_HOST_VM_ID == 3",
    "SO_VMCI_TRUSTED == SO_VM_SOCKETS_TRUSTED && SO_VMCI_TRUSTED == 5",
    "SO_VMCI_CONNECT_TIMEOUT == SO_VM_SOCKETS_CONNECT_TIMEOUT",
    "SO_VMCI_CONNECT_TIMEOUT == (sizeof(long) == 8 ? 6 : SO_VM_SOCKETS_CONNECT_TIMEOUT)",
    "SO_VMCI_NONBLOCK_TXRX == SO_VM_SOCKETS_NONBLOCK_TXRX && SO_VMCI_NONBLOCK_TXRX == 7",
    "AF_VSOCK == 40",
    "VMADDR_CID_ANY == 0xFFFFFFFFu && VMADDR_PORT_ANY == 0xFFFFFFFFu",
    "VMADDR_CID_HYPERVISOR == 0 && VMADDR_CID_LOCAL == 1 && VMADDR_CID_HOST == 2",
    "VMADDR_FLAG_TO_HOST == 1",
    "VMCI_SOCKETS_GET_LOCAL_CID == IOCTL_VM_SOCKETS_GET_LOCAL_CID && VMCI_SOCKETS_GET_LOCAL_CID == 1977",
    "VMCI_SOCKETS_INVALID_VERSION == VM_SOCKETS_INVALID_VERSION",
    "VMCI_SOCKETS_VERSION_EPOCH(0x12345678u) == VM_SOCKETS_VERSION_EPOCH(0x12345678u)",
    "VMCI_SOCKETS_VERSION_MAJOR(0x12345678u) == VM_SOCKETS_VERSION_MAJOR(0x12345678u)",
    "VMCI_SOCKETS_VERSION_MINOR(0x12345678u) == VM_SOCKETS_VERSION_MINOR(0x12345678u)",
]

# The header's own definitions (no Linux header): the SDK's values and the 16-byte layout of
# vmci-sdk.md section 3.5.
OWN_CHECKS = [
    "SO_VMCI_BUFFER_SIZE == 0 && SO_VMCI_BUFFER_MIN_SIZE == 1 && SO_VMCI_BUFFER_MAX_SIZE == 2",
    "SO_VMCI_PEER_HOST_VM_ID == 3 && SO_VMCI_TRUSTED == 5 && SO_VMCI_CONNECT_TIMEOUT == 6",
    "SO_VMCI_NONBLOCK_TXRX == 7",
    "AF_VSOCK == 40",
    "VMADDR_CID_ANY == 0xFFFFFFFFu && VMADDR_PORT_ANY == 0xFFFFFFFFu",
    "VMADDR_CID_HYPERVISOR == 0 && VMADDR_CID_LOCAL == 1 && VMADDR_CID_HOST == 2",
    "VMADDR_FLAG_TO_HOST == 1",
    "VMCI_SOCKETS_INVALID_VERSION == 0xFFFFFFFFu",
    "VMCI_SOCKETS_VERSION_EPOCH(0x12345678u) == 0x12",
    "VMCI_SOCKETS_VERSION_MAJOR(0x12345678u) == 0x34",
    "VMCI_SOCKETS_VERSION_MINOR(0x12345678u) == 0x5678",
    "sizeof(struct sockaddr_vm) == 16 && sizeof(struct sockaddr_vm) == sizeof(struct sockaddr)",
    "offsetof(struct sockaddr_vm, svm_family) == 0 && offsetof(struct sockaddr_vm, svm_reserved1) == 2",
    "offsetof(struct sockaddr_vm, svm_port) == 4 && offsetof(struct sockaddr_vm, svm_cid) == 8",
    "offsetof(struct sockaddr_vm, svm_flags) == 12 && offsetof(struct sockaddr_vm, svm_zero) == 13",
]


def _compile(compiler, args, tmp_path):
    proc = subprocess.run(compiler + args, cwd=str(tmp_path), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0 and proc.stdout == "", "%s:\n%s" % (" ".join(compiler + args), proc.stdout)


def _asserting(checks, prelude):
    return prelude + "\n".join(ASSERT % (i, check) for i, check in enumerate(checks)) + "\n"


@pytest.mark.parametrize("std", ["c89", "c99", "c11", "gnu89"])
@pytest.mark.parametrize("linux_header", [True, False], ids=["linux-header", "own-definitions"])
def test_header_compiles_as_c_without_warnings(tmp_path, std, linux_header):
    (tmp_path / "use.c").write_text(USES_EVERY_HELPER)
    defines = [] if linux_header else ["-DVMCI_SOCKETS_NO_LINUX_HEADER"]
    _compile(CC, ["-std=" + std] + WARN + defines + ["-fsyntax-only", "-I", SRC_DIR, "use.c"], tmp_path)


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (c++, g++ or clang++)")
@pytest.mark.parametrize("std", ["c++98", "c++11", "c++17"])
def test_header_compiles_as_cpp_without_warnings(tmp_path, std):
    (tmp_path / "use.cc").write_text(USES_EVERY_HELPER)
    _compile([CXX], ["-std=" + std] + WARN + ["-fsyntax-only", "-I", SRC_DIR, "use.cc"], tmp_path)


@pytest.mark.parametrize("std", ["c89", "c11"])
def test_constants_equal_linux_vm_sockets_h(tmp_path, std):
    """Static assertions only: the program is compiled, not run."""
    prelude = "#include <linux/vm_sockets.h>\n#include \"vmci_sockets.h\"\n"
    (tmp_path / "consts.c").write_text(_asserting(LINUX_CHECKS, prelude))
    _compile(CC, ["-std=" + std] + WARN + ["-fsyntax-only", "-I", SRC_DIR, "consts.c"], tmp_path)


@pytest.mark.parametrize("linux_header", [True, False], ids=["linux-header", "own-definitions"])
def test_constants_and_layout_are_the_sdks(tmp_path, linux_header):
    prelude = "#include <stddef.h>\n#include \"vmci_sockets.h\"\n"
    (tmp_path / "own.c").write_text(_asserting(OWN_CHECKS, prelude))
    defines = [] if linux_header else ["-DVMCI_SOCKETS_NO_LINUX_HEADER"]
    _compile(CC, ["-std=c89"] + WARN + defines + ["-fsyntax-only", "-I", SRC_DIR, "own.c"], tmp_path)


VSC_CHECKS = [
    "AF_VSOCK == VSC_AF_VSOCK && VMADDR_CID_ANY == VSC_VMADDR_CID_ANY",
    "VMADDR_PORT_ANY == VSC_VMADDR_PORT_ANY && VMADDR_CID_HYPERVISOR == VSC_VMADDR_CID_HYPERVISOR",
    "VMADDR_CID_LOCAL == VSC_VMADDR_CID_LOCAL && VMADDR_CID_HOST == VSC_VMADDR_CID_HOST",
    "VMADDR_FLAG_TO_HOST == VSC_VMADDR_FLAG_TO_HOST",
    "VMCI_SOCKETS_GET_LOCAL_CID == VSC_IOCTL_VM_SOCKETS_GET_LOCAL_CID",
    "SO_VMCI_BUFFER_SIZE == VSC_SO_VM_SOCKETS_BUFFER_SIZE",
    "SO_VMCI_BUFFER_MIN_SIZE == VSC_SO_VM_SOCKETS_BUFFER_MIN_SIZE",
    "SO_VMCI_BUFFER_MAX_SIZE == VSC_SO_VM_SOCKETS_BUFFER_MAX_SIZE",
    "SO_VMCI_PEER_HOST_VM_ID == VSC_SO_VM_SOCKETS_PEER_HOST_VM_ID",
    "SO_VMCI_TRUSTED == VSC_SO_VM_SOCKETS_TRUSTED",
    "SO_VMCI_NONBLOCK_TXRX == VSC_SO_VM_SOCKETS_NONBLOCK_TXRX",
    "SO_VMCI_CONNECT_TIMEOUT == VSC_SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD || sizeof(long) != 8",
]


@pytest.mark.parametrize("linux_header", [True, False], ids=["linux-header", "own-definitions"])
def test_constants_agree_with_vsc_constants_h(tmp_path, linux_header):
    """The project's generated constants (vsockcompat/constants.py) say the same."""
    prelude = '#include "vsc_constants.h"\n#include "vmci_sockets.h"\n'
    (tmp_path / "vsc.c").write_text(_asserting(VSC_CHECKS, prelude))
    defines = [] if linux_header else ["-DVMCI_SOCKETS_NO_LINUX_HEADER"]
    _compile(CC, ["-std=c89"] + WARN + defines + ["-fsyntax-only", "-I", SRC_DIR, "vsc.c"], tmp_path)


def test_the_static_assertions_can_fail(tmp_path):
    """The assertion idiom really rejects a false constant (so the tests above mean something)."""
    (tmp_path / "bad.c").write_text(_asserting(["SO_VMCI_TRUSTED == 4"], '#include "vmci_sockets.h"\n'))
    proc = subprocess.run(CC + ["-std=c89", "-fsyntax-only", "-I", SRC_DIR, "bad.c"], cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode != 0


def test_options_without_a_linux_counterpart_are_not_defined(tmp_path):
    """SO_VMCI_DISCONNECT_CAUSE (8 in the SDK) would be Linux's CONNECT_TIMEOUT_NEW: left undefined."""
    names = ["SO_VMCI_SERVICE_LABEL", "SO_VMCI_DISCONNECT_CAUSE", "SO_VMCI_PEER_LIMIT_RATE",
             "SO_VMCI_PEER_PRIV_LIMIT", "SO_VMCI_PEER_BURST_LEVEL"]
    source = '#include "vmci_sockets.h"\n' + "".join(
        "#ifdef %s\n#error %s is defined\n#endif\n" % (name, name) for name in names) + "int vsc_x;\n"
    (tmp_path / "undef.c").write_text(source)
    _compile(CC, ["-std=c89"] + WARN + ["-fsyntax-only", "-I", SRC_DIR, "undef.c"], tmp_path)


def _code_of_header():
    with open(HEADER) as f:
        text = f.read()
    return re.sub(r"/\*.*?\*/", " ", text, flags=re.S)


def test_helpers_use_neither_a_socket_nor_the_obsolete_ioctl():
    """GetAFValue detects vsock from /dev/vsock and sysfs: no socket(), no ioctl 1976."""
    code = _code_of_header()
    assert not re.search(r"\bsocket\s*\(", code)
    assert code.count("VMCI_SOCKETS_GET_AF_VALUE") == 1         # its #define, never used
    assert "1976" in code.split("VMCI_SOCKETS_GET_AF_VALUE", 1)[1].splitlines()[0]
    assert re.search(r"ioctl\s*\(\s*fd\s*,\s*VMCI_SOCKETS_GET_LOCAL_CID", code)


@pytest.mark.parametrize("std", ["c89", "c11"])
def test_vsock_echo_compiles_and_links(tmp_path, std):
    """Built exactly as a user would; NOT run here (it makes AF_VSOCK sockets)."""
    exe = tmp_path / "vsock_echo"
    _compile(CC, ["-std=" + std] + WARN + ["-I", SRC_DIR, ECHO, "-o", str(exe)], tmp_path)
    assert exe.is_file() and os.access(str(exe), os.X_OK)
    exe.unlink()        # nobody runs it by mistake
