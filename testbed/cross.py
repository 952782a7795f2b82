#!/usr/bin/env python3
"""The cross-VM test bed: a guest (CID 3), whose vsock device is served by ``vhost-device-vsock``,
and optionally a second one (CID 4) behind the same daemon or, ``--vmm-per-guest``, its own.

    python testbed/cross.py setup                              # guest.py's setup + the daemon
    python testbed/cross.py run [--host-cmd CMD] -- COMMAND... # boot, run COMMAND in the guest

Unlike ``guest.py`` (vsock_loopback only), the guest booted here has a real virtio vsock device:
QEMU's ``vhost-user-vsock-pci``, whose backend is the ``vhost-device-vsock`` daemon run on this
machine. That daemon opens only Unix sockets: the guest's ``connect((2, P))`` reaches a listener at
``<uds>_P`` here, and a process here reaches the guest's port P by connecting to ``<uds>`` and
sending ``CONNECT P`` (the ``hybrid`` transport). No AF_VSOCK socket is used on this machine:

* the daemon's command line is built in one place and never has ``--forward-cid`` or
  ``--forward-listen`` (the options that make it open AF_VSOCK here); a check refuses them;
* QEMU starts through a guard that lets through exactly the vhost-user device and chardev built
  here and refuses every other option mentioning vsock (a kernel ``vhost-vsock`` device above all);
* in the guest, before anything runs, the bed checks the nonce on the kernel command line, that
  there is exactly one virtio vsock device, loads ``vmw_vsock_virtio_transport`` and checks that
  the local CID is the one given to the daemon; only then does it export ``VSOCKCOMPAT_CROSS=1``
  and ``VSOCKCOMPAT_CROSS_NONCE``, which the gate of ``tests/cross_vm/conftest.py`` requires.

Before the command runs, the guest accepts two connections the host makes through the VMM socket
(``vmm_warmup.py``: vhost-device-vsock 0.3.0 refuses host-initiated connections while its next
host port number is one a guest is connected to, 1, the discovery daemon's, first). On a failed
run the bed prints the end of the daemon's log (``--vmm-log PATH`` keeps all of it).

``--host-cmd`` runs on this machine, started before the guest boots and stopped after it ends, with
``VSOCKCOMPAT_TRANSPORT=hybrid``, ``VSOCKCOMPAT_HYBRID_UDS`` and ``VSOCKCOMPAT_HYBRID_CID`` set.
The run fails when either command fails. Status 77 from ``setup``: the bed cannot be built here.

``--guests 2 --peer-cmd CMD`` adds a second guest, CID 4, behind the same daemon (a second
``--vm`` in its one default group: the daemon carries the guests' connections to each other),
booted beside CID 3 with its own guard, nonce and job, running CMD until CID 3's command ended;
``--host-cmd`` then runs once, with both VMM sockets (``VSOCKCOMPAT_HYBRID_UDS=<vm3>:<vm4>``,
``VSOCKCOMPAT_HYBRID_CID=3:4``: one hybrid transport, and one discovery daemon, serve both
guests), and CID 3's command gets ``VSOCKCOMPAT_CROSS_SIBLING=4``. A sibling that ends first
fails the run.

``--vmm-per-guest`` (with ``--guests 2``) gives each guest a daemon of its own instead (one
``--vm`` each; ``--vmm-log PATH`` keeps ``PATH.cid3`` and ``PATH.cid4``): the guests then have
no link to each other, the host command still gets both VMM sockets, plus the daemons' pids
(``vmm_stop.py``), so a test can stop CID 4's daemon mid-run while CID 3 keeps its own. CID 3's
command gets ``VSOCKCOMPAT_CROSS_OWN_VMM=4`` instead of ``VSOCKCOMPAT_CROSS_SIBLING``; CID 4's
guest ending first fails the run unless its daemon was stopped that way.
"""
import argparse
import fcntl
import glob
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import guest  # noqa: E402  (the single-guest bed: kernel, virtme-ng, the boot loop)
import vmm_stop  # noqa: E402  (a daemon per guest: stopping one mid-run)
import vmm_warmup  # noqa: E402  (past vhost-device-vsock 0.3.0's port-counter bug)

