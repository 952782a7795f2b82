"""The operator's access policy: context flags, context owners, the discovery rule.

A policy file is TOML (``VSOCKCOMPAT_POLICY``, else ``<rundir>/policy.toml``
if it exists)::

    [discovery]
    register = "trusted"        # who may REGISTER/UNREGISTER: "trusted" (SDK-strict)
                                # or "permissive" (anyone; the default)

    [contexts.3]
    flags = ["restricted"]      # any of "restricted", "trusted"
    uid = 1000                  # only this user's processes may act as context 3

A malformed file raises PolicyError naming the file and line: a daemon
refuses to start rather than run open. Without a file every context has
VMCI_DEFAULT_PROC_PRIVILEGE_FLAGS, except the hypervisor (context 0) and the
well-known context 1 (where the discovery service lives), which are TRUSTED
(vmci-sdk.md section 2.6: the hypervisor counts as VMCI_MAX_PRIVILEGE_FLAGS,
and the discovery service's handle was created trusted).
"""
import os
import re
import sys
from typing import Dict, Mapping, NamedTuple, Optional

from ._settings import DS_REGISTER_RULES as REGISTER_RULES  # who may REGISTER/UNREGISTER
from .constants import (
    VMCI_DEFAULT_PROC_PRIVILEGE_FLAGS,
    VMCI_HYPERVISOR_CONTEXT_ID,
    VMCI_INVALID_ID,
    VMCI_MAX_PRIVILEGE_FLAGS,
    VMCI_PRIVILEGE_FLAG_RESTRICTED,
    VMCI_PRIVILEGE_FLAG_TRUSTED,
    VMCI_WELL_KNOWN_CONTEXT_ID,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9 and 3.10
    import tomli as tomllib

__all__ = ["Policy", "PolicyError", "deny_interaction", "load_policy", "policy_path", "REGISTER_RULES"]

FLAG_NAMES = {"restricted": VMCI_PRIVILEGE_FLAG_RESTRICTED, "trusted": VMCI_PRIVILEGE_FLAG_TRUSTED}
_BUILTIN_FLAGS = {
    VMCI_HYPERVISOR_CONTEXT_ID: VMCI_MAX_PRIVILEGE_FLAGS,
    VMCI_WELL_KNOWN_CONTEXT_ID: VMCI_PRIVILEGE_FLAG_TRUSTED,
}
_CID = re.compile(r"0|[1-9][0-9]{0,9}")


class PolicyError(ValueError):
    """The policy file cannot be used; the message names the file and line."""


class ContextPolicy(NamedTuple):
    flags: int
    uid: Optional[int]


def deny_interaction(flags_a: int, flags_b: int) -> bool:
    """The SDK's rule: a RESTRICTED endpoint may talk only to a TRUSTED one (both ways)."""
    return bool(
        (flags_a & VMCI_PRIVILEGE_FLAG_RESTRICTED and not flags_b & VMCI_PRIVILEGE_FLAG_TRUSTED)
        or (flags_b & VMCI_PRIVILEGE_FLAG_RESTRICTED and not flags_a & VMCI_PRIVILEGE_FLAG_TRUSTED)
    )


class Policy:
    """The effective policy: flags and owners of contexts, the discovery rule."""

    def __init__(self, contexts: Optional[Mapping[int, ContextPolicy]] = None,
                 ds_register: str = "permissive", path: Optional[str] = None):
        if ds_register not in REGISTER_RULES:
            raise PolicyError("discovery register rule must be one of %s, not %r"
                              % ("|".join(REGISTER_RULES), ds_register))
        self.contexts: Dict[int, ContextPolicy] = dict(contexts or {})
        self.ds_register = ds_register
        self.path = path

    def flags(self, cid: int) -> int:
        """The privilege flags of context ``cid``."""
        entry = self.contexts.get(cid)
        if entry is not None:
            return entry.flags
        return _BUILTIN_FLAGS.get(cid, VMCI_DEFAULT_PROC_PRIVILEGE_FLAGS)

    def uid(self, cid: int) -> Optional[int]:
        """The only user id that may act as context ``cid``, if the policy names one."""
        entry = self.contexts.get(cid)
        return None if entry is None else entry.uid

    def denies(self, cid_a: int, cid_b: int) -> bool:
        """Whether contexts ``cid_a`` and ``cid_b`` may not interact (section 2.6)."""
        return deny_interaction(self.flags(cid_a), self.flags(cid_b))

    def may_register(self, cid: int) -> bool:
        """Whether context ``cid`` may REGISTER/UNREGISTER discovery names."""
        return self.ds_register == "permissive" or bool(self.flags(cid) & VMCI_PRIVILEGE_FLAG_TRUSTED)

    def with_register_rule(self, rule: Optional[str]) -> "Policy":
        """This policy with the discovery rule replaced (``None`` keeps it)."""
        if rule is None:
            return self
        return Policy(self.contexts, rule, self.path)

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "discovery": {"register": self.ds_register},
            "contexts": {str(cid): {"flags": flag_names(entry.flags), "uid": entry.uid}
                         for cid, entry in sorted(self.contexts.items())},
        }

    def __repr__(self):
        return "<Policy %s register=%s contexts=%d>" % (self.path or "(built-in)", self.ds_register,
                                                        len(self.contexts))


