"""Queue pairs under the kernel API's names (VMCIQueuePair_*, vmci_qpair_*): codes, out-parameters,
bad input, on both cores, and a child process on the other core."""
import os
import struct
import subprocess
import sys
import textwrap

import pytest

import vsockcompat as vmci
from conftest import CYTHON_AVAILABLE, child_env
from vsockcompat.constants import (
    QUEUE_HEADER_FORMAT,
    VMCI_ERROR_ALREADY_EXISTS,
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_INVALID_SIZE,
    VMCI_ERROR_NO_ACCESS,
    VMCI_ERROR_NO_RESOURCES,
    VMCI_ERROR_NOT_FOUND,
    VMCI_ERROR_QUEUEPAIR_MISMATCH,
    VMCI_ERROR_QUEUEPAIR_NODATA,
    VMCI_ERROR_QUEUEPAIR_NOSPACE,
    VMCI_ERROR_QUEUEPAIR_NOTATTACHED,
    VMCI_ERROR_UNAVAILABLE,
    VMCI_INVALID_ID,
    VMCI_MAX_GUEST_QP_MEMORY,
    VMCI_QPFLAG_ATTACH_ONLY,
    VMCI_QPFLAG_LOCAL,
    VMCI_QPFLAG_NONBLOCK,
    VMCI_QPFLAG_PINNED,
    VMCI_SUCCESS,
    VMCI_SUCCESS_LAST_DETACH,
    VMCI_SUCCESS_QUEUEPAIR_ATTACH,
    VMCI_SUCCESS_QUEUEPAIR_CREATE,
)
from vsockcompat.handles import VMCI_INVALID_HANDLE, VMCIHandle
from vsockcompat.queuepair import shm_name
from vsockcompat.sdk import SDK_FUNCTIONS, VMCILibrary
from vsockcompat.sdk_queuepair import QUEUE_PAIR_FUNCTIONS

pytestmark = pytest.mark.timeout(60)
PAGE = 4096
OTHER_CORE = {"cython": "pure", "pure": "cython" if CYTHON_AVAILABLE else "pure"}


@pytest.fixture
def libs(make_runtime, rundir, fd_guard):
    """Initialised libraries of contexts 2 and 3; fails if a queue pair's shared memory is left."""
    made = []
    for cid in (2, 3):
        library = VMCILibrary(make_runtime(cid))
        assert library.VMCI_InitApp(None) == VMCI_SUCCESS
        made.append(library)
    yield made
    for library in made:
        library._detach_all_queue_pairs()
        library.VMCI_CleanupApp()
    prefix = shm_name(rundir, VMCIHandle(0, 0)).rsplit(".qp.", 1)[0] + ".qp."
    left = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    assert not left, "shared memory left behind: %s" % left


def test_the_facade_exports_the_queue_pair_calls():
    for name in QUEUE_PAIR_FUNCTIONS:
        assert name in SDK_FUNCTIONS and name in vmci.__all__, name
        assert getattr(vmci, name).__self__ is getattr(vmci, "VMCI_InitApp").__self__, name


def test_calls_before_init(runtime):
    library = VMCILibrary(runtime)
    assert library.VMCIQueuePair_Alloc(VMCI_INVALID_HANDLE, 10, 10, VMCI_INVALID_ID, 0) == (
        VMCI_ERROR_UNAVAILABLE, VMCI_INVALID_HANDLE, None, None)
    assert library.VMCIQueuePair_Detach((2, 1024)) == VMCI_ERROR_UNAVAILABLE
    assert library.vmci_qpair_alloc(VMCI_INVALID_HANDLE, 10, 10, VMCI_INVALID_ID, 0, 0) == (
        VMCI_ERROR_UNAVAILABLE, None, VMCI_INVALID_HANDLE)
    assert library.vmci_qpair_detach(object()) == VMCI_ERROR_UNAVAILABLE
    assert library.vmci_qpair_enqueue(None, b"x", 1, 0) == VMCI_ERROR_UNAVAILABLE
    assert library.vmci_qpair_get_produce_indexes(None) == (VMCI_ERROR_UNAVAILABLE, 0, 0)


