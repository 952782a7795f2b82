"""``vsockcompat bench``: a very small run completes and reports every figure. No timing is asserted."""
import json
import os

import pytest

from conftest import CYTHON_AVAILABLE
from vsockcompat import bench

METRIC_KEYS = {"unit", "median", "min", "max", "samples", "cpu_us"}


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_quick_run_reports_every_measurement(capsys):
    rc = bench.main(["--quick", "--iterations", "200", "--repeat", "3", "--timeout", "20", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    report = json.loads(out)

    assert set(report) >= {"benchmark", "machine", "settings", "results", "comparisons",
                           "oneway_totals_agree"}
    assert set(report["machine"]) >= {"cpu_count", "python", "implementation", "platform",
                                      "cython_core_available", "default_backend"}
    assert report["machine"]["cython_core_available"] is CYTHON_AVAILABLE
    assert report["settings"]["iterations"] == 200 and report["settings"]["repeat"] == 3
    assert list(report["results"]) == ["raw", "cython", "pure"]

    measured = [impl for impl, r in report["results"].items() if r["available"]]
    assert measured == (["raw", "cython", "pure"] if CYTHON_AVAILABLE else ["raw", "pure"])
    if not CYTHON_AVAILABLE:
        assert "not built" in report["results"]["cython"]["note"]
    for impl in measured:
        r = report["results"][impl]
        for metric in bench.METRICS:
            assert set(r[metric]) >= METRIC_KEYS, (impl, metric)
            assert len(r[metric]["samples"]) == 3
            assert r[metric]["min"] <= r[metric]["median"] <= r[metric]["max"]
            assert r[metric]["median"] > 0
        assert r["rtt_64"]["iterations"] == r["rtt_4096"]["iterations"] == 200
        oneway = r["oneway_64"]
        assert oneway["datagrams"] == 200
        # Every datagram a sender had accepted reached its receiver, no more, no less.
        assert oneway["sent"] == oneway["received"] == [200] * 3
        assert oneway["totals_agree"] is True
        if impl == "raw":
            assert oneway["retries"] == [0, 0, 0]
    assert report["oneway_totals_agree"] is True

    rows = {(c["metric"], c["core"]): c for c in report["comparisons"]}
    assert set(rows) == {(m, c) for m in bench.METRICS for c in ("cython", "pure")}
    for (metric, core), row in rows.items():
        assert set(row) >= {"value", "raw", "ratio", "relation", "target", "verdict"}
        if core in measured:
            expected = "n/a" if (metric, core) not in bench.TARGETS else ("PASS", "MISS")
            assert row["verdict"] in expected
        else:
            assert row["verdict"] == "skipped"


def test_the_table_names_every_measurement(capsys):
    report = {
        "machine": {"cpu_count": 2, "implementation": "CPython", "python": "3", "platform": "x",
                    "cython_core_available": False, "default_backend": "pure"},
        "settings": {"repeat": 3, "iterations": 10, "target_seconds": 0.2},
        "results": {"raw": {"available": True}, "cython": {"available": False, "note": "not built"},
                    "pure": {"available": True}},
    }
    for impl, scale in (("raw", 1.0), ("pure", 2.0)):
        for metric in bench.METRICS:
            report["results"][impl][metric] = {
                "median": 10.0 * scale, "min": 9.0, "max": 11.0, "cpu_us": 1.0, "samples": [10.0]}
        report["results"][impl]["oneway_64"].update(sent=[10], received=[10], retries=[0], totals_agree=True)
    report["comparisons"] = bench._compare(report["results"])
    table = bench.render_table(report)
    assert "RTT 64 B" in table and "RTT 4 KiB" in table and "one-way 64 B" in table
    assert "cython: skipped (not built)" in table
    assert "2.00x" in table and "PASS" in table  # pure at exactly twice raw meets "<= 2.00x"


def test_bad_arguments_are_refused():
    assert bench.main(["--iterations", "0"]) == 2


def test_placements_name_the_cpus_to_pin():
    usable = sorted(os.sched_getaffinity(0))
    assert bench.placement_cpus(None) == (None, None)
    assert bench.placement_cpus("same") == (usable[0], usable[0])
    if len(usable) > 1:
        assert bench.placement_cpus("split") == (usable[0], usable[1])
    with pytest.raises(ValueError):
        bench.placement_cpus("diagonal")


def test_an_unknown_placement_is_refused():
    assert bench.main(["--placement", "diagonal"]) == 2
