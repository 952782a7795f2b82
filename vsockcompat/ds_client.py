"""The discovery-service client: VMCIDs_Lookup / _Register / _Unregister.

Each call (vmci-sdk.md 4.5, client behaviour) validates the name locally (a
bad name gives VMCI_ERROR_INVALID_ARGS without contacting the daemon), creates
a temporary datagram endpoint, sends one request to ``(1, 1)`` with a msgid
from a process-wide counter starting at 0, waits for the reply from ``(1, 1)``
with that msgid (datagrams from elsewhere or with another msgid are ignored;
the 2008 client returned GENERIC on a msgid mismatch, but with one endpoint
per call a stray reply can only be late or forged), destroys the endpoint and
returns the reply's code. No reply within ``timeout`` seconds gives
VMCI_ERROR_TIMEOUT (the 2008 client waited forever); a reply over 300 bytes
gives VMCI_ERROR_PAYLOAD_TOO_LARGE, any other malformed reply
VMCI_ERROR_GENERIC.

If no daemon answers at ``(1, 1)``, the runtime's ``ds_autostart`` is set and
the daemon belongs on this machine (``starts_daemon``: the local transport, or the
hybrid one on the host, whose daemon is given the same VMM sockets), the first call
starts one (``DAEMON_COMMAND``, idle exit 60 s), waits up to ``SPAWN_TIMEOUT``
seconds for it to bind ``(1, 1)`` and sends once more. Over vsock the daemon lives
on the host and is never started. Concurrent clients serialise on
``<rundir>/ds.spawn.lock`` so only one daemon is started. A daemon that cannot
start (or exits first) gives the send's code (no service at ``(1, 1)``) at once,
and its reason is in ``<rundir>/ds.log``.

``*_status`` functions return codes (for the SDK calls); the others raise the
VMCIError of the code.
"""
import fcntl
import itertools
import logging
import os
import struct
import subprocess
import sys
import threading
import time
from typing import Optional, Tuple

from . import constants as C
from .datagram import DatagramEndpoint
from .ds_protocol import MalformedMessage, decode_reply, encode_request, validate_name
from .errors import VMCIError, check
from .handles import VMCI_DS_HANDLE, VMCI_INVALID_HANDLE, VMCIHandle, as_handle
from .runtime import Runtime, default_runtime

__all__ = ["lookup_status", "register_status", "unregister_status",
           "lookup", "register", "unregister", "DAEMON_COMMAND", "REPLY_TIMEOUT"]

#: How a client starts the daemon; ``--idle-exit 60 --quiet`` are appended.
DAEMON_COMMAND = [sys.executable, "-m", "vsockcompat", "ds"]
#: Seconds a call waits for its reply.
REPLY_TIMEOUT = 10.0
#: Seconds a call waits for a daemon it started to bind (1, 1).
SPAWN_TIMEOUT = 30.0  # a bound, not a delay: a loaded machine can take seconds to start Python

log = logging.getLogger("vsockcompat.ds")

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_msgids = itertools.count()
_msgid_lock = threading.Lock()
_MSGID = struct.Struct("<i")


def _next_msgid() -> int:
    with _msgid_lock:
        return next(_msgids) & 0x7FFFFFFF


def _call(action: int, name, handle, runtime: Optional[Runtime],
          timeout: Optional[float]) -> Tuple[int, VMCIHandle, str]:
    """One request/reply; returns ``(code, handle, server message)``."""
    try:
        name = validate_name(name)
        handle = as_handle(handle)
    except VMCIError as exc:
        return exc.code, VMCI_INVALID_HANDLE, exc.detail or ""
    if action == C.VMCI_DS_ACTION_REGISTER and handle.is_invalid:
        return C.VMCI_ERROR_INVALID_ARGS, VMCI_INVALID_HANDLE, "cannot register the invalid handle"
    rt = runtime if runtime is not None else default_runtime()
    timeout = REPLY_TIMEOUT if timeout is None else timeout
    msgid = _next_msgid()
    payload = encode_request(action, msgid, handle, name)
    try:
        ep = DatagramEndpoint(runtime=rt)
    except VMCIError as exc:
        return exc.code, VMCI_INVALID_HANDLE, exc.detail or ""
    with ep:
        rc = ep.send_status(VMCI_DS_HANDLE, payload, len(payload))
        if (rc in (C.VMCI_ERROR_INVALID_RESOURCE, C.VMCI_ERROR_DST_UNREACHABLE) and rt.settings.ds_autostart
                and starts_daemon(rt.transport)):
            if _start_daemon(rt):
                rc = ep.send_status(VMCI_DS_HANDLE, payload, len(payload))
        if rc < 0:
            return rc, VMCI_INVALID_HANDLE, "no discovery service at (1, 1)"
        return _await_reply(ep, msgid, time.monotonic() + timeout)


def _await_reply(ep: DatagramEndpoint, msgid: int, deadline: float) -> Tuple[int, VMCIHandle, str]:
    while True:
        try:
            dg = ep.recv(timeout=max(deadline - time.monotonic(), 0.0))
        except VMCIError as exc:
            return exc.code, VMCI_INVALID_HANDLE, "no reply from the discovery service"
        if dg.src != VMCI_DS_HANDLE or len(dg.payload) < 4 or _MSGID.unpack_from(dg.payload)[0] != msgid:
            continue
        try:
            reply = decode_reply(dg.payload)
        except MalformedMessage as exc:
            too_large = len(dg.payload) > C.VMCI_DS_MAX_MSG_SIZE
            code = C.VMCI_ERROR_PAYLOAD_TOO_LARGE if too_large else C.VMCI_ERROR_GENERIC
            return code, VMCI_INVALID_HANDLE, "malformed reply: %s" % exc.reason
        handle = reply.handle if reply.code == C.VMCI_SUCCESS else VMCI_INVALID_HANDLE
        return reply.code, handle, reply.msg.decode("utf-8", "replace")


