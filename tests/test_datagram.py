"""Datagram endpoints on the local transport: SDK semantics, identity, bad input."""
import os
import select
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import CYTHON_AVAILABLE, PYTHON, child_env, make_settings
from vsockcompat import errors
from vsockcompat.constants import (
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_INVALID_RESOURCE,
    VMCI_ERROR_NO_MEM,
    VMCI_ERROR_NO_MORE_DATAGRAMS,
    VMCI_MAX_DATAGRAM_QUEUE_SIZE,
    VMCI_MAX_DG_PAYLOAD_SIZE,
)
from vsockcompat.datagram import Datagram, DatagramEndpoint
from vsockcompat.handles import VMCIHandle
from vsockcompat.runtime import Runtime


@pytest.fixture
def pair(runtime):
    a = DatagramEndpoint(runtime=runtime)
    b = DatagramEndpoint(runtime=runtime)
    yield a, b
    a.close()
    b.close()


def test_handles_are_auto_assigned_from_1024_in_order(runtime):
    endpoints = [DatagramEndpoint(runtime=runtime) for _ in range(3)]
    try:
        assert [e.handle for e in endpoints] == [VMCIHandle(2, r) for r in (1024, 1025, 1026)]
    finally:
        for e in endpoints:
            e.close()
    with DatagramEndpoint(runtime=runtime) as again:
        assert again.handle == VMCIHandle(2, 1027), "ids keep increasing after a destroy"


def test_explicit_resource_id_and_duplicate(runtime):
    with DatagramEndpoint(5000, runtime=runtime) as first:
        assert first.handle == VMCIHandle(2, 5000)
        with pytest.raises(errors.DuplicateEntry):
            DatagramEndpoint(5000, runtime=runtime)
    with DatagramEndpoint(5000, runtime=runtime) as reused:
        assert reused.handle == VMCIHandle(2, 5000)


@pytest.mark.parametrize("resource", [None, 5000])
def test_an_id_being_claimed_is_not_taken_by_another_program(make_runtime, monkeypatch, resource):
    """The local transport claims an id under its context lock, listening before it lets go: a
    second program creating an endpoint meanwhile waits, then gets the next id (or
    DuplicateEntry for the same explicit one). The hybrid transport's counterpart is in
    test_hybrid_host."""
    from test_hybrid_host import claim_during_anothers_claim, claimed_apart
    first, second = claim_during_anothers_claim(make_runtime(), make_runtime(), resource, monkeypatch)
    claimed_apart(first, second, resource, make_runtime())


@pytest.mark.parametrize("resource", [-1, 0xFFFFFFFF, 2**40, "1", 1.0, True])
def test_bad_resource_ids(runtime, resource):
    with pytest.raises(errors.InvalidArgs):
        DatagramEndpoint(resource, runtime=runtime)


@pytest.mark.parametrize("size", [0, 1, 4096, VMCI_MAX_DG_PAYLOAD_SIZE])
def test_send_and_receive_sizes(pair, size):
    a, b = pair
    payload = os.urandom(size)
    assert a.send(b.handle, payload) == size
    assert b.recv(timeout=5) == Datagram(a.handle, payload)


def test_oversized_payload_is_refused(pair):
    a, b = pair
    with pytest.raises(errors.InvalidArgs, match="exceeds"):
        a.send(b.handle, bytes(VMCI_MAX_DG_PAYLOAD_SIZE + 1))


def test_send_length_selects_a_prefix(pair):
    a, b = pair
    a.send(b.handle, bytearray(b"abcdef"), 3)
    assert b.recv(timeout=5).payload == b"abc"


def test_fifo_per_sender(pair):
    a, b = pair
    for i in range(200):
        a.send(b.handle, i.to_bytes(4, "little"))
    assert [int.from_bytes(b.recv(timeout=5).payload, "little") for _ in range(200)] == list(range(200))


