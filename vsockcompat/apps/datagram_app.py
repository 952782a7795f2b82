"""datagramApp, the SDK's datagram sample (vmci-sdk.md section 7.1), line for line.

The server creates a handle, registers it as "HOST INFO" and answers three
queries with "HELLO, CLIENT!"; the client finds it by name alone, sends
"HELLO, SERVER!" and prints the answer. Texts and exit statuses are the SDK's.
"""
import sys

from ..handles import VMCI_HANDLE_EQUAL, VMCI_INVALID_HANDLE
from ._sample import _err, _out, run

SERVICE_NAME = "HOST INFO"
PUBLIC_GROUP_NAME = "vmci public group"
BUFFER_SIZE = 4096
QUERIES = 3
REPLY = b"HELLO, CLIENT!"
QUERY = b"HELLO, SERVER!"


def run_server(lib):
    server = lib.VMCIDatagram_CreateHnd(0)
    if VMCI_HANDLE_EQUAL(server, VMCI_INVALID_HANDLE):
        _err("Failed to create server datagram handle.")
        return
    rv, _group = lib.VMCIDs_Lookup(PUBLIC_GROUP_NAME)
    if rv != 0:
        _err("Failed to lookup public group handle.")
        lib.VMCIDatagram_DestroyHnd(server)
        return
    rv = lib.VMCIDs_Register(SERVICE_NAME, server)
    if rv != 0:
        _err("Failed to register discovery service. rv = %d" % rv)
        lib.VMCIDatagram_DestroyHnd(server)
        return
    _out(b"Running datagram server --- will respond to %d queries.\n" % QUERIES)
    buf = bytearray(BUFFER_SIZE)
    for _ in range(QUERIES):
        rv, client = lib.VMCIDatagram_RecvFrom(server, buf)
        if rv < 0:
            _err("Error in VMCIDatagram_Read.")
            break
        _out(b"Received message: " + bytes(buf[:rv]) + b"\n")
        rv = lib.VMCIDatagram_SendTo(client, server, len(REPLY), REPLY)
        if rv < 0:
            _err("Error in VMCIDatagram_Send.")
            break
    lib.VMCIDs_Unregister(SERVICE_NAME)
    lib.VMCIDatagram_DestroyHnd(server)


def run_client(lib):
    rv, server = lib.VMCIDs_Lookup(SERVICE_NAME)
    if rv != 0:
        _err("Failed to lookup in discovery service.")
        return
    client = lib.VMCIDatagram_CreateHnd(0)
    if VMCI_HANDLE_EQUAL(client, VMCI_INVALID_HANDLE):
        _err("Failed to create client datagram handle.")
        return
    lib.VMCIDatagram_SendTo(server, client, len(QUERY), QUERY)
    buf = bytearray(BUFFER_SIZE)
    rv, _src = lib.VMCIDatagram_RecvFrom(client, buf)
    if rv >= 0:
        _out(b"Received message: " + bytes(buf[:rv]) + b"\n")
    lib.VMCIDatagram_DestroyHnd(client)


def main(argv=None, prog="datagramApp", lib=None):
    """Run the sample as the C program did; return its exit status."""
    return run(sys.argv[1:] if argv is None else argv, prog, run_server, run_client, lib)


if __name__ == "__main__":
    sys.exit(main())
