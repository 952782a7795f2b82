#!/usr/bin/env python3
"""The real-vsock test bed: a Linux guest booted with QEMU, where AF_VSOCK is real and local.

    python testbed/guest.py setup                 # install and cache what the bed needs
    python testbed/guest.py run -- COMMAND...     # boot the guest, run COMMAND, return its status

The machines this project runs on are themselves VMs whose /dev/vsock leads to a hypervisor host
that is not ours, so AF_VSOCK is never used on them. Inside the guest booted here there is no
vsock device at all, only ``vsock_loopback``: CID 1 (and CID 2) stay inside the guest. Every step
fails closed:

* the QEMU started by virtme-ng goes through a guard that refuses any vsock device or option;
* before it loads a module, the guest side checks that it runs in the guest this script booted
  (a nonce on the kernel command line) and that no virtio vsock device or host transport is present;
* only then does it load ``vsock vmw_vsock_virtio_transport_common vsock_loopback``, check again,
  and export ``VSOCKCOMPAT_TESTBED=1``, which the real-vsock tests require (with the sysfs checks of
  ``tests/real_vsock/conftest.py``) before they create an AF_VSOCK socket.

``setup`` exits with status 77 and a one-line reason when the bed cannot be built on this machine
(no root for apt-get, no network to the package registries, not x86-64 Linux). See README.rst.
"""
import argparse
import fcntl
import glob
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid

SKIP = 77                    # setup impossible here: the caller skips the real-vsock tests
BED_ERROR = 3                # the guest is not what it must be: nothing was run
TIMED_OUT = 124

CACHE_ENV = "VSOCKCOMPAT_TESTBED_CACHE"
ACCEL_ENV = "VSOCKCOMPAT_TESTBED_ACCEL"     # auto (default), kvm or tcg
DEFAULT_CACHE = os.path.join("~", ".cache", "vsockcompat-testbed")

# Debian package -> a file it installs (its presence means the package is there).
DEBIAN_PACKAGES = {
    "qemu-system-x86": "/usr/bin/qemu-system-x86_64",
    "kmod": "/sbin/depmod",
    "busybox-static": "/bin/busybox",
    "udev": "/lib/systemd/systemd-udevd",   # virtme-ng names its virtio-serial ports with udev
    "file": "/usr/bin/file",
}
VIRTME_NG = ("virtme-ng", "1.42")
KERNEL_META = "linux-image-amd64"           # depends on the generic flavour (has 9p; -cloud has not)

# Modules udev would load for QEMU's emulated PC hardware the guest does not use: under TCG they
# cost tens of seconds of boot (kvm_amd alone about 9 s).
UNUSED_MODULES = ("kvm_amd", "kvm_intel", "kvm", "sr_mod", "cdrom", "ahci", "iTCO_wdt",
                  "i2c_i801", "lpc_ich", "powernow_k8", "pcspkr", "psmouse", "serio_raw", "evdev",
                  "aesni_intel", "ghash_clmulni_intel", "sha1_ssse3", "sha256_ssse3",
                  "sha512_ssse3", "crc32_pclmul", "crct10dif_pclmul", "crc32c_intel")
GUEST_MODULES = ("vsock", "vmw_vsock_virtio_transport_common", "vsock_loopback")
# Transports that lead out of a guest: none may be present where the tests run.
FORBIDDEN_MODULES = ("vmw_vsock_virtio_transport", "vmw_vsock_vmci_transport", "hv_sock")
VIRTIO_ID_VSOCK = 19
# QEMU options whose values name devices or backends: none may mention vsock.
GUARDED_QEMU_OPTIONS = ("-device", "-chardev", "-object", "-global", "-netdev", "-set")
# Variables the guest gets from the caller (it inherits PATH only; the rest must be passed).
FORWARDED_ENV = ("PATH", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE",
                 "CI", "LANG", "LC_ALL", "TERM")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NONCE_PARAM = "vsockcompat_testbed"


class Unavailable(Exception):
    """The bed cannot be built on this machine (status 77)."""


def say(msg):
    print("testbed: " + msg, flush=True)


def cache_dir():
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE))


