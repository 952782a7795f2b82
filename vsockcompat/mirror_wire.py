"""The frames of the mirror streams (mirrored regions and streamed queue pairs).

Each frame is a 20-byte header then ``length`` payload bytes::

    offset 0   u32 LE  magic 0x4D435356 (the bytes "VSCM")
    offset 4   u8      type (one of ``TYPES``)
    offset 5   u8      0 (reserved)
    offset 6   u16 LE  0 (reserved)
    offset 8   u64 LE  arg: an offset, a size, a sequence number or a byte count, per type
    offset 16  u32 LE  length of the payload, at most ``MAX_PAYLOAD``

``FrameReader`` cuts a byte stream into frames and raises ``ProtocolError`` at the first
header that is not one (wrong magic, unknown type, reserved bits set, oversized payload)
and, at end of stream, for a frame cut short. What a type's ``arg`` and payload mean is
the business of the protocol using it (``mirror``, ``qp_stream``).
"""
import struct
from typing import List, NamedTuple, Optional, Tuple

from . import constants as _c

HEADER = struct.Struct(_c.MIRROR_HEADER_FORMAT)
MAGIC = _c.MIRROR_MAGIC
MAX_PAYLOAD = _c.MIRROR_MAX_PAYLOAD

# Both protocols
HELLO, SIZE, REFUSE, BYE = _c.MIRROR_HELLO, _c.MIRROR_SIZE, _c.MIRROR_REFUSE, _c.MIRROR_BYE
# Mirrored regions
QUERY, UPDATE, FLUSH, FLUSHED, ACK = (_c.MIRROR_QUERY, _c.MIRROR_UPDATE, _c.MIRROR_FLUSH,
                                      _c.MIRROR_FLUSHED, _c.MIRROR_ACK)
# Streamed queue pairs
WELCOME, DATA, CREDIT, WANT = _c.MIRROR_WELCOME, _c.MIRROR_DATA, _c.MIRROR_CREDIT, _c.MIRROR_WANT
TYPES = frozenset(range(1, 14))

# What a core's ``QueueStream`` (the data path of a streamed queue pair) reports: ``pull``'s
# news and ``state`` bits (the first five are the cores' QS_* names), and two bits of its own.
QS_DATA = 1       # payload arrived
QS_CREDIT = 2     # the peer returned credit
QS_GONE = 4       # the peer detached, died or was cut off
QS_BAD = 8        # ... for a frame that is not one of this protocol
QS_BUSY = 16      # pull: a thread waiting in the core reads the stream itself
QS_EOF = 32       # nothing more is read from the stream
QS_DETACHED = 64  # this end detached
#: The names of a ``QueueStream``'s ``counts``: system calls made, frames sent.
QS_COUNTS = ("sendmsg", "recvmsg", "DATA", "CREDIT", "WANT")
#: Stream bytes a ``QueueStream`` read takes beyond the next frame's header (its default
#: ``read_ahead``): the start of the next payload, or many small frames, in the same read.
QS_READ_AHEAD = 16384


class ProtocolError(Exception):
    """A peer sent something that is not a frame of this protocol."""


class Frame(NamedTuple):
    type: int
    arg: int
    payload: memoryview  # read-only, of the received bytes


def encode(ftype: int, arg: int = 0, payload=b"") -> bytes:
    """One frame; ``payload`` is any bytes-like object of at most ``MAX_PAYLOAD`` bytes."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("a frame carries at most %d bytes" % MAX_PAYLOAD)
    return HEADER.pack(MAGIC, ftype, 0, 0, arg, len(payload)) + bytes(payload)


def encode_code(ftype: int, code: int) -> bytes:
    """A frame whose arg is a (negative) VMCI code, stored as two's complement."""
    return encode(ftype, code & 0xFFFFFFFFFFFFFFFF)


def decode_code(arg: int) -> int:
    return arg - (1 << 64) if arg >= 1 << 63 else arg


