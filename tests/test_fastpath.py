"""The cores' Fastpath: an endpoint's send_status / recv_status in one core call each.

Each test runs on both cores over a real Receiver and Link (test_core's ``Rx``);
what is not the common case must reach the endpoint's slow paths with the
arguments it was given, and bad input must give the same codes or exceptions.
"""
import os
import threading
from collections import namedtuple

import pytest

from conftest import CYTHON_AVAILABLE
from test_core import Page, Rx
from vsockcompat._backend import load_core
from vsockcompat.constants import (
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_NO_MORE_DATAGRAMS,
    VMCI_ERROR_NO_RESOURCES,
    VMCI_MAX_DG_PAYLOAD_SIZE,
)
from vsockcompat.handles import VMCI_INVALID_HANDLE, VMCIHandle

Peer = namedtuple("Peer", "handle pid")
SENDER = Peer(VMCIHandle(3, 1024), 4242)
DST = VMCIHandle(2, 1025)


class Bed(Rx):
    """An Rx whose receiver and link are driven through a Fastpath; the slow paths record
    their calls and return what the test chose."""

    def __init__(self, core, page, tmp_path, sender_core=None):
        super().__init__(core, page, tmp_path, sender_core, tag=SENDER)
        self.send_calls, self.recv_calls = [], []
        self.send_answer, self.recv_answer = -777, (-888, None)
        self.fast = core.Fastpath(self.rx, self.spill, self.send_slow, self.recv_slow)
        if sender_core is None:
            self.link.watch_acl()  # as an endpoint's links do (datagram._OpenLink)
            self.fast.add_link(DST, self.link)

    def send_slow(self, *args):
        self.send_calls.append(args)
        return self.send_answer

    def recv_slow(self, *args):
        self.recv_calls.append(args + (self.fast.recv_lock.locked(),))
        return self.recv_answer


@pytest.fixture
def page(core):
    p = Page(core)
    yield p
    p.close()


@pytest.fixture
def bed(core, page, tmp_path):
    b = Bed(core, page, tmp_path)
    yield b
    b.close()


def test_a_round_trip_through_the_fastpath(bed):
    fast = bed.fast
    assert fast.send_status(DST, b"hello", 5) == 29
    assert fast.send_status(DST, memoryview(b"world!"), 5) == 29  # the cached link again
    assert fast.recv_status(bed.buf) == (5, SENDER.handle)
    assert bytes(bed.buf[:5]) == b"hello" and fast.last_peer is SENDER
    assert fast.recv_status(memoryview(bed.buf)) == (5, SENDER.handle)
    assert bytes(bed.buf[:5]) == b"world"
    assert (fast.sent, fast.received) == (2, 2)
    assert bed.send_calls == [] and bed.recv_calls == []
    assert bed.account.queued() == 0 and not fast.recv_lock.locked()


def test_lengths_and_buffer_kinds_may_change_from_send_to_send(bed):
    words = memoryview(bytearray(b"abcdefgh")).cast("I")
    sends = [(b"12345", 5), (bytearray(b"123"), 3), (b"12345", 5), (words, 8), (words, 6),
             (memoryview(b"xyz")[1:], 2), (b"", 0), (bytearray(b"tail!"), 4)]
    for buf, length in sends:
        assert bed.fast.send_status(DST, buf, length) == 24 + length
    for buf, length in sends:
        assert bed.fast.recv_status(bed.buf) == (length, SENDER.handle)
        assert bytes(bed.buf[:length]) == bytes(memoryview(buf).cast("B"))[:length]


def test_a_link_that_does_not_watch_the_acl_epoch_sends_all_the_same(core, page, tmp_path):
    bed = Bed(core, page, tmp_path, sender_core=core)  # its link unwatched
    try:
        bed.fast.add_link(DST, bed.link)
        assert [bed.fast.send_status(DST, b"abc", 3) for _ in range(3)] == [27] * 3
        assert [bed.fast.recv_status(bed.buf) for _ in range(3)] == [(3, SENDER.handle)] * 3
        assert bed.send_calls == [] and bed.fast.sent == 3 and bed.account.queued() == 0
    finally:
        bed.close()


