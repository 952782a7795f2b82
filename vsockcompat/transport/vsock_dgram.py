"""The ``dgram`` mode of the vsock transport: one AF_VSOCK ``SOCK_DGRAM`` socket per endpoint.

Only VMware's VMCI transport carries vsock datagrams. Since Linux 5.5 (multi-transport vsock)
``socket(AF_VSOCK, SOCK_DGRAM)`` assigns the datagram transport at creation: ``vsock_create``
calls ``vsock_assign_transport``, which takes ``transport_dgram`` for SOCK_DGRAM and returns
``-ENODEV`` when none is registered (``net/vmw_vsock/af_vsock.c``). virtio, vhost, loopback and
Hyper-V register none, so there the socket cannot even be created, and ``choose_mode`` (which
only creates sockets) tells the modes apart without traffic. Before 5.5 a DGRAM socket was
created whatever the transport and failed only when used: there ``auto`` may take ``dgram``
where it cannot work (as a SEQPACKET socket of a kernel >= 5.14 that only fails at connect), and
``VSOCKCOMPAT_VSOCK_MODE`` must name the mode.

Mapping (the spec both cores follow):

* endpoint ``(context, rid)`` = one DGRAM socket bound to ``(VMADDR_CID_ANY, rid)``: ids from
  1024 upwards as in the other modes; a port in use gives ``DuplicateEntry``, a port <= 1023
  without ``CAP_NET_BIND_SERVICE`` ``NoAccess`` (``vmci_transport_dgram_bind`` returns EACCES).
  The endpoint also holds STREAM port ``rid`` (bound, never listening), so that a mirrored
  region or streamed queue pair cannot take its handle (``DgramMode._bind_both``).
  Resource 1 is the discovery service's: on a host (or loopback-only) kernel only a transport of
  the well-known context 1 binds it, a context-2 endpoint asking for it gets ``NoAccess``, and a
  context-1 transport binds nothing else (the kernel's address could not name it context 1).
* a datagram = one vsock datagram carrying the SDK payload only: no hello, no header, no
  verdicts. The kernel's own VMCI datagram header carries source and destination, and
  ``vmci_transport_dgram_enqueue`` refuses more than ``VMCI_MAX_DG_PAYLOAD_SIZE`` (69,608) bytes.
  It leaves with ``sendto`` from the sending endpoint's own bound socket, so the kernel stamps its
  rid as the source port, to the CID at which this kernel reaches the destination's context
  (context 1 at ``well_known_cid``, as in the link modes).
* the source of a received datagram is the kernel's address only (``recvfrom``): CID 1
  (``VMADDR_CID_LOCAL``) and the local CID are our own context, and port 1
  (``VMCI_DS_RESOURCE_ID``) of the CID at which we reach context 1 is ``(1, 1)``, the discovery
  daemon (on a host kernel its context-1 transport holds DGRAM port 1). A payload that looks like
  an SDK frame is only payload: nothing in it is read.

Design. Sends need no thread: the endpoint gives each datagram to ``send_datagram`` (feature
``sendto``), one non-blocking ``sendto`` on the caller's thread; the kernel decides at once, so
``EAGAIN``/``ENOBUFS`` become ``VMCI_ERROR_NO_RESOURCES`` (the other errnos: ``sendto_error``) and a link to cache would
buy nothing (a DGRAM socket has no connection). Receives reuse the core unchanged: a
``DgramListener`` stands where a listening socket stands in the other modes. Its reader thread
``recvfrom``s the endpoint's socket and hands each datagram to the core as a frame (the SDK's
header, built from the kernel's address, then the payload) on an AF_UNIX SEQPACKET pair of that
source, which the endpoint accepts as it accepts a connection; so the core's checks, delivery
order, truncation (``VMCI_ERROR_NO_MEM``, the datagram stays queued) and privileges (a denied
source's pair is read and dropped: ``stats.denied``) are the link modes' own. At most
``MAX_SOURCES`` pairs live at once; a new source past that closes the least recently heard one
(its datagrams still queued are delivered first). A datagram over the SDK's maximum (only a
non-VMCI sender can make one) is handed on alone, on a pair of its own, as a frame announcing
its size, which the core drops as a bad frame (``stats.bad_frames``).

Loss. Like VMware's own AF_VSOCK datagrams, dgram mode can lose datagrams and tells no sender:
privileges are enforced by the receiver, which drops and counts; the queue bound is the
receiving kernel's socket buffer (plus the source's pair, whose reader waits while it is full),
and a kernel whose receiving buffer is full drops what arrives (VMCI) or makes the sender's
``sendto`` fail with ``EAGAIN`` (``NO_RESOURCES``). No account of the SDK's 139,264 queued bytes
is kept. Queue pairs and mirrored regions keep using STREAM connections (VMCI carries STREAM).
"""
import collections
import errno
import os
import select
import socket
import struct
import threading
from typing import Callable, Optional, Tuple

