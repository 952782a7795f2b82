"""The transport interface every transport implements."""
import abc
from typing import FrozenSet, NamedTuple, Optional

from ..handles import VMCIHandle


class TransportUnavailable(RuntimeError):
    """The requested transport cannot run here."""


class Peer(NamedTuple):
    """Who is on the other end of an accepted connection, as the kernel says."""

    handle: VMCIHandle  # the sending endpoint
    pid: int
    uid: int


class Bound(NamedTuple):
    """A bound datagram endpoint: its listening socket and queue account."""

    handle: VMCIHandle
    listener: object  # socket.socket
    account: object  # core.Account
    page: object  # the mapping behind the account


class Link(NamedTuple):
    """A connection from one of our endpoints to a destination endpoint."""

    sock: object  # socket.socket
    account: object  # core.Account of the destination
    page: object
    verdict: object = None  # a LinkVerdict where the receiver tells its verdicts (feature "verdicts")
    #: The core sends on the connection itself, whose non-blocking send may cut a message when
    #: full: its sender must ``seal_when_full`` (AF_VSOCK SEQPACKET links, ``streams.py``).
    direct: bool = False


class Transport(abc.ABC):
    """Operations a transport provides (cf. ``struct vsock_transport``)."""

    name: str = ""
    features: FrozenSet[str] = frozenset()

    @property
    @abc.abstractmethod
    def local_cid(self) -> int:
        """This process's context id."""

    # Endpoints
    @abc.abstractmethod
    def bind(self, resource: Optional[int]) -> Bound:
        """Create an endpoint at ``(local_cid, resource)``, or at a fresh id >= 1024 if None."""

    @abc.abstractmethod
    def unbind(self, bound: Bound) -> None:
        """Destroy an endpoint: it stops accepting, and senders see it gone."""

    # Links
    @abc.abstractmethod
    def connect(self, src: VMCIHandle, dst: VMCIHandle) -> Link:
        """Open a link from our endpoint ``src`` to ``dst``; raises a VMCIError."""

    @abc.abstractmethod
    def disconnect(self, src: VMCIHandle, link: Link) -> None:
        """Close a link opened by ``connect``."""

    # Identity
    @abc.abstractmethod
    def identify(self, conn, dst: VMCIHandle) -> Optional[Peer]:
        """The kernel-verified sender of an accepted connection, or None to refuse it."""

    def tell(self, conn, denied: bool) -> None:
        """Tell the sender of the accepted ``conn`` whether it is denied DG_SEND (feature
        ``verdicts``: its senders cannot read our privileges). Never blocks; by default nothing."""

    # Introspection
    @abc.abstractmethod
    def endpoint_alive(self, handle: VMCIHandle) -> bool:
        """Whether an endpoint exists at ``handle`` (for the discovery service)."""
