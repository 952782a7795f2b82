"""Pure-Python data-plane core.

Implements the contract of ``_core.pyi`` with the same frame format and the
same queue-account protocol as the C core in ``src/vsc_dgram.c``, so the two
interoperate on one socket and one account page.
"""
import ctypes
import errno
import os
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
DENIED = -2008
STALE = -2009

ACCOUNT_SIZE = 4096
ACCOUNT_MAGIC = 0x51435356
ACCOUNT_VERSION = 1
# Word indexes of the account page seen as native 64-bit words.
_W_HEAD, _W_LIMIT, _W_PRODUCED, _W_CONSUMED, _W_CLOSED = 0, 1, 2, 3, 4
_W_ACL_EPOCH = 7  # VSC_ACCT_OFF_ACL_EPOCH / 8
_LOCK_OFFSET = 64  # robust process-shared pthread mutex, shared with the C core

# The account lock is the C core's pthread mutex, taken through libc so both cores exclude each other.
_libc = ctypes.CDLL(None, use_errno=True)
# The pthread calls return their error: a handle without use_errno, which costs every call.
_pthread_libc = ctypes.CDLL(None)
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1


def _pthread(name):
    function = getattr(_pthread_libc, name)
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
# A Link's calls per send, in their cheapest form (callgrind: trylock + unlock 2,930
# instructions, 3,140 with ``restype = c_int``, 3,400 with a ctypes pointer, lock + unlock as
# above 5,100): no argtypes, the mutex passed by a prebuilt ``byref`` (ctypes passes its address
# as it is; a pointer object makes a new argument object each call, a plain int would be cut to
# a C int), through PyDLL's flags, which keep the GIL: so only for the calls that never block.


class _IntResultGil(ctypes._CFuncPtr):
    """PyDLL's function type without a ``_restype_``: ctypes then returns the C int result as a
    Python int at once, where ``restype = c_int`` looks its converter up on every call."""

    _flags_ = ctypes._FUNCFLAG_CDECL | ctypes._FUNCFLAG_PYTHONAPI


_held_gil = ctypes.PyDLL(None)
_mutex_trylock_gil = _IntResultGil(("pthread_mutex_trylock", _held_gil))
_mutex_unlock_gil = _held_gil.pthread_mutex_unlock
_mutex_unlock_gil.restype = None  # it cannot fail for the holder; no result to convert


def _mutex_ref(address):
    """The argument that passes the mutex at ``address`` to the calls above (and to those with
    ``c_void_p`` arguments); it does not keep the memory mapped."""
    return ctypes.byref(ctypes.c_char.from_address(address))


def _acquire(lock):
    rc = _mutex_lock(lock)
    if rc == errno.EOWNERDEAD:
        # The holder died; the next frame it reserved may be counted without being sent.
        rc = _mutex_consistent(lock)
    return rc

_HEADER = struct.Struct(DG_HEADER_FORMAT)
_SMALL = 4096  # payloads up to this size are sent as one joined buffer
# Plain ints: the socket module's flags are IntFlag members, whose "&" runs Python code.
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
_MSG_TRUNC = int(socket.MSG_TRUNC)
_SEND_FLAGS = _MSG_DONTWAIT | int(socket.MSG_NOSIGNAL)
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


_GONE_EVENTS = select.POLLHUP | select.POLLERR | select.POLLNVAL
#: The errors after which Linux may have sent part of a SEQPACKET message (a sealing link's).
_CUT_ERRNOS = (errno.EAGAIN, errno.ENOMEM)


def _peer_closed(sock):
    """Whether the receiver of a sealed (write-shut) link closed its end: a hang-up or error."""
    poller = select.poll()
    poller.register(sock, 0)  # hang-ups and errors are reported whatever is asked
    return any(revents & _GONE_EVENTS for _, revents in poller.poll(0))


