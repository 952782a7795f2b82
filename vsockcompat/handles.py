"""VMCI handles: ``(context, resource)`` pairs of 32-bit unsigned ids.

``VMCIHandle`` is a plain named tuple and does not validate on construction;
``as_handle`` is the validating entry point and every SDK-spelled helper goes
through it, raising ``errors.InvalidArgs`` for anything that is not a pair of
ints in ``0..0xFFFFFFFF``.
"""

from typing import NamedTuple

from . import constants as _c
from .errors import InvalidArgs

__all__ = [
    "VMCIHandle", "as_handle",
    "VMCI_MAKE_HANDLE", "VMCI_HANDLE_TO_CONTEXT_ID", "VMCI_HANDLE_TO_RESOURCE_ID",
    "VMCI_HANDLE_EQUAL", "VMCI_HANDLE_INVALID", "VMCI_HANDLE_TO_UINT64",
    "VMCI_INVALID_HANDLE", "VMCI_ANON_SRC_HANDLE", "VMCI_DS_HANDLE", "VMCI_DS_CONTEXT",
]

_ID_MAX = 0xFFFFFFFF


class VMCIHandle(NamedTuple):
    """A VMCI handle; ``to_uint64`` puts ``context`` in the high 32 bits."""

    context: int
    resource: int

    @property
    def is_invalid(self) -> bool:
        """True for ``(0xFFFFFFFF, 0xFFFFFFFF)``, the invalid (and anonymous) handle."""
        return self.context == _c.VMCI_INVALID_ID and self.resource == _c.VMCI_INVALID_ID

    def to_uint64(self) -> int:
        """``context << 32 | resource``; ``InvalidArgs`` if a field is not a valid id."""
        h = as_handle(self)
        return (h.context << 32) | h.resource

    @classmethod
    def from_uint64(cls, value: int) -> "VMCIHandle":
        """Inverse of ``to_uint64``; ``InvalidArgs`` unless ``0 <= value < 2**64``."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgs("a 64-bit handle value must be an int, got %r" % (value,))
        if not 0 <= value <= 0xFFFFFFFFFFFFFFFF:
            raise InvalidArgs("a 64-bit handle value must be in 0..2**64-1, got %d" % value)
        return cls(int(value) >> 32, int(value) & _ID_MAX)

    def __repr__(self) -> str:
        return "VMCIHandle(context=%r, resource=%r)" % (self.context, self.resource)


def _check_id(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgs("handle %s must be an int, got %r" % (what, value))
    if not 0 <= value <= _ID_MAX:
        raise InvalidArgs("handle %s must be in 0..0xFFFFFFFF, got %d" % (what, value))
    return int(value)


def as_handle(obj) -> VMCIHandle:
    """``obj`` as a ``VMCIHandle``: accepts a handle or a 2-tuple of ids.

    Raises ``InvalidArgs`` for any other type, a tuple of another length, or
    ids that are bools, non-ints, negative or above 0xFFFFFFFF.
    """
    if type(obj) is VMCIHandle or type(obj) is tuple:
        if len(obj) == 2:
            context, resource = obj
            if (type(context) is int and type(resource) is int
                    and 0 <= context <= _ID_MAX and 0 <= resource <= _ID_MAX):
                return obj if type(obj) is VMCIHandle else VMCIHandle(context, resource)
    if not isinstance(obj, tuple):
        raise InvalidArgs("a handle is a (context, resource) tuple, got %s"
                          % type(obj).__name__)
    if len(obj) != 2:
        raise InvalidArgs("a handle is a (context, resource) pair, got %d items" % len(obj))
    return VMCIHandle(_check_id("context", obj[0]), _check_id("resource", obj[1]))


def VMCI_MAKE_HANDLE(cid: int, rid: int) -> VMCIHandle:
    return as_handle((cid, rid))


def VMCI_HANDLE_TO_CONTEXT_ID(h) -> int:
    return as_handle(h).context


def VMCI_HANDLE_TO_RESOURCE_ID(h) -> int:
    return as_handle(h).resource


def VMCI_HANDLE_EQUAL(a, b) -> bool:
    return as_handle(a) == as_handle(b)


def VMCI_HANDLE_INVALID(h) -> bool:
    return as_handle(h).is_invalid


def VMCI_HANDLE_TO_UINT64(h) -> int:
    return as_handle(h).to_uint64()


VMCI_INVALID_HANDLE = VMCIHandle(_c.VMCI_INVALID_ID, _c.VMCI_INVALID_ID)
VMCI_ANON_SRC_HANDLE = VMCIHandle(_c.VMCI_ANON_SRC_CONTEXT_ID, _c.VMCI_ANON_SRC_RESOURCE_ID)
VMCI_DS_HANDLE = VMCIHandle(_c.VMCI_WELL_KNOWN_CONTEXT_ID, _c.VMCI_DS_RESOURCE_ID)
VMCI_DS_CONTEXT = VMCIHandle(_c.VMCI_WELL_KNOWN_CONTEXT_ID, _c.VMCI_CONTEXT_RESOURCE_ID)
