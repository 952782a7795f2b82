"""The SDK calls under their SDK names: codes, out-parameters, bad input."""
import os

import pytest

import vsockcompat as vmci
from vsockcompat.constants import (
    VMCI_ERROR_ALREADY_EXISTS,
    VMCI_ERROR_DEVICE_NOT_FOUND,
    VMCI_ERROR_DST_UNREACHABLE,
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_INVALID_RESOURCE,
    VMCI_ERROR_NO_MEM,
    VMCI_ERROR_NO_RESOURCES,
    VMCI_ERROR_NOT_FOUND,
    VMCI_ERROR_UNAVAILABLE,
    VMCI_MAX_DG_PAYLOAD_SIZE,
    VMCI_SUCCESS,
)
from vsockcompat.handles import VMCI_INVALID_HANDLE, VMCIHandle
from vsockcompat.runtime import Runtime
from vsockcompat.sdk import SDK_FUNCTIONS, VMCILibrary


@pytest.fixture
def lib(runtime):
    library = VMCILibrary(runtime)
    assert library.VMCI_InitApp(None) == VMCI_SUCCESS
    yield library
    library.VMCI_CleanupApp()


def test_the_facade_exports_the_sdk():
    for name in SDK_FUNCTIONS:
        assert callable(getattr(vmci, name)), name
    assert vmci.VMCI_ERROR_NOT_FOUND == -21 and vmci.VMCI_SUCCESS == 0
    assert vmci.VMCI_INVALID_HANDLE == (0xFFFFFFFF, 0xFFFFFFFF)
    assert vmci.VMCI_MAX_DG_PAYLOAD_SIZE == 69608
    assert vmci.BACKEND in ("cython", "pure")
    assert isinstance(vmci.__version__, str)


def test_calls_before_init(runtime):
    library = VMCILibrary(runtime)
    assert library.VMCIDatagram_CreateHnd(0) == VMCI_INVALID_HANDLE
    assert library.VMCIDatagram_SendTo((2, 1024), (2, 1025), 1, b"x") == VMCI_ERROR_UNAVAILABLE
    assert library.VMCIDatagram_RecvFrom((2, 1024), bytearray(8)) == (VMCI_ERROR_UNAVAILABLE, VMCI_INVALID_HANDLE)
    assert library.VMCIDs_Lookup("x") == (VMCI_ERROR_UNAVAILABLE, VMCI_INVALID_HANDLE)
    assert library.VMCIDs_Register("x", (2, 1024)) == VMCI_ERROR_UNAVAILABLE
    assert library.VMCIDs_Unregister("x") == VMCI_ERROR_UNAVAILABLE
    assert library.VMCIDatagram_DestroyHnd((2, 1024)) == VMCI_ERROR_UNAVAILABLE


@pytest.mark.parametrize("dev", [None, "/dev/vmci", b"/dev/vmci"])
def test_init_accepts_device_names(runtime, dev):
    library = VMCILibrary(runtime)
    assert library.VMCI_InitApp(dev) == VMCI_SUCCESS
    library.VMCI_CleanupApp()
    assert not library.initialised


def test_init_rejects_a_non_string_device(runtime):
    assert VMCILibrary(runtime).VMCI_InitApp(3) == VMCI_ERROR_INVALID_ARGS


def test_init_fails_when_the_transport_cannot_run(core):
    too_long = "/tmp/" + "x" * 80
    library = VMCILibrary(Runtime(vmci.Runtime().settings._replace(rundir=too_long), core=core))
    assert library.VMCI_InitApp(None) == VMCI_ERROR_DEVICE_NOT_FOUND


def test_datagram_round_trip(lib):
    server = lib.VMCIDatagram_CreateHnd(0)
    client = lib.VMCIDatagram_CreateHnd(0)
    assert server == VMCIHandle(2, 1024) and client == VMCIHandle(2, 1025)
    assert lib.VMCIDatagram_SendTo(server, client, 14, b"HELLO, SERVER!") == 24 + 14
    buf = bytearray(4096)
    assert lib.VMCIDatagram_RecvFrom(server, buf) == (14, client)
    assert bytes(buf[:14]) == b"HELLO, SERVER!"
    assert lib.VMCIDatagram_SendTo(client, server, 3, memoryview(b"abcdef")) == 27
    assert lib.VMCIDatagram_RecvFrom(client, memoryview(buf)) == (3, server)


