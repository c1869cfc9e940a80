"""The benchmark must keep running: `python -m bench.run --quick` on a tiny shape with the
reference provider only, in its own process (a few seconds), and the CSV upsert by key."""

import csv
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_run_quick_reference(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "bench.run",
        "--device",
        "cpu",
        "--quick",
        "--shapes",
        "tiny",
        "--providers",
        "reference",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "median ms" in proc.stdout and "x dsntnn" in proc.stdout, proc.stdout
    assert "reference" in proc.stdout

    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["shape"], r["mode"], r["provider"]) for r in rows} == {
        ("tiny", "inference", "reference"),
        ("tiny", "training", "reference"),
    }
    for r in rows:
        assert float(r["median_ms"]) > 0
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert r["threads"] == "1" and r["dtype"] == "float32"
    training = next(r for r in rows if r["mode"] == "training")
    assert float(training["saved_ratio"]) > 0  # the reference saves heatmap-sized tensors

    markdown = (tmp_path / "latest_cpu.md").read_text()
    assert "| reference |" in markdown and "python -m bench.run" in markdown


def test_upsert_replaces_by_key(tmp_path):
    sys.path.insert(0, REPO_ROOT)
    from bench import report

    path = str(tmp_path / "results.csv")
    base = {k: "x" for k in report.KEY}
    report.upsert_csv(
        path, [{**base, "provider": "a", "median_ms": 1.0}, {**base, "provider": "b", "median_ms": 2.0}]
    )
    assert report.upsert_csv(path, [{**base, "provider": "a", "median_ms": 3.0}]) == 2
    with open(path, newline="") as f:
        rows = {r["provider"]: r for r in csv.DictReader(f)}
    assert rows["a"]["median_ms"] == "3" and rows["b"]["median_ms"] == "2"
