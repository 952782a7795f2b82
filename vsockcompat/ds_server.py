"""The discovery-service daemon: the SDK's name -> handle registry on ``(1, 1)``.

Behaviour follows vmci-sdk.md sections 4.5 and 8 (see ``DiscoveryServer``).
Files in the runtime directory while a daemon runs:

    ds.lock           flock held for the daemon's life: one daemon per runtime directory
    ds.pid            the daemon's pid
    ds.registry.json  the registry, rewritten atomically after every change: a list of
                      {"name": str, "handle": [cid, rid], "owner": cid,
                       "pid": int or null, "start": int or null,
                       "watch_endpoint": bool, "registered_at": unix time}
                      (names are decoded from UTF-8 with surrogateescape; "start" is
                      when "pid" started, in clock ticks since boot, as
                      ``transport.local.process_start_ticks`` reads it)

ds.pid and ds.registry.json are removed when the daemon exits cleanly.

Restart after a crash: the daemon recovers the entries whose owners are alive.
A daemon that dies without cleaning up (kill -9, OOM, power to the process
only) leaves ds.registry.json behind. The next daemon on that runtime
directory, once it holds ds.lock, reads it and keeps exactly the entries
whose registering process is still the same process (its pid is alive and
started at the recorded clock tick, so a reused pid never matches) and, for
entries that named a live datagram endpoint at registration, whose endpoint
still lives; it drops the rest, and the public group is always fresh. Clients
need not re-register: a registration outlives a daemon crash as long as its
owner does, and a LOOKUP after the restart answers as before the crash (an
entry whose owner died during the outage is gone). A missing file means a
clean previous exit (nothing to recover); a file that cannot be read or parsed,
or an entry that is malformed or lacks its owner's identity, is dropped with a
warning in the log and never stops the daemon. Temporary files of an
interrupted rewrite (``ds.registry.json.<pid>.tmp``) are removed.
``DiscoveryServer.recovery`` counts what was recovered and dropped.

Transports: the local one, ``vsock`` (context 1 at the host's CID) or ``hybrid`` (the host side
of VMMs' Unix sockets: each guest reaches ``(1, 1)`` at ``<uds>_1`` of its VMM's socket, the
host's processes at ``<uds>_1.host``; ``transport/hybrid.py``), as ``VSOCKCOMPAT_TRANSPORT``
says. On ``hybrid`` one daemon serves the guests of every socket it is given, so guests find
each other's names; a guest's registration lives while its VMM says the guest listens on the
port it names (a probe through that VMM each time the daemon prunes: every ``tick`` and before
LOOKUP and REGISTER; a VMM that is gone says no), a host process's while that process (and the
endpoint it named) lives.

Access control is not enforced yet: any context may REGISTER and UNREGISTER
(as the SDK's developer builds did); the release drivers' TRUSTED check is a
later issue.
"""
import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import select
import signal
import sys
import time
from typing import Dict, NamedTuple, Optional

from . import constants as C
from ._settings import SettingError, Settings
from .access import PUBLIC_GROUP
from .datagram import DatagramEndpoint
from .ds_protocol import MAX_REPLY_MSG_LEN, MalformedMessage, decode_request, encode_reply
from .errors import VMCIError, code_name
from .handles import VMCI_DS_HANDLE, VMCI_INVALID_HANDLE, VMCIHandle
from .policy import PolicyError
from .runtime import Runtime
from .transport.local import process_start_ticks

log = logging.getLogger("vsockcompat.ds")

#: The public group's handle: the highest reserved host resource id. Auto-assigned
#: ids start at 1024, so no ordinary endpoint ever gets it; groups are not
#: endpoints, so it is never watched for liveness.
PUBLIC_GROUP_HANDLE = PUBLIC_GROUP

_ACTIONS = {C.VMCI_DS_ACTION_LOOKUP: "LOOKUP", C.VMCI_DS_ACTION_REGISTER: "REGISTER",
            C.VMCI_DS_ACTION_UNREGISTER: "UNREGISTER"}
