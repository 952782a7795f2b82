"""Direct links (``transport/streams.py``): the core sends on the connection itself and seals
the link when it is full; a watch thread reads the receiver's verdicts and sees hang-ups.

AF_UNIX SEQPACKET sockets stand in for the AF_VSOCK SEQPACKET connection (no AF_VSOCK here):
socketpairs for one link, and for whole endpoints a local transport whose links are direct
(``_DirectLocal``). Their non-blocking sends are all or nothing, so the cut message itself is
only seen in the guest (``tests/real_vsock/test_direct_vsock.py``); what is checked here is the
rest of the contract: after the first ``EAGAIN`` the link is shut down for writing and nothing
more reaches the wire; the sender is refused (NO_RESOURCES) until the receiver has read
everything sent before the seal and closed the connection at its end; only then does the
endpoint open a fresh link, so datagrams keep their order across the seal.
"""
import contextlib
import os
import socket
import struct
import threading
import time

import pytest

from vsockcompat.constants import (
    VMCI_DG_HEADERSIZE,
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_NO_RESOURCES,
    VMCI_PRIV_DG_SEND,
)
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.errors import InvalidResource, NoAccess, NoResources, Timeout
from vsockcompat.handles import VMCIHandle
from vsockcompat.transport.local import LocalTransport
from vsockcompat.transport.streams import StreamLinks
from vsockcompat.transport.verdicts import encode_verdict

WAIT = 10.0
SRC, DST = VMCIHandle(3, 1025), VMCIHandle(3, 1024)
PAYLOAD = 1000
_SEQ = struct.Struct("<II")  # (sender thread, sequence number) at the start of a test payload


class _Links(StreamLinks):
    """The link half of a transport, as the vsock transport has it in SEQPACKET mode."""

    name = "test"

    def __init__(self, core):
        self._core = core
        self._lock = threading.Lock()
        self._pumps = {}


@pytest.fixture
def rig(core):
    """``(core, links, link, sender, receiver)``: a direct link over a socketpair, its sealing
    core sender, and the receiving end (small buffers, so it fills after a few frames)."""
    vs, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    vs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    receiver.settimeout(WAIT)
    links = _Links(core)
    link = links._start_direct_link(vs, SRC, DST)
    assert link.direct and link.sock is vs
    sender = core.Link(link.sock, link.account, *DST, *SRC)
    sender.seal_when_full()
    link.verdict.watch(sender)
    yield core, links, link, sender, receiver
    sender.close()
    links.disconnect(SRC, link)
    receiver.close()


def _until(condition, what):
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _fill(sender, payload=b"x" * PAYLOAD):
    """Send until the link refuses; the number of frames sent."""
    sent = 0
    while True:
        rc = sender.send(payload, len(payload))
        if rc < 0:
            assert rc == VMCI_ERROR_NO_RESOURCES
            return sent
        assert rc == VMCI_DG_HEADERSIZE + len(payload)
        sent += 1
        assert sent < 100000, "the socket never filled"


def _drain(receiver) -> list:
    """The frames waiting on ``receiver``, read without waiting; the end of the stream (the
    sender shut its side down) is returned as a final ``b""``."""
    frames = []
    receiver.setblocking(False)
    try:
        while True:
            frames.append(receiver.recv(70000))
            if not frames[-1]:
                return frames
    except BlockingIOError:
        return frames
    finally:
        receiver.settimeout(WAIT)


def test_a_full_link_seals_and_refuses_until_the_receiver_closed_it(rig):
    core, _, link, sender, receiver = rig
    sent = _fill(sender)
    assert sent > 0 and sender.sealed
    assert sender.send(b"y", 1) == VMCI_ERROR_NO_RESOURCES  # no room: refused at once
    frames = _drain(receiver)  # what came before the seal, then the end: the link is shut
    assert frames[-1] == b"" and len(frames) == sent + 1
    assert all(len(f) == VMCI_DG_HEADERSIZE + PAYLOAD for f in frames[:-1])
    for _ in range(3):  # drained, but still open at the receiver: refused, nothing sent
        assert sender.send(b"z", 1) == VMCI_ERROR_NO_RESOURCES
    assert receiver.recv(100) == b""
    receiver.close()  # the receiver closes at the end: the endpoint may replace the link
    _until(lambda: sender.send(b"z", 1) == core.STALE, "the sender never saw the receiver close")
    _until(lambda: link.verdict.ended, "the watch never saw the hang-up")
    assert sender.sealed


