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
from typing import List, NamedTuple, Optional

HEADER = struct.Struct("<IBBHQI")
MAGIC = 0x4D435356
MAX_PAYLOAD = 1 << 20

# Both protocols
HELLO, SIZE, REFUSE, BYE = 1, 2, 3, 4
# Mirrored regions
QUERY, UPDATE, FLUSH, FLUSHED, ACK = 5, 6, 7, 8, 12
# Streamed queue pairs
WELCOME, DATA, CREDIT, WANT = 9, 10, 11, 13
TYPES = frozenset(range(1, 14))


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
    """Accumulates received bytes and returns the whole frames among them."""

    def __init__(self):
        self._buf = bytearray()
        self._error: Optional[str] = None

    def feed(self, data) -> List[Frame]:
        """Frames completed by ``data`` (their payloads are read-only views of the received
        bytes: no copy). At a bad header: ``ProtocolError`` if no good frame came before it in
        this call, else those frames, and ``failed`` is set (the next ``feed`` or ``finish``
        raises)."""
        if self._error is not None:
            raise ProtocolError(self._error)
        src = memoryview(bytes(self._buf) + bytes(data) if self._buf else data)
        if src.format != "B" or src.ndim != 1:
            src = src.cast("B")
        frames = []
        pos, size = 0, len(src)
        while size - pos >= HEADER.size:
            magic, ftype, flags, reserved, arg, length = HEADER.unpack_from(src, pos)
            if magic != MAGIC or ftype not in TYPES or flags or reserved or length > MAX_PAYLOAD:
                self._error = "bad frame header %s" % bytes(src[pos:pos + HEADER.size]).hex()
                if not frames:
                    raise ProtocolError(self._error)
                break
            end = pos + HEADER.size + length
            if end > size:
                break
            frames.append(Frame(ftype, arg, src[pos + HEADER.size:end]))
            pos = end
        self._buf = bytearray(src[pos:])
        return frames

    @property
    def failed(self) -> bool:
        """Whether a bad header follows the frames already returned."""
        return self._error is not None

    def finish(self) -> None:
        """At end of stream: ``ProtocolError`` if a frame was cut short or a bad header came."""
        if self._error is not None:
            raise ProtocolError(self._error)
        if self._buf:
            raise ProtocolError("stream ended inside a frame (%d bytes left)" % len(self._buf))

    @property
    def pending(self) -> int:
        return len(self._buf)
