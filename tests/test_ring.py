"""Queue-pair rings of both cores: layout, index arithmetic, bad input, interop.

A ``Pair`` holds the two queues of one pair in anonymous mappings and the
two ends' rings over them (end A writes queue A, end B writes queue B); the
interop tests give the two ends different cores on the same memory.
"""
import mmap
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CYTHON_AVAILABLE
from vsockcompat._backend import load_core
from vsockcompat.constants import (
    VMCI_ERROR_INVALID_ARGS,
    QUEUE_HEADER_FORMAT,
    QUEUE_HEADER_SIZE,
    VMCI_ERROR_INVALID_SIZE,
    VMCI_ERROR_QUEUEPAIR_NODATA,
    VMCI_ERROR_QUEUEPAIR_NOSPACE,
)

PAGE = 4096
CORE_NAMES = ["cython", "pure"] if CYTHON_AVAILABLE else ["pure"]
CORE_IDS = {"cython": "c", "pure": "py"}
cores = pytest.mark.parametrize("name", CORE_NAMES, ids=[CORE_IDS[n] for n in CORE_NAMES])
core_pairs = pytest.mark.parametrize(
    "names", [(a, b) for a in CORE_NAMES for b in CORE_NAMES],
    ids=["%s-%s" % (CORE_IDS[a], CORE_IDS[b]) for a in CORE_NAMES for b in CORE_NAMES])
OFF_TAIL, OFF_HEAD = 8, 16


