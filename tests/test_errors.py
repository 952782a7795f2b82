"""Exception classes per VMCI code, the registry, check() and error_for()."""

import pickle

import pytest

from vsockcompat import constants as C
from vsockcompat import errors as E

CLASS_TABLE = {  # code: (class name, builtin base or None)
    -1: ("InvalidResource", LookupError),
    -2: ("InvalidArgs", ValueError),
    -3: ("NoMem", MemoryError),
    -4: ("DatagramFailed", None),
    -5: ("MoreData", None),
    -6: ("NoMoreDatagrams", None),
    -7: ("NoAccess", PermissionError),
    -8: ("NoHandle", LookupError),
    -9: ("DuplicateEntry", FileExistsError),
    -10: ("DstUnreachable", ConnectionError),
    -11: ("PayloadTooLarge", None),
    -12: ("InvalidPriv", ValueError),
    -13: ("Generic", None),
    -14: ("PageAlreadyShared", None),
    -15: ("CannotSharePage", None),
    -16: ("CannotUnsharePage", None),
    -17: ("NoProcess", None),
    -18: ("NoDatagram", None),
    -19: ("NoResources", None),
    -20: ("Unavailable", None),
    -21: ("NotFound", LookupError),
    -22: ("AlreadyExists", FileExistsError),
    -23: ("NotPageAligned", None),
    -24: ("InvalidSize", ValueError),
    -25: ("RegionAlreadyShared", None),
    -26: ("Timeout", TimeoutError),
    -27: ("DatagramIncomplete", None),
    -28: ("IncorrectIrql", None),
    -29: ("EventUnknown", None),
    -30: ("Obsolete", None),
    -31: ("QueuePairMismatch", None),
    -32: ("QueuePairNotSet", None),
    -33: ("QueuePairNotOwner", None),
    -34: ("QueuePairNotAttached", None),
    -35: ("QueuePairNoSpace", None),
    -36: ("QueuePairNoData", None),
    -37: ("BusMemInvalidation", None),
    -38: ("ModuleNotLoaded", None),
    -39: ("DeviceNotFound", None),
    -40: ("QueuePairNotReady", None),
    -41: ("WouldBlock", None),
    -1000: ("SharedMemBadContext", None),
}

NAMES = {v: n for n, v in C.ERROR_CODES.items()}


def test_registry_is_exactly_the_negative_codes():
    assert set(E.ERROR_CLASSES) == set(CLASS_TABLE)
    assert set(E.ERROR_CLASSES) == {v for v in C.ERROR_CODES.values() if v < 0}


@pytest.mark.parametrize("code", sorted(CLASS_TABLE))
def test_class_per_code(code):
    cls_name, base = CLASS_TABLE[code]
    cls = getattr(E, cls_name)
    assert cls_name in E.__all__
    assert E.ERROR_CLASSES[code] is cls
    assert cls.code == code
    assert cls.name == NAMES[code]
    assert issubclass(cls, E.VMCIError)
    if base is not None:
        assert issubclass(cls, base)
    else:
        assert cls.__bases__ == (E.VMCIError,)

    exc = E.error_for(code)
    assert type(exc) is cls
    assert exc.code == code and exc.name == NAMES[code]
    assert str(exc).startswith("%s (%d): " % (NAMES[code], code))
    assert repr(exc)

    exc = cls("some detail")
    assert exc.code == code
    assert str(exc).endswith(": some detail")
    with pytest.raises(cls):
        E.check(code)
    with pytest.raises(E.VMCIError) as info:
        E.check(code, "ctx")
    assert info.value.code == code and info.value.detail == "ctx"
    if base is not None:
        with pytest.raises(base):
            E.check(code)

    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is cls and again.code == code and str(again) == str(exc)


def test_str_format():
    assert str(E.NotFound()) == "VMCI_ERROR_NOT_FOUND (-21): not found"
    assert str(E.NotFound("no name 'x'")) == "VMCI_ERROR_NOT_FOUND (-21): not found: no name 'x'"
    assert str(E.NoAccess("access denied")) == "VMCI_ERROR_NO_ACCESS (-7): no access: access denied"


@pytest.mark.parametrize("cls", [E.NoAccess, E.Timeout, E.DstUnreachable,
                                 E.AlreadyExists, E.DuplicateEntry])
def test_oserror_subclasses_behave(cls):
    exc = cls("detail")
    assert isinstance(exc, OSError)
    assert exc.code == cls.code
    assert "detail" in str(exc) and cls.name in str(exc)
    description = cls.name[len("VMCI_ERROR_"):].lower().replace("_", " ")
    assert str(cls()) == "%s (%d): %s" % (cls.name, cls.code, description)


def test_check_passes_non_negative_through():
    for rc in (0, 1, 2, 5, 24, 69632):
        assert E.check(rc) == rc


@pytest.mark.parametrize("bad", [True, None, 1.0, "0"])
def test_check_rejects_non_int(bad):
    with pytest.raises(TypeError):
        E.check(bad)


def test_unknown_codes():
    exc = E.error_for(-99, "why")
    assert type(exc) is E.VMCIError
    assert exc.code == -99 and exc.name == "VMCI_ERROR_-99"
    assert str(exc) == "VMCI_ERROR_-99 (-99): unknown error: why"
    with pytest.raises(E.VMCIError) as info:
        E.check(-510)
    assert type(info.value) is E.VMCIError and info.value.code == -510
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is E.VMCIError and again.code == -99 and again.detail == "why"


def test_error_for_refuses_non_errors():
    with pytest.raises(ValueError):
        E.error_for(0)
    with pytest.raises(ValueError):
        E.error_for(2)


def test_code_name():
    assert E.code_name(0) == "VMCI_SUCCESS"
    assert E.code_name(2) == "VMCI_SUCCESS_ACCESS_GRANTED"
    assert E.code_name(-21) == "VMCI_ERROR_NOT_FOUND"
    assert E.code_name(-1000) == "VMCI_SHAREDMEM_ERROR_BAD_CONTEXT"
    assert E.code_name(-99) == "VMCI_UNKNOWN(-99)"
    assert E.code_name(6) == "VMCI_UNKNOWN(6)"


def test_base_needs_a_code():
    with pytest.raises(TypeError):
        E.VMCIError("x")
    assert E.VMCIError("x", code=-21).name == "VMCI_ERROR_NOT_FOUND"
    with pytest.raises(TypeError):
        E.NotFound(code=-7)
    for bad in (0, 3, True, "x"):
        with pytest.raises(TypeError):
            E.VMCIError(code=bad)


def test_registry_refuses_duplicate_code():
    before = dict(E.ERROR_CLASSES)
    with pytest.raises(TypeError, match="-21"):
        class Duplicate(E.VMCIError):
            code = C.VMCI_ERROR_NOT_FOUND
    assert E.ERROR_CLASSES == before


@pytest.mark.parametrize("code", [0, 3, True, "x"])
def test_registry_refuses_bad_code(code):
    with pytest.raises(TypeError):
        type("Bad", (E.VMCIError,), {"code": code})


def test_subclass_of_registered_class_is_not_a_duplicate():
    class MyNotFound(E.NotFound):
        pass
    assert E.ERROR_CLASSES[-21] is E.NotFound
    exc = MyNotFound("x")
    assert exc.code == -21 and isinstance(exc, LookupError)


def test_client_code_registration():
    try:
        class ClientError(E.VMCIError):
            code = -505
        assert E.error_for(-505).__class__ is ClientError
        assert ClientError.name == "VMCI_ERROR_-505"
    finally:
        E.ERROR_CLASSES.pop(-505, None)
