"""What the two real-vsock gates share (``tests/real_vsock`` and ``tests/cross_vm``).

Each bed's ``conftest.py`` keeps its own ``gate()``, the list of conditions that must all hold
before a marked test may make an AF_VSOCK socket. This module gives them the sysfs and device
readings the conditions use, and the pytest hooks that apply a gate: a marked test skips with
the gate's reason, and where the bed's variable says "this is the bed" but the gate stayed
closed, the session fails (a broken bed must not pass as a green run). Nothing here creates a
socket.
"""
import fcntl
import glob
import os
import struct

import pytest

IOCTL_VM_SOCKETS_GET_LOCAL_CID = 0x7B9      # _IO(7, 0xb9)
VIRTIO_ID_VSOCK = 19


def virtio_vsock_devices(sysfs):
    """The names of the virtio devices under ``sysfs`` that are (or may be) vsock devices."""
    found = []
    for path in sorted(glob.glob(os.path.join(sysfs, "bus", "virtio", "devices", "*", "device"))):
        try:
            with open(path) as f:
                kind = int(f.read().strip(), 16)
        except (OSError, ValueError):
            kind = VIRTIO_ID_VSOCK                  # unreadable: assume the worst
        if kind == VIRTIO_ID_VSOCK:
            found.append(os.path.basename(os.path.dirname(path)))
    return found


def local_cid(dev):
    """``IOCTL_VM_SOCKETS_GET_LOCAL_CID`` on the vsock device ``dev`` (raises ``OSError``)."""
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return struct.unpack("I", fcntl.ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, b"\0" * 4))[0]
    finally:
        os.close(fd)


def gate_hooks(marker, description, bed_variable, gate):
    """``(pytest_configure, pytest_runtest_setup, pytest_sessionfinish)`` for a conftest.

    ``gate()`` returns None when tests marked ``marker`` may run, else why not; it is called
    before any fixture of each marked test. ``bed_variable`` is the variable the bed sets to
    "1" in its guest.
    """
    closed_in_bed = pytest.StashKey()

    def pytest_configure(config):
        config.addinivalue_line("markers", "%s: %s" % (marker, description))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(item):
        if item.get_closest_marker(marker) is not None:
            reason = gate()
            if reason is not None:
                if os.environ.get(bed_variable) == "1":
                    item.config.stash.setdefault(closed_in_bed, []).append(reason)
                pytest.skip(reason)

    def pytest_sessionfinish(session):
        closed = session.config.stash.get(closed_in_bed, [])
        if closed:
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line("%s gate: %s=1 but the gate stayed closed for %d tests (%s): "
                                    "the test bed is broken" % (
                                        marker, bed_variable, len(closed), closed[0]), red=True)
            if session.exitstatus == 0:
                session.exitstatus = 1

    return pytest_configure, pytest_runtest_setup, pytest_sessionfinish
