"""Verdicts: a receiver tells a link's sender whether it may send (wire format in ``transport/vsock.py``).

Across kernels the privileges of an endpoint live in its owning process, which enforces them
on receive. So that a denied sender learns of it (``VMCI_ERROR_NO_ACCESS``) rather than only
seeing its datagrams dropped, the receiver writes an 8-byte **verdict** back on the link's own
connection: when it accepts a connection whose sender is denied, and whenever that sender's
verdict changes. The sender's pump (a direct link's watch thread) reads them
(``LinkVerdict.receive``) and keeps the last one; a change bumps the ACL epoch word of the link's
private account page, so the core's next send returns STALE (one word compared per send, no
syscall) and the endpoint then reads ``denied``.

Parsing is pure (``decode_verdict``, ``split_verdicts``); bytes that are not verdicts end the
link (``LinkVerdict.garbled``), so a peer can neither crash nor stall the sender.
"""
import socket
import struct
import threading
from typing import List, Optional, Tuple

from ..access import ACL_EPOCH_WORD
from ..constants import VERDICT_DENIED, VERDICT_FORMAT, VERDICT_MAGIC, VERDICT_MAY_SEND

VERDICT = struct.Struct(VERDICT_FORMAT)
#: The verdict words: the sender may send datagrams (DG_SEND granted), or it may not.
MAY_SEND, DENIED = VERDICT_MAY_SEND, VERDICT_DENIED
#: Bytes read at most per receive on a stream (whole verdicts; a cut one waits for its rest).
STREAM_READ = VERDICT.size * 64

_EPOCH = struct.Struct("<Q")
_EPOCH_OFFSET = ACL_EPOCH_WORD * _EPOCH.size


def encode_verdict(denied: bool) -> bytes:
    return VERDICT.pack(VERDICT_MAGIC, DENIED if denied else MAY_SEND)


def decode_verdict(data: bytes, truncated: bool = False) -> Optional[bool]:
    """True (denied) or False (may send) from one verdict message, or None if ``data`` is not one."""
    if truncated or len(data) != VERDICT.size:
        return None
    magic, word = VERDICT.unpack(data)
    if magic != VERDICT_MAGIC or word not in (MAY_SEND, DENIED):
        return None
    return word == DENIED


def split_verdicts(data: bytes) -> Optional[Tuple[List[bool], int]]:
    """The verdicts of the whole records at the start of a stream's ``data``, and the bytes they
    take (a cut record at the end is left for later); None if a whole record is not a verdict."""
    verdicts = []
    end = len(data) - len(data) % VERDICT.size
    for offset in range(0, end, VERDICT.size):
        verdict = decode_verdict(data[offset:offset + VERDICT.size])
        if verdict is None:
            return None
        verdicts.append(verdict)
    return verdicts, end


class LinkVerdict:
    """What a link's receiver last said of its sender: the link's pump (or watch) writes it, the
    sender reads it.

    ``denied``: the last verdict (a link starts allowed: a receiver speaks only to deny or to
    change its mind). ``garbled``: the receiver sent bytes that are not verdicts, and the link
    ended. ``ended``: the pump (or watch) stopped (the link is gone; a send finds out).

    The link page's ACL epoch word moves (under ``_lock``, so it only grows) whenever
    ``denied`` changes, and stays away from the epoch the sender watches while denied: so the
    core's send returns STALE while denied, or once the verdict changed, and sends otherwise.
    """

    __slots__ = ("denied", "garbled", "ended", "_page", "_stream", "_pending", "_lock")

    def __init__(self, page, stream: bool):
        self.denied = False
        self.garbled = False
        self.ended = False
        self._page = page
        self._stream = stream
        self._pending = b""
        self._lock = threading.Lock()

    def watch(self, sender) -> bool:
        """Have the core's ``sender`` watch the epoch of the verdict it reads; True if denied.

        While denied the epoch moves on past the watched one, so its next send is STALE again.
        """
        with self._lock:
            sender.watch_acl()
            if self.denied:
                self._bump()
            return self.denied

    def _bump(self) -> None:
        epoch = _EPOCH.unpack_from(self._page, _EPOCH_OFFSET)[0]
        _EPOCH.pack_into(self._page, _EPOCH_OFFSET, epoch + 1)

    def receive(self, conn: socket.socket) -> bool:
        """Read what ``conn`` holds, without blocking; False once the link must end (hang-up,
        error, or bytes that are not verdicts)."""
        try:
            if self._stream:
                data = conn.recv(STREAM_READ, socket.MSG_DONTWAIT)
                truncated = False
            else:
                data, _, flags, _ = conn.recvmsg(VERDICT.size + 1, 0, socket.MSG_DONTWAIT)
                truncated = bool(flags & socket.MSG_TRUNC)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False
        return self.apply(data, truncated)

    def apply(self, data: bytes, truncated: bool = False) -> bool:
        """Take one message (SEQPACKET) or the next bytes (stream); False if they are garbage
        (and from then on: a garbled link takes nothing more)."""
        if self.garbled:
            return False
        if self._stream:
            split = split_verdicts(self._pending + data)
            if split is None:
                self.garbled = True
                return False
            verdicts, used = split
            self._pending = (self._pending + data)[used:]
        else:
            verdict = decode_verdict(data, truncated)
            if verdict is None:
                self.garbled = True
                return False
            verdicts = [verdict]
        if verdicts and verdicts[-1] != self.denied:
            with self._lock:
                self.denied = verdicts[-1]
                self._bump()
        return True


__all__ = ["LinkVerdict", "decode_verdict", "encode_verdict", "split_verdicts", "VERDICT",
           "VERDICT_MAGIC", "MAY_SEND", "DENIED"]