def test_queue_bound_refuses_instead_of_losing(pair):
    a, b = pair
    accepted = 0
    with pytest.raises(errors.NoResources):
        while True:
            a.send(b.handle, accepted.to_bytes(4, "little") + bytes(4092))
            accepted += 1
    assert accepted == (VMCI_MAX_DATAGRAM_QUEUE_SIZE - 1) // (4096 + 24)
    assert b.queued_bytes == accepted * 4120
    got = [int.from_bytes(b.recv(timeout=5).payload[:4], "little") for _ in range(accepted)]
    assert got == list(range(accepted))
    with pytest.raises(errors.Timeout):
        b.recv(timeout=0)
    assert b.queued_bytes == 0
    a.send(b.handle, b"room again")
    assert b.recv(timeout=5).payload == b"room again"


def test_small_datagrams_fill_the_queue_by_bytes(pair):
    a, b = pair
    sent = 0
    while True:
        try:
            a.send(b.handle, b"")
        except errors.NoResources:
            break
        sent += 1
    assert sent == (VMCI_MAX_DATAGRAM_QUEUE_SIZE - 1) // 24
    assert sum(1 for _ in range(sent) if b.recv(timeout=5)) == sent


def test_two_maximal_datagrams_do_not_fit(pair):
    a, b = pair
    a.send(b.handle, bytes(VMCI_MAX_DG_PAYLOAD_SIZE))
    with pytest.raises(errors.NoResources):
        a.send(b.handle, bytes(VMCI_MAX_DG_PAYLOAD_SIZE))


def test_contexts_exchange_and_sources_carry_the_senders_context(make_runtime):
    host, guest = make_runtime(cid=2), make_runtime(cid=3)
    with DatagramEndpoint(runtime=host) as server, DatagramEndpoint(runtime=guest) as client:
        assert client.handle.context == 3
        client.send(server.handle, b"query")
        query = server.recv(timeout=5)
        assert query.src == client.handle
        server.send(query.src, b"answer")
        assert client.recv(timeout=5) == Datagram(server.handle, b"answer")
        assert server.last_peer.pid == os.getpid() and server.last_peer.uid == os.getuid()


def test_unknown_destinations(pair):
    a, _ = pair
    with pytest.raises(errors.InvalidResource):
        a.send((2, 9999), b"x")
    with pytest.raises(errors.DstUnreachable):
        a.send((77, 1024), b"x")
    with pytest.raises(errors.DstUnreachable):
        a.send((0, 1), b"x")


@pytest.mark.parametrize("dst", ["2:1024", (2,), (2, 1, 0), (-1, 5), (2**32, 0), (2, 1.5), None, (True, 1)])
def test_bad_destinations(pair, dst):
    with pytest.raises(errors.InvalidArgs):
        pair[0].send(dst, b"x")


@pytest.mark.parametrize("data,length", [(12, None), ("text", None), (b"abc", -1), (b"abc", 4), (b"abc", True),
                                         (b"abc", 1.0)])
def test_bad_payloads_and_lengths(pair, data, length):
    a, b = pair
    with pytest.raises((errors.InvalidArgs, TypeError)):
        a.send(b.handle, data, length)
    assert b.queued_bytes == 0


def test_too_small_buffer_keeps_the_datagram(pair):
    a, b = pair
    a.send(b.handle, b"0123456789")
    small = bytearray(4)
    with pytest.raises(errors.NoMem):
        b.recv_into(small, timeout=5)
    assert b.recv_status(memoryview(small), timeout=0) == (VMCI_ERROR_NO_MEM, None)
    big = bytearray(64)
    assert b.recv_into(big, timeout=5) == (10, a.handle)
    assert bytes(big[:10]) == b"0123456789"


def test_buffers_that_are_not_contiguous_are_invalid_args(pair):
    a, b = pair
    strided = memoryview(bytearray(16))[::2]
    with pytest.raises(errors.InvalidArgs, match="not contiguous"):
        a.send(b.handle, strided)
    with pytest.raises(errors.InvalidArgs, match="not contiguous"):
        a.send(b.handle, strided, 4)
    assert b.queued_bytes == 0
    a.send(b.handle, b"next")
    with pytest.raises(errors.InvalidArgs, match="not contiguous"):
        b.recv_into(strided, timeout=5)
    assert b.recv(timeout=5) == Datagram(a.handle, b"next")


def test_read_only_receive_buffer(pair):
    with pytest.raises(errors.InvalidArgs, match="read-only"):
        pair[1].recv_into(b"immutable", timeout=0)


