"""What the SDK's two samples share: getopt("d:sch"), the usage text, VMCI_InitApp and
VMCI_CleanupApp around the server or client, and their exit statuses (vmci-sdk.md section 7)."""
import getopt
import sys

from .. import sdk


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


def run(argv, prog, run_server, run_client, lib=None):
    """Parse ``argv`` as the C samples did and run ``run_server(lib)`` or ``run_client(lib)``.

    Returns the exit status: 0, 255 (usage, exit(-1)) or 254 (no library, exit(-2)).
    """
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
