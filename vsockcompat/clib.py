"""Building and locating libvmci.so.0, the C library legacy SDK binaries load,
and libvsockcompat-preload.so, the preload legacy VMCI Sockets binaries need.

Standard library only and no relative imports: setup.py loads this file by
path. ``build_libvmci`` compiles ``src/vsc_lib.c`` and the C core into a
shared library with soname ``libvmci.so.0`` that exports exactly the SDK's
entry points (``src/libvmci.map``); ``BuildExtWithLibvmci`` is a
``build_ext`` that also builds it (and ``build_preload``'s library) into
``vsockcompat/lib/`` and copies the SDK header into ``vsockcompat/include/``
whenever the extensions are built.
"""
import os
import shlex
import shutil
import subprocess
from typing import List, Mapping, Optional, Sequence

SONAME = "libvmci.so.0"
LINK_NAME = "libvmci.so"
SOURCES = ("vsc_lib.c", "vsc_endpoint.c", "vsc_local.c", "vsc_vsock.c", "vsc_vsock_dgram.c", "vsc_hybrid.c", "vsc_link.c",
           "vsc_ds.c", "vsc_dgram.c", "vsc_shm.c", "vsc_mirror.c", "vsc_mirror_core.c", "vsc_mirror_serve.c",
           "vsc_acl.c", "vsc_acl_memory.c", "vsc_policy.c")
HEADERS = ("vmcilib.h", "vmci_sockets.h", "vsc_constants.h")
VERSION_SCRIPT = "libvmci.map"
#: The names the library exports: the SDK's user-level calls (vmci-sdk.md section 4).
EXPORTED = (
    "VMCI_InitApp", "VMCI_CleanupApp",
    "VMCIDatagram_CreateHnd", "VMCIDatagram_DestroyHnd", "VMCIDatagram_SendTo", "VMCIDatagram_RecvFrom",
    "VMCISharedMem_Create", "VMCISharedMem_Query", "VMCISharedMem_Attach", "VMCISharedMem_Detach",
    "VMCIDs_Lookup", "VMCIDs_Register", "VMCIDs_Unregister",
    "VMCIResource_AddClientPrivileges",
)
CFLAGS = ("-std=c11", "-O2", "-g", "-Wall", "-Wextra", "-fPIC", "-fvisibility=hidden", "-pthread")
#: Environment variable naming a libvmci.so.0 to use instead of the package's.
LIBRARY_ENV = "VSOCKCOMPAT_LIBVMCI"
#: The VMCI Sockets preload (src/vsc_preload.c): not a library anything links against.
PRELOAD_NAME = "libvsockcompat-preload.so"
PRELOAD_SOURCES = ("vsc_preload.c",)
#: Environment variable naming a libvsockcompat-preload.so to use instead of the package's.
PRELOAD_ENV = "VSOCKCOMPAT_LIBPRELOAD"

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.path.join(os.path.dirname(PACKAGE_DIR), "src")


class BuildError(RuntimeError):
    """The C compiler failed or is missing."""


def find_compiler(compiler: Optional[str] = None) -> Optional[List[str]]:
    """The C compiler command: ``compiler``, else ``$CC``, else cc/gcc/clang on PATH; None if none."""
    for candidate in (compiler, os.environ.get("CC"), "cc", "gcc", "clang"):
        if not candidate:
            continue
        argv = shlex.split(candidate)
        if argv and shutil.which(argv[0]):
            return argv
    return None


def build_libvmci(build_dir: str, compiler: Optional[str] = None, *, src_dir: Optional[str] = None,
                  extra_cflags: Sequence[str] = (), extra_ldflags: Sequence[str] = (),
                  sources: Sequence[str] = SOURCES) -> str:
    """Compile ``<build_dir>/libvmci.so.0`` (and a ``libvmci.so`` symlink for ``-lvmci``).

    Returns the library's path; raises BuildError with the compiler's output on failure.
    ``extra_cflags``/``extra_ldflags`` are added last (e.g. ``-fsanitize=address,undefined``);
    ``sources`` are the files of ``src_dir`` compiled (another tree's list, for an older one).
    """
    src_dir = src_dir or SOURCE_DIR
    cc = find_compiler(compiler)
    if cc is None:
        raise BuildError("no C compiler found (set CC, or install cc)")
    os.makedirs(build_dir, exist_ok=True)
    out = os.path.join(build_dir, SONAME)
    tmp = out + ".tmp%d" % os.getpid()
    cmd = (cc + list(CFLAGS) + list(extra_cflags) + ["-I", src_dir]
           + [os.path.join(src_dir, name) for name in sources]
           + ["-shared", "-Wl,-soname," + SONAME,
              "-Wl,--version-script=" + os.path.join(src_dir, VERSION_SCRIPT),
              "-o", tmp] + list(extra_ldflags))
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise BuildError("building %s failed:\n%s\n%s" % (SONAME, " ".join(cmd),
                                                          result.stdout.decode(errors="replace")))
    os.replace(tmp, out)
    link = os.path.join(build_dir, LINK_NAME)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(SONAME, link)
    return out


