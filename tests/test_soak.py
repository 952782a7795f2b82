"""``vsockcompat soak`` with small counts on both cores: behaviour only, no timing assertions."""
import json
import os

import pytest

from vsockcompat import soak

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _run(capsys, *argv):
    rc = soak.main(list(argv) + ["--json"])
    report = json.loads(capsys.readouterr().out)
    assert not os.path.exists(report["rundir"]), "the private runtime directory was left behind"
    return rc, report


def test_soak_small(core, capsys, fd_guard):
    rc, report = _run(capsys, "--core", core.NAME, "--datagrams", "20000", "--senders", "4",
                      "--qp-bytes", str(8 << 20), "--qp-size", str(256 << 10),
                      "--latency-samples", "500", "--time-limit", "150")
    assert (rc, report["violations"]) == (0, [])
    d = report["datagrams"]
    assert d["sent"] == d["accepted"] == d["received"] == 20000
    assert report["queue_pair"]["bytes"] == 8 << 20
    lat = report["latency_us"]
    assert lat["samples"] == 500 and 0 < lat["p50"] <= lat["p99"] <= lat["p99.9"]


def test_soak_time_limit_fails_and_cleans_up(core, capsys):
    rc, report = _run(capsys, "--core", core.NAME, "--datagrams", "5000000", "--senders", "2",
                      "--qp-bytes", "0", "--latency-samples", "0", "--time-limit", "1")
    assert rc == 1
    assert any("time limit" in v for v in report["violations"]), report["violations"]


@pytest.mark.parametrize("argv", [["--senders", "0"], ["--senders", "100000"], ["--payload-size", "3"],
                                  ["--time-limit", "0"], ["--datagrams", "-1"]])
def test_soak_bad_arguments(argv):
    with pytest.raises(SystemExit) as info:
        soak.main(argv)
    assert info.value.code == 2