# 2008: VMCIQueuePair_*


def test_alloc_attach_and_queue_memory(libs):
    a, b = libs
    rv, handle, produce_q, consume_q = a.VMCIQueuePair_Alloc(VMCI_INVALID_HANDLE, 5000, 100, VMCI_INVALID_ID, 0)
    assert rv == VMCI_SUCCESS_QUEUEPAIR_CREATE and handle.context == 2 and handle.resource >= 1024
    # A VMCIQueue: the header at offset 0, data from 4096, whole pages.
    assert len(produce_q) == PAGE + 2 * PAGE and len(consume_q) == 2 * PAGE
    assert struct.unpack_from(QUEUE_HEADER_FORMAT, produce_q, 0) == (2, handle.resource, 0, 0)
    rv, same, b_produce, b_consume = b.VMCIQueuePair_Alloc(handle, 100, 5000, VMCI_INVALID_ID, 0)
    assert rv == VMCI_SUCCESS_QUEUEPAIR_ATTACH and same == handle
    produce_q[PAGE:PAGE + 5] = b"hello"  # one end's produce queue is the other's consume queue
    assert bytes(b_consume[PAGE:PAGE + 5]) == b"hello"
    b_produce[PAGE] = 7
    assert consume_q[PAGE] == 7

    assert b.VMCIQueuePair_Detach(handle) == VMCI_SUCCESS
    with pytest.raises(ValueError):
        b_consume[0]  # released by the detach
    assert b.VMCIQueuePair_Detach(handle) == VMCI_ERROR_NOT_FOUND
    assert a.VMCIQueuePair_Detach(handle) == VMCI_SUCCESS_LAST_DETACH
    with pytest.raises(ValueError):
        bytes(produce_q)


def test_alloc_priv_and_explicit_handles(libs):
    a, b = libs
    rv, handle, _, _ = a.VMCIQueuePair_AllocPriv((2, 4000), 64, 64, 3, 0, 0)
    assert rv == VMCI_SUCCESS_QUEUEPAIR_CREATE and handle == (2, 4000)
    assert b.VMCIQueuePair_AllocPriv((2, 4000), 64, 64, 3, VMCI_QPFLAG_ATTACH_ONLY, 0)[:2] == (
        VMCI_SUCCESS_QUEUEPAIR_ATTACH, handle)
    for priv in (1, 2, 3):  # a process cannot choose its privileges
        assert a.VMCIQueuePair_AllocPriv(VMCI_INVALID_HANDLE, 64, 64, VMCI_INVALID_ID, 0, priv)[0] == \
            VMCI_ERROR_NO_ACCESS
    for priv in (4, -1, 1.0, None, True):
        assert a.VMCIQueuePair_AllocPriv(VMCI_INVALID_HANDLE, 64, 64, VMCI_INVALID_ID, 0, priv)[0] == \
            VMCI_ERROR_INVALID_ARGS


def test_create_and_attach_rules(libs):
    a, b = libs
    failed = (VMCI_INVALID_HANDLE, None, None)
    assert a.VMCIQueuePair_Alloc((2, 5000), 10, 10, VMCI_INVALID_ID, VMCI_QPFLAG_ATTACH_ONLY) == (
        VMCI_ERROR_NOT_FOUND,) + failed
    rv, handle, _, _ = a.VMCIQueuePair_Alloc(VMCI_INVALID_HANDLE, 10, 20, VMCI_INVALID_ID, 0)
    assert b.VMCIQueuePair_Alloc(handle, 10, 20, VMCI_INVALID_ID, 0) == (VMCI_ERROR_QUEUEPAIR_MISMATCH,) + failed
    assert a.VMCIQueuePair_Alloc(handle, 20, 10, VMCI_INVALID_ID, 0) == (VMCI_ERROR_ALREADY_EXISTS,) + failed
    rv, local, _, _ = a.VMCIQueuePair_Alloc(VMCI_INVALID_HANDLE, 8, 8, VMCI_INVALID_ID, VMCI_QPFLAG_LOCAL)
    assert a.VMCIQueuePair_Alloc(local, 8, 8, VMCI_INVALID_ID, VMCI_QPFLAG_LOCAL)[0] == VMCI_SUCCESS_QUEUEPAIR_ATTACH
    assert a.VMCIQueuePair_Detach(local) == VMCI_SUCCESS  # both ends live in this library
    assert a.VMCIQueuePair_Detach(local) == VMCI_SUCCESS_LAST_DETACH
    assert a.VMCIQueuePair_Detach(handle) == VMCI_SUCCESS_LAST_DETACH


