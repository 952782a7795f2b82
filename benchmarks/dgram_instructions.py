"""User-space instructions per datagram round trip, counted by callgrind (load-independent).

    python benchmarks/dgram_instructions.py                 # about 2 minutes
    python benchmarks/dgram_instructions.py --trips 500 --impl raw cython
    python benchmarks/dgram_instructions.py --baseline ../main --impl pure sdk-pure

A round trip is what ``vsockcompat bench`` times, done in one process so that no
scheduling enters the count: endpoint C sends ``--size`` bytes to endpoint S, S
receives them into a buffer and sends them back to their source, C receives the
echo. Implementations:

``raw``
    a Python AF_UNIX SOCK_SEQPACKET socket pair, ``send`` / ``recv_into`` (the bench's floor).
``cython``, ``pure``
    ``DatagramEndpoint.send_status`` / ``recv_status`` on that core (the bench's calls).
``sdk-cython``, ``sdk-pure``
    ``VMCIDatagram_SendTo`` / ``VMCIDatagram_RecvFrom`` of a ``VMCILibrary`` on that core.

Each implementation runs twice under ``valgrind --tool=callgrind``, with N and 2N
round trips after the same warm-up; the difference of the two totals divided by N
is the count per round trip (start-up, imports and set-up cancel out). ``--baseline DIR``
counts the same implementations with the vsockcompat of another source tree (its Cython
core built in place) and prints each count beside the baseline's, with their ratio. System calls
are the same for all (two sends, two receives per round trip; the vsockcompat
receiver adds an ``epoll_wait`` every 16 receives) and kernel time is not counted:
compare with ``vsockcompat bench`` for times. The two endpoints share one process
and one context, so every receive finds its datagram queued (the receiver's batch
read) where the bench's two processes would find their peer hot: the Python layer
does the same work in both. Prints the counts and the ratios to raw.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("raw", "cython", "pure", "sdk-cython", "sdk-pure")
WARMUP = 200


def _payload(size):
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def _raw_loop(size):
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    payload = _payload(size)
    view = memoryview(bytearray(69632))

    def trips(n):
        send_a, recv_a, send_b, recv_b = a.send, a.recv_into, b.send, b.recv_into
        for _ in range(n):
            send_a(payload)
            k = recv_b(view)
            send_b(view[:k])
            if recv_a(view) != size:
                raise RuntimeError("raw round trip lost its payload")

    return trips


def _runtime(core, rundir):
    sys.path.insert(0, os.environ.get("VSC_INSTRUCTIONS_ROOT", ROOT))
    from vsockcompat._settings import Settings
    from vsockcompat.runtime import Runtime

    settings = Settings(no_extensions=(core == "pure"), rundir=rundir, cid=2, transport="local",
                        ds_autostart=False)
    return Runtime(settings, core=core)


def _endpoint_loop(core, size, rundir):
    from vsockcompat.datagram import DatagramEndpoint

    runtime = _runtime(core, rundir)
    server = DatagramEndpoint(4000, runtime=runtime)
    client = DatagramEndpoint(runtime=runtime)
    dst = server.handle
    payload = _payload(size)
    view = memoryview(bytearray(69632))

    def trips(n):
        c_send, c_recv, s_send, s_recv = client.send_status, client.recv_status, server.send_status, \
            server.recv_status
        for _ in range(n):
            if c_send(dst, payload, size) < 0:
                raise RuntimeError("send_status failed")
            k, src = s_recv(view)
            if s_send(src, view, k) < 0:
                raise RuntimeError("send_status failed")
            if c_recv(view)[0] != size:
                raise RuntimeError("round trip lost its payload")

    return trips


def _sdk_loop(core, size, rundir):
    from vsockcompat.sdk import VMCILibrary

    lib = VMCILibrary(_runtime(core, rundir))
    if lib.VMCI_InitApp() != 0:
        raise RuntimeError("VMCI_InitApp failed")
    server = lib.VMCIDatagram_CreateHnd(4000)
    client = lib.VMCIDatagram_CreateHnd(0)
    payload = _payload(size)
    buf = bytearray(69632)

    def trips(n):
        send, recv = lib.VMCIDatagram_SendTo, lib.VMCIDatagram_RecvFrom
        for _ in range(n):
            if send(server, client, size, payload) < 0:
                raise RuntimeError("VMCIDatagram_SendTo failed")
            k, src = recv(server, buf)
            if send(src, server, k, buf) < 0:
                raise RuntimeError("VMCIDatagram_SendTo failed")
            if recv(client, buf)[0] != size:
                raise RuntimeError("round trip lost its payload")

    return trips


def child(impl, size, trips):
    """Set up ``impl``, warm up, run ``trips`` round trips (what callgrind counts)."""
    rundir = tempfile.mkdtemp(prefix="vscgi", dir="/tmp")
    try:
        if impl == "raw":
            loop = _raw_loop(size)
        elif impl.startswith("sdk-"):
            loop = _sdk_loop(impl[4:], size, rundir)
        else:
            loop = _endpoint_loop(impl, size, rundir)
        loop(WARMUP)
        loop(trips)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    os._exit(0)  # no interpreter teardown: it would differ with what was allocated


def count(impl, size, trips, root=ROOT, valgrind="valgrind"):
    """Instructions callgrind counts for a whole child run, importing vsockcompat from ``root``."""
    with tempfile.TemporaryDirectory(prefix="vscgi") as tmp:
        out = os.path.join(tmp, "callgrind.out")
        env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=root, VSC_INSTRUCTIONS_ROOT=root,
                   VSOCKCOMPAT_NO_EXTENSIONS="1" if impl.endswith("pure") else "0")
        subprocess.run([valgrind, "--tool=callgrind", "--callgrind-out-file=" + out,
                        sys.executable, os.path.abspath(__file__), "--child", impl, str(size), str(trips)],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with open(out) as f:
            for line in f:
                m = re.match(r"(?:summary|totals):\s+(\d+)", line)
                if m:
                    return int(m.group(1))
    raise RuntimeError("no total in callgrind's output for %s" % impl)


def per_trip(impl, size, trips, root=ROOT):
    return (count(impl, size, 2 * trips, root) - count(impl, size, trips, root)) / trips


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trips", type=int, default=1000, help="N (default %(default)s)")
    parser.add_argument("--size", type=int, default=64, help="payload bytes (default %(default)s)")
    parser.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--baseline", metavar="DIR",
                        help="also count with the vsockcompat of this source tree")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "SIZE", "TRIPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
    if shutil.which("valgrind") is None:
        print("dgram_instructions: valgrind is not installed", file=sys.stderr)
        return 2
    impls = ["raw"] + [i for i in args.impl if i != "raw"]
    results = {impl: per_trip(impl, args.size, args.trips) for impl in impls}
    baseline, root = None, args.baseline and os.path.abspath(args.baseline)
    if root:
        baseline = {impl: per_trip(impl, args.size, args.trips, root) for impl in impls if impl != "raw"}
    if args.json:
        report = {"size": args.size, "trips": args.trips, "instructions_per_round_trip": results}
        if baseline is not None:
            report["baseline"] = {"root": root, "instructions_per_round_trip": baseline}
        print(json.dumps(report))
        return 0
    print("user-space instructions per %d-byte round trip (callgrind, N=%d):" % (args.size, args.trips))
    for impl in impls:
        raw = results["raw"]
        line = "  %-11s %9s  %5.2fx raw" % (impl, "{:,.0f}".format(results[impl]), results[impl] / raw)
        if baseline is not None and impl in baseline:
            old = baseline[impl]
            line += "   baseline %9s  %5.2fx raw   new/baseline %5.3f" % (
                "{:,.0f}".format(old), old / raw, results[impl] / old)
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
