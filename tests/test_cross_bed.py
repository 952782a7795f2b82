"""The host half of the cross bed (testbed/cross.py, testbed/vmm_stop.py), without a guest: the
daemons' command lines, logs and the host command's environment with one daemon for both guests
and with ``--vmm-per-guest``; and that ``stop_vmm`` ends only the process the bed started for
that guest. AF_UNIX only (the warm-up's connects, which find no VMM socket); the "daemons" are
sleeping Python processes named like it."""
import json
import os
import signal
import subprocess
import sys
import time
import types

import psutil
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "testbed"))
import cross  # noqa: E402
import vmm_stop  # noqa: E402

BINARY = "/cache/vhost-device-vsock/root/usr/bin/vhost-device-vsock"
SLEEPER = ("import signal, sys, time\n"
           "if sys.argv[1:2] == ['deaf']: signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
           "print('ready', flush=True)\ntime.sleep(60)")


def test_one_daemon_for_both_guests_or_one_each(tmp_path):
    job = str(tmp_path)
    spec = {cid: "guest-cid=%d,socket=%s/vhost%d.sock,uds-path=%s/vm%d.vsock" % (cid, job, cid, job, cid)
            for cid in (3, 4)}
    assert cross.daemon_groups((3,), False) == [(3,)]
    assert cross.daemon_groups((3, 4), False) == [(3, 4)]
    assert cross.daemon_groups((3, 4), True) == [(3,), (4,)]
    assert cross.daemon_command(BINARY, job, (3, 4)) == [BINARY, "--vm", spec[3], "--vm", spec[4]]
    per_guest = [cross.daemon_command(BINARY, job, group) for group in cross.daemon_groups((3, 4), True)]
    assert per_guest == [[BINARY, "--vm", spec[3]], [BINARY, "--vm", spec[4]]]
    assert not any("forward" in word for cmd in per_guest for word in cmd)   # refusals: test_gate.py


def test_the_daemons_logs(tmp_path):
    job = str(tmp_path)
    assert cross.daemon_log_path("/logs/vmm", job, (3, 4), False) == "/logs/vmm"
    assert [cross.daemon_log_path("/logs/vmm", job, (cid,), True) for cid in (3, 4)] == [
        "/logs/vmm.cid3", "/logs/vmm.cid4"]
    assert cross.daemon_log_path(None, job, (3,), True) != cross.daemon_log_path(None, job, (4,), True)
    assert os.path.dirname(cross.daemon_log_path(None, job, (3, 4), False)) == job


def fake_daemons(groups, pids):
    return [(group, types.SimpleNamespace(pid=pid), None) for group, pid in zip(groups, pids)]


def test_the_host_command_reaches_each_guest_through_its_own_socket(tmp_path, monkeypatch):
    job = str(tmp_path)
    for name in (vmm_stop.VMMS_ENV, vmm_stop.JOB_ENV):
        monkeypatch.delenv(name, raising=False)
    sockets = "%s/vm3.vsock:%s/vm4.vsock" % (job, job)
    env = cross.host_command_env(job, fake_daemons([(3,), (4,)], [1001, 1002]), True)
    assert (env["VSOCKCOMPAT_TRANSPORT"], env["VSOCKCOMPAT_HYBRID_UDS"], env["VSOCKCOMPAT_HYBRID_CID"]) == (
        "hybrid", sockets, "3:4")
    assert (env[vmm_stop.VMMS_ENV], env[vmm_stop.JOB_ENV]) == ("3=1001,4=1002", job)
    shared = cross.host_command_env(job, fake_daemons([(3, 4)], [1001]), False)
    assert (shared["VSOCKCOMPAT_HYBRID_UDS"], shared["VSOCKCOMPAT_HYBRID_CID"]) == (sockets, "3:4")
    assert vmm_stop.VMMS_ENV not in shared and vmm_stop.JOB_ENV not in shared
    assert cross.second_guest_env(False) == {"VSOCKCOMPAT_CROSS_SIBLING": "4"}
    assert cross.second_guest_env(True) == {"VSOCKCOMPAT_CROSS_OWN_VMM": "4"}


def test_a_daemon_per_guest_needs_two_guests(capsys):
    with pytest.raises(SystemExit) as info:
        cross.main(["run", "--vmm-per-guest", "--", "true"])
    assert info.value.code == 2 and "--vmm-per-guest needs --guests 2" in capsys.readouterr().err


