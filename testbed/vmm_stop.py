"""Stopping one guest's ``vhost-device-vsock`` mid-run, in the cross bed's ``--vmm-per-guest`` mode.

In that mode each guest has a daemon of its own (``cross.py``), so a test can end one guest's
VMM while the other guest, the one that checks what follows, keeps its own. The bed tells the host
command its daemons in two variables (``host_env``): ``VMMS_ENV``, ``<cid>=<pid>`` pairs joined by
``,``, and ``JOB_ENV``, the bed's job directory. ``stop_vmm(cid)`` (``host_peer.py``'s
``stop-vmm`` command) then ends the daemon of ``cid``, but only when that pid is still the process
the bed started for that guest: its ``argv[0]`` is ``vhost-device-vsock`` and its one ``--vm``
is exactly the bed's for ``cid``, whose socket paths are in the job directory (``vm_spec``).
Anything else is ``Refused`` and nothing is signalled. Before the signal it leaves a marker in
the job directory, so the bed knows that the guest which loses its device was stopped on request
(``stopped_on_request``) and does not count its early end as a failure.

Only a pid given by the bed, and checked, is ever signalled: no search by name. AF_UNIX and
signals only; the daemon's command line never holds a forward option (``cross.py`` refuses one).
"""
import os
import signal
import time

DAEMON_NAME = "vhost-device-vsock"
#: The host command's variables in ``--vmm-per-guest`` mode.
VMMS_ENV = "VSOCKCOMPAT_TESTBED_VMMS"
JOB_ENV = "VSOCKCOMPAT_TESTBED_JOB"
#: Seconds for the daemon to end after SIGTERM, then after SIGKILL.
GRACE = 5.0


class Refused(Exception):
    """The daemon of that CID was not stopped: the reason."""


def paths(jobdir, cid):
    """(vhost socket, hybrid uds path) of guest ``cid`` in the job directory ``jobdir``."""
    return (os.path.join(jobdir, "vhost%d.sock" % cid), os.path.join(jobdir, "vm%d.vsock" % cid))


def vm_spec(jobdir, cid):
    """The value of the daemon's ``--vm`` option for guest ``cid``."""
    return "guest-cid=%d,socket=%s,uds-path=%s" % ((cid,) + paths(jobdir, cid))


def host_env(jobdir, pids):
    """The host command's variables for the daemons ``pids``, ``{cid: pid}``."""
    return {VMMS_ENV: ",".join("%d=%d" % item for item in sorted(pids.items())), JOB_ENV: jobdir}


def _marker(jobdir, cid):
    return os.path.join(jobdir, "vmm%d.stopped" % cid)


def stopped_on_request(jobdir, cid):
    """True once ``stop_vmm`` signalled the daemon of ``cid`` in this job."""
    return os.path.exists(_marker(jobdir, cid))


def _bed_pid(cid, environ):
    if not environ.get(VMMS_ENV) or not environ.get(JOB_ENV):
        raise Refused("the bed runs no VMM per guest (cross.py run --guests 2 --vmm-per-guest)")
    pids = {}
    for item in environ[VMMS_ENV].split(","):
        key, _, value = item.partition("=")
        try:
            pids[int(key)] = int(value)
        except ValueError:
            raise Refused("%s is malformed: %r" % (VMMS_ENV, environ[VMMS_ENV])) from None
    if cid not in pids:
        raise Refused("the bed started no VMM for CID %d (it has %s)" % (cid, sorted(pids)))
    return pids[cid]


def _gone(proc):
    import psutil
    try:
        return proc.status() == psutil.STATUS_ZOMBIE    # ended; its parent, the bed, reaps it
    except psutil.NoSuchProcess:
        return True


def stop_vmm(cid, environ=None):
    """End the bed's daemon of guest ``cid`` (SIGTERM, then SIGKILL) and wait until it ended;
    returns what was done. ``Refused`` (nothing signalled) unless the pid the bed gave is that
    daemon."""
    import psutil    # here: cross.py, which the guest runs too, needs none of it
    environ = os.environ if environ is None else environ
    pid = _bed_pid(cid, environ)
    jobdir = environ[JOB_ENV]
    try:
        proc = psutil.Process(pid)
        argv = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied) as exc:
        raise Refused("CID %d's VMM (pid %d) cannot be read: %s" % (cid, pid, exc)) from None
    if _gone(proc):
        raise Refused("CID %d's VMM (pid %d) is not running" % (cid, pid))
    specs = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == "--vm"]
    if not argv or os.path.basename(argv[0]) != DAEMON_NAME or specs != [vm_spec(jobdir, cid)]:
        raise Refused("pid %d is not the bed's %s for CID %d in %s: %s"
                      % (pid, DAEMON_NAME, cid, jobdir, argv))
    open(_marker(jobdir, cid), "w").close()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            return "CID %d's VMM (pid %d) ended before signal %d" % (cid, pid, sig)
        deadline = time.monotonic() + GRACE
        while not _gone(proc) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _gone(proc):
            return "stopped CID %d's VMM (pid %d, signal %d)" % (cid, pid, sig)
    raise Refused("CID %d's VMM (pid %d) did not end after SIGKILL" % (cid, pid))
