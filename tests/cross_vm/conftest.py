"""The gate of the cross-VM tests (marker ``cross_vm``).

These tests run inside the guest that ``testbed/cross.py run`` boots: a guest whose only vsock
device is QEMU's vhost-user-vsock, served on the machine by ``vhost-device-vsock`` (Unix sockets
only). On the machine itself AF_VSOCK leads to a hypervisor host that is not ours, and the machine's
own CID can be 3 too, so the CID alone proves nothing. The gate opens only when ALL of these hold,
checked in this order (it creates no socket):

1. ``VSOCKCOMPAT_CROSS=1`` and a ``VSOCKCOMPAT_CROSS_NONCE``: set by the bed in the guest, after
   its own checks;
2. the kernel command line carries ``vsockcompat_cross=<that nonce>``: a fresh value per boot that
   only the bed's guest has (the machine's command line was fixed when it booted);
3. ``vmw_vsock_virtio_transport`` is loaded, no other transport that leads out
   (``vmw_vsock_vmci_transport``, ``hv_sock``) is, and exactly one virtio vsock device exists;
4. ``IOCTL_VM_SOCKETS_GET_LOCAL_CID`` says ``BED_CID`` (3), the CID the bed gave the daemon, and
   ``VSOCKCOMPAT_CROSS_CID`` says the same. (``guest_peer.py``, in the second guest of
   ``cross.py run --guests 2``, opens the same gate for its own CID, ``SIBLING_CID``.)

Where ``VSOCKCOMPAT_CROSS=1`` is set but the gate stays closed, the tests skip and the session fails.
"""
import os

from bed_gates import gate_hooks, local_cid, virtio_vsock_devices

MARKER = "cross_vm"
BED_CID = 3
#: The second guest's CID (``cross.py run --guests 2``), which the bed exports to CID 3 as
#: ``VSOCKCOMPAT_CROSS_SIBLING`` when that guest runs.
SIBLING_CID = 4
NONCE_PARAM = "vsockcompat_cross"
OTHER_TRANSPORTS = ("vmw_vsock_vmci_transport", "hv_sock")
HOW = "python testbed/cross.py run --host-cmd ... -- python -m pytest tests/cross_vm -m cross_vm"


def gate(environ=None, sysfs="/sys", dev="/dev/vsock", cmdline="/proc/cmdline", cid=BED_CID):
    """None when the cross-VM tests may run here (the bed's guest of CID ``cid``), else the
    reason they must not.

    ``sysfs``, ``dev`` and ``cmdline`` exist for the gate's own tests only."""
    environ = os.environ if environ is None else environ
    if environ.get("VSOCKCOMPAT_CROSS") != "1" or not environ.get("VSOCKCOMPAT_CROSS_NONCE"):
        return "cross-VM tests run only in the cross bed's guest (VSOCKCOMPAT_CROSS=1): " + HOW
    try:
        with open(cmdline) as f:
            words = f.read().split()
    except OSError as exc:
        return "cannot read %s: %s" % (cmdline, exc.strerror)
    if "%s=%s" % (NONCE_PARAM, environ["VSOCKCOMPAT_CROSS_NONCE"]) not in words:
        return "the kernel command line lacks this boot's %s nonce: not the bed's guest" % (
            NONCE_PARAM)
    if not os.path.isdir(os.path.join(sysfs, "module", "vmw_vsock_virtio_transport")):
        return "vmw_vsock_virtio_transport is not loaded: no vhost-user device"
    loaded = [m for m in OTHER_TRANSPORTS if os.path.exists(os.path.join(sysfs, "module", m))]
    if loaded:
        return "%s loaded: vsock traffic could go elsewhere" % ", ".join(loaded)
    devices = virtio_vsock_devices(sysfs)
    if len(devices) != 1:
        return "expected exactly one virtio vsock device, found %d" % len(devices)
    if environ.get("VSOCKCOMPAT_CROSS_CID") != str(cid):
        return "VSOCKCOMPAT_CROSS_CID is not %d" % cid
    try:
        local = local_cid(dev)
    except OSError as exc:
        return "cannot read the local CID from %s: %s" % (dev, exc.strerror or exc)
    if local != cid:
        return "the local CID is %d, not the bed's %d" % (local, cid)
    return None


pytest_configure, pytest_runtest_setup, pytest_sessionfinish = gate_hooks(
    MARKER, "across a VM boundary; runs only inside the cross bed's guest (testbed/cross.py), "
    "skipped elsewhere", "VSOCKCOMPAT_CROSS", lambda: gate())