def queue_bytes(size):
    return PAGE + -(-size // PAGE) * PAGE


class Pair:
    """Queue A (size a) written by end A, queue B (size b) written by end B."""

    def __init__(self, core_a, core_b, a, b):
        self.qa = mmap.mmap(-1, queue_bytes(a))
        self.qb = mmap.mmap(-1, queue_bytes(b))
        self.a = core_a.Ring(self.qa, self.qb, a, b)
        self.b = core_b.Ring(self.qb, self.qa, b, a)
        self.a.initialise(2, 1024)

    def data_a(self, n):
        return bytes(self.qa[PAGE:PAGE + n])

    def close(self):
        self.a.release_memory()
        self.b.release_memory()
        self.qa.close()
        self.qb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pair(name_a, a=10, b=10, name_b=None):
    return Pair(load_core(name_a), load_core(name_b or name_a), a, b)


def test_header_layout_matches_the_sdk():
    assert QUEUE_HEADER_SIZE == 24
    assert struct.calcsize(QUEUE_HEADER_FORMAT) == 24


@cores
def test_golden_layout(name):
    with pair(name, 10, 20) as p:
        assert struct.unpack_from(QUEUE_HEADER_FORMAT, p.qa, 0) == (2, 1024, 0, 0)
        assert struct.unpack_from(QUEUE_HEADER_FORMAT, p.qb, 0) == (2, 1024, 0, 0)
        assert p.a.enqueue(b"hello") == 5
        assert p.data_a(5) == b"hello"
        # A's producerTail lives in A's header; B's read position in B's header.
        assert struct.unpack_from("<Q", p.qa, OFF_TAIL)[0] == 5
        assert p.b.dequeue(3) == b"hel"
        assert struct.unpack_from("<Q", p.qb, OFF_HEAD)[0] == 3
        assert struct.unpack_from("<Q", p.qa, OFF_HEAD)[0] == 0
        assert p.a.produce_indexes() == (5, 3)
        assert p.b.consume_indexes() == (5, 3)
        assert p.a.produce_buf_ready() == 2
        assert p.b.consume_free_space() == 7


@cores
def test_constants(name):
    core = load_core(name)
    assert core.QP_PAGE_SIZE == PAGE
    assert core.QP_MAX_RING_SIZE == 1 << 62
    assert (core.QP_WAITING_READ, core.QP_WAITING_WRITE) == (1, 2)


@cores
def test_capacity_is_size_minus_one_and_partial_writes(name):
    with pair(name, 10, 10) as p:
        assert p.a.produce_free_space() == 9
        assert p.b.consume_buf_ready() == 0
        assert p.a.enqueue(b"0123456789abc") == 9
        assert p.a.produce_free_space() == 0
        assert p.a.enqueue(b"x") == VMCI_ERROR_QUEUEPAIR_NOSPACE
        assert p.b.consume_buf_ready() == 9
        assert p.b.dequeue(100) == b"012345678"
        assert p.b.dequeue(1) == VMCI_ERROR_QUEUEPAIR_NODATA
        assert p.a.enqueue(b"") == 0


@cores
def test_wrap_around_splits_the_copy(name):
    with pair(name, 10, 10) as p:
        assert p.a.enqueue(b"abcdefg") == 7
        assert p.b.dequeue(7) == b"abcdefg"
        assert p.a.enqueue(b"123456") == 6
        assert p.a.produce_indexes() == (3, 7)
        assert p.data_a(10) == b"456defg123"
        buf = bytearray(6)
        assert p.b.peek_into(buf) == 6 and buf == b"123456"
        assert p.b.consume_buf_ready() == 6
        assert p.b.dequeue_into(buf) == 6 and buf == b"123456"
        assert p.b.consume_indexes() == (3, 3)


@cores
def test_peek_does_not_consume(name):
    with pair(name) as p:
        assert p.b.peek(4) == VMCI_ERROR_QUEUEPAIR_NODATA
        assert p.b.peek_into(bytearray(4)) == VMCI_ERROR_QUEUEPAIR_NODATA
        p.a.enqueue(b"abc")
        assert p.b.peek(2) == b"ab"
        assert p.b.peek(9) == b"abc"
        assert p.b.dequeue(0) == b""
        assert p.b.dequeue(9) == b"abc"


@cores
def test_zero_size_queue_has_no_space_and_no_data(name):
    with pair(name, 0, 10) as p:
        assert p.a.produce_free_space() == 0
        assert p.a.enqueue(b"x") == VMCI_ERROR_QUEUEPAIR_NOSPACE
        assert p.b.consume_buf_ready() == 0
        assert p.b.dequeue(1) == VMCI_ERROR_QUEUEPAIR_NODATA
        assert p.b.enqueue(b"xyz") == 3
        assert p.a.dequeue(5) == b"xyz"


@cores
def test_enqueue_many_writes_whole_messages(name):
    msgs = [bytes([i]) * 64 for i in range(10)]
    with pair(name, 300, 10) as p:
        assert p.a.enqueue_many([]) == 0
        assert p.a.enqueue_many(msgs) == 4
        assert p.a.produce_free_space() == 299 - 256
        assert p.a.enqueue_many(msgs[4:]) == VMCI_ERROR_QUEUEPAIR_NOSPACE
        assert p.b.dequeue(1000) == b"".join(msgs[:4])
        assert p.a.enqueue_many([b"", bytearray(b"ab"), memoryview(b"cd")]) == 3
        assert p.b.dequeue(10) == b"abcd"
        p.a.enqueue(b"x" * 299)
        assert p.a.enqueue_many([b""]) == VMCI_ERROR_QUEUEPAIR_NOSPACE


@cores
def test_waiting_bits_are_in_the_private_area(name):
    with pair(name) as p:
        p.a.set_waiting(load_core(name).QP_WAITING_READ)
        assert struct.unpack_from("<Q", p.qa, 64)[0] == 1
        assert p.b.peer_waiting() == 1
        assert p.a.peer_waiting() == 0
        p.a.set_waiting(0)
        assert p.b.peer_waiting() == 0
        assert bytes(p.qa[:QUEUE_HEADER_SIZE])[:8] == struct.pack("<II", 2, 1024)


@cores
def test_arm_wait_sets_the_bit_and_clears_it_when_nothing_need_wait(name):
    read, write = load_core(name).QP_WAITING_READ, load_core(name).QP_WAITING_WRITE
    other = "pure" if name != "pure" else name
    with pair(name, 10, 10, name_b=other) as p:
        def word():  # (bits, sleep count) as the peer sees them
            w = p.b.peer_waiting()
            return w & 3, w >> 2

        assert p.a.arm_wait(read, 1) == 0  # nothing to read: armed, the peer sees the bit
        assert word() == (read, 1)
        p.a.set_waiting(0)
        assert word() == (0, 1)  # the count stays
        p.b.enqueue(b"abc")
        assert p.a.arm_wait(read, 1) == 3 and word() == (0, 2)  # ready: not armed
        assert p.a.arm_wait(read, 4) == 3 and word() == (read, 3)  # too little yet
        p.a.set_waiting(0)
        assert p.a.enqueue(b"x" * 7) == 7  # 2 of 9 bytes free
        assert p.a.arm_wait(write, 3) == 2 and word() == (write, 4)
        assert p.b.dequeue(4) == b"xxxx"
        assert p.a.arm_wait(write, 3) == 6 and word() == (0, 5)
        struct.pack_into("<Q", p.qb, OFF_TAIL, 10)  # the peer's tail out of range: an error, not armed
        assert p.a.arm_wait(read, 1) == VMCI_ERROR_INVALID_SIZE and word() == (0, 6)
        assert struct.unpack_from("<Q", p.qa, 64)[0] == 6 << 2  # the word, in the private area


@cores
@pytest.mark.parametrize("size", [-1, 1.5, "10", None, 1 << 62, 1 << 70])
def test_bad_sizes_are_refused(name, size):
    core = load_core(name)
    q = mmap.mmap(-1, 2 * PAGE)
    try:
        with pytest.raises((TypeError, ValueError, OverflowError)):
            core.Ring(q, q, size, 1)
        with pytest.raises((TypeError, ValueError, OverflowError)):
            core.Ring(q, q, 1, size)
    finally:
        q.close()


@cores
def test_bad_buffers_are_refused(name):
    core = load_core(name)
    q = mmap.mmap(-1, 2 * PAGE)
    try:
        with pytest.raises(ValueError):
            core.Ring(q, q, PAGE + 1, 1)  # the data area does not fit
        with pytest.raises((TypeError, BufferError)):
            core.Ring(b"\0" * (2 * PAGE), q, 1, 1)
        with pytest.raises(ValueError):
            core.Ring(memoryview(q)[4:], q, 1, 1)  # misaligned index words
        ring = core.Ring(q, q, 10, 10)
        with pytest.raises((TypeError, BufferError)):
            ring.dequeue_into(b"readonly")
        with pytest.raises((TypeError, ValueError, OverflowError)):
            ring.dequeue(-1)
        ring.release_memory()
        with pytest.raises(ValueError):
            ring.enqueue(b"x")
        ring.release_memory()
    finally:
        q.close()


@cores
def test_peek_view_reads_in_place_up_to_the_wrap_point(name):
    with pair(name, 10, 10) as p:
        assert p.b.peek_view(5) == VMCI_ERROR_QUEUEPAIR_NODATA
        assert p.a.enqueue(b"abcdefg") == 7
        view = p.b.peek_view(100)
        assert view.readonly and bytes(view) == b"abcdefg"
        p.qa[PAGE] = ord("X")  # the view is the ring's memory, not a copy
        assert bytes(view) == b"Xbcdefg"
        assert bytes(p.b.peek_view(3)) == b"Xbc"
        assert len(p.b.peek_view(0)) == 0
        assert p.b.consume_buf_ready() == 7  # peeking consumes nothing
        assert p.b.consume(7) == 7
        assert p.b.consume_indexes() == (7, 7)
        assert p.a.enqueue(b"123456") == 6  # 3 bytes before the wrap point, 3 after
        view = p.b.peek_view(100)
        assert bytes(view) == b"123"
        assert p.b.consume(3) == 3
        assert bytes(p.b.peek_view(100)) == b"456"
        assert p.b.consume(3) == 3 and p.b.consume_indexes() == (3, 3)


@cores
def test_consume_checks_its_count(name):
    with pair(name, 10, 10) as p:
        assert p.b.consume(0) == 0
        assert p.b.consume(1) == VMCI_ERROR_INVALID_ARGS
        p.a.enqueue(b"abc")
        assert p.b.consume(4) == VMCI_ERROR_INVALID_ARGS
        assert p.b.consume(1 << 40) == VMCI_ERROR_INVALID_ARGS
        assert p.b.consume_indexes() == (3, 0) and p.b.consume_buf_ready() == 3
        with pytest.raises(ValueError):
            p.b.consume(-1)
        with pytest.raises(ValueError):
            p.b.peek_view(-1)
        assert bytes(p.b.peek_view(1 << 70)) == b"abc"
        for bad in (1.5, "3", None, True):
            with pytest.raises(TypeError):
                p.b.consume(bad)
            with pytest.raises(TypeError):
                p.b.peek_view(bad)
        assert p.b.consume(3) == 3
        assert p.b.consume(1) == VMCI_ERROR_INVALID_ARGS


@cores
def test_lent_views_are_released_by_consume_and_release_memory(name):
    with pair(name, 10, 10) as p:
        p.a.enqueue(b"abcdef")
        first, second = p.b.peek_view(2), p.b.peek_view(6)
        assert p.b.consume(0) == 0
        for view in (first, second):
            with pytest.raises(ValueError):
                bytes(view)
        view = p.b.peek_view(6)
        assert p.b.consume(7) == VMCI_ERROR_INVALID_ARGS  # a refused consume keeps the view
        assert bytes(view) == b"abcdef"
        p.b.release_memory()
        with pytest.raises(ValueError):
            view[0]
        with pytest.raises(ValueError):
            p.b.peek_view(1)
        with pytest.raises(ValueError):
            p.b.consume(0)


@cores
def test_a_view_still_exported_stays_mapped(name):
    """A lent view that something holds a buffer of cannot be released: it stays readable."""
    with pair(name, 10, 10) as p:
        p.a.enqueue(b"abcd")
        view = p.b.peek_view(4)
        holder = struct.iter_unpack("B", view)  # holds a buffer export of the view
        assert p.b.consume(4) == 4
        assert bytes(view) == b"abcd"  # not released: still readable, in bounds
        assert p.a.enqueue(b"efgh") == 4
        assert bytes(p.b.peek_view(4)) == b"efgh"
        assert [x for (x,) in holder] == list(b"abcd")
        del holder, view  # the pair's memory can be unmapped now


index = st.integers(0, (1 << 64) - 1)


@cores
@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 64), tail=index, head=index, which=st.sampled_from(["produce", "consume"]))
def test_corrupted_indexes_give_invalid_size(name, size, tail, head, which):
    """Any index >= size: every operation says INVALID_SIZE and touches no data."""
    if tail < size and head < size:
        tail = size + tail % 1000
    with pair(name, size, size) as p:
        p.a.enqueue(b"x" * (size - 1))
        p.b.enqueue(b"y" * (size - 1))
        # Corrupt A's produce queue (tail in qa, head in qb) or A's consume queue.
        tq, hq = (p.qa, p.qb) if which == "produce" else (p.qb, p.qa)
        struct.pack_into("<Q", tq, OFF_TAIL, tail)
        struct.pack_into("<Q", hq, OFF_HEAD, head)
        before = (bytes(p.qa), bytes(p.qb))
        dst = bytearray(b"\xee" * (size + 8))
        if which == "produce":
            calls = [p.a.produce_free_space, p.a.produce_buf_ready, lambda: p.a.enqueue(b"z" * size),
                     lambda: p.a.enqueue_many([b"z"]), p.b.consume_buf_ready, p.b.consume_free_space,
                     lambda: p.b.dequeue(size), lambda: p.b.peek(size), lambda: p.b.dequeue_into(dst),
                     lambda: p.b.peek_into(dst), lambda: p.b.peek_view(size), lambda: p.b.consume(0),
                     lambda: p.b.consume(1)]
        else:
            calls = [p.a.consume_buf_ready, p.a.consume_free_space, lambda: p.a.dequeue(size),
                     lambda: p.a.dequeue_into(dst), lambda: p.a.peek_into(dst), lambda: p.a.peek_view(size),
                     lambda: p.a.consume(0), lambda: p.a.consume(1), p.b.produce_free_space,
                     lambda: p.b.enqueue(b"z"), lambda: p.b.enqueue_many([b"z"])]
        for call in calls:
            assert call() == VMCI_ERROR_INVALID_SIZE
        assert (bytes(p.qa), bytes(p.qb)) == before
        assert dst == b"\xee" * (size + 8)


