"""Stream writes cut to fit a sibling guest's receive buffers (guest <-> guest vsock).

``vhost-device-vsock`` (0.3.0), the only backend here that carries traffic between two guests
behind one daemon ("siblings"), forwards each packet of one guest by copying it whole into ONE
receive buffer of the other (``recv_raw_pkt``). A Linux guest posts receive buffers of about
4 KiB, while its virtio transport turns one ``send()`` into packets of up to 64 KiB. A packet
that does not fit is dropped; the stream it belonged to misses bytes and stalls (measured: a
write of 3,500 bytes crossed, one of 3,800 bytes was lost and the link stayed stuck).

The guest kernel makes each ``send()`` into packets of at most that call's bytes and never
merges calls, so a writer that sends at most ``SIBLING_PIECE`` bytes per call keeps every packet
small enough. Only links between two distinct guests (both CIDs above 2, the host's) need it:
host <-> guest traffic passes the daemon's Unix sockets, which read what the buffer holds, and
loopback never leaves the kernel. ``piece_for`` decides once per connection (its owner keeps
the answer); ``send_all`` writes with it (the queue-pair core takes it as ``max_send``).

Only SOCK_STREAM can be cut: a SEQPACKET message is one packet whatever its size, so
``piece_for`` answers None for it. Between siblings the vsock transport runs in stream mode
anyway: vhost-device-vsock has no SEQPACKET (connects fail with ``ESOCKTNOSUPPORT``).
"""
import socket
from typing import Optional

from ..constants import AF_VSOCK, VMADDR_CID_ANY, VMADDR_CID_HOST

#: Bytes per ``send()`` on a stream between sibling guests: half a guest's 4 KiB receive buffer,
#: well below the 3,500 bytes measured to cross.
SIBLING_PIECE = 2048


def piece_between(local_cid: int, peer_cid: int) -> Optional[int]:
    """``SIBLING_PIECE`` when both CIDs name distinct guests, else None (no need to cut)."""
    guests = all(VMADDR_CID_HOST < cid < VMADDR_CID_ANY for cid in (local_cid, peer_cid))
    return SIBLING_PIECE if guests and local_cid != peer_cid else None


def piece_for(sock: socket.socket, local_cid: int) -> Optional[int]:
    """The piece size for writes on the connected ``sock``, or None to write it whole.

    ``local_cid`` is this kernel's CID as the transport read it (``IOCTL_VM_SOCKETS_GET_LOCAL_CID``:
    a connecting socket's ``getsockname`` says ``VMADDR_CID_ANY``). A piece only for an AF_VSOCK
    SOCK_STREAM connection whose peer is another guest; None for any other socket, and for one
    whose peer the kernel cannot name (not connected).
    """
    if sock.family != AF_VSOCK or sock.type != socket.SOCK_STREAM:
        return None
    try:
        peer_cid = sock.getpeername()[0]
    except OSError:
        return None
    return piece_between(local_cid, peer_cid)


def bytes_view(buf) -> memoryview:
    """``buf`` (any buffer) as a flat view of bytes, without copying."""
    view = memoryview(buf)
    return view if view.ndim == 1 and view.format in ("B", "b", "c") else view.cast("B")


def send_all(sock: socket.socket, data, piece: Optional[int] = None) -> None:
    """``sock.sendall(data)``, in calls of at most ``piece`` bytes (None: one call)."""
    if piece is None:
        sock.sendall(data)
        return
    view = bytes_view(data)
    for pos in range(0, len(view), piece):
        sock.sendall(view[pos:pos + piece])


__all__ = ["SIBLING_PIECE", "bytes_view", "piece_between", "piece_for", "send_all"]
