"""The cross-VM bed fails closed, checked on the host without any vsock: the gate of conftest.py,
the daemon's command line and the QEMU guard of testbed/cross.py. No AF_VSOCK socket is created
(the gate never makes one; the guard is only run with options it must refuse)."""
import importlib.util
import os
import subprocess

import pytest

from .conftest import BED_CID, NONCE_PARAM, SIBLING_CID, gate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NONCE = "0123abcd"
GOOD_ENV = {"VSOCKCOMPAT_CROSS": "1", "VSOCKCOMPAT_CROSS_NONCE": NONCE,
            "VSOCKCOMPAT_CROSS_CID": str(BED_CID)}


@pytest.fixture(scope="module")
def cross():
    spec = importlib.util.spec_from_file_location(
        "testbed_cross", os.path.join(REPO, "testbed", "cross.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake(tmp_path):
    """A fake /proc/cmdline with the nonce, a sysfs with the virtio transport and one virtio
    vsock device, and a /dev/vsock path that does not exist."""
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 %s=%s\n" % (NONCE_PARAM, NONCE))
    sysfs = tmp_path / "sys"
    (sysfs / "module" / "vmw_vsock_virtio_transport").mkdir(parents=True)
    device = sysfs / "bus" / "virtio" / "devices" / "virtio0"
    device.mkdir(parents=True)
    (device / "device").write_text("0x0013\n")
    return {"cmdline": str(cmdline), "sysfs": str(sysfs), "dev": str(tmp_path / "no-vsock")}


def test_closed_on_this_machine():
    if os.environ.get("VSOCKCOMPAT_CROSS"):
        pytest.skip("in the cross bed's guest, where the gate is meant to open")
    assert gate() is not None


@pytest.mark.parametrize("env", [{}, {"VSOCKCOMPAT_CROSS": "1"},
                                 dict(GOOD_ENV, VSOCKCOMPAT_CROSS="yes")])
def test_closed_without_the_beds_variables(fake, env):
    assert "VSOCKCOMPAT_CROSS=1" in gate(env, **fake)


def test_closed_without_this_boots_nonce(fake):
    reason = gate(dict(GOOD_ENV, VSOCKCOMPAT_CROSS_NONCE="another"), **fake)
    assert "nonce" in reason


def test_closed_without_the_virtio_transport(fake):
    os.rmdir(os.path.join(fake["sysfs"], "module", "vmw_vsock_virtio_transport"))
    assert "not loaded" in gate(GOOD_ENV, **fake)


def test_closed_with_another_transport(fake):
    os.mkdir(os.path.join(fake["sysfs"], "module", "hv_sock"))
    assert "hv_sock" in gate(GOOD_ENV, **fake)


def test_closed_with_two_devices(fake):
    second = os.path.join(fake["sysfs"], "bus", "virtio", "devices", "virtio1")
    os.mkdir(second)
    with open(os.path.join(second, "device"), "w") as f:
        f.write("0x0013\n")
    assert "exactly one" in gate(GOOD_ENV, **fake)


def test_closed_with_another_cid_or_no_device_node(fake):
    assert "CROSS_CID" in gate(dict(GOOD_ENV, VSOCKCOMPAT_CROSS_CID="4"), **fake)
    assert "cannot read the local CID" in gate(GOOD_ENV, **fake)


def test_the_second_guests_gate_wants_its_own_cid(fake):
    """guest_peer.py opens the gate for CID 4 only: the first guest's CID closes it."""
    assert "CROSS_CID is not %d" % SIBLING_CID in gate(GOOD_ENV, cid=SIBLING_CID, **fake)
    sibling_env = dict(GOOD_ENV, VSOCKCOMPAT_CROSS_CID=str(SIBLING_CID))
    assert "CROSS_CID is not %d" % BED_CID in gate(sibling_env, **fake)
    assert "cannot read the local CID" in gate(sibling_env, cid=SIBLING_CID, **fake)


def test_daemon_command_of_two_guests_has_unix_sockets_only(cross):
    cmd = cross.daemon_command("/bin/vhost-device-vsock", "/r", (3, 4))
    assert cmd == ["/bin/vhost-device-vsock",
                   "--vm", "guest-cid=3,socket=/r/vhost3.sock,uds-path=/r/vm3.vsock",
                   "--vm", "guest-cid=4,socket=/r/vhost4.sock,uds-path=/r/vm4.vsock"]
    with pytest.raises(SystemExit):
        cross.daemon_command("/bin/vhost-device-vsock", "/r/x,forward-listen=9001", (3, 4))


def test_daemon_command_has_unix_sockets_only(cross):
    cmd = cross.daemon_command("/bin/vhost-device-vsock", "/r", (3,))
    assert cmd == ["/bin/vhost-device-vsock", "--vm",
                   "guest-cid=3,socket=/r/vhost3.sock,uds-path=/r/vm3.vsock"]
    with pytest.raises(SystemExit):
        cross.daemon_command("/bin/vhost-device-vsock", "/r/x,forward-cid=1", (3,))
    with pytest.raises(SystemExit):
        cross.daemon_command("/bin/vhost-device-vsock", "/tmp/--forward-cid=1", (4,))


@pytest.mark.parametrize("extra", [
    ["-device", "vhost-vsock-pci,guest-cid=3"],                 # the kernel's vhost-vsock
    ["-device", "vhost-vsock-pci,guest-cid=3", "-kernel", "k"],
    ["-chardev", "socket,id=other,path=/x/vsock.sock"],         # not the bed's chardev
    ["-readconfig", "q.cfg"],
])
def test_guard_refuses_other_vsock_options(cross, tmp_path, extra):
    allowed = cross.qemu_options("/r/vhost3.sock", "1G")
    guard = cross.write_cross_guard(str(tmp_path), allowed)
    if guard is None:
        pytest.skip("QEMU is not installed")
    args = [w for pair in allowed for w in pair] + ["-kernel", "k"] + extra
    proc = subprocess.run([guard] + args, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3 and "refused" in proc.stderr


def test_guard_refuses_a_boot_without_the_beds_device(cross, tmp_path):
    guard = cross.write_cross_guard(str(tmp_path), cross.qemu_options("/r/vhost3.sock", "1G"))
    if guard is None:
        pytest.skip("QEMU is not installed")
    proc = subprocess.run([guard, "-kernel", "k"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3 and "missing" in proc.stderr


def test_one_host_command_gets_every_vmm_socket(cross):
    from vsockcompat._settings import Settings
    env = cross.hybrid_env([("/r/vm3.vsock", 3), ("/r/vm4.vsock", 4)])
    assert env == {"VSOCKCOMPAT_TRANSPORT": "hybrid", "VSOCKCOMPAT_HYBRID_UDS": "/r/vm3.vsock:/r/vm4.vsock",
                   "VSOCKCOMPAT_HYBRID_CID": "3:4"}
    assert Settings.from_environ(env).hybrid == (("/r/vm3.vsock", 3), ("/r/vm4.vsock", 4))
    assert Settings.from_environ(cross.hybrid_env([("/r/vm3.vsock", 3)])).hybrid == (("/r/vm3.vsock", 3),)
    with pytest.raises(SystemExit, match="holds ':'"):
        cross.hybrid_env([("/r:x/vm3.vsock", 3)])
