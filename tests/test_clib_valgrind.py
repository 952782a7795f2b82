"""libvmci.so.0 under valgrind's memcheck: sdk_errors and a datagramApp server with its
clients, built -O0 -g and run under ``vsockcompat run -- valgrind ... PROGRAM``, must
report no memory errors and leak nothing definitely (every process valgrind follows,
forked children included)."""
import re
import shutil
import subprocess

import pytest

from test_clib import CC, CLIENT_OUT, RUN, SERVER_OUT, build, differences, env_for, wait_registered
from vsockcompat._backend import load_core

VALGRIND = shutil.which("valgrind")
MEMCHECK = ["--tool=memcheck", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite"]
DEBUG = ["-O0", "-g"]
ERROR_SUMMARY = re.compile(r"^==(\d+)== ERROR SUMMARY: (\d+) errors", re.M)
DEFINITELY_LOST = re.compile(r"^==(\d+)==\s+definitely lost: ([\d,]+) bytes", re.M)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH, and CC unset"),
    pytest.mark.skipif(VALGRIND is None, reason="valgrind is not installed (apt-get install valgrind)"),
]


def _valgrind_works():
    try:
        probe = subprocess.run([VALGRIND] + MEMCHECK + ["--", "true"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "valgrind cannot run here: %s" % exc
    if probe.returncode != 0:
        return "valgrind cannot run here: %s" % probe.stderr.strip()[-300:]
    return None


def under_valgrind(program, args=()):
    """``vsockcompat run -- valgrind ... PROGRAM ARGS``: valgrind inherits LD_LIBRARY_PATH and
    LD_PRELOAD from ``vsockcompat run`` and hands them to PROGRAM with its own preloads first."""
    return RUN + ["--", VALGRIND] + MEMCHECK + ["--", program] + list(args)


def assert_clean(stderr):
    """Every process valgrind reported on: zero errors, nothing definitely lost."""
    summaries = ERROR_SUMMARY.findall(stderr)
    assert summaries, "no valgrind summary in:\n" + stderr
    assert all(count == "0" for _, count in summaries), stderr
    assert all(lost == "0" for _, lost in DEFINITELY_LOST.findall(stderr)), stderr


@pytest.fixture(scope="module")
def debug_build(tmp_path_factory):
    reason = _valgrind_works()
    if reason:
        pytest.skip(reason)
    return build(str(tmp_path_factory.mktemp("clib_valgrind")), DEBUG)


@pytest.mark.timeout(150)
def test_sdk_errors_under_memcheck(debug_build, rundir):
    # sdk_errors forks (its fork() checks, and the discovery daemon's start): each forked
    # process gets a summary of its own, and a child's status 99 shows in fork_child_status.
    result = subprocess.run(under_valgrind(debug_build.sdk_errors), env=env_for(rundir, "pure", debug_build.library),
                            capture_output=True, text=True, timeout=120)
    got = {k: int(v) for k, v in (line.split("=", 1) for line in result.stdout.splitlines())}
    assert result.returncode == 0, result.stderr
    assert differences(got) == {}, result.stderr
    assert_clean(result.stderr)


@pytest.mark.timeout(150)
def test_datagram_app_pair_under_memcheck(debug_build, rundir):
    # test_clib.ping_pong, with every process's valgrind report read.
    server = subprocess.Popen(under_valgrind(debug_build.datagramApp, ["-s"]),
                              env=env_for(rundir, "pure", debug_build.library, cid=2),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_registered(rundir, load_core("pure"))
        for _ in range(3):
            client = subprocess.run(under_valgrind(debug_build.datagramApp, ["-c"]),
                                    env=env_for(rundir, "pure", debug_build.library, cid=3),
                                    capture_output=True, text=True, timeout=60)
            assert (client.returncode, client.stdout) == (0, CLIENT_OUT), client.stderr
            assert_clean(client.stderr)
        out, err = server.communicate(timeout=60)
        assert (server.returncode, out) == (0, SERVER_OUT), err
        assert_clean(err)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()


def test_assert_clean_reads_valgrind_summaries():
    """assert_clean's patterns match valgrind's own summary lines (3.x format)."""
    clean = ("==7== ERROR SUMMARY: 0 errors from 0 contexts (suppressed: 0 from 0)\n"
             "==7==    definitely lost: 0 bytes in 0 blocks\n")
    assert_clean(clean)
    with pytest.raises(AssertionError):
        assert_clean(clean.replace("0 errors", "2 errors"))
    with pytest.raises(AssertionError):
        assert_clean(clean.replace("lost: 0 bytes", "lost: 1,024 bytes"))
    with pytest.raises(AssertionError):
        assert_clean("")