BAD_ALLOCS = [
    # (handle, produce, consume, peer, flags) -> code
    ((2, 1024, 3), 10, 10, VMCI_INVALID_ID, 0, VMCI_ERROR_INVALID_ARGS),
    ("handle", 10, 10, VMCI_INVALID_ID, 0, VMCI_ERROR_INVALID_ARGS),
    (None, 10, 10, VMCI_INVALID_ID, 0, VMCI_ERROR_INVALID_ARGS),
    ((2, -1), 10, 10, VMCI_INVALID_ID, 0, VMCI_ERROR_INVALID_ARGS),
    (VMCI_INVALID_HANDLE, 0, 0, VMCI_INVALID_ID, 0, VMCI_ERROR_INVALID_ARGS),
    (VMCI_INVALID_HANDLE, -1, 10, VMCI_INVALID_ID, 0, VMCI_ERROR_INVALID_ARGS),
    (VMCI_INVALID_HANDLE, 10, 1.5, VMCI_INVALID_ID, 0, VMCI_ERROR_INVALID_ARGS),
    (VMCI_INVALID_HANDLE, "10", 10, VMCI_INVALID_ID, 0, VMCI_ERROR_INVALID_ARGS),
    (VMCI_INVALID_HANDLE, True, 10, VMCI_INVALID_ID, 0, VMCI_ERROR_INVALID_ARGS),
    (VMCI_INVALID_HANDLE, 1 << 64, 10, VMCI_INVALID_ID, 0, VMCI_ERROR_INVALID_ARGS),
    (VMCI_INVALID_HANDLE, VMCI_MAX_GUEST_QP_MEMORY, 1, VMCI_INVALID_ID, 0, VMCI_ERROR_NO_RESOURCES),
    (VMCI_INVALID_HANDLE, (1 << 64) - 1, 10, VMCI_INVALID_ID, 0, VMCI_ERROR_NO_RESOURCES),
    (VMCI_INVALID_HANDLE, 10, 10, -1, 0, VMCI_ERROR_INVALID_ARGS),
    (VMCI_INVALID_HANDLE, 10, 10, 1 << 32, 0, VMCI_ERROR_INVALID_ARGS),
    (VMCI_INVALID_HANDLE, 10, 10, VMCI_INVALID_ID, VMCI_QPFLAG_NONBLOCK, VMCI_ERROR_INVALID_ARGS),
    (VMCI_INVALID_HANDLE, 10, 10, VMCI_INVALID_ID, VMCI_QPFLAG_PINNED, VMCI_ERROR_INVALID_ARGS),
    (VMCI_INVALID_HANDLE, 10, 10, VMCI_INVALID_ID, 0x100, VMCI_ERROR_INVALID_ARGS),
    (VMCI_INVALID_HANDLE, 10, 10, VMCI_INVALID_ID, None, VMCI_ERROR_INVALID_ARGS),
]


@pytest.mark.parametrize("handle, produce, consume, peer, flags, code", BAD_ALLOCS)
def test_bad_allocations(libs, handle, produce, consume, peer, flags, code):
    a = libs[0]
    assert a.VMCIQueuePair_Alloc(handle, produce, consume, peer, flags) == (code, VMCI_INVALID_HANDLE, None, None)
    assert a.vmci_qpair_alloc(handle, produce, consume, peer, flags, 0) == (code, None, VMCI_INVALID_HANDLE)