def test_a_destination_without_a_link_goes_to_the_slow_path(bed):
    other = VMCIHandle(2, 4000)
    payload = b"abc"
    assert bed.fast.send_status(other, payload, 3) == -777
    assert bed.send_calls == [(other, payload, 3, None)]
    bed.fast.drop_link(DST)
    assert bed.fast.send_status(DST, payload, 3) == -777
    assert bed.send_calls[-1] == (DST, payload, 3, None)
    bed.fast.add_link(DST, bed.link)
    assert bed.fast.send_status(DST, payload, 3) == 27
    bed.fast.clear_links()
    assert bed.fast.send_status(DST, payload, 3) == -777
    assert bed.fast.sent == 1 and bed.account.queued() == 27


def test_a_stale_link_goes_to_the_slow_path_with_the_link(bed):
    bed.link.watch_acl()
    bed.words[7] += 1  # the receiver's ACL epoch word (VSC_ACCT_OFF_ACL_EPOCH / 8)
    assert bed.fast.send_status(DST, b"x", 1) == -777
    assert bed.send_calls == [(DST, b"x", 1, bed.link)]
    assert bed.fast.sent == 0 and bed.account.queued() == 0


def test_a_closed_link_goes_to_the_slow_path_with_the_link(bed):
    bed.link.close()
    assert bed.fast.send_status(DST, b"x", 1) == -777
    assert bed.send_calls == [(DST, b"x", 1, bed.link)]


@pytest.mark.parametrize("length, buf", [(6, b"hello"), (-1, b"hello"),
                                         (VMCI_MAX_DG_PAYLOAD_SIZE + 1, bytes(VMCI_MAX_DG_PAYLOAD_SIZE + 1))])
def test_a_bad_length_is_invalid_args_without_the_slow_path(bed, length, buf):
    assert bed.fast.send_status(DST, buf, length) == VMCI_ERROR_INVALID_ARGS
    assert bed.send_calls == [] and bed.fast.sent == 0 and bed.account.queued() == 0


@pytest.mark.parametrize("dst, buf, length", [(DST, b"x", "1"), (DST, "text", 1), (DST, None, 0),
                                              ([2, 1025], b"x", 1)])
def test_wrong_types_raise_type_error(bed, dst, buf, length):
    with pytest.raises(TypeError):
        bed.fast.send_status(dst, buf, length)
    assert bed.account.queued() == 0


def test_a_closing_endpoint_neither_sends_nor_receives(bed):
    bed.fast.closing = True
    assert bed.fast.send_status(DST, b"x", 1) == VMCI_ERROR_INVALID_ARGS
    assert bed.fast.recv_status(bed.buf) == (VMCI_ERROR_NO_MORE_DATAGRAMS, None)
    assert bed.send_calls == [] and bed.recv_calls == [] and bed.account.queued() == 0


def test_a_timeout_or_a_held_datagram_goes_to_the_slow_path_under_the_lock(bed):
    assert bed.fast.recv_status(bed.buf, 0.5) == (-888, None)
    bed.fast.held = "something held"
    assert bed.fast.recv_status(bed.buf) == (-888, None)
    assert bed.recv_calls == [(bed.buf, 0.5, None, None, True), (bed.buf, None, None, None, True)]
    assert not bed.fast.recv_lock.locked()


def test_a_datagram_larger_than_the_buffer_goes_to_the_slow_path(bed):
    payload = bytes(range(256)) + b"tail"
    assert bed.link.send(payload, len(payload)) == 24 + 260
    assert bed.fast.recv_status(bed.buf) == (-888, None)
    assert bed.recv_calls == [(bed.buf, None, 260, SENDER, True)]
    assert bytes(bed.buf) + bytes(bed.spill[:4]) == payload  # for the slow path to hold
    assert bed.fast.received == 0 and bed.fast.last_peer is None