def test_receive_timeout_is_a_timeout_error(pair):
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        pair[1].recv(timeout=0.2)
    assert time.monotonic() - start >= 0.19


def test_close_wakes_a_blocked_receiver(runtime):
    endpoint = DatagramEndpoint(runtime=runtime)
    result = []
    thread = threading.Thread(target=lambda: result.append(endpoint.recv_status(memoryview(bytearray(8)))))
    thread.start()
    time.sleep(0.2)
    endpoint.close()
    thread.join(5)
    assert not thread.is_alive()
    assert result == [(VMCI_ERROR_NO_MORE_DATAGRAMS, None)]


def test_close_wakes_a_receiver_blocked_on_its_one_sender(pair):
    """After a datagram, the receiver first blocks on that sender's connection alone."""
    sender, endpoint = pair
    assert sender.send_status(endpoint.handle, b"x", 1) == 25
    assert endpoint.recv_status(memoryview(bytearray(8)), timeout=5)[0] == 1
    result = []
    thread = threading.Thread(target=lambda: result.append(endpoint.recv_status(memoryview(bytearray(8)))))
    thread.start()
    time.sleep(0.002)  # most likely on that connection by now (the test holds either way)
    closer = threading.Thread(target=endpoint.close)
    closer.start()
    closer.join(10)
    thread.join(10)
    if thread.is_alive():
        sender.send_status(endpoint.handle, b"x", 1)  # release it, then fail
        thread.join(10)
    assert not closer.is_alive()
    assert result == [(VMCI_ERROR_NO_MORE_DATAGRAMS, None)]


def test_iteration_ends_when_closed(pair):
    a, b = pair
    for word in (b"one", b"two"):
        a.send(b.handle, word)
    seen = []
    for datagram in b:
        seen.append(datagram.payload)
        if len(seen) == 2:
            b.close()
    assert seen == [b"one", b"two"]


def test_callbacks_on_a_receive_thread(pair):
    a, b = pair
    got, done = [], threading.Event()

    def on_datagram(datagram):
        got.append(datagram)
        if len(got) == 3:
            done.set()

    thread = b.on_receive(on_datagram)
    for i in range(3):
        a.send(b.handle, b"%d" % i)
    assert done.wait(5)
    assert [d.payload for d in got] == [b"0", b"1", b"2"]
    with pytest.raises(errors.InvalidArgs):
        b.on_receive(on_datagram)
    b.close()
    thread.join(5)
    assert not thread.is_alive()


def test_a_failing_callback_does_not_stop_receiving(pair, caplog):
    a, b = pair
    got = threading.Event()

    def callback(datagram):
        if datagram.payload == b"boom":
            raise RuntimeError("callback failed")
        got.set()

    b.on_receive(callback)
    a.send(b.handle, b"boom")
    a.send(b.handle, b"fine")
    assert got.wait(5)
    assert "callback failed" in caplog.text


def test_fileno_is_selectable(pair):
    a, b = pair
    assert select.select([b], [], [], 0)[0] == []
    a.send(b.handle, b"ready")
    assert select.select([b], [], [], 5)[0] == [b]
    assert b.recv(timeout=0).payload == b"ready"


def test_operations_on_a_closed_endpoint(pair):
    a, b = pair
    a.close()
    a.close()
    assert a.closed
    with pytest.raises(errors.InvalidArgs, match="closed"):
        a.send(b.handle, b"x")
    with pytest.raises(errors.NoMoreDatagrams):
        a.recv(timeout=0)
    assert a.send_status(b.handle, b"x", 1) == VMCI_ERROR_INVALID_ARGS


def test_a_destroyed_receiver_is_reported_and_a_new_one_is_reached(runtime):
    sender = DatagramEndpoint(runtime=runtime)
    receiver = DatagramEndpoint(6000, runtime=runtime)
    try:
        sender.send(receiver.handle, b"first")
        receiver.close()
        with pytest.raises(errors.InvalidResource):
            sender.send((2, 6000), b"lost")
        receiver = DatagramEndpoint(6000, runtime=runtime)
        sender.send((2, 6000), b"second")
        assert receiver.recv(timeout=5).payload == b"second"
    finally:
        sender.close()
        receiver.close()


