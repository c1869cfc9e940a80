"""The GPU machine's scripts, run here on CPU tensors so that their own code is exercised before a
GPU ever runs it (the GPU test files get the same treatment in make test: DSNT_GPU_TESTS_ON=cpu).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsnt_cuda import _extension

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not _extension.has_kernel("dsnt_fwd", "CPU"), reason="the CPU kernels are not built")
def test_sanitizer_driver_runs_on_cpu():
    env = dict(os.environ, DSNT_GPU_TESTS_ON="cpu", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "sanitizer_driver.py")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert " 0 failed" in done.stdout, done.stdout[-2000:]
