"""datagramApp, the SDK's datagram sample (vmci-sdk.md section 7.1), line for line.

The server creates a handle, registers it as "HOST INFO" and answers three
queries with "HELLO, CLIENT!"; the client finds it by name alone, sends
"HELLO, SERVER!" and prints the answer. Texts and exit statuses are the SDK's.
"""
import getopt
import sys

from .. import sdk
from ..handles import VMCI_HANDLE_EQUAL, VMCI_INVALID_HANDLE

SERVICE_NAME = "HOST INFO"
PUBLIC_GROUP_NAME = "vmci public group"
BUFFER_SIZE = 4096
QUERIES = 3
REPLY = b"HELLO, CLIENT!"
QUERY = b"HELLO, SERVER!"


def _err(text):
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _out(data):
    out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
    if out is None:
        sys.stdout.write(data.decode("latin-1"))
    else:
        sys.stdout.flush()
        out.write(data)
        out.flush()


def usage(prog):
    _err("%s [-d <VMCI device>] -c|-s" % prog)
    _err("\t\tMust provide exactly one of -c OR -s.")
    _err("%s -h:" % prog)
    _err("\tPrints this help message.")
    return 255  # exit(-1)


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
    """Run the sample with getopt("d:sch") as the C program did; return its exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, args = getopt.getopt(argv, "d:sch")
    except getopt.GetoptError:
        return usage(prog)
    device, server, client = None, False, False
    for opt, value in opts:
        if opt == "-d":
            device = value
        elif opt == "-s":
            server = True
        elif opt == "-c":
            client = True
        else:
            return usage(prog)
    if args or server == client:
        return usage(prog)
    lib = lib if lib is not None else sdk.VMCILibrary()
    if lib.VMCI_InitApp(device) != 0:
        _err("Failed to init VMCI library.")
        return 254  # exit(-2)
    try:
        run_server(lib) if server else run_client(lib)
    finally:
        lib.VMCI_CleanupApp()
    return 0


if __name__ == "__main__":
    sys.exit(main())
