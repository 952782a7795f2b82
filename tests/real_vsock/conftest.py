"""The gate of the real-AF_VSOCK tests (marker ``vsock``).

The machines this project is developed and tested on are VMs whose ``/dev/vsock`` leads to a
hypervisor host that is not ours: an AF_VSOCK connect there, to any CID, leaves the machine. So a
test marked ``vsock`` runs only inside the guest that ``testbed/guest.py run`` boots, where the
only vsock transport is ``vsock_loopback``, and is skipped, with the reason, everywhere else.

The gate opens only when ALL of these hold, checked in this order (it creates no socket):

1. ``VSOCKCOMPAT_TESTBED=1``: set by the bed in the guest, after its own checks;
2. ``/sys/module/vsock_loopback`` exists;
3. no transport that leads out of the guest is loaded (``vmw_vsock_virtio_transport``,
   ``vmw_vsock_vmci_transport``, ``hv_sock``) and no virtio vsock device exists (a transport
   built into the kernel has no /sys/module entry, its device still shows);
4. ``IOCTL_VM_SOCKETS_GET_LOCAL_CID`` on ``/dev/vsock`` says 1 (``VMADDR_CID_LOCAL``): no
   transport gave this kernel a CID of its own.

``/dev/vsock`` existing proves nothing and is never enough. The gate is evaluated in a
``pytest_runtest_setup`` hook that runs first, before any fixture of a marked test, and again by
the ``vsock_socket`` factory before each socket it makes. Where ``VSOCKCOMPAT_TESTBED=1`` is set but
the gate stays closed, the tests still skip and the session fails (a broken bed is no green run).
"""
import os
import socket

import pytest

from bed_gates import gate_hooks, local_cid, virtio_vsock_devices

MARKER = "vsock"
AF_VSOCK = 40
VMADDR_CID_LOCAL = 1
FORBIDDEN_MODULES = ("vmw_vsock_virtio_transport", "vmw_vsock_vmci_transport", "hv_sock")
HOW = "python testbed/guest.py run -- python -m pytest tests/real_vsock -m vsock"
SOCKET_TIMEOUT = 30.0


def gate(environ=None, sysfs="/sys", dev="/dev/vsock"):
    """None when real AF_VSOCK tests may run here, else the reason they must not.

    Reads the environment and sysfs first and touches ``dev`` only when everything else
    holds; never creates a socket. ``sysfs`` and ``dev`` are parameters for the gate's own
    tests only: no variable can redirect them.
    """
    environ = os.environ if environ is None else environ
    if environ.get("VSOCKCOMPAT_TESTBED") != "1":
        return ("real AF_VSOCK runs only in the guest test bed (VSOCKCOMPAT_TESTBED=1 is not "
                "set): " + HOW)
    if not os.path.isdir(os.path.join(sysfs, "module", "vsock_loopback")):
        return "vsock_loopback is not loaded: not the guest test bed"
    loaded = [m for m in FORBIDDEN_MODULES if os.path.exists(os.path.join(sysfs, "module", m))]
    if loaded:
        return "%s loaded: vsock traffic could leave this machine" % ", ".join(loaded)
    devices = virtio_vsock_devices(sysfs)
    if devices:
        return "virtio vsock device %s present: vsock traffic could leave this machine" % (
            ", ".join(devices))
    try:
        cid = local_cid(dev)
    except OSError as exc:
        return "cannot read the local CID from %s: %s" % (dev, exc.strerror or exc)
    if cid != VMADDR_CID_LOCAL:
        return "the local CID is %d, not %d: a transport to a host is present" % (
            cid, VMADDR_CID_LOCAL)
    return None


pytest_configure, pytest_runtest_setup, pytest_sessionfinish = gate_hooks(
    MARKER, "real AF_VSOCK; runs only inside the guest test bed (testbed/guest.py), "
    "skipped elsewhere", "VSOCKCOMPAT_TESTBED", lambda: gate())


@pytest.fixture
def vsock_socket():
    """``vsock_socket(type)``: a new AF_VSOCK socket with a timeout, closed at teardown.

    Checks the gate again before each socket: a marked test can make none where it is closed.
    """
    made = []

    def make(kind=socket.SOCK_STREAM):
        reason = gate()
        if reason is not None:
            pytest.fail("the vsock gate is closed (%s): refusing to create an AF_VSOCK socket"
                        % reason, pytrace=False)
        sock = socket.socket(AF_VSOCK, kind)
        made.append(sock)
        sock.settimeout(SOCKET_TIMEOUT)
        return sock

    make.adopt = made.append        # for sockets returned by accept()
    yield make
    for sock in made:
        sock.close()