@pytest.mark.parametrize("handle", [None, "x", (1, 2, 3), (-1, 5), 1024])
def test_detach_bad_handles(libs, handle):
    assert libs[0].VMCIQueuePair_Detach(handle) == VMCI_ERROR_INVALID_ARGS


# 2010+: vmci_qpair_*


def pair(libs, produce=10, consume=10):
    a, b = libs
    rv, qa, handle = a.vmci_qpair_alloc(VMCI_INVALID_HANDLE, produce, consume, VMCI_INVALID_ID, 0, 0)
    assert rv == VMCI_SUCCESS and handle.context == 2
    rv, qb, same = b.vmci_qpair_alloc(handle, consume, produce, VMCI_INVALID_ID, 0, 0)
    assert rv == VMCI_SUCCESS and same == handle
    return qa, qb


def test_qpair_data_calls(libs):
    a, b = libs
    qa, qb = pair(libs, 10, 16)
    assert a.vmci_qpair_produce_free_space(qa) == 9 and b.vmci_qpair_consume_buf_ready(qb) == 0
    assert a.vmci_qpair_enqueue(qa, b"0123456789abc", 13, 0) == 9  # partial write
    assert a.vmci_qpair_enqueue(qa, b"x", 1, 0) == VMCI_ERROR_QUEUEPAIR_NOSPACE
    assert a.vmci_qpair_produce_buf_ready(qa) == 9 and b.vmci_qpair_consume_free_space(qb) == 0
    buf = bytearray(4)
    assert b.vmci_qpair_peek(qb, buf, 4, 0) == 4 and buf == b"0123"
    assert b.vmci_qpair_dequeue(qb, buf, 3, 0) == 3 and buf == b"0123"
    assert b.vmci_qpair_get_consume_indexes(qb) == (VMCI_SUCCESS, 9, 3)
    assert a.vmci_qpair_get_produce_indexes(qa) == (VMCI_SUCCESS, 9, 3)
    big = bytearray(20)
    assert b.vmci_qpair_dequeue(qb, big, 20, 0) == 6 and big[:6] == b"345678"
    assert b.vmci_qpair_dequeue(qb, big, 20, 0) == VMCI_ERROR_QUEUEPAIR_NODATA
    assert b.vmci_qpair_peek(qb, big, 20, 0) == VMCI_ERROR_QUEUEPAIR_NODATA
    # Vectors: gather up to iov_size bytes, scatter what is ready.
    assert b.vmci_qpair_enquev(qb, [b"ab", bytearray(b"cde"), memoryview(b"fgh")], 7, 0) == 7
    one, two = bytearray(3), bytearray(10)
    assert a.vmci_qpair_peekv(qa, [one, two], 13, 0) == 7 and one == b"abc" and two[:4] == b"defg"
    one, two = bytearray(2), bytearray(2)
    assert a.vmci_qpair_dequev(qa, [one, two], 4, 0) == 4 and one + two == b"abcd"
    assert a.vmci_qpair_dequev(qa, [bytearray(10)], 10, 0) == 3
    assert a.vmci_qpair_dequev(qa, [bytearray(10)], 10, 0) == VMCI_ERROR_QUEUEPAIR_NODATA
    assert b.vmci_qpair_enquev(qb, [b"x" * 20], 20, 0) == 15  # partial across the whole vector
    assert b.vmci_qpair_enquev(qb, [b"x"], 1, 0) == VMCI_ERROR_QUEUEPAIR_NOSPACE
    assert b.vmci_qpair_detach(qb) == VMCI_SUCCESS
    assert a.vmci_qpair_detach(qa) == VMCI_SUCCESS_LAST_DETACH


