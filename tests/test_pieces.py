"""Stream writes cut in pieces between sibling guests (``vsockcompat/transport/pieces.py``).

Host-safe: no AF_VSOCK socket is created. A vsock connection is played by an AF_UNIX socket
that says it is one (``FakeVsock``); where the pieces must be seen, the socket underneath is
SEQPACKET, so each ``send()`` arrives as one message whose size the test reads. The real
guest <-> guest runs are in ``tests/cross_vm/test_cross_guests.py``.
"""
import mmap
import socket
import struct
import threading

import pytest

from conftest import make_settings

from vsockcompat import mirror, mirror_link
from vsockcompat.constants import (AF_VSOCK, DG_HEADER_FORMAT, VMADDR_CID_ANY, VMCI_DG_HEADERSIZE,
                                   VMCI_MAX_DG_PAYLOAD_SIZE)
from vsockcompat.handles import VMCIHandle
from vsockcompat.mirror import MirroredRegion
from vsockcompat.queuepair import QueuePair
from vsockcompat.runtime import Runtime
from vsockcompat.transport import pieces, streams
from vsockcompat.transport import vsock as vsock_module
from vsockcompat.transport.pieces import SIBLING_PIECE, piece_between, piece_for, send_all

pytestmark = pytest.mark.timeout(90)
WAIT = 20.0
FRAME = struct.Struct(DG_HEADER_FORMAT)


class FakeVsock(socket.socket):
    """An AF_UNIX socket that reports itself as a connected AF_VSOCK stream to ``peer``."""

    def __init__(self, sock, peer=(4, 1024)):
        super().__init__(sock.family, sock.type, fileno=sock.detach())
        self.peer = peer
        self.connected_to = None

    @property
    def family(self):
        return AF_VSOCK

    @property
    def type(self):
        return socket.SOCK_STREAM

    def getpeername(self):
        return self.peer

    def connect(self, address):
        self.connected_to = address


def seqpacket_pair():
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def read_messages(sock, total):
    """The messages on ``sock`` until ``total`` bytes came."""
    sock.settimeout(WAIT)
    got, messages = 0, []
    while got < total:
        messages.append(sock.recv(1 << 17))
        assert messages[-1], "the stream ended after %d of %d bytes" % (got, total)
        got += len(messages[-1])
    return messages


def collect(sock, total):
    """Read ``read_messages(sock, total)`` on a thread (a writer may block until it is read)."""
    out = []
    thread = threading.Thread(target=lambda: out.extend(read_messages(sock, total)), daemon=True)
    thread.start()
    return thread, out


# The decision

@pytest.mark.parametrize("local, peer, expected", [
    (3, 4, SIBLING_PIECE), (4, 3, SIBLING_PIECE), (3, 0xFFFFFFFE, SIBLING_PIECE),
    (3, 3, None),                    # one guest's own kernel
    (2, 3, None), (3, 2, None),      # the host: the daemon's Unix sockets, no receive buffer limit
    (1, 3, None), (3, 1, None),      # loopback
    (VMADDR_CID_ANY, 4, None), (3, VMADDR_CID_ANY, None), (0, 4, None),
])
def test_a_piece_only_between_two_distinct_guests(local, peer, expected):
    assert piece_between(local, peer) == expected


def test_the_piece_fits_a_guest_receive_buffer():
    assert SIBLING_PIECE <= 3500      # the largest write measured to cross vhost-device-vsock 0.3.0


def test_piece_for_reads_the_socket():
    a, b = seqpacket_pair()
    sibling = FakeVsock(a, peer=(4, 5000))
    try:
        assert piece_for(sibling, 3) == SIBLING_PIECE
        assert piece_for(sibling, 4) is None
        sibling.peer = (2, 5000)
        assert piece_for(sibling, 3) is None
        assert piece_for(b, 3) is None            # AF_UNIX: never cut
    finally:
        sibling.close()
        b.close()


def test_piece_for_a_seqpacket_or_unconnected_vsock_socket_is_none():
    class Seqpacket(FakeVsock):
        type = property(lambda self: socket.SOCK_SEQPACKET)

    class Unconnected(FakeVsock):
        def getpeername(self):
            raise OSError(107, "Transport endpoint is not connected")

    for kind in (Seqpacket, Unconnected):
        a, b = seqpacket_pair()
        sock = kind(a)
        try:
            assert piece_for(sock, 3) is None
        finally:
            sock.close()
            b.close()


def test_write_piece_uses_the_runtime_cid(core, rundir):
    a, b = seqpacket_pair()
    sibling = FakeVsock(a, peer=(4, 5000))
    try:
        guest = Runtime(make_settings(rundir, cid=3), core=core)
        host = Runtime(make_settings(rundir, cid=2), core=core)
        assert mirror_link.write_piece(guest, sibling) == SIBLING_PIECE
        assert mirror_link.write_piece(host, sibling) is None
        assert mirror_link.write_piece(guest, b) is None
    finally:
        sibling.close()
        b.close()


# The writes

