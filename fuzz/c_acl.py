"""Build and run the libFuzzer target of the access-control file readers for a bounded time.

    python fuzz/c_acl.py --seconds 60

Like fuzz/c_core.py (same requirements; skipped with the reason when clang has no
libFuzzer): a crash or a sanitizer report exits non-zero and leaves the reproducer.
"""
import sys

from c_core import run_target

SOURCES = ["vsc_acl.c", "vsc_acl_memory.c", "vsc_policy.c", "vsc_local.c", "vsc_dgram.c"]
SEEDS = {
    "acl": b"vsockcompat-acl 1 datagram\n2 1023 4 deny\n3 0 4 allow\n3 1024 4 deny\n",
    "group": b"vsockcompat-group 1 2 4242 123456\n3 0 1\n4 1024 0\n",
    "policy": b'[discovery]\nregister = "trusted"\n\n[contexts.3]\nflags = ["restricted"]  # c\nuid = 1000\n'
              b'[contexts."4"]\nflags = [\n  "trusted",\n]\n',
}


def main(argv=None):
    return run_target("fuzz_c_acl", SOURCES, SEEDS, argv)

if __name__ == "__main__":
    sys.exit(main())