BAD_BUFFERS = [
    ("enqueue", None, 1), ("enqueue", b"abc", 4), ("enqueue", b"abc", -1), ("enqueue", b"abc", 1.0),
    ("enqueue", 12345, 1), ("dequeue", b"read-only", 1), ("dequeue", bytearray(2), 3),
    ("dequeue", None, 0), ("peek", b"read-only", 1), ("peek", bytearray(2), -1),
    ("enquev", b"not a list", 3), ("enquev", [b"ab", None], 2), ("enquev", [b"ab"], 3),
    ("dequev", [bytearray(2), b"ro"], 3), ("dequev", [bytearray(2)], 3), ("peekv", None, 0),
    ("peekv", [bytearray(2)], True),
]


@pytest.mark.parametrize("call, buf, size", BAD_BUFFERS)
def test_qpair_bad_buffers(libs, call, buf, size):
    qa, qb = pair(libs)
    libs[0].vmci_qpair_enqueue(qa, b"data", 4, 0)
    fn = getattr(libs[1], "vmci_qpair_" + call)
    assert fn(qb, buf, size, 0) == VMCI_ERROR_INVALID_ARGS
    assert fn(qb, bytearray(1) if call in ("dequeue", "peek") else [bytearray(1)], 1, "mode") == \
        VMCI_ERROR_INVALID_ARGS
    assert libs[1].vmci_qpair_consume_buf_ready(qb) == 4  # nothing was consumed


CALLS = [
    lambda lib, q: lib.vmci_qpair_enqueue(q, b"x", 1, 0),
    lambda lib, q: lib.vmci_qpair_dequeue(q, bytearray(1), 1, 0),
    lambda lib, q: lib.vmci_qpair_peek(q, bytearray(1), 1, 0),
    lambda lib, q: lib.vmci_qpair_enquev(q, [b"x"], 1, 0),
    lambda lib, q: lib.vmci_qpair_dequev(q, [bytearray(1)], 1, 0),
    lambda lib, q: lib.vmci_qpair_peekv(q, [bytearray(1)], 1, 0),
    lambda lib, q: lib.vmci_qpair_produce_free_space(q),
    lambda lib, q: lib.vmci_qpair_produce_buf_ready(q),
    lambda lib, q: lib.vmci_qpair_consume_free_space(q),
    lambda lib, q: lib.vmci_qpair_consume_buf_ready(q),
    lambda lib, q: lib.vmci_qpair_get_produce_indexes(q)[0],
    lambda lib, q: lib.vmci_qpair_get_consume_indexes(q)[0],
    lambda lib, q: lib.vmci_qpair_detach(q),
]


@pytest.mark.parametrize("call", CALLS)
def test_qpair_calls_need_a_live_pair_of_this_library(libs, call):
    """NULL, a foreign object, another library's pair or a detached pair: INVALID_ARGS."""
    a, b = libs
    qa, qb = pair(libs)
    for bad in (None, object(), "qpair", qb):
        assert call(a, bad) == VMCI_ERROR_INVALID_ARGS
    assert a.vmci_qpair_detach(qa) == VMCI_SUCCESS
    assert call(a, qa) == VMCI_ERROR_INVALID_ARGS
    assert b.vmci_qpair_detach(qb) == VMCI_SUCCESS_LAST_DETACH


def test_qpair_peer_detach_drains_then_not_attached(libs):
    a, b = libs
    qa, qb = pair(libs)
    assert b.vmci_qpair_enqueue(qb, b"last", 4, 0) == 4
    assert b.vmci_qpair_detach(qb) == VMCI_SUCCESS
    assert a.vmci_qpair_enqueue(qa, b"x", 1, 0) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    buf = bytearray(8)
    assert a.vmci_qpair_dequeue(qa, buf, 8, 0) == 4 and buf[:4] == b"last"
    assert a.vmci_qpair_dequeue(qa, buf, 8, 0) == VMCI_ERROR_QUEUEPAIR_NOTATTACHED
    assert a.vmci_qpair_detach(qa) == VMCI_SUCCESS_LAST_DETACH