def _seal(sock):
    """Shut ``sock`` down for writing: its receiver reads what came before, then the end."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # a connection already gone: the next send sees the hang-up
        pass


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

    __slots__ = ("_sock", "_account", "_handles", "_closed", "_epoch", "_words", "_lock", "_header",
                 "_seal", "sealed", "_shut", "_limit", "_consumed")

    def __init__(self, sock, account, dst_context, dst_resource, src_context, src_resource):
        self._sock = sock
        self._account = account
        self._handles = (dst_context, dst_resource, src_context, src_resource)
        self._closed = False
        self._epoch = None
        self._words = account._words
        self._lock = _mutex_ref(account.lock)  # made once: ctypes calls are the cost here
        # (length, header, frame size, room) of the last send, see ``header``: a stream repeats its length
        self._header = (-1, None, 0, 0)
        self._seal = False
        self.sealed = False
        # For the Fastpath's inline send: closed or sealed; the account's LIMIT word (set
        # once, before the account is valid; 0 sends every frame to ``send``); the CONSUMED
        # word seen last (under the lock).
        self._shut = False
        self._limit = self._words[_W_LIMIT] if account.is_valid() else 0
        self._consumed = 0

    def watch_acl(self):
        """See the Cython core: ``send`` returns STALE once the receiver's ACL epoch word changes."""
        self._epoch = self._words[_W_ACL_EPOCH]

    def seal_when_full(self):
        """See the Cython core: from now on a send that meets ``EAGAIN`` seals the link (shut
        down for writing; NO_RESOURCES until the receiver closed it, then STALE)."""
        self._seal = True

    def send(self, payload, length):
        """Send ``length`` bytes of ``payload``: the frame size or a status (see ``vsc_link_send``).

        The steps of ``_send_locked``, inlined: this is the pure core's per-datagram path.
        """
        words = self._words
        if self._epoch is not None and words[_W_ACL_EPOCH] != self._epoch:
            return STALE
        kind = type(payload)
        if kind is bytes or kind is bytearray:
            if length < 0 or length > len(payload) or length > VMCI_MAX_DG_PAYLOAD_SIZE:
                return VMCI_ERROR_INVALID_ARGS
            data = payload if length == len(payload) else payload[:length]
        else:
            view = payload if kind is memoryview else memoryview(payload)
            if not view.c_contiguous:  # as the Cython core's buffer request, before anything is counted
                raise BufferError("memoryview: underlying buffer is not C-contiguous")
            if view.itemsize != 1 or view.ndim != 1:
                view = view.cast("B")
            if length < 0 or length > len(view) or length > VMCI_MAX_DG_PAYLOAD_SIZE:
                return VMCI_ERROR_INVALID_ARGS
            data = view[:length]
        size, header, _, _ = self._header  # one tuple: a thread sending another length replaces it whole
        if size != length:
            header = self.header(length)[0]
        if length <= _SMALL:  # one buffer: cheaper than sendmsg; joined before the lock (it may raise)
            data = header + data
        lock = self._lock
        rc = _mutex_trylock_gil(lock)
        if rc and self._wait_lock(rc):
            return VMCI_ERROR_GENERIC
        try:
            if self._closed or words[_W_CLOSED]:
                return PEER_GONE
            if self.sealed:
                return STALE if _peer_closed(self._sock) else VMCI_ERROR_NO_RESOURCES
            total = VMCI_DG_HEADERSIZE + length
            produced = words[_W_PRODUCED]
            limit = words[_W_LIMIT]
            # queued = produced - consumed, taken as 0 if negative (as the C core's unsigned check)
            if produced - words[_W_CONSUMED] + total >= limit or total >= limit:
                return PEER_GONE if _hung_up(self._sock) else VMCI_ERROR_NO_RESOURCES
            words[_W_PRODUCED] = produced + total
            try:
                if length <= _SMALL:
                    self._sock.send(data, _SEND_FLAGS)
                else:
                    self._sock.sendmsg((header, data), (), _SEND_FLAGS)
            except OSError as exc:
                return self._failed(exc, produced)
            return total
        finally:
            _mutex_unlock_gil(lock)

    def _failed(self, exc, produced):
        """The status of a send that raised ``exc`` after PRODUCED was ``produced``, rolled back.
        Under the lock."""
        self._words[_W_PRODUCED] = produced
        if self._seal and exc.errno in _CUT_ERRNOS:
            self.sealed = self._shut = True  # under the lock: no other send can follow a cut message
            _seal(self._sock)
        return _SEND_ERRNO_STATUS.get(exc.errno, VMCI_ERROR_GENERIC)

    def header(self, length):
        """``(header, frame size, room)`` for a payload of ``length`` bytes, kept for the next
        send: the frame header, its size with the header, and what such a frame leaves of the
        queue's LIMIT (the queue is full for it at PRODUCED - CONSUMED >= room)."""
        header = _HEADER.pack(*self._handles, length)
        total = VMCI_DG_HEADERSIZE + length
        self._header = (length, header, total, self._limit - total)
        return header, total, self._limit - total

    def _wait_lock(self, rc):
        """The account lock after a ``trylock`` that returned ``rc``: 0 once held, else an error.

        Busy: wait for it with the GIL released (its holder may be a thread of ours). A holder
        that died leaves it to us (EOWNERDEAD): made consistent, see ``_acquire``.
        """
        if rc == errno.EBUSY:
            rc = _mutex_lock(self._lock)
        if rc == errno.EOWNERDEAD:
            rc = _mutex_consistent(self._lock)
        return rc

    def close(self):
        """Stop sending (waits for a send in progress); the caller then closes the socket."""
        lock = self._account.lock
        locked = _acquire(lock) == 0
        self._closed = self._shut = True
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
        n, _, flags, _ = sock.recvmsg_into((header, buf, spill), 0, _MSG_DONTWAIT)
    except BlockingIOError:
        return AGAIN, None
    except ConnectionResetError:
        return PEER_GONE, None
    except OSError:
        return VMCI_ERROR_GENERIC, None
    if n == 0:
        return PEER_GONE, None
    account._release_frame(n)
    if n < VMCI_DG_HEADERSIZE or flags & _MSG_TRUNC:
        return BAD_FRAME, None
    fields = _HEADER.unpack_from(header)
    if fields[4] != n - VMCI_DG_HEADERSIZE or fields[4] > VMCI_MAX_DG_PAYLOAD_SIZE:
        return BAD_FRAME, None
    return n, fields


