"""The CUDA emulator itself (tests/cuda_emulation/shim.h), through the kernels of selftest.cu.

Each kind of check the emulator promises is shown here on a small kernel: the intrinsics give
the hardware's results; a kernel breaking a rule fails its launch with a message, never hangs;
TSan reports a shuffle used to order memory, blocks racing on global memory, a cluster reading
or leaving without cluster_sync; ASan reports a shared-memory overrun; static __shared__ does not
compile. The selftest program runs one case per process: plain, under TSan or under ASan + UBSan.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "cuda_emulation"))
import emulate  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which(emulate.CXX) is None, reason="needs a C++ compiler")

CORRECT = ["shuffles", "syncwarp_orders_memory", "smem_poisoned_per_block", "atomic_add_across_blocks",
           "cluster_ring"]
BROKEN = {  # case: what the failed launch must say
    "lane_returns_before_shuffle": "lane 5 of mask 0xffffffff returned from the kernel before reaching it",
    "lane_outside_mask": "lane 3 calls it with mask 0x00000001, which leaves it out",
    "masks_disagree": "of mask 0xffffffff returned from the kernel before reaching it",
    "collectives_disagree": "lanes disagree on collective #0 of mask 0xffffffff",
    "barrier_after_return": "thread(s) returned from the kernel and can never arrive",
    "deadlock": "still waiting after",
    "cluster_too_large": "at most 8 are portable",
}
RACY = ["shuffle_orders_nothing", "blocks_race_on_global", "cluster_read_without_sync",
        "cluster_return_without_sync"]


@pytest.fixture(scope="module")
def programs():
    """selftest per sanitizer, built in one ninja call (so both cores compile)."""
    return dict(zip(emulate.SANITIZE, emulate.build(*emulate.SELFTEST_TARGETS)))


def run_case(programs, case, sanitizer="plain", **env):
    return subprocess.run([str(programs[sanitizer]), case], env=dict(emulate.sanitizer_env(sanitizer), **env),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("sanitizer", emulate.SANITIZE)
@pytest.mark.parametrize("case", CORRECT)
def test_correct_kernels_give_the_hardware_results_and_sanitizers_stay_quiet(programs, case, sanitizer):
    done = run_case(programs, case, sanitizer)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize("case", BROKEN)
def test_broken_kernels_fail_their_launch_with_a_message(programs, case):
    done = run_case(programs, case, DSNT_EMU_TIMEOUT="2")
    assert done.returncode == 2, done.stderr[-4000:]
    assert BROKEN[case] in done.stderr


@pytest.mark.parametrize("case", RACY)
def test_tsan_reports_the_races(programs, case):
    assert run_case(programs, case).returncode == 0  # the plain run shows nothing: only TSan can
    done = run_case(programs, case, "tsan")
    assert done.returncode != 0 and "WARNING: ThreadSanitizer: data race" in done.stderr, done.stderr[-4000:]


def test_blocks_race_only_when_they_run_at_once(programs):
    assert run_case(programs, "blocks_race_on_global", "tsan", DSNT_EMU_BLOCKS="1").returncode == 0


def test_asan_reports_a_shared_memory_overrun(programs):
    done = run_case(programs, "smem_overrun", "asan")
    assert done.returncode != 0 and "heap-buffer-overflow" in done.stderr, done.stderr[-4000:]


def test_static_shared_memory_does_not_compile(tmp_path):
    source = tmp_path / "static_shared.cu"
    source.write_text('#include "cuda/launch.cuh"\n'
                      "__global__ void k(float* out) { __shared__ float s[32]; out[0] = s[0]; }\n")
    done = subprocess.run([emulate.CXX, "-std=c++20", "-fsyntax-only", "-x", "c++", "-DDSNT_CUDA_EMULATION",
                           f"-I{emulate.ROOT / 'csrc'}", f"-I{emulate.HERE}", str(source)],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "static __shared__ memory is not emulated" in done.stderr
