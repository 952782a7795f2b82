"""``vsockcompat run``: run a legacy VMCI SDK binary on our libvmci.so.0.

``vsockcompat run [--] PROGRAM [ARGS...]`` executes PROGRAM with
``LD_LIBRARY_PATH`` starting with the directory of our libvmci.so.0 (so its
``DT_NEEDED`` entry resolves to ours) and our library appended to
``LD_PRELOAD`` (so it also interposes a libvmci found some other way, e.g.
through an ``RPATH``; appended, so preloads already there, such as a
sanitizer runtime, stay first). After it, the VMCI Sockets preload
(libvsockcompat-preload.so: ``VMCISock_GetAFValue()``'s ioctl answered,
``SO_VMCI_*`` options Linux lacks handled) when it is built;
``VSOCKCOMPAT_PRELOAD=0`` leaves it out, ``=1`` requires it. The
VSOCKCOMPAT_* settings of the environment pass through;
``VSOCKCOMPAT_PYTHON`` defaults to this Python, which the library uses to
start the discovery daemon.

``vsockcompat run --check PROGRAM`` lists the SDK symbols (``VMCI*``) that
PROGRAM leaves undefined and its ``DT_NEEDED`` entries, and says which of
them our library provides, whether the VMCI Sockets preload will be there
(and whether PROGRAM names ``/dev/vsock``, as VMware's VMCI Sockets helpers
do), and whether PROGRAM's ABI (ELF class and machine) is our library's;
exit status 0 if the library serves it, 1 if not (a symbol missing, another
libvmci needed, another ABI), 2 if PROGRAM or the library cannot be read.
``run`` itself refuses (status 2) a program that needs libvmci.so.0 for an
ABI ours is not built for, rather than letting ld.so fail less clearly.

``vsockcompat include-dir`` prints the directory holding ``vmcilib.h``.
"""
import os
import struct
import sys
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple

from . import clib
from ._settings import SettingError, parse_flag

__all__ = ["main", "command", "RunRefused", "include_dir", "include_dir_main", "elf_info", "ElfInfo", "run_env",
           "sockets_preload", "USAGE"]

USAGE = "usage: vsockcompat run [--check] [--] PROGRAM [ARGS...]"
PRELOAD_SETTING = "VSOCKCOMPAT_PRELOAD"
SDK_PREFIX = "VMCI"

_SHT_DYNAMIC, _SHT_DYNSYM = 6, 11
_DT_NEEDED, _DT_SONAME = 1, 14
_STB_GLOBAL, _STB_WEAK = 1, 2


class ElfError(ValueError):
    """Not an ELF file we can read."""


class ElfInfo(NamedTuple):
    needed: List[str]      # DT_NEEDED entries, in order
    soname: Optional[str]
    undefined: Set[str]    # undefined dynamic symbols
    defined: Set[str]      # defined, exported (global or weak, default or protected visibility)
    bits: int              # 32 or 64 (the ELF class)
    machine: int           # e_machine
    names_vsock_device: bool  # the file holds the string "/dev/vsock" (VMCI Sockets' inline helpers)

    @property
    def abi(self) -> str:
        """``"64-bit x86-64"`` and the like: what ld.so matches a library against."""
        return "%d-bit %s" % (self.bits, _MACHINES.get(self.machine, "machine %d" % self.machine))


_MACHINES = {3: "i386", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "S/390", 40: "ARM", 62: "x86-64",
             183: "AArch64", 243: "RISC-V"}


