"""Build and run the libFuzzer target of the C core for a bounded time.

    python fuzz/c_core.py --seconds 60

Needs clang with libFuzzer (Debian: clang-14 and libclang-rt-14-dev). Without
it, says so and exits 0 (the target is skipped, not failed); a crash or a
sanitizer report exits non-zero and leaves the reproducer in the work folder.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
SOURCES = ["vsc_dgram.c", "vsc_ring.c", "vsc_ds.c", "vsc_endpoint.c", "vsc_local.c", "vsc_vsock.c", "vsc_vsock_dgram.c",
           "vsc_hybrid.c", "vsc_link.c", "vsc_acl.c", "vsc_acl_memory.c", "vsc_policy.c", "vsc_shm.c",
           "vsc_mirror.c", "vsc_mirror_core.c", "vsc_mirror_serve.c"]
FLAGS = ["-g", "-O1", "-std=gnu11", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=undefined",
         "-pthread"]


def find_clang():
    for name in ("clang", "clang-16", "clang-15", "clang-14"):
        path = shutil.which(name)
        if path:
            return path
    return None


def run_target(name, sources, seeds=None, argv=None):
    """Build ``fuzz/<name>.c`` with ``sources`` from src/ under the sanitizers and fuzz it for
    ``--seconds`` from a corpus holding ``seeds`` (name -> bytes). The exit status of the run;
    0 with a SKIPPED line when clang or its libFuzzer runtime is missing."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="how long to fuzz (default 60)")
    parser.add_argument("--workdir", help="where to build and keep findings (default: a temporary folder)")
    args = parser.parse_args(argv)
    clang = find_clang()
    if clang is None:
        print("%s: SKIPPED: no clang on PATH (Debian: apt-get install clang-14 libclang-rt-14-dev)" % name)
        return 0
    workdir = args.workdir or tempfile.mkdtemp(prefix="vscfuzz")
    os.makedirs(workdir, exist_ok=True)
    target = os.path.join(workdir, name)
    build = subprocess.run([clang] + FLAGS + ["-I", SRC, os.path.join(HERE, name + ".c")]
                           + [os.path.join(SRC, s) for s in sources] + ["-o", target],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if build.returncode != 0:
        if "libclang_rt.fuzzer" in build.stdout or "cannot find" in build.stdout:
            print("%s: SKIPPED: clang has no libFuzzer runtime (Debian: libclang-rt-14-dev)\n%s"
                  % (name, build.stdout))
            return 0
        print(build.stdout)
        return build.returncode
    corpus = os.path.join(workdir, "corpus-" + name)
    os.makedirs(corpus, exist_ok=True)
    for seed_name, seed in (seeds or {}).items():
        with open(os.path.join(corpus, "seed-" + seed_name), "wb") as f:
            f.write(seed)
    run = subprocess.run([target, corpus, "-max_total_time=%d" % args.seconds, "-timeout=10",
                          "-artifact_prefix=" + workdir + "/", "-print_final_stats=1"])
    print("%s: exit %d, work folder %s" % (name, run.returncode, workdir))
    if run.returncode == 0 and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return run.returncode


def mirror_seeds():
    """Frames of a mirror stream (vsockcompat.mirror_wire): a welcome with updates in and out of range."""
    sys.path.insert(0, os.path.dirname(HERE))
    from vsockcompat import mirror_wire as W
    return {"mirror-welcome": W.encode(W.SIZE, 300) + W.encode(W.UPDATE, 0, b"x" * 64)
            + W.encode(W.UPDATE, 290, b"0123456789") + W.encode(W.FLUSHED, 0) + W.encode(W.ACK, 1),
            "mirror-outside": W.encode(W.UPDATE, 299, b"ab") + W.encode(W.UPDATE, 1 << 63, b"c")}


def main(argv=None):
    return run_target("fuzz_c_core", SOURCES, seeds=mirror_seeds(), argv=argv)

if __name__ == "__main__":
    sys.exit(main())