GUEST_CID = 3
#: The second guest of ``--guests 2``: a sibling of CID 3 in the daemon's one (default) group.
SIBLING_CID = 4
#: CID 3's command gets one of these, naming CID 4: ``--guests 2``, ``--vmm-per-guest`` added.
SIBLING_ENV = "VSOCKCOMPAT_CROSS_SIBLING"
OWN_VMM_ENV = "VSOCKCOMPAT_CROSS_OWN_VMM"
DAEMON_PACKAGE = vmm_stop.DAEMON_NAME
#: Sets the daemon's RUST_LOG (default "warn"); the bed prints the end of its log when a run fails.
DAEMON_LOG_ENV = "VSOCKCOMPAT_TESTBED_VMM_LOG"
DAEMON_SUITE = "unstable"               # not in Debian 12; its binary runs there (glibc >= 2.34)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# The daemon options that open AF_VSOCK sockets on this machine: never passed.
FORBIDDEN_DAEMON_OPTIONS = ("--forward-cid", "--forward-listen")
GUEST_MODULES = ("vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport")
OTHER_TRANSPORTS = ("vmw_vsock_vmci_transport", "hv_sock")
NONCE_PARAM = "vsockcompat_cross"
IOCTL_VM_SOCKETS_GET_LOCAL_CID = 0x7B9
SOCKET_WAIT = 10.0

HERE = os.path.dirname(os.path.abspath(__file__))
say = guest.say


# ---------------------------------------------------------------- setup: the daemon

def daemon_dir(cache):
    return os.path.join(cache, DAEMON_PACKAGE)


def ready_daemon(cache):
    """The cached daemon: a dict (version, binary) or None."""
    try:
        with open(os.path.join(daemon_dir(cache), "daemon.json")) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    binary = os.path.join(daemon_dir(cache), "root", "usr", "bin", DAEMON_PACKAGE)
    if not os.access(binary, os.X_OK):
        return None
    info["binary"] = binary
    return info


def debian_mirror():
    """The machine's configured Debian mirror (first ``.../debian`` URI), else deb.debian.org."""
    files = glob.glob("/etc/apt/sources.list.d/*") + ["/etc/apt/sources.list"]
    for path in files:
        try:
            with open(path) as f:
                words = f.read().split()
        except OSError:
            continue
        for word in words:
            if word.startswith(("http://", "https://")) and word.rstrip("/").endswith("/debian"):
                return word.rstrip("/")
    return DEFAULT_MIRROR


def private_apt_options(state):
    """apt options that use only ``state`` (own sources, lists, cache, status): the machine's apt
    configuration and package lists are neither read for sources nor changed."""
    return ["-o", "Dir::Etc::SourceList=" + os.path.join(state, "sources.list"),
            "-o", "Dir::Etc::SourceParts=" + os.path.join(state, "sources.list.d"),
            "-o", "Dir::Etc::PreferencesParts=" + os.path.join(state, "preferences.d"),
            "-o", "Dir::State::Lists=" + os.path.join(state, "lists"),
            "-o", "Dir::Cache=" + os.path.join(state, "cache"),
            "-o", "Dir::State::status=" + os.path.join(state, "status"),
            "-o", "Acquire::Languages=none", "-o", "APT::Architectures=amd64",
            "-o", "APT::Sandbox::User=root"]