def starts_daemon(transport) -> bool:
    """Whether a client on ``transport`` starts a missing daemon: on the local transport, and
    on the hybrid one (which runs on the host, the daemon's place); over vsock the host's
    daemon is started by its admin."""
    return transport.name in ("local", "hybrid")


def daemon_environ(rt: Runtime) -> dict:
    """The environment of a daemon started for ``rt``: this process's, with the runtime's
    directory, core and transport (on hybrid, its VMM sockets and their guest CIDs)."""
    env = dict(os.environ)
    env["VSOCKCOMPAT_RUNDIR"] = rt.settings.rundir
    env["VSOCKCOMPAT_NO_EXTENSIONS"] = "1" if rt.core.NAME == "pure" else "0"
    env["VSOCKCOMPAT_TRANSPORT"] = rt.transport.name
    env["VSOCKCOMPAT_CID"] = str(C.VMCI_WELL_KNOWN_CONTEXT_ID)
    if rt.transport.name == "hybrid":
        env["VSOCKCOMPAT_HYBRID_UDS"] = ":".join(vmm.uds_path for vmm in rt.transport.vmms)
        env["VSOCKCOMPAT_HYBRID_CID"] = ":".join(str(vmm.guest_cid) for vmm in rt.transport.vmms)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    return env


def _start_daemon(rt: Runtime) -> bool:
    """Start a daemon unless one serves (1, 1) already; True once (1, 1) is alive."""
    rundir = rt.settings.rundir
    transport = rt.transport
    deadline = time.monotonic() + SPAWN_TIMEOUT
    os.makedirs(rundir, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(rundir, "ds.spawn.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return transport.endpoint_alive(VMCI_DS_HANDLE)
                time.sleep(0.02)
        if transport.endpoint_alive(VMCI_DS_HANDLE):
            return True
        try:
            proc = _spawn(rt)
        except OSError as exc:
            log.warning("cannot start the discovery daemon %s: %s", DAEMON_COMMAND, exc)
            return False
        while time.monotonic() < deadline:
            if transport.endpoint_alive(VMCI_DS_HANDLE):
                return True
            if proc.returncode is not None:  # set by the reaper thread
                break
            time.sleep(0.02)
        return transport.endpoint_alive(VMCI_DS_HANDLE)
    finally:
        os.close(fd)


def _spawn(rt: Runtime) -> subprocess.Popen:
    env = daemon_environ(rt)
    with open(os.path.join(rt.settings.rundir, "ds.log"), "ab") as logfile:
        proc = subprocess.Popen(list(DAEMON_COMMAND) + ["--idle-exit", "60", "--quiet"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logfile,
                                start_new_session=True, cwd="/")
    # Reap it when it exits, so a dead daemon never lingers as a zombie that looks alive.
    threading.Thread(target=proc.wait, name="vsockcompat-ds-reaper", daemon=True).start()
    return proc


# SDK-style calls: return codes.

def lookup_status(name, runtime: Optional[Runtime] = None, *,
                  timeout: Optional[float] = None) -> Tuple[int, VMCIHandle]:
    """``VMCIDs_Lookup``: ``(VMCI_SUCCESS, handle)`` or ``(error code, VMCI_INVALID_HANDLE)``."""
    rc, handle, _ = _call(C.VMCI_DS_ACTION_LOOKUP, name, VMCI_INVALID_HANDLE, runtime, timeout)
    return rc, handle


def register_status(name, handle, runtime: Optional[Runtime] = None, *,
                    timeout: Optional[float] = None) -> int:
    """``VMCIDs_Register``: VMCI_SUCCESS or an error code (ALREADY_EXISTS, INVALID_ARGS, ...)."""
    return _call(C.VMCI_DS_ACTION_REGISTER, name, handle, runtime, timeout)[0]


def unregister_status(name, runtime: Optional[Runtime] = None, *,
                      timeout: Optional[float] = None) -> int:
    """``VMCIDs_Unregister``: VMCI_SUCCESS or an error code (NOT_FOUND, NO_ACCESS, ...)."""
    return _call(C.VMCI_DS_ACTION_UNREGISTER, name, VMCI_INVALID_HANDLE, runtime, timeout)[0]


# Pythonic calls: raise the VMCIError of the code.

def _raising(action: int, name, handle, runtime, timeout) -> VMCIHandle:
    rc, result, msg = _call(action, name, handle, runtime, timeout)
    check(rc, "%r%s" % (name, ": %s" % msg if msg else ""))
    return result


def lookup(name, runtime: Optional[Runtime] = None, *, timeout: Optional[float] = None) -> VMCIHandle:
    """The handle registered under ``name``; raises ``errors.NotFound`` etc."""
    return _raising(C.VMCI_DS_ACTION_LOOKUP, name, VMCI_INVALID_HANDLE, runtime, timeout)


def register(name, handle, runtime: Optional[Runtime] = None, *, timeout: Optional[float] = None) -> None:
    """Publish ``name -> handle``; raises ``errors.AlreadyExists`` etc."""
    _raising(C.VMCI_DS_ACTION_REGISTER, name, handle, runtime, timeout)


def unregister(name, runtime: Optional[Runtime] = None, *, timeout: Optional[float] = None) -> None:
    """Remove ``name``; raises ``errors.NotFound``, ``errors.NoAccess`` etc."""
    _raising(C.VMCI_DS_ACTION_UNREGISTER, name, VMCI_INVALID_HANDLE, runtime, timeout)