class Model:
    """The SDK's arithmetic in plain Python: one direction of a pair."""

    def __init__(self, size):
        self.size, self.tail, self.head, self.data = size, 0, 0, bytearray()

    def enqueue(self, chunk):
        free = self.size - 1 - len(self.data) if self.size else 0
        if free == 0:
            return VMCI_ERROR_QUEUEPAIR_NOSPACE
        n = min(len(chunk), free)
        self.data += chunk[:n]
        self.tail = (self.tail + n) % self.size
        return n

    def dequeue(self, n):
        if not self.data:
            return VMCI_ERROR_QUEUEPAIR_NODATA
        out, self.data = bytes(self.data[:n]), self.data[n:]
        self.head = (self.head + len(out)) % self.size
        return out

    def view(self, n):
        """What peek_view shows: up to n bytes, not past the wrap point."""
        if not self.data:
            return VMCI_ERROR_QUEUEPAIR_NODATA
        return bytes(self.data[:min(n, self.size - self.head)])


ops = st.lists(st.tuples(st.sampled_from(["ab", "ba"]), st.sampled_from(["write", "read", "view"]),
                         st.integers(0, 80)), max_size=60)


@core_pairs
@settings(max_examples=60, deadline=None)
@given(size_a=st.integers(1, 70), size_b=st.integers(1, 70), steps=ops, seed=st.integers(0, 255))
def test_any_sequence_matches_the_model(names, size_a, size_b, steps, seed):
    """Ends on any two cores, one ring in memory: bytes and indexes as the model says."""
    with pair(names[0], size_a, size_b, names[1]) as p:
        models = {"ab": Model(size_a), "ba": Model(size_b)}
        counter = seed
        for direction, op, n in steps:
            producer, consumer = (p.a, p.b) if direction == "ab" else (p.b, p.a)
            model = models[direction]
            if op == "write":
                chunk = bytes((counter + i) & 0xFF for i in range(n))
                counter += n
                assert producer.enqueue(chunk) == model.enqueue(chunk)
            elif op == "read":
                assert consumer.dequeue(n) == model.dequeue(n)
            else:
                view, want = consumer.peek_view(n), model.view(n)
                if isinstance(want, int):
                    assert view == want
                else:
                    assert bytes(view) == want
                    assert consumer.consume(len(want)) == len(want) and model.dequeue(len(want)) == want
            assert producer.produce_indexes() == (model.tail, model.head)
            assert consumer.consume_indexes() == (model.tail, model.head)
            assert consumer.consume_buf_ready() == len(model.data)