def test_a_denied_datagram_goes_to_the_slow_path(core, bed):
    bed.rx.deny(bed.b.fileno(), True)
    assert bed.link.send(b"secret", 6) == 30
    assert bed.fast.recv_status(bed.buf) == (-888, None)
    assert bed.recv_calls == [(bed.buf, None, core.DENIED, None, True)]


def test_a_wake_up_goes_to_the_slow_path(core, bed):
    os.write(bed.wake_w, b"\0")
    assert bed.fast.recv_status(bed.buf) == (-888, None)
    assert bed.recv_calls == [(bed.buf, None, core.WAKE, None, True)]


# After a delivery the connection is hot and its frame remembered: what the Fastpath does
# inline from then on must still see every change.


def _deliver_one(bed):
    assert bed.fast.send_status(DST, b"a", 1) == 25
    assert bed.fast.recv_status(bed.buf) == (1, SENDER.handle)


def test_a_connection_denied_after_a_delivery_drops_the_next_alike_datagram(core, bed):
    _deliver_one(bed)
    bed.rx.deny(bed.b.fileno(), True)
    assert bed.fast.send_status(DST, b"b", 1) == 25
    assert bed.fast.recv_status(bed.buf) == (-888, None)
    assert bed.recv_calls == [(bed.buf, None, core.DENIED, None, True)]
    bed.rx.deny(bed.b.fileno(), False)
    assert bed.fast.send_status(DST, b"c", 1) == 25
    assert bed.fast.recv_status(bed.buf) == (1, SENDER.handle) and bed.buf[0] == ord("c")
    assert bed.fast.received == 2 and bed.account.queued() == 0


@pytest.mark.parametrize("deny", [False, True])
def test_the_acl_epoch_moving_after_a_delivery_rechecks_before_the_next(core, bed, deny):
    rechecks = []

    def recheck():
        rechecks.append(bed.words[7])
        if deny:
            bed.rx.deny(bed.b.fileno(), True)

    bed.rx.watch_acl(recheck)
    _deliver_one(bed)
    bed.words[7] += 1  # the receiver's ACL epoch word
    assert bed.fast.send_status(DST, b"b", 1) == -777  # STALE: the sender's slow path
    bed.link.watch_acl()  # as the fresh link it opens would
    assert bed.fast.send_status(DST, b"b", 1) == 25
    if deny:
        assert bed.fast.recv_status(bed.buf) == (-888, None)
        assert bed.recv_calls == [(bed.buf, None, core.DENIED, None, True)]
    else:
        assert bed.fast.recv_status(bed.buf) == (1, SENDER.handle) and bed.buf[0] == ord("b")
    assert rechecks == [bed.words[7]]


def test_a_forged_datagram_on_a_hot_connection_goes_to_the_slow_path(core, bed):
    _deliver_one(bed)
    bed.a.send(core.encode_datagram(2, 1025, 3, 999, b"b"))  # not the connection's source
    assert bed.fast.recv_status(bed.buf) == (-888, None)
    assert bed.recv_calls == [(bed.buf, None, core.FORGED, None, True)]
    assert bed.rx.last_fd == bed.b.fileno() and bed.fast.received == 1


def test_a_sender_that_hangs_up_after_a_delivery_is_peer_gone(core, bed):
    _deliver_one(bed)
    bed.a.close()
    assert bed.fast.recv_status(bed.buf) == (-888, None)
    assert bed.recv_calls == [(bed.buf, None, core.PEER_GONE, None, True)]
    assert bed.rx.last_fd == bed.b.fileno()


def test_the_queue_bound_holds_exactly_through_the_fastpath(bed):
    """Frames of 24 + 64 bytes are accepted while the queue stays under its limit, then
    NO_RESOURCES (no slow path: a VMCI code); one received makes room for one more."""
    limit = bed.account.limit
    fits = (limit - 1) // 88  # produced - consumed + 88 < limit before each accepted send
    payload = bytes(64)
    assert [bed.fast.send_status(DST, payload, 64) for _ in range(fits)] == [88] * fits
    assert bed.fast.send_status(DST, payload, 64) == VMCI_ERROR_NO_RESOURCES
    assert bed.account.queued() == fits * 88 and bed.fast.sent == fits
    assert bed.fast.recv_status(bytearray(64)) == (64, SENDER.handle)
    assert bed.fast.send_status(DST, payload, 64) == 88
    assert bed.fast.send_status(DST, payload, 64) == VMCI_ERROR_NO_RESOURCES
    assert bed.send_calls == [] and bed.account.queued() == fits * 88