@pytest.fixture
def spawn(tmp_path):
    """Starts a sleeping process whose argv[0] is ``name`` in tmp_path (``deaf``: it ignores
    SIGTERM) and ``--vm spec``; all are killed at teardown."""
    procs = []

    def start(name, spec, deaf=False):
        argv = [str(tmp_path / name), "-c", SLEEPER] + (["deaf"] if deaf else []) + ["--vm", spec]
        procs.append(subprocess.Popen(argv, executable=sys.executable, stdout=subprocess.PIPE))
        assert procs[-1].stdout.readline() == b"ready\n"
        return procs[-1]
    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_stop_vmm_ends_only_the_beds_daemon_of_that_guest(tmp_path, spawn):
    job = str(tmp_path / "job")
    os.mkdir(job)
    daemon3 = spawn(vmm_stop.DAEMON_NAME, vmm_stop.vm_spec(job, 3))
    daemon4 = spawn(vmm_stop.DAEMON_NAME, vmm_stop.vm_spec(job, 4))
    other_job = spawn(vmm_stop.DAEMON_NAME, vmm_stop.vm_spec(str(tmp_path / "other"), 4))
    other_name = spawn("python3", vmm_stop.vm_spec(job, 4))
    refusals = [
        ({}, 4, "runs no VMM per guest"),
        ({vmm_stop.VMMS_ENV: "4=x", vmm_stop.JOB_ENV: job}, 4, "malformed"),
        (vmm_stop.host_env(job, {3: daemon3.pid, 4: daemon4.pid}), 7, "no VMM for CID 7"),
        (vmm_stop.host_env(job, {3: daemon3.pid, 4: other_job.pid}), 4, "not the bed's"),
        (vmm_stop.host_env(job, {3: daemon3.pid, 4: other_name.pid}), 4, "not the bed's"),
        (vmm_stop.host_env(job, {3: daemon4.pid, 4: daemon3.pid}), 4, "not the bed's"),   # CID 3's daemon
    ]
    for environ, cid, reason in refusals:
        with pytest.raises(vmm_stop.Refused, match=reason):
            vmm_stop.stop_vmm(cid, environ)
    assert all(p.poll() is None for p in (daemon3, daemon4, other_job, other_name))
    assert not vmm_stop.stopped_on_request(job, 4)

    done = vmm_stop.stop_vmm(4, vmm_stop.host_env(job, {3: daemon3.pid, 4: daemon4.pid}))
    assert done == "stopped CID 4's VMM (pid %d, signal %d)" % (daemon4.pid, signal.SIGTERM)
    assert daemon4.wait(5) == -signal.SIGTERM
    assert vmm_stop.stopped_on_request(job, 4) and not vmm_stop.stopped_on_request(job, 3)
    assert all(p.poll() is None for p in (daemon3, other_job, other_name))
    with pytest.raises(vmm_stop.Refused, match="cannot be read"):      # reaped: gone
        vmm_stop.stop_vmm(4, vmm_stop.host_env(job, {3: daemon3.pid, 4: daemon4.pid}))


def test_stop_vmm_kills_a_daemon_that_ignores_sigterm(tmp_path, spawn, monkeypatch):
    monkeypatch.setattr(vmm_stop, "GRACE", 0.5)
    deaf = spawn(vmm_stop.DAEMON_NAME, vmm_stop.vm_spec(str(tmp_path), 4), deaf=True)
    done = vmm_stop.stop_vmm(4, vmm_stop.host_env(str(tmp_path), {4: deaf.pid}))
    assert done.endswith("signal %d)" % signal.SIGKILL) and deaf.wait(5) == -signal.SIGKILL