def elf_info(path: str) -> ElfInfo:
    """The dynamic section and dynamic symbol table of an ELF file (stdlib only)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or len(data) < 64:
        raise ElfError("%s is not an ELF file" % path)
    klass, encoding = data[4], data[5]
    if klass not in (1, 2) or encoding not in (1, 2):
        raise ElfError("%s: unknown ELF class or data encoding" % path)
    end = "<" if encoding == 1 else ">"
    is64 = klass == 2
    try:
        machine, = struct.unpack_from(end + "H", data, 0x12)
        if is64:
            shoff, = struct.unpack_from(end + "Q", data, 0x28)
            shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A)
            shdr = struct.Struct(end + "IIQQQQIIQQ")
            sym = struct.Struct(end + "IBBHQQ")
            dyn = struct.Struct(end + "qQ")
        else:
            shoff, = struct.unpack_from(end + "I", data, 0x20)
            shentsize, shnum = struct.unpack_from(end + "HH", data, 0x2E)
            shdr = struct.Struct(end + "IIIIIIIIII")
            sym = struct.Struct(end + "IIIBBH")
            dyn = struct.Struct(end + "iI")
        sections = []
        for i in range(shnum):
            f = shdr.unpack_from(data, shoff + i * shentsize)
            # (type, offset, size, link)
            sections.append((f[1], f[4], f[5], f[6]))
    except struct.error:
        raise ElfError("%s: truncated ELF headers" % path) from None
    if not sections:
        raise ElfError("%s has no section headers" % path)

    def strtab(index: int):
        _, off, size, _ = sections[index]
        return data[off:off + size]

    def string(table: bytes, offset: int) -> str:
        stop = table.find(b"\0", offset)
        return table[offset:stop if stop >= 0 else len(table)].decode("utf-8", "replace")

    needed: List[str] = []
    soname = None
    undefined: Set[str] = set()
    defined: Set[str] = set()
    try:
        for stype, off, size, link in sections:
            if stype == _SHT_DYNAMIC:
                names = strtab(link)
                for pos in range(off, off + size - dyn.size + 1, dyn.size):
                    tag, val = dyn.unpack_from(data, pos)
                    if tag == 0:
                        break
                    if tag == _DT_NEEDED:
                        needed.append(string(names, val))
                    elif tag == _DT_SONAME:
                        soname = string(names, val)
            elif stype == _SHT_DYNSYM:
                names = strtab(link)
                for pos in range(off + sym.size, off + size - sym.size + 1, sym.size):
                    fields = sym.unpack_from(data, pos)
                    if is64:
                        name, info, other, shndx = fields[0], fields[1], fields[2], fields[3]
                    else:
                        name, info, other, shndx = fields[0], fields[3], fields[4], fields[5]
                    if not name:
                        continue
                    text = string(names, name)
                    if shndx == 0:
                        undefined.add(text)
                    elif info >> 4 in (_STB_GLOBAL, _STB_WEAK) and other & 3 in (0, 3):
                        defined.add(text)
    except (struct.error, IndexError):
        raise ElfError("%s: malformed dynamic section or symbol table" % path) from None
    return ElfInfo(needed, soname, undefined, defined, 64 if is64 else 32, machine, b"/dev/vsock" in data)


def include_dir() -> str:
    """The directory holding vmcilib.h (and the vsc_constants.h it includes)."""
    return clib.include_dir()


def include_dir_main(argv: Sequence[str] = ()) -> int:
    """``vsockcompat include-dir``: print where vmcilib.h is (for ``cc -I``)."""
    if list(argv):
        print("usage: vsockcompat include-dir", file=sys.stderr)
        return 2
    print(include_dir())
    return 0


def _prepend(value: str, old: Optional[str]) -> str:
    return value + ":" + old if old else value


def run_env(library: str, environ: Optional[Mapping[str, str]] = None,
            preload: Optional[str] = None) -> Dict[str, str]:
    """The environment a legacy program runs with: ours first on LD_LIBRARY_PATH, ours in
    LD_PRELOAD after the entries already there (libvmci, then the VMCI Sockets ``preload``)."""
    env = dict(os.environ if environ is None else environ)
    env["LD_LIBRARY_PATH"] = _prepend(os.path.dirname(library), env.get("LD_LIBRARY_PATH"))
    entries = [e for e in [env.get("LD_PRELOAD", "").strip(), library, preload] if e]
    env["LD_PRELOAD"] = ":".join(entries)
    env.setdefault("VSOCKCOMPAT_PYTHON", sys.executable)
    return env


def sockets_preload(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The VMCI Sockets preload ``vsockcompat run`` adds, per ``VSOCKCOMPAT_PRELOAD``: unset, the
    library when it is built (else None); ``0``, None; ``1``, the library or a SettingError."""
    env = os.environ if environ is None else environ
    value = env.get(PRELOAD_SETTING)
    if value is not None and not parse_flag(PRELOAD_SETTING, value):
        return None
    path = clib.preload_path(env)
    if path is None and value is not None:
        where = env.get(clib.PRELOAD_ENV) or os.path.join(clib.PACKAGE_DIR, "lib", clib.PRELOAD_NAME)
        raise SettingError("%s=1 but %s is not at %s (install vsockcompat with its C extensions, or set %s)"
                           % (PRELOAD_SETTING, clib.PRELOAD_NAME, where, clib.PRELOAD_ENV))
    return path


