"""The generated C header is fresh, complete and compiles."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vsockcompat import _genheader as G
from vsockcompat import constants as C

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "src" / "vsc_constants.h"


def test_default_path_is_src_beside_the_package():
    assert G.DEFAULT_PATH == Path(G.__file__).resolve().parent.parent / "src" / "vsc_constants.h"


def test_committed_header_is_fresh(tmp_path):
    out = tmp_path / "vsc_constants.h"
    assert G.main([str(out)]) == 0
    assert HEADER.read_bytes() == out.read_bytes(), \
        "src/vsc_constants.h is stale: run python -m vsockcompat._genheader"


def test_check_mode(tmp_path, capsys):
    out = tmp_path / "h.h"
    assert G.main(["--check", str(out)]) == 1
    assert "missing" in capsys.readouterr().err
    assert not out.exists()
    G.main([str(out)])
    assert G.main(["--check", str(out)]) == 0
    out.write_bytes(out.read_bytes().replace(b"69632", b"69633"))
    assert G.main(["--check", str(out)]) == 1
    assert "stale" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    out = tmp_path / "h.h"
    run = subprocess.run([sys.executable, "-m", "vsockcompat._genheader", "--check", str(out)],
                         cwd=str(ROOT), capture_output=True, text=True)
    assert run.returncode == 1 and "missing" in run.stderr
    run = subprocess.run([sys.executable, "-m", "vsockcompat._genheader", "--check"],
                         cwd=str(ROOT), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_render_is_deterministic():
    assert G.render() == G.render()


def _defines(text):
    return dict(re.findall(r"^#define (\w+) +(\S+)$", text, re.M))


def test_every_constant_is_defined():
    defines = _defines(G.render())
    assert list(defines)[:len(C.ALL_INT_CONSTANTS)] == [G.c_name(n) for n in C.ALL_INT_CONSTANTS]
    assert defines["VMCI_ERROR_NOT_FOUND"] == "(-21)"
    assert defines["VMCI_INVALID_ID"] == "0xFFFFFFFFu"
    assert defines["VMCI_MAX_DG_SIZE"] == "69632"
    assert defines["VSC_AF_VSOCK"] == "40"
    assert defines["VSC_DG_HEADER_SIZE"] == "24"
    assert defines["VSC_DS_REQUEST_HEADER_SIZE"] == "20"
    assert defines["VSC_QUEUE_HEADER_SIZE"] == "24"
    assert "AF_VSOCK" not in defines and "VMADDR_CID_ANY" not in defines


def test_offsets():
    d = _defines(G.render())
    expected = {
        "VSC_DG_OFF_DST_CONTEXT": 0, "VSC_DG_OFF_DST_RESOURCE": 4,
        "VSC_DG_OFF_SRC_CONTEXT": 8, "VSC_DG_OFF_SRC_RESOURCE": 12,
        "VSC_DG_OFF_PAYLOAD_SIZE": 16, "VSC_DG_OFF_PAYLOAD": 24,
        "VSC_DS_REQ_OFF_ACTION": 0, "VSC_DS_REQ_OFF_MSGID": 4,
        "VSC_DS_REQ_OFF_HANDLE_CONTEXT": 8, "VSC_DS_REQ_OFF_HANDLE_RESOURCE": 12,
        "VSC_DS_REQ_OFF_NAME_LEN": 16, "VSC_DS_REQ_OFF_NAME": 20,
        "VSC_DS_REP_OFF_MSGID": 0, "VSC_DS_REP_OFF_CODE": 4,
        "VSC_DS_REP_OFF_HANDLE_CONTEXT": 8, "VSC_DS_REP_OFF_HANDLE_RESOURCE": 12,
        "VSC_DS_REP_OFF_MSG_LEN": 16, "VSC_DS_REP_OFF_MSG": 20,
        "VSC_QH_OFF_HANDLE_CONTEXT": 0, "VSC_QH_OFF_HANDLE_RESOURCE": 4,
        "VSC_QH_OFF_PRODUCER_TAIL": 8, "VSC_QH_OFF_CONSUMER_HEAD": 16,
    }
    for name, value in expected.items():
        assert d[name] == str(value), name


@pytest.mark.parametrize("value,literal", [
    (0, "0"), (24, "24"), (-21, "(-21)"), (0x7FFFFFFF, "2147483647"),
    (0x80000000, "0x80000000u"), (0xFFFFFFFF, "0xFFFFFFFFu"),
    (0x100000000, "0x100000000ull"), (-0x80000000, "(-2147483648)"),
])
def test_c_value(value, literal):
    assert G.c_value(value) == literal


def test_c_value_rejects_unrepresentable():
    with pytest.raises(ValueError):
        G.c_value(1 << 64)
    with pytest.raises(ValueError):
        G.c_value(-(1 << 31) - 1)


CHECK_C = r"""
#include <sys/socket.h>
#include "vsc_constants.h"
#include "vsc_constants.h"
#include <stdint.h>
#include <stddef.h>
#ifdef __linux__
#include <sys/ioctl.h>
#include <linux/vm_sockets.h>
#endif

struct dg { uint32_t dc, dr, sc, sr; uint64_t ps; };
struct dsreq { int32_t action, msgid; uint32_t hc, hr; int32_t name_len; char name[1]; };
struct qh { uint32_t hc, hr; uint64_t tail, head; };

_Static_assert(sizeof(struct dg) == VMCI_DG_HEADERSIZE, "dg");
_Static_assert(sizeof(struct dg) == VSC_DG_HEADER_SIZE, "dg");
_Static_assert(offsetof(struct dg, ps) == VSC_DG_OFF_PAYLOAD_SIZE, "dg ps");
_Static_assert(sizeof(struct dsreq) == VMCI_DS_REQUEST_HEADER_SIZE, "dsreq");
_Static_assert(offsetof(struct dsreq, name) == VSC_DS_REQ_OFF_NAME, "dsreq name");
_Static_assert(sizeof(struct qh) == VSC_QUEUE_HEADER_SIZE, "qh");
_Static_assert(offsetof(struct qh, head) == VSC_QH_OFF_CONSUMER_HEAD, "qh head");
_Static_assert(VMCI_ERROR_NOT_FOUND == -21, "neg");
_Static_assert(VMCI_INVALID_ID == 0xFFFFFFFFu, "id");
_Static_assert(VMCI_MAX_DG_PAYLOAD_SIZE == 69608, "payload");
#ifdef __linux__
_Static_assert(VSC_AF_VSOCK == AF_VSOCK, "af");
_Static_assert(VSC_VMADDR_CID_ANY == VMADDR_CID_ANY, "cid any");
_Static_assert(VSC_IOCTL_VM_SOCKETS_GET_LOCAL_CID == IOCTL_VM_SOCKETS_GET_LOCAL_CID, "ioctl");
#endif
"""


def test_header_compiles(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler on PATH")
    src = tmp_path / "check.c"
    src.write_text(CHECK_C)
    run = subprocess.run([cc, "-std=c11", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
                          "-I", str(HEADER.parent), str(src)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
