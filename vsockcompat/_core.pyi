"""The backend contract: what the Cython core (_cvsc) and the pure core (_pure) both provide.

Only the data plane lives here; everything else is written once in pure modules.
Status codes: a non-negative frame size (header included), a negative VMCI
error code, or one of the core's own statuses below (all <= -2001, below the VMCI range).
"""
import socket
from typing import Any, Callable, Optional, Tuple, Union


Buffer = Union[bytes, bytearray, memoryview]
WritableBuffer = Union[bytearray, memoryview]

NAME: str  # "cython" or "pure"
AGAIN: int
PEER_GONE: int
BAD_FRAME: int
FORGED: int
ACCEPT: int
WAKE: int
DENIED: int  # Receiver.take: a frame from a denied connection was read and dropped
STALE: int  # Link.send: the receiver's ACL epoch changed since watch_acl; nothing was sent
ACCOUNT_SIZE: int
ACCOUNT_MAGIC: int
ACCOUNT_VERSION: int

HeaderFields = Tuple[int, int, int, int, int]

def encode_header(
    dst_context: int, dst_resource: int, src_context: int, src_resource: int, payload_size: int
) -> bytes: ...
def decode_header(frame: Buffer) -> HeaderFields: ...
def encode_datagram(
    dst_context: int, dst_resource: int, src_context: int, src_resource: int, payload: Buffer
) -> bytes: ...

