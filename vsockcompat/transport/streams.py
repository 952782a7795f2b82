"""Links and stream receivers shared by the vsock and hybrid transports.

* the **hello**, the 8 bytes a connector sends first (its resource id, and whether it speaks for
  the well-known context 1): wire format in ``transport/vsock.py``;
* the **pump** of a link: the core sends each datagram, without blocking and all or nothing, on
  one end of an AF_UNIX SEQPACKET pair; a thread forwards each message with a blocking send on
  the real connection (a stream where the frames go back to back, cut in pieces between sibling
  guests: ``pieces.py``, or a hybrid transport's connection);
* the **direct** link of a SEQPACKET connection: the core sends each datagram on the connection
  itself (one ``sendmsg``, on the caller's thread) and seals the link when a send finds it full
  (``Link.seal_when_full``: that send may have cut its message, so the connection is shut
  down for writing and nothing more is sent on it; the sender gets VMCI_ERROR_NO_RESOURCES
  until the receiver has read what came before the cut and closed the connection at its end,
  then a fresh link: FIFO order holds across the seal); a **watch** thread only reads what the
  receiver writes back (verdicts) and sees hang-ups;
* the **stream receiver** (``StreamListener``): a listening stream socket whose connections are
  read by threads that split them into frames and hand each one to the core as a message;
* ``StreamLinks``: the link and account helpers of transports built on these.
"""
import mmap
import os
import select
import socket
import struct
import threading
from typing import Callable, Dict, Optional, Tuple

from ..constants import (
    HELLO_FORMAT,
    HELLO_MAGIC,
    HELLO_TIMEOUT_MS,
    HELLO_WELL_KNOWN_MAGIC,
    UNBOUNDED_ACCOUNT_LIMIT,
    VMADDR_PORT_ANY,
    VMCI_DG_HEADERSIZE,
    VMCI_MAX_DG_PAYLOAD_SIZE,
    VMCI_MAX_DG_SIZE,
)
from ..handles import VMCIHandle
from .base import Link, Peer
from .handover import HandOver
from .pieces import send_all
from .verdicts import LinkVerdict, encode_verdict

# The hello's layout and magics live in ``constants`` (the C header is generated from them).
HELLO = struct.Struct(HELLO_FORMAT)
#: Seconds ``identify`` (or a stream reader) waits for a new connection's hello.
HELLO_TIMEOUT = HELLO_TIMEOUT_MS / 1000
#: The account limit of links and endpoints across kernels: no user-space bound (the kernel's
#: buffers bound the queue; see "Queue accounting" in ``transport/vsock.py``).
UNBOUNDED = UNBOUNDED_ACCOUNT_LIMIT
PUMP_JOIN_TIMEOUT = 5.0
#: Seconds ``disconnect`` lets a link's pump forward what the core already sent.
LINGER = 2.0

_SIZE = struct.Struct("<Q")
_SIZE_OFFSET = VMCI_DG_HEADERSIZE - _SIZE.size


def parse_hello(data: bytes, truncated: bool = False) -> Optional[int]:
    """The sender's resource id from a connection's first message, or None if it is not a hello.

    Only the plain hello ("VSC1"); ``decode_hello`` also reads the well-known one.
    """
    decoded = decode_hello(data, truncated)
    if decoded is None or decoded[0]:
        return None
    return decoded[1]


def decode_hello(data: bytes, truncated: bool = False) -> Optional[Tuple[bool, int]]:
    """``(claims_well_known_context, rid)`` from a hello, or None if ``data`` is not one."""
    if truncated or len(data) != HELLO.size:
        return None
    magic, rid = HELLO.unpack(data)
    if magic not in (HELLO_MAGIC, HELLO_WELL_KNOWN_MAGIC) or rid == VMADDR_PORT_ANY:
        return None
    return magic == HELLO_WELL_KNOWN_MAGIC, rid


def encode_hello(rid: int, well_known: bool = False) -> bytes:
    return HELLO.pack(HELLO_WELL_KNOWN_MAGIC if well_known else HELLO_MAGIC, rid)


