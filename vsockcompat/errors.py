"""VMCI status codes as exceptions: one class per negative code.

The SDK-style calls return codes; the object API raises. ``check(rc)`` is the
one place where a code becomes an exception. Every class has ``code`` (int) and
``name`` (the SDK spelling); where a builtin exception fits, it is a base too,
so ``except PermissionError`` catches ``NoAccess``.

Classes register themselves by ``code`` in ``ERROR_CLASSES``; defining a second
class for a registered code raises ``TypeError``. Codes and names come from
``constants.ERROR_CODES``.

Constructors: ``NotFound(detail=None)`` for the per-code classes;
``VMCIError(detail=None, code=...)`` for the base, where ``code`` is required.
"""

from typing import Dict, Optional, Type

from . import constants as _c

__all__ = [
    "VMCIError", "ERROR_CLASSES", "error_for", "check", "code_name",
    "InvalidResource", "InvalidArgs", "NoMem", "DatagramFailed", "MoreData",
    "NoMoreDatagrams", "NoAccess", "NoHandle", "DuplicateEntry", "DstUnreachable",
    "PayloadTooLarge", "InvalidPriv", "Generic", "PageAlreadyShared",
    "CannotSharePage", "CannotUnsharePage", "NoProcess", "NoDatagram",
    "NoResources", "Unavailable", "NotFound", "AlreadyExists", "NotPageAligned",
    "InvalidSize", "RegionAlreadyShared", "Timeout", "DatagramIncomplete",
    "IncorrectIrql", "EventUnknown", "Obsolete", "QueuePairMismatch",
    "QueuePairNotSet", "QueuePairNotOwner", "QueuePairNotAttached",
    "QueuePairNoSpace", "QueuePairNoData", "BusMemInvalidation",
    "ModuleNotLoaded", "DeviceNotFound", "QueuePairNotReady", "WouldBlock",
    "SharedMemBadContext",
]

_NAMES: Dict[int, str] = {v: n for n, v in _c.ERROR_CODES.items()}

ERROR_CLASSES: Dict[int, Type["VMCIError"]] = {}


def code_name(code: int) -> str:
    """SDK name of any status code; ``"VMCI_UNKNOWN(<code>)"`` if unknown."""
    return _NAMES.get(code, "VMCI_UNKNOWN(%d)" % code)


def _describe(name: str, code: int) -> str:
    if name == "VMCI_ERROR_%d" % code:
        return "unknown error"
    for prefix in ("VMCI_ERROR_", "VMCI_SHAREDMEM_ERROR_"):
        if name.startswith(prefix):
            return name[len(prefix):].lower().replace("_", " ")
    return "error"


def _rebuild(cls, code, detail):
    return cls(detail, code=code)


class VMCIError(Exception):
    """A negative VMCI status code, with its SDK ``name`` and optional ``detail``.

    ``str(exc)`` is ``"<name> (<code>): <description>[: <detail>]"``.
    """

    code: int
    name: str

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        code = cls.__dict__.get("code")
        if code is None:
            return
        if isinstance(code, bool) or not isinstance(code, int) or code >= 0:
            raise TypeError("%s.code must be a negative int, got %r" % (cls.__name__, code))
        if code in ERROR_CLASSES:
            raise TypeError("VMCI code %d already has class %s; refusing %s"
                            % (code, ERROR_CLASSES[code].__name__, cls.__name__))
        if "name" not in cls.__dict__:
            cls.name = _NAMES.get(code, "VMCI_ERROR_%d" % code)
        ERROR_CLASSES[code] = cls

    def __init__(self, detail: Optional[str] = None, *, code: Optional[int] = None):
        cls_code = getattr(type(self), "code", None)
        if code is None:
            code = cls_code
        if code is None:
            raise TypeError("VMCIError needs a code")
        if isinstance(code, bool) or not isinstance(code, int) or code >= 0:
            raise TypeError("a VMCIError code is a negative int, got %r" % (code,))
        if cls_code is not None and code != cls_code:
            raise TypeError("%s has code %d, not %d" % (type(self).__name__, cls_code, code))
        self.code = code
        self.name = getattr(type(self), "name", None) or _NAMES.get(code, "VMCI_ERROR_%d" % code)
        self.detail = detail
        super().__init__(self._message())

    def _message(self) -> str:
        text = "%s (%d): %s" % (self.name, self.code, _describe(self.name, self.code))
        return text if self.detail is None else "%s: %s" % (text, self.detail)

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self):
        return (_rebuild, (type(self), self.code, self.detail))


class InvalidResource(VMCIError, LookupError):
    code = _c.VMCI_ERROR_INVALID_RESOURCE


class InvalidArgs(VMCIError, ValueError):
    code = _c.VMCI_ERROR_INVALID_ARGS


class NoMem(VMCIError, MemoryError):
    code = _c.VMCI_ERROR_NO_MEM


class DatagramFailed(VMCIError):
    code = _c.VMCI_ERROR_DATAGRAM_FAILED


class MoreData(VMCIError):
    code = _c.VMCI_ERROR_MORE_DATA


class NoMoreDatagrams(VMCIError):
    code = _c.VMCI_ERROR_NO_MORE_DATAGRAMS


class NoAccess(VMCIError, PermissionError):
    code = _c.VMCI_ERROR_NO_ACCESS


