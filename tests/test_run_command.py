"""``vsockcompat.run.command``: the argv and environment ``vsockcompat run`` executes, computed in
process (what the guest bed's C tests use instead of a Python start per program), and ``main``
executing exactly that. No C compiler needed: the library and preload are placeholder files
(``command`` checks they exist; it loads neither)."""
import os

import pytest

from vsockcompat import clib
from vsockcompat import run as vrun


@pytest.fixture
def libs(tmp_path):
    """A placeholder libvmci.so.0 and preload, and an environment naming them."""
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    library, preload = lib_dir / clib.SONAME, lib_dir / clib.PRELOAD_NAME
    library.write_bytes(b"not loaded")
    preload.write_bytes(b"not loaded")
    environ = {clib.LIBRARY_ENV: str(library), clib.PRELOAD_ENV: str(preload), "PATH": os.defpath,
               "LD_PRELOAD": "libasan.so.8", "VSOCKCOMPAT_TRANSPORT": "vsock"}
    return str(library), str(preload), environ


def test_command_is_computed_from_the_environment_given(libs, monkeypatch, tmp_path):
    library, preload, environ = libs
    monkeypatch.setenv(clib.LIBRARY_ENV, str(tmp_path / "elsewhere.so"))   # not consulted
    monkeypatch.setenv(clib.PRELOAD_ENV, str(tmp_path / "elsewhere-p.so"))
    argv, env = vrun.command(["/bin/true", "-c", "x"], environ)
    assert argv == ["/bin/true", "-c", "x"]
    assert env["LD_LIBRARY_PATH"] == os.path.dirname(library)
    assert env["LD_PRELOAD"] == "libasan.so.8:%s:%s" % (library, preload)
    assert env["VSOCKCOMPAT_TRANSPORT"] == "vsock"              # the settings pass through
    assert env == vrun.run_env(library, environ, preload=preload)
    assert vrun.command(["true"], dict(environ, VSOCKCOMPAT_PRELOAD="0"))[1]["LD_PRELOAD"] == (
        "libasan.so.8:" + library)
    assert environ["LD_PRELOAD"] == "libasan.so.8"              # the caller's mapping is left alone


@pytest.mark.parametrize("change, status, message", [
    ({clib.LIBRARY_ENV: "/no/such/libvmci.so.0"}, 2, "libvmci.so.0 not found at /no/such/libvmci.so.0"),
    ({clib.PRELOAD_ENV: "/no/such/p.so", "VSOCKCOMPAT_PRELOAD": "1"}, 2, "VSOCKCOMPAT_PRELOAD=1 but"),
    ({"VSOCKCOMPAT_PRELOAD": "maybe"}, 2, "VSOCKCOMPAT_PRELOAD must be 0 or 1"),
])
def test_command_refuses_with_the_status_run_returns(libs, change, status, message):
    environ = dict(libs[2], **change)
    with pytest.raises(vrun.RunRefused) as info:
        vrun.command(["/bin/true"], environ)
    assert (info.value.status, str(info.value).startswith(message)) == (status, True), str(info.value)


def test_command_without_a_program(libs):
    with pytest.raises(vrun.RunRefused, match="usage: vsockcompat run"):
        vrun.command([], libs[2])


def test_main_executes_what_command_returns(libs, monkeypatch):
    _, _, environ = libs
    monkeypatch.setattr(os, "environ", dict(environ))
    calls = []

    def fake_exec(path, args, env):
        calls.append((path, args, env))
        raise FileNotFoundError(2, "No such file or directory")   # as a missing program would

    monkeypatch.setattr(os, "execvpe", fake_exec)
    assert vrun.main(["--", "/bin/true", "-s"]) == 127
    argv, env = vrun.command(["/bin/true", "-s"], environ)
    assert calls == [("/bin/true", argv, env)]


def test_main_reports_a_refusal(libs, monkeypatch, capsys):
    monkeypatch.setattr(os, "environ", dict(libs[2], **{clib.LIBRARY_ENV: "/no/such/libvmci.so.0"}))
    monkeypatch.setattr(os, "execvpe", lambda *a: pytest.fail("executed despite the refusal"))
    assert vrun.main(["--", "/bin/true"]) == 2
    assert capsys.readouterr().err.startswith("vsockcompat run: libvmci.so.0 not found at /no/such/")