def _tail(text, lines=3):
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _run(cmd, what, timeout=900, **kwargs):
    """Runs cmd quietly; on failure raises Unavailable with the tail of its output."""
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, **kwargs)
    except FileNotFoundError:
        raise Unavailable("%s: %s is not installed" % (what, cmd[0]))
    except subprocess.TimeoutExpired:
        raise Unavailable("%s: no answer within %d s (%s)" % (what, timeout, " ".join(cmd)))
    if proc.returncode != 0:
        raise Unavailable("%s failed (exit %d): %s" % (what, proc.returncode, _tail(proc.stdout)))
    return proc.stdout


def _sbin_path():
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _apt_env():
    return dict(os.environ, DEBIAN_FRONTEND="noninteractive")


# ---------------------------------------------------------------- setup

class Apt:
    """apt-get, updated at most once per setup."""

    def __init__(self):
        self.updated = False

    def update(self):
        if not self.updated:
            say("apt-get update")
            _run(["apt-get", "update", "-q"], "apt-get update", env=_apt_env())
            self.updated = True


def missing_debian_packages():
    missing = []
    for package, marker in DEBIAN_PACKAGES.items():
        try:
            status = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", package],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            installed = status.returncode == 0 and status.stdout.startswith("ii")
        except FileNotFoundError:
            installed = os.path.exists(marker)
        if not installed:
            missing.append(package)
    return missing


def ensure_debian_packages(apt):
    missing = missing_debian_packages()
    if not missing:
        say("Debian packages present: " + " ".join(DEBIAN_PACKAGES))
        return
    if shutil.which("apt-get") is None:
        raise Unavailable("missing %s and there is no apt-get" % " ".join(missing))
    if os.geteuid() != 0:
        raise Unavailable("missing Debian packages %s; installing them needs root"
                          % " ".join(missing))
    apt.update()
    say("apt-get install " + " ".join(missing))
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends"] + missing,
         "apt-get install", env=_apt_env())


def _installed_version(dist):
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:
        return None
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def ensure_virtme_ng():
    name, wanted = VIRTME_NG
    have = _installed_version(name)
    if have == wanted and find_vng():
        say("%s %s present in %s" % (name, have, sys.prefix))
        return
    say("pip install %s==%s into %s" % (name, wanted, sys.prefix))
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          "%s==%s" % (name, wanted)], "pip install " + name)
    if not find_vng():
        raise Unavailable("%s installed but its vng command is not found" % name)


def find_vng():
    candidate = os.path.join(sysconfig.get_path("scripts"), "vng")
    if os.access(candidate, os.X_OK):
        return candidate
    candidate = os.path.join(os.path.dirname(sys.executable), "vng")
    if os.access(candidate, os.X_OK):
        return candidate
    return shutil.which("vng")


class CacheLock:
    """flock on <cache>/.lock: exclusive while unpacking, shared while a guest uses the kernel."""

    def __init__(self, directory, exclusive):
        self.path = os.path.join(directory, ".lock")
        self.mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, self.mode | fcntl.LOCK_NB)
        except BlockingIOError:
            say("waiting for the lock on %s (another setup or run)" % self.path)
            fcntl.flock(self.fd, self.mode)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def kernel_package(apt):
    """The package linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64, or None."""
    for attempt in (0, 1):
        try:
            out = subprocess.run(["apt-cache", "depends", KERNEL_META], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True).stdout
        except FileNotFoundError:
            return None
        found = re.findall(r"^\s*Depends:\s*(linux-image-\S+)", out, re.M)
        if found:
            return found[0]
        if attempt == 0 and os.geteuid() == 0 and shutil.which("apt-get"):
            apt.update()    # an empty or stale package list
        else:
            return None
    return None


def ready_kernel(cache):
    """The kernel recorded by the last setup: a dict (package, kver, root, vmlinuz) or None."""
    try:
        with open(os.path.join(cache, "current")) as f:
            package = f.read().strip()
        with open(os.path.join(cache, package, "kernel.json")) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    info["root"] = os.path.join(cache, package, "root")
    info["vmlinuz"] = os.path.join(info["root"], "boot", "vmlinuz-" + info["kver"])
    if not os.path.exists(info["vmlinuz"]):
        return None
    return info