@core_pairs
def test_interop_stream_across_cores(names):
    """A long stream through a small ring: producer on one core, consumer on the other."""
    payload = bytes(range(256)) * 40
    with pair(names[0], 97, 33, names[1]) as p:
        sent, received = 0, bytearray()
        buf = bytearray(50)
        while len(received) < len(payload):
            rc = p.a.enqueue(payload[sent:sent + 61]) if sent < len(payload) else 0
            sent += max(rc, 0)
            n = p.b.dequeue_into(buf)
            if n > 0:
                received += buf[:n]
        assert bytes(received) == payload
        assert p.b.enqueue_many([b"back"] * 8) == 8
        assert p.a.dequeue(100) == b"back" * 8


@core_pairs
def test_interop_in_place_stream_across_cores(names):
    """The same stream read in place with peek_view + consume."""
    payload = bytes(range(256)) * 40
    with pair(names[0], 97, 33, names[1]) as p:
        sent, received = 0, bytearray()
        while len(received) < len(payload):
            rc = p.a.enqueue(payload[sent:sent + 61]) if sent < len(payload) else 0
            sent += max(rc, 0)
            view = p.b.peek_view(50)
            if not isinstance(view, int):
                received += view
                n = len(view)
                assert p.b.consume(n) == n
        assert bytes(received) == payload
        assert p.b.enqueue(b"back" * 8) == 32
        view = p.a.peek_view(100)
        assert bytes(view) == b"back" * 8 and p.a.consume(32) == 32
