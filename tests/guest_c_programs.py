"""Legacy C test programs inside a guest bed (tests/real_vsock, tests/cross_vm): built with the
guest's C compiler against libvmci.so.0, and tests/c/vsock_probe.c driven line by line."""
import os
import subprocess

from vsockcompat import clib

TESTS = os.path.dirname(os.path.abspath(__file__))
SRC_DIR = os.path.join(os.path.dirname(TESTS), "src")
C_DIR = os.path.join(TESTS, "c")


def probe_pattern(n):
    """The bytes vsock_probe sends and checks: byte i is (7 i + 3) mod 256."""
    return bytes((i * 7 + 3) & 0xFF for i in range(n))


def fnv1a(data):
    """vsock_probe's ``recvsum`` checksum: 32-bit FNV-1a."""
    h = 2166136261
    for byte in data:
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


def build_programs(cc, out, names, sources=None):
    """libvmci.so.0 (the package's when built, else built into ``out``) and the programs ``names``
    of tests/c (or at ``sources[name]``) built into ``out`` with the compiler ``cc``:
    ``{"library": path, name: path...}``."""
    library = clib.library_path() or clib.build_libvmci(os.path.join(out, "lib"), src_dir=SRC_DIR)
    built = {"library": library}
    for name in names:
        exe = os.path.join(out, name)
        source = (sources or {}).get(name) or os.path.join(C_DIR, name + ".c")
        proc = subprocess.run(cc + ["-Wall", "-Wextra", "-Werror", "-I", SRC_DIR, source,
                                    "-o", exe, "-L", os.path.dirname(library), "-l:libvmci.so.0", "-pthread"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout
        built[name] = exe
    return built


class ProbeProcess:
    """A running vsock_probe: ``ask(line)`` sends one command and returns its answer's words
    (at most ``maxsplit`` splits: the last word keeps its spaces); ``close()`` quits it and checks
    it exits 0 with nothing on stderr."""

    def __init__(self, argv, env, wait):
        self.wait = wait
        self.proc = subprocess.Popen(argv, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def ask(self, line, maxsplit=-1):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        name = line.split()[0]
        assert answer.startswith(name + "="), (line, answer, self.proc.poll())
        return answer[len(name) + 1:].rstrip("\n").split(" " if maxsplit >= 0 else None, maxsplit)

    def close(self):
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                assert self.proc.wait(self.wait) == 0
            assert self.proc.stderr.read() == ""
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self.proc.stderr.close()