def flag_names(flags: int) -> list:
    """``["restricted", "trusted"]``-style names of a flags value."""
    return [name for name, bit in FLAG_NAMES.items() if flags & bit]


def policy_path(rundir: str, configured: Optional[str]) -> Optional[str]:
    """The policy file in effect: the configured one, else ``<rundir>/policy.toml`` if present."""
    if configured:
        return configured
    default = os.path.join(rundir, "policy.toml")
    return default if os.path.isfile(default) else None


def load_policy(path: Optional[str]) -> Policy:
    """Read the policy file at ``path`` (None: the built-in policy). Raises PolicyError."""
    if path is None:
        return Policy()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise PolicyError("%s: cannot read the policy file: %s" % (path, exc.strerror or exc)) from None
    try:
        text = raw.decode("utf-8")
        doc = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise PolicyError("%s: not UTF-8 (byte %d)" % (path, exc.start)) from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError("%s: %s" % (path, exc)) from None
    return _Reader(path, text).read(doc)


class _Reader:
    """Validates a parsed policy document, naming the offending line."""

    def __init__(self, path: str, text: str):
        self.path = path
        self.lines = text.splitlines()

    def fail(self, message: str, *where: str):
        raise PolicyError("%s:%d: %s" % (self.path, self._line(where), message))

    def _line(self, where) -> int:
        """The line of the table ``where[:-1]`` key ``where[-1]`` (best effort, 1-based)."""
        if not where:
            return 1
        table, key = where[:-1], where[-1]
        header = re.compile(r"\s*\[\s*%s\s*\]" % r"\s*\.\s*".join(
            r"[\"']?%s[\"']?" % re.escape(part) for part in table)) if table else None
        start = 0
        if header is not None:
            for i, line in enumerate(self.lines):
                if header.match(line):
                    start = i
                    break
        key_re = re.compile(r"\s*[\"']?%s[\"']?\s*=" % re.escape(key))
        section_re = re.compile(r"\s*\[\s*[\"']?%s" % re.escape(key))
        for i in range(start, len(self.lines)):
            if key_re.match(self.lines[i]) or (i == start and section_re.match(self.lines[i])):
                return i + 1
        for i, line in enumerate(self.lines):
            if section_re.match(line) or key_re.match(line):
                return i + 1
        return start + 1

    def read(self, doc: dict) -> Policy:
        for key in doc:
            if key not in ("discovery", "contexts"):
                self.fail("unknown section %r (expected [discovery] or [contexts.<cid>])" % key, key)
        discovery = doc.get("discovery", {})
        if not isinstance(discovery, dict):
            self.fail("[discovery] must be a table", "discovery")
        for key in discovery:
            if key != "register":
                self.fail("unknown key %r in [discovery]" % key, "discovery", key)
        rule = discovery.get("register", "permissive")
        if rule not in REGISTER_RULES:
            self.fail("register must be one of %s, not %r" % (", ".join(map(repr, REGISTER_RULES)), rule),
                      "discovery", "register")
        contexts = doc.get("contexts", {})
        if not isinstance(contexts, dict):
            self.fail("[contexts] must hold tables [contexts.<cid>]", "contexts")
        parsed = {}
        for name, table in contexts.items():
            parsed[self._cid(name)] = self._context(name, table)
        return Policy(parsed, rule, self.path)

    def _cid(self, name: str) -> int:
        if not _CID.fullmatch(name) or int(name) >= VMCI_INVALID_ID:
            self.fail("context id %r is not a number in 0..%d" % (name, VMCI_INVALID_ID - 1), "contexts", name)
        return int(name)

    def _context(self, name: str, table) -> ContextPolicy:
        if not isinstance(table, dict):
            self.fail("contexts.%s must be a table" % name, "contexts", name)
        for key in table:
            if key not in ("flags", "uid"):
                self.fail("unknown key %r in [contexts.%s] (expected flags, uid)" % (key, name),
                          "contexts", name, key)
        names = table.get("flags", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            self.fail("flags must be a list of strings", "contexts", name, "flags")
        flags = 0
        for flag in names:
            if flag not in FLAG_NAMES:
                self.fail("unknown flag %r (expected %s)" % (flag, ", ".join(map(repr, FLAG_NAMES))),
                          "contexts", name, "flags")
            flags |= FLAG_NAMES[flag]
        uid = table.get("uid")
        if uid is not None and (not isinstance(uid, int) or isinstance(uid, bool) or not 0 <= uid < 2 ** 32):
            self.fail("uid must be a user id (an integer >= 0)", "contexts", name, "uid")
        return ContextPolicy(flags, uid)