def _pump(back: socket.socket, vs: socket.socket, stream: bool = False,
          verdict: Optional[LinkVerdict] = None, piece: Optional[int] = None) -> None:
    """Forward whole messages from a link's AF_UNIX end to its connection ``vs``, blocking.

    ``stream``: ``vs`` is a stream and the messages go back to back, each written in calls of
    at most ``piece`` bytes (None: one call; ``pieces.piece_for``). What the receiver writes
    on ``vs`` is verdicts, which ``verdict`` takes (without one, any event on ``vs`` is a
    hang-up). Ends (closing ``back``, so the core's next send sees EPIPE) when the core closes
    its end, when the receiver hangs up or sends what is not a verdict, or when a send fails.
    ``vs`` is closed by ``disconnect``.
    """
    buf = bytearray(VMCI_MAX_DG_SIZE + 1)
    view = memoryview(buf)
    poller = select.poll()
    poller.register(back, select.POLLIN)
    poller.register(vs, select.POLLIN)
    vs_fd = vs.fileno()
    try:
        while True:
            forward = False
            for fd, _ in poller.poll():
                if fd != vs_fd:
                    forward = True
                elif verdict is None or not verdict.receive(vs):
                    return
            if not forward:
                continue
            n = back.recv_into(buf)
            if n == 0:
                return
            if stream:
                send_all(vs, view[:n], piece)
            elif vs.send(view[:n]) != n:  # blocking SEQPACKET: whole message or an error
                return
    except (OSError, ValueError):  # ValueError: the link's page was released under a stuck pump
        return
    finally:
        if verdict is not None:
            verdict.ended = True
        view.release()
        back.close()


_WATCH_END = select.POLLHUP | select.POLLERR | select.POLLNVAL


def _watch(vs: socket.socket, verdict: LinkVerdict) -> None:
    """Read the verdicts the receiver writes on a direct link's connection ``vs`` into ``verdict``.

    Ends, setting ``verdict.ended``, when the receiver hangs up (the core's next send then fails
    and the endpoint replaces the link) or ``disconnect`` shuts ``vs`` down; bytes that are not
    verdicts end the link: ``vs`` is shut down, so the core's next send fails likewise.
    """
    poller = select.poll()
    poller.register(vs, select.POLLIN)
    try:
        while True:
            events = 0
            for _, revents in poller.poll():
                events |= revents
            if not verdict.receive(vs) or events & _WATCH_END:
                break
        if verdict.garbled:
            vs.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError):  # ValueError: the link's page was released under a late watch
        pass
    finally:
        verdict.ended = True


