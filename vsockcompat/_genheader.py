"""Generate ``src/vsc_constants.h`` from ``vsockcompat.constants``.

Usage: ``python -m vsockcompat._genheader [--check] [PATH]``

PATH defaults to ``src/vsc_constants.h`` in the repository root (the parent of
the package directory). Without ``--check`` the file is (re)written when its
content differs. With ``--check`` nothing is written and the exit status is 1
if the file is missing or stale.

Output contract: one ``#define`` per entry of ``constants.ALL_INT_CONSTANTS`` in
definition order. ``VMCI_*`` names keep their spelling; every other name gets
a ``VSC_`` prefix (``AF_VSOCK`` -> ``VSC_AF_VSOCK``, ``DG_HEADER_SIZE`` ->
``VSC_DG_HEADER_SIZE``) so the header never redefines what ``<sys/socket.h>``
or ``<linux/vm_sockets.h>`` define. Then the field offsets of each layout
(``VSC_DG_OFF_DST_CONTEXT``, ``VSC_DS_REQ_OFF_NAME``, ``VSC_DS_REP_OFF_MSG``,
``VSC_QH_OFF_PRODUCER_TAIL``, ``VSC_MIRROR_OFF_ARG``, ...).
"""

import argparse
import struct
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from . import constants as _c

__all__ = ["DEFAULT_PATH", "c_name", "c_value", "layout_offsets", "render", "main"]

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "src" / "vsc_constants.h"

_LAYOUTS = (
    ("DG", _c.DG_HEADER_FORMAT, _c.DG_HEADER_FIELDS, "payload"),
    ("DS_REQ", _c.DS_REQUEST_HEADER_FORMAT, _c.DS_REQUEST_HEADER_FIELDS, "name"),
    ("DS_REP", _c.DS_REPLY_HEADER_FORMAT, _c.DS_REPLY_HEADER_FIELDS, "msg"),
    ("QH", _c.QUEUE_HEADER_FORMAT, _c.QUEUE_HEADER_FIELDS, None),
    ("MIRROR", _c.MIRROR_HEADER_FORMAT, _c.MIRROR_HEADER_FIELDS, "payload"),
)


def c_name(name: str) -> str:
    """The C macro name of a constant: ``VMCI_*`` as is, else ``VSC_`` + name."""
    return name if name.startswith("VMCI_") else "VSC_" + name


def c_value(value: int) -> str:
    """A C literal of the same value and signedness as ``value``."""
    if value < -0x80000000 or value > 0xFFFFFFFFFFFFFFFF:
        raise ValueError("%d does not fit a C int or uint64" % value)
    if value < 0:
        return "(%d)" % value
    if value > 0xFFFFFFFF:
        return "0x%Xull" % value
    if value > 0x7FFFFFFF:
        return "0x%Xu" % value
    return "%d" % value


def layout_offsets(fmt: str, fields, tail: Optional[str]) -> List[Tuple[str, int]]:
    """``(field, offset)`` for each field of a one-code-per-field format, then ``tail``."""
    codes = fmt[1:]
    if len(codes) != len(fields) or not codes.isalpha():
        raise ValueError("format %r does not have one code per field" % fmt)
    out = [(f, struct.calcsize(fmt[0] + codes[:i])) for i, f in enumerate(fields)]
    if tail is not None:
        out.append((tail, struct.calcsize(fmt)))
    return out


def render() -> str:
    """The full text of the header."""
    defines = [(c_name(n), c_value(v)) for n, v in _c.ALL_INT_CONSTANTS.items()]
    offsets = [("VSC_%s_OFF_%s" % (prefix, field.upper()), str(off))
               for prefix, fmt, fields, tail in _LAYOUTS
               for field, off in layout_offsets(fmt, fields, tail)]
    width = max(len(n) for n, _ in defines + offsets) + 1
    lines = [
        "/* vsc_constants.h: generated from vsockcompat/constants.py -- do not edit.",
        " * Regenerate with: python -m vsockcompat._genheader",
        " */",
        "#ifndef VSC_CONSTANTS_H",
        "#define VSC_CONSTANTS_H",
        "",
        "/* constants.ALL_INT_CONSTANTS (non-VMCI names prefixed with VSC_) */",
    ]
    lines += ["#define %-*s%s" % (width, n, v) for n, v in defines]
    lines += ["", "/* Field offsets of the byte layouts (vmci-sdk.md section 3) */"]
    lines += ["#define %-*s%s" % (width, n, v) for n, v in offsets]
    lines += ["", "#endif /* VSC_CONSTANTS_H */", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vsockcompat._genheader",
                                     description="Generate src/vsc_constants.h.")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the file is missing or differs; write nothing")
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args(argv)
    text = render().encode("ascii")
    try:
        current = args.path.read_bytes()
    except FileNotFoundError:
        current = None
    if args.check:
        if current != text:
            state = "missing" if current is None else "stale"
            print("%s is %s; run: python -m vsockcompat._genheader" % (args.path, state),
                  file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.path.parent.mkdir(parents=True, exist_ok=True)
        args.path.write_bytes(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
