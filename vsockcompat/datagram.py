"""Datagram endpoints with the SDK's semantics, over any core and transport.

An endpoint owns a handle ``(context, resource)``, the connections other
endpoints opened to it, and the links it opened to them. Semantics
(vmci-sdk.md section 5): datagrams are never split or merged; FIFO per
sender; at most VMCI_MAX_DG_PAYLOAD_SIZE payload bytes; the receiving queue
holds less than VMCI_MAX_DATAGRAM_QUEUE_SIZE bytes and a sender that would
overflow it gets VMCI_ERROR_NO_RESOURCES at once; the source of every
datagram is the one the kernel vouches for.
"""
import errno
import logging
import os
import select
import threading
import time
import weakref
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Tuple

from .constants import (
    VMCI_ERROR_INVALID_ARGS,
    VMCI_ERROR_INVALID_RESOURCE,
    VMCI_ERROR_NO_MEM,
    VMCI_ERROR_NO_ACCESS,
    VMCI_ERROR_NO_MORE_DATAGRAMS,
    VMCI_ERROR_NO_RESOURCES,
    VMCI_ERROR_TIMEOUT,
    VMCI_MAX_DG_PAYLOAD_SIZE,
)
from .errors import NoAccess, VMCIError, check, error_for
from .handles import VMCIHandle, as_handle
from .runtime import Runtime, default_runtime

log = logging.getLogger("vsockcompat")

_SPILL_SIZE = VMCI_MAX_DG_PAYLOAD_SIZE + 1
#: Links (cached connections to destinations) an endpoint keeps at most; the oldest go first.
MAX_LINKS = 256
#: Sealed links (filled, then drained by their receiver) one send may replace before it gives up.
MAX_RELINKS = 8


class Datagram(NamedTuple):
    """A received datagram: who sent it and what it carried."""

    src: VMCIHandle
    payload: bytes


class EndpointStats:
    """Counters of one endpoint (what was received, dropped and why)."""

    __slots__ = ("_fast", "bad_frames", "forged", "denied", "refused_connections", "bad_verdicts")
    _NAMES = ("received", "sent") + __slots__[1:]

    def __init__(self, fast):
        self._fast = fast  # the core's Fastpath counts what it sends and delivers
        for name in self.__slots__[1:]:
            setattr(self, name, 0)

    @property
    def received(self) -> int:
        return self._fast.received

    @property
    def sent(self) -> int:
        return self._fast.sent

    def as_dict(self) -> Dict[str, int]:
        return {name: getattr(self, name) for name in self._NAMES}

    def __repr__(self):
        return "EndpointStats(%s)" % ", ".join("%s=%d" % kv for kv in self.as_dict().items())


class _OpenLink:
    """A cached link: the core's sender (the fast path) over the transport's connection.

    The sender watches the receiver's ACL epoch word (``Link.watch_acl``): once the
    receiver's privileges change, its sends return STALE and the link is checked again.
    Where the receiver tells its verdicts (``link.verdict``), the word is the link's own, moved
    by each verdict; sends return STALE while denied.
    """

    __slots__ = ("sender", "link")

    def __init__(self, sender, link):
        self.sender = sender
        self.link = link
        if link.direct:
            sender.seal_when_full()
        if link.verdict is None:
            sender.watch_acl()  # the epoch first, then the privileges it covers
        else:
            link.verdict.watch(sender)


def _weak_call(obj, function) -> Callable[[], None]:
    """``function(obj)`` without keeping ``obj`` alive (the core must not hold its endpoint)."""
    ref = weakref.ref(obj)

    def call():
        target = ref()
        if target is not None:
            function(target)

    return call


def _weak_method(obj, name: str, gone):
    """``obj.name(*args)`` without keeping ``obj`` alive; ``gone`` once it is."""
    ref = weakref.ref(obj)

    def call(*args):
        target = ref()
        return gone if target is None else getattr(target, name)(*args)

    return call


