"""VMCIHandle, as_handle() and the SDK-spelled helpers."""

import pytest

from vsockcompat import errors as E
from vsockcompat import handles as H
from vsockcompat.handles import VMCIHandle


def test_fields_and_repr():
    h = VMCIHandle(2, 1024)
    assert (h.context, h.resource) == (2, 1024)
    assert h == (2, 1024)
    assert repr(h) == "VMCIHandle(context=2, resource=1024)"


def test_constants():
    assert H.VMCI_INVALID_HANDLE == (0xFFFFFFFF, 0xFFFFFFFF)
    assert H.VMCI_ANON_SRC_HANDLE == (0xFFFFFFFF, 0xFFFFFFFF)
    assert H.VMCI_DS_HANDLE == (1, 1)
    assert H.VMCI_DS_CONTEXT == (1, 0)
    for h in (H.VMCI_INVALID_HANDLE, H.VMCI_ANON_SRC_HANDLE, H.VMCI_DS_HANDLE, H.VMCI_DS_CONTEXT):
        assert type(h) is VMCIHandle


def test_is_invalid():
    assert H.VMCI_INVALID_HANDLE.is_invalid
    assert not VMCIHandle(0xFFFFFFFF, 0).is_invalid
    assert not VMCIHandle(0, 0xFFFFFFFF).is_invalid
    assert not H.VMCI_DS_HANDLE.is_invalid


@pytest.mark.parametrize("h", [(0, 0), (2, 1024), (1, 1), (0xFFFFFFFF, 0xFFFFFFFF),
                               (0x12345678, 0x9ABCDEF0)])
def test_uint64_round_trip(h):
    v = VMCIHandle(*h).to_uint64()
    assert v == (h[0] << 32) | h[1]
    assert VMCIHandle.from_uint64(v) == h
    assert type(VMCIHandle.from_uint64(v)) is VMCIHandle
    assert H.VMCI_HANDLE_TO_UINT64(h) == v


def test_uint64_high_bits_are_context():
    assert VMCIHandle(2, 1024).to_uint64() == 0x0000000200000400


@pytest.mark.parametrize("bad", [-1, 1 << 64, True, 1.0, "1"])
def test_from_uint64_rejects(bad):
    with pytest.raises(E.InvalidArgs):
        VMCIHandle.from_uint64(bad)


def test_to_uint64_rejects_bad_fields():
    with pytest.raises(E.InvalidArgs):
        VMCIHandle(-1, 0).to_uint64()


@pytest.mark.parametrize("obj", [(2, 1024), VMCIHandle(2, 1024), (0, 0),
                                 (0xFFFFFFFF, 0xFFFFFFFF)])
def test_as_handle_accepts(obj):
    h = H.as_handle(obj)
    assert type(h) is VMCIHandle
    assert h == tuple(obj)
    assert all(type(x) is int for x in h)


@pytest.mark.parametrize("obj,words", [
    ([2, 1024], "tuple"),
    ("2,1024", "tuple"),
    (None, "tuple"),
    (0x200000400, "tuple"),
    ((2,), "pair"),
    ((2, 1024, 0), "pair"),
    ((), "pair"),
    ((True, 1024), "context"),
    ((2, False), "resource"),
    ((-1, 1024), "context"),
    ((2, -1), "resource"),
    ((1 << 32, 0), "context"),
    ((0, 1 << 32), "resource"),
    ((2.0, 1024), "context"),
    (("2", 1024), "context"),
    ((2, None), "resource"),
])
def test_as_handle_rejects(obj, words):
    with pytest.raises(E.InvalidArgs) as info:
        H.as_handle(obj)
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_sdk_helpers():
    h = H.VMCI_MAKE_HANDLE(2, 1024)
    assert type(h) is VMCIHandle and h == (2, 1024)
    assert H.VMCI_HANDLE_TO_CONTEXT_ID(h) == 2
    assert H.VMCI_HANDLE_TO_RESOURCE_ID(h) == 1024
    assert H.VMCI_HANDLE_TO_CONTEXT_ID((5, 6)) == 5
    assert H.VMCI_HANDLE_EQUAL(h, (2, 1024))
    assert not H.VMCI_HANDLE_EQUAL(h, (2, 1025))
    assert H.VMCI_HANDLE_INVALID(H.VMCI_INVALID_HANDLE)
    assert H.VMCI_HANDLE_INVALID((0xFFFFFFFF, 0xFFFFFFFF))
    assert not H.VMCI_HANDLE_INVALID(h)
    assert H.VMCI_HANDLE_TO_UINT64(h) == (2 << 32) | 1024
    with pytest.raises(E.InvalidArgs):
        H.VMCI_MAKE_HANDLE(-1, 0)
    with pytest.raises(E.InvalidArgs):
        H.VMCI_HANDLE_EQUAL(h, None)


def test_all_exports_exist():
    for name in H.__all__:
        assert hasattr(H, name)