def test_explicit_ids(lib):
    assert lib.VMCIDatagram_CreateHnd(4000) == VMCIHandle(2, 4000)
    assert lib.VMCIDatagram_CreateHnd(4000) == VMCI_INVALID_HANDLE
    assert lib.VMCIDatagram_CreateHnd(0xFFFFFFFF).resource >= 1024


@pytest.mark.parametrize("arg", [-1, 2**32, "0", None, 1.5])
def test_create_with_bad_arguments(lib, arg):
    assert lib.VMCIDatagram_CreateHnd(arg) == VMCI_INVALID_HANDLE


def test_send_error_codes(lib):
    src = lib.VMCIDatagram_CreateHnd(0)
    dst = lib.VMCIDatagram_CreateHnd(0)
    cases = [
        ((dst, (2, 5555), 1, b"x"), VMCI_ERROR_INVALID_ARGS),  # source not ours
        ((dst, src, 2, b"x"), VMCI_ERROR_INVALID_ARGS),  # length past the buffer
        ((dst, src, -1, b"x"), VMCI_ERROR_INVALID_ARGS),
        ((dst, src, "1", b"x"), VMCI_ERROR_INVALID_ARGS),
        ((dst, src, 1, 12345), VMCI_ERROR_INVALID_ARGS),
        (("dst", src, 1, b"x"), VMCI_ERROR_INVALID_ARGS),
        ((dst, src, VMCI_MAX_DG_PAYLOAD_SIZE + 1, bytes(VMCI_MAX_DG_PAYLOAD_SIZE + 1)), VMCI_ERROR_INVALID_ARGS),
        (((2, 9999), src, 1, b"x"), VMCI_ERROR_INVALID_RESOURCE),
        (((42, 1024), src, 1, b"x"), VMCI_ERROR_DST_UNREACHABLE),
        (((0, 5), src, 1, b"x"), VMCI_ERROR_DST_UNREACHABLE),
    ]
    for args, code in cases:
        assert lib.VMCIDatagram_SendTo(*args) == code, args
    big = bytes(VMCI_MAX_DG_PAYLOAD_SIZE)
    assert lib.VMCIDatagram_SendTo(dst, src, len(big), big) == len(big) + 24
    assert lib.VMCIDatagram_SendTo(dst, src, len(big), big) == VMCI_ERROR_NO_RESOURCES


def test_receive_error_codes(lib):
    src = lib.VMCIDatagram_CreateHnd(0)
    dst = lib.VMCIDatagram_CreateHnd(0)
    assert lib.VMCIDatagram_RecvFrom((2, 5555), bytearray(8)) == (VMCI_ERROR_INVALID_ARGS, VMCI_INVALID_HANDLE)
    assert lib.VMCIDatagram_RecvFrom(dst, b"read-only") == (VMCI_ERROR_INVALID_ARGS, VMCI_INVALID_HANDLE)
    assert lib.VMCIDatagram_RecvFrom(dst, 42) == (VMCI_ERROR_INVALID_ARGS, VMCI_INVALID_HANDLE)
    assert lib.VMCIDatagram_RecvFrom("h", bytearray(8)) == (VMCI_ERROR_INVALID_ARGS, VMCI_INVALID_HANDLE)
    lib.VMCIDatagram_SendTo(dst, src, 10, b"0123456789")
    assert lib.VMCIDatagram_RecvFrom(dst, bytearray(9)) == (VMCI_ERROR_NO_MEM, VMCI_INVALID_HANDLE)
    assert lib.VMCIDatagram_RecvFrom(dst, bytearray(10)) == (10, src)


def test_destroy(lib, runtime):
    handle = lib.VMCIDatagram_CreateHnd(0)
    assert lib.VMCIDatagram_DestroyHnd(handle) == VMCI_SUCCESS
    assert lib.VMCIDatagram_DestroyHnd(handle) == VMCI_ERROR_NOT_FOUND
    assert lib.VMCIDatagram_DestroyHnd((2, 9)) == VMCI_ERROR_NOT_FOUND
    assert lib.VMCIDatagram_DestroyHnd(None) == VMCI_ERROR_INVALID_ARGS
    assert lib.VMCIDatagram_RecvFrom(handle, bytearray(8)) == (VMCI_ERROR_INVALID_ARGS, VMCI_INVALID_HANDLE)
    assert not runtime.transport.endpoint_alive(handle)


def test_cleanup_destroys_every_handle(runtime):
    library = VMCILibrary(runtime)
    library.VMCI_InitApp(None)
    handles = [library.VMCIDatagram_CreateHnd(0) for _ in range(3)]
    library.VMCI_CleanupApp()
    assert not any(runtime.transport.endpoint_alive(h) for h in handles)
    assert library.VMCIDatagram_SendTo(handles[0], handles[1], 1, b"x") == VMCI_ERROR_UNAVAILABLE
    assert sorted(os.listdir(os.path.join(runtime.settings.rundir, "c2"))) == [".lock", ".next"]