class FrameReader:
    """Accumulates received bytes and returns the whole frames among them. Frames of the types
    in ``pieces`` are returned as their bytes arrive instead: one ``Frame`` per piece of the
    payload, each with the frame's type and arg (for byte streams, where a frame's boundary
    means nothing to the receiver: no payload is then gathered or copied)."""

    def __init__(self, pieces=frozenset()):
        self._pieces = frozenset(pieces)
        self._buf = bytearray()  # a frame begun in an earlier call: its header, or the whole frame's room
        self._have = 0           # bytes of it received
        self._piece: Optional[Tuple[int, int]] = None  # (type, arg) of a frame returned in pieces
        self._left = 0           # ... its payload bytes still to come
        self._error: Optional[str] = None

    def _header(self, src, pos: int) -> Optional[Tuple[int, int, int]]:
        """``(type, arg, length)`` of the header at ``pos``, or None (and ``_error`` set) if it is not one."""
        magic, ftype, flags, reserved, arg, length = HEADER.unpack_from(src, pos)
        if magic != MAGIC or ftype not in TYPES or flags or reserved or length > MAX_PAYLOAD:
            self._error = "bad frame header %s" % bytes(src[pos:pos + HEADER.size]).hex()
            return None
        return ftype, arg, length

    def feed(self, data) -> List[Frame]:
        """Frames completed by ``data`` (their payloads are read-only views of the received
        bytes: no copy, except for a frame split across calls, which is gathered once unless
        its type is one of ``pieces``). At a bad header: ``ProtocolError`` if no good frame
        came before it in this call, else those frames, and ``failed`` is set (the next
        ``feed`` or ``finish`` raises)."""
        if self._error is not None:
            raise ProtocolError(self._error)
        src = memoryview(data)
        if src.format != "B" or src.ndim != 1:
            src = src.cast("B")
        frames: List[Frame] = []
        pos, size = 0, len(src)
        if self._have:
            pos = self._resume(src)
            if pos < 0:
                raise ProtocolError(self._error)
            if self._have:
                return frames
            if self._buf:
                _, ftype, _, _, arg, _ = HEADER.unpack_from(self._buf)
                frames.append(Frame(ftype, arg, memoryview(self._buf).toreadonly()[HEADER.size:]))
                self._buf = bytearray()
        if self._left:
            take = min(self._left, size - pos)
            if take:
                frames.append(Frame(self._piece[0], self._piece[1], src[pos:pos + take]))
            self._left -= take
            pos += take
            if self._left:
                return frames
        while size - pos >= HEADER.size:
            header = self._header(src, pos)
            if header is None:
                if not frames:
                    raise ProtocolError(self._error)
                return frames
            ftype, arg, length = header
            start, end = pos + HEADER.size, pos + HEADER.size + length
            if end > size:
                if ftype not in self._pieces:
                    break
                if start < size:
                    frames.append(Frame(ftype, arg, src[start:size]))
                self._piece, self._left = (ftype, arg), end - size
                return frames
            frames.append(Frame(ftype, arg, src[start:end]))
            pos = end
        if pos < size:
            self._start(src[pos:])
        return frames

    def _start(self, tail) -> None:
        """Keep the beginning of a frame: in a buffer of the whole frame's size once its header is in."""
        self._have = len(tail)
        if len(tail) >= HEADER.size:
            self._buf = bytearray(HEADER.size + HEADER.unpack_from(tail)[5])
            self._buf[:len(tail)] = tail
        else:
            self._buf = bytearray(tail)

    def _resume(self, src) -> int:
        """Continue the kept frame from ``src``: how much of ``src`` it took, or -1 at a bad header."""
        pos = 0
        if self._have < HEADER.size:
            pos = min(HEADER.size - self._have, len(src))
            self._buf += src[:pos]
            self._have += pos
            if self._have < HEADER.size:
                return pos
            header = self._header(self._buf, 0)
            if header is None:
                return -1
            if header[0] in self._pieces:
                self._piece, self._left = header[:2], header[2]
                self._have, self._buf = 0, bytearray()
                return pos
            self._buf += bytes(header[2])
        take = min(len(self._buf) - self._have, len(src) - pos)
        self._buf[self._have:self._have + take] = src[pos:pos + take]
        self._have += take
        if self._have == len(self._buf):
            self._have = 0
        return pos + take

    @property
    def failed(self) -> bool:
        """Whether a bad header follows the frames already returned."""
        return self._error is not None

    def finish(self) -> None:
        """At end of stream: ``ProtocolError`` if a frame was cut short or a bad header came."""
        if self._error is not None:
            raise ProtocolError(self._error)
        if self._have or self._left:
            raise ProtocolError("stream ended inside a frame (%d bytes in, %d to come)" % (self._have, self._left))

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame received, or (pieces) still to come."""
        return self._have + self._left
