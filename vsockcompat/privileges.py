"""Fine-grained resource privileges (vmci-sdk.md sections 2.7 and 4.4), the model.

A resource's client privileges map a client handle to the state of each
privilege it was given: VMCI_PRIV_ALLOW or VMCI_PRIV_DENY. Which privileges a
resource accepts depends on its kind (``VALID_PRIVILEGES``); the owner context
``(owner cid, 0)`` holds CH_PRIV and DESTROY_RESOURCE without asking.

``check`` answers as ``VMCIResource_CheckClientPrivilege`` did: the client's
own setting, else (for a context handle) the first of its groups that sets the
privilege decides; nothing set is VMCI_ERROR_INVALID_PRIV. ``permits`` is the
enforcement rule built on it: only an explicit denial refuses, so resources
nobody restricted stay open, as the 2007-2008 samples expect.
"""
import re
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

from .constants import (
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_INVALID_PRIV,
    VMCI_ERROR_NO_ACCESS,
    VMCI_PRIV_ALLOW,
    VMCI_PRIV_ASSIGN_CLIENT,
    VMCI_PRIV_CH_PRIV,
    VMCI_PRIV_DENY,
    VMCI_PRIV_DESTROY_RESOURCE,
    VMCI_PRIV_DG_SEND,
    VMCI_PRIV_SM_ATTACH,
    VMCI_SUCCESS_ACCESS_GRANTED,
)
from .errors import error_for
from .handles import VMCIHandle

__all__ = ["ClientPrivileges", "KINDS", "VALID_PRIVILEGES", "PRIVILEGE_NAMES", "parse_privileges"]

PRIVILEGE_NAMES = {
    VMCI_PRIV_CH_PRIV: "CH_PRIV",
    VMCI_PRIV_DESTROY_RESOURCE: "DESTROY_RESOURCE",
    VMCI_PRIV_ASSIGN_CLIENT: "ASSIGN_CLIENT",
    3: "DG_CREATE",
    VMCI_PRIV_DG_SEND: "DG_SEND",
    5: "SM_CREATE",
    VMCI_PRIV_SM_ATTACH: "SM_ATTACH",
}
_OWNER_PRIVILEGES = frozenset({VMCI_PRIV_CH_PRIV, VMCI_PRIV_DESTROY_RESOURCE})
#: Privileges each kind of resource accepts (what else is VMCI_ERROR_INVALID_PRIV).
VALID_PRIVILEGES = {
    "datagram": _OWNER_PRIVILEGES | {VMCI_PRIV_DG_SEND},
    "sharedmem": _OWNER_PRIVILEGES | {VMCI_PRIV_SM_ATTACH},
    "queuepair": _OWNER_PRIVILEGES,
    "group": _OWNER_PRIVILEGES | {VMCI_PRIV_ASSIGN_CLIENT},
}
KINDS = tuple(VALID_PRIVILEGES)
ACL_MAGIC, ACL_VERSION = "vsockcompat-acl", 1
_ACL_HEAD = re.compile(r"vsockcompat-acl 1 (%s)" % "|".join(VALID_PRIVILEGES))
_ACL_LINE = re.compile(r"(0|[1-9][0-9]{0,9}) (0|[1-9][0-9]{0,9}) ([0-6]) (allow|deny)")
_STATES = {VMCI_PRIV_ALLOW: "allow", VMCI_PRIV_DENY: "deny"}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_privileges(values) -> List[int]:
    """A list of privilege numbers from any iterable of ints; raises VMCIError.

    Not iterable or not ints: VMCI_ERROR_INVALID_ARGS; an int that names no
    privilege: VMCI_ERROR_INVALID_PRIV.
    """
    try:
        privileges = list(values)
    except TypeError:
        raise error_for(VMCI_ERROR_INVALID_ARGS, "privileges must be a sequence of ints") from None
    for priv in privileges:
        if not _is_int(priv):
            raise error_for(VMCI_ERROR_INVALID_ARGS, "privilege %r is not an int" % (priv,))
        if priv not in PRIVILEGE_NAMES:
            raise error_for(VMCI_ERROR_INVALID_PRIV, "no privilege numbered %d" % priv)
    return privileges


