"""Pure-Python data-plane core.

Implements the contract of ``_core.pyi`` with the same frame format and the
same queue-account protocol as the C core in ``src/vsc_dgram.c``, so the two
interoperate on one socket and one account page.
"""
import errno
import fcntl
import socket
import struct
import threading

from .constants import (
    DG_HEADER_FORMAT,
    VMCI_DG_HEADERSIZE,
    VMCI_ERROR_GENERIC,
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_NO_MEM,
    VMCI_ERROR_NO_RESOURCES,
    VMCI_MAX_DG_PAYLOAD_SIZE,
)

NAME = "pure"

AGAIN = -2001
PEER_GONE = -2002
BAD_FRAME = -2003

ACCOUNT_SIZE = 4096
ACCOUNT_MAGIC = 0x51435356
ACCOUNT_VERSION = 1
# Word indexes of the account page seen as native 64-bit words.
_W_HEAD, _W_LIMIT, _W_PRODUCED, _W_CONSUMED, _W_CLOSED = 0, 1, 2, 3, 4

_HEADER = struct.Struct(DG_HEADER_FORMAT)
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_EMPTY = b""

_SEND_ERRNO_STATUS = {
    errno.EAGAIN: VMCI_ERROR_NO_RESOURCES,
    errno.ENOBUFS: VMCI_ERROR_NO_RESOURCES,
    errno.EPIPE: PEER_GONE,
    errno.ECONNRESET: PEER_GONE,
    errno.ENOTCONN: PEER_GONE,
    errno.ECONNREFUSED: PEER_GONE,
    errno.ENOMEM: VMCI_ERROR_NO_MEM,
    errno.EMSGSIZE: VMCI_ERROR_INVALID_ARGS,
}


def encode_header(dst_context, dst_resource, src_context, src_resource, payload_size):
    """Return the 24-byte VMCI datagram header; OverflowError for a field out of range."""
    try:
        return _HEADER.pack(dst_context, dst_resource, src_context, src_resource, payload_size)
    except struct.error as exc:
        raise OverflowError(str(exc)) from None


def decode_header(frame):
    """Return ``(dst_context, dst_resource, src_context, src_resource, payload_size)``.

    Raises ValueError if ``frame`` is shorter than a header.
    """
    if len(frame) < VMCI_DG_HEADERSIZE:
        raise ValueError("a datagram header needs %d bytes, got %d" % (VMCI_DG_HEADERSIZE, len(frame)))
    return _HEADER.unpack_from(frame)


def encode_datagram(dst_context, dst_resource, src_context, src_resource, payload):
    """Return header and payload as one frame; OverflowError for a field out of range."""
    payload = bytes(payload)
    return encode_header(dst_context, dst_resource, src_context, src_resource, len(payload)) + payload


class Account:
    """A receiving endpoint's queue account: one shared page, see vsc_dgram.h."""

    __slots__ = ("fd", "_words", "_lock")

    def __init__(self, fd, page):
        view = memoryview(page).cast("B")
        if len(view) < ACCOUNT_SIZE:
            raise ValueError("an account page needs %d bytes" % ACCOUNT_SIZE)
        self.fd = fd
        self._words = view[:ACCOUNT_SIZE].cast("Q")
        self._lock = threading.Lock()

    def initialise(self, limit):
        words = self._words
        for i in range(len(words)):
            words[i] = 0
        words[_W_LIMIT] = limit
        words[_W_HEAD] = ACCOUNT_MAGIC | ACCOUNT_VERSION << 32

    def is_valid(self):
        return self._words[_W_HEAD] == ACCOUNT_MAGIC | ACCOUNT_VERSION << 32

    def mark_closed(self):
        self._words[_W_CLOSED] = 1

    @property
    def closed(self):
        return self._words[_W_CLOSED] != 0

    @property
    def limit(self):
        return self._words[_W_LIMIT]

    def queued(self):
        words = self._words
        consumed = words[_W_CONSUMED]
        produced = words[_W_PRODUCED]
        return produced - consumed if produced > consumed else 0

    def release_memory(self):
        self._words.release()

    def _release_frame(self, size):
        words = self._words
        with self._lock:
            produced = words[_W_PRODUCED]
            old = words[_W_CONSUMED]
            new = old + size
            if new > produced:
                new = max(produced, old)
            words[_W_CONSUMED] = new


def send_datagram(sock, account, dst_context, dst_resource, src_context, src_resource, payload, length):
    """Send one datagram without blocking; see ``vsc_dg_send``."""
    view = memoryview(payload).cast("B")
    if length < 0 or length > len(view) or length > VMCI_MAX_DG_PAYLOAD_SIZE:
        return VMCI_ERROR_INVALID_ARGS
    total = VMCI_DG_HEADERSIZE + length
    header = _HEADER.pack(dst_context, dst_resource, src_context, src_resource, length)
    words = account._words
    fd = account.fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        return VMCI_ERROR_GENERIC
    try:
        if words[_W_CLOSED]:
            return PEER_GONE
        produced = words[_W_PRODUCED]
        consumed = words[_W_CONSUMED]
        queued = produced - consumed if produced > consumed else 0
        if queued + total >= words[_W_LIMIT]:
            return VMCI_ERROR_NO_RESOURCES
        words[_W_PRODUCED] = produced + total
        try:
            if length:
                sock.sendmsg((header, view[:length]), (), _SEND_FLAGS)
            else:
                sock.sendmsg((header,), (), _SEND_FLAGS)
        except OSError as exc:
            words[_W_PRODUCED] = produced
            return _SEND_ERRNO_STATUS.get(exc.errno, VMCI_ERROR_GENERIC)
        return total
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)



def recv_datagram(sock, account, buf, spill):
    """Receive one frame without blocking; see ``vsc_dg_recv``.

    The payload lands in ``buf`` and, past its end, in ``spill``. Returns ``(status, fields)``:
    status is the frame size or a core status; fields is the decoded header
    tuple when status >= 0, else None.
    """
    header = bytearray(VMCI_DG_HEADERSIZE)
    try:
        n, _, flags, _ = sock.recvmsg_into((header, buf, spill), 0, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return AGAIN, None
    except ConnectionResetError:
        return PEER_GONE, None
    except OSError:
        return VMCI_ERROR_GENERIC, None
    if n == 0:
        return PEER_GONE, None
    account._release_frame(n)
    if n < VMCI_DG_HEADERSIZE or flags & socket.MSG_TRUNC:
        return BAD_FRAME, None
    fields = _HEADER.unpack_from(header)
    if fields[4] != n - VMCI_DG_HEADERSIZE:
        return BAD_FRAME, None
    return n, fields
