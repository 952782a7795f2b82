"""Pure-Python data-plane core.

Implements the contract of ``_core.pyi`` with the same frame format and the
same queue-account protocol as the C core in ``src/vsc_dgram.c``, so the two
interoperate on one socket and one account page.
"""
import ctypes
import errno
import select
import socket
import struct
import time

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
FORGED = -2004
ACCEPT = -2005
WAKE = -2006

ACCOUNT_SIZE = 4096
ACCOUNT_MAGIC = 0x51435356
ACCOUNT_VERSION = 1
# Word indexes of the account page seen as native 64-bit words.
_W_HEAD, _W_LIMIT, _W_PRODUCED, _W_CONSUMED, _W_CLOSED = 0, 1, 2, 3, 4
_LOCK_OFFSET = 64  # robust process-shared pthread mutex, shared with the C core

# The account lock is the C core's pthread mutex, taken through libc so both cores exclude each other.
_libc = ctypes.CDLL(None, use_errno=True)
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1


def _pthread(name):
    function = getattr(_libc, name)
    function.restype = ctypes.c_int
    return function


_mutex_lock = _pthread("pthread_mutex_lock")
_mutex_unlock = _pthread("pthread_mutex_unlock")
_mutex_consistent = _pthread("pthread_mutex_consistent")
_mutex_init = _pthread("pthread_mutex_init")
_mutexattr_init = _pthread("pthread_mutexattr_init")
_mutexattr_destroy = _pthread("pthread_mutexattr_destroy")
_mutexattr_setpshared = _pthread("pthread_mutexattr_setpshared")
_mutexattr_setrobust = _pthread("pthread_mutexattr_setrobust")
for _f in (_mutex_lock, _mutex_unlock, _mutex_consistent):
    _f.argtypes = (ctypes.c_void_p,)


def _acquire(lock):
    rc = _mutex_lock(lock)
    if rc == errno.EOWNERDEAD:
        # The holder died; the next frame it reserved may be counted without being sent.
        rc = _mutex_consistent(lock)
    return rc

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

    __slots__ = ("fd", "_words", "_lock_ref", "lock")

    def __init__(self, fd, page):
        view = memoryview(page).cast("B")
        if len(view) < ACCOUNT_SIZE:
            raise ValueError("an account page needs %d bytes" % ACCOUNT_SIZE)
        self.fd = fd
        self._words = view[:ACCOUNT_SIZE].cast("Q")
        self._lock_ref = ctypes.c_char.from_buffer(self._words, _LOCK_OFFSET)
        self.lock = ctypes.addressof(self._lock_ref)

    def initialise(self, limit):
        words = self._words
        for i in range(len(words)):
            words[i] = 0
        words[_W_LIMIT] = limit
        attr = ctypes.create_string_buffer(64)
        rc = _mutexattr_init(attr)
        if rc == 0:
            rc = _mutexattr_setpshared(attr, _PTHREAD_PROCESS_SHARED) or _mutexattr_setrobust(
                attr, _PTHREAD_MUTEX_ROBUST) or _mutex_init(ctypes.c_void_p(self.lock), attr)
            _mutexattr_destroy(attr)
        if rc != 0:
            raise OSError(rc, "cannot initialise the account lock")
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
        self._lock_ref = None
        self._words.release()

    def _release_frame(self, size):
        # Only the receiver writes CONSUMED, and only under its receive lock.
        words = self._words
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
    header = _HEADER.pack(dst_context, dst_resource, src_context, src_resource, length)
    lock = account.lock
    if _acquire(lock):
        return VMCI_ERROR_GENERIC
    try:
        return _send_locked(sock, account, header, view, length)
    finally:
        _mutex_unlock(lock)