def _write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def ensure_kernel(apt, cache):
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError as exc:
        raise Unavailable("cannot create the cache %s: %s" % (cache, exc.strerror))
    with CacheLock(cache, exclusive=True):
        package = kernel_package(apt)
        current = ready_kernel(cache)
        if package is None:
            if current:
                say("no package list to check %s against; keeping cached %s"
                    % (KERNEL_META, current["package"]))
                return current
            raise Unavailable("apt-cache cannot tell which package %s depends on" % KERNEL_META)
        final = os.path.join(cache, package)
        if current and current["package"] == package:
            say("kernel %s cached in %s" % (current["kver"], final))
            return current
        if os.path.exists(os.path.join(final, "kernel.json")):
            _write_atomic(os.path.join(cache, "current"), package + "\n")
            return ready_kernel(cache)
        partial = final + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        say("apt-get download %s" % package)
        _run(["apt-get", "download", "-q", package], "apt-get download " + package, cwd=partial)
        debs = glob.glob(os.path.join(partial, "*.deb"))
        if len(debs) != 1:
            raise Unavailable("apt-get download %s left %d .deb files" % (package, len(debs)))
        root = os.path.join(partial, "root")
        say("dpkg -x %s" % os.path.basename(debs[0]))
        _run(["dpkg", "-x", debs[0], root], "dpkg -x")
        os.unlink(debs[0])
        kvers = sorted(os.listdir(os.path.join(root, "lib", "modules")))
        if len(kvers) != 1 or not os.path.exists(os.path.join(root, "boot", "vmlinuz-" + kvers[0])):
            raise Unavailable("unexpected layout in %s: modules for %s" % (package, kvers))
        kver = kvers[0]
        depmod = shutil.which("depmod", path=_sbin_path())
        if depmod is None:
            raise Unavailable("depmod (Debian package kmod) is not installed")
        _run([depmod, "-b", root, kver], "depmod")
        for name in GUEST_MODULES:
            if not _module_in_tree(root, kver, name):
                raise Unavailable("kernel %s has no module %s" % (kver, name))
        with open(os.path.join(partial, "kernel.json"), "w") as f:
            json.dump({"package": package, "kver": kver}, f)
        os.rename(partial, final)
        _write_atomic(os.path.join(cache, "current"), package + "\n")
        for stale in glob.glob(os.path.join(cache, "linux-image-*")):
            if os.path.basename(stale) != package:
                say("removing stale %s" % stale)
                shutil.rmtree(stale, ignore_errors=True)
        return ready_kernel(cache)


def _module_in_tree(root, kver, name):
    with open(os.path.join(root, "lib", "modules", kver, "modules.dep")) as f:
        pattern = re.compile(r"/%s\.ko(\.[a-z]+)?:" % re.escape(name).replace("_", "[_-]"))
        return any(pattern.search(line) for line in f)


