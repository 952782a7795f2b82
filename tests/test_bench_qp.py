"""``python -m vsockcompat.bench_qp``: a very small run completes, every checksum matches, nothing is
left in /dev/shm. No timing is asserted."""
import json
import os

import pytest

from conftest import CYTHON_AVAILABLE
from vsockcompat import bench_qp

RUN_KEYS = {"unit", "median", "min", "max", "samples", "messages", "msg_s", "cpu_us", "checked", "bad",
            "checksums_ok", "batch", "size"}


@pytest.mark.slow
@pytest.mark.timeout(45)
def test_a_quick_run_reports_every_measurement_and_cleans_up(capsys):
    before = set(os.listdir("/dev/shm"))
    rc = bench_qp.main(["--quick", "--iterations", "100", "--repeat", "1", "--timeout", "20",
                        "--ring-mib", "1", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    report = json.loads(out)

    assert set(report) >= {"benchmark", "machine", "settings", "results", "comparisons", "ratios",
                           "zero_copy", "checksums_ok", "checked", "bad", "shm_leftovers", "rundir_removed"}
    assert report["settings"]["ring_bytes"] == 1 << 20 and report["settings"]["repeat"] == 1
    assert list(report["results"]) == list(bench_qp.IMPLEMENTATIONS) + ["memcpy"]
    measured = [impl for impl, r in report["results"].items() if r["available"]]
    expected = list(bench_qp.IMPLEMENTATIONS) + ["memcpy"]
    if not CYTHON_AVAILABLE:
        expected.remove("qp-cython")
        assert "not built" in report["results"]["qp-cython"]["note"]
    assert measured == expected

    for key, impl, size, batch in bench_qp._streams():
        if impl not in measured:
            continue
        r = report["results"][impl][key]
        assert set(r) >= RUN_KEYS, (impl, key)
        assert r["size"] == size and r["batch"] == batch and r["messages"] == 100
        assert r["min"] <= r["median"] <= r["max"] and r["median"] > 0
        # The consumer got every byte and every sampled message (plus the last) byte for byte.
        assert r["checksums_ok"] is True and r["bad"] == 0 and r["checked"] > 0, (impl, key)
        if size == 65536:  # every 64 KiB message is compared: each consumer reads every byte
            assert r["checked"] == 100, (impl, key)
    for size in bench_qp.SIZES:
        for key in ("memcpy_%d" % size, "memcpy_span_%d" % size):
            assert report["results"]["memcpy"][key]["median"] > 0
        # The span copy runs through buffers as large as the ring (whole messages).
        assert report["results"]["memcpy"]["memcpy_span_%d" % size]["span"] == (1 << 20) // size * size
    assert report["checksums_ok"] is True and report["bad"] == 0

    zc = report["zero_copy"]
    if zc["available"]:
        assert zc["checksums_ok"] is True and zc["bytes_written"] == zc["bytes_seen"] > 0
        assert zc["zero_copy"] is True
        assert zc["kernel_bytes_copied"] == zc["reader_read_syscalls"] == zc["reader_write_syscalls"] == 0

    rows = {(c["metric"], c["baseline"]): c for c in report["comparisons"]}
    assert set(rows) == {(k[0], k[2]) for k in bench_qp.TARGETS}
    for row in rows.values():
        assert row["verdict"] in (("PASS", "MISS") if CYTHON_AVAILABLE else ("skipped",))

    # The benchmark checks its own runtime directory's objects (other sessions may run now).
    assert report["shm_leftovers"] == [] and report["rundir_removed"] is True
    left = [n for n in set(os.listdir("/dev/shm")) - before if n.startswith(bench_qp._SHM_PREFIX)]
    assert not left, "left in /dev/shm: %s" % left


def test_the_table_names_every_measurement():
    results = {}
    for key, impl, size, batch in bench_qp._streams():
        results.setdefault(impl, {"available": True, "note": None})[key] = {
            "median": 100.0, "min": 90.0, "max": 110.0, "msg_s": 1e6, "cpu_us": 1.0, "size": size,
            "batch": batch, "checked": 1, "bad": 0, "checksums_ok": True}
    results["qp-pure"] = {"available": False, "note": "testing"}
    results["mpqueue"]["mpqueue_64"]["median"] = 10.0
    results["memcpy"] = {"available": True, "note": None}
    for size in bench_qp.SIZES:
        for key in ("memcpy_%d" % size, "memcpy_span_%d" % size):
            results["memcpy"][key] = {"median": 1000.0, "min": 1000.0, "max": 1000.0, "msg_s": 1.0, "size": size}
    report = {
        "machine": {"cpu_count": 2, "implementation": "CPython", "python": "3", "platform": "x",
                    "cython_core_available": True},
        "settings": {"repeat": 1, "iterations": 10, "target_seconds": 0.2, "ring_bytes": 1 << 24,
                     "unix_buffer": 212992},
        "results": results, "zero_copy": {"available": False, "note": "no /proc"},
        "checked": 3, "bad": 0, "checksums_ok": True,
    }
    report["comparisons"] = bench_qp._compare(results)
    table = bench_qp.render_table(report)
    for label in ("64 B", "4 KiB", "64 KiB", "qp cython batch 256", "qp cython in place", "unix stream",
                  "shm ring", "mp.Queue", "qp 64 KiB in place vs AF_UNIX stream",
                  "memcpy (cached)", "memcpy (16 MiB span)", "rings of 16 MiB;", "AF_UNIX socket buffers: 208 KiB",
                  "qp-pure: skipped (testing)", "zero copy: skipped (no /proc)"):
        assert label in table, label
    assert "MISS" in table and "10.00x" in table and "PASS" in table  # 1e6 msg/s < 2e6; 10x the Queue
    report["settings"]["ring_bytes"] = bench_qp.RING
    table = bench_qp.render_table(report)
    assert "rings of 256 KiB (the default: VMCI vSockets' queue size)" in table
    assert "memcpy (256 KiB span)" in table


def test_bad_arguments_are_refused():
    assert bench_qp.main(["--iterations", "0"]) == 2
    assert bench_qp.main(["--ring-mib", "65"]) == 2
    assert bench_qp.main(["--ring-kib", "4"]) == 2  # below 8 KiB
    assert bench_qp.main(["--ring-kib", "256", "--ring-mib", "1"]) == 2  # one or the other