@pytest.mark.parametrize("size", [0, 1, 2047, 2048, 2049, 3 * 2048, VMCI_MAX_DG_PAYLOAD_SIZE + 24])
@pytest.mark.parametrize("piece", [SIBLING_PIECE, 1000, None])
def test_send_all_cuts_at_the_piece(size, piece):
    data = bytes(i % 251 for i in range(size))
    a, b = seqpacket_pair()
    with a, b:
        reader, messages = collect(b, size)
        send_all(a, data, piece)
        reader.join(WAIT)
        assert b"".join(messages) == data
        if piece is None:
            assert len(messages) == (1 if size else 0)
        else:
            assert all(0 < len(m) <= piece for m in messages)
            assert len(messages) == -(-size // piece)


def test_send_all_takes_any_buffer():
    a, b = seqpacket_pair()
    with a, b:
        send_all(a, memoryview(struct.pack("<4I", 1, 2, 3, 4)).cast("I"), 5)
        assert read_messages(b, 16) == [struct.pack("<4I", 1, 2, 3, 4)[i:i + 5] for i in range(0, 16, 5)]


# The datagram pump of a vsock link (both cores produce the frames)

@pytest.mark.parametrize("piece", [SIBLING_PIECE, None])
def test_the_pump_forwards_a_maximum_datagram_in_pieces(core, piece):
    page = mmap.mmap(-1, core.ACCOUNT_SIZE)
    account = core.Account(-1, page)
    account.initialise(1 << 62)
    front, back = seqpacket_pair()
    front.setblocking(False)
    vs, receiver = seqpacket_pair()
    pump = threading.Thread(target=streams._pump, args=(back, vs, True, None, piece), daemon=True)
    pump.start()
    sender = core.Link(front, account, 4, 2000, 3, 1024)
    payload = bytes(i % 253 for i in range(VMCI_MAX_DG_PAYLOAD_SIZE))
    try:
        for _ in range(2):
            assert sender.send(payload, len(payload)) == VMCI_DG_HEADERSIZE + len(payload)
            messages = read_messages(receiver, VMCI_DG_HEADERSIZE + len(payload))
            wire = b"".join(messages)
            assert FRAME.unpack_from(wire) == (4, 2000, 3, 1024, len(payload))
            assert wire[VMCI_DG_HEADERSIZE:] == payload
            if piece is None:
                assert len(messages) == 1
            else:
                assert max(map(len, messages)) == piece and len(messages) == -(-len(wire) // piece)
    finally:
        sender.close()
        front.close()
        pump.join(WAIT)
        assert not pump.is_alive()
        for sock in (vs, receiver):
            sock.close()
        account.release_memory()
        page.close()


def test_a_vsock_link_to_a_sibling_guest_is_cut(core, monkeypatch):
    """VsockTransport.connect decides the piece from its kernel CID and the peer's."""
    ends = []

    def fake_socket(kind=socket.SOCK_SEQPACKET):
        a, b = seqpacket_pair()
        ends.append(b)
        return FakeVsock(a, peer=(4, 2000))

    monkeypatch.setattr(vsock_module, "_vsock_socket", fake_socket)
    transport = vsock_module.VsockTransport(core, cid=3, mode="stream")
    while ends:                                      # choose_mode's probe
        ends.pop().close()
    src, dst = VMCIHandle(3, 1024), VMCIHandle(4, 2000)
    link = transport.connect(src, dst)
    receiver = ends[-1]
    try:
        assert read_messages(receiver, 8) == [vsock_module.encode_hello(1024)]
        frame = FRAME.pack(4, 2000, 3, 1024, 10000) + b"x" * 10000
        link.sock.send(frame)
        messages = read_messages(receiver, len(frame))
        assert b"".join(messages) == frame and max(map(len, messages)) == SIBLING_PIECE
    finally:
        transport.disconnect(src, link)
        for sock in ends:
            sock.close()


# Queue pairs and mirrored regions (mirrored mode on the local transport, with a piece forced)

PIECE = 1000


@pytest.fixture
def spied(monkeypatch):
    """Forces ``PIECE`` on every mirror stream and records the size of every send() made with it."""
    sizes = []

    class Spy:
        def __init__(self, sock):
            self._sock = sock

        def sendall(self, data):
            sizes.append(len(data))
            return self._sock.sendall(data)

        def sendmsg(self, parts):
            sizes.append(sum(len(p) for p in parts))
            return self._sock.sendmsg(parts)

    monkeypatch.setattr(mirror_link, "write_piece", lambda runtime, sock: PIECE)
    monkeypatch.setattr(mirror, "send_all", lambda sock, data, piece=None:
                        pieces.send_all(Spy(sock), data, piece))
    return sizes


@pytest.fixture
def two_mirrored(core, rundir):
    def make(cid):
        return Runtime(make_settings(rundir, cid=cid)._replace(shm_mode="mirrored"), core=core)
    return make(2), make(3)


def test_a_queue_pair_stream_write_goes_in_pieces_both_ways(two_mirrored, spied):
    total = 40000
    a = QueuePair.alloc(None, 65536, 65536, runtime=two_mirrored[0])
    b = QueuePair.alloc(a.handle, 65536, 65536, runtime=two_mirrored[1])
    try:
        for writer, reader, seed in ((a, b, 1), (b, a, 2)):
            data = bytes((i * seed) % 256 for i in range(total))
            del spied[:]
            assert writer.enqueue(data) == total
            got = bytearray()
            while len(got) < total:
                reader.wait_for_data(WAIT)
                got += reader.dequeue(total - len(got))
            assert bytes(got) == data
        # The core cuts the DATA frames (tests/test_qstream.py::test_max_send_bounds_each_send):
        # here, that both ends hand it the piece.
        assert a._qs.max_send == PIECE and b._qs.max_send == PIECE
    finally:
        b.detach()
        a.detach()


def test_a_mirrored_region_update_goes_in_pieces(two_mirrored, spied):
    size = 64 * 1024
    with MirroredRegion.create(size, runtime=two_mirrored[0]) as creator, \
            MirroredRegion.attach(creator.handle, runtime=two_mirrored[1]) as attacher:
        for writer, reader, seed in ((creator, attacher, 3), (attacher, creator, 5)):
            data = bytes((i * seed) % 256 for i in range(size))
            del spied[:]
            writer.buffer[:] = data
            writer.sync(WAIT)
            reader.sync(WAIT)
            assert bytes(reader.buffer) == data
            assert spied and max(spied) <= PIECE and sum(spied) >= size