def ensure_daemon(cache):
    """Fetches vhost-device-vsock from Debian unstable with a private apt state, unpacks it into
    the cache (nothing is installed) and checks that it runs. Raises guest.Unavailable."""
    with guest.CacheLock(cache, exclusive=True):
        current = ready_daemon(cache)
        if current:
            say("%s %s cached in %s" % (DAEMON_PACKAGE, current["version"], daemon_dir(cache)))
            return current
        if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
            raise guest.Unavailable("fetching %s needs apt-get and dpkg" % DAEMON_PACKAGE)
        if not os.path.exists(KEYRING):
            raise guest.Unavailable("no Debian archive keyring at %s" % KEYRING)
        final = daemon_dir(cache)
        partial = final + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        state = os.path.join(partial, "apt")
        for sub in ("sources.list.d", "preferences.d", "lists/partial", "cache/archives/partial"):
            os.makedirs(os.path.join(state, sub))
        open(os.path.join(state, "status"), "w").close()
        mirror = debian_mirror()
        with open(os.path.join(state, "sources.list"), "w") as f:
            f.write("deb [signed-by=%s] %s %s main\n" % (KEYRING, mirror, DAEMON_SUITE))
        options = private_apt_options(state)
        say("apt-get update (private state, %s %s)" % (mirror, DAEMON_SUITE))
        guest._run(["apt-get"] + options + ["update", "-q"], "apt-get update (%s)" % DAEMON_SUITE,
                   env=guest._apt_env())
        say("apt-get download %s" % DAEMON_PACKAGE)
        guest._run(["apt-get"] + options + ["download", "-q", DAEMON_PACKAGE],
                   "apt-get download " + DAEMON_PACKAGE, cwd=partial)
        debs = glob.glob(os.path.join(partial, "*.deb"))
        if len(debs) != 1:
            raise guest.Unavailable("apt-get download %s left %d .deb files"
                                    % (DAEMON_PACKAGE, len(debs)))
        version = guest._run(["dpkg-deb", "-f", debs[0], "Version"], "dpkg-deb -f").strip()
        guest._run(["dpkg", "-x", debs[0], os.path.join(partial, "root")], "dpkg -x")
        os.unlink(debs[0])
        shutil.rmtree(state)
        binary = os.path.join(partial, "root", "usr", "bin", DAEMON_PACKAGE)
        guest._run([binary, "--version"], "%s --version (needs glibc >= 2.34)" % DAEMON_PACKAGE,
                   timeout=30)
        with open(os.path.join(partial, "daemon.json"), "w") as f:
            json.dump({"package": DAEMON_PACKAGE, "version": version}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)
        return ready_daemon(cache)


def cmd_setup(args):
    status = guest.cmd_setup(args)
    if status != 0:
        return status
    try:
        daemon = ensure_daemon(guest.cache_dir())
    except guest.Unavailable as exc:
        print("testbed: cross setup impossible here: %s" % exc, flush=True)
        return guest.SKIP
    say("cross-VM bed ready: %s %s" % (DAEMON_PACKAGE, daemon["version"]))
    return 0


# ---------------------------------------------------------------- run (host side)

def daemon_command(binary, jobdir, cids):
    """A daemon's one command line, serving the guests ``cids`` (their sockets in ``jobdir``):
    Unix sockets only (checked, fail closed). Guests of one daemon are in its default group, so
    it carries their connections to each other; guests of different daemons cannot reach each
    other."""
    cmd = [binary]
    for cid in cids:
        cmd += ["--vm", vmm_stop.vm_spec(jobdir, cid)]
    if any(word.startswith(FORBIDDEN_DAEMON_OPTIONS) or "forward" in word for word in cmd):
        raise SystemExit("testbed: refusing a %s command line that forwards to AF_VSOCK: %s"
                         % (DAEMON_PACKAGE, cmd))
    return cmd


def daemon_groups(cids, per_guest):
    """The guests of each daemon: one daemon for all, or with ``per_guest`` one each."""
    return [(cid,) for cid in cids] if per_guest else [tuple(cids)]


def daemon_log_path(vmm_log, jobdir, group, per_guest):
    """Where the daemon of ``group`` logs: ``--vmm-log PATH`` (``PATH.cid<N>`` with a daemon per
    guest), else the job directory (removed after the run)."""
    if vmm_log is None:
        return os.path.join(jobdir, "daemon%s.log" % "-".join(map(str, group)))
    return "%s.cid%d" % (vmm_log, group[0]) if per_guest else vmm_log


