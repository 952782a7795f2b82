"""sharedMemApp, the SDK's shared-memory sample (vmci-sdk.md section 7.2), line for line.

The server creates a 128-byte region, registers it as "HOST TIME" and writes
the local time into it every second for 10 seconds; the client finds it by
name, checks its size, attaches and prints three readings one second apart.
Texts and exit statuses are the SDK's.
"""
import sys
import time

from ..handles import VMCI_HANDLE_EQUAL, VMCI_INVALID_HANDLE
from ._sample import _err, _out, run
from .datagram_app import PUBLIC_GROUP_NAME

SERVICE_NAME = "HOST TIME"
REGION_SIZE = 128
SERVER_SECONDS = 10
READINGS = 3
TIME_FORMAT = "%a %b %d %H:%M:%S %Z %Y"
TIME_BUFFER = 127


def run_server(lib):
    handle, addr = lib.VMCISharedMem_Create(REGION_SIZE)
    if VMCI_HANDLE_EQUAL(handle, VMCI_INVALID_HANDLE):
        _err("Failed to create server shared memory region.")
        return
    addr[:] = bytes(REGION_SIZE)
    rv, _group = lib.VMCIDs_Lookup(PUBLIC_GROUP_NAME)
    if rv != 0:
        _err("Failed to lookup public group handle.")
        lib.VMCISharedMem_Detach(handle)
        return
    rv = lib.VMCIDs_Register(SERVICE_NAME, handle)
    if rv != 0:
        _err("Failed to register discovery service. rv = %d" % rv)
        lib.VMCISharedMem_Detach(handle)
        return
    _out(b"Running shared memory server for %d seconds.\n" % SERVER_SECONDS)
    for j in range(SERVER_SECONDS):
        now = time.strftime(TIME_FORMAT).encode("utf-8", "replace")[:TIME_BUFFER - 1]
        addr[:len(now)] = now
        time.sleep(1)
        sys.stderr.write("%d." % j)
        sys.stderr.flush()
    _err("")
    lib.VMCIDs_Unregister(SERVICE_NAME)
    lib.VMCISharedMem_Detach(handle)


def run_client(lib):
    rv, handle = lib.VMCIDs_Lookup(SERVICE_NAME)
    if rv != 0:
        _err("Failed to lookup in discovery service.")
        return
    rv, size = lib.VMCISharedMem_Query(handle)
    if rv < 0:
        _err("Failed to query size of shared memory region.")
        return
    if size != REGION_SIZE:
        _err("Got wrong size of shared memory region.")
        _err("Should be %d, got %d" % (REGION_SIZE, size))
        return
    rv, addr = lib.VMCISharedMem_Attach(handle, size)
    if rv != 0:
        _err("Failed to attach to shared memory region. rv = %d" % rv)
        return
    for _ in range(READINGS):
        text = bytes(addr[:REGION_SIZE])
        _out(text.split(b"\0", 1)[0] + b"\n")
        time.sleep(1)
    lib.VMCISharedMem_Detach(handle)


def main(argv=None, prog="sharedMemApp", lib=None):
    """Run the sample as the C program did; return its exit status."""
    return run(sys.argv[1:] if argv is None else argv, prog, run_server, run_client, lib)


if __name__ == "__main__":
    sys.exit(main())
