"""datagramApp (vmci-sdk.md section 7.1): texts, exit statuses, two processes."""
import subprocess

import pytest

from conftest import PYTHON, child_env

APP = [PYTHON, "-m", "vsockcompat", "datagram-app"]
USAGE = ("datagramApp [-d <VMCI device>] -c|-s\n\t\tMust provide exactly one of -c OR -s.\n"
         "datagramApp -h:\n\tPrints this help message.\n")


def run(args, env, timeout=60):
    return subprocess.run(APP + args, env=env, capture_output=True, text=True, timeout=timeout)


def test_server_and_clients_in_separate_processes_and_contexts(rundir, core):
    server = subprocess.Popen(APP + ["-s"], env=child_env(rundir, core.NAME, cid=2),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "Running datagram server --- will respond to 3 queries.\n"
        for _ in range(3):
            client = run(["-c", "-d", "/dev/vmci"], child_env(rundir, core.NAME, cid=3))
            assert (client.returncode, client.stdout, client.stderr) == (0, "Received message: HELLO, CLIENT!\n", "")
            assert server.stdout.readline() == "Received message: HELLO, SERVER!\n"
        assert server.wait(30) == 0
        assert server.stderr.read() == ""
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
        server.stdout.close()
        server.stderr.close()
    # The server unregistered its name: a late client finds nothing.
    late = run(["-c"], child_env(rundir, core.NAME, cid=3))
    assert (late.returncode, late.stdout, late.stderr) == (0, "", "Failed to lookup in discovery service.\n")


@pytest.mark.parametrize("args", [[], ["-s", "-c"], ["-h"], ["-x"], ["-s", "extra"], ["-d"]])
def test_usage(rundir, core, args):
    result = run(args, child_env(rundir, core.NAME))
    assert result.returncode == 255  # exit(-1)
    assert result.stderr == USAGE
    assert result.stdout == ""


def test_init_failure_exits_254(core):
    env = child_env("/tmp/" + "y" * 80, core.NAME)
    result = run(["-c"], env)
    assert (result.returncode, result.stderr) == (254, "Failed to init VMCI library.\n")


def test_a_second_server_cannot_register(rundir, core):
    first = subprocess.Popen(APP + ["-s"], env=child_env(rundir, core.NAME), stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().startswith("Running datagram server")
        second = run(["-s"], child_env(rundir, core.NAME))
        assert second.returncode == 0
        assert second.stderr == "Failed to register discovery service. rv = -22\n"
    finally:
        first.kill()
        first.wait()
        first.stdout.close()