_NO_FRAME = ()  # Receiver._good until a frame passes its checks
_UNTAGGED = object()  # the tag of a connection no longer served
_ANY_EPOCH = -1  # never the value of the (unsigned) epoch word
_SKIP_MAX = 16  # VSC_RX_SKIPS: receives in a row without epoll while one sender is served
# How Receiver._receive reads the connection it chose.
_READY, _HOT, _QUEUED, _WAIT = "ready", "hot", "queued", "wait"
_readv = os.readv
_HOT_TIMEOUT = struct.pack("@ll", 0, 1000)  # VSC_RX_HOT_MS, as a struct timeval for SO_RCVTIMEO
_HOT_MIN_WAIT = 0.1  # VSC_RX_HOT_MIN_WAIT_MS: the shortest caller timeout a hot read may serve
# Through libc: socket.setsockopt takes only integers on AF_VSOCK sockets.
_setsockopt = _libc.setsockopt
_setsockopt.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_setsockopt.restype = ctypes.c_int


class Receiver:
    """The connections senders opened to one endpoint, served oldest first (see ``vsc_rx``).

    One receiving thread at a time (the endpoint's receive lock).
    """

    def __init__(self, listener, wake_fd, account, self_context, self_resource):
        self._epoll = select.epoll()
        self._listener_fd = listener.fileno()
        self._wake_fd = wake_fd
        self._epoll.register(self._listener_fd, select.EPOLLIN)
        self._epoll.register(wake_fd, select.EPOLLIN)
        self._account = account
        self._words = account._words
        # The CONSUMED word as this receiver last wrote it: its only writer (vsc_dgram.h), under
        # the receive lock; read once, then written through (senders read the word).
        self._consumed = self._words[_W_CONSUMED]
        self._self_context, self._self_resource = self_context, self_resource
        self._conns = {}
        self._tags = {}
        self._denied = set()
        self._ready = []
        self._seq = 0
        self._only = None  # the connection's entry while exactly one is served
        self._skips = 0
        self._hot = None  # the only connection's entry, while its last read delivered a frame
        self._header = bytearray(VMCI_DG_HEADERSIZE)
        self._good = _NO_FRAME  # (conn, frame size, header, 0) of the last frame that passed the checks
        self._good_tag = None  # its tag, if its connection may deliver (None: look it up)
        self._recheck = None
        self._epoch = 0  # the ACL epoch word at the last re-check; _ANY_EPOCH: re-check next time
        self.last_fd = -1

    def fileno(self):
        return self._epoll.fileno()

    def add(self, sock, src_context, src_resource, tag=None):
        """Serve ``sock``, whose sender the kernel says is ``(src_context, src_resource)``;
        ``take`` returns ``tag`` with each datagram read from it. A blocking ``sock`` gets
        a receive timeout (SO_RCVTIMEO) and may be read hot, see ``vsc_rx_add``."""
        fd = sock.fileno()
        self._epoll.register(fd, select.EPOLLIN)
        hot_ok = sock.gettimeout() is None and _setsockopt(
            fd, socket.SOL_SOCKET, socket.SO_RCVTIMEO, _HOT_TIMEOUT, len(_HOT_TIMEOUT)) == 0
        self._conns[fd] = (sock, src_context, src_resource, self._seq, fd, hot_ok)
        self._tags[fd] = tag
        self._seq += 1
        self._only = self._conns[fd] if len(self._conns) == 1 else None
        self._hot = None

    def remove(self, fd):
        """Stop serving the connection ``fd`` (the caller closes it)."""
        if self._conns.pop(fd, None) is not None:
            self._epoll.unregister(fd)
            self._ready = [f for f in self._ready if f != fd]
            self._tags.pop(fd, None)
            self._denied.discard(fd)
            self._only = next(iter(self._conns.values())) if len(self._conns) == 1 else None
            if self._hot is not None and self._hot[4] == fd:
                self._hot = None
            self._forget_good()

    def deny(self, fd, denied):
        """Drop (``take`` returns DENIED) or deliver again what the connection ``fd`` sends."""
        if denied:
            if fd in self._conns:
                self._denied.add(fd)
        else:
            self._denied.discard(fd)
        self._forget_good()

    def _forget_good(self):
        # The tag remembered with the last good frame: to be looked up again (a connection
        # removed or denied, or allowed again).
        self._good = _NO_FRAME
        self._good_tag = None

    def watch_acl(self, recheck):
        """See the Cython core: ``recheck()`` runs before a delivery after the ACL epoch changed."""
        self._epoch = self._words[_W_ACL_EPOCH]
        self._recheck = recheck

    def acl_changed(self):
        """Call ``recheck`` before the next delivery even if the epoch word did not change."""
        self._epoch = _ANY_EPOCH

    def _key(self, fd):
        conn = self._conns.get(fd)
        if conn is not None:
            return conn[3]
        return -2 if fd == self._wake_fd else -1

    def _wait(self, deadline):
        """Fill ``_ready`` (served from its end); AGAIN when the deadline passes, else None."""
        wait = -1 if deadline is None else max(deadline - time.monotonic(), 0)
        events = self._epoll.poll(wait)
        if not events:
            return AGAIN
        conns, ready = self._conns, self._ready
        if len(events) == 1:
            fd = events[0][0]
            if fd in conns or fd == self._wake_fd or fd == self._listener_fd:
                ready.append(fd)
        else:
            fds = [fd for fd, _ in events if fd in conns or fd == self._wake_fd or fd == self._listener_fd]
            ready.extend(sorted(fds, key=self._key, reverse=True))
        return None

    def recv(self, buf, spill, timeout):
        """Receive one frame, waiting up to ``timeout`` seconds (None: forever); see ``vsc_rx_recv``."""
        return self._receive(buf, spill, timeout, False)[0]

    def take(self, buf, spill, timeout):
        """Receive one datagram for delivery; see the Cython core's ``Receiver.take``."""
        return self._receive(buf, spill, timeout, True)

    def _receive(self, buf, spill, timeout, deliver):
        """``take`` (``deliver``), or ``(frame size, None)`` without the delivery checks (``recv``)."""
        n, conn, flags, hot = self._read(buf, spill, timeout)
        if conn is None:
            return n, None  # a status
        if n == 0:
            return PEER_GONE, None
        words = self._words
        consumed = self._consumed + n  # the frame leaves the queue (see Account._release_frame)
        if consumed > words[_W_PRODUCED]:
            consumed = max(words[_W_PRODUCED], consumed - n)
        words[_W_CONSUMED] = self._consumed = consumed
        return self._admit(buf, conn, n, flags, hot, deliver)

    def _admit(self, buf, conn, n, flags, hot, deliver):
        """The rest of ``_receive`` for a released frame of ``n`` bytes read from ``conn``:
        checked (if not alike the last good one), then delivered. The Fastpath calls it
        directly for a hot read whose frame is not the common case."""
        header = self._header
        if (conn, n, header, flags) != self._good:
            status = self._check(conn, header, n, flags)
            if status < 0:
                return status, None
        if not hot:
            self._hot = conn if conn is self._only and conn[5] else None
        if not deliver:
            return n, None
        words = self._words
        if words[_W_ACL_EPOCH] != self._epoch and self._recheck is not None:
            self._epoch = words[_W_ACL_EPOCH]
            self._recheck()
        tag = self._good_tag  # the connection's, unless the re-check removed or denied it
        if tag is None:
            tag = self._tag(conn[4])
            if tag is _UNTAGGED:  # denied, or removed by the re-check
                length = n - VMCI_DG_HEADERSIZE
                buf[: min(length, len(buf))] = bytes(min(length, len(buf)))
                return DENIED, None
        return n - VMCI_DG_HEADERSIZE, tag

    def _poll_hot(self):
        """After _SKIP_MAX receives without epoll (see ``_read``): poll without waiting; True if
        nothing but the hot connection is ready, which may then be read hot again (the count
        starts again): what ``_read`` does after a wait, without its calls. False: anything else
        is ready, for ``_read`` (which polls again)."""
        events = self._epoll.poll(0)
        if events and (len(events) > 1 or events[0][0] != self._hot[4]):
            return False
        self._skips = 0
        return True

    def _hot_failed(self, exc, buf, spill):
        """``take``'s result after a hot read (see ``_read``) raised ``exc``."""
        if isinstance(exc, BlockingIOError):
            self._hot = None  # nothing came in time: wait on everything
            return self._receive(buf, spill, None, True)
        return PEER_GONE if isinstance(exc, ConnectionResetError) else VMCI_ERROR_GENERIC, None

    def _tag(self, fd):
        """The tag ``take`` delivers with the frames of ``fd``; _UNTAGGED if it may not."""
        return _UNTAGGED if fd in self._denied else self._tags.get(fd, _UNTAGGED)

    def _read(self, buf, spill, timeout):
        """Read one frame into the header, ``buf`` and ``spill``, waiting up to ``timeout``
        seconds (None: forever): ``(n, conn, flags, whether it was a hot read)``, or
        ``(status, None, None, None)``."""
        ready, words = self._ready, self._words
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        while True:
            # One sender, its connection hot or bytes queued (the account says so): read it
            # without epoll (a hot read may block, briefly: SO_RCVTIMEO). Bounded, so that
            # new connections and wake-ups are still seen.
            conn = self._hot
            if conn is not None and not ready and self._skips < _SKIP_MAX and (
                    deadline is None or deadline - time.monotonic() >= _HOT_MIN_WAIT):
                mode = _HOT
            elif ready:
                fd = ready.pop()
                if fd == self._wake_fd:
                    return WAKE, None, None, None
                if fd == self._listener_fd:
                    return ACCEPT, None, None, None
                conn = self._conns[fd]
                mode = _READY
            else:
                conn = self._only
                if conn is None or self._skips >= _SKIP_MAX or words[_W_PRODUCED] <= words[_W_CONSUMED]:
                    self._skips = 0
                    if self._wait(deadline) is AGAIN:
                        return AGAIN, None, None, None
                    continue
                mode = _QUEUED
            if mode is not _READY:
                self._skips += 1
            self.last_fd = conn[4]
            try:
                if (mode is _HOT or mode is _READY and conn is self._hot) and len(spill) > VMCI_MAX_DG_PAYLOAD_SIZE:
                    # A blocking read (SO_RCVTIMEO bounds it) into buffers that hold any frame
                    # the SDK allows, so no flag is needed to see a truncated one: it exceeds
                    # the maximum. readv costs half of recvmsg_into (callgrind). The Fastpath
                    # does this read itself, see its recv_status. The hot connection found
                    # ready (every _SKIP_MAX receives) is read so too: epoll saw its frame,
                    # and only this thread reads it (the receive lock).
                    n = _readv(conn[4], (self._header, buf, spill))
                    flags = 0
                else:
                    n, _, flags, _ = conn[0].recvmsg_into((self._header, buf, spill), 0,
                                                          0 if mode is _HOT else _MSG_DONTWAIT)
                    flags &= _MSG_TRUNC  # the only flag that counts (see _check)
            except BlockingIOError:
                if mode is _HOT:
                    self._hot = None  # nothing came in time: wait on everything
                elif mode is _QUEUED:
                    self._skips = _SKIP_MAX  # the queued bytes are elsewhere: wait properly
                elif not ready and deadline is not None and time.monotonic() >= deadline:
                    return AGAIN, None, None, None
                continue
            except ConnectionResetError:
                return PEER_GONE, None, None, None
            except OSError:
                return VMCI_ERROR_GENERIC, None, None, None
            return n, conn, flags, mode is _HOT

    def _check(self, conn, header, n, flags):
        """``n``, or BAD_FRAME / FORGED, for a frame of ``n`` bytes read from ``conn``; a
        frame that passes is remembered: the next one alike (same header and size, from the
        same connection: a stream repeats them) passes with one comparison."""
        if n < VMCI_DG_HEADERSIZE or flags & _MSG_TRUNC:
            return BAD_FRAME
        dc, dr, sc, sr, size = _HEADER.unpack_from(header)
        if size != n - VMCI_DG_HEADERSIZE or size > VMCI_MAX_DG_PAYLOAD_SIZE:
            return BAD_FRAME
        if sc != conn[1] or sr != conn[2] or dc != self._self_context or dr != self._self_resource:
            return FORGED
        self._good = (conn, n, bytes(header), 0)
        tag = self._tag(conn[4])
        self._good_tag = None if tag is _UNTAGGED else tag
        return n

    def close(self):
        self._epoll.close()
        self._conns.clear()
        self._tags.clear()
        self._denied.clear()
        self._recheck = None
        self._only = None
        self._hot = None
        self._forget_good()
        self._ready = []


from ._pure_ring import *  # noqa
from ._pure_fast import Fastpath  # noqa: E402  (it needs the names above)
from ._pure_qstream import *  # noqa