def test_one_handle_object_reaches_each_receiver_in_turn(runtime):
    """The send fast path remembers the last destination object: it must follow the link."""
    sender = DatagramEndpoint(runtime=runtime)
    receiver = DatagramEndpoint(6001, runtime=runtime)
    dst = VMCIHandle(2, 6001)
    try:
        for round_ in range(3):
            assert sender.send_status(dst, b"x%d" % round_, 2) == 26
            assert receiver.recv(timeout=5).payload == b"x%d" % round_
            receiver.close()
            assert sender.send_status(dst, b"lost", 4) == VMCI_ERROR_INVALID_RESOURCE
            receiver = DatagramEndpoint(6001, runtime=runtime)
        sender.forget(dst)
        assert sender.send_status(dst, b"yz", 2) == 26
        assert receiver.recv(timeout=5) == (sender.handle, b"yz")
        assert sender.stats.sent == 4
    finally:
        sender.close()
        receiver.close()


def test_pending_datagrams_are_dropped_on_destroy(runtime):
    sender = DatagramEndpoint(runtime=runtime)
    receiver = DatagramEndpoint(6001, runtime=runtime)
    sender.send(receiver.handle, b"pending")
    receiver.close()
    with DatagramEndpoint(6001, runtime=runtime) as fresh, sender:
        with pytest.raises(errors.Timeout):
            fresh.recv(timeout=0.1)


def _raw_link(rundir, name, target):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if name is not None:
        sock.bind(os.path.join(rundir, name))
    sock.connect(os.path.join(rundir, target))
    return sock


def test_a_forged_source_is_dropped_and_counted(runtime, rundir):
    with DatagramEndpoint(runtime=runtime) as victim, DatagramEndpoint(runtime=runtime) as impostor:
        # The kernel says the peer is `impostor`; the frame claims (2, 4242).
        sock = _raw_link(rundir, "c2/%d-2.%d" % (impostor.handle.resource, victim.handle.resource),
                         "c2/%d" % victim.handle.resource)
        sock.send(runtime.core.encode_datagram(2, victim.handle.resource, 2, 4242, b"forged"))
        with pytest.raises(errors.Timeout):
            victim.recv(timeout=0.3)
        assert victim.stats.forged == 1
        sock.close()
        impostor.send(victim.handle, b"genuine")
        assert victim.recv(timeout=5) == Datagram(impostor.handle, b"genuine")


def test_unidentifiable_connections_and_garbage_are_refused(runtime, rundir):
    with DatagramEndpoint(runtime=runtime) as victim, DatagramEndpoint(runtime=runtime) as peer:
        target = "c2/%d" % victim.handle.resource
        anonymous = _raw_link(rundir, None, target)
        anonymous.send(b"who am I")
        outside = _raw_link("/tmp", None, os.path.join(rundir, target))
        garbage = _raw_link(rundir, "c2/%d-2.%d" % (peer.handle.resource, victim.handle.resource), target)
        garbage.send(b"\xff" * 7)
        with pytest.raises(errors.Timeout):
            victim.recv(timeout=0.3)
        assert victim.stats.refused_connections == 2
        assert victim.stats.bad_frames == 1
        for sock in (anonymous, outside, garbage):
            sock.close()
        peer.send(victim.handle, b"still serving")
        assert victim.recv(timeout=5).payload == b"still serving"


@pytest.mark.skipif(not CYTHON_AVAILABLE, reason="the Cython core is not built")
@pytest.mark.parametrize("sender_core,receiver_core", [("cython", "pure"), ("pure", "cython")])
def test_cores_interoperate_between_endpoints(rundir, sender_core, receiver_core):
    tx = Runtime(make_settings(rundir, cid=3), core=sender_core)
    rx = Runtime(make_settings(rundir, cid=2), core=receiver_core)
    with DatagramEndpoint(runtime=tx) as a, DatagramEndpoint(runtime=rx) as b:
        for size in (0, 100, VMCI_MAX_DG_PAYLOAD_SIZE):
            payload = os.urandom(size)
            a.send(b.handle, payload)
            assert b.recv(timeout=5) == Datagram(a.handle, payload)
            b.send(a.handle, payload[::-1])
            assert a.recv(timeout=5) == Datagram(b.handle, payload[::-1])