def _recv_exact(sock: socket.socket, view: memoryview) -> int:
    """Fill ``view`` from a stream; the bytes read (short only at the end of the stream)."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            break
        got += n
    return got


def read_stream_hello(sock: socket.socket, timeout: float) -> Optional[Tuple[bool, int]]:
    """Read and decode the 8-byte hello at the start of a stream within ``timeout`` seconds."""
    buf = bytearray(HELLO.size)
    sock.settimeout(timeout)
    try:
        n = _recv_exact(sock, memoryview(buf))
    except OSError:  # socket.timeout included
        return None
    finally:
        sock.settimeout(None)
    return decode_hello(bytes(buf[:n]))


def _deframe(sock: socket.socket, out: socket.socket) -> None:
    """Split the stream ``sock`` into frames, each sent as one message on ``out``, until either ends.

    A frame announcing more than the maximum payload, or cut by the end of the stream, is sent
    as what was read of it (the core drops it as a bad frame), and ends the stream.
    """
    buf = bytearray(VMCI_MAX_DG_SIZE)
    view = memoryview(buf)
    try:
        while True:
            got = _recv_exact(sock, view[:VMCI_DG_HEADERSIZE])
            if got == 0:
                return
            if got < VMCI_DG_HEADERSIZE:
                out.send(view[:got])
                return
            size = _SIZE.unpack_from(buf, _SIZE_OFFSET)[0]
            if size > VMCI_MAX_DG_PAYLOAD_SIZE:
                out.send(view[:VMCI_DG_HEADERSIZE])
                return
            end = VMCI_DG_HEADERSIZE + size
            got = VMCI_DG_HEADERSIZE + _recv_exact(sock, view[VMCI_DG_HEADERSIZE:end])
            out.send(view[:got])  # blocking: a full pair holds the stream back (flow control)
            if got < end:
                return
    except OSError:
        return
    finally:
        view.release()


class StreamListener(HandOver):
    """The listener of a stream-mode endpoint, as the core and the endpoint use it.

    Wraps one listening stream socket (AF_VSOCK or AF_UNIX), or several that make one endpoint
    (the hybrid transport's guest and host paths). A thread accepts their connections; each gets
    a reader thread that reads the hello, asks ``identify(sock, hello)`` for the sender (a
    ``Peer``; None refuses it) and then forwards its frames as messages on an AF_UNIX SEQPACKET
    pair. ``fileno()`` is readable while such pairs wait; ``accept()`` returns the next
    one's core end as ``(sock, None)`` (``BlockingIOError`` when none waits), and ``peer(sock)``
    the identity found for it (None: refused).
    """

    def __init__(self, listener,
                 identify: Callable[[socket.socket, Tuple[bool, int]], Optional[Peer]],
                 name: str):
        HandOver.__init__(self)
        self._listeners = tuple(listener) if isinstance(listener, (tuple, list)) else (listener,)
        self._identify = identify
        self._name = name
        self._streams: Dict[socket.socket, socket.socket] = {}  # handed-over core end -> its connection
        self._readers: Dict[threading.Thread, tuple] = {}
        for sock in self._listeners:
            sock.setblocking(False)
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name="vsockcompat-%s-accept" % name)
        self._acceptor.start()

    def tell(self, front, denied: bool) -> bool:
        """Write a verdict on the connection behind the handed-over ``front`` (never blocking;
        a sender that leaves its buffer full misses it). False if ``front`` is not ours."""
        with self._lock:
            conn = self._streams.get(front)
            if conn is None:
                return False
            try:
                conn.send(encode_verdict(denied), socket.MSG_DONTWAIT)
            except OSError:
                pass
            return True

    def _accept_loop(self) -> None:
        poller = select.poll()
        by_fd = {sock.fileno(): sock for sock in self._listeners}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = [fd for fd, _ in poller.poll()]
            if self._stop_r in ready:
                return
            for fd in ready:
                try:
                    conn, _ = by_fd[fd].accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    return
                if not self._start_reader(conn):
                    return

    def _start_reader(self, conn: socket.socket) -> bool:
        """Read ``conn`` on a thread of its own; False (``conn`` closed) once the listener closed."""
        conn.setblocking(True)
        reader = threading.Thread(target=self._read, args=(conn,), daemon=True,
                                  name="vsockcompat-%s-read" % self._name)
        with self._lock:
            if self._closed:
                conn.close()
                return False
            self._readers[reader] = (conn, None)
        reader.start()
        return True

    def _read(self, conn: socket.socket) -> None:
        me = threading.current_thread()
        front = back = handed = None
        try:
            hello = read_stream_hello(conn, HELLO_TIMEOUT)
            peer = self._identify(conn, hello) if hello is not None else None
            front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            with self._lock:
                if self._closed:
                    return
                self._readers[me] = (conn, back)
                self._streams[front] = conn
                handed = front
                self._hand_over(front, peer)
                front = None  # the endpoint owns it now
            if peer is not None:
                _deframe(conn, back)
        except OSError:
            pass
        finally:
            with self._lock:
                self._readers.pop(me, None)
                self._streams.pop(handed, None)
            for sock in (front, back, conn):
                if sock is not None:
                    sock.close()

    def close(self) -> None:
        """Stop accepting, end every reader, close what the endpoint was not handed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            readers = dict(self._readers)
            queued = self._take_waiting()
            self._streams.clear()
        os.write(self._stop_w, b"\0")
        self._acceptor.join(PUMP_JOIN_TIMEOUT)
        for sock in self._listeners:
            sock.close()
        for conn, back in readers.values():
            for sock in (conn, back):
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked on either
                    except OSError:
                        pass
        for reader in readers:
            reader.join(PUMP_JOIN_TIMEOUT)
        for front in queued:
            front.close()
        self.close_pipes()


class StreamLinks:
    """What the vsock and hybrid transports share: pumped and direct links, accounts, peers."""

    _core = None
    _pumps: Dict[int, tuple]
    _lock: threading.Lock

    def _start_link(self, vs: socket.socket, src: VMCIHandle, dst: VMCIHandle, stream: bool,
                    piece: Optional[int] = None) -> Link:
        """Wrap the connected ``vs`` (hello sent) in a link: the core sends on an AF_UNIX pair.

        ``piece``: a stream link's bytes per ``send()`` (``pieces.piece_for``; None: whole)."""
        try:
            front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        except BaseException:
            vs.close()
            raise
        try:
            front.setblocking(False)
            account, page = self._private_account()
            verdict = LinkVerdict(page, stream)
            pump = threading.Thread(target=_pump, args=(back, vs, stream, verdict, piece), daemon=True,
                                    name="vsockcompat-%s-link-%d-%d.%d" % (self.name, src.resource, *dst))
            pump.start()
        except BaseException:
            for sock in (front, back, vs):
                sock.close()
            raise
        with self._lock:
            self._pumps[id(front)] = (vs, pump)
        return Link(front, account, page, verdict)

    def _start_direct_link(self, vs: socket.socket, src: VMCIHandle, dst: VMCIHandle) -> Link:
        """Wrap the connected SEQPACKET ``vs`` (hello sent) in a direct link: the core sends on
        ``vs`` itself (sealing when full) and a watch thread reads the receiver's verdicts."""
        try:
            account, page = self._private_account()
        except BaseException:
            vs.close()
            raise
        try:
            verdict = LinkVerdict(page, False)
            watch = threading.Thread(target=_watch, args=(vs, verdict), daemon=True,
                                     name="vsockcompat-%s-watch-%d-%d.%d" % (self.name, src.resource, *dst))
            watch.start()
        except BaseException:
            vs.close()
            self._release(account, page)
            raise
        with self._lock:
            self._pumps[id(vs)] = (vs, watch)
        return Link(vs, account, page, verdict, direct=True)

    def disconnect(self, src: VMCIHandle, link: Link) -> None:
        """Close a link: a pumped one once its pump forwarded what was sent (at most ``LINGER``
        seconds); a direct one at once (what the core sent is in the kernel already)."""
        with self._lock:
            vs, pump = self._pumps.pop(id(link.sock))
        if vs is not link.sock:
            link.sock.close()  # the pump forwards what is queued, then sees the end
            pump.join(LINGER)
        try:
            vs.shutdown(socket.SHUT_RDWR)  # wakes a pump still blocked in send, or the watch
        except OSError:
            pass
        pump.join(PUMP_JOIN_TIMEOUT)
        vs.close()
        # Not unmapped here: another thread may be about to send on the core's link, which
        # holds the account (its page goes with the last holder); closed, it sends nothing.
        link.account.mark_closed()

    def _stream_peer(self, conn) -> Optional[Peer]:
        """The identity a StreamListener found for a connection it handed over (None: refused)."""
        for bound_listener in self._stream_listeners():
            peer = bound_listener.peer(conn)
            if peer is not None:
                return peer
        return None

    def _stream_listeners(self):
        return ()

    def tell(self, conn, denied: bool) -> None:
        """Write a verdict to the sender of ``conn``, which a StreamListener handed over."""
        for bound_listener in self._stream_listeners():
            if bound_listener.tell(conn, denied):
                return

    def _private_account(self):
        page = mmap.mmap(-1, self._core.ACCOUNT_SIZE)
        try:
            account = self._core.Account(-1, page)
            account.initialise(UNBOUNDED)
        except BaseException:
            page.close()
            raise
        return account, page

    @staticmethod
    def _release(account, page) -> None:
        account.release_memory()
        page.close()


__all__ = ["StreamListener", "StreamLinks", "decode_hello", "encode_hello", "parse_hello",
           "read_stream_hello", "HELLO", "HELLO_MAGIC", "HELLO_WELL_KNOWN_MAGIC", "HELLO_TIMEOUT",
           "LINGER", "PUMP_JOIN_TIMEOUT", "UNBOUNDED"]