class ClientPrivileges:
    """The client privileges set on one resource."""

    __slots__ = ("resource", "kind", "entries")

    def __init__(self, resource: VMCIHandle, kind: str,
                 entries: Optional[Dict[VMCIHandle, Dict[int, int]]] = None):
        if kind not in VALID_PRIVILEGES:
            raise ValueError("unknown resource kind %r" % (kind,))
        self.resource = resource
        self.kind = kind
        self.entries: Dict[VMCIHandle, Dict[int, int]] = entries if entries is not None else {}

    # Changes (each validates everything before changing anything)

    def add(self, client: VMCIHandle, allow: Sequence[int], deny: Sequence[int]) -> None:
        """Allow ``allow`` and deny ``deny`` to ``client``; deny wins. Raises VMCIError."""
        allow, deny = parse_privileges(allow), parse_privileges(deny)
        if not allow and not deny:
            raise error_for(VMCI_ERROR_INVALID_ARGS, "no privilege to allow or deny")
        self._validate(allow + deny)
        entry = self.entries.setdefault(client, {})
        for priv in allow:
            entry[priv] = VMCI_PRIV_ALLOW
        for priv in deny:
            entry[priv] = VMCI_PRIV_DENY

    def remove(self, client: VMCIHandle, privileges: Sequence[int]) -> None:
        """Reset ``privileges`` of ``client`` to not set; a client left with none goes."""
        privileges = parse_privileges(privileges)
        if not privileges:
            raise error_for(VMCI_ERROR_INVALID_ARGS, "no privilege to remove")
        self._validate(privileges)
        entry = self.entries.get(client)
        if entry is None:
            raise error_for(VMCI_ERROR_INVALID_ARGS, "%s has no privileges on %s" % (client, self.resource))
        for priv in privileges:
            entry.pop(priv, None)
        if not entry:
            del self.entries[client]

    def remove_all(self, client: VMCIHandle) -> None:
        """Forget every privilege of ``client``."""
        if self.entries.pop(client, None) is None:
            raise error_for(VMCI_ERROR_INVALID_ARGS, "%s has no privileges on %s" % (client, self.resource))

    def _validate(self, privileges: Iterable[int]) -> None:
        valid = VALID_PRIVILEGES[self.kind]
        for priv in privileges:
            if priv not in valid:
                raise error_for(VMCI_ERROR_INVALID_PRIV, "%s is not a privilege of a %s resource"
                                % (PRIVILEGE_NAMES[priv], self.kind))

    # Questions

    def own_state(self, client: VMCIHandle, priv: int) -> Optional[int]:
        """VMCI_PRIV_ALLOW or VMCI_PRIV_DENY as set for ``client`` itself, else None."""
        entry = self.entries.get(client)
        return None if entry is None else entry.get(priv)

    def check(self, client: VMCIHandle, priv: int,
              groups_of: Callable[[VMCIHandle], Iterable[VMCIHandle]] = lambda handle: ()) -> int:
        """VMCI_SUCCESS_ACCESS_GRANTED, VMCI_ERROR_NO_ACCESS, or VMCI_ERROR_INVALID_PRIV if not set.

        The owner context holds CH_PRIV and DESTROY_RESOURCE. Otherwise the
        client's own setting decides; then, for a datagram sender ``(cid, rid)``,
        that of its context ``(cid, 0)``; then the first group that sets the
        privilege, in the order ``groups_of(client)`` lists the groups of the
        handle and of its context.
        """
        if priv in _OWNER_PRIVILEGES and client.context == self.resource.context:
            return VMCI_SUCCESS_ACCESS_GRANTED
        for who in self._askers(client):
            state = self.own_state(who, priv)
            if state is not None:
                return _answer(state)
        for group in groups_of(client):
            state = self.own_state(group, priv)
            if state is not None:
                return _answer(state)
        return VMCI_ERROR_INVALID_PRIV

    def permits(self, client: VMCIHandle, priv: int,
                groups_of: Callable[[VMCIHandle], Iterable[VMCIHandle]] = lambda handle: ()) -> bool:
        """Whether ``client`` may exercise ``priv``: everything not explicitly denied."""
        return self.check(client, priv, groups_of) != VMCI_ERROR_NO_ACCESS

    @staticmethod
    def _askers(client: VMCIHandle) -> Iterator[VMCIHandle]:
        yield client
        if client.resource != 0:
            yield VMCIHandle(client.context, 0)

    # Storage form: text that the C library reads and writes too (src/vsc_acl.h)
    #
    #   vsockcompat-acl 1 <kind>
    #   <client cid> <client rid> <privilege number> allow|deny      (one line each)

    def to_text(self) -> str:
        lines = ["%s %d %s" % (ACL_MAGIC, ACL_VERSION, self.kind)]
        for client, entry in sorted(self.entries.items()):
            for priv, state in sorted(entry.items()):
                lines.append("%d %d %d %s" % (client.context, client.resource, priv, _STATES[state]))
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, resource: VMCIHandle, text: str) -> "ClientPrivileges":
        """Parse what ``to_text`` wrote; raises ValueError if malformed."""
        head, lines = split_records(text, _ACL_HEAD, "privileges")
        by_state = {name: number for number, name in _STATES.items()}
        entries: Dict[VMCIHandle, Dict[int, int]] = {}
        for line in lines:
            match = _ACL_LINE.fullmatch(line)
            if match is None or max(int(match.group(1)), int(match.group(2))) > 0xFFFFFFFF:
                raise ValueError("malformed privilege line %r" % line)
            client = VMCIHandle(int(match.group(1)), int(match.group(2)))
            entries.setdefault(client, {})[int(match.group(3))] = by_state[match.group(4)]
        return cls(resource, head.group(1), entries)

    def to_json(self) -> dict:
        return {
            "resource": list(self.resource),
            "kind": self.kind,
            "clients": [
                {"client": list(client),
                 "privileges": {PRIVILEGE_NAMES[p]: _STATES[s] for p, s in sorted(entry.items())}}
                for client, entry in sorted(self.entries.items())
            ],
        }

    @classmethod
    def from_json(cls, doc: dict) -> "ClientPrivileges":
        """Parse what ``to_json`` wrote; raises ValueError (or KeyError/TypeError) if malformed."""
        by_name = {name: number for number, name in PRIVILEGE_NAMES.items()}
        by_state = {name: number for number, name in _STATES.items()}
        entries = {}
        for item in doc["clients"]:
            client = VMCIHandle(*item["client"])
            entries[client] = {by_name[p]: by_state[s] for p, s in item["privileges"].items()}
        return cls(VMCIHandle(*doc["resource"]), doc["kind"], entries)

    def __repr__(self):
        return "<ClientPrivileges %s %s %d clients>" % (tuple(self.resource), self.kind, len(self.entries))


def split_records(text: str, head_pattern, what: str):
    """``(match of the first line, the other lines)`` of a text storage file whose lines all end
    with a newline; ValueError if the first line does not match ``head_pattern``."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    head = head_pattern.fullmatch(lines[0]) if lines else None
    if head is None:
        raise ValueError("not a %s file of this version" % what)
    return head, lines[1:]


def _answer(state: int) -> int:
    return VMCI_SUCCESS_ACCESS_GRANTED if state == VMCI_PRIV_ALLOW else VMCI_ERROR_NO_ACCESS