def build_preload(build_dir: str, compiler: Optional[str] = None, *, src_dir: Optional[str] = None,
                  extra_cflags: Sequence[str] = (), extra_ldflags: Sequence[str] = ()) -> str:
    """Compile ``<build_dir>/libvsockcompat-preload.so``, the LD_PRELOAD library that lets
    binaries built against VMware's vmci_sockets.h run on AF_VSOCK (src/vsc_preload.c).

    Returns its path; raises BuildError with the compiler's output on failure.
    """
    src_dir = src_dir or SOURCE_DIR
    cc = find_compiler(compiler)
    if cc is None:
        raise BuildError("no C compiler found (set CC, or install cc)")
    os.makedirs(build_dir, exist_ok=True)
    out = os.path.join(build_dir, PRELOAD_NAME)
    tmp = out + ".tmp%d" % os.getpid()
    cmd = (cc + list(CFLAGS) + list(extra_cflags) + ["-I", src_dir]
           + [os.path.join(src_dir, name) for name in PRELOAD_SOURCES]
           + ["-shared", "-o", tmp, "-ldl"] + list(extra_ldflags))
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise BuildError("building %s failed:\n%s\n%s" % (PRELOAD_NAME, " ".join(cmd),
                                                          result.stdout.decode(errors="replace")))
    os.replace(tmp, out)
    return out


def install_headers(include_dir: str, src_dir: Optional[str] = None) -> str:
    """Copy vmcilib.h (and the constants header it includes) into ``include_dir``."""
    src_dir = src_dir or SOURCE_DIR
    os.makedirs(include_dir, exist_ok=True)
    for name in HEADERS:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(include_dir, name))
    return include_dir


def library_path(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Our libvmci.so.0: ``$VSOCKCOMPAT_LIBVMCI`` (of ``environ``, default ``os.environ``), else the
    package's ``lib/``; None if not built."""
    explicit = (os.environ if environ is None else environ).get(LIBRARY_ENV)
    if explicit:
        return os.path.abspath(explicit) if os.path.isfile(explicit) else None
    path = os.path.join(PACKAGE_DIR, "lib", SONAME)
    return path if os.path.isfile(path) else None


def preload_path(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Our VMCI Sockets preload: ``$VSOCKCOMPAT_LIBPRELOAD`` (of ``environ``, default ``os.environ``),
    else the package's ``lib/``; None if not built."""
    explicit = (os.environ if environ is None else environ).get(PRELOAD_ENV)
    if explicit:
        return os.path.abspath(explicit) if os.path.isfile(explicit) else None
    path = os.path.join(PACKAGE_DIR, "lib", PRELOAD_NAME)
    return path if os.path.isfile(path) else None


def include_dir() -> str:
    """Where vmcilib.h is: the package's ``include/`` when installed, else the source tree's ``src/``."""
    installed = os.path.join(PACKAGE_DIR, "include")
    if os.path.isfile(os.path.join(installed, "vmcilib.h")):
        return installed
    return SOURCE_DIR


BUILD_CONFIG = "_build_config"

try:
    from setuptools.command.build_ext import build_ext as _build_ext
    from setuptools.command.build_py import build_py as _build_py
except ImportError:  # pragma: no cover - only setup.py needs the commands
    _build_ext = _build_py = object


class BuildExtWithLibvmci(_build_ext):
    """``build_ext`` that also builds ``vsockcompat/lib/libvmci.so.0``.

    It runs only when there are extensions to build, so the pure build
    (VSOCKCOMPAT_NO_EXTENSIONS=1) installs no C library. Failures are loud.
    """

    def run(self):
        super().run()
        if not self.extensions:
            return
        target = PACKAGE_DIR if self.inplace else os.path.join(self.build_lib, "vsockcompat")
        compiler = getattr(self.compiler, "compiler_so", None)
        try:
            cc = shlex.quote(compiler[0]) if compiler else None
            build_libvmci(os.path.join(target, "lib"), cc)
            build_preload(os.path.join(target, "lib"), cc)
        except BuildError as exc:
            raise SystemExit(str(exc))
        if self.inplace:
            install_headers(os.path.join(target, "include"))

    def get_outputs(self):
        outputs = list(super().get_outputs())
        if self.extensions:
            base = os.path.join(self.build_lib, "vsockcompat")
            outputs.extend(os.path.join(base, "lib", name) for name in (SONAME, LINK_NAME, PRELOAD_NAME))
        return outputs


class BuildPyWithHeaders(_build_py):
    """``build_py`` that ships vmcilib.h with every install, pure ones included,
    so old sources recompile wherever the package is installed."""

    def run(self):
        super().run()
        package = os.path.join(self.build_lib, "vsockcompat")
        install_headers(os.path.join(package, "include"))
        # Recorded so that a pure install does not warn about a missing extension.
        with open(os.path.join(package, BUILD_CONFIG + ".py"), "w") as f:
            f.write('"""Written by the build."""\nPURE_BUILD = %r\n' % (not self.distribution.ext_modules))

    def get_outputs(self, include_bytecode=1):
        package = os.path.join(self.build_lib, "vsockcompat")
        return list(super().get_outputs(include_bytecode)) + [
            os.path.join(package, "include", n) for n in HEADERS] + [os.path.join(package, BUILD_CONFIG + ".py")]
