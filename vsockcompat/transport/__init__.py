"""Transports: how datagram endpoints of different contexts reach each other.

Shaped like the kernel's ``struct vsock_transport``: a table of operations
grouped by concern (endpoints, links, identity), with feature flags. The local
transport is our ``vsock_loopback``.
"""
from ..constants import VMCI_WELL_KNOWN_CONTEXT_ID
from .base import Transport, TransportUnavailable
from .local import LocalTransport


def open_transport(settings, core):
    """Return the transport ``settings.transport`` names.

    ``auto`` is the local transport: deciding never opens AF_VSOCK (on a VM, any AF_VSOCK
    traffic leaves for the hypervisor host). ``vsock`` is attempted only when asked for; its
    context id is the kernel's, not ``settings.cid``, except that ``cid`` 1 makes the process
    speak for the well-known context (the discovery service, on a host); its socket type is
    ``settings.vsock_mode``. ``hybrid`` (the host side of VMMs' hybrid vsock) needs
    ``settings.hybrid``, the VMM sockets and their guests' CIDs; its endpoints are in context 2
    (or 1, as on vsock).
    """
    name = settings.transport
    if name in ("auto", "local"):
        return LocalTransport(settings.rundir, settings.cid, core)
    if name == "vsock":
        from .vsock import VsockTransport

        context = VMCI_WELL_KNOWN_CONTEXT_ID if settings.cid == VMCI_WELL_KNOWN_CONTEXT_ID else None
        return VsockTransport(core, context=context, mode=getattr(settings, "vsock_mode", "auto"))
    if name == "hybrid":
        from .hybrid import HybridTransport

        guests = getattr(settings, "hybrid", ())
        if not guests:
            raise TransportUnavailable("the hybrid transport needs VSOCKCOMPAT_HYBRID_UDS, the "
                                       "path(s) of the VMMs' vsock Unix sockets")
        context = VMCI_WELL_KNOWN_CONTEXT_ID if settings.cid == VMCI_WELL_KNOWN_CONTEXT_ID else None
        return HybridTransport(core, guests, context=context)
    raise TransportUnavailable(
        "the %r transport is not part of this release; use VSOCKCOMPAT_TRANSPORT=local" % name
    )


__all__ = ["LocalTransport", "Transport", "TransportUnavailable", "open_transport"]
