"""The local transport: several contexts on one machine, no hypervisor.

Layout of the runtime directory (``VSOCKCOMPAT_RUNDIR``)::

    c<cid>/                       one directory per context, writable only by its owner
    c<cid>/<rid>                  listening SOCK_SEQPACKET socket of endpoint (cid, rid)
    c<cid>/<rid>.acct             its queue account page (src/vsc_dgram.h)
    c<cid>/<rid>-<dcid>.<drid>    bound client socket of the link (cid, rid) -> (dcid, drid)
    c<cid>/.lock, c<cid>/.next    allocation lock, next auto-assigned resource id

Identity comes from the kernel: a receiver reads the path its peer's socket is
bound to (``getpeername``), and only a process that may write into ``c<cid>/``
can bind there, so a sender cannot claim another context's handle.
"""
import contextlib
import fcntl
import itertools
import mmap
import os
import re
import socket
import struct
from typing import Callable, Dict, Iterator, List, Optional, TypeVar

from ..constants import (
    VMCI_HYPERVISOR_CONTEXT_ID,
    VMCI_INVALID_ID,
    VMCI_MAX_DATAGRAM_QUEUE_SIZE,
    VMCI_RESERVED_RESOURCE_ID_MAX,
)
from ..errors import DstUnreachable, DuplicateEntry, InvalidResource, NoAccess, NoResources
from ..handles import VMCIHandle
from .base import Bound, Link, Peer, Transport, TransportUnavailable

_SUN_PATH_MAX = 107
_LONGEST_NAME = "/c4294967295/4294967295-4294967295.4294967295"
_ID = r"(0|[1-9][0-9]{0,9})"
_LINK_NAME = re.compile(r"%s/%s-%s\.%s" % (_ID, _ID, _ID, _ID))
_ENDPOINT_NAME = re.compile(_ID)
_FIRST_AUTO_RID = VMCI_RESERVED_RESOURCE_ID_MAX + 1
_OWNER_PID_WORD, _OWNER_START_WORD = 5, 6  # VSC_ACCT_OFF_OWNER_PID / _START (src/vsc_dgram.h)
_CREDS = struct.Struct("3i")
_bound_names = itertools.count()
_ACL_SUFFIX = ".acl"  # access.ACL_SUFFIX: a resource's client privileges
_SNDBUF_WANTED = 4 << 20
T = TypeVar("T")


def _sndbuf_size() -> int:
    try:
        with open("/proc/sys/net/core/wmem_max") as f:
            return min(_SNDBUF_WANTED, int(f.read()))
    except (OSError, ValueError):
        return _SNDBUF_WANTED