def test_the_host_peers_stop_vmm_refuses_bad_requests(tmp_path, spawn, monkeypatch):
    """``host_peer.py``'s ``stop-vmm``: never the asking guest's own VMM (however spelled), never
    a CID that is not a number, never outside ``--vmm-per-guest``; else ``stop_vmm``'s answer."""
    from cross_vm import host_peer
    daemon = spawn(vmm_stop.DAEMON_NAME, vmm_stop.vm_spec(str(tmp_path), 3))
    monkeypatch.setenv(vmm_stop.VMMS_ENV, "3=%d" % daemon.pid)
    monkeypatch.setenv(vmm_stop.JOB_ENV, str(tmp_path))

    def ask(payload, guest_cid=3):
        return host_peer.answer(None, types.SimpleNamespace(payload=payload), None, None, guest_cid)
    for payload in (b"stop-vmm 3", b"stop-vmm 03", b"stop-vmm +4", b"stop-vmm -1", b"stop-vmm x"):
        assert ask(payload).startswith(b"refused: "), payload
    assert ask(b"stop-vmm 4").startswith(b"refused: the bed started no VMM for CID 4")
    assert daemon.poll() is None
    monkeypatch.delenv(vmm_stop.VMMS_ENV)
    assert ask(b"stop-vmm 3", guest_cid=4).startswith(b"refused: the bed runs no VMM per guest")
    monkeypatch.setenv(vmm_stop.VMMS_ENV, "3=%d" % daemon.pid)
    assert ask(b"stop-vmm 3", guest_cid=4) == b"stopped: stopped CID 3's VMM (pid %d, signal %d)" % (
        daemon.pid, signal.SIGTERM)


FAKE_DAEMON = """#!%s
import sys, time
for i, word in enumerate(sys.argv[:-1]):
    if word == "--vm":    # the bed waits for the vhost socket's path: a plain file will do
        spec = dict(item.split("=", 1) for item in sys.argv[i + 1].split(","))
        open(spec["socket"], "w").close()
        print("serving CID", spec["guest-cid"], flush=True)
time.sleep(60)
"""
HOST_CMD = "%s -c 'import json, os, sys, time; json.dump(dict(os.environ), open(sys.argv[1], \"w\")); time.sleep(60)' %s"


def test_a_run_with_a_daemon_per_guest_starts_and_stops_both(tmp_path, monkeypatch):
    """``_run_cross`` with ``--vmm-per-guest``, the boot replaced: two daemons (fakes that serve
    nothing), each logging to its own file, the host command given both VMM sockets and both
    daemons' pids, and everything stopped at the end."""
    binary = tmp_path / vmm_stop.DAEMON_NAME
    binary.write_text(FAKE_DAEMON % sys.executable)
    binary.chmod(0o755)
    job, env_file = tmp_path / "job", tmp_path / "host-env.json"
    job.mkdir()
    seen = {}

    def boot_all(args, command, cache, kernel, jobdir, paths, start):
        while not env_file.exists() or not env_file.read_text().endswith("}"):
            assert time.monotonic() < start + 30, "the host command never started"
            time.sleep(0.05)
        seen["env"] = json.loads(env_file.read_text())
        pids = dict(item.split("=") for item in seen["env"][vmm_stop.VMMS_ENV].split(","))
        seen["daemons"] = {int(cid): psutil.Process(int(pid)).cmdline() for cid, pid in pids.items()}
        return 0
    monkeypatch.setattr(cross, "_boot_all", boot_all)
    monkeypatch.setattr(cross.vmm_warmup, "RETRY", 0.01)    # no VMM socket here: it retries
    args = cross.argparse.Namespace(guests=2, vmm_per_guest=True, vmm_log=str(tmp_path / "vmm.log"),
                                    host_cmd=HOST_CMD % (sys.executable, env_file), timeout=60)
    assert cross._run_cross(args, ["true"], None, None, {"binary": str(binary), "version": "fake"},
                            str(job)) == 0
    assert seen["daemons"] == {cid: [sys.executable, str(binary), "--vm", vmm_stop.vm_spec(str(job), cid)]
                               for cid in (3, 4)}
    assert seen["env"]["VSOCKCOMPAT_HYBRID_UDS"] == "%s/vm3.vsock:%s/vm4.vsock" % (job, job)
    assert (seen["env"]["VSOCKCOMPAT_HYBRID_CID"], seen["env"][vmm_stop.JOB_ENV]) == ("3:4", str(job))
    for cid in (3, 4):
        assert (tmp_path / ("vmm.log.cid%d" % cid)).read_text() == "serving CID %d\n" % cid
    pids = [int(item.split("=")[1]) for item in seen["env"][vmm_stop.VMMS_ENV].split(",")]
    assert not any(psutil.pid_exists(pid) for pid in pids)
