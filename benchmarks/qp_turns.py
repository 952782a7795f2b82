"""Two checkouts of vsockcompat taking turns on the same queue-pair stream, in one run.

    python benchmarks/qp_turns.py --old CHECKOUT [--new CHECKOUT] [--ring-kib K] [--messages N]
                                  [--rounds R] [--dequeue] [--core cython|pure]

Each checkout gets its own producer and consumer children (``bench_qp``'s, run with
that checkout first on ``PYTHONPATH``: build its extension first), connected by one
queue pair of ``--ring-kib`` KiB. After one untimed warm-up run each, ``--rounds``
rounds send ``--messages`` 64 KiB messages through old, then new; the consumer reads
in place (``peek_view`` + ``consume``) or, with ``--dequeue``, copies out. Printed per
checkout: MB/s per round, the median, CPU per message of both children, and their
sleeps (voluntary context switches) per message; then new/old per round. Taking turns
puts both under the same load, which moves wall-clock figures a lot on a busy machine:
read the per-round ratios, not one figure. A report: it never fails on timing.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from vsockcompat import bench_qp  # noqa: E402  (after the path)

SIZE = 65536


def _sleeps(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches"):
                return int(line.split(":")[1])
    return 0


def _stream(tree, core, rundir, ring, timeout):
    """bench_qp's producer/consumer pair, importing vsockcompat from ``tree``."""
    plain = bench_qp._child_env

    def env(impl, rd):
        out = plain(impl, rd)
        out["PYTHONPATH"] = os.path.abspath(tree)
        return out

    bench_qp._child_env = env
    try:
        return bench_qp._Stream("qp-" + core, rundir, timeout, ring)
    finally:
        bench_qp._child_env = plain


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="the checkout to compare against")
    parser.add_argument("--new", default=HERE, help="the checkout measured (default: this one)")
    parser.add_argument("--ring-kib", type=int, default=bench_qp.RING >> 10)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dequeue", action="store_true", help="the consumer copies out instead")
    parser.add_argument("--core", choices=("cython", "pure"), default="cython")
    args = parser.parse_args(argv)
    in_place = not args.dequeue
    rundir = tempfile.mkdtemp(prefix="vscqt", dir="/tmp")
    streams = {}
    old_cwd = os.getcwd()
    os.chdir(rundir)  # the children's working directory (first on their sys.path) shadows no checkout
    try:
        for name in ("old", "new"):
            sub = os.path.join(rundir, name)
            os.mkdir(sub)
            streams[name] = _stream(getattr(args, name), args.core, sub, args.ring_kib << 10, 60)
        for stream in streams.values():
            stream.run(SIZE, args.messages, in_place=in_place)
        runs = {name: [] for name in streams}
        for _ in range(args.rounds):
            for name, stream in streams.items():
                pids = (stream.producer.proc.pid, stream.consumer.proc.pid)
                before = [_sleeps(p) for p in pids]
                r = stream.run(SIZE, args.messages, in_place=in_place)
                if not r["ok"]:
                    raise SystemExit("%s: the consumer got other bytes than were sent" % name)
                after = [_sleeps(p) for p in pids]
                runs[name].append((r["mb_s"], r["cpu_us"], (after[0] - before[0]) / args.messages,
                                   (after[1] - before[1]) / args.messages))
    finally:
        for stream in streams.values():
            stream.close()
        os.chdir(old_cwd)
        shutil.rmtree(rundir, ignore_errors=True)
    try:
        load = "%.2f" % os.getloadavg()[0]
    except OSError:
        load = "?"
    print("64 KiB messages, %s core, %d KiB ring, consumer %s; load average %s" % (
        args.core, args.ring_kib, "in place" if in_place else "dequeue", load))
    for name, xs in runs.items():
        print("%s: MB/s %s | median %.0f MB/s, CPU %.1f us/msg, sleeps/msg producer %.2f consumer %.2f" % (
            name, " ".join("%.0f" % x[0] for x in xs), statistics.median(x[0] for x in xs),
            statistics.median(x[1] for x in xs), statistics.median(x[2] for x in xs),
            statistics.median(x[3] for x in xs)))
    ratios = [n[0] / o[0] for n, o in zip(runs["new"], runs["old"])]
    print("new/old per round: %s | median %.2f" % (" ".join("%.2f" % r for r in ratios), statistics.median(ratios)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
