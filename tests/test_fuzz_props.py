"""Property tests of every decoder that reads a peer's bytes: both cores agree on every input.

- datagram frames: any bytes a peer can write on the socket give the same status,
  fields, payload bytes and queue account on the Cython and the pure core;
- discovery requests and replies: decoding raises only MalformedMessage, and
  what decodes re-encodes to something that decodes the same;
- queue-pair headers: any index values a peer can write into shared memory give
  the same codes on both cores and never touch memory outside the queues;
- the discovery server survives any sequence of payloads and still answers.
"""
import mmap
import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CYTHON_AVAILABLE
from vsockcompat import constants as C
from vsockcompat import ds_client
from vsockcompat._backend import load_core
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.ds_protocol import (MalformedMessage, decode_reply, decode_request, encode_reply,
                                     encode_request)
from vsockcompat.ds_server import DiscoveryServer
from vsockcompat.handles import VMCI_DS_HANDLE

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not CYTHON_AVAILABLE, reason="differential properties need both cores"),
]

CORES = [load_core("cython"), load_core("pure")] if CYTHON_AVAILABLE else []
assert not CORES or all(getattr(CORES[0], n) == getattr(CORES[1], n) for n in ("AGAIN", "PEER_GONE", "BAD_FRAME"))
PROPS = settings(max_examples=300, deadline=None)

u32 = st.integers(0, 0xFFFFFFFF)


def _header(dc, dr, sc, sr, size):
    return struct.pack("<IIIIQ", dc, dr, sc, sr, size)


# Frames as a peer could write them: random bytes, and headers with random (often consistent) sizes.
frames = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda h, body, extra: _header(*h, (len(body) + extra) % 2**64) + body,
              st.tuples(u32, u32, u32, u32), st.binary(max_size=300), st.sampled_from([0, 0, 0, 1, -1, 2**40])
              ).filter(lambda f: len(f) > 0),
    st.builds(lambda h, size, body: _header(*h, size) + body,
              st.tuples(u32, u32, u32, u32), st.integers(0, 2**64 - 1), st.binary(max_size=64)),
)


def _account(core):
    page = mmap.mmap(-1, core.ACCOUNT_SIZE)
    account = core.Account(-1, page)
    account.initialise(C.VMCI_MAX_DATAGRAM_QUEUE_SIZE)
    return account, page


def _recv_one(core, frame, buf_len, spill_len):
    account, page = _account(core)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        b.send(frame)
        if not frame:
            b.close()  # an empty record reads as end of stream: same as a peer hanging up
        buf, spill = bytearray(b"\xaa" * buf_len), bytearray(b"\x55" * spill_len)
        status, fields = core.recv_datagram(a, account, buf, spill)
        again = core.recv_datagram(a, account, bytearray(8), bytearray(8))[0]
        return status, fields, bytes(buf), bytes(spill), account.queued(), again
    finally:
        a.close()
        b.close()
        account.release_memory()
        page.close()


@PROPS
@given(frame=frames, buf_len=st.integers(0, 400), spill_len=st.integers(0, 400))
def test_both_cores_decode_frames_alike(frame, buf_len, spill_len):
    c, py = [_recv_one(core, frame, buf_len, spill_len) for core in CORES]
    assert c == py, frame
    status = py[0]
    if status >= 0:
        assert status == len(frame) and py[1] == struct.unpack_from("<IIIIQ", frame)
        payload = frame[24:]
        assert (py[2] + py[3])[:len(payload)] == payload
    elif frame:
        assert status == CORES[1].BAD_FRAME


@PROPS
@given(frame=st.binary(max_size=64))
def test_both_cores_decode_headers_alike(frame):
    outcomes = []
    for core in CORES:
        try:
            outcomes.append(core.decode_header(frame))
        except ValueError:
            outcomes.append("ValueError")
    assert outcomes[0] == outcomes[1]
    assert (outcomes[0] == "ValueError") == (len(frame) < 24)


# Discovery codec

def _decodes(decoder, payload, msgid_end):
    try:
        return decoder(payload)
    except MalformedMessage as exc:
        assert isinstance(exc.reason, str) and exc.reason
        # The msgid is reported exactly when the payload carries one (bytes msgid_end-4..msgid_end).
        assert (exc.msgid is not None) == (len(payload) >= msgid_end)
        if exc.msgid is not None:
            assert exc.msgid == struct.unpack_from("<i", payload, msgid_end - 4)[0]
        return None


requests = st.one_of(
    st.binary(max_size=400),
    st.builds(lambda a, m, h, n, body: struct.pack("<iiIIi", a, m, *h, n) + body,
              st.integers(-2**31, 2**31 - 1), st.integers(-2**31, 2**31 - 1), st.tuples(u32, u32),
              st.integers(-2**31, 2**31 - 1) | st.integers(0, 310), st.binary(max_size=320)),
)


@PROPS
@given(payload=requests)
def test_decode_request_raises_only_malformed(payload):
    req = _decodes(decode_request, payload, 8)
    if req is not None:
        again = decode_request(encode_request(req.action, req.msgid, req.handle, req.name))
        assert again == req


replies = st.one_of(
    st.binary(max_size=400),
    st.builds(lambda m, c, h, n, body: struct.pack("<iiIIi", m, c, *h, n) + body,
              st.integers(-2**31, 2**31 - 1), st.integers(-2**31, 2**31 - 1), st.tuples(u32, u32),
              st.integers(-2**31, 2**31 - 1) | st.integers(0, 300), st.binary(max_size=320)),
)