CHILD = """
import os, sys, time
from vsockcompat.datagram import DatagramEndpoint
ep = DatagramEndpoint(int(sys.argv[1]))
print(ep.handle.resource, flush=True)
for dg in ep:
    ep.send(dg.src, dg.payload.upper())
"""


def test_separate_processes_and_a_killed_peer(runtime, rundir, core):
    child = subprocess.Popen([PYTHON, "-c", CHILD, "7000"], env=child_env(rundir, core.NAME, cid=4),
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "7000"
        with DatagramEndpoint(runtime=runtime) as me:
            me.send((4, 7000), b"ping")
            assert me.recv(timeout=10) == Datagram(VMCIHandle(4, 7000), b"PING")
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            with pytest.raises(errors.InvalidResource):
                me.send((4, 7000), b"anyone?")
        # The dead endpoint's files are reclaimed by the next owner of the id.
        reclaim = Runtime(runtime.settings._replace(cid=4), core=core)
        with DatagramEndpoint(7000, runtime=reclaim) as reborn:
            assert reborn.handle == VMCIHandle(4, 7000)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()


def test_no_descriptor_leaks_over_many_cycles(runtime, fd_guard):
    with DatagramEndpoint(runtime=runtime) as sink:
        for i in range(50):
            with DatagramEndpoint(runtime=runtime) as source:
                source.send(sink.handle, b"x")
                assert sink.recv(timeout=5).src == source.handle
    assert sorted(os.listdir(os.path.join(runtime.settings.rundir, "c2"))) == [".lock", ".next"]


def test_concurrent_senders_never_overfill(runtime):
    with DatagramEndpoint(runtime=runtime) as sink:
        senders = [DatagramEndpoint(runtime=runtime) for _ in range(4)]
        accepted = [0] * 4

        def flood(i):
            while True:
                try:
                    senders[i].send(sink.handle, bytes(1000))
                except errors.NoResources:
                    return
                accepted[i] += 1

        threads = [threading.Thread(target=flood, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sink.queued_bytes == sum(accepted) * 1024 < VMCI_MAX_DATAGRAM_QUEUE_SIZE
        assert sum(1 for _ in range(sum(accepted)) if sink.recv(timeout=5)) == sum(accepted)
        for s in senders:
            s.close()


def test_links_to_departed_endpoints_are_released(runtime, fd_guard):
    with DatagramEndpoint(runtime=runtime) as server:
        proc_fds = []
        for i in range(40):
            with DatagramEndpoint(runtime=runtime) as client:
                client.send(server.handle, b"q")
                query = server.recv(timeout=5)
                server.send(query.src, b"a")
                assert client.recv(timeout=5).payload == b"a"
            proc_fds.append(len(os.listdir("/proc/self/fd")))
        # Each reply opens a link; links to closed clients are pruned, so descriptors stay flat.
        assert proc_fds[-1] <= proc_fds[5] + 3
        assert len(server._links) <= 2


def test_forget_and_the_link_cap(runtime, monkeypatch):
    import vsockcompat.datagram as dgmod
    monkeypatch.setattr(dgmod, "MAX_LINKS", 4)
    sinks = [DatagramEndpoint(runtime=runtime) for _ in range(6)]
    try:
        with DatagramEndpoint(runtime=runtime) as source:
            for sink in sinks:
                source.send(sink.handle, b"x")
            assert len(source._links) == 4
            source.forget(sinks[-1].handle)
            assert sinks[-1].handle not in source._links
            for sink in sinks:
                source.send(sink.handle, b"y")
            for sink in sinks:
                assert [sink.recv(timeout=5).payload for _ in range(2)] == [b"x", b"y"]
    finally:
        for sink in sinks:
            sink.close()


def test_send_keeps_the_transports_reason(runtime, make_runtime):
    with DatagramEndpoint(runtime=runtime) as ep:
        with pytest.raises(errors.DstUnreachable, match="no context 77"):
            ep.send(VMCIHandle(77, 1024), b"x")
        with pytest.raises(errors.InvalidResource, match="no endpoint"):
            ep.send((2, 60000), b"x")
        assert ep.send_status(VMCIHandle(77, 1024), b"x", 1) == errors.DstUnreachable.code
