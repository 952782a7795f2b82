"""Build and run the libFuzzer target of the access-control file readers for a bounded time.

    python fuzz/c_acl.py --seconds 60

Like fuzz/c_core.py (same requirements; skipped with the reason when clang has no
libFuzzer): a crash or a sanitizer report exits non-zero and leaves the reproducer.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from c_core import FLAGS, HERE, SRC, find_clang

SOURCES = ["vsc_acl.c", "vsc_policy.c", "vsc_local.c", "vsc_dgram.c"]
SEEDS = {
    "acl": b"vsockcompat-acl 1 datagram\n2 1023 4 deny\n3 0 4 allow\n3 1024 4 deny\n",
    "group": b"vsockcompat-group 1 2 4242 123456\n3 0 1\n4 1024 0\n",
    "policy": b'[discovery]\nregister = "trusted"\n\n[contexts.3]\nflags = ["restricted"]  # c\nuid = 1000\n'
              b'[contexts."4"]\nflags = [\n  "trusted",\n]\n',
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="how long to fuzz (default 60)")
    parser.add_argument("--workdir", help="where to build and keep findings (default: a temporary folder)")
    args = parser.parse_args(argv)
    clang = find_clang()
    if clang is None:
        print("fuzz_c_acl: SKIPPED: no clang on PATH (Debian: apt-get install clang-14 libclang-rt-14-dev)")
        return 0
    workdir = args.workdir or tempfile.mkdtemp(prefix="vscfuzz")
    os.makedirs(workdir, exist_ok=True)
    target = os.path.join(workdir, "fuzz_c_acl")
    build = subprocess.run([clang] + FLAGS + ["-I", SRC, os.path.join(HERE, "fuzz_c_acl.c")]
                           + [os.path.join(SRC, s) for s in SOURCES] + ["-o", target],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if build.returncode != 0:
        if "libclang_rt.fuzzer" in build.stdout or "cannot find" in build.stdout:
            print("fuzz_c_acl: SKIPPED: clang has no libFuzzer runtime (Debian: libclang-rt-14-dev)\n" + build.stdout)
            return 0
        print(build.stdout)
        return build.returncode
    corpus = os.path.join(workdir, "corpus_acl")
    os.makedirs(corpus, exist_ok=True)
    for name, seed in SEEDS.items():
        with open(os.path.join(corpus, "seed-" + name), "wb") as f:
            f.write(seed)
    run = subprocess.run([target, corpus, "-max_total_time=%d" % args.seconds, "-timeout=10",
                          "-artifact_prefix=" + workdir + "/", "-print_final_stats=1"])
    print("fuzz_c_acl: exit %d, work folder %s" % (run.returncode, workdir))
    if run.returncode == 0 and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
