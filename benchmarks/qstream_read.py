"""CPU cost of the streamed queue pair's consumer (``QueueStream.read_into``), one thread.

    python benchmarks/qstream_read.py [--core cython|pure] [--old CHECKOUT] [--rounds R]

Each round writes a batch of DATA frames (96 KiB of payload, or one frame if larger) into
one end of an AF_UNIX stream pair and dequeues all of it at the other end through a
``QueueStream``, message by message, for 64 B, 4 KiB and 64 KiB messages. Printed: payload
MB per CPU second of this process (``time.process_time``: the writes count too, and are
the same for every tree). With ``--old``, the same runs in a child importing ``CHECKOUT``
(its extension built for the Cython core), taking turns with this tree, and new/old is
printed per size: the best of ``--rounds`` for each. A report: it never fails on timing.
No vsock is used.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (64, 4096, 65536)
BATCH = 96 << 10


def measure(core_name, size, batches):
    """Payload MB per CPU second for ``batches`` batches of ``size``-byte messages."""
    if core_name == "cython":
        from vsockcompat import _cvsc as core
    else:
        from vsockcompat import _pure_qstream as core
    from vsockcompat import mirror_wire as W

    a, b = socket.socketpair()
    a.setblocking(False)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    r, w = os.pipe()
    qs = core.QueueStream(a, r, 1000, 1 << 18)
    count = max(1, BATCH // size)
    batch = W.encode(W.DATA, 0, b"x" * size) * count
    buf = bytearray(size)
    b.setblocking(False)
    started = time.process_time()
    for _ in range(batches):
        b.setblocking(True)
        b.sendall(batch)
        got = 0
        while got < count * size:
            n = qs.read_into(buf)
            if n <= 0:
                raise SystemExit("read_into gave %d after %d of %d bytes" % (n, got, count * size))
            got += n
        b.setblocking(False)
        try:
            while b.recv(65536):      # the consumer's CREDIT frames
                pass
        except BlockingIOError:
            pass
    spent = time.process_time() - started
    qs.close()
    for fd in (r, w):
        os.close(fd)
    a.close()
    b.close()
    return batches * count * size / spent / 1e6


def _batches(size):
    return 60 if size == 64 else 300


def run_here(core_name):
    return {size: measure(core_name, size, _batches(size)) for size in SIZES}


def run_in(tree, core_name):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", core_name],
                         env=env, cwd=tree, check=True, stdout=subprocess.PIPE, text=True)
    return {int(k): v for k, v in json.loads(out.stdout).items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--core", choices=("cython", "pure"), default="pure")
    parser.add_argument("--old", help="a checkout to take turns with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_here(args.child)))
        return 0
    best = {"new": dict.fromkeys(SIZES, 0.0), "old": dict.fromkeys(SIZES, 0.0)}
    for _ in range(args.rounds):
        for tree, key in ((HERE, "new"), (args.old, "old")):
            if tree is None:
                continue
            for size, mbs in run_in(tree, args.core).items():
                best[key][size] = max(best[key][size], mbs)
    print("QueueStream.read_into, %s core, payload MB per CPU second (best of %d)"
          % (args.core, args.rounds))
    for size in SIZES:
        line = "%6d B  new %8.0f" % (size, best["new"][size])
        if args.old:
            line += "  old %8.0f  new/old %.2fx" % (best["old"][size], best["new"][size] / best["old"][size])
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