from ..constants import (
    DG_HEADER_FORMAT,
    VMADDR_CID_ANY,
    VMADDR_CID_LOCAL,
    VMADDR_PORT_ANY,
    VMCI_DG_HEADERSIZE,
    VMCI_DS_RESOURCE_ID,
    VMCI_ERROR_GENERIC,
    VMCI_HYPERVISOR_CONTEXT_ID,
    VMCI_ERROR_NO_MEM,
    VMCI_MAX_DG_PAYLOAD_SIZE,
    VMCI_WELL_KNOWN_CONTEXT_ID,
)
from ..errors import (DstUnreachable, DuplicateEntry, InvalidArgs, InvalidResource, NoAccess,
                      NoResources, error_for)
from ..handles import VMCI_DS_HANDLE, VMCIHandle
from .base import Bound, Peer
from .handover import HandOver

#: Ids tried, upwards, for one auto-assigned resource id (as ``vsock.AUTO_RID_TRIES``).
AUTO_RID_TRIES = 65536
#: Sources with a live pair per endpoint; the least recently heard one goes first.
MAX_SOURCES = 256
#: The features of the vsock transport in dgram mode: the endpoint hands each datagram to
#: ``send_datagram``; no verdicts (there is no channel back to a sender).
DGRAM_FEATURES = frozenset({"dgram", "peer-identity", "sendto"})
JOIN_TIMEOUT = 5.0

_HEADER = struct.Struct(DG_HEADER_FORMAT)
_PAIR = socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
_PAIR_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)


