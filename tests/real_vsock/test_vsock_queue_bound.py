"""The SDK's datagram queue bound on real vsock SEQPACKET links, in the guest bed only.

An endpoint's connections get a kernel buffer of ``VSOCK_DG_LINK_BUFFER`` bytes
(``VMCI_MAX_DATAGRAM_QUEUE_SIZE - 1``), and a link's frame is the SDK's datagram (24-byte
header and payload), so once the receiver has read the link's hello, a sender's datagrams
queued for a receiver that reads nothing more stay below 139,264 bytes exactly as the SDK
counts them: one that brings the total to 139,263 is taken, one that would reach 139,264 gets
``VMCI_ERROR_NO_RESOURCES`` (and seals the link, ``test_direct_vsock.py``). Before the hello is
read its 8 bytes count too. Per sending link: several senders each have the bound. Receivers of
both Python cores and the C library's (``tests/c/vsock_probe.c``). Behind the gate of
``conftest.py`` (marker ``vsock``).

Run them:  python testbed/guest.py run -- python -m pytest tests/real_vsock/test_vsock_queue_bound.py -m vsock -rs
"""
import tempfile

import pytest

from vsockcompat.constants import (HELLO_SIZE, VMCI_DG_HEADERSIZE, VMCI_MAX_DATAGRAM_QUEUE_SIZE,
                                   VMCI_MAX_DG_SIZE, VSOCK_DG_LINK_BUFFER)
from vsockcompat.datagram import DatagramEndpoint
from vsockcompat.errors import NoResources
from vsockcompat.run import command

from .test_direct_vsock import _drain as drain
from .test_clib_vsock import Probe, c_env, pattern, progs  # noqa: F401  (the C programs' fixture)
from .test_vsock_discovery import vsock_env, vsock_runtime as make_vsock_runtime
from .test_vsock_transport import vsock_runtime, pair  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.vsock, pytest.mark.timeout(300)]

WAIT = 30.0  # seconds a receive waits


def payload(frame_size, seq):
    """A payload whose datagram is ``frame_size`` bytes with the header, numbered ``seq``."""
    size = frame_size - VMCI_DG_HEADERSIZE
    return bytes([seq]) * size


def test_the_link_buffer_is_one_byte_below_the_sdk_bound():
    assert VSOCK_DG_LINK_BUFFER == VMCI_MAX_DATAGRAM_QUEUE_SIZE - 1 == 139263


def frames(last, warm):
    """Two datagram sizes (with the header) totalling 139,263 bytes (``last`` 1: the SDK takes
    both) or 139,264 (``last`` 0: it refuses the second), less the hello's bytes while the
    receiver has not read it (not ``warm``)."""
    hello = 0 if warm else HELLO_SIZE
    return VMCI_MAX_DG_SIZE, VMCI_MAX_DATAGRAM_QUEUE_SIZE - last - hello - VMCI_MAX_DG_SIZE


@pytest.mark.parametrize("warm", [False, True], ids=["hello-unread", "hello-read"])
@pytest.mark.parametrize("last", [1, 0], ids=["below", "reaching"])
def test_datagrams_queue_up_to_one_byte_below_the_bound(pair, last, warm):
    """Two datagrams totalling 139,263 bytes are taken and a third is refused; two totalling
    139,264: the second is refused. The receiver then gets exactly the datagrams taken. With the
    link's hello read (``warm``: one datagram received first), else 8 bytes less."""
    a, b = pair
    if warm:
        a.send(b.handle, b"first")
        assert b.recv(timeout=WAIT).payload == b"first"
    first, second = frames(last, warm)
    a.send(b.handle, payload(first, 1))
    if last:
        a.send(b.handle, payload(second, 2))
        with pytest.raises(NoResources):
            a.send(b.handle, payload(VMCI_DG_HEADERSIZE + 1, 3))
        expected = [payload(first, 1), payload(second, 2)]
    else:
        with pytest.raises(NoResources):
            a.send(b.handle, payload(second, 2))
        expected = [payload(first, 1)]
    assert drain(b) == expected
    assert b.stats.bad_frames == 0


@pytest.mark.parametrize("warm", [False, True], ids=["hello-unread", "hello-read"])
@pytest.mark.parametrize("last", [1, 0], ids=["below", "reaching"])
def test_the_c_library_receiver_has_the_bound(core, rundir, progs, last, warm):  # noqa: F811
    """vsock_probe (libvmci.so.0) receives and reads nothing until asked: the same cases as
    above, then it gets exactly the datagrams taken (the probe checks its byte pattern; lengths
    tell them apart)."""
    data = pattern(VMCI_MAX_DG_SIZE)
    with tempfile.TemporaryDirectory(prefix="vsc", dir="/tmp") as c_rundir:
        argv, env = command([progs["vsock_probe"]], c_env(vsock_env(c_rundir, "cython", "seqpacket"), progs))
        probe = Probe(argv, env).start()
        try:
            with DatagramEndpoint(runtime=make_vsock_runtime(core.NAME, rundir, "seqpacket")) as a:
                dst = probe.handle
                mine = [str(a.handle.context), str(a.handle.resource), "1"]
                if warm:
                    a.send(dst, data[:5])
                    assert probe.ask("recv") == ["5"] + mine
                first, second = (size - VMCI_DG_HEADERSIZE for size in frames(last, warm))
                a.send(dst, data[:first])
                taken = [first]
                if last:
                    a.send(dst, data[:second])
                    taken.append(second)
                    with pytest.raises(NoResources):
                        a.send(dst, data[:1])
                else:
                    with pytest.raises(NoResources):
                        a.send(dst, data[:second])
                for size in taken:
                    assert probe.ask("recv") == [str(size)] + mine
        finally:
            probe.close()