def _resolve(program: str, search: Optional[str] = None) -> Optional[str]:
    """The file ``program`` names: itself when it has a slash, else its first hit on ``search``
    (default: this process's PATH)."""
    if os.sep in program:
        return program if os.path.isfile(program) else None
    if search is None:
        search = os.environ.get("PATH", os.defpath)
    for directory in search.split(os.pathsep):
        candidate = os.path.join(directory or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def check(program: str, out=None) -> int:
    """Report the SDK symbols and DT_NEEDED of ``program`` and whether our library provides them."""
    out = out or sys.stdout
    path = _resolve(program)
    if path is None:
        print("vsockcompat run --check: %s: no such program" % program, file=sys.stderr)
        return 2
    library = clib.library_path()
    lib_info = None
    try:
        info = elf_info(path)
        if library is not None:
            lib_info = elf_info(library)
            provided, provider = lib_info.defined, library
            provided_soname = lib_info.soname or clib.SONAME
        else:
            provided, provider = set(clib.EXPORTED), "the SDK list (libvmci.so.0 is not built)"
            provided_soname = clib.SONAME
        preload = sockets_preload()
    except (OSError, ElfError, SettingError) as exc:
        print("vsockcompat run --check: %s" % exc, file=sys.stderr)
        return 2
    wanted = sorted(name for name in info.undefined if name.startswith(SDK_PREFIX))
    missing = [name for name in wanted if name not in provided]
    width = max([len(n) for n in wanted] + [10])
    print("%s" % path, file=out)
    print("  DT_NEEDED: %s" % (", ".join(info.needed) or "(none)"), file=out)
    if provided_soname in info.needed:
        print("  %s: provided by %s" % (provided_soname, provider), file=out)
    else:
        others = [n for n in info.needed if n.startswith("libvmci")]
        print("  %s: not needed%s" % (provided_soname, " (needs %s instead)" % ", ".join(others)
                                      if others else ""), file=out)
    print("  SDK symbols needed: %d" % len(wanted), file=out)
    for name in wanted:
        print("    %-*s  %s" % (width, name, "MISSING" if name in missing else "provided"), file=out)
    _report_sockets_preload(info, preload, out)
    mismatch = _abi_mismatch(info, lib_info)
    if mismatch:
        print(mismatch, file=out)
        return 1
    if missing:
        print("%d of %d SDK symbols are MISSING: %s" % (len(missing), len(wanted), ", ".join(missing)), file=out)
        return 1
    others = [n for n in info.needed if n.startswith("libvmci") and n != provided_soname]
    if others:
        print("needs %s, which vsockcompat does not provide" % ", ".join(others), file=out)
        return 1
    print("all %d SDK symbols are provided" % len(wanted), file=out)
    return 0


def _report_sockets_preload(info: ElfInfo, preload: Optional[str], out) -> None:
    """Say whether the VMCI Sockets preload will be there, and whether the program may want it:
    VMware's inline helpers open /dev/vsock to ask for the address family (an ioctl only the
    preload answers on today's kernels)."""
    if preload is not None:
        state = preload
    elif clib.preload_path() is None:
        state = "NOT BUILT"
    else:
        state = "left out (%s=0)" % PRELOAD_SETTING
    print("  VMCI Sockets preload: %s" % state, file=out)
    if info.names_vsock_device:
        print("  VMCI Sockets: the program names /dev/vsock; if it was built with VMware's vmci_sockets.h, "
              "its address family comes from the preload%s" % ("" if preload else " (which it will not get)"),
              file=out)


def _abi_mismatch(info: ElfInfo, lib_info: Optional[ElfInfo]) -> Optional[str]:
    """Why ld.so cannot give a program that needs libvmci.so.0 our build of it, or None."""
    if lib_info is None or clib.SONAME not in info.needed:
        return None
    if (info.bits, info.machine) == (lib_info.bits, lib_info.machine):
        return None
    return ("the program is %s but %s is %s: ld.so cannot load it (a %s build of vsockcompat is needed)"
            % (info.abi, clib.SONAME, lib_info.abi, info.abi))


def _preflight(program: str, library: str, search: Optional[str] = None) -> Optional[str]:
    """The reason ``run`` would fail to give ``program`` our library, when that is certain now
    (``search``: the PATH the program is looked up on)."""
    path = _resolve(program, search)
    try:
        return _abi_mismatch(elf_info(path), elf_info(library)) if path else None
    except (OSError, ElfError):
        return None  # a script, or something the kernel or ld.so will judge


class RunRefused(Exception):
    """Why ``vsockcompat run`` does not start a program; ``status`` is the exit status it returns."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def command(argv: Sequence[str], environ: Optional[Mapping[str, str]] = None) -> Tuple[List[str], Dict[str, str]]:
    """The argv and environment ``vsockcompat run -- ARGV`` executes (with ``os.execvpe``), given
    the environment ``environ`` it is started in (default ``os.environ``): what a caller that
    starts many legacy programs computes once instead of starting Python for each one.

    Raises RunRefused (status 2) when our libvmci.so.0 is not built, ``VSOCKCOMPAT_PRELOAD`` asks
    for a preload that is not there, or ARGV[0] needs libvmci.so.0 for another ABI.
    """
    environ = os.environ if environ is None else environ
    argv = list(argv)
    if not argv:
        raise RunRefused(USAGE)
    library = clib.library_path(environ)
    if library is None:
        where = environ.get(clib.LIBRARY_ENV) or os.path.join(clib.PACKAGE_DIR, "lib", clib.SONAME)
        raise RunRefused("%s not found at %s (install vsockcompat with its C extensions, or set %s)"
                         % (clib.SONAME, where, clib.LIBRARY_ENV))
    try:
        preload = sockets_preload(environ)
    except SettingError as exc:
        raise RunRefused(str(exc)) from None
    reason = _preflight(argv[0], library, environ.get("PATH", os.defpath))
    if reason:
        raise RunRefused("%s: %s" % (argv[0], reason))
    return argv, run_env(library, environ, preload=preload)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``vsockcompat run [--check] [--] PROGRAM [ARGS...]``; returns only if it cannot exec."""
    argv = list(sys.argv[1:] if argv is None else argv)
    do_check = False
    while argv and argv[0].startswith("-"):
        opt = argv.pop(0)
        if opt == "--":
            break
        if opt == "--check":
            do_check = True
        elif opt in ("-h", "--help"):
            print(USAGE)
            print(__doc__.split("\n\n", 1)[1].rstrip())
            return 0
        else:
            print("vsockcompat run: unknown option %r\n%s" % (opt, USAGE), file=sys.stderr)
            return 2
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if do_check:
        if len(argv) != 1:
            print("vsockcompat run --check takes one PROGRAM\n%s" % USAGE, file=sys.stderr)
            return 2
        return check(argv[0])
    try:
        argv, env = command(argv)
    except RunRefused as exc:
        print("vsockcompat run: %s" % exc, file=sys.stderr)
        return exc.status
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        print("vsockcompat run: cannot run %s: %s" % (argv[0], exc.strerror or exc), file=sys.stderr)
        return 126 if isinstance(exc, PermissionError) else 127
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