def test_discovery_calls(lib):
    server = lib.VMCIDatagram_CreateHnd(0)
    assert lib.VMCIDs_Lookup("vmci public group") == (VMCI_SUCCESS, VMCIHandle(2, 1023))
    assert lib.VMCIDs_Register("HOST INFO", server) == VMCI_SUCCESS
    assert lib.VMCIDs_Register("HOST INFO", server) == VMCI_ERROR_ALREADY_EXISTS
    assert lib.VMCIDs_Lookup("HOST INFO") == (VMCI_SUCCESS, server)
    assert lib.VMCIDs_Lookup("host info") == (VMCI_ERROR_NOT_FOUND, VMCI_INVALID_HANDLE)
    assert lib.VMCIDs_Unregister("HOST INFO") == VMCI_SUCCESS
    assert lib.VMCIDs_Unregister("HOST INFO") == VMCI_ERROR_NOT_FOUND
    assert lib.VMCIDs_Lookup("HOST INFO") == (VMCI_ERROR_NOT_FOUND, VMCI_INVALID_HANDLE)


@pytest.mark.parametrize("name", ["x" * 301, "nul\0inside", 17, None])
def test_discovery_bad_names(lib, name):
    assert lib.VMCIDs_Lookup(name) == (VMCI_ERROR_INVALID_ARGS, VMCI_INVALID_HANDLE)
    assert lib.VMCIDs_Register(name, (2, 1024)) == VMCI_ERROR_INVALID_ARGS
    assert lib.VMCIDs_Unregister(name) == VMCI_ERROR_INVALID_ARGS


def test_register_a_bad_handle(lib):
    assert lib.VMCIDs_Register("name", "not a handle") == VMCI_ERROR_INVALID_ARGS
    assert lib.VMCIDs_Register("name", VMCI_INVALID_HANDLE) == VMCI_ERROR_INVALID_ARGS


def test_a_name_dies_with_its_destroyed_handle(lib):
    server = lib.VMCIDatagram_CreateHnd(0)
    assert lib.VMCIDs_Register("SHORT LIVED", server) == VMCI_SUCCESS
    lib.VMCIDatagram_DestroyHnd(server)
    assert lib.VMCIDs_Lookup("SHORT LIVED") == (VMCI_ERROR_NOT_FOUND, VMCI_INVALID_HANDLE)


def test_add_client_privileges_validates_as_the_driver_did(lib, runtime):
    from vsockcompat.constants import (VMCI_ERROR_INVALID_PRIV, VMCI_PRIV_DG_SEND,
                                       VMCI_PRIV_DESTROY_RESOURCE)
    server = lib.VMCIDatagram_CreateHnd(0)
    group = (2, 1023)
    add = lib.VMCIResource_AddClientPrivileges
    assert add(server, group, [VMCI_PRIV_DG_SEND], []) == VMCI_SUCCESS
    assert add(server, group, [], [VMCI_PRIV_DESTROY_RESOURCE]) == VMCI_SUCCESS
    assert add(server, group, [], []) == VMCI_ERROR_INVALID_ARGS
    assert add(VMCI_INVALID_HANDLE, group, [VMCI_PRIV_DG_SEND]) == VMCI_ERROR_INVALID_ARGS
    assert add(server, "group", [VMCI_PRIV_DG_SEND]) == VMCI_ERROR_INVALID_ARGS
    assert add(server, group, 4) == VMCI_ERROR_INVALID_ARGS
    assert add(server, group, [7]) == VMCI_ERROR_INVALID_PRIV
    assert add(server, group, [-1]) == VMCI_ERROR_INVALID_PRIV
    assert add(server, group, [VMCI_PRIV_DG_SEND], ["4"]) == VMCI_ERROR_INVALID_ARGS
    assert VMCILibrary(runtime).VMCIResource_AddClientPrivileges(server, group, [4]) == VMCI_ERROR_UNAVAILABLE


def test_star_import_gives_the_sdk_names():
    namespace = {}
    exec("from vsockcompat import *", namespace)
    for name in SDK_FUNCTIONS + ("VMCI_ERROR_NOT_FOUND", "VMCI_INVALID_HANDLE", "DatagramEndpoint", "BACKEND"):
        assert name in namespace, name