def _du(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def cmd_setup(args):
    start = time.monotonic()
    try:
        if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
            raise Unavailable("the bed needs x86-64 Linux (this is %s %s)"
                              % (sys.platform, os.uname().machine))
        apt = Apt()
        ensure_debian_packages(apt)
        ensure_virtme_ng()
        cache = cache_dir()
        kernel = ensure_kernel(apt, cache)
    except Unavailable as exc:
        print("testbed: setup impossible here: %s" % exc, flush=True)
        return SKIP
    say("ready: kernel %s, cache %s (%d MB), setup took %.1f s"
        % (kernel["kver"], cache, _du(cache) // 10**6, time.monotonic() - start))
    return 0


# ---------------------------------------------------------------- run (host side)

GUARD = r'''#!%(python)s
# Written by testbed/guest.py: refuses to start QEMU with anything vsock (fail closed).
import os, sys
REAL = %(real)r
GUARDED = %(guarded)r
args = sys.argv[1:]
for i, arg in enumerate(args):
    option, _, inline = arg.partition("=")
    if option.startswith("--"):
        option = option[1:]
    if option in GUARDED:
        value = inline if inline else (args[i + 1] if i + 1 < len(args) else "")
        if "vsock" in value.lower():
            sys.stderr.write("testbed: QEMU guard refused %%s %%s: no vsock device may reach "
                             "this machine's host\n" %% (option, value))
            sys.exit(%(bed_error)d)
    elif option == "-readconfig":
        sys.stderr.write("testbed: QEMU guard refused -readconfig (unchecked devices)\n")
        sys.exit(%(bed_error)d)
os.execv(REAL, [REAL] + args)
'''


def write_guard(jobdir):
    real = shutil.which("qemu-system-x86_64")
    if real is None:
        return None
    path = os.path.join(jobdir, "qemu-system-x86_64")
    with open(path, "w") as f:
        f.write(GUARD % {"python": sys.executable, "real": real, "guarded": GUARDED_QEMU_OPTIONS,
                         "bed_error": BED_ERROR})
    os.chmod(path, 0o755)
    return path


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class Guest:
    """One boot of the guest: runs vng in its own process group with pipes, bounded in time."""

    def __init__(self, kernel, jobdir, guard, cpus, memory, verbose):
        self.kernel, self.jobdir, self.guard = kernel, jobdir, guard
        self.cpus, self.memory, self.verbose = cpus, memory, verbose

    def command(self, accel, nonce, shell_cmd, cwd):
        cmd = [find_vng(), "--run", self.kernel["vmlinuz"], "--qemu", self.guard,
               "--cpus", str(self.cpus), "--memory", self.memory,
               "--rwdir=" + REPO, "--rodir=" + self.jobdir, "--cwd", cwd,
               "--force-9p",      # else vng waits seconds for a virtiofsd that cannot start
               "--append", "%s=%s" % (NONCE_PARAM, nonce),
               "--append", "modprobe.blacklist=" + ",".join(UNUSED_MODULES)]
        if accel == "tcg":
            cmd.append("--disable-kvm")
        if self.verbose:
            cmd.append("--verbose")
        return cmd + ["--exec", shell_cmd]

    def boot(self, accel, shell_cmd, cwd, nonce, timeout, echo=True):
        """Returns (status, marks): marks maps 'ready'/'done' to seconds since start, and 'status'
        to the status the guest reported."""
        cmd = self.command(accel, nonce, shell_cmd, cwd)
        start = time.monotonic()
        # vng runs virtme-run through PATH: put the scripts of this Python first.
        env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(cmd[0]),
                                                     os.environ.get("PATH", "")]))
        proc = self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, start_new_session=True,
                                            cwd=REPO, env=env)
        if getattr(self, "stopping", False):        # stop() came before the Popen
            self._kill(proc)
        marks = {}
        streams = {proc.stdout.fileno(): sys.stdout, proc.stderr.fileno(): sys.stderr}
        pending = {fd: b"" for fd in streams}
        deadline = start + timeout
        timed_out = False
        while streams:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select(list(streams), [], [], min(left, 1.0))
            for fd in ready:
                data = os.read(fd, 65536)
                if not data:
                    if pending[fd]:
                        self._line(pending[fd], streams[fd], marks, start, echo)
                    del streams[fd]
                    continue
                pending[fd] += data
                *lines, pending[fd] = pending[fd].split(b"\n")
                for line in lines:
                    self._line(line + b"\n", streams[fd], marks, start, echo)
        if timed_out:
            self._kill(proc)
            return TIMED_OUT, marks
        try:
            status = proc.wait(timeout=max(5.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._kill(proc)
            return TIMED_OUT, marks
        marks["end"] = time.monotonic() - start
        return status, marks

    @staticmethod
    def _line(raw, stream, marks, start, echo):
        text = raw.decode("utf-8", "replace")
        if text.startswith("testbed[guest]: ready"):
            marks.setdefault("ready", time.monotonic() - start)
        match = re.match(r"testbed\[guest\]: command exited with status (-?\d+)", text)
        if match:
            marks["done"] = time.monotonic() - start
            marks["status"] = int(match.group(1))
        if echo:
            stream.write(text)
            stream.flush()

    def stop(self):
        """Ends a boot running in another thread (its ``boot`` then returns QEMU's status)."""
        self.stopping = True
        proc = getattr(self, "proc", None)
        if proc is not None:
            self._kill(proc)

    @staticmethod
    def _kill(proc):
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue


def choose_accel(guest, cache, cwd):
    wanted = os.environ.get(ACCEL_ENV, "auto").strip().lower() or "auto"
    if wanted in ("kvm", "tcg"):
        return wanted, "%s=%s" % (ACCEL_ENV, wanted)
    if wanted != "auto":
        raise SystemExit("testbed: %s must be auto, kvm or tcg, not %r" % (ACCEL_ENV, wanted))
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "no usable /dev/kvm"
    record = os.path.join(cache, "kvm-probe.json")
    try:
        with open(record) as f:
            seen = json.load(f)
        if seen.get("boot_id") == _boot_id():
            return seen["accel"], "KVM probe of this boot: %s" % seen["why"]
    except (OSError, ValueError, KeyError):
        pass
    say("probing KVM (a guest running `true`, at most 20 s)")
    start = time.monotonic()
    status, _ = guest.boot("kvm", "true", cwd, "probe", timeout=20, echo=False)
    took = time.monotonic() - start
    if status == 0:
        accel, why = "kvm", "a KVM guest booted in %.1f s" % took
    else:
        accel, why = "tcg", "KVM guest failed (%s after %.1f s)" % (
            "timed out" if status == TIMED_OUT else "status %d" % status, took)
    try:
        _write_atomic(record, json.dumps({"boot_id": _boot_id(), "accel": accel, "why": why}))
    except OSError:
        pass
    return accel, why


def guest_cwd():
    cwd = os.getcwd()
    inside_repo = cwd == REPO or cwd.startswith(REPO + os.sep)
    # virtme-ng puts tmpfs overlays on these: the guest would not see the caller's files there.
    hidden = any(cwd == d or cwd.startswith(d + os.sep)
                 for d in ("/etc", "/lib", "/home", "/opt", "/srv", "/usr", "/var", "/tmp"))
    return cwd if inside_repo or not hidden else REPO


def cmd_run(args):
    command = args.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SystemExit("testbed: run needs a command: guest.py run -- COMMAND...")
    cache = cache_dir()
    kernel = ready_kernel(cache)
    if kernel is None or find_vng() is None or shutil.which("qemu-system-x86_64") is None:
        print("testbed: the bed is not set up (no kernel in %s, or no vng/QEMU): run "
              "`python testbed/guest.py setup` first" % cache, flush=True)
        return 2
    os.makedirs(os.path.join(cache, "jobs"), exist_ok=True)
    jobdir = tempfile.mkdtemp(prefix="job-", dir=os.path.join(cache, "jobs"))
    try:
        with CacheLock(cache, exclusive=False):
            return _run_in_guest(args, command, cache, kernel, jobdir)
    finally:
        shutil.rmtree(jobdir, ignore_errors=True)


def _run_in_guest(args, command, cache, kernel, jobdir):
    guard = write_guard(jobdir)
    guest = Guest(kernel, jobdir, guard, args.cpus, args.memory, args.verbose)
    cwd = guest_cwd()
    start = time.monotonic()
    accel, why = choose_accel(guest, cache, cwd)
    nonce = uuid.uuid4().hex
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit("testbed: --env takes NAME=VALUE, not %r" % item)
        env[name] = value
    job = os.path.join(jobdir, "job.json")
    with open(job, "w") as f:
        json.dump({"nonce": nonce, "command": command, "env": env, "cwd": cwd}, f)
    inner = "%s %s inside %s" % (sys.executable, os.path.abspath(__file__), job)
    remaining = args.timeout - (time.monotonic() - start)
    say("booting Linux %s (%s: %s; %d vCPUs, %s; repository %s shared read-write)"
        % (kernel["kver"], accel.upper(), why, args.cpus, args.memory, REPO))
    say("command: %s (in %s, at most %.0f s)" % (" ".join(command), cwd, remaining))
    status, marks = guest.boot(accel, inner, cwd, nonce, timeout=remaining)
    total = time.monotonic() - start
    if status == TIMED_OUT:
        say("timed out after %.1f s in all: QEMU killed" % total)
        return TIMED_OUT
    if "ready" not in marks:
        say("the guest never became ready (vng status %d after %.1f s)" % (status, total))
        return status or BED_ERROR
    boot = marks["ready"]
    if "status" not in marks:
        say("the command's end was not reported (vng status %d): failing" % status)
        return status or BED_ERROR
    if marks["status"] != status:
        say("the guest reported status %d but vng returned %d: failing"
            % (marks["status"], status))
        return status or marks["status"] or BED_ERROR
    say("boot %.1f s, command %.1f s, shutdown %.1f s, total %.1f s, status %d"
        % (boot, marks["done"] - boot, marks["end"] - marks["done"], total, status))
    return status


# ---------------------------------------------------------------- inside the guest

def _virtio_vsock_devices():
    found = []
    for path in glob.glob("/sys/bus/virtio/devices/*/device"):
        try:
            with open(path) as f:
                if int(f.read().strip(), 16) == VIRTIO_ID_VSOCK:
                    found.append(os.path.dirname(path))
        except (OSError, ValueError):
            found.append(os.path.dirname(path))   # unreadable: assume the worst
    return found


def _unsafe(when):
    problems = ["virtio vsock device %s" % d for d in _virtio_vsock_devices()]
    problems += ["module %s loaded" % m for m in FORBIDDEN_MODULES
                 if os.path.exists("/sys/module/" + m)]
    if problems:
        print("testbed[guest]: refusing (%s): %s" % (when, "; ".join(problems)), flush=True)
    return bool(problems)


def cmd_inside(args):
    with open(args.job) as f:
        job = json.load(f)
    with open("/proc/cmdline") as f:
        cmdline = f.read().split()
    if "%s=%s" % (NONCE_PARAM, job["nonce"]) not in cmdline:
        print("testbed[guest]: refusing: not the guest this job booted (no %s=%s on the "
              "kernel command line)" % (NONCE_PARAM, job["nonce"]), flush=True)
        return BED_ERROR
    if _unsafe("before loading modules"):
        return BED_ERROR
    modprobe = shutil.which("modprobe", path=_sbin_path())
    proc = subprocess.run([modprobe or "modprobe", "-a"] + list(GUEST_MODULES),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    if proc.returncode != 0:
        print("testbed[guest]: modprobe failed (%d): %s" % (proc.returncode, _tail(proc.stdout)),
              flush=True)
        return BED_ERROR
    if _unsafe("after loading modules"):
        return BED_ERROR
    if not os.path.isdir("/sys/module/vsock_loopback"):
        print("testbed[guest]: vsock_loopback did not load", flush=True)
        return BED_ERROR
    env = dict(os.environ)
    env.update(job["env"])
    env["VSOCKCOMPAT_TESTBED"] = "1"
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    print("testbed[guest]: ready: Linux %s, uptime %.1f s, loaded %s, no vsock device"
          % (os.uname().release, uptime, " ".join(GUEST_MODULES)), flush=True)
    start = time.monotonic()
    try:
        status = subprocess.call(job["command"], env=env, cwd=job["cwd"])
    except OSError as exc:
        print("testbed[guest]: cannot run %s: %s" % (job["command"][0], exc), flush=True)
        status = 127
    if status < 0:
        status = 128 - status
    print("testbed[guest]: command exited with status %d after %.1f s"
          % (status, time.monotonic() - start), flush=True)
    return status


# ---------------------------------------------------------------- entry point

def main(argv=None):
    parser = argparse.ArgumentParser(prog="guest.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("setup", help="install and cache what the bed needs (77: impossible here)")
    run = sub.add_parser("run", help="boot the guest and run a command in it")
    run.add_argument("--timeout", type=float, default=600,
                     help="seconds for everything, boot included; QEMU is killed after (124)")
    run.add_argument("--cpus", type=int, default=2)
    run.add_argument("--memory", default="1G")
    run.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                     help="another variable for the command (PATH, VIRTUAL_ENV, PYTHONPATH pass)")
    run.add_argument("--verbose", action="store_true", help="show the guest's boot console")
    run.add_argument("command", nargs=argparse.REMAINDER)
    inside = sub.add_parser("inside", help=argparse.SUPPRESS)
    inside.add_argument("job")
    args = parser.parse_args(argv)
    if args.action == "setup":
        return cmd_setup(args)
    if args.action == "run":
        return cmd_run(args)
    return cmd_inside(args)


if __name__ == "__main__":
    sys.exit(main())