class Account:
    fd: int
    def __init__(self, fd: int, page: WritableBuffer) -> None: ...
    def initialise(self, limit: int) -> None: ...
    def is_valid(self) -> bool: ...
    def mark_closed(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def limit(self) -> int: ...
    def queued(self) -> int: ...
    def release_memory(self) -> None: ...

def send_datagram(
    sock: socket.socket,
    account: Account,
    dst_context: int,
    dst_resource: int,
    src_context: int,
    src_resource: int,
    payload: Buffer,
    length: int,
) -> int: ...
def recv_datagram(
    sock: socket.socket, account: Account, buf: WritableBuffer, spill: WritableBuffer
) -> Tuple[int, Optional[HeaderFields]]: ...

class Link:
    def __init__(
        self,
        sock: socket.socket,
        account: Account,
        dst_context: int,
        dst_resource: int,
        src_context: int,
        src_resource: int,
    ) -> None: ...
    def watch_acl(self) -> None:
        """Read the receiver's ACL epoch word; from then on ``send`` returns STALE (sending
        nothing) once the word differs."""
    def seal_when_full(self) -> None:
        """From now on a send that meets ``EAGAIN`` (or ``ENOMEM``) seals the link: it fails,
        the socket is shut down for writing and nothing more is sent on it; a sealed link's
        ``send`` returns VMCI_ERROR_NO_RESOURCES until the receiver hangs up (it read all that
        came before the seal, then the end), STALE from then on."""
    @property
    def sealed(self) -> bool: ...
    def send(self, payload: Buffer, length: int) -> int: ...
    def close(self) -> None: ...

class Receiver:
    """One receiving thread at a time (the endpoint's receive lock)."""

    last_fd: int
    def __init__(
        self, listener: socket.socket, wake_fd: int, account: Account, self_context: int, self_resource: int
    ) -> None: ...
    def fileno(self) -> int:
        """Readable while ``recv``/``take`` can make progress, frames read ahead included."""
    def add(self, sock: socket.socket, src_context: int, src_resource: int, tag: object = None) -> None:
        """Serve ``sock`` (its sender as the kernel says); ``take`` returns ``tag`` with its datagrams."""
    def remove(self, fd: int) -> None: ...
    def deny(self, fd: int, denied: bool) -> None:
        """Whether ``take`` drops (DENIED) what the served connection ``fd`` sends."""
    def watch_acl(self, recheck: Callable[[], None]) -> None:
        """Read the account's ACL epoch word; from then on ``take`` calls ``recheck()`` before
        delivering a frame once the word changed (read again first) or ``acl_changed`` was called."""
    def acl_changed(self) -> None: ...
    def recv(self, buf: WritableBuffer, spill: WritableBuffer, timeout: Optional[float]) -> int:
        """One frame: its size (``last_fd`` names the connection), AGAIN on timeout, ACCEPT,
        WAKE, or PEER_GONE / BAD_FRAME / FORGED / a VMCI code for the connection ``last_fd``."""
    def take(
        self, buf: WritableBuffer, spill: WritableBuffer, timeout: Optional[float]
    ) -> Tuple[int, object]:
        """One datagram for delivery: ``(payload_length, tag)`` (the payload is in ``buf`` and,
        past its end, in ``spill``), or ``(status, None)``: DENIED (``buf`` zeroed where the
        dropped payload was) or a status of ``recv``."""
    def close(self) -> None: ...

class Fastpath:
    """One endpoint's per-datagram calls, each one call into the core: what
    ``DatagramEndpoint.send_status`` / ``recv_status`` are, and the SDK's
    ``VMCIDatagram_SendTo`` / ``VMCIDatagram_RecvFrom`` make.

    Whatever is not the common case goes to the endpoint's ``send_slow`` and
    ``recv_slow``, which the Fastpath calls with the arguments it was given.
    The counters and the attributes below are the endpoint's state; the
    endpoint's slow paths read and write them.
    """

    recv_lock: Any  # like threading.Lock: recv_status and recv_slow run holding it
    closing: bool  # once True: send_status gives INVALID_ARGS, recv_status NO_MORE_DATAGRAMS
    held: Optional[object]  # a datagram recv_slow keeps for the next receive (None: none)
    last_peer: object  # the tag of the last datagram delivered
    sent: int  # datagrams sent
    received: int  # datagrams delivered
    def __init__(
        self,
        receiver: Receiver,
        spill: WritableBuffer,
        send_slow: Callable[[Any, Buffer, int, Optional[Link]], int],
        recv_slow: Callable[[WritableBuffer, Optional[float], Optional[int], object], Tuple[int, Any]],
    ) -> None:
        """Receive with ``receiver.take`` (``spill`` as its spill buffer): every tag given to
        ``receiver.add`` has a ``handle``, the source ``recv_status`` returns."""
    def add_link(self, dst: Any, link: Link) -> None:
        """Send to ``dst`` (a hashable destination) on ``link`` from now on."""
    def drop_link(self, dst: Any) -> None: ...
    def clear_links(self) -> None: ...
    def send_status(self, dst: Any, buf: Buffer, length: int) -> int:
        """``link.send(buf, length)`` on the link of ``dst``: the frame size, or a VMCI code
        (INVALID_ARGS once ``closing``). With no link for ``dst``, or when the link returns
        one of the core's statuses (PEER_GONE, STALE), ``send_slow(dst, buf, length, link or
        None)`` instead. Counts ``sent``."""
    def recv_status(self, buf: WritableBuffer, timeout: Optional[float] = None) -> Tuple[int, Any]:
        """Under ``recv_lock``: ``(NO_MORE_DATAGRAMS, None)`` once ``closing``;
        ``recv_slow(buf, timeout, None, None)`` if something is ``held`` or a ``timeout`` is
        given; else ``receiver.take(buf, spill, None)``: a datagram that fits in ``buf`` gives
        ``(payload_length, tag.handle)`` (``last_peer`` = tag, counts ``received``), anything
        else ``recv_slow(buf, None, status, tag)``."""

# Queue-pair rings (vmci-sdk.md sections 3.4 and 11.2; layout in src/vsc_ring.h).
# A queue is a 4096-byte header page (VMCIQueueHeader at offset 0: handle,
# producerTail, consumerHead; a private u64 of waiting bits at offset 64)
# followed by its data area; a queue of size S holds at most S - 1 bytes.
QP_PAGE_SIZE: int  # 4096: header page, and offset of the data area in a queue
QP_MAX_RING_SIZE: int  # sizes must be below this (2**62)
QP_WAITING_READ: int  # waiting bit: the owner sleeps until its consume queue has data
QP_WAITING_WRITE: int  # waiting bit: the owner sleeps until its produce queue has space

class Ring:
    """One endpoint's view of a queue pair over two writable, 8-byte aligned buffers.

    ``produce_q`` (this end writes) and ``consume_q`` (the peer writes) each hold
    a header page plus their size; the peer builds its Ring with the two swapped.
    Every index read from shared memory is validated: an index >= its queue's
    size gives VMCI_ERROR_INVALID_SIZE and nothing is copied. A zero-size queue
    has no space and no data. Results are counts (>= 0) or negative VMCI codes.
    Bad sizes or buffers raise TypeError, OverflowError, ValueError or BufferError.
    Not thread-safe: one producer and one consumer per end.
    """

    produce_size: int
    consume_size: int
    def __init__(self, produce_q: WritableBuffer, consume_q: WritableBuffer,
                 produce_size: int, consume_size: int) -> None: ...
    def initialise(self, context: int, resource: int) -> None:
        """Fresh headers in both queues: the handle, indexes 0, nobody waiting (creator only)."""
    def produce_free_space(self) -> int: ...
    def produce_buf_ready(self) -> int: ...
    def consume_buf_ready(self) -> int: ...
    def consume_free_space(self) -> int: ...
    def enqueue(self, buf: Buffer) -> int:
        """Write min(len, free) bytes; the count, or QUEUEPAIR_NOSPACE when free == 0."""
    def enqueue_many(self, bufs: "list[Buffer]") -> int:
        """Write whole buffers in order while each fits, publishing the tail once.

        The number written (0 for an empty list), QUEUEPAIR_NOSPACE if the first does not fit.
        """
    def dequeue_into(self, buf: WritableBuffer) -> int:
        """Read min(len, ready) bytes; the count, or QUEUEPAIR_NODATA when ready == 0."""
    def peek_into(self, buf: WritableBuffer) -> int: ...
    def dequeue(self, n: int) -> "bytes | int":
        """min(n, ready) bytes, or a negative code (QUEUEPAIR_NODATA, INVALID_SIZE)."""
    def peek(self, n: int) -> "bytes | int": ...
    def peek_view(self, n: int) -> "memoryview | int":
        """Zero copy: a read-only view of up to n ready bytes at the head, in place in the ring.

        The view stops at the wrap point (call again after ``consume`` for the rest);
        QUEUEPAIR_NODATA or INVALID_SIZE instead. Nothing is consumed. Every view
        lent is released by the next successful ``consume`` and by ``release_memory``
        (using it then raises ValueError); a view something else still exports from
        stays mapped but its bytes may be overwritten by the peer.
        """
    def consume(self, n: int) -> int:
        """Advance the head by n after reading views: n, INVALID_ARGS if n > ready (nothing
        consumed), or INVALID_SIZE."""
    def produce_indexes(self) -> Tuple[int, int]:
        """Raw (producerTail, peer's consumerHead) of the produce queue, not validated."""
    def consume_indexes(self) -> Tuple[int, int]:
        """Raw (peer's producerTail, our consumerHead) of the consume queue, not validated."""
    def set_waiting(self, bits: int) -> None:
        """Publish our waiting bits (the word's two low bits; the sleep count above them is
        kept), then a full fence."""
    def peer_waiting(self) -> int:
        """A full fence, then the peer's waiting word: its bits, and its sleep count above them
        (a new value for every sleep, so a waker can ring once per sleep)."""
    def arm_wait(self, bits: int, want: int) -> int:
        """About to sleep: ``set_waiting(bits)`` (QP_WAITING_READ or _WRITE) with one more sleep
        counted, then the count the sleep waits for (bytes ready, or free space). A count >= want
        or a negative code clears the bits again at once (a peer that saw them rings for nobody
        only within this call)."""
    def release_memory(self) -> None: ...

# Streamed queue pairs (qp_stream): one end's data path over a non-blocking stream socket, in
# the frames of mirror_wire (DATA, CREDIT, WANT, BYE after the handshake). Results are counts
# (>= 0), negative VMCI codes or WAKE; the QS_* values are mirror_wire's.
QS_DATA: int  # pull: payload arrived
QS_CREDIT: int  # pull: the peer returned credit
QS_GONE: int  # pull, state: the peer detached, died or was cut off
QS_BAD: int  # state: ... for a frame that is not one of the protocol
QS_BUSY: int  # pull: a thread waiting in wait_data/wait_space reads the stream itself

class QueueStream:
    """Credit flow control as the ring's: ``write`` accepts at most ``produce_size - 1``
    bytes the peer has not credited back; credit goes back per quarter of ``consume_size``
    dequeued, or when the peer asks (WANT). One sendmsg per write (header and payload
    gathered, pieces of at most ``max_send`` bytes if set); a dequeue that finds the ring
    empty reads the socket straight into the caller's buffer. Each read also takes the next
    header and up to ``read_ahead`` bytes after it into the ring, where the frames among
    them are parsed at once (one read: a header with its payload, or many small frames).
    DATA beyond the consume
    queue's room, a CREDIT above what was sent or going backwards, a bad header, any other
    frame, or the stream cut inside a frame sets QS_GONE | QS_BAD and stops the reading.
    Blocking calls sleep in poll(2) on the socket and ``wake_fd`` (readable: return WAKE).
    Thread-safe; ``close`` only once no thread is inside a blocking call.
    """

    max_send: int  # bytes per send call at most (0: unbounded)
    read_ahead: int  # stream bytes a read takes beyond the next header (mirror_wire.QS_READ_AHEAD)
    def __init__(self, sock: socket.socket, wake_fd: int, produce_size: int, consume_size: int,
                 send_timeout: float = 30.0) -> None: ...
    def write(self, buf: Buffer) -> int:
        """What fits of ``buf``: the count, QUEUEPAIR_NOSPACE (WANT sent) or QUEUEPAIR_NOTATTACHED;
        blocks (up to send_timeout, then the peer counts as gone) only while the socket is full.
        When the credit known so far does not cover ``buf``, first reads the stream as ``pull``
        does (the CREDIT already there counts; NOTATTACHED if that finds the peer gone)."""
    def write_many(self, bufs: "list[Buffer]") -> int:
        """Whole buffers while each fits: how many (0 for none), QUEUEPAIR_NOSPACE, NOTATTACHED;
        reads the stream first as ``write`` when the credit known does not cover them all."""
    def ask(self) -> None:
        """Send WANT once until a CREDIT comes."""
    def flush(self, timeout: Optional[float] = None) -> int: ...
    @property
    def pending(self) -> int:
        """Bytes of the stream the socket has not taken yet."""
    def read_into(self, buf: WritableBuffer, consume: bool = True) -> int:
        """Dequeue (or peek) into ``buf``: the count, QUEUEPAIR_NODATA, or QUEUEPAIR_NOTATTACHED
        (detached, or the peer gone and everything read)."""
    def read_bytes(self, n: int, consume: bool = True) -> "bytes | int": ...
    def consume(self, n: int) -> int:
        """Drop ``n`` bytes of the ring: n, INVALID_ARGS if more than it holds, NOTATTACHED."""
    def pull(self) -> int:
        """Read the socket into the ring without waiting: the QS_* news since the last call,
        or QS_BUSY while a thread waits in wait_data/wait_space."""
    def wait_data(self, timeout: Optional[float] = None) -> int:
        """Until data is ready: its count, VMCI_ERROR_TIMEOUT, QUEUEPAIR_NOTATTACHED or WAKE.
        The count includes the payload of a DATA frame whose header has arrived (it comes in
        the same send); the next dequeue waits for those bytes if they are still in flight.
        Several threads may wait on one end (each then rechecks every 10 ms at most)."""
    def wait_space(self, n: int, timeout: Optional[float] = None) -> int:
        """Until ``n`` > 0 bytes are free (asks with WANT): the free count, or a code as wait_data."""
    def bye(self, send: bool = True, timeout: Optional[float] = None) -> int:
        """Detach: later calls return NOTATTACHED; with ``send`` BYE follows the enqueued bytes."""
    def close(self) -> bool: ...
    @property
    def state(self) -> int: ...
    @property
    def ready(self) -> int: ...
    @property
    def unread(self) -> int: ...
    @property
    def free(self) -> int: ...
    @property
    def sent(self) -> int: ...
    @property
    def peer_consumed(self) -> int: ...
    @property
    def counts(self) -> "dict[str, int]":
        """Since creation: ``sendmsg`` and ``recvmsg`` system calls made on the stream (those
        that found it full or empty included), and the ``DATA``, ``CREDIT`` and ``WANT`` frames
        sent (a DATA frame is at most MAX_PAYLOAD bytes of one write). For benchmarks: packets
        and wake-ups per MiB, not timings."""
