"""dgram mode under vsock_loopback, inside the guest test bed only (marker ``vsock``).

vsock_loopback registers no datagram transport, so since Linux 5.5 ``socket(AF_VSOCK,
SOCK_DGRAM)`` fails with ENODEV at creation (``vsock_create`` -> ``vsock_assign_transport``):
``auto`` must go on to SEQPACKET, and ``dgram`` asked for explicitly must be a clear
TransportUnavailable. The dgram mode itself needs VMware's VMCI transport, which QEMU cannot
emulate: it is tested on the host over the AF_UNIX stand-in (``tests/test_vsock_dgram.py``).

Run them:  python testbed/guest.py run -- python -m pytest tests/real_vsock/test_vsock_dgram_probe.py -m vsock -rs
"""
import errno
import socket

import pytest

from vsockcompat._settings import Settings
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.runtime import Runtime
from vsockcompat.transport import TransportUnavailable
from vsockcompat.transport import vsock as vsock_module

pytestmark = pytest.mark.vsock


def test_loopback_has_no_vsock_datagrams(vsock_socket):
    with pytest.raises(OSError) as info:
        vsock_socket(socket.SOCK_DGRAM)
    assert info.value.errno == errno.ENODEV


def test_auto_takes_seqpacket_under_loopback():
    assert vsock_module.choose_mode("auto") == "seqpacket"


def test_dgram_asked_for_is_a_clear_transport_unavailable(core, rundir):
    with pytest.raises(TransportUnavailable) as info:
        vsock_module.VsockTransport(core, mode="dgram")
    message = str(info.value)
    assert "SOCK_DGRAM" in message and "Errno %d" % errno.ENODEV in message and "VMCI" in message
    rt = Runtime(Settings(no_extensions=False, rundir=rundir, cid=2, transport="vsock",
                          ds_autostart=False, vsock_mode="dgram"), core=core)
    with pytest.raises(TransportUnavailable, match="SOCK_DGRAM"):
        DatagramEndpoint(runtime=rt)