def test_a_sealed_link_whose_receiver_never_reads_stays_refused(rig):
    _, _, link, sender, receiver = rig
    _fill(sender)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        assert sender.send(b"q", 1) == VMCI_ERROR_NO_RESOURCES
    assert not link.verdict.ended
    frames = _drain(receiver)
    assert frames[-1] == b"" and b"q" not in [f[VMCI_DG_HEADERSIZE:] for f in frames]


def test_without_sealing_a_full_link_refuses_then_sends_again(core):
    """The behaviour of pumped and local links is unchanged: EAGAIN refuses only that send."""
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    front.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    links = _Links(core)
    account, page = links._private_account()
    sender = core.Link(front, account, *DST, *SRC)
    try:
        sent = _fill(sender)
        assert not sender.sealed
        back.recv(70000)
        assert sender.send(b"y", 1) == VMCI_DG_HEADERSIZE + 1
        assert len(_drain(back)) == sent
    finally:
        sender.close()
        front.close()
        back.close()
        links._release(account, page)


def test_concurrent_senders_keep_their_order_and_nothing_follows_the_seal(rig):
    core, _, _, sender, receiver = rig
    counts = [0] * 4

    def send(me):
        seq = 0
        while True:
            payload = _SEQ.pack(me, seq) + b"p" * 200
            rc = sender.send(payload, len(payload))
            if rc < 0:
                assert rc == VMCI_ERROR_NO_RESOURCES
                counts[me] = seq
                return
            seq += 1

    threads = [threading.Thread(target=send, args=(me,)) for me in range(len(counts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert sender.sealed
    frames = _drain(receiver)
    assert frames[-1] == b"" and len(frames) == sum(counts) + 1
    seen = [[] for _ in counts]
    for frame in frames[:-1]:
        me, seq = _SEQ.unpack_from(frame, VMCI_DG_HEADERSIZE)
        seen[me].append(seq)
    assert seen == [list(range(n)) for n in counts]
    assert sender.send(b"late", 4) == VMCI_ERROR_NO_RESOURCES
    receiver.close()
    _until(lambda: sender.send(b"late", 4) == core.STALE, "the sender never saw the receiver close")


def test_the_watch_takes_a_denial_and_its_lifting(rig):
    core, _, link, sender, receiver = rig
    receiver.send(encode_verdict(True))
    _until(lambda: link.verdict.denied, "the watch never took the denial")
    assert sender.send(b"a", 1) == core.STALE  # the endpoint then reads the verdict: NO_ACCESS
    assert link.verdict.watch(sender) is True
    receiver.send(encode_verdict(False))
    _until(lambda: not link.verdict.denied, "the watch never took the lifting")
    assert link.verdict.watch(sender) is False
    assert sender.send(b"b", 1) == VMCI_DG_HEADERSIZE + 1
    assert receiver.recv(100)[VMCI_DG_HEADERSIZE:] == b"b"
    assert not link.verdict.ended


def test_a_receiver_gone_ends_the_watch_and_the_sends(rig):
    core, links, link, sender, receiver = rig
    receiver.close()
    _until(lambda: link.verdict.ended, "the watch never saw the hang-up")
    assert sender.send(b"a", 1) == core.PEER_GONE
    assert not link.verdict.garbled


def test_garbage_from_the_receiver_ends_the_link(rig):
    core, _, link, sender, receiver = rig
    receiver.send(b"VSV1 but not a verdict")
    _until(lambda: link.verdict.ended, "the watch never ended")
    assert link.verdict.garbled
    assert sender.send(b"a", 1) == core.PEER_GONE  # shut down: the endpoint replaces the link


def test_disconnect_ends_the_watch_and_keeps_what_was_sent(core):
    vs, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    receiver.settimeout(WAIT)
    links = _Links(core)
    link = links._start_direct_link(vs, SRC, DST)
    sender = core.Link(link.sock, link.account, *DST, *SRC)
    sender.seal_when_full()
    watch = links._pumps[id(vs)][1]
    try:
        assert sender.send(b"last words", 10) == VMCI_DG_HEADERSIZE + 10
        sender.close()
        links.disconnect(SRC, link)
        assert not watch.is_alive() and link.verdict.ended and vs.fileno() == -1
        assert id(vs) not in links._pumps
        assert receiver.recv(100)[VMCI_DG_HEADERSIZE:] == b"last words"
        assert receiver.recv(100) == b""
    finally:
        receiver.close()


def test_a_sealing_link_refuses_bad_input_before_and_after_the_seal(rig):
    _, _, _, sender, receiver = rig
    for _ in range(2):
        assert sender.send(b"abc", 4) == VMCI_ERROR_INVALID_ARGS
        assert sender.send(b"abc", -1) == VMCI_ERROR_INVALID_ARGS
        with pytest.raises(TypeError):
            sender.send(None, 1)
        if not sender.sealed:
            _fill(sender)
    assert sender.sealed
    frames = _drain(receiver)
    assert frames[-1] == b"" and all(len(f) == VMCI_DG_HEADERSIZE + PAYLOAD for f in frames[:-1])


# ------------------------------------------------------------------ whole endpoints


class _DirectLocal(StreamLinks, LocalTransport):
    """The local transport with direct links, as the vsock transport has them in SEQPACKET
    mode: the core sends on the AF_UNIX connection itself (a small send buffer, so it fills),
    with a private account and a watch thread; receivers write verdicts back on it."""

    features = LocalTransport.features | {"verdicts"}

    def __init__(self, rundir, cid, core):
        LocalTransport.__init__(self, rundir, cid, core)
        self._lock = threading.Lock()
        self._pumps = {}

    def connect(self, src, dst):
        link = LocalTransport.connect(self, src, dst)
        self._unmap(link.account, link.page)  # the receiver's account: a direct link has its own
        link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return self._start_direct_link(link.sock, src, dst)

    def disconnect(self, src, link):
        name = link.sock.getsockname()
        StreamLinks.disconnect(self, src, link)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)  # the name LocalTransport.connect bound

    def tell(self, conn, denied):
        try:
            conn.send(encode_verdict(denied), socket.MSG_DONTWAIT)
        except OSError:
            pass


@pytest.fixture
def endpoints(core, make_runtime):
    """``(a, b)``: two endpoints of one runtime whose links are direct."""
    rt = make_runtime(ds_autostart=False)
    rt._transport = _DirectLocal(rt.settings.rundir, rt.settings.cid, core)
    a, b = DatagramEndpoint(runtime=rt), DatagramEndpoint(runtime=rt)
    yield a, b
    a.close()
    b.close()


def _numbered(seq, size=PAYLOAD):
    return _SEQ.pack(0, seq) + bytes(size - _SEQ.size)


def test_endpoint_links_are_direct_and_seal(endpoints):
    a, b = endpoints
    a.send(b.handle, b"hello")
    assert b.recv(timeout=WAIT).payload == b"hello"
    state = a._links[b.handle]
    assert state.link.direct and state.link.sock.type == socket.SOCK_SEQPACKET
    assert any(t.name.startswith("vsockcompat-local-watch-") for t in threading.enumerate())


def test_refused_until_the_receiver_drained_then_in_order_on_a_fresh_link(endpoints):
    """A numbered sequence across a seal: refused ones never arrive, accepted ones arrive once
    each, in order, and the fresh link opens only once the receiver closed the sealed one."""
    a, b = endpoints
    accepted, refused = [], []
    seq = 0

    def send_next():
        nonlocal seq
        try:
            a.send(b.handle, _numbered(seq))
            accepted.append(seq)
        except NoResources:
            refused.append(seq)
        seq += 1

    while not refused:
        send_next()
        assert seq < 10000, "the link never filled"
    sealed = a._links[b.handle].sender
    assert sealed.sealed
    for _ in range(3):  # the receiver reads nothing: still refused
        send_next()
    got = [_SEQ.unpack_from(b.recv(timeout=WAIT).payload)[1] for _ in accepted]
    assert got == accepted
    send_next()  # all read, but the receiver has not yet read the end: still refused
    assert refused[-1] == seq - 1 and a._links[b.handle].sender is sealed
    with pytest.raises(Timeout):  # b reads the end and closes the sealed connection
        b.recv(timeout=0.3)
    _until(lambda: a._links[b.handle].link.verdict.ended, "the watch never saw b close")
    send_next()  # a fresh link
    assert accepted[-1] == seq - 1 and a._links[b.handle].sender is not sealed
    assert _SEQ.unpack_from(b.recv(timeout=WAIT).payload)[1] == seq - 1
    with pytest.raises(Timeout):
        b.recv(timeout=0.3)  # and nothing else: no refused datagram ever arrives
    assert len(refused) == 5 and not set(refused) & set(accepted)


def _receive(endpoint, count, out, start):
    start.wait(WAIT)
    for _ in range(count):
        out.append(endpoint.recv(timeout=WAIT).payload)


def test_senders_that_retry_keep_fifo_across_many_seals(endpoints):
    """Threads sending numbered sequences, each retrying a refused datagram until accepted,
    while the receiver reads: every datagram arrives once, each sender's in order."""
    a, b = endpoints
    senders, count = 3, 300
    seals = set()
    got = []
    refused = threading.Event()  # the link fills (and seals) first, however fast the reader is
    reader = threading.Thread(target=_receive, args=(b, senders * count, got, refused))
    reader.start()

    def send(me):
        for seq in range(count):
            payload = _SEQ.pack(me, seq) + bytes(600)
            deadline = time.monotonic() + WAIT
            while True:
                try:
                    a.send(b.handle, payload)
                    break
                except NoResources:
                    state = a._links.get(b.handle)
                    if state is not None and state.sender.sealed:
                        seals.add(id(state.sender))
                    refused.set()
                    assert time.monotonic() < deadline, "refused for %s s" % WAIT
                    time.sleep(0.001)

    threads = [threading.Thread(target=send, args=(me,)) for me in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 10)
    reader.join(WAIT)
    assert not reader.is_alive() and len(got) == senders * count
    seen = [[] for _ in range(senders)]
    for payload in got:
        me, seq = _SEQ.unpack_from(payload)
        seen[me].append(seq)
    assert seen == [list(range(count))] * senders
    assert seals, "the link never sealed: the test proved nothing"


def test_a_denied_sender_learns_it_on_a_direct_link(endpoints):
    a, b = endpoints
    a.send(b.handle, b"allowed")
    assert b.recv(timeout=WAIT).payload == b"allowed"
    b._runtime.access.change(b.handle, lambda acl: acl.add(a.handle, [], [VMCI_PRIV_DG_SEND]))
    link = a._links[b.handle].link
    _until(lambda: link.verdict.denied, "the watch never took the denial")
    with pytest.raises(NoAccess):
        a.send(b.handle, b"denied")
    assert a._links[b.handle].link is link  # the same link, told, not replaced
    b._runtime.access.change(b.handle, lambda acl: acl.remove_all(a.handle))
    _until(lambda: not link.verdict.denied, "the watch never took the lifting")
    a.send(b.handle, b"again")
    assert b.recv(timeout=WAIT).payload == b"again"


@pytest.mark.parametrize("sealed", [False, True], ids=["open", "sealed"])
def test_a_receiver_gone_gives_invalid_resource(endpoints, sealed):
    a, b = endpoints
    a.send(b.handle, b"first")
    if sealed:
        with pytest.raises(NoResources):
            while True:
                a.send(b.handle, _numbered(0))
    dst = b.handle
    b.close()
    link = a._links[dst].link
    _until(lambda: link.verdict.ended, "the watch never saw b go")
    with pytest.raises(InvalidResource):
        a.send(dst, b"late")
