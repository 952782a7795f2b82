"""The upkeep of a mirrored region's attacher: libvmci.so.0 (src/vsc_mirror.c) versus Python's
(vsockcompat/mirror.py) on both cores, attached at once to one Python creator's region.

    python benchmarks/c_mirror_idle.py                     # 1 MiB region, 3 s, idle creator
    python benchmarks/c_mirror_idle.py --size 16777216 --writes 100

An attacher scans its copy every 10 ms even when nothing changes (the price of noticing plain
memory writes without a call). The creator, in this process on the local transport with
VSOCKCOMPAT_SHM_MODE=mirrored, writes ``--writes`` 64-byte lines per second (0: idle); each
attacher's CPU time over the same ``--seconds`` (all its threads, /proc/PID/task/*/schedstat: less
disturbed by load than the wall clock; this machine kind has no PMU for perf's instruction counts)
is printed per second with the ratio of each Python attacher to the C one. A benchmark reports, it never fails on its figures: exit status 0
when every run completed. Everything runs in a private directory /tmp/vscmXXXXXXXX, removed at the end.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from vsockcompat import clib  # noqa: E402
from vsockcompat.mirror import MirroredRegion  # noqa: E402
from vsockcompat.runtime import Runtime  # noqa: E402
from vsockcompat._settings import Settings  # noqa: E402

C_ATTACHER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include "vmcilib.h"
int main(int argc, char **argv)
{
   void *addr = NULL;
   uint32 size = 0;
   if (argc != 3 || VMCI_InitApp(NULL) != VMCI_SUCCESS
       || VMCISharedMem_Attach(VMCI_MAKE_HANDLE(atoi(argv[1]), atoi(argv[2])), &addr, &size) != VMCI_SUCCESS)
      return 1;
   printf("ready\n");
   fflush(stdout);
   getchar();
   return VMCISharedMem_Detach(VMCI_MAKE_HANDLE(atoi(argv[1]), atoi(argv[2]))) != VMCI_SUCCESS;
}
"""

PY_ATTACHER = """
import sys
from vsockcompat.mirror import MirroredRegion
region = MirroredRegion.attach((int(sys.argv[1]), int(sys.argv[2])))
print("ready", flush=True)
sys.stdin.readline()
region.detach()
"""


def env_for(rundir, cid, pure=False, library=None):
    env = dict(os.environ, VSOCKCOMPAT_RUNDIR=rundir, VSOCKCOMPAT_CID=str(cid), VSOCKCOMPAT_TRANSPORT="local",
               VSOCKCOMPAT_SHM_MODE="mirrored", VSOCKCOMPAT_DS_AUTOSTART="0",
               VSOCKCOMPAT_NO_EXTENSIONS="1" if pure else "0",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    if library is not None:
        env["LD_LIBRARY_PATH"] = os.path.dirname(library)
    return env


def cpu_ns(pid):
    """CPU time of all threads of pid so far (/proc/PID/task/*/schedstat), in ns."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--writes", type=int, default=0, help="64-byte lines the creator writes per second")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="vscm", dir="/tmp")
    children = {}
    status = 0
    try:
        lib_dir = os.path.join(work, "lib")
        library = clib.build_libvmci(lib_dir, extra_cflags=["-O2"])
        src = os.path.join(work, "attacher.c")
        with open(src, "w") as f:
            f.write(C_ATTACHER)
        exe = os.path.join(work, "attacher")
        cc = clib.find_compiler()
        subprocess.run(cc + ["-O2", "-I", clib.SOURCE_DIR, src, "-o", exe, "-L", lib_dir, "-lvmci"], check=True)
        rt = Runtime(Settings(no_extensions=False, rundir=work, cid=2, transport="local",
                              ds_autostart=False)._replace(shm_mode="mirrored"))
        with MirroredRegion.create(args.size, runtime=rt) as region:
            h = [str(v) for v in region.handle]
            commands = {"C (libvmci.so.0)": ([exe] + h, env_for(work, 3, library=library)),
                        "Python, cython core": ([sys.executable, "-c", PY_ATTACHER] + h, env_for(work, 4)),
                        "Python, pure core": ([sys.executable, "-c", PY_ATTACHER] + h, env_for(work, 5, pure=True))}
            for name, (argv, env) in commands.items():
                children[name] = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                  text=True)
                assert children[name].stdout.readline() == "ready\n", name
            stop = threading.Event()

            def write():
                line = 0
                while not stop.wait(1.0 / args.writes):
                    region.buffer[line * 64 % args.size] = (line & 0xFF)
                    line += 1
            writer = threading.Thread(target=write, daemon=True)
            if args.writes:
                writer.start()
            time.sleep(0.5)
            before = {name: cpu_ns(p.pid) for name, p in children.items()}
            time.sleep(args.seconds)
            counts = {name: (cpu_ns(p.pid) - before[name]) / args.seconds / 1e6 for name, p in children.items()}
            stop.set()
            for p in children.values():
                p.stdin.write("\n")
                p.stdin.flush()
                status |= p.wait(60) != 0
        c = counts["C (libvmci.so.0)"]
        print("attacher upkeep, %d-byte region, creator writing %d lines/s, %.1f s (load %.2f):"
              % (args.size, args.writes, args.seconds, os.getloadavg()[0]))
        for name, value in counts.items():
            print("  %-22s %8.2f ms of CPU per second  %7.2fx C" % (name, value, value / c if c else 0))
    finally:
        for p in children.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