def qemu_options(vhost_socket, memory):
    """QEMU options of the vhost-user device: memfd shared memory (the daemon maps the guest's
    memory), the chardev to the daemon and the device. Returns [(option, value), ...]."""
    return [("-object", "memory-backend-memfd,id=mem,size=%s,share=on" % memory),
            ("-numa", "node,memdev=mem"),
            ("-chardev", "socket,id=vhvsock,path=%s" % vhost_socket),
            ("-device", "vhost-user-vsock-pci,chardev=vhvsock")]


CROSS_GUARD = r'''#!%(python)s
# Written by testbed/cross.py: QEMU gets exactly the vhost-user vsock device built there.
import os, sys
REAL = %(real)r
GUARDED = %(guarded)r
ALLOWED = %(allowed)r
args = sys.argv[1:]
seen = set()
for i, arg in enumerate(args):
    option, _, inline = arg.partition("=")
    if option.startswith("--"):
        option = option[1:]
    if option in GUARDED:
        value = inline if inline else (args[i + 1] if i + 1 < len(args) else "")
        if (option, value) in ALLOWED:
            seen.add((option, value))
        elif "vsock" in value.lower():
            sys.stderr.write("testbed: QEMU guard refused %%s %%s: not the cross bed's "
                             "vhost-user device\n" %% (option, value))
            sys.exit(%(bed_error)d)
    elif option == "-readconfig" or "vhost-vsock" in arg:
        sys.stderr.write("testbed: QEMU guard refused %%s\n" %% arg)
        sys.exit(%(bed_error)d)
if "-kernel" in args and len(seen) != len(ALLOWED):   # a boot, not a probe like --version
    sys.stderr.write("testbed: QEMU guard: the vhost-user vsock options are missing\n")
    sys.exit(%(bed_error)d)
os.execv(REAL, [REAL] + args)
'''


def write_cross_guard(jobdir, allowed):
    real = shutil.which("qemu-system-x86_64")
    if real is None:
        return None
    path = os.path.join(jobdir, "qemu-system-x86_64")
    vsock_pairs = tuple(pair for pair in allowed if "vsock" in pair[1].lower())
    with open(path, "w") as f:
        f.write(CROSS_GUARD % {"python": sys.executable, "real": real,
                               "guarded": guest.GUARDED_QEMU_OPTIONS, "allowed": vsock_pairs,
                               "bed_error": guest.BED_ERROR})
    os.chmod(path, 0o755)
    return path


class CrossGuest(guest.Guest):
    """guest.Guest with the vhost-user vsock device and the cross bed's own nonce and entry."""

    def __init__(self, *args, qemu_opts, **kwargs):
        super().__init__(*args, **kwargs)
        self.qemu_opts = qemu_opts

    def command(self, accel, nonce, shell_cmd, cwd):
        cmd = super().command(accel, nonce, shell_cmd, cwd)
        cmd = [("%s=%s" % (NONCE_PARAM, nonce)) if a == "%s=%s" % (guest.NONCE_PARAM, nonce)
               else a for a in cmd]
        at = cmd.index("--exec")
        flat = " ".join(shlex.quote(w) for pair in self.qemu_opts for w in pair)
        return cmd[:at] + ["--qemu-opts=" + flat] + cmd[at:]