def test_a_hot_read_that_times_out_waits_on_everything(bed):
    """The hot read gives up after VSC_RX_HOT_MS; the receive then waits with epoll."""
    _deliver_one(bed)
    sender = threading.Timer(0.05, lambda: bed.fast.send_status(DST, b"late", 4))
    sender.start()
    try:
        assert bed.fast.recv_status(bed.buf) == (4, SENDER.handle) and bytes(bed.buf[:4]) == b"late"
    finally:
        sender.join(10)
    assert bed.recv_calls == [] and bed.fast.received == 2 and bed.account.queued() == 0


def test_a_receiver_that_closed_after_a_send_sends_the_next_to_the_slow_path(bed):
    assert bed.fast.send_status(DST, b"a", 1) == 25
    bed.account.mark_closed()
    assert bed.fast.send_status(DST, b"b", 1) == -777
    assert bed.send_calls == [(DST, b"b", 1, bed.link)] and bed.fast.sent == 1


def test_the_lock_is_released_when_the_slow_path_raises(bed):
    def boom(*args):
        raise KeyError("slow path failed")

    fast = type(bed.fast)(bed.rx, bed.spill, boom, boom)
    with pytest.raises(KeyError):
        fast.recv_status(bed.buf, 0)
    assert not fast.recv_lock.locked()
    with pytest.raises(KeyError):
        fast.send_status(DST, b"x", 1)  # no link in this Fastpath


def test_a_read_only_buffer_is_refused_before_anything_is_read(core, bed):
    assert bed.link.send(b"x", 1) == 25
    with pytest.raises((BufferError, TypeError)):
        bed.fast.recv_status(b"read-only")
    assert not bed.fast.recv_lock.locked()
    assert bed.fast.recv_status(bed.buf) == (1, SENDER.handle)


def test_the_receive_lock_is_a_lock(bed):
    lock = bed.fast.recv_lock
    with pytest.raises(RuntimeError):
        lock.release()
    with lock:
        assert lock.locked()
    assert lock.acquire() is True and lock.locked()
    lock.release()
    assert not lock.locked()


