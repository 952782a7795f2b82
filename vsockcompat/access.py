"""Access control of one runtime: who may do what to which resource.

Three layers, checked in this order wherever two contexts interact:

1. identity, from the kernel (the transport's ``identify``; a claimed source
   that disagrees is refused before anything here runs);
2. the context flags of the operator's policy (``policy.py``): a RESTRICTED
   context talks only to TRUSTED ones;
3. the client privileges of the resource (``privileges.py``), stored next to
   the resource so every process of the machine sees them: ``c<cid>/<rid>.acl``
   on the local transport. Groups live at ``c2/<rid>.group``.

A change of a datagram endpoint's privileges also bumps the ACL epoch word of
its queue account page, which every sender has mapped: a sender re-checks
before its next datagram, and the receiver re-checks the connections it
serves, so a denial takes effect at once in both places.

Transports without a runtime directory keep privileges in this process only;
the endpoint owner's own receive path still enforces them.
"""
import contextlib
import mmap
import os
import re
import threading
import weakref
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from .constants import (
    VMCI_ERROR_INVALID_ARGS,
    VMCI_HOST_CONTEXT_ID,
    VMCI_PRIV_ASSIGN_CLIENT,
    VMCI_PRIV_CH_PRIV,
    VMCI_PRIV_DENY,
    VMCI_PRIV_DG_SEND,
    VMCI_PRIV_SM_ATTACH,
    VMCI_RESERVED_RESOURCE_ID_MAX,
    VMCI_SUCCESS_ACCESS_GRANTED,
)
from .errors import NoAccess, VMCIError, error_for
from .handles import VMCIHandle
from .policy import Policy
from .privileges import ClientPrivileges, split_records

__all__ = ["AccessControl", "ACL_SUFFIX", "GROUP_SUFFIX", "PUBLIC_GROUP", "ACL_EPOCH_WORD"]

ACL_SUFFIX = ".acl"
GROUP_SUFFIX = ".group"
GROUP_MAGIC, GROUP_VERSION = "vsockcompat-group", 1
_U = r"(0|[1-9][0-9]{0,19})"
_GROUP_HEAD = re.compile(r"vsockcompat-group 1 %s %s %s" % (_U, _U, _U))
_MEMBER = re.compile(r"%s %s ([01])" % (_U, _U))
#: The public group: every handle is a member. Registered by the discovery service
#: as "vmci public group"; the highest reserved host resource id.
PUBLIC_GROUP = VMCIHandle(VMCI_HOST_CONTEXT_ID, VMCI_RESERVED_RESOURCE_ID_MAX)
#: Word (u64) of a queue account page counting changes of the endpoint's privileges
#: (VSC_ACCT_OFF_ACL_EPOCH in src/vsc_dgram.h).
ACL_EPOCH_WORD = 7
#: What unreadable privileges deny the public group, per kind (fail closed).
_GUARDED = {"datagram": VMCI_PRIV_DG_SEND, "sharedmem": VMCI_PRIV_SM_ATTACH}


class _Group:
    """A group: members, each with or without the right to assign clients."""

    __slots__ = ("handle", "owner", "members")

    def __init__(self, handle: VMCIHandle, owner: Tuple[int, int, int], members: Dict[VMCIHandle, bool]):
        self.handle = handle
        self.owner = owner  # (context id, pid, process start ticks)
        self.members = members

    # Storage form (src/vsc_acl.h reads it too):
    #   vsockcompat-group 1 <owner cid> <owner pid> <owner start ticks>
    #   <member cid> <member rid> <can assign: 0|1>                  (one line each)

    def to_text(self) -> str:
        lines = ["%s %d %d %d %d" % ((GROUP_MAGIC, GROUP_VERSION) + tuple(self.owner))]
        lines += ["%d %d %d" % (m.context, m.resource, can) for m, can in sorted(self.members.items())]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, handle: VMCIHandle, text: str) -> "_Group":
        head, lines = split_records(text, _GROUP_HEAD, "group")
        members = {}
        for line in lines:
            match = _MEMBER.fullmatch(line)
            if match is None or max(int(match.group(1)), int(match.group(2))) > 0xFFFFFFFF:
                raise ValueError("malformed member line %r" % line)
            members[VMCIHandle(int(match.group(1)), int(match.group(2)))] = match.group(3) == "1"
        return cls(handle, tuple(int(word) for word in head.groups()), members)