def _wait_for_socket(path, proc, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _stop(proc, name):
    """SIGTERM, then SIGKILL, to proc's own process group. Returns its status."""
    if proc.poll() is None:
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                say("%s did not stop on signal %d" % (name, sig))
    return proc.returncode


def cmd_run(args):
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("testbed: run needs a command: cross.py run -- COMMAND...")
    cache = guest.cache_dir()
    kernel = guest.ready_kernel(cache)
    daemon = ready_daemon(cache)
    if (kernel is None or daemon is None or guest.find_vng() is None
            or shutil.which("qemu-system-x86_64") is None):
        print("testbed: the cross-VM bed is not set up (kernel, %s, vng or QEMU missing in %s): "
              "run `python testbed/cross.py setup` first" % (DAEMON_PACKAGE, cache), flush=True)
        return 2
    os.makedirs(os.path.join(cache, "jobs"), exist_ok=True)
    jobdir = tempfile.mkdtemp(prefix="x-", dir=os.path.join(cache, "jobs"))
    try:
        with guest.CacheLock(cache, exclusive=False):
            return _run_cross(args, command, cache, kernel, daemon, jobdir)
    finally:
        shutil.rmtree(jobdir, ignore_errors=True)


def _start_daemons(args, daemon, jobdir, cids, daemons):
    """Starts the daemons of this run (``daemon_groups``), each added to ``daemons`` as
    ``(guest CIDs, process, log file)`` once started."""
    for group in daemon_groups(cids, args.vmm_per_guest):
        log = open(daemon_log_path(args.vmm_log, jobdir, group, args.vmm_per_guest), "w")
        daemons.append((group, subprocess.Popen(
            daemon_command(daemon["binary"], jobdir, group), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, RUST_LOG=os.environ.get(DAEMON_LOG_ENV, "warn"))), log))


def host_command_env(jobdir, daemons, per_guest):
    """The host command's environment: the hybrid settings for every guest's VMM socket and,
    with a daemon per guest, their pids for ``vmm_stop.stop_vmm``."""
    cids = [cid for group, _, _ in daemons for cid in group]
    env = dict(os.environ, **hybrid_env([(vmm_stop.paths(jobdir, cid)[1], cid) for cid in cids]))
    if per_guest:
        env.update(vmm_stop.host_env(jobdir, {group[0]: proc.pid for group, proc, _ in daemons}))
    return env


def _run_cross(args, command, cache, kernel, daemon, jobdir):
    cids = (GUEST_CID, SIBLING_CID)[:args.guests]
    paths = {cid: vmm_stop.paths(jobdir, cid) for cid in cids}
    start = time.monotonic()
    daemons = []
    hosts = []
    warmups = []
    status = guest.BED_ERROR
    try:
        _start_daemons(args, daemon, jobdir, cids, daemons)
        for group, proc_daemon, log in daemons:
            for cid in group:
                if not _wait_for_socket(paths[cid][0], proc_daemon, SOCKET_WAIT):
                    log.flush()
                    with open(log.name) as f:
                        out = guest._tail(f.read())
                    say("%s did not create %s (status %s): %s"
                        % (DAEMON_PACKAGE, paths[cid][0], proc_daemon.poll(), out))
                    return guest.BED_ERROR
                say("%s %s (pid %d) serves CID %d: vhost socket %s, hybrid socket %s"
                    % (DAEMON_PACKAGE, daemon["version"], proc_daemon.pid, cid, paths[cid][0],
                       paths[cid][1]))
                warmups.append((cid, vmm_warmup.start_host_side(paths[cid][1],
                                                                start + args.timeout)))
        if args.host_cmd:
            # One host command for every VMM socket: the hybrid transport routes by guest CID.
            env = host_command_env(jobdir, daemons, args.vmm_per_guest)
            say("host command for CIDs %s: %s" % (env["VSOCKCOMPAT_HYBRID_CID"], args.host_cmd))
            hosts.append(subprocess.Popen(shlex.split(args.host_cmd), stdin=subprocess.DEVNULL,
                                          start_new_session=True, env=env))
        status = _boot_all(args, command, cache, kernel, jobdir, paths, start)
    finally:
        for cid, finish in warmups:
            say("CID %d's warm-up: %d of %d host connections answered"
                % (cid, finish(), vmm_warmup.CONNECTS))
        host_statuses = [_stop(host, "the host command") for host in hosts]
        for group, proc_daemon, log in daemons:
            _stop(proc_daemon, DAEMON_PACKAGE)
            log.close()
            if status != 0:
                with open(log.name, errors="replace") as f:
                    say("%s's log for CIDs %s (RUST_LOG=%s), its end: %s"
                        % (DAEMON_PACKAGE, group, os.environ.get(DAEMON_LOG_ENV, "warn"),
                           guest._tail(f.read(), lines=20)))
    for host_status in host_statuses:
        # Stopped by our SIGTERM counts as success; a host command that failed on its own does not.
        say("host command status %s" % host_status)
        if host_status not in (0, -signal.SIGTERM) and status == 0:
            status = 1
    return status


