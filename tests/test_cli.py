"""The vsockcompat command: demo, info, errors."""
import json
import subprocess

from conftest import PYTHON, child_env

CLI = [PYTHON, "-m", "vsockcompat"]


def run(args, env, timeout=120):
    return subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_shows_the_exchange(rundir, core):
    result = run(["demo", "--core", core.NAME], child_env(rundir, core.NAME))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "%s core" % core.NAME in lines[0]
    assert lines[1] == "[server, context 2] Running datagram server --- will respond to 3 queries."
    assert lines[2:8] == ["[client, context 3] Received message: HELLO, CLIENT!",
                          "[server, context 2] Received message: HELLO, SERVER!"] * 3
    assert lines[-1] == "demo succeeded"


def test_info_json_describes_the_runtime(rundir, core):
    env = child_env(rundir, core.NAME, cid=5)
    data = json.loads(run(["info", "--json"], env).stdout)
    assert data["backend"] == core.NAME
    assert (data["transport"], data["rundir"], data["context_id"]) == ("local", rundir, 5)
    assert data["discovery"]["address"] == [1, 1]
    assert data["discovery"]["running"] is False


def test_info_shows_the_registry_once_the_daemon_runs(rundir, core):
    env = child_env(rundir, core.NAME)
    register = ("import vsockcompat as v, sys\n"
                "e = v.DatagramEndpoint()\n"
                "v.discovery.register('HOST INFO', e.handle)\n"
                "print(v.discovery.lookup('HOST INFO'))\n"
                "sys.stdout.flush(); sys.stdin.read()\n")
    holder = subprocess.Popen([PYTHON, "-c", register], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().startswith("VMCIHandle(context=2, resource=1024)")
        data = json.loads(run(["info", "--json"], env).stdout)
        assert data["discovery"]["running"] is True
        names = {entry["name"] for entry in data["discovery"]["entries"]}
        assert {"vmci public group", "HOST INFO"} <= names
        assert 1024 in data["contexts"]["2"]
        text = run(["info"], env).stdout
        assert "backend:           %s" % core.NAME in text and "HOST INFO" in text
    finally:
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()


def test_unknown_command(rundir, core):
    result = run(["frobnicate"], child_env(rundir, core.NAME))
    assert result.returncode == 2
    assert "unknown command 'frobnicate'" in result.stderr


def test_version_and_help(rundir, core):
    env = child_env(rundir, core.NAME)
    assert run(["--version"], env).stdout.strip()
    assert "datagram-app" in run(["--help"], env).stdout