_RECV_SIZE = C.VMCI_MAX_DG_PAYLOAD_SIZE + 1


class AlreadyRunning(RuntimeError):
    """Another discovery daemon holds this runtime directory."""


class Entry(NamedTuple):
    """One registration. ``pid``/``start`` are None for entries that never expire, 0 for
    entries registered from another kernel (over vsock, or the guest's on the hybrid
    transport): the registering process is not visible, so the entry lives until
    unregistered, or while the endpoint it named at registration lives (which the hybrid
    transport can tell for its guest's endpoints, the vsock transport only for its own)."""

    handle: VMCIHandle
    owner: int  # context id of the registering endpoint
    pid: Optional[int]
    start: Optional[int]  # when pid started, in clock ticks since boot (process_start_ticks)
    registered_at: float
    watch_endpoint: bool  # the handle named a live resource (endpoint, region, queue pair) at registration


def _process_start(pid: int) -> Optional[int]:
    try:
        return process_start_ticks(pid)
    except (OSError, ValueError, IndexError):
        return None


def daemon_transport(name: str) -> str:
    """The transport the daemon serves on: ``vsock`` or ``hybrid`` when the environment asks for
    it, else local."""
    return name if name in ("vsock", "hybrid") else "local"


def _u32(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFFFFFF


class DiscoveryServer:
    """The SDK discovery service on ``VMCI_DS_HANDLE`` (1, 1), for one runtime directory.

    ``runtime`` must be of context 1 (None: from the environment, forced to
    context 1 on the local transport). Construction takes ``<rundir>/ds.lock``
    (``AlreadyRunning`` if another daemon has it), binds (1, 1) and writes
    ds.pid and ds.registry.json. ``serve_forever()`` answers requests until
    ``stop()`` (thread- and signal-safe) or, with ``idle_exit``, until no request
    came for that many seconds and no entry but the public group is alive; it
    then releases everything (``close()``, idempotent).

    Protocol (section 4.5): LOOKUP -> SUCCESS + handle, or NOT_FOUND;
    REGISTER -> INVALID_ARGS for the invalid handle, ALREADY_EXISTS for a live
    name, else SUCCESS; UNREGISTER -> NOT_FOUND, NO_ACCESS ("access denied")
    when another context owns the entry and the requester is not the host
    (2), else SUCCESS; with the policy's SDK-strict rule (``register =
    "trusted"``) REGISTER and UNREGISTER from a context that is not TRUSTED get
    NO_ACCESS ("access denied", counted in ``stats["denied"]``); other actions
    -> GENERIC ("unknown action"). A malformed
    request gets INVALID_ARGS with the reason if its msgid was readable and is
    dropped otherwise; ``stats["malformed"]`` counts both. Names are exact
    bytes. An entry dies when its registering process exits (pid and start
    time) or when the datagram endpoint it names, live at registration, is
    destroyed; dead entries are pruned before LOOKUP/REGISTER and every
    ``tick`` seconds. ``"vmci public group"`` -> PUBLIC_GROUP_HANDLE is owned
    by the host, never expires and cannot be unregistered (NO_ACCESS): it
    stands for the driver's own registration.
    """

    def __init__(self, runtime: Optional[Runtime] = None, *, idle_exit: Optional[float] = None,
                 tick: float = 1.0):
        if runtime is None:
            env = Settings.from_environ()
            runtime = Runtime(env._replace(cid=C.VMCI_WELL_KNOWN_CONTEXT_ID,
                                           transport=daemon_transport(env.transport)))
        if runtime.settings.cid != C.VMCI_WELL_KNOWN_CONTEXT_ID:
            raise ValueError("the discovery service runs in context 1, not %d" % runtime.settings.cid)
        self.runtime = runtime
        self.idle_exit = idle_exit
        self.tick = tick
        self.stats = {"requests": 0, "malformed": 0, "denied": 0}
        rundir = runtime.settings.rundir
        self._pidfile = os.path.join(rundir, "ds.pid")
        self._regfile = os.path.join(rundir, "ds.registry.json")
        self._registry: Dict[bytes, Entry] = {
            C.VMCI_PUBLIC_GROUP_NAME.encode(): Entry(
                PUBLIC_GROUP_HANDLE, C.VMCI_HOST_CONTEXT_ID, None, None, time.time(), False),
        }
        self._closed = False
        #: What the start recovered from a crashed daemon's registry (see the module docstring).
        self.recovery = {"recovered": 0, "dropped": 0}
        os.makedirs(rundir, mode=0o755, exist_ok=True)
        self._lock_fd = os.open(os.path.join(rundir, "ds.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise AlreadyRunning("a discovery daemon%s already serves %s"
                                 % (self._other_pid(), rundir)) from None
        self._wake_r = self._wake_w = -1
        try:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._endpoint = DatagramEndpoint(VMCI_DS_HANDLE.resource, runtime=runtime)
        except BaseException:
            self._release()
            raise
        try:
            self._write_atomic(self._pidfile, "%d\n" % os.getpid())
            self._recover()
            self._save()
        except BaseException:
            self.close()
            raise

    def _other_pid(self) -> str:
        try:
            with open(self._pidfile) as f:
                return " (pid %d)" % int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return ""

    # Life cycle

    def serve_forever(self) -> None:
        """Answer requests until ``stop()`` or the idle exit; then ``close()``."""
        buf = bytearray(_RECV_SIZE)
        view = memoryview(buf)
        ep = self._endpoint
        poller = select.poll()
        poller.register(ep.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        last_request = last_tick = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if now - last_tick >= self.tick:
                    self._prune()
                    last_tick = now
                wait = self.tick - (now - last_tick)
                if self.idle_exit is not None:
                    idle_left = self.idle_exit - (now - last_request)
                    if idle_left <= 0:
                        self._prune()
                        if len(self._registry) == 1:  # only the public group
                            log.info("idle for %gs with no registrations: exiting", self.idle_exit)
                            return
                        idle_left = self.tick
                    wait = min(wait, idle_left)
                ready = [fd for fd, _ in poller.poll(max(wait, 0.0) * 1000)]
                if self._wake_r in ready:
                    return
                if not ready:
                    continue
                n, src = ep.recv_status(view, 0)
                if n < 0:  # only accepted a connection, or drained a hang-up
                    continue
                last_request = time.monotonic()
                self._handle(src, ep.last_peer, view[:n].tobytes())
        finally:
            self.close()

    def stop(self) -> None:
        """Ask ``serve_forever`` to return; safe from any thread and from signal handlers."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def close(self) -> None:
        """Destroy the endpoint, remove ds.pid and ds.registry.json, release the lock."""
        if self._closed:
            return
        self._closed = True
        self._endpoint.close()
        for path in (self._regfile, self._pidfile):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._release()

    def _release(self) -> None:
        for fd in (self._wake_r, self._wake_w, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = self._lock_fd = -1

    def __enter__(self) -> "DiscoveryServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Requests

    def _handle(self, src: VMCIHandle, peer, payload: bytes) -> None:
        self.stats["requests"] += 1
        try:
            req = decode_request(payload)
        except MalformedMessage as exc:
            self.stats["malformed"] += 1
            log.info("malformed request from %s: %s%s", tuple(src), exc.reason,
                     "" if exc.msgid is not None else " (dropped)")
            if exc.msgid is not None:
                reason = exc.reason.encode()[:MAX_REPLY_MSG_LEN]
                self._reply(src, exc.msgid, C.VMCI_ERROR_INVALID_ARGS, VMCI_INVALID_HANDLE, reason)
            return
        handle, msg = VMCI_INVALID_HANDLE, b""
        if req.action == C.VMCI_DS_ACTION_LOOKUP:
            self._prune()
            entry = self._registry.get(req.name)
            code = C.VMCI_SUCCESS if entry is not None else C.VMCI_ERROR_NOT_FOUND
            if entry is not None:
                handle = entry.handle
        elif req.action in (C.VMCI_DS_ACTION_REGISTER, C.VMCI_DS_ACTION_UNREGISTER) \
                and not self.runtime.policy.may_register(src.context):
            self.stats["denied"] += 1
            code, msg = C.VMCI_ERROR_NO_ACCESS, b"access denied"
        elif req.action == C.VMCI_DS_ACTION_REGISTER:
            code = self._register(req, src, peer)
        elif req.action == C.VMCI_DS_ACTION_UNREGISTER:
            code = self._unregister(req.name, src)
            if code == C.VMCI_ERROR_NO_ACCESS:
                msg = b"access denied"
        else:
            code, msg = C.VMCI_ERROR_GENERIC, b"unknown action"
        log.info("%s %r from %s pid %s -> %s%s", _ACTIONS.get(req.action, "action %d" % req.action),
                 req.name, tuple(src), getattr(peer, "pid", "?"), code_name(code),
                 " %s" % (tuple(handle),) if code == C.VMCI_SUCCESS and not handle.is_invalid else "")
        self._reply(src, req.msgid, code, handle, msg)

    def _register(self, req, src: VMCIHandle, peer) -> int:
        if req.handle.is_invalid:
            return C.VMCI_ERROR_INVALID_ARGS
        self._prune()
        if req.name in self._registry:
            return C.VMCI_ERROR_ALREADY_EXISTS
        pid = peer.pid if peer is not None else None
        self._registry[req.name] = Entry(
            req.handle, src.context, pid, _process_start(pid) if pid else (0 if pid == 0 else None),
            time.time(), self.runtime.transport.resource_alive(req.handle))
        self._save()
        return C.VMCI_SUCCESS

    def _unregister(self, name: bytes, src: VMCIHandle) -> int:
        entry = self._registry.get(name)
        if entry is None:
            return C.VMCI_ERROR_NOT_FOUND
        if entry.pid is None or (entry.owner != src.context and src.context != C.VMCI_HOST_CONTEXT_ID):
            return C.VMCI_ERROR_NO_ACCESS
        del self._registry[name]
        self._save()
        return C.VMCI_SUCCESS

    def _reply(self, dst: VMCIHandle, msgid: int, code: int, handle: VMCIHandle, msg: bytes) -> None:
        reply = encode_reply(msgid, code, handle, msg)
        try:
            self._endpoint.send(dst, reply)
        except VMCIError as exc:
            log.info("reply to %s failed: %s (%s)", tuple(dst), code_name(exc.code), exc)
        # Clients ask from a fresh endpoint each time: keep no link to it.
        self._endpoint.forget(dst)

    # Registry

    def _alive(self, entry: Entry) -> bool:
        if entry.pid is None:
            return True
        if entry.pid == 0:  # registered from another kernel: no process to watch, only its endpoint
            return not entry.watch_endpoint or self.runtime.transport.resource_alive(entry.handle)
        if entry.start is None or _process_start(entry.pid) != entry.start:
            return False
        return not entry.watch_endpoint or self.runtime.transport.resource_alive(entry.handle)

    def _prune(self) -> None:
        dead = [name for name, entry in self._registry.items() if not self._alive(entry)]
        for name in dead:
            log.info("entry %r -> %s died", name, tuple(self._registry.pop(name).handle))
        if dead:
            self._save()

    def _recover(self) -> None:
        """Take back the live entries a crashed daemon left in ds.registry.json. Under ds.lock."""
        rundir = os.path.dirname(self._regfile)
        prefix = os.path.basename(self._regfile) + "."
        for name in os.listdir(rundir):
            if name.startswith(prefix) and name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(rundir, name))
        try:
            with open(self._regfile, "rb") as f:
                records = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            log.warning("ignoring an unreadable %s: %s", self._regfile, exc)
            return
        if not isinstance(records, list):
            log.warning("ignoring %s: not a list of entries", self._regfile)
            return
        public = C.VMCI_PUBLIC_GROUP_NAME.encode()
        for record in records:
            entry_name = self._recoverable(record)
            if entry_name == public:
                continue  # always fresh
            if entry_name is None:
                self.recovery["dropped"] += 1
                continue
            entry = Entry(VMCIHandle(*record["handle"]), record["owner"], record["pid"], record["start"],
                          float(record["registered_at"]), record["watch_endpoint"])
            if entry_name in self._registry or not self._alive(entry):
                log.info("entry %r -> %s of the previous daemon died", entry_name, tuple(entry.handle))
                self.recovery["dropped"] += 1
                continue
            self._registry[entry_name] = entry
            self.recovery["recovered"] += 1
        if self.recovery["recovered"] or self.recovery["dropped"]:
            log.warning("recovered %d entries of the previous daemon, dropped %d",
                        self.recovery["recovered"], self.recovery["dropped"])

    @staticmethod
    def _recoverable(record) -> Optional[bytes]:
        """The name of a well-formed entry with its owner's identity, else None."""
        if not isinstance(record, dict):
            return None
        name, handle = record.get("name"), record.get("handle")
        if not isinstance(name, str):
            return None
        try:
            name = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return None
        if b"\0" in name or len(name) > C.VMCI_DS_MAX_NAME_LEN:
            return None
        if name == C.VMCI_PUBLIC_GROUP_NAME.encode():
            return name
        if not (isinstance(handle, list) and len(handle) == 2 and all(_u32(v) for v in handle)
                and VMCIHandle(*handle) != VMCI_INVALID_HANDLE and _u32(record.get("owner"))):
            return None
        pid, start = record.get("pid"), record.get("start")
        if not (_u32(pid) and pid > 0 and isinstance(start, int) and not isinstance(start, bool)
                and start >= 0 and isinstance(record.get("watch_endpoint"), bool)):
            return None
        at = record.get("registered_at")
        if isinstance(at, bool) or not isinstance(at, (int, float)):
            return None
        return name

    def _save(self) -> None:
        entries = [{"name": name.decode("utf-8", "surrogateescape"), "handle": list(e.handle),
                    "owner": e.owner, "pid": e.pid, "start": e.start,
                    "watch_endpoint": e.watch_endpoint, "registered_at": e.registered_at}
                   for name, e in self._registry.items()]
        self._write_atomic(self._regfile, json.dumps(entries, indent=1) + "\n")

    @staticmethod
    def _write_atomic(path: str, text: str) -> None:
        tmp = "%s.%d.tmp" % (path, os.getpid())
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def main(argv) -> int:
    """``vsockcompat ds [--idle-exit SECONDS] [--quiet]``: run the daemon in the foreground."""
    parser = argparse.ArgumentParser(prog="vsockcompat ds",
                                     description="Run the VMCI discovery service (context 1, handle (1, 1)).")
    parser.add_argument("--idle-exit", type=float, metavar="SECONDS",
                        help="exit after SECONDS without requests once only the public group is registered")
    parser.add_argument("--quiet", action="store_true", help="log only warnings and errors")
    args = parser.parse_args(argv)
    if args.idle_exit is not None and not args.idle_exit > 0:
        parser.error("--idle-exit must be a positive number of seconds")
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s vsockcompat-ds[%(process)d] %(message)s")
    try:
        env = Settings.from_environ()
        settings = env._replace(cid=C.VMCI_WELL_KNOWN_CONTEXT_ID, transport=daemon_transport(env.transport))
        server = DiscoveryServer(Runtime(settings), idle_exit=args.idle_exit)
    except (AlreadyRunning, SettingError, PolicyError, VMCIError) as exc:
        print("vsockcompat ds: %s" % exc, file=sys.stderr)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: server.stop())
    log.info("serving %s on %s (core %s)", tuple(VMCI_DS_HANDLE), settings.rundir, server.runtime.backend)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