def hybrid_env(guests):
    """The host command's hybrid settings for ``guests``, ``[(uds path, guest CID), ...]``: one
    transport over all their VMM sockets. The paths are ``:``-separated, so none may hold one."""
    if any(":" in uds for uds, _ in guests):
        raise SystemExit("testbed: a VMM socket path holds ':', which VSOCKCOMPAT_HYBRID_UDS "
                         "separates paths with: %s" % [uds for uds, _ in guests])
    return {"VSOCKCOMPAT_TRANSPORT": "hybrid",
            "VSOCKCOMPAT_HYBRID_UDS": ":".join(uds for uds, _ in guests),
            "VSOCKCOMPAT_HYBRID_CID": ":".join(str(cid) for _, cid in guests)}


def choose_accel(cache):
    """VSOCKCOMPAT_TESTBED_ACCEL if kvm or tcg, else what guest.py's KVM probe found in this boot,
    else TCG (no probe here: a probe guest would need its own guard)."""
    wanted = os.environ.get(guest.ACCEL_ENV, "auto").strip().lower() or "auto"
    if wanted in ("kvm", "tcg"):
        return wanted, "%s=%s" % (guest.ACCEL_ENV, wanted)
    try:
        with open(os.path.join(cache, "kvm-probe.json")) as f:
            seen = json.load(f)
        if seen.get("boot_id") == guest._boot_id():
            return seen["accel"], "KVM probe of this boot: %s" % seen["why"]
    except (OSError, ValueError, KeyError):
        pass
    return "tcg", "no KVM probe in this boot"


def _prepare(args, kernel, jobdir, vhost_socket, cid, command, extra_env):
    """The guest of ``cid``: its guard (its own device only), nonce and job in ``jobdir``.
    Returns (vm, inner command, nonce)."""
    opts = qemu_options(vhost_socket, args.memory)
    guard = write_cross_guard(jobdir, opts)
    vm = CrossGuest(kernel, jobdir, guard, args.cpus, args.memory, args.verbose, qemu_opts=opts)
    nonce = uuid.uuid4().hex
    env = {name: os.environ[name] for name in guest.FORWARDED_ENV if name in os.environ}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit("testbed: --env takes NAME=VALUE, not %r" % item)
        env[name] = value
    env.update(extra_env)
    job = os.path.join(jobdir, "job.json")
    with open(job, "w") as f:
        json.dump({"nonce": nonce, "command": command, "env": env, "cwd": guest.guest_cwd(),
                   "cid": cid}, f)
    return vm, "%s %s inside %s" % (sys.executable, os.path.abspath(__file__), job), nonce


def second_guest_env(per_guest):
    """What CID 3's command is told of CID 4: a sibling behind the same daemon, or a guest
    behind a VMM of its own (no link between the guests; the host command may stop that VMM)."""
    return {OWN_VMM_ENV if per_guest else SIBLING_ENV: str(SIBLING_CID)}