@PROPS
@given(payload=replies)
def test_decode_reply_raises_only_malformed(payload):
    reply = _decodes(decode_reply, payload, 4)
    if reply is not None and len(reply.msg) <= 275:
        assert decode_reply(encode_reply(reply.msgid, reply.code, reply.handle, reply.msg)) == reply


# Queue-pair headers

_PAGE = 4096
_GUARD = 4096
_CANARY = 0xA5


class _Queues:
    """Two queues in one anonymous mapping, each followed by a guard area of canary bytes."""

    def __init__(self, core, produce, consume):
        self.sizes = (produce, consume)
        self.qlen = [_PAGE + produce, _PAGE + consume]
        self.offs = [0, self._round(self.qlen[0] + _GUARD)]
        total = self.offs[1] + self._round(self.qlen[1] + _GUARD)
        self.mm = mmap.mmap(-1, total)
        self.mm.write(bytes([_CANARY]) * total)
        view = memoryview(self.mm)
        self.views = [view[o:o + n] for o, n in zip(self.offs, self.qlen)]
        self.ring = core.Ring(self.views[0], self.views[1], produce, consume)
        self.ring.initialise(2, 1024)
        view.release()

    @staticmethod
    def _round(n):
        return -(-n // 8) * 8

    def set_indexes(self, words):
        # Header words 1 (producerTail) and 2 (consumerHead) of both queues, as a peer could write them.
        for q, (tail, head) in enumerate(words):
            struct.pack_into("<QQ", self.mm, self.offs[q] + 8, tail, head)

    def guards_intact(self):
        return all(self.mm[o + n:o + n + _GUARD] == bytes([_CANARY]) * _GUARD
                   for o, n in zip(self.offs, self.qlen))

    def close(self):
        self.ring.release_memory()
        for v in self.views:
            v.release()
        self.mm.close()


def _ring_ops(ring, data, n):
    out = []
    for name in ("produce_free_space", "produce_buf_ready", "consume_buf_ready", "consume_free_space"):
        out.append(getattr(ring, name)())
    out.append(ring.enqueue(data))
    out.append(ring.enqueue_many([data[:3], data]))
    out.append(ring.peek(n))
    buf = bytearray(n)
    out.append((ring.dequeue_into(buf), bytes(buf)))
    out.append(ring.dequeue(n))
    out.append((ring.produce_indexes(), ring.consume_indexes()))
    return out


index = st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1), st.sampled_from([2**63, 2**64 - 1, 2**62]))


@PROPS
@given(produce=st.sampled_from([0, 1, 2, 64, 100, 4096]), consume=st.sampled_from([0, 1, 3, 64, 100, 4096]),
       words=st.tuples(st.tuples(index, index), st.tuples(index, index)),
       data=st.binary(max_size=200), n=st.integers(0, 300))
def test_queue_indexes_stay_in_bounds_and_cores_agree(produce, consume, words, data, n):
    results, memories = [], []
    for core in CORES:
        q = _Queues(core, produce, consume)
        try:
            q.set_indexes(words)
            results.append(_ring_ops(q.ring, data, n))
            assert q.guards_intact(), "a ring op wrote outside its queue"
            memories.append(bytes(q.mm))
        finally:
            q.close()
    assert results[0] == results[1]
    assert memories[0] == memories[1], "the cores left the shared memory differently"
    for code in results[0][:4]:
        assert code >= 0 or code == C.VMCI_ERROR_INVALID_SIZE


# The discovery server under random payloads

@pytest.fixture
def live_server(make_runtime):
    srv = DiscoveryServer(make_runtime(cid=1), tick=0.05)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.stop()
    thread.join(5)
    assert not thread.is_alive()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payloads=st.lists(requests | st.just(b"") | st.tuples(
    st.integers(1001, C.VMCI_MAX_DG_PAYLOAD_SIZE), st.binary(min_size=1, max_size=32)).map(
    lambda t: (t[1] * (t[0] // len(t[1]) + 1))[:t[0]]), max_size=8))
def test_server_survives_random_requests(live_server, make_runtime, payloads):
    client = make_runtime(ds_autostart=False)
    with DatagramEndpoint(runtime=client) as ep:
        for payload in payloads:
            rc = ep.send_status(VMCI_DS_HANDLE, payload, len(payload))
            assert rc == len(payload) + 24 or rc == C.VMCI_ERROR_NO_RESOURCES
    assert ds_client.lookup_status("vmci public group", client, timeout=10) == (C.VMCI_SUCCESS, (2, 1023))
    with DatagramEndpoint(runtime=client) as svc:
        assert ds_client.register_status("after-fuzz", svc.handle, client) in (C.VMCI_SUCCESS,
                                                                              C.VMCI_ERROR_ALREADY_EXISTS)
        assert ds_client.lookup_status("after-fuzz", client)[0] == C.VMCI_SUCCESS
        assert ds_client.unregister_status("after-fuzz", client) in (C.VMCI_SUCCESS, C.VMCI_ERROR_NOT_FOUND)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=16), st.booleans())
def test_the_vsock_hello_decoder_accepts_exactly_well_formed_hellos(data, truncated):
    from vsockcompat.transport.vsock import HELLO_MAGIC, parse_hello
    rid = parse_hello(data, truncated)
    well_formed = (not truncated and len(data) == 8 and int.from_bytes(data[:4], "little") == HELLO_MAGIC
                   and int.from_bytes(data[4:], "little") != 0xFFFFFFFF)
    assert rid == (int.from_bytes(data[4:], "little") if well_formed else None)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFFFFFFFE))
def test_the_vsock_hello_round_trips(rid):
    from vsockcompat.transport.vsock import HELLO, HELLO_MAGIC, parse_hello
    assert parse_hello(HELLO.pack(HELLO_MAGIC, rid)) == rid