def test_qpair_corrupted_indexes(libs):
    a, b = libs
    qa, qb = pair(libs, 10, 10)
    produce_q, _ = qa.queue_memory()
    struct.pack_into("<Q", produce_q, 8, 99)  # producerTail past the queue's size
    assert a.vmci_qpair_get_produce_indexes(qa) == (VMCI_ERROR_INVALID_SIZE, 99, 0)
    assert b.vmci_qpair_get_consume_indexes(qb) == (VMCI_ERROR_INVALID_SIZE, 99, 0)
    assert a.vmci_qpair_enqueue(qa, b"x", 1, 0) == VMCI_ERROR_INVALID_SIZE
    assert a.vmci_qpair_produce_free_space(qa) == VMCI_ERROR_INVALID_SIZE
    assert b.vmci_qpair_dequeue(qb, bytearray(4), 4, 0) == VMCI_ERROR_INVALID_SIZE
    assert b.vmci_qpair_consume_buf_ready(qb) == VMCI_ERROR_INVALID_SIZE


def test_qpair_zero_size_queue_indexes_are_invalid_as_in_the_kernel(libs):
    a, b = libs
    rv, qa, handle = a.vmci_qpair_alloc(VMCI_INVALID_HANDLE, 0, 10, VMCI_INVALID_ID, 0, 0)
    assert rv == VMCI_SUCCESS
    assert a.vmci_qpair_get_produce_indexes(qa) == (VMCI_ERROR_INVALID_SIZE, 0, 0)
    assert a.vmci_qpair_get_consume_indexes(qa) == (VMCI_SUCCESS, 0, 0)
    assert a.vmci_qpair_produce_free_space(qa) == 0
    assert a.vmci_qpair_enqueue(qa, b"x", 1, 0) == VMCI_ERROR_QUEUEPAIR_NOSPACE


def test_cleanup_detaches_every_pair(libs, rundir):
    a = libs[0]
    rv, handle, _, _ = a.VMCIQueuePair_Alloc(VMCI_INVALID_HANDLE, 10, 10, VMCI_INVALID_ID, 0)
    rv, qa, other = a.vmci_qpair_alloc(VMCI_INVALID_HANDLE, 10, 10, VMCI_INVALID_ID, 0, 0)
    a._detach_all_queue_pairs()
    assert qa.detached
    for h in (handle, other):
        assert not os.path.exists(os.path.join("/dev/shm", shm_name(rundir, h)))
    assert a.VMCIQueuePair_Detach(handle) == VMCI_ERROR_NOT_FOUND
    assert a.vmci_qpair_detach(qa) == VMCI_ERROR_INVALID_ARGS


CHILD = textwrap.dedent("""
    import sys
    import vsockcompat as vmci
    cid, rid = int(sys.argv[1]), int(sys.argv[2])
    assert vmci.VMCI_InitApp(None) == vmci.VMCI_SUCCESS
    rv, qp, handle = vmci.vmci_qpair_alloc((cid, rid), 4096, 64, vmci.VMCI_INVALID_ID,
                                           vmci.VMCI_QPFLAG_ATTACH_ONLY, 0)
    assert rv == vmci.VMCI_SUCCESS, rv
    payload = bytes(range(256)) * 8
    assert vmci.vmci_qpair_enqueue(qp, payload, len(payload), 0) == len(payload)
    print(vmci.vmci_qpair_detach(qp), flush=True)
""")


def test_a_child_on_the_other_core_attaches_and_sends(libs, rundir, core):
    a = libs[0]
    rv, qa, handle = a.vmci_qpair_alloc(VMCI_INVALID_HANDLE, 64, 4096, VMCI_INVALID_ID, 0, 0)
    child = subprocess.run([sys.executable, "-c", CHILD, str(handle.context), str(handle.resource)],
                           env=child_env(rundir, OTHER_CORE[core.NAME], cid=3), capture_output=True,
                           text=True, timeout=30)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == str(VMCI_SUCCESS)
    buf = bytearray(4096)
    assert a.vmci_qpair_dequeue(qa, buf, 4096, 0) == 2048
    assert bytes(buf[:2048]) == bytes(range(256)) * 8
    assert a.vmci_qpair_detach(qa) == VMCI_SUCCESS_LAST_DETACH