def _hung_up(sock):
    """A receiver never writes on a link, so any event on it is a hang-up (see vsc_dgram.c)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _send_locked(sock, account, header, view, length):
    words = account._words
    if words[_W_CLOSED]:
        return PEER_GONE
    total = VMCI_DG_HEADERSIZE + length
    produced = words[_W_PRODUCED]
    consumed = words[_W_CONSUMED]
    queued = produced - consumed if produced > consumed else 0
    if queued + total >= words[_W_LIMIT]:
        return PEER_GONE if _hung_up(sock) else VMCI_ERROR_NO_RESOURCES
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


class Link:
    """One endpoint's connection to one receiver: ``send`` is the datagram fast path.

    Thread-safe: sends and ``close`` serialise on the receiver's account lock.
    """

    __slots__ = ("_sock", "_account", "_handles", "_closed")

    def __init__(self, sock, account, dst_context, dst_resource, src_context, src_resource):
        self._sock = sock
        self._account = account
        self._handles = (dst_context, dst_resource, src_context, src_resource)
        self._closed = False

    def send(self, payload, length):
        """Send ``length`` bytes of ``payload``: the frame size or a status (see ``vsc_link_send``)."""
        view = memoryview(payload).cast("B")
        if length < 0 or length > len(view) or length > VMCI_MAX_DG_PAYLOAD_SIZE:
            return VMCI_ERROR_INVALID_ARGS
        header = _HEADER.pack(*self._handles, length)
        lock = self._account.lock
        if _acquire(lock):
            return VMCI_ERROR_GENERIC
        try:
            if self._closed:
                return PEER_GONE
            return _send_locked(self._sock, self._account, header, view, length)
        finally:
            _mutex_unlock(lock)

    def close(self):
        """Stop sending (waits for a send in progress); the caller then closes the socket."""
        lock = self._account.lock
        locked = _acquire(lock) == 0
        self._closed = True
        if locked:
            _mutex_unlock(lock)


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
    if fields[4] != n - VMCI_DG_HEADERSIZE or fields[4] > VMCI_MAX_DG_PAYLOAD_SIZE:
        return BAD_FRAME, None
    return n, fields


class Receiver:
    """The connections senders opened to one endpoint, served oldest first (see ``vsc_rx``)."""

    def __init__(self, listener, wake_fd, account, self_context, self_resource):
        self._epoll = select.epoll()
        self._listener_fd = listener.fileno()
        self._wake_fd = wake_fd
        self._epoll.register(self._listener_fd, select.EPOLLIN)
        self._epoll.register(wake_fd, select.EPOLLIN)
        self._account = account
        self._self = (self_context, self_resource)
        self._conns = {}
        self._ready = []
        self._seq = 0
        self.last_fd = -1

    def fileno(self):
        return self._epoll.fileno()

    def add(self, sock, src_context, src_resource):
        """Serve ``sock``, whose sender the kernel says is ``(src_context, src_resource)``."""
        fd = sock.fileno()
        self._epoll.register(fd, select.EPOLLIN)
        self._conns[fd] = (sock, src_context, src_resource, self._seq)
        self._seq += 1

    def remove(self, fd):
        """Stop serving the connection ``fd`` (the caller closes it)."""
        if self._conns.pop(fd, None) is not None:
            self._epoll.unregister(fd)
            self._ready = [f for f in self._ready if f != fd]

    def _key(self, fd):
        conn = self._conns.get(fd)
        if conn is not None:
            return conn[3]
        return -2 if fd == self._wake_fd else -1

    def recv(self, buf, spill, timeout):
        """Receive one frame, waiting up to ``timeout`` seconds (None: forever); see ``vsc_rx_recv``."""
        ready = self._ready
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        while True:
            if not ready:
                wait = -1 if deadline is None else max(deadline - time.monotonic(), 0)
                events = self._epoll.poll(wait)
                if not events:
                    return AGAIN
                if len(events) == 1:
                    fd = events[0][0]
                    if fd in self._conns or fd == self._wake_fd or fd == self._listener_fd:
                        ready.append(fd)
                else:
                    fds = [fd for fd, _ in events
                           if fd in self._conns or fd == self._wake_fd or fd == self._listener_fd]
                    ready.extend(sorted(fds, key=self._key, reverse=True))
                continue
            fd = ready.pop()
            if fd == self._wake_fd:
                return WAKE
            if fd == self._listener_fd:
                return ACCEPT
            sock, src_context, src_resource, _ = self._conns[fd]
            self.last_fd = fd
            status, fields = recv_datagram(sock, self._account, buf, spill)
            if status == AGAIN:
                if not ready and deadline is not None and time.monotonic() >= deadline:
                    return AGAIN
                continue
            if status < 0:
                return status
            if (fields[2] != src_context or fields[3] != src_resource
                    or fields[0] != self._self[0] or fields[1] != self._self[1]):
                return FORGED
            return status

    def close(self):
        self._epoll.close()
        self._conns.clear()
        self._ready = []


from ._pure_ring import *  # noqa