class NoHandle(VMCIError, LookupError):
    code = _c.VMCI_ERROR_NO_HANDLE


class DuplicateEntry(VMCIError, FileExistsError):
    code = _c.VMCI_ERROR_DUPLICATE_ENTRY


class DstUnreachable(VMCIError, ConnectionError):
    code = _c.VMCI_ERROR_DST_UNREACHABLE


class PayloadTooLarge(VMCIError):
    code = _c.VMCI_ERROR_PAYLOAD_TOO_LARGE


class InvalidPriv(VMCIError, ValueError):
    code = _c.VMCI_ERROR_INVALID_PRIV


class Generic(VMCIError):
    code = _c.VMCI_ERROR_GENERIC


class PageAlreadyShared(VMCIError):
    code = _c.VMCI_ERROR_PAGE_ALREADY_SHARED


class CannotSharePage(VMCIError):
    code = _c.VMCI_ERROR_CANNOT_SHARE_PAGE


class CannotUnsharePage(VMCIError):
    code = _c.VMCI_ERROR_CANNOT_UNSHARE_PAGE


class NoProcess(VMCIError):
    code = _c.VMCI_ERROR_NO_PROCESS


class NoDatagram(VMCIError):
    code = _c.VMCI_ERROR_NO_DATAGRAM


class NoResources(VMCIError):
    code = _c.VMCI_ERROR_NO_RESOURCES


class Unavailable(VMCIError):
    code = _c.VMCI_ERROR_UNAVAILABLE


class NotFound(VMCIError, LookupError):
    code = _c.VMCI_ERROR_NOT_FOUND


class AlreadyExists(VMCIError, FileExistsError):
    code = _c.VMCI_ERROR_ALREADY_EXISTS


class NotPageAligned(VMCIError):
    code = _c.VMCI_ERROR_NOT_PAGE_ALIGNED


class InvalidSize(VMCIError, ValueError):
    code = _c.VMCI_ERROR_INVALID_SIZE


class RegionAlreadyShared(VMCIError):
    code = _c.VMCI_ERROR_REGION_ALREADY_SHARED


class Timeout(VMCIError, TimeoutError):
    code = _c.VMCI_ERROR_TIMEOUT


class DatagramIncomplete(VMCIError):
    code = _c.VMCI_ERROR_DATAGRAM_INCOMPLETE


class IncorrectIrql(VMCIError):
    code = _c.VMCI_ERROR_INCORRECT_IRQL


class EventUnknown(VMCIError):
    code = _c.VMCI_ERROR_EVENT_UNKNOWN


class Obsolete(VMCIError):
    code = _c.VMCI_ERROR_OBSOLETE


class QueuePairMismatch(VMCIError):
    code = _c.VMCI_ERROR_QUEUEPAIR_MISMATCH


class QueuePairNotSet(VMCIError):
    code = _c.VMCI_ERROR_QUEUEPAIR_NOTSET


class QueuePairNotOwner(VMCIError):
    code = _c.VMCI_ERROR_QUEUEPAIR_NOTOWNER


class QueuePairNotAttached(VMCIError):
    code = _c.VMCI_ERROR_QUEUEPAIR_NOTATTACHED


class QueuePairNoSpace(VMCIError):
    code = _c.VMCI_ERROR_QUEUEPAIR_NOSPACE


class QueuePairNoData(VMCIError):
    code = _c.VMCI_ERROR_QUEUEPAIR_NODATA


class BusMemInvalidation(VMCIError):
    code = _c.VMCI_ERROR_BUSMEM_INVALIDATION


class ModuleNotLoaded(VMCIError):
    code = _c.VMCI_ERROR_MODULE_NOT_LOADED


class DeviceNotFound(VMCIError):
    code = _c.VMCI_ERROR_DEVICE_NOT_FOUND


class QueuePairNotReady(VMCIError):
    code = _c.VMCI_ERROR_QUEUEPAIR_NOT_READY


class WouldBlock(VMCIError):
    code = _c.VMCI_ERROR_WOULD_BLOCK


class SharedMemBadContext(VMCIError):
    code = _c.VMCI_SHAREDMEM_ERROR_BAD_CONTEXT


_missing = sorted(n for n, v in _c.ERROR_CODES.items() if v < 0 and v not in ERROR_CLASSES)
if _missing:
    raise ImportError("no exception class for %s" % ", ".join(_missing))


def _check_code(code) -> int:
    if isinstance(code, bool) or not isinstance(code, int):
        raise TypeError("a VMCI status code is an int, got %r" % (code,))
    return int(code)


def error_for(code: int, detail: Optional[str] = None) -> VMCIError:
    """The exception for a negative ``code`` (a plain ``VMCIError`` if unknown).

    Raises ``ValueError`` for a non-negative code, ``TypeError`` for a non-int.
    """
    code = _check_code(code)
    if code >= 0:
        raise ValueError("%s is not an error code" % code_name(code))
    cls = ERROR_CLASSES.get(code)
    return cls(detail) if cls is not None else VMCIError(detail, code=code)


def check(rc: int, detail: Optional[str] = None) -> int:
    """Return ``rc`` if it is >= 0, else raise ``error_for(rc, detail)``."""
    rc = _check_code(rc)
    if rc < 0:
        raise error_for(rc, detail)
    return rc