def _boot_all(args, command, cache, kernel, jobdir, paths, start):
    """Boots CID 3 (COMMAND) and, with ``--guests 2``, CID 4 (``--peer-cmd``) beside it; CID 4
    is stopped once CID 3's command ended. Returns CID 3's status, or a failure when CID 4's
    guest ended on its own first."""
    accel, why = choose_accel(cache)
    cwd = guest.guest_cwd()
    sibling = None
    extra = {}
    if args.guests == 2:
        peer_dir = os.path.join(jobdir, "cid%d" % SIBLING_CID)
        os.mkdir(peer_dir)
        vm4, inner4, nonce4 = _prepare(args, kernel, peer_dir, paths[SIBLING_CID][0], SIBLING_CID,
                                       shlex.split(args.peer_cmd), {})
        result = {}
        say("booting the sibling, CID %d, running: %s" % (SIBLING_CID, args.peer_cmd))
        sibling = threading.Thread(target=lambda: result.update(
            zip(("status", "marks"), vm4.boot(accel, inner4, cwd, nonce4,
                                              timeout=args.timeout - (time.monotonic() - start)))),
            daemon=True)
        sibling.start()
        extra = second_guest_env(args.vmm_per_guest)
    vm, inner, nonce = _prepare(args, kernel, jobdir, paths[GUEST_CID][0], GUEST_CID, command,
                                extra)
    remaining = args.timeout - (time.monotonic() - start)
    say("booting Linux %s, CID %d behind %s (%s: %s; %d vCPUs, %s)"
        % (kernel["kver"], GUEST_CID, DAEMON_PACKAGE, accel.upper(), why, args.cpus, args.memory))
    say("command: %s (in %s, at most %.0f s)" % (" ".join(command), cwd, remaining))
    status, marks = vm.boot(accel, inner, cwd, nonce, timeout=remaining)
    status = _verdict(status, marks, start)
    if sibling is not None:
        ended_first = not sibling.is_alive()
        vm4.stop()
        sibling.join(30)
        if ended_first and vmm_stop.stopped_on_request(jobdir, SIBLING_CID):
            say("CID %d ended before CID %d's command after its VMM was stopped on request "
                "(status %s)" % (SIBLING_CID, GUEST_CID, result.get("status")))
        elif ended_first:
            say("the sibling CID %d ended before CID %d's command (status %s, marks %s): failing"
                % (SIBLING_CID, GUEST_CID, result.get("status"), result.get("marks")))
            status = status or guest.BED_ERROR
        else:
            say("sibling CID %d stopped after CID %d's command" % (SIBLING_CID, GUEST_CID))
    return status


def _verdict(status, marks, start):
    total = time.monotonic() - start
    if status == guest.TIMED_OUT:
        say("timed out after %.1f s in all: QEMU killed" % total)
        return guest.TIMED_OUT
    if "ready" not in marks or "status" not in marks:
        say("the guest never became ready or its command's end was not reported "
            "(vng status %d after %.1f s)" % (status, total))
        return status or guest.BED_ERROR
    if marks["status"] != status:
        say("the guest reported status %d but vng returned %d: failing" % (marks["status"], status))
        return status or marks["status"] or guest.BED_ERROR
    say("boot %.1f s, command %.1f s, shutdown %.1f s, total %.1f s, status %d"
        % (marks["ready"], marks["done"] - marks["ready"], marks["end"] - marks["done"], total,
           status))
    return status


# ---------------------------------------------------------------- inside the guest

def local_cid():
    fd = os.open("/dev/vsock", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return struct.unpack("I", fcntl.ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, b"\0" * 4))[0]
    finally:
        os.close(fd)


def _refuse(msg):
    print("testbed[guest]: refusing: %s" % msg, flush=True)
    return guest.BED_ERROR


