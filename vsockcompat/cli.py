"""The ``vsockcompat`` command: demo, info, ds, datagram-app, sharedmem-app, gc, bench."""
import argparse
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from ._version import __version__



def _package_env(extra):
    env = dict(os.environ)
    parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (parent, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def _stop_daemon(rundir):
    try:
        with open(os.path.join(rundir, "ds.pid")) as f:
            pid = int(f.read().split()[0])
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError, IndexError):
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.05)


def demo(argv):
    """Run datagramApp's server (context 2, the host) and three clients (context 3, a guest)."""
    parser = argparse.ArgumentParser(prog="vsockcompat demo", description=demo.__doc__)
    parser.add_argument("--core", choices=("cython", "pure"), help="data-plane core (default: the best available)")
    args = parser.parse_args(argv)
    from .runtime import default_runtime

    core = args.core or default_runtime().backend
    rundir = tempfile.mkdtemp(prefix="vscdemo", dir="/tmp")
    base = {"VSOCKCOMPAT_RUNDIR": rundir, "VSOCKCOMPAT_TRANSPORT": "local",
            "VSOCKCOMPAT_NO_EXTENSIONS": "1" if core == "pure" else "0"}
    command = [sys.executable, "-m", "vsockcompat", "datagram-app"]
    print("vsockcompat %s demo: datagramApp over the local transport, %s core, runtime dir %s"
          % (__version__, core, rundir), flush=True)
    server = subprocess.Popen(command + ["-s"], env=_package_env(dict(base, VSOCKCOMPAT_CID="2")),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ok = True
    try:
        line = server.stdout.readline().decode(errors="replace").rstrip("\n")
        print("[server, context 2] %s" % line, flush=True)
        if not line.startswith("Running datagram server"):
            return 1
        for _ in range(3):
            client = subprocess.run(command + ["-c"], env=_package_env(dict(base, VSOCKCOMPAT_CID="3")),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
            text = client.stdout.decode(errors="replace").rstrip("\n")
            print("[client, context 3] %s" % text, flush=True)
            ok = ok and client.returncode == 0 and text == "Received message: HELLO, CLIENT!"
            print("[server, context 2] %s" % server.stdout.readline().decode(errors="replace").rstrip("\n"),
                  flush=True)
        ok = server.wait(timeout=30) == 0 and ok
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stdout.close()
        _stop_daemon(rundir)
        shutil.rmtree(rundir, ignore_errors=True)
    print("demo %s" % ("succeeded" if ok else "FAILED"), flush=True)
    return 0 if ok else 1


def _info_data():
    from .handles import VMCI_DS_HANDLE
    from .runtime import default_runtime

    runtime = default_runtime()
    settings = runtime.settings
    data = {
        "version": __version__,
        "backend": runtime.backend,
        "transport": settings.transport,
        "rundir": settings.rundir,
        "context_id": settings.cid,
        "discovery": {"address": list(VMCI_DS_HANDLE), "running": False, "pid": None, "entries": []},
        "contexts": {},
    }
    transport = runtime.transport
    data["transport"] = transport.name
    data["discovery"]["running"] = transport.endpoint_alive(VMCI_DS_HANDLE)
    try:
        with open(os.path.join(settings.rundir, "ds.pid")) as f:
            data["discovery"]["pid"] = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    if data["discovery"]["running"]:
        try:
            with open(os.path.join(settings.rundir, "ds.registry.json")) as f:
                data["discovery"]["entries"] = json.load(f)
        except (OSError, ValueError):
            pass
    for cid in transport.contexts():
        data["contexts"][str(cid)] = [h.resource for h in transport.endpoints(cid)]
    data["access"] = runtime.access.describe()
    return data


def info(argv):
    """Show the backend, the transport, this context and the discovery registry."""
    parser = argparse.ArgumentParser(prog="vsockcompat info", description=info.__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    data = _info_data()
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    ds = data["discovery"]
    print("vsockcompat %s" % data["version"])
    print("backend:           %s" % data["backend"])
    print("transport:         %s (runtime dir %s)" % (data["transport"], data["rundir"]))
    print("context id:        %d" % data["context_id"])
    print("discovery service: %s %s" % (tuple(ds["address"]),
                                        "running (pid %s)" % ds["pid"] if ds["running"] else "not running"))
    for entry in ds["entries"]:
        print("  %-30s -> %s" % (json.dumps(entry.get("name")), entry.get("handle")))
    for cid, rids in sorted(data["contexts"].items(), key=lambda kv: int(kv[0])):
        print("context %s: %s" % (cid, ", ".join(str(r) for r in rids) or "no endpoints"))
    _print_access(data["access"])
    return 0


def _print_access(access) -> None:
    policy = access["policy"]
    print("access policy:     %s (discovery register rule: %s)"
          % (policy["path"] or "built-in", policy["discovery"]["register"]))
    for cid, ctx in sorted(access["contexts"].items(), key=lambda kv: int(kv[0])):
        print("context %s flags: %s%s" % (cid, "|".join(ctx["flags"]) or "none",
                                          "" if ctx["uid"] is None else " (uid %d)" % ctx["uid"]))
        for res in ctx["resources"]:
            print("  %s %-9s %s" % (tuple(res["handle"]), res["kind"], "; ".join(
                "%s: %s" % (tuple(c["client"]), ", ".join("%s=%s" % kv for kv in sorted(c["privileges"].items())))
                for c in res["privileges"]) or "no client privileges"))
    for group in access["groups"]:
        print("group %s of context %d: %s" % (tuple(group["handle"]), group["owner"], ", ".join(
            "%s%s" % (tuple(m), " (can assign)" if can else "") for m, can in group["members"]) or "no members"))


# name -> (module, function, help); modules are imported only when their command runs.
COMMANDS = {
    "demo": (__name__, "demo", "run the datagramApp sample: server and clients over the local transport"),
    "info": (__name__, "info", "show backend, transport, context and the discovery registry (--json)"),
    "ds": ("vsockcompat.ds_server", "main", "run the discovery-service daemon"),
    "datagram-app": ("vsockcompat.apps.datagram_app", "main",
                     "the SDK's datagramApp sample: -s (server) or -c (client) [-d DEV]"),
    "sharedmem-app": ("vsockcompat.apps.sharedmem_app", "main",
                      "the SDK's sharedMemApp sample: -s (server) or -c (client) [-d DEV]"),
    "run": ("vsockcompat.run", "main", "run a legacy SDK binary on our libvmci.so.0 (--check: its SDK symbols)"),
    "include-dir": ("vsockcompat.run", "include_dir_main", "print the directory holding vmcilib.h"),
    "gc": ("vsockcompat.sharedmem", "main", "reclaim shared memory regions whose users all died"),
    "bench": ("vsockcompat.bench", "main", "measure datagram round trips and rates against raw sockets"),
    "bench-qp": ("vsockcompat.bench_qp", "main", "measure queue-pair throughput against sockets, shm and memcpy"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: vsockcompat COMMAND [ARGS]  |  vsockcompat --version")
        for name, (_, _, text) in COMMANDS.items():
            print("  %-14s%s" % (name, text))
        return 0 if argv else 2
    if argv[0] == "--version":
        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print("vsockcompat: unknown command %r (choose from %s)" % (command, ", ".join(COMMANDS)), file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[command]
    return getattr(importlib.import_module(module), function)(rest)
