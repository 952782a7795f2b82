"""src/vmci_sockets.h for real, inside the guest test bed: VMCI Sockets programs built against it
run on AF_VSOCK (vsock_loopback, CID 1).

Every test is marked ``vsock``: the gate of ``conftest.py`` skips it everywhere but inside the
guest booted by ``testbed/guest.py``, and ``_require_gate`` checks the gate again right before
each program that makes an AF_VSOCK socket is started (as the ``vsock_socket`` factory does).
The programs are built with the guest's cc into a temporary directory.

Run them:  python3 testbed/guest.py run --timeout 600 -- python3 -m pytest tests/real_vsock \
               -m vsock -rs -q -p no:cacheprovider -k vmci_sockets
"""
import os
import select
import subprocess

import pytest

from vsockcompat import clib

from .conftest import VMADDR_CID_LOCAL, gate

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
SRC_DIR = os.path.join(os.path.dirname(TESTS), "src")
ECHO = os.path.join(TESTS, "c", "vsock_echo.c")
ECHO_PORT = 0x5644              # any fixed port: the guest is ours alone
TIMEOUT = 60
vsock = pytest.mark.vsock

# Asks the header's helpers, then the kernel through the SO_VMCI_* names (level = the AF value).
PROBE = r"""
#include <stdio.h>
#include <sys/time.h>
#include "vmci_sockets.h"

int main(void)
{
   int fd = -2;
   int af = VMCISock_GetAFValue();
   int afFd = VMCISock_GetAFValueFd(&fd);
   unsigned int cid = VMCISock_GetLocalCID();
   unsigned int version = VMCISock_Version();
   unsigned long long size = 0, minSize = 0, maxSize = 0;
   struct timeval tv;
   socklen_t len;
   int s;

   VMCISock_ReleaseAFValueFd(fd);
   printf("af %d\nafFd %d\nfd %d\ncid %u\nversion %u\n", af, afFd, fd, cid, version);
   s = socket(af, SOCK_STREAM, 0);
   if (s < 0) {
      perror("socket");
      return 1;
   }
   len = sizeof size;
   if (getsockopt(s, af, SO_VMCI_BUFFER_SIZE, &size, &len) < 0) { perror("size"); return 1; }
   len = sizeof minSize;
   if (getsockopt(s, af, SO_VMCI_BUFFER_MIN_SIZE, &minSize, &len) < 0) { perror("min"); return 1; }
   len = sizeof maxSize;
   if (getsockopt(s, af, SO_VMCI_BUFFER_MAX_SIZE, &maxSize, &len) < 0) { perror("max"); return 1; }
   tv.tv_sec = 3;
   tv.tv_usec = 0;
   if (setsockopt(s, af, SO_VMCI_CONNECT_TIMEOUT, &tv, sizeof tv) < 0) { perror("set tmo"); return 1; }
   tv.tv_sec = 0;
   len = sizeof tv;
   if (getsockopt(s, af, SO_VMCI_CONNECT_TIMEOUT, &tv, &len) < 0) { perror("get tmo"); return 1; }
   printf("buffer %llu %llu %llu\ntimeout %ld\n", size, minSize, maxSize, (long)tv.tv_sec);
   close(s);
   return 0;
}
"""


def _require_gate():
    reason = gate()
    if reason is not None:
        pytest.fail("the vsock gate is closed (%s): refusing to run an AF_VSOCK program" % reason,
                    pytrace=False)


def _build(out_dir, source, name, std):
    cc = clib.find_compiler()
    if cc is None:
        pytest.fail("no C compiler in the guest", pytrace=False)
    exe = os.path.join(out_dir, name)
    proc = subprocess.run(cc + ["-std=" + std, "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-I", SRC_DIR,
                                source, "-o", exe],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout
    return exe


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """vsock_echo and the probe, built with cc (in the guest: marked tests run only there)."""
    out = str(tmp_path_factory.mktemp("vmci_sockets"))
    probe_c = os.path.join(out, "probe.c")
    with open(probe_c, "w") as f:
        f.write(PROBE)
    return {"echo": _build(out, ECHO, "vsock_echo", "c89"),      # as old sources were
            "probe": _build(out, probe_c, "probe", "c99")}     # unsigned long long


def _run(argv):
    _require_gate()
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=TIMEOUT)


@vsock
def test_vmci_sockets_helpers_and_options(programs):
    proc = _run([programs["probe"]])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    values = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert values["af"] == "40" and values["afFd"] == "40"      # VMCISock_GetAFValue() == AF_VSOCK
    assert values["fd"] == "-1"                                  # no device fd to keep
    assert int(values["cid"]) == VMADDR_CID_LOCAL               # VMCISock_GetLocalCID() == 1
    assert int(values["version"]) == 0xFFFFFFFF                 # VMCISock_Version(): invalid
    size, min_size, max_size = (int(v) for v in values["buffer"].split())
    assert min_size <= size <= max_size and size == 256 * 1024  # Linux's default vsock buffer
    assert values["timeout"] == "3"                              # SO_VMCI_CONNECT_TIMEOUT round trip


@vsock
def test_vmci_sockets_echo_over_cid_1(programs):
    text = "hello from a VMCI Sockets program"
    _require_gate()
    server = subprocess.Popen([programs["echo"], "-s", str(ECHO_PORT)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([server.stdout], [], [], TIMEOUT)
        assert ready, "the server did not start listening"
        first = server.stdout.readline()
        assert first == "listening on cid 1 port %d\n" % ECHO_PORT, first + server.stderr.read()
        client = _run([programs["echo"], "-c", str(VMADDR_CID_LOCAL), str(ECHO_PORT), text])
        assert client.returncode == 0, client.stderr
        assert client.stdout == text + "\n"
        rest, err = server.communicate(timeout=TIMEOUT)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, err
    lines = rest.splitlines()
    assert lines[0].startswith("connection from cid 1 port "), rest
    assert int(lines[0].rsplit(" ", 1)[1]) > 1023                 # the client's ephemeral port
    assert lines[1] == "echoed %d bytes" % (len(text) + 1)


@vsock
def test_vmci_sockets_client_without_a_server_fails_cleanly(programs):
    proc = _run([programs["echo"], "-c", str(VMADDR_CID_LOCAL), str(ECHO_PORT + 1), "nobody"])
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("connect: "), proc.stderr
