"""Transports: how datagram endpoints of different contexts reach each other.

Shaped like the kernel's ``struct vsock_transport``: a table of operations
grouped by concern (endpoints, links, identity), with feature flags. The local
transport is our ``vsock_loopback``.
"""
from .base import Transport, TransportUnavailable
from .local import LocalTransport


def open_transport(settings, core):
    """Return the transport ``settings.transport`` names.

    ``auto`` is the local transport: deciding never opens AF_VSOCK (on a VM, any AF_VSOCK
    traffic leaves for the hypervisor host). ``vsock`` is attempted only when asked for; its
    context id is the kernel's, not ``settings.cid``.
    """
    name = settings.transport
    if name in ("auto", "local"):
        return LocalTransport(settings.rundir, settings.cid, core)
    if name == "vsock":
        from .vsock import VsockTransport

        return VsockTransport(core)
    raise TransportUnavailable(
        "the %r transport is not part of this release; use VSOCKCOMPAT_TRANSPORT=local" % name
    )


__all__ = ["LocalTransport", "Transport", "TransportUnavailable", "open_transport"]