class DgramListener(HandOver):
    """What an endpoint in dgram mode listens with: its bound DGRAM socket and a reader thread.

    ``sock`` is the endpoint's socket (sends leave on it too); ``reserve``, if given, a socket
    held until ``close`` (the endpoint's STREAM port, ``DgramMode._bind_both``). The reader
    names each datagram's source with ``identify((cid, port))`` (None: dropped, counted in
    ``unknown``) and forwards it as a frame to ``handle`` on that source's AF_UNIX SEQPACKET
    pair, whose core end the endpoint accepts (``HandOver``) with the source as its ``Peer``.
    """

    def __init__(self, sock, handle: VMCIHandle,
                 identify: Callable[[Tuple[int, int]], Optional[VMCIHandle]], name: str,
                 reserve=None):
        HandOver.__init__(self)
        self.sock = sock
        self._reserve = reserve
        self.unknown = 0
        self._handle = handle
        self._identify = identify
        self._pairs = collections.OrderedDict()  # source handle -> the back end of its pair
        sock.setblocking(False)
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name="vsockcompat-%s-dgram" % name)
        self._reader.start()

    def tell(self, front, denied: bool) -> bool:
        """No verdicts in dgram mode (no channel back to a sender): True if ``front`` is ours."""
        with self._lock:
            return front in self._peers

    # The reader

    def _read_loop(self) -> None:
        buf = bytearray(VMCI_DG_HEADERSIZE + VMCI_MAX_DG_PAYLOAD_SIZE + 1)
        view = memoryview(buf)
        payload = view[VMCI_DG_HEADERSIZE:]
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        try:
            while True:
                if any(fd == self._stop_r for fd, _ in poller.poll()):
                    return
                try:
                    n, _, flags, address = self.sock.recvmsg_into([payload])
                except (BlockingIOError, InterruptedError):
                    continue
                src = self._identify(address)
                if src is None:
                    self.unknown += 1
                    continue
                if flags & socket.MSG_TRUNC:
                    n = len(payload)
                _HEADER.pack_into(buf, 0, self._handle.context, self._handle.resource,
                                  src.context, src.resource, n)
                frame = view[:VMCI_DG_HEADERSIZE + n]
                if n > VMCI_MAX_DG_PAYLOAD_SIZE:
                    self._hand_over_alone(src, frame)
                elif not self._forward(src, frame):
                    return
        except (OSError, ValueError):  # the socket was closed under the reader
            return
        finally:
            payload.release()
            view.release()

    def _forward(self, src: VMCIHandle, frame) -> bool:
        """Send ``frame`` on ``src``'s pair, waiting while it is full; False once closing."""
        for _ in range(2):  # a pair the endpoint dropped is replaced once
            back = self._back_for(src)
            if back is None:
                return False
            poller = None
            while True:
                try:
                    back.send(frame, socket.MSG_DONTWAIT)
                    return True
                except BlockingIOError:
                    if poller is None:
                        poller = select.poll()
                        poller.register(back, select.POLLOUT)
                        poller.register(self._stop_r, select.POLLIN)
                    if any(fd == self._stop_r for fd, _ in poller.poll()):
                        return False
                except OSError as exc:
                    if exc.errno not in _PAIR_GONE:
                        raise
                    self._drop_pair(src, back)
                    break
        return True  # dropped: the endpoint refused two pairs of this source in a row

    def _hand_over_alone(self, src: VMCIHandle, frame) -> None:
        """Hand ``frame`` (over the SDK's maximum) to the core on a pair of its own, which the
        core drops as a bad frame, leaving ``src``'s own pair and what waits in it alone."""
        front, back = socket.socketpair(socket.AF_UNIX, _PAIR)
        try:
            back.send(frame, socket.MSG_DONTWAIT)  # an empty pair holds one frame of any size
            with self._lock:
                if self._closed:
                    return
                self._hand_over(front, Peer(src, 0, None))
                front = None
        finally:
            back.close()
            if front is not None:
                front.close()

    def _back_for(self, src: VMCIHandle):
        """The back end of ``src``'s pair, made (and queued for ``accept``) if it has none."""
        evicted = None
        with self._lock:
            if self._closed:
                return None
            back = self._pairs.get(src)
            if back is not None:
                self._pairs.move_to_end(src)
                return back
            front, back = socket.socketpair(socket.AF_UNIX, _PAIR)
            self._pairs[src] = back
            self._hand_over(front, Peer(src, 0, None))  # pid 0, uid None: not known across kernels
            if len(self._pairs) > MAX_SOURCES:
                evicted = self._pairs.popitem(last=False)[1]
        if evicted is not None:
            evicted.close()  # the endpoint reads what it holds, then its end
        return back

    def _drop_pair(self, src: VMCIHandle, back) -> None:
        with self._lock:
            if self._pairs.get(src) is back:
                del self._pairs[src]
        back.close()

    def close(self) -> None:
        """Stop the reader, close the socket, every pair end the endpoint was not handed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        os.write(self._stop_w, b"\0")
        self._reader.join(JOIN_TIMEOUT)
        self.sock.close()
        if self._reserve is not None:
            self._reserve.close()
        with self._lock:
            backs, self._pairs = list(self._pairs.values()), collections.OrderedDict()
            queued = self._take_waiting()
        for sock in backs + queued:
            sock.close()
        self.close_pipes()


class DgramMode:
    """The dgram-mode operations of ``VsockTransport`` (which provides ``_socket``, the bind
    helpers, ``vsock_address``, ``link_error`` and the endpoint table)."""

    def _bind_dgram(self, resource: Optional[int]) -> Bound:
        well_known_here = self.vsock_address(VMCI_DS_HANDLE)[0] == VMADDR_CID_LOCAL
        if self._well_known and resource != VMCI_DS_RESOURCE_ID:
            raise NoAccess("in dgram mode context 1 has only resource %d (the discovery service): "
                           "the kernel's address names no other" % VMCI_DS_RESOURCE_ID)
        if (not self._well_known and well_known_here and resource == VMCI_DS_RESOURCE_ID):
            raise NoAccess("resource %d is the discovery service's datagram port on this kernel "
                           "(context 1), not context %d's" % (VMCI_DS_RESOURCE_ID, self._cid))
        sock, reserve, rid = self._bind_both(resource)
        try:
            handle = VMCIHandle(self._cid, rid)
            listener = DgramListener(sock, handle, self.dgram_source, "vsock-%d" % rid, reserve)
        except BaseException:
            sock.close()
            reserve.close()
            raise
        try:
            account, page = self._private_account()
        except BaseException:
            listener.close()
            raise
        with self._lock:
            self._bound[rid] = listener
        return Bound(handle, listener, account, page)

    def _bind_both(self, resource: Optional[int]):
        """``(dgram socket, stream socket, rid)``, both bound to port ``rid`` (None: the first
        id from 1024 up free in both port spaces). The kernel keeps DGRAM ports apart from the
        STREAM/SEQPACKET ones where mirrored regions and streamed queue pairs listen; holding
        the STREAM port too (bound, never listening: a connect to it is refused) keeps one
        handle naming one resource, as in the link modes. DuplicateEntry if either is taken."""
        for _ in range(AUTO_RID_TRIES if resource is None else 1):
            reserve = self._socket(socket.SOCK_STREAM)
            sock = None
            try:
                if resource is None:
                    rid = self._bind_auto(reserve)
                else:
                    rid = self._bind_explicit(reserve, resource)
                sock = self._socket()
                self._bind_explicit(sock, rid)
                return sock, reserve, rid
            except BaseException as exc:
                reserve.close()
                if sock is not None:
                    sock.close()
                if resource is not None or not isinstance(exc, DuplicateEntry):
                    raise
        raise NoResources("no resource id free for both datagrams and streams in %d tries"
                          % AUTO_RID_TRIES)

    def dgram_source(self, address: Tuple[int, int]) -> Optional[VMCIHandle]:
        """The handle of the sender the kernel places at ``address``; None if it names none."""
        try:
            cid, port = address
        except (TypeError, ValueError):
            return None
        if cid == VMADDR_CID_ANY or port == VMADDR_PORT_ANY:
            return None
        own = cid in (VMADDR_CID_LOCAL, self._kcid)
        well_known_cid = self.vsock_address(VMCI_DS_HANDLE)[0]
        if port == VMCI_DS_RESOURCE_ID and (cid == well_known_cid
                                            or (own and well_known_cid == VMADDR_CID_LOCAL)):
            return VMCI_DS_HANDLE
        return VMCIHandle(self._kcid if own else cid, port)

    def send_datagram(self, src: VMCIHandle, dst: VMCIHandle, buf, length: int) -> int:
        """Send ``length`` bytes of ``buf`` from our endpoint ``src`` to ``dst``: one ``sendto``
        that never blocks. Returns the datagram's size with the SDK's 24-byte header; raises
        the VMCIError of a failure (``NO_RESOURCES`` when the kernel's buffers are full)."""
        view = memoryview(buf)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        most = min(len(view), VMCI_MAX_DG_PAYLOAD_SIZE)
        if type(length) is not int or not 0 <= length <= most:
            raise InvalidArgs("length %r is not in 0..%d" % (length, most))
        if dst.context in (VMCI_HYPERVISOR_CONTEXT_ID, VMADDR_CID_ANY):
            raise DstUnreachable("context %d cannot be reached over vsock" % dst.context)
        if dst.resource == VMADDR_PORT_ANY:
            raise InvalidResource("no endpoint %s" % (tuple(dst),))
        with self._lock:
            listener = self._bound.get(src.resource)
        if not isinstance(listener, DgramListener):
            raise InvalidArgs("no endpoint %s here" % (tuple(src),))
        try:
            listener.sock.sendto(view[:length], socket.MSG_DONTWAIT, self.vsock_address(dst))
        except OSError as exc:
            error = sendto_error(exc, dst, length, self._kcid)
            if error is None:
                error = self.link_error(exc, dst)
            if error is None:
                error = error_for(VMCI_ERROR_GENERIC, "datagram to %s failed: %s"
                                  % (tuple(dst), os.strerror(exc.errno or 0)))
            raise error from None
        return VMCI_DG_HEADERSIZE + length


def well_known_destination(dst: VMCIHandle, local_cid: int) -> bool:
    """Whether ``dst`` is a well-known service: the discovery service's ``(1, 1)``, or any handle of
    context 1 on a kernel whose own CID is not 1 (on a loopback-only kernel, CID 1, context 1 is
    also the kernel's own context)."""
    return dst.context == VMCI_WELL_KNOWN_CONTEXT_ID and (
        dst.resource == VMCI_DS_RESOURCE_ID or local_cid != VMADDR_CID_LOCAL)


def sendto_error(exc: OSError, dst: VMCIHandle, length: int, local_cid: int):
    """The VMCIError of a failed datagram ``sendto`` that differs from a failed link's, else None.

    vmci_transport turns VMCI's codes into errnos (vmci-sdk.md 10.2); this undoes it where it can:
    ``EHOSTUNREACH`` is ``VMCI_ERROR_INVALID_RESOURCE`` (nothing at that resource; for a
    well-known destination the SDK's ``DST_UNREACHABLE``), ``EINVAL`` (our arguments were
    checked first) the codes it folds into it, such as an unknown context (``DST_UNREACHABLE``),
    ``ENOMEM`` is ``NO_MEM``, ``EMSGSIZE`` a datagram over the limit.
    """
    code = exc.errno
    if code == errno.EMSGSIZE:
        return InvalidArgs("the kernel refuses %d bytes as one datagram" % length)
    if code == errno.EHOSTUNREACH and not well_known_destination(dst, local_cid):
        return InvalidResource("no endpoint %s (%s)" % (tuple(dst), os.strerror(code)))
    if code in (errno.EHOSTUNREACH, errno.EINVAL):
        return DstUnreachable("%s cannot be reached (%s)" % (tuple(dst), os.strerror(code)))
    if code == errno.ENOMEM:
        return error_for(VMCI_ERROR_NO_MEM, "no memory for a datagram to %s" % (tuple(dst),))
    return None


__all__ = ["sendto_error", "DgramListener", "DgramMode", "DGRAM_FEATURES", "MAX_SOURCES"]
