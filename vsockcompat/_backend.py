"""Selection of the data-plane core, and the contract both cores must meet."""
import importlib
import warnings
from types import ModuleType

CORE_API = (
    "NAME",
    "AGAIN",
    "PEER_GONE",
    "BAD_FRAME",
    "FORGED",
    "ACCEPT",
    "WAKE",
    "DENIED",
    "STALE",
    "ACCOUNT_SIZE",
    "ACCOUNT_MAGIC",
    "ACCOUNT_VERSION",
    "encode_header",
    "decode_header",
    "encode_datagram",
    "Account",
    "send_datagram",
    "recv_datagram",
    "Link",
    "Receiver",
    "Fastpath",
    "QP_PAGE_SIZE",
    "QP_MAX_RING_SIZE",
    "QP_WAITING_READ",
    "QP_WAITING_WRITE",
    "Ring",
    "QS_DATA",
    "QS_CREDIT",
    "QS_GONE",
    "QS_BAD",
    "QS_BUSY",
    "QueueStream",
)

_MODULES = {"cython": "vsockcompat._cvsc", "pure": "vsockcompat._pure"}


class BackendContractError(ImportError):
    """A core does not provide every name of CORE_API."""


def load_core(name: str) -> ModuleType:
    """Import the core called ``name`` ("cython" or "pure") and check its contract."""
    try:
        module = importlib.import_module(_MODULES[name])
    except KeyError:
        raise ValueError("no core called %r (choose from %s)" % (name, ", ".join(_MODULES))) from None
    missing = [attr for attr in CORE_API if not hasattr(module, attr)]
    if missing:
        raise BackendContractError("core %r lacks %s" % (name, ", ".join(missing)))
    return module


def _pure_build() -> bool:
    """Whether this installation was built without the extension (recorded by the build)."""
    try:
        _build_config = importlib.import_module(__package__ + "._build_config")
    except ImportError:
        return False
    return bool(getattr(_build_config, "PURE_BUILD", False))


def select_core(no_extensions: bool) -> ModuleType:
    """The pure core if asked for (or installed pure), else the Cython core, falling back
    to pure with a warning."""
    if no_extensions or _pure_build():
        return load_core("pure")
    try:
        return load_core("cython")
    except ImportError as exc:
        warnings.warn(
            "vsockcompat: the Cython core is not available (%s); using the pure-Python core. "
            "Set VSOCKCOMPAT_NO_EXTENSIONS=1 to ask for it explicitly." % exc,
            RuntimeWarning,
            stacklevel=3,
        )
        return load_core("pure")
