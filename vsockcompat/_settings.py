"""Every VSOCKCOMPAT_* environment setting, parsed strictly in this one place.

Standard library only: setup.py loads this file directly to decide whether to
build the extension.
"""
import os
from typing import Mapping, NamedTuple, Optional, Tuple

TRANSPORTS = ("auto", "local", "vsock", "hybrid")
SHM_MODES = ("auto", "shared", "mirrored")  # mirror_link.mirrored
DS_REGISTER_RULES = ("permissive", "trusted")  # policy.REGISTER_RULES
VSOCK_MODES = ("auto", "dgram", "seqpacket", "stream")  # transport.vsock.choose_mode
DEFAULT_HYBRID_CID = 3  # the guest CID Firecracker and Cloud Hypervisor examples use
DEFAULT_CID = 2  # VMCI_HOST_CONTEXT_ID: a process on the host
MAX_CID = 0xFFFFFFFE  # 0xFFFFFFFF is VMCI_INVALID_ID


class SettingError(ValueError):
    """An environment setting has a value vsockcompat cannot use."""


def parse_flag(name: str, value: Optional[str], default: bool = False) -> bool:
    """``"1"`` is true, ``"0"`` or empty is false, unset is ``default``; anything else is an error."""
    if value is None:
        return default
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise SettingError("%s must be 0 or 1, not %r" % (name, value))


def parse_choice(name: str, value: Optional[str], choices) -> Optional[str]:
    """One of ``choices``; unset or empty is None."""
    if not value:
        return None
    if value not in choices:
        raise SettingError("%s must be one of %s, not %r" % (name, "|".join(choices), value))
    return value


def _guest_cid(value: str) -> int:
    try:
        cid = int(value, 10)
    except ValueError:
        raise SettingError("VSOCKCOMPAT_HYBRID_CID must be decimal guest CIDs separated by ':', "
                           "not %r" % value) from None
    if not 3 <= cid <= MAX_CID:
        raise SettingError("VSOCKCOMPAT_HYBRID_CID must hold guest CIDs in 3..%d, not %d" % (MAX_CID, cid))
    return cid


def parse_hybrid(uds: Optional[str], cids: Optional[str]) -> Tuple[Tuple[str, int], ...]:
    """The hybrid transport's VMM sockets: ``((path, guest CID), ...)`` from
    VSOCKCOMPAT_HYBRID_UDS (paths separated by ``:``) and VSOCKCOMPAT_HYBRID_CID (one CID per
    path, separated by ``:``; unset with one path: DEFAULT_HYBRID_CID). Paths and CIDs must be
    distinct. No paths: ``()`` (the CIDs are still checked)."""
    cid_list = [_guest_cid(value) for value in cids.split(":")] if cids else []
    if not uds:
        return ()
    paths = [os.path.abspath(path) if path else "" for path in uds.split(":")]
    if "" in paths:
        raise SettingError("VSOCKCOMPAT_HYBRID_UDS has an empty path in %r" % uds)
    if not cid_list and len(paths) == 1:
        cid_list = [DEFAULT_HYBRID_CID]
    if len(cid_list) != len(paths):
        raise SettingError("VSOCKCOMPAT_HYBRID_CID must give one guest CID per socket of "
                           "VSOCKCOMPAT_HYBRID_UDS: %d sockets, %d CIDs" % (len(paths), len(cid_list)))
    if len(set(cid_list)) != len(cid_list):
        raise SettingError("VSOCKCOMPAT_HYBRID_CID names a guest CID twice: %r" % cids)
    if len(set(paths)) != len(paths):
        raise SettingError("VSOCKCOMPAT_HYBRID_UDS names a socket twice: %r" % uds)
    return tuple(zip(paths, cid_list))


def parse_cid(value: Optional[str]) -> int:
    if value is None or value == "":
        return DEFAULT_CID
    try:
        cid = int(value, 10)
    except ValueError:
        raise SettingError("VSOCKCOMPAT_CID must be a decimal context id, not %r" % value) from None
    if not 0 <= cid <= MAX_CID:
        raise SettingError("VSOCKCOMPAT_CID must be in 0..%d, not %d" % (MAX_CID, cid))
    return cid


def default_rundir(environ: Mapping[str, str]) -> str:
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "vsockcompat")
    return "/tmp/vsockcompat-%d" % os.getuid()


class Settings(NamedTuple):
    """The effective settings of this process."""

    no_extensions: bool
    rundir: str
    cid: int
    transport: str
    ds_autostart: bool
    #: The access policy file (VSOCKCOMPAT_POLICY); None: <rundir>/policy.toml if present.
    policy: Optional[str] = None
    #: Who may register discovery names (VSOCKCOMPAT_DS_REGISTER); None: as the policy says.
    ds_register: Optional[str] = None
    #: Regions and queue pairs (VSOCKCOMPAT_SHM_MODE): ``shared`` memory, ``mirrored`` over
    #: streams, or ``auto``: shared where the transport has shared memory, else mirrored.
    shm_mode: str = "auto"
    #: Socket type of the vsock transport (VSOCKCOMPAT_VSOCK_MODE): ``dgram``, ``seqpacket``,
    #: ``stream``, or ``auto``: DGRAM where such sockets can be created (VMCI), else SEQPACKET
    #: where they can, else STREAM.
    vsock_mode: str = "auto"
    #: The VMMs' hybrid-vsock Unix sockets of the ``hybrid`` transport, each with the CID of
    #: the guest behind it: ``((path, cid), ...)`` (VSOCKCOMPAT_HYBRID_UDS, VSOCKCOMPAT_HYBRID_CID).
    hybrid: Tuple[Tuple[str, int], ...] = ()

    @classmethod
    def from_environ(cls, environ: Optional[Mapping[str, str]] = None) -> "Settings":
        env = os.environ if environ is None else environ
        transport = env.get("VSOCKCOMPAT_TRANSPORT") or "auto"
        if transport not in TRANSPORTS:
            raise SettingError(
                "VSOCKCOMPAT_TRANSPORT must be one of %s, not %r" % ("|".join(TRANSPORTS), transport)
            )
        rundir = env.get("VSOCKCOMPAT_RUNDIR") or default_rundir(env)
        return cls(
            no_extensions=parse_flag("VSOCKCOMPAT_NO_EXTENSIONS", env.get("VSOCKCOMPAT_NO_EXTENSIONS")),
            rundir=os.path.abspath(rundir),
            cid=parse_cid(env.get("VSOCKCOMPAT_CID")),
            transport=transport,
            ds_autostart=parse_flag(
                "VSOCKCOMPAT_DS_AUTOSTART", env.get("VSOCKCOMPAT_DS_AUTOSTART"), default=True
            ),
            policy=os.path.abspath(env["VSOCKCOMPAT_POLICY"]) if env.get("VSOCKCOMPAT_POLICY") else None,
            ds_register=parse_choice("VSOCKCOMPAT_DS_REGISTER", env.get("VSOCKCOMPAT_DS_REGISTER"),
                                     DS_REGISTER_RULES),
            shm_mode=parse_choice("VSOCKCOMPAT_SHM_MODE", env.get("VSOCKCOMPAT_SHM_MODE"),
                                  SHM_MODES) or "auto",
            vsock_mode=parse_choice("VSOCKCOMPAT_VSOCK_MODE", env.get("VSOCKCOMPAT_VSOCK_MODE"),
                                    VSOCK_MODES) or "auto",
            hybrid=parse_hybrid(env.get("VSOCKCOMPAT_HYBRID_UDS"), env.get("VSOCKCOMPAT_HYBRID_CID")),
        )