def _byte_view(buf, writable: bool) -> memoryview:
    view = memoryview(buf)
    if writable and view.readonly:
        raise error_for(VMCI_ERROR_INVALID_ARGS, "the receive buffer is read-only")
    if not view.c_contiguous:
        raise error_for(VMCI_ERROR_INVALID_ARGS, "the buffer is not contiguous")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class DatagramEndpoint:
    """A datagram endpoint: ``send`` to any handle, ``recv`` what was sent to ours.

    Use as a context manager, iterate to receive until closed, or pass a
    callback to ``on_receive`` to receive on a thread. ``fileno()`` is
    readable when a receive may make progress (for select/poll/asyncio).
    Errors raise the VMCIError subclass of the SDK code.

    The per-datagram calls the SDK functions make, each one call into the core:

    ``send_status(dst, buf, length)``
        Send ``length`` bytes of ``buf`` to ``dst``; the frame size or a VMCI
        error code. ``dst`` must already be a VMCIHandle.
    ``recv_status(buf, timeout=None)``
        Receive one datagram into ``buf`` (a writable 1-D byte view). Returns
        ``(payload_length, src)`` or ``(negative VMCI code, None)``:
        VMCI_ERROR_NO_MEM if the next datagram does not fit (it stays queued),
        VMCI_ERROR_TIMEOUT when ``timeout`` seconds pass,
        VMCI_ERROR_NO_MORE_DATAGRAMS if the endpoint is closed meanwhile.
        ``timeout=None`` blocks.
    """

    def __init__(self, resource: Optional[int] = None, *, runtime: Optional[Runtime] = None):
        if resource is not None and (not isinstance(resource, int) or isinstance(resource, bool)
                                     or not 0 <= resource < 0xFFFFFFFF):
            raise error_for(VMCI_ERROR_INVALID_ARGS, "resource id must be an int in 0..0xFFFFFFFE")
        self._runtime = runtime if runtime is not None else default_runtime()
        self._core = self._runtime.core
        self._transport = self._runtime.transport
        self._access = self._runtime.access
        self._bound = self._transport.bind(resource)
        self.handle: VMCIHandle = self._bound.handle
        self._listener = self._bound.listener
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._rx = self._core.Receiver(self._listener, self._wake_r, self._bound.account,
                                       self.handle.context, self.handle.resource)
        self._spill = bytearray(_SPILL_SIZE)
        self._fast = self._core.Fastpath(self._rx, self._spill,
                                         _weak_method(self, "_send_slow", VMCI_ERROR_INVALID_ARGS),
                                         _weak_method(self, "_recv_slow", (VMCI_ERROR_NO_MORE_DATAGRAMS, None)))
        self.send_status = self._fast.send_status
        self.recv_status = self._fast.recv_status
        self._recv_lock = self._fast.recv_lock
        self.stats = EndpointStats(self._fast)
        self._conns: Dict[int, tuple] = {}
        #: Connections whose sender may not reach us: the core reads their datagrams and drops them.
        self._denied_fds = set()
        #: fd -> whether its sender was last told it is denied (a link starts allowed). Where the
        #: transport tells verdicts; ``_conns`` changes under ``_verdict_lock`` too, for the pushes.
        self._verdicts = "verdicts" in self._transport.features
        #: The transport sends each datagram itself (feature ``sendto``: vsock's dgram mode,
        #: where a datagram needs no connection): no links, every send is ``_send_by_transport``.
        self._sendto = "sendto" in self._transport.features
        self._told: Dict[int, bool] = {}
        self._verdict_lock = threading.Lock()
        self._rx.watch_acl(_weak_call(self, lambda endpoint: endpoint._recheck_access()))
        #: dst -> link; the core's Fastpath has the same links (``add_link``) for its sends.
        self._links: Dict[VMCIHandle, _OpenLink] = {}
        self._link_error = None  # (dst, VMCIError): why the last link could not be opened
        self._link_lock = threading.Lock()
        self._closed = False
        self._receiver: Optional[threading.Thread] = None
        self._access.watch(self)

    @property
    def _closing(self) -> bool:
        return self._fast.closing

    @property
    def last_peer(self):
        """The kernel-verified sender (handle, pid, uid) of the last datagram received."""
        return self._fast.last_peer

    # Sending

    def _send_slow(self, dst: VMCIHandle, buf, length: int, failed) -> int:
        """``send_status`` through a fresh link (the Fastpath calls this): none was cached, or
        the sender ``failed`` found its receiver gone or its privileges changed (then one
        fresh attempt). A sealed link its receiver closed once drained (``Link.seal_when_full``;
        other threads may fill and drain a fresh one meanwhile) is replaced without counting as
        an attempt, at most MAX_RELINKS times per send."""
        if self._sendto:
            return self._send_by_transport(dst, buf, length)
        attempts = 2
        if failed is not None:
            attempts = 1
            state = self._links.get(dst)
            if state is not None and state.sender is failed:
                rc = self._judged_send(dst, state, buf, length)
                if rc is not None:
                    return rc
                self._close_link(dst, state)
        relinks = 0
        while attempts > 0:
            try:
                state = self._open_link(dst)
            except VMCIError as exc:
                self._link_error = (dst, exc)  # for send(): the transport's words, not just the code
                return exc.code
            rc = state.sender.send(buf, length)
            if rc >= 0:
                self._fast.sent += 1
                return rc
            if rc > self._core.AGAIN:  # a VMCI code; the core's own statuses are <= AGAIN
                return rc
            rc = self._judged_send(dst, state, buf, length)
            if rc is not None:
                return rc
            if state.sender.sealed and relinks < MAX_RELINKS:
                relinks += 1  # drained and closed by a live receiver: not an attempt
            else:
                attempts -= 1
            self._close_link(dst, state)
        # Still sealed ones: a live receiver, busy (other senders fill each fresh link at once).
        return VMCI_ERROR_NO_RESOURCES if state.sender.sealed else VMCI_ERROR_INVALID_RESOURCE

    def _send_by_transport(self, dst: VMCIHandle, buf, length: int) -> int:
        """``send_status`` where the transport sends each datagram (feature ``sendto``): the
        sender's checks of a link, every time, then one ``send_datagram``."""
        try:
            self._access.check_send(self.handle, dst)
            rc = self._transport.send_datagram(self.handle, dst, buf, length)
        except VMCIError as exc:
            self._link_error = (dst, exc)
            return exc.code
        self._fast.sent += 1
        return rc

    def _judged_send(self, dst: VMCIHandle, state: _OpenLink, buf, length: int) -> Optional[int]:
        """Send again on a link whose send was refused, if it was for the receiver's verdict:
        VMCI_ERROR_NO_ACCESS while denied. None: the link is gone or has no verdicts."""
        verdict = state.link.verdict
        if verdict is None or verdict.ended:
            return None
        if verdict.watch(state.sender):
            self._link_error = (dst, NoAccess("%s is denied DG_SEND on %s (the receiver's verdict)"
                                              % (self.handle, dst)))
            return VMCI_ERROR_NO_ACCESS
        rc = state.sender.send(buf, length)
        if rc >= 0:
            self._fast.sent += 1
            return rc
        return rc if rc > self._core.AGAIN else None

    def send(self, dst, data, length: Optional[int] = None) -> int:
        """Send a datagram to ``dst``; return the payload length sent. Raises VMCIError."""
        if type(dst) is VMCIHandle and type(data) is bytes and length is None \
                and len(data) <= VMCI_MAX_DG_PAYLOAD_SIZE:  # the common case, checked cheaply
            self._raise_for(self.send_status(dst, data, len(data)), dst)
            return len(data)
        dst = as_handle(dst)
        view = _byte_view(data, writable=False)
        if length is None:
            length = len(view)
        elif not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= len(view):
            raise error_for(VMCI_ERROR_INVALID_ARGS, "length must be an int in 0..len(data)")
        if length > VMCI_MAX_DG_PAYLOAD_SIZE:
            raise error_for(VMCI_ERROR_INVALID_ARGS, "payload of %d bytes exceeds %d"
                            % (length, VMCI_MAX_DG_PAYLOAD_SIZE))
        if self._closing:
            raise error_for(VMCI_ERROR_INVALID_ARGS, "endpoint %s is closed" % (self.handle,))
        self._raise_for(self.send_status(dst, view, length), dst)
        return length

    def _raise_for(self, rc: int, dst: VMCIHandle) -> None:
        """Raise the error of a failed ``send_status`` to ``dst`` with the most telling message."""
        if rc >= 0:
            return
        failed, self._link_error = self._link_error, None
        if failed is not None and failed[0] == dst and failed[1].code == rc:
            raise failed[1]
        raise error_for(rc, "endpoint %s is closed" % (self.handle,) if self._closing else None)

    def _open_link(self, dst: VMCIHandle) -> _OpenLink:
        with self._link_lock:
            state = self._links.get(dst)
            if state is not None:
                return state
            stale = self._stale_links()
        for old_dst, old_state in stale:
            self._close_link(old_dst, old_state)
        self._access.check_interaction(self.handle.context, dst.context, "datagram to %s" % (dst,))
        with self._link_lock:
            state = self._links.get(dst)
            if state is None:
                link = self._transport.connect(self.handle, dst)
                sender = self._core.Link(link.sock, link.account, dst[0], dst[1], *self.handle)
                state = _OpenLink(sender, link)  # the epoch first, then the privileges it covers
                try:
                    self._access.check_send(self.handle, dst)
                except BaseException:
                    sender.close()
                    self._transport.disconnect(self.handle, link)
                    raise
                self._links[dst] = state
                self._fast.add_link(dst, sender)
            return state

    def _stale_links(self) -> list:
        """Links whose receiver hung up, then the oldest ones past MAX_LINKS. Under _link_lock."""
        poller = select.poll()
        by_fd = {}
        stale = []
        for dst, state in self._links.items():
            if state.link.direct:  # its receiver writes verdicts on it: its watch sees hang-ups
                if state.link.verdict.ended:
                    stale.append((dst, state))
                continue
            fd = state.link.sock.fileno()
            by_fd[fd] = (dst, state)
            poller.register(fd, select.POLLIN)
        # A receiver never writes on a pumped link's end: any event is a hang-up or an error.
        stale.extend(by_fd[fd] for fd, _ in poller.poll(0))
        excess = len(self._links) - len(stale) - (MAX_LINKS - 1)
        if excess > 0:
            gone = {dst for dst, _ in stale}
            stale.extend([item for item in self._links.items() if item[0] not in gone][:excess])
        return stale

    def forget(self, dst) -> None:
        """Close the cached link to ``dst``, if any (the next send opens a fresh one)."""
        dst = as_handle(dst)
        state = self._links.get(dst)
        if state is not None:
            self._close_link(dst, state)

    def _close_link(self, dst: VMCIHandle, state: _OpenLink) -> None:
        with self._link_lock:
            if self._links.get(dst) is not state:
                return
            del self._links[dst]
            self._fast.drop_link(dst)
        state.sender.close()
        self._transport.disconnect(self.handle, state.link)
        if state.link.verdict is not None and state.link.verdict.garbled:
            self.stats.bad_verdicts += 1

    # Receiving

    def _recv_slow(self, buf, timeout, status, peer):
        """The rest of ``recv_status`` (the Fastpath calls this under the receive lock): a held
        datagram, waits with a timeout, connections to accept, datagrams that do not fit or are
        dropped, and closing. ``status``/``peer``: what the Fastpath's receive got, if any."""
        fast = self._fast
        if fast.held is not None:
            return self._deliver_held(buf)
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        core, rx = self._core, self._rx
        while True:
            if status is None:
                wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                status, peer = rx.take(buf, self._spill, wait)
            if status >= 0:
                fast.last_peer = peer
                fast.received += 1
                if status > len(buf):
                    fast.held = Datagram(peer.handle, bytes(buf) + bytes(self._spill[: status - len(buf)]))
                    return VMCI_ERROR_NO_MEM, None
                return status, peer.handle
            if status == core.AGAIN:
                return VMCI_ERROR_TIMEOUT, None
            if status == core.DENIED:
                self.stats.denied += 1  # read (its bytes left our queue account) and dropped
            elif status == core.ACCEPT:
                self._accept()
            elif status == core.WAKE:
                self._drain_wake()
                if self._closing:
                    return VMCI_ERROR_NO_MORE_DATAGRAMS, None
            else:
                if status == core.FORGED:
                    self.stats.forged += 1
                elif status == core.BAD_FRAME:
                    self.stats.bad_frames += 1
                self._drop_conn(rx.last_fd)
            status = None

    def _deliver_held(self, buf):
        held = self._fast.held
        if len(held.payload) > len(buf):
            return VMCI_ERROR_NO_MEM, None
        buf[: len(held.payload)] = held.payload
        self._fast.held = None
        return len(held.payload), held.src

    def recv_into(self, buf, timeout: Optional[float] = None) -> Tuple[int, VMCIHandle]:
        """Receive into ``buf``; return ``(payload_length, src)``. Raises VMCIError."""
        n, src = self.recv_status(buf if type(buf) is bytearray else _byte_view(buf, writable=True), timeout)
        if n < 0:
            raise error_for(n)
        return n, src

    def recv(self, timeout: Optional[float] = None) -> Datagram:
        """Receive one datagram. Raises ``errors.Timeout`` after ``timeout`` seconds."""
        buf = bytearray(_SPILL_SIZE)
        n, src = self.recv_status(memoryview(buf), timeout)
        check(n)
        return Datagram(src, bytes(buf[:n]))

    def __iter__(self) -> Iterator[Datagram]:
        """Yield datagrams until the endpoint is closed."""
        buf = bytearray(_SPILL_SIZE)
        view = memoryview(buf)
        while True:
            n, src = self.recv_status(view)
            if n == VMCI_ERROR_NO_MORE_DATAGRAMS:
                return
            check(n)
            yield Datagram(src, bytes(buf[:n]))

    def on_receive(self, callback: Callable[[Datagram], None]) -> threading.Thread:
        """Call ``callback(datagram)`` on a receive thread until the endpoint is closed."""
        if self._receiver is not None:
            raise error_for(VMCI_ERROR_INVALID_ARGS, "a receive callback is already set")

        def run():
            for datagram in self:
                try:
                    callback(datagram)
                except Exception:
                    log.exception("receive callback of endpoint %s failed", self.handle)

        self._receiver = threading.Thread(target=run, name="vsockcompat-recv-%d" % self.handle.resource,
                                          daemon=True)
        self._receiver.start()
        return self._receiver

    def _accept(self) -> None:
        """Accept every pending connection; serve those whose sender the transport can identify."""
        while True:
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("endpoint %s cannot accept a connection: %s", self.handle, exc)
                    return
                raise
            try:
                peer = self._transport.identify(conn, self.handle)
            except OSError:
                peer = None
            if peer is None or not self._identity_allowed(peer):
                self.stats.refused_connections += 1
                conn.close()
                continue
            conn.setblocking(True)  # so the core may read it hot; its other reads never block
            fd = conn.fileno()
            with self._verdict_lock:  # read the privileges in the lock: a change then pushes after us
                denied = not self._access.may_send(peer.handle, self.handle)
                self._conns[fd] = (conn, peer)
                if denied and self._verdicts:
                    self._told[fd] = True
                    self._transport.tell(conn, True)
            self._rx.add(conn, peer.handle.context, peer.handle.resource, peer)
            if denied:
                self._denied_fds.add(fd)
                self._rx.deny(fd, True)

    def _identity_allowed(self, peer) -> bool:
        """Whether the policy lets ``peer``'s user act as ``peer``'s context."""
        owner = self._access.policy.uid(peer.handle.context)
        return owner is None or peer.uid is None or peer.uid == owner

    def acl_changed(self) -> None:
        """This endpoint's privileges changed: check every sender again before the next delivery,
        and (feature ``verdicts``) tell at once each sender whose verdict changed."""
        self._rx.acl_changed()
        if self._verdicts:
            self._push_verdicts()

    def _push_verdicts(self) -> None:
        with self._verdict_lock:
            if self._closing:
                return
            may_send = self._access.send_checker(self.handle)
            for fd, (conn, peer) in self._conns.items():
                denied = not may_send(peer.handle)
                if self._told.get(fd, False) != denied:
                    self._told[fd] = denied
                    self._transport.tell(conn, denied)

    def _recheck_access(self) -> None:
        """Called by the core (receive lock held) once the ACL epoch word has been read again."""
        may_send = self._access.send_checker(self.handle)
        denied = {fd for fd, (_, peer) in self._conns.items() if not may_send(peer.handle)}
        for fd in self._conns:
            self._rx.deny(fd, fd in denied)
        self._denied_fds = denied

    def _drop_conn(self, fd: int) -> None:
        self._rx.remove(fd)
        self._denied_fds.discard(fd)
        with self._verdict_lock:
            self._told.pop(fd, None)
            self._conns.pop(fd)[0].close()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 64):
                pass
        except BlockingIOError:
            pass

    # Life cycle

    def fileno(self) -> int:
        return self._rx.fileno()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued_bytes(self) -> int:
        """Bytes (headers included) queued for this endpoint and not yet received."""
        return self._bound.account.queued()

    def close(self) -> None:
        """Destroy the endpoint: pending datagrams are dropped, senders see it gone."""
        if self._closing:
            return
        self._fast.closing = True
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass
        receiver = self._receiver
        if receiver is not None and receiver is not threading.current_thread():
            receiver.join()
        self._access.unwatch(self)
        with self._recv_lock:
            self._transport.unbind(self._bound)
            self._rx.close()
            with self._verdict_lock:
                for conn, _ in self._conns.values():
                    conn.close()
                self._conns.clear()
                self._told.clear()
            with self._link_lock:
                links, self._links = self._links, {}
                self._fast.clear_links()
            for state in links.values():
                state.sender.close()
                self._transport.disconnect(self.handle, state.link)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._closed = True

    def __enter__(self) -> "DatagramEndpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self):
        return "<DatagramEndpoint %s%s>" % (tuple(self.handle), " closed" if self._closed else "")

    def __del__(self):
        if not getattr(self, "_closing", True):
            try:
                self.close()
            except Exception:
                pass