def cmd_inside(args):
    with open(args.job) as f:
        job = json.load(f)
    with open("/proc/cmdline") as f:
        cmdline = f.read().split()
    if "%s=%s" % (NONCE_PARAM, job["nonce"]) not in cmdline:
        return _refuse("not the guest this job booted (no %s=%s on the kernel command line)"
                       % (NONCE_PARAM, job["nonce"]))
    devices = guest._virtio_vsock_devices()
    if len(devices) != 1:
        return _refuse("expected one virtio vsock device (the vhost-user one), found %s" % devices)
    others = [m for m in OTHER_TRANSPORTS if os.path.exists("/sys/module/" + m)]
    if others:
        return _refuse("other vsock transports loaded: %s" % " ".join(others))
    modprobe = shutil.which("modprobe", path=guest._sbin_path())
    proc = subprocess.run([modprobe or "modprobe", "-a"] + list(GUEST_MODULES),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    if proc.returncode != 0:
        return _refuse("modprobe failed (%d): %s" % (proc.returncode, guest._tail(proc.stdout)))
    try:
        cid = local_cid()
    except OSError as exc:
        return _refuse("cannot read the local CID: %s" % exc)
    if cid != job["cid"]:
        return _refuse("the local CID is %d, not %d" % (cid, job["cid"]))
    started = time.monotonic()
    accepted = vmm_warmup.guest_side()
    if accepted < vmm_warmup.CONNECTS:
        print("testbed[guest]: warning: %d of %d warm-up connections came from the host in %.1f s;"
              " host-initiated connections may be refused (vmm_warmup.py says why)"
              % (accepted, vmm_warmup.CONNECTS, time.monotonic() - started), flush=True)
    env = dict(os.environ)
    env.update(job["env"])
    env.update(VSOCKCOMPAT_CROSS="1", VSOCKCOMPAT_CROSS_NONCE=job["nonce"],
               VSOCKCOMPAT_CROSS_CID=str(cid))
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    print("testbed[guest]: ready: Linux %s, uptime %.1f s, CID %d on the vhost-user device"
          % (os.uname().release, uptime, cid), flush=True)
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
    parser = argparse.ArgumentParser(prog="cross.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("setup", help="guest.py setup plus the daemon (77: impossible here)")
    run = sub.add_parser("run", help="boot the CID %d guest and run a command in it" % GUEST_CID)
    run.add_argument("--timeout", type=float, default=600,
                     help="seconds for everything, boot included; QEMU is killed after (124)")
    run.add_argument("--cpus", type=int, default=2)
    run.add_argument("--memory", default="1G")
    run.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    run.add_argument("--host-cmd", metavar="SHELL_CMD",
                     help="a command line (split like a shell's words, no shell) run on this "
                    "machine with the hybrid transport, from before the boot to its end")
    run.add_argument("--verbose", action="store_true", help="show the guest's boot console")
    run.add_argument("--vmm-log", metavar="PATH",
                     help="write %s's log to PATH, kept after the run (its level: $%s)"
                     % (DAEMON_PACKAGE, DAEMON_LOG_ENV))
    run.add_argument("--guests", type=int, choices=(1, 2), default=1,
                     help="2: also boot CID %d, a sibling of CID %d behind the same daemon "
                     "(unless --vmm-per-guest), running --peer-cmd" % (SIBLING_CID, GUEST_CID))
    run.add_argument("--peer-cmd", metavar="SHELL_CMD",
                     help="with --guests 2: the command (split like a shell's words) run in "
                     "CID %d from its boot until CID %d's command ended" % (SIBLING_CID, GUEST_CID))
    run.add_argument("--vmm-per-guest", action="store_true",
                     help="with --guests 2: a %s of its own for each guest (own vhost and "
                     "hybrid sockets; --vmm-log PATH gives PATH.cid3 and PATH.cid4). The guests "
                     "then have no link to each other (no sibling), and the host command may "
                     "stop CID %d's daemon mid-run (testbed/vmm_stop.py)"
                     % (DAEMON_PACKAGE, SIBLING_CID))
    run.add_argument("command", nargs=argparse.REMAINDER)
    inside = sub.add_parser("inside", help=argparse.SUPPRESS)
    inside.add_argument("job")
    args = parser.parse_args(argv)
    if args.action == "setup":
        return cmd_setup(args)
    if args.action == "run":
        if args.guests == 2 and not args.peer_cmd:
            parser.error("--guests 2 needs --peer-cmd")
        if args.vmm_per_guest and args.guests != 2:
            parser.error("--vmm-per-guest needs --guests 2")
        return cmd_run(args)
    return cmd_inside(args)


if __name__ == "__main__":
    sys.exit(main())
