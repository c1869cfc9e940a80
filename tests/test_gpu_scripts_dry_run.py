"""The GPU machine's scripts, run here without a GPU so that their own code is exercised before a
GPU ever runs it (the GPU test files get the same treatment in make test: DSNT_GPU_TESTS_ON=cpu).

scripts/gpu_check.sh runs with its steps faked (GPU_CHECK_CMD_<step>) but its watchdog, its
bookkeeping and its info step real: about 15 s. The sanitizer driver runs on the CPU kernels.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsnt_cuda import _extension

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("info", "build", "test-cuda", "test-triton", "sanitizer-memcheck", "sanitizer-racecheck",
         "sanitizer-synccheck", "sanitizer-initcheck", "bench", "test-rest")
FAKE_TESTS = """
import pytest
def test_a(): pass
def test_b(): pass
def test_c(): pytest.skip("fake")
"""


@pytest.mark.skipif(not _extension.has_kernel("dsnt_fwd", "CPU"), reason="the CPU kernels are not built")
@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_sanitizer_driver_runs_on_cpu(quick):
    env = dict(os.environ, DSNT_GPU_TESTS_ON="cpu", PYTHONPATH=str(ROOT))
    args = [sys.executable, str(ROOT / "scripts" / "sanitizer_driver.py")] + ["--quick"] * quick
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert " 0 failed" in done.stdout, done.stdout[-2000:]


def gpu_check(tmp_path, **knobs):
    """Run gpu_check.sh with these environment knobs; (exit status, summary table rows by step,
    OUT, seconds)."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp_path), **knobs)
    start = time.monotonic()
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    summary = (out / "summary.md").read_text()
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in STEPS:
            rows[cells[0]] = cells
    assert list(rows) == list(STEPS), summary  # every step, in order
    return done.returncode, rows, out, seconds


def fake_pytest(tmp_path, select=""):
    """A step command: pytest on a tiny file of two passes and a skip, its XML where the step
    collects them."""
    path = tmp_path / "test_fake.py"
    path.write_text(FAKE_TESTS)
    return f'"$PYTHON" -m pytest -q -p no:cacheprovider {path} {select} --junitxml="$JUNIT_DIR/fake.xml"'


def test_gpu_check_all_steps_pass(tmp_path):
    status, rows, out, _ = gpu_check(
        tmp_path,
        GPU_CHECK_CMD_build="echo built",
        GPU_CHECK_CMD_test_cuda=fake_pytest(tmp_path),
        GPU_CHECK_CMD_test_triton=fake_pytest(tmp_path),
        GPU_CHECK_CMD_sanitizer_memcheck="echo '========= ERROR SUMMARY: 0 errors'",
        GPU_CHECK_CMD_sanitizer_racecheck="true",
        GPU_CHECK_CMD_sanitizer_synccheck="true",
        GPU_CHECK_CMD_sanitizer_initcheck="true",
        GPU_CHECK_CMD_bench='printf "shape,provider\\npose2d,cuda\\n" >"$BENCH_DIR/results.csv"',
        GPU_CHECK_CMD_test_rest="true",
    )
    assert status == 0, rows
    assert all(row[1] == "ok" for row in rows.values()), rows
    assert rows["test-cuda"][4:8] == ["2", "0", "0", "1"]  # passed failed errors skipped, from junit
    assert "ERROR SUMMARY: 0 errors" in rows["sanitizer-memcheck"][8]
    assert "1 rows in bench.csv" in rows["bench"][8]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench.csv", "device.txt", "gpu_check.log", "junit.xml", "summary.md"]
    assert "torch: " in (out / "device.txt").read_text()  # the real info step ran
    assert (out / "junit.xml").read_text().count("<testsuite ") == 2  # merged
    log = (out / "gpu_check.log").read_text()
    assert all(f"===== [{step}] ok" in log for step in STEPS)


def test_gpu_check_watchdog_and_failures(tmp_path):
    budget = 10
    status, rows, out, seconds = gpu_check(
        tmp_path,
        GPU_CHECK_BUDGET=str(budget),
        GPU_CHECK_LIMITS="test-cuda=2",
        GPU_CHECK_STEPS="info,test-cuda,test-triton,sanitizer,bench,test-rest",
        GPU_CHECK_CMD_info="true",
        GPU_CHECK_CMD_test_cuda="sleep 60",  # killed at its own limit
        GPU_CHECK_CMD_test_triton="sleep 60",  # killed when the budget is spent
    )
    assert status == 1
    assert rows["build"][1] == "skipped (not selected)"
    assert rows["test-cuda"][1] == "TIMEOUT (killed at 2s)"
    assert rows["test-triton"][1].startswith("TIMEOUT") and int(rows["test-triton"][3]) <= budget - 2
    for step in STEPS[4:]:
        assert rows[step][1] == "not run (time budget)", rows[step]
    assert seconds < budget + 10
    assert len(list(out.iterdir())) <= 8


def test_gpu_check_all_skipped_gpu_tests_fail(tmp_path):
    """Without a GPU the GPU tests skip themselves: on the GPU machine that is a failure."""
    status, rows, _, _ = gpu_check(
        tmp_path,
        GPU_CHECK_STEPS="test-triton",
        GPU_CHECK_CMD_test_triton=fake_pytest(tmp_path, "-k test_c"),
    )
    assert status == 1
    assert rows["test-triton"][1] == "ALL SKIPPED" and rows["test-triton"][7] == "1"
    assert rows["info"][1] == "skipped (not selected)"