class AccessControl:
    """The access rules of one runtime (policy + privileges + groups)."""

    def __init__(self, transport, policy: Policy):
        self.transport = transport
        self.policy = policy
        self._files = hasattr(transport, "context_dir") and hasattr(transport, "context_lock")
        self._memory: Dict[VMCIHandle, ClientPrivileges] = {}
        self._groups: Dict[VMCIHandle, _Group] = {}
        self._owned: Dict[VMCIHandle, str] = {}  # without files: this process's resources by kind
        self._lock = threading.RLock()
        self._endpoints: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()

    @property
    def cid(self) -> int:
        return self.transport.local_cid

    # Context flags

    def flags(self, cid: int) -> int:
        return self.policy.flags(cid)

    def check_interaction(self, cid_a: int, cid_b: int, what: str) -> None:
        """Raise NoAccess if the policy's flags forbid contexts ``cid_a`` and ``cid_b`` to interact."""
        if self.policy.denies(cid_a, cid_b):
            raise NoAccess("%s: context %d and context %d may not interact (a RESTRICTED context "
                           "talks only to TRUSTED ones)" % (what, cid_a, cid_b))

    # Enforcement

    def may_send(self, src: VMCIHandle, dst: VMCIHandle) -> bool:
        """Whether a datagram from ``src`` may reach ``dst`` (flags, then DG_SEND)."""
        if self.policy.denies(src.context, dst.context):
            return False
        acl = self.load(dst)
        return acl is None or acl.permits(src, VMCI_PRIV_DG_SEND, self.groups_of)

    def send_checker(self, dst: VMCIHandle) -> Callable[[VMCIHandle], bool]:
        """``may_send(src, dst)`` for many ``src`` at once (the privileges are read once)."""
        acl = self.load(dst)
        denies, groups_of = self.policy.denies, self.groups_of

        def may_send(src: VMCIHandle) -> bool:
            if denies(src.context, dst.context):
                return False
            return acl is None or acl.permits(src, VMCI_PRIV_DG_SEND, groups_of)

        return may_send

    def check_send(self, src: VMCIHandle, dst: VMCIHandle) -> None:
        """Raise NoAccess unless ``src`` may send datagrams to ``dst``."""
        self.check_interaction(src.context, dst.context, "datagram %s -> %s" % (src, dst))
        acl = self.load(dst)
        if acl is not None and not acl.permits(src, VMCI_PRIV_DG_SEND, self.groups_of):
            raise NoAccess("%s is denied DG_SEND on %s" % (src, dst))

    def check_attach(self, client_cid: int, region: VMCIHandle) -> None:
        """Raise NoAccess unless context ``client_cid`` may attach shared memory ``region``."""
        self.check_interaction(client_cid, region.context, "attach to %s" % (region,))
        acl = self.load(region)
        if acl is not None and not acl.permits(VMCIHandle(client_cid, 0), VMCI_PRIV_SM_ATTACH, self.groups_of):
            raise NoAccess("context %d is denied SM_ATTACH on %s" % (client_cid, region))

    # Privileges

    def load(self, resource: VMCIHandle, kind: Optional[str] = None) -> Optional[ClientPrivileges]:
        """The client privileges set on ``resource`` (of ``kind``, if known), or None if none are.

        Unreadable privileges fail closed: the public group is denied what the kind
        guards (DG_SEND, SM_ATTACH) until the owner sets privileges again.
        """
        if not self._files:
            return self._memory.get(resource)
        try:
            with open(self._acl_path(resource)) as f:
                return ClientPrivileges.from_text(resource, f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            kind = kind or self.kind_of(resource) or "datagram"
            acl = ClientPrivileges(resource, kind)
            guarded = _GUARDED.get(kind)
            if guarded is not None:
                acl.entries[PUBLIC_GROUP] = {guarded: VMCI_PRIV_DENY}
            return acl

    def change(self, resource: VMCIHandle, edit: Callable[[ClientPrivileges], None]) -> None:
        """Apply ``edit`` to ``resource``'s privileges on behalf of this context. Raises VMCIError.

        The resource must exist (VMCI_ERROR_INVALID_ARGS), and this context must own it
        or hold CH_PRIV on it (VMCI_ERROR_NO_ACCESS).
        """
        kind = self.kind_of(resource)
        if kind is None:
            raise error_for(VMCI_ERROR_INVALID_ARGS, "no resource %s" % (resource,))
        with self._resource_lock(resource):
            acl = self.load(resource, kind) or ClientPrivileges(resource, kind)
            if acl.kind != kind:  # a stale file of a dead resource that held this id
                acl = ClientPrivileges(resource, kind)
            if acl.check(VMCIHandle(self.cid, 0), VMCI_PRIV_CH_PRIV, self.groups_of) != VMCI_SUCCESS_ACCESS_GRANTED:
                raise NoAccess("context %d may not change the privileges of %s" % (self.cid, resource))
            edit(acl)
            self._store(acl)
            if kind == "datagram" and self._files:
                self._bump_epoch(resource)  # under the lock, as the C library does
        self._announce(resource, kind)

    def check_privilege(self, resource: VMCIHandle, client: VMCIHandle, priv: int) -> int:
        """``VMCIResource_CheckClientPrivilege``: GRANTED, NO_ACCESS or INVALID_PRIV (not set)."""
        kind = self.kind_of(resource)
        if kind is None:
            raise error_for(VMCI_ERROR_INVALID_ARGS, "no resource %s" % (resource,))
        acl = self.load(resource)
        if acl is None or acl.kind != kind:
            acl = ClientPrivileges(resource, kind)
        acl._validate([priv])
        return acl.check(client, priv, self.groups_of)

    def kind_of(self, resource: VMCIHandle) -> Optional[str]:
        """What lives at ``resource``: "datagram", "sharedmem", "queuepair", "group" or None."""
        if resource == PUBLIC_GROUP or self._group(resource) is not None:
            return "group"
        t = self.transport
        if not self._files and resource in self._owned:
            return self._owned[resource]  # ours: on hybrid a region listens where endpoints do
        if t.endpoint_alive(resource):
            return "datagram"
        if not self._files:
            return None
        base = os.path.join(t.context_dir(resource.context), "%d" % resource.resource)
        for suffix, kind in ((".shm", "sharedmem"), (".qp", "queuepair"), (".mir", "sharedmem"),
                             (".qst", "queuepair")):  # shared, then mirrored (mirror_link)
            if os.path.lexists(base + suffix) and t.resource_alive(resource):
                return kind
        return None

    # Groups

    def create_group(self) -> VMCIHandle:
        """A new group ``(2, rid)`` owned by this context (it dies with this process)."""
        owner = (self.cid, os.getpid(), _start_ticks())
        if not self._files:
            with self._lock:
                rid = max([g.resource for g in self._groups] + [VMCI_RESERVED_RESOURCE_ID_MAX]) + 1
                handle = VMCIHandle(VMCI_HOST_CONTEXT_ID, rid)
                self._groups[handle] = _Group(handle, owner, {})
                return handle

        def create(handle: VMCIHandle) -> VMCIHandle:
            self._write_text(self._group_path(handle), _Group(handle, owner, {}).to_text())
            return handle

        return self.transport.allocate(None, create, cid=VMCI_HOST_CONTEXT_ID)

    def destroy_group(self, group: VMCIHandle) -> None:
        g = self._writable_group(group, owner_only=True)
        if not self._files:
            self._groups.pop(g.handle, None)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._group_path(group))
        self._group_changed(group)

    def add_member(self, group: VMCIHandle, member: VMCIHandle, can_assign: bool) -> None:
        def edit(g: _Group) -> None:
            g.members[member] = bool(can_assign)
        self._edit_group(group, edit)

    def remove_member(self, group: VMCIHandle, member: VMCIHandle) -> None:
        def edit(g: _Group) -> None:
            if g.members.pop(member, None) is None:
                raise error_for(VMCI_ERROR_INVALID_ARGS, "%s is not a member of %s" % (member, group))
        self._edit_group(group, edit)

    def is_member(self, group: VMCIHandle, member: VMCIHandle) -> bool:
        if group == PUBLIC_GROUP:
            return True
        g = self._group(group)
        return g is not None and member in g.members

    def groups_of(self, member: VMCIHandle) -> List[VMCIHandle]:
        """The groups ``member`` or its context ``(cid, 0)`` belongs to, oldest first; the
        public group (every handle's) last."""
        context = VMCIHandle(member.context, 0)
        found = [g.handle for g in self._all_groups() if member in g.members or context in g.members]
        return sorted(found) + [PUBLIC_GROUP]

    def groups(self) -> List[Tuple[VMCIHandle, int, Dict[VMCIHandle, bool]]]:
        """Live groups: (handle, owner context, members -> can assign)."""
        return [(g.handle, g.owner[0], dict(g.members)) for g in sorted(self._all_groups(), key=lambda g: g.handle)]

    # Introspection

    def describe(self) -> dict:
        """For ``vsockcompat info``: the policy, each context's flags and owner, its live
        resources with the privileges set on them, and the groups."""
        from .policy import flag_names

        t = self.transport
        contexts = {}
        for cid in t.contexts() if hasattr(t, "contexts") else [self.cid]:
            try:
                owner = os.stat(t.context_dir(cid)).st_uid if self._files else None
            except OSError:
                owner = None
            resources = []
            for handle in self._resources(cid):
                kind = self.kind_of(handle)
                if kind is None:
                    continue
                acl = self.load(handle)
                resources.append({"handle": list(handle), "kind": kind,
                                  "privileges": [] if acl is None else acl.to_json()["clients"]})
            contexts[str(cid)] = {"flags": flag_names(self.flags(cid)), "uid": owner, "resources": resources}
        groups = [{"handle": list(h), "owner": owner, "members": [[list(m), can] for m, can in sorted(members.items())]}
                  for h, owner, members in self.groups()]
        return {"policy": self.policy.as_dict(), "contexts": contexts, "groups": groups,
                "public_group": list(PUBLIC_GROUP)}

    def _resources(self, cid: int) -> List[VMCIHandle]:
        if not self._files:
            return sorted(self._endpoints.keys())
        try:
            names = os.listdir(self.transport.context_dir(cid))
        except OSError:
            return []
        rids = set()
        for name in names:
            head, _, tail = name.partition(".")
            if head.isdigit() and tail in ("", "shm", "qp", "mir", "qst"):
                rids.add(int(head))
        return [VMCIHandle(cid, rid) for rid in sorted(rids)]

    def own(self, resource: VMCIHandle, kind: str) -> None:
        """Without a runtime directory: ``resource`` of ``kind`` lives in this process."""
        self._owned[resource] = kind

    def disown(self, resource: VMCIHandle) -> None:
        self._owned.pop(resource, None)
        self._memory.pop(resource, None)  # its privileges die with it

    # Endpoint notification

    def watch(self, endpoint) -> None:
        """Tell ``endpoint`` (``acl_changed()``) when its privileges change in this process, and
        (without a runtime directory) close its links to a resource whose privileges change."""
        self._endpoints[endpoint.handle] = endpoint

    def unwatch(self, endpoint) -> None:
        self._endpoints.pop(endpoint.handle, None)
        if not self._files:
            self._memory.pop(endpoint.handle, None)  # its privileges die with it

    # Helpers

    def _announce(self, resource: VMCIHandle, kind: str) -> None:
        """Tell this process's endpoints (other processes follow the epoch word)."""
        if kind != "datagram":
            return
        if not self._files:
            for endpoint in list(self._endpoints.values()):
                endpoint.forget(resource)  # this process's links re-check on their next send
        endpoint = self._endpoints.get(resource)
        if endpoint is not None:
            endpoint.acl_changed()

    def _bump_epoch(self, resource: VMCIHandle) -> None:
        path = self.transport.endpoint_path(resource) + ".acct"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return
        try:
            with mmap.mmap(fd, mmap.PAGESIZE) as page:
                words = memoryview(page).cast("Q")
                try:
                    words[ACL_EPOCH_WORD] += 1  # under the context lock: one writer at a time
                finally:
                    words.release()
        except (OSError, ValueError):
            pass
        finally:
            os.close(fd)

    def _store(self, acl: ClientPrivileges) -> None:
        if not self._files:
            if acl.entries:
                self._memory[acl.resource] = acl
            else:
                self._memory.pop(acl.resource, None)
            return
        path = self._acl_path(acl.resource)
        if acl.entries:
            self._write_text(path, acl.to_text())
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    @contextlib.contextmanager
    def _resource_lock(self, resource: VMCIHandle) -> Iterator[None]:
        with self._lock:
            if not self._files:
                yield
                return
            try:
                with self.transport.context_lock(resource.context):
                    yield
            except PermissionError:
                raise NoAccess("context %d belongs to another user" % resource.context) from None

    def _acl_path(self, resource: VMCIHandle) -> str:
        return self.transport.endpoint_path(resource) + ACL_SUFFIX

    def _group_path(self, group: VMCIHandle) -> str:
        return self.transport.endpoint_path(group) + GROUP_SUFFIX

    @staticmethod
    def _write_text(path: str, text: str) -> None:
        tmp = "%s.tmp%d" % (path, os.getpid())
        try:
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except PermissionError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise NoAccess("not allowed to write %s" % path) from None

    def _group(self, group: VMCIHandle) -> Optional[_Group]:
        if not self._files:
            return self._groups.get(group)
        try:
            with open(self._group_path(group)) as f:
                g = _Group.from_text(group, f.read())
        except (OSError, ValueError):
            return None
        return g if g.handle == group and _process_alive(g.owner[1], g.owner[2]) else None

    def _all_groups(self) -> List[_Group]:
        if not self._files:
            return list(self._groups.values())
        try:
            names = os.listdir(self.transport.context_dir(VMCI_HOST_CONTEXT_ID))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            rid = name[: -len(GROUP_SUFFIX)]
            if name.endswith(GROUP_SUFFIX) and rid.isdigit():
                g = self._group(VMCIHandle(VMCI_HOST_CONTEXT_ID, int(rid)))
                if g is not None:
                    found.append(g)
        return found

    def _writable_group(self, group: VMCIHandle, owner_only: bool = False) -> _Group:
        if group == PUBLIC_GROUP:
            raise NoAccess("the public group holds every context and cannot be changed")
        g = self._group(group)
        if g is None:
            raise error_for(VMCI_ERROR_INVALID_ARGS, "no group %s" % (group,))
        if g.owner[0] == self.cid:
            return g
        if not owner_only:
            acl = self.load(group)
            if acl is not None and acl.kind == "group" and acl.check(
                    VMCIHandle(self.cid, 0), VMCI_PRIV_ASSIGN_CLIENT) == VMCI_SUCCESS_ACCESS_GRANTED:
                return g
            if g.members.get(VMCIHandle(self.cid, 0)):
                return g
        raise NoAccess("context %d may not change group %s" % (self.cid, group))

    def _edit_group(self, group: VMCIHandle, edit: Callable[[_Group], None]) -> None:
        with self._resource_lock(group):
            g = self._writable_group(group)
            edit(g)
            if self._files:
                self._write_text(self._group_path(group), g.to_text())
        self._group_changed(group)

    def _group_changed(self, group: VMCIHandle) -> None:
        """Membership of ``group`` changed: endpoints whose privileges name it re-check."""
        for resource in self._naming(group):
            if self._files:
                with contextlib.suppress(VMCIError, OSError), self._resource_lock(resource):
                    self._bump_epoch(resource)
            self._announce(resource, "datagram")

    def _naming(self, group: VMCIHandle) -> List[VMCIHandle]:
        """Datagram endpoints whose privileges have an entry for ``group``."""
        if not self._files:
            return [r for r, acl in self._memory.items() if acl.kind == "datagram" and group in acl.entries]
        prefix = "%d %d " % group
        found = []
        t = self.transport
        for cid in t.contexts():
            try:
                names = os.listdir(t.context_dir(cid))
            except OSError:
                continue
            for name in names:
                rid = name[: -len(ACL_SUFFIX)]
                if not (name.endswith(ACL_SUFFIX) and rid.isdigit()):
                    continue
                try:
                    with open(os.path.join(t.context_dir(cid), name)) as f:
                        lines = f.read().split("\n")
                except OSError:
                    continue
                if lines[0].endswith(" datagram") and any(line.startswith(prefix) for line in lines[1:]):
                    found.append(VMCIHandle(cid, int(rid)))
        return found


def register_kind(transport) -> None:
    """Teach ``transport``'s id allocation about groups (alive while their creator runs)."""
    transport.add_resource_kind(GROUP_SUFFIX, _group_file_alive)


def _group_file_alive(path: str) -> bool:
    try:
        with open(path) as f:
            owner = _Group.from_text(VMCIHandle(0, 0), f.read()).owner
    except (OSError, ValueError):
        return False
    return _process_alive(owner[1], owner[2])


def _start_ticks(pid: Optional[int] = None) -> int:
    from .transport.local import process_start_ticks

    return process_start_ticks(os.getpid() if pid is None else pid)


def _process_alive(pid: int, start: int) -> bool:
    try:
        return pid > 0 and _start_ticks(pid) == start
    except (OSError, ValueError, IndexError):
        return False