def process_start_ticks(pid: int) -> int:
    """When ``pid`` started, in clock ticks since boot (field 22 of /proc/<pid>/stat).

    Exact and stable, so a process id reused by another process never matches;
    the C core reads the same field. Raises OSError if there is no such process.
    """
    with open("/proc/%d/stat" % pid, "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def _next_rid(rid: int) -> int:
    rid += 1
    return _FIRST_AUTO_RID if rid >= VMCI_INVALID_ID or rid < _FIRST_AUTO_RID else rid


class LocalTransport(Transport):
    """AF_UNIX SOCK_SEQPACKET links and shared account pages under a runtime directory."""

    name = "local"
    features = frozenset({"dgram", "peer-identity", "shared-memory"})

    def __init__(self, rundir: str, cid: int, core):
        rundir = os.path.abspath(rundir)
        if len(rundir) + len(_LONGEST_NAME) > _SUN_PATH_MAX:
            raise TransportUnavailable(
                "runtime directory %r is too long for Unix socket paths (at most %d characters)"
                % (rundir, _SUN_PATH_MAX - len(_LONGEST_NAME))
            )
        self.rundir = rundir
        self._cid = cid
        self._core = core
        self._sndbuf = _sndbuf_size()
        self._my_start = process_start_ticks(os.getpid())
        self._kinds: Dict[str, tuple] = {}

    @property
    def local_cid(self) -> int:
        return self._cid

    def context_dir(self, cid: int) -> str:
        return os.path.join(self.rundir, "c%d" % cid)

    def endpoint_path(self, handle: VMCIHandle) -> str:
        return os.path.join(self.context_dir(handle.context), "%d" % handle.resource)

    # Endpoints

    def bind(self, resource: Optional[int]) -> Bound:
        return self.allocate(resource, lambda handle: self._create(handle.resource))

    def allocate(self, resource: Optional[int], create: Callable[[VMCIHandle], T],
                 cid: Optional[int] = None) -> T:
        """Pick a resource id in context ``cid`` (default ours) and call ``create(handle)``
        while it is reserved.

        ``resource`` None picks the next free id >= 1024 (increasing, wrapping);
        a given id that a live resource of any kind holds raises DuplicateEntry.
        Resource kinds share one id space per context, so a handle names one thing.
        A context directory of another user raises NoAccess.
        """
        cid = self._cid if cid is None else cid
        cdir = self.context_dir(cid)
        try:
            os.makedirs(self.rundir, mode=0o755, exist_ok=True)
            os.makedirs(cdir, mode=0o755, exist_ok=True)
            with self.context_lock(cid):
                if resource is not None:
                    if self._taken(VMCIHandle(cid, resource)):
                        raise DuplicateEntry("resource id %d is taken in context %d" % (resource, cid))
                    return create(VMCIHandle(cid, resource))
                rid = self._read_next(cdir)
                for _ in range(len(os.listdir(cdir)) + 1):
                    if not self._taken(VMCIHandle(cid, rid)):
                        break
                    rid = _next_rid(rid)
                created = create(VMCIHandle(cid, rid))
                self._write_next(cdir, _next_rid(rid))
                return created
        except PermissionError as exc:
            raise NoAccess("context %d belongs to another user (%s)" % (cid, exc.filename or cdir)) from None

    def add_resource_kind(self, suffix: str, alive: Callable[[str], bool],
                          reap: Optional[Callable[[str], None]] = None) -> None:
        """Teach id allocation about another kind of resource.

        A resource of that kind at ``(cid, rid)`` keeps its state in files named
        ``c<cid>/<rid><suffix>*``; ``alive(path)`` with ``path`` = ``c<cid>/<rid><suffix>``
        says, without changing anything, whether it still lives. Dead ones are
        reclaimed on allocation, under the context lock: ``reap(path)`` releases
        what lives outside the runtime directory, then their files are removed.
        """
        self._kinds[suffix] = (alive, reap)

    def unbind(self, bound: Bound) -> None:
        bound.account.mark_closed()
        path = self.endpoint_path(bound.handle)
        for name in (path, path + ".acct", path + _ACL_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        bound.listener.close()
        self._unmap(bound.account, bound.page)

    # Links

    def connect(self, src: VMCIHandle, dst: VMCIHandle) -> Link:
        if dst.context == VMCI_HYPERVISOR_CONTEXT_ID or not os.path.isdir(self.context_dir(dst.context)):
            raise DstUnreachable("no context %d on the local transport" % dst.context)
        path = self.endpoint_path(dst)
        account, page = self._map_account(path + ".acct")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        name = os.path.join(self.context_dir(src.context), "%d-%d.%d" % (src.resource, dst.context, dst.resource))
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            sock.bind(name)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sndbuf)
            sock.setblocking(False)
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            self._abandon(sock, name, account, page)
            raise InvalidResource("no endpoint %s" % (dst,)) from None
        except BlockingIOError:
            self._abandon(sock, name, account, page)
            raise NoResources("endpoint %s accepts no more connections now" % (dst,)) from None
        except PermissionError:
            self._abandon(sock, name, account, page)
            raise NoAccess("not allowed to reach endpoint %s" % (dst,)) from None
        except BaseException:
            self._abandon(sock, name, account, page)
            raise
        return Link(sock, account, page)

    def disconnect(self, src: VMCIHandle, link: Link) -> None:
        name = link.sock.getsockname()
        link.sock.close()
        if isinstance(name, str) and name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        self._unmap(link.account, link.page)

    # Identity

    def identify(self, conn, dst: VMCIHandle) -> Optional[Peer]:
        name = conn.getpeername()
        prefix = self.rundir + "/c"
        if not isinstance(name, str) or not name.startswith(prefix):
            return None
        match = _LINK_NAME.fullmatch(name[len(prefix):])
        if match is None:
            return None
        cid, rid, dcid, drid = (int(g) for g in match.groups())
        if max(cid, rid, dcid, drid) > 0xFFFFFFFF or (dcid, drid) != tuple(dst):
            return None
        pid, uid, _ = _CREDS.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
        try:
            owner = os.stat(self.context_dir(cid)).st_uid
        except OSError:
            return None
        if uid != owner:
            return None  # bound in a context directory it does not own: a loosened permission
        return Peer(VMCIHandle(cid, rid), pid, uid)

    def peer_in_context(self, conn, cid: int) -> bool:
        """Whether the peer of the connected AF_UNIX socket ``conn`` is bound in ``c<cid>/``
        and runs as the user who owns that directory (how any stream proves its context)."""
        try:
            name = conn.getpeername()
            if not isinstance(name, str) or os.path.dirname(name) != self.context_dir(cid):
                return False
            _, uid, _ = _CREDS.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
            return os.stat(self.context_dir(cid)).st_uid == uid
        except OSError:
            return False

    def bind_in_context(self, sock, tag: str) -> str:
        """Bind ``sock`` (AF_UNIX) to a fresh name in our context's directory, so the peer it
        connects to can tell our context (``peer_in_context``). Unlink the name once connected."""
        cdir = self.context_dir(self._cid)
        os.makedirs(cdir, mode=0o755, exist_ok=True)
        name = os.path.join(cdir, ".%s-%d-%d" % (tag, os.getpid(), next(_bound_names)))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        sock.bind(name)
        return name

    # Introspection

    def endpoint_alive(self, handle: VMCIHandle) -> bool:
        try:
            account, page = self._map_account(self.endpoint_path(handle) + ".acct")
        except (InvalidResource, NoAccess):
            return False
        try:
            return not account.closed and self._owner_alive(page)
        finally:
            self._unmap(account, page)

    def resource_alive(self, handle: VMCIHandle) -> bool:
        """Whether any live resource (endpoint, region, queue pair, ...) holds ``handle``."""
        if self.endpoint_alive(handle):
            return True
        path = self.endpoint_path(handle)
        return any(os.path.lexists(path + suffix) and alive(path + suffix)
                   for suffix, (alive, _) in self._kinds.items())

    def contexts(self) -> List[int]:
        """Context ids that have a directory under the runtime directory."""
        try:
            names = os.listdir(self.rundir)
        except FileNotFoundError:
            return []
        return sorted(int(n[1:]) for n in names if n[:1] == "c" and _ENDPOINT_NAME.fullmatch(n[1:]))

    def endpoints(self, cid: int) -> Iterator[VMCIHandle]:
        """Live endpoints of context ``cid``."""
        try:
            names = os.listdir(self.context_dir(cid))
        except FileNotFoundError:
            return
        for rid in sorted(int(n) for n in names if _ENDPOINT_NAME.fullmatch(n)):
            if self.endpoint_alive(VMCIHandle(cid, rid)):
                yield VMCIHandle(cid, rid)

    # Helpers

    @contextlib.contextmanager
    def context_lock(self, cid: int):
        """Hold the lock that serialises allocation and privilege changes in context ``cid``."""
        fd = os.open(os.path.join(self.context_dir(cid), ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _read_next(cdir: str) -> int:
        try:
            with open(os.path.join(cdir, ".next")) as f:
                rid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            return _FIRST_AUTO_RID
        return rid if _FIRST_AUTO_RID <= rid < VMCI_INVALID_ID else _FIRST_AUTO_RID

    @staticmethod
    def _write_next(cdir: str, rid: int) -> None:
        with open(os.path.join(cdir, ".next"), "w") as f:
            f.write("%d\n" % rid)

    def _taken(self, handle: VMCIHandle) -> bool:
        """Whether a live resource holds ``handle``; reclaims dead ones' files. Call under the lock."""
        path = self.endpoint_path(handle)
        if os.path.lexists(path) or os.path.lexists(path + ".acct"):
            if self.endpoint_alive(handle):
                return True
            for name in (path, path + ".acct"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
        for suffix, (alive, reap) in self._kinds.items():
            if os.path.lexists(path + suffix):
                if alive(path + suffix):
                    return True
                if reap is not None:
                    reap(path + suffix)
                cdir, prefix = os.path.split(path + suffix)
                for name in os.listdir(cdir):
                    if name.startswith(prefix):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(cdir, name))
        # Privileges set on a resource that no longer lives must not pass to the next one.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + _ACL_SUFFIX)
        return False

    def _create(self, rid: int) -> Bound:
        handle = VMCIHandle(self._cid, rid)
        path = self.endpoint_path(handle)
        fd = os.open(path + ".acct", os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, self._core.ACCOUNT_SIZE)
            page = mmap.mmap(fd, self._core.ACCOUNT_SIZE)
        except BaseException:
            os.close(fd)
            raise
        account = self._core.Account(fd, page)
        account.initialise(VMCI_MAX_DATAGRAM_QUEUE_SIZE)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            listener.bind(path)
            listener.listen(socket.SOMAXCONN)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            os.unlink(path + ".acct")
            self._unmap(account, page)
            raise
        # Owned (so alive) only once it accepts connections.
        words = memoryview(page).cast("Q")
        words[_OWNER_PID_WORD] = os.getpid()
        words[_OWNER_START_WORD] = self._my_start
        words.release()
        return Bound(handle, listener, account, page)

    def _map_account(self, path: str):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidResource("no endpoint at %s" % path) from None
        except PermissionError:
            raise NoAccess("not allowed to reach %s" % path) from None
        try:
            if os.fstat(fd).st_size < self._core.ACCOUNT_SIZE:
                raise InvalidResource("endpoint at %s is not ready" % path)
            page = mmap.mmap(fd, self._core.ACCOUNT_SIZE)
        except BaseException:
            os.close(fd)
            raise
        account = self._core.Account(fd, page)
        if not account.is_valid():
            self._unmap(account, page)
            raise InvalidResource("endpoint at %s is not ready" % path)
        return account, page

    @staticmethod
    def _unmap(account, page) -> None:
        fd = account.fd
        account.release_memory()
        page.close()
        os.close(fd)

    def _abandon(self, sock, name, account, page) -> None:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        self._unmap(account, page)

    def _owner_alive(self, page) -> bool:
        words = memoryview(page).cast("Q")
        try:
            pid, start = words[_OWNER_PID_WORD], words[_OWNER_START_WORD]
        finally:
            words.release()
        if pid == os.getpid():
            return start == self._my_start
        try:
            return pid > 0 and process_start_ticks(pid) == start
        except (OSError, ValueError, IndexError):
            return False
