"""The host half of the cross bed's warm-up (testbed/vmm_warmup.py), against a fake VMM socket:
it keeps connecting until the guest's port was reached twice, and stops when told to."""
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "testbed"))
import vmm_warmup  # noqa: E402


class ClosingThenAnswering:
    """A VMM socket that closes the first ``refusals`` connections unread, then answers OK."""

    def __init__(self, path, refusals):
        self.lines = []
        self._refusals = refusals
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(8)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                if self._refusals > 0:
                    self._refusals -= 1
                    continue
                self.lines.append(conn.makefile("rb").readline())
                conn.sendall(b"OK %d\n" % len(self.lines))

    def close(self):
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)


def test_the_host_connects_until_the_guest_port_answered_twice(tmp_path, monkeypatch):
    monkeypatch.setattr(vmm_warmup, "RETRY", 0.01)
    vmm = ClosingThenAnswering(str(tmp_path / "vm.vsock"), refusals=3)
    try:
        got = vmm_warmup.host_side(str(tmp_path / "vm.vsock"), threading.Event(), time.monotonic() + 30)
    finally:
        vmm.close()
    assert got == vmm_warmup.CONNECTS
    assert vmm.lines == [b"CONNECT %d\n" % vmm_warmup.PORT] * vmm_warmup.CONNECTS


def test_the_host_side_stops_when_told_and_at_its_deadline(tmp_path):
    vmm = ClosingThenAnswering(str(tmp_path / "vm.vsock"), refusals=0)
    stop = threading.Event()
    stop.set()
    try:
        assert vmm_warmup.host_side(str(tmp_path / "vm.vsock"), stop, time.monotonic() + 60) == 0
        assert vmm_warmup.host_side(str(tmp_path / "vm.vsock"), threading.Event(), time.monotonic() - 1) == 0
    finally:
        vmm.close()
    assert vmm.lines == []  # neither call connected