def test_receivers_on_two_threads_take_turns(bed):
    """One thread waits in the core, the other on the receive lock; each gets one datagram."""
    got = []
    threads = [threading.Thread(target=lambda: got.append(bed.fast.recv_status(bytearray(16))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for payload in (b"one", b"two"):
        assert bed.fast.send_status(DST, payload, 3) == 27
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert sorted(got) == [(3, SENDER.handle)] * 2 and bed.fast.received == 2


@pytest.mark.parametrize("sender", ["cython", "pure"])
def test_the_cores_interoperate_through_their_fastpaths(core, page, tmp_path, sender):
    if sender == "cython" and not CYTHON_AVAILABLE:
        pytest.skip("the Cython core is not built")
    other = load_core(sender)
    b = Bed(core, page, tmp_path, other)
    tx_rx = other.Receiver(b.listener, b.wake_r, page.account(other), 3, 1024)  # the sender's, unused
    try:
        tx = other.Fastpath(tx_rx, bytearray(16), b.send_slow, b.recv_slow)
        tx.add_link(DST, b.link)
        for i in range(50):
            assert tx.send_status(DST, b"%02d" % i, 2) == 26
        assert [b.fast.recv_status(b.buf) + (bytes(b.buf[:2]),) for _ in range(50)] == [
            (2, SENDER.handle, b"%02d" % i) for i in range(50)]
        assert tx.sent == 50 and b.fast.received == 50 and b.send_calls == []
    finally:
        tx_rx.close()
        b.close()


# The endpoint over its Fastpath.


def test_an_endpoints_counters_and_last_peer_follow_both_paths(runtime):
    from vsockcompat.datagram import DatagramEndpoint

    with DatagramEndpoint(runtime=runtime) as a, DatagramEndpoint(runtime=runtime) as b:
        buf = bytearray(8)
        assert a.send_status(b.handle, b"first", 5) == 29  # opens the link: the slow path
        assert a.send_status(b.handle, b"again", 5) == 29  # the cached link
        assert b.recv_status(buf, timeout=5) == (5, a.handle)  # a timeout: the slow path
        assert b.recv_status(buf) == (5, a.handle)
        assert (a.stats.sent, b.stats.received) == (2, 2)
        assert b.stats.as_dict() == dict(received=2, sent=0, bad_frames=0, forged=0, denied=0,
                                         refused_connections=0, bad_verdicts=0)
        assert b.last_peer.handle == a.handle and b.last_peer.pid == os.getpid()
        with pytest.raises(AttributeError):
            b.last_peer = None
    assert a.send_status(b.handle, b"x", 1) == VMCI_ERROR_INVALID_ARGS
    assert b.recv_status(buf) == (VMCI_ERROR_NO_MORE_DATAGRAMS, None)


def test_an_endpoint_does_not_live_on_through_its_fastpath(runtime):
    import gc
    import weakref

    from vsockcompat.datagram import DatagramEndpoint

    a = DatagramEndpoint(runtime=runtime)
    with DatagramEndpoint(runtime=runtime) as b:
        assert a.send_status(b.handle, b"x", 1) == 25
        fast, ref = a._fast, weakref.ref(a)
        gc.disable()
        try:
            del a  # no cycle through the core: closed at once, by refcount
            assert ref() is None and fast.closing
        finally:
            gc.enable()


# The SDK calls: the common case in one core call, anything else checked as before.


@pytest.fixture
def lib(runtime):
    from vsockcompat.sdk import VMCILibrary

    library = VMCILibrary(runtime)
    assert library.VMCI_InitApp(None) == 0
    yield library
    library.VMCI_CleanupApp()


class Id(int):
    """An int subclass: a valid id, though not an exact int."""


def test_sdk_handles_that_only_look_like_ours_are_checked(lib):
    a, b = lib.VMCIDatagram_CreateHnd(0), lib.VMCIDatagram_CreateHnd(0)
    buf = bytearray(8)
    bad = [VMCIHandle(float(a.context), a.resource), VMCIHandle(True, 1), VMCIHandle(a.context, -1),
           VMCIHandle(a.context, 2**32), VMCIHandle([a.context], a.resource), VMCIHandle(a.context, None)]
    for handle in bad:
        assert lib.VMCIDatagram_SendTo(b, handle, 1, b"x") == VMCI_ERROR_INVALID_ARGS, handle
        assert lib.VMCIDatagram_SendTo(handle, a, 1, b"x") == VMCI_ERROR_INVALID_ARGS, handle
        assert lib.VMCIDatagram_RecvFrom(handle, buf) == (VMCI_ERROR_INVALID_ARGS, VMCI_INVALID_HANDLE), handle
    for length in (True, 1.0, Id(1)):
        rc = lib.VMCIDatagram_SendTo(b, a, length, b"x")
        assert rc == (25 if type(length) is Id else VMCI_ERROR_INVALID_ARGS), length
    # Equal, but not VMCIHandles of exact ints: still ours, through the checked path.
    assert lib.VMCIDatagram_SendTo((b.context, b.resource), VMCIHandle(Id(a.context), a.resource), 2, b"yz") == 26
    assert lib.VMCIDatagram_RecvFrom((b.context, Id(b.resource)), memoryview(buf)) == (1, a)
    assert lib.VMCIDatagram_RecvFrom(b, buf) == (2, a) and bytes(buf[:2]) == b"yz"
    # Equal handles of exact ints that are not the very objects CreateHnd returned: ours.
    same_a, same_b = VMCIHandle(a.context, a.resource), VMCIHandle(b.context, b.resource)
    assert same_a is not a and lib.VMCIDatagram_SendTo(same_b, same_a, 1, b"q") == 25
    assert lib.VMCIDatagram_RecvFrom(same_b, buf) == (1, a) and buf[0] == ord("q")


def test_sdk_buffers_that_are_not_contiguous_bytes_are_invalid_args(lib):
    a, b = lib.VMCIDatagram_CreateHnd(0), lib.VMCIDatagram_CreateHnd(0)
    strided = memoryview(bytearray(16))[::2]
    assert lib.VMCIDatagram_SendTo(b, a, 4, strided) == VMCI_ERROR_INVALID_ARGS
    assert lib.VMCIDatagram_SendTo(b, a, 4, "text") == VMCI_ERROR_INVALID_ARGS
    words = memoryview(bytearray(8)).cast("I")  # 2 items, 8 bytes: the length counts bytes
    assert lib.VMCIDatagram_SendTo(b, a, 8, words) == 32
    assert lib.VMCIDatagram_RecvFrom(b, strided) == (VMCI_ERROR_INVALID_ARGS, VMCI_INVALID_HANDLE)
    assert lib.VMCIDatagram_RecvFrom(b, memoryview(b"read-only")) == (VMCI_ERROR_INVALID_ARGS,
                                                                       VMCI_INVALID_HANDLE)
    into = memoryview(bytearray(8)).cast("I")
    assert lib.VMCIDatagram_RecvFrom(b, into) == (8, a) and into.tobytes() == bytes(8)


def test_a_wake_up_during_a_stream_is_seen_while_the_connection_stays_hot(core, bed):
    """One sender keeps its connection hot; the receiver still looks at everything else
    (the pure core polls every VSC_RX_SKIPS receives and reads hot on if nothing else is
    ready; the C core also serves what its batch read took ahead): the wake-up goes to the
    slow path before the stream ends, FIFO meanwhile."""
    from vsockcompat import _pure

    skips = _pure._SKIP_MAX
    for i in range(3 * skips):
        assert bed.fast.send_status(DST, bytes([i]), 1) == 25
    got = [bed.fast.recv_status(bed.buf) for _ in range(skips + 1)]  # polled once meanwhile
    assert got == [(1, SENDER.handle)] * (skips + 1) and bed.recv_calls == []
    os.write(bed.wake_w, b"\0")
    for delivered in range(2 * skips):
        if bed.fast.recv_status(bed.buf) == (-888, None):
            break
        assert bed.buf[0] == skips + 1 + delivered
    assert bed.recv_calls == [(bed.buf, None, core.WAKE, None, True)], "the wake-up was not seen"
    assert bed.fast.received == skips + 1 + delivered
    if core.NAME == "pure":
        assert delivered < skips


def test_a_view_that_is_not_contiguous_raises_with_nothing_counted(bed):
    """As the Cython core's buffer request: BufferError, the queue account untouched, and
    the link goes on (joined frames and sendmsg alike)."""
    for length, view in [(4, memoryview(bytearray(16))[::2]), (6000, memoryview(bytearray(12000))[::2])]:
        with pytest.raises(BufferError):
            bed.fast.send_status(DST, view, length)
        with pytest.raises(BufferError):
            bed.link.send(view, length)
        assert bed.account.queued() == 0 and bed.fast.sent == 0 and bed.send_calls == []
    assert bed.fast.send_status(DST, b"ok", 2) == 26
    assert bed.fast.recv_status(bed.buf) == (2, SENDER.handle) and bytes(bed.buf[:2]) == b"ok"


def test_the_receive_lock_excludes_contending_threads(bed):
    """Four threads take the lock in turns, each yielding inside it so the others contend
    (and wait): never two inside, nothing lost, and it ends free."""
    lock, inside, counts = bed.fast.recv_lock, [], [0] * 4

    def worker(i):
        for _ in range(300):
            with lock:
                assert not inside, "two threads inside the receive lock"
                inside.append(i)
                os.sched_yield()
                time_slice = inside.pop()
                counts[i] += time_slice == i

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert counts == [300] * 4 and not lock.locked()
