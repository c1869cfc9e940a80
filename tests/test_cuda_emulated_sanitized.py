"""The emulated CUDA kernels under ThreadSanitizer and AddressSanitizer + UBSan.

Each run is SUBSET of tests/test_cuda_emulated.py, in a pytest process of its own: a Python process
gets the sanitizer runtime only by preloading it (emulate.sanitizer_env). TSan sees races within a
block and between the blocks that run at once, ASan out-of-bounds accesses to tensors and to each
block's shared memory, UBSan undefined behaviour; any report fails the run.

And the proof that the TSan run is an instrument: a case of the subset, which passes there, fails
with a data race once the kernels are built without the __syncthreads that keeps the block
reduction's scratch from being read before every warp has written its part
(DSNT_EMU_DROP_BARRIER=reduction).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "cuda_emulation"))
import emulate  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which(emulate.CXX) is None or shutil.which(emulate.ninja()) is None,
                                reason="needs a C++ compiler and ninja")

# Every size class (the cluster class's CTAs reading each other's shared memory, the split
# backward), each direction (a case runs forward and backward), the standard-loss kernels
# (softmax + JS) and the general ones, each vector width (16-byte loads of 2-, 4- and 8-byte
# logits) and the scalar loads, channels-last logits, both grids, per-map beta with its gradient,
# the loss epilogue (last-CTA reduction), the backward without upstream gradients, the uniform
# fallback, a NaN map.
SUBSET = [
    "test_size_classes[warp-softmax-js]",
    "test_size_classes[block-relu-kl]",
    "test_size_classes[cluster-softmax-js]",
    "test_size_classes[streamed-sigmoid-var]",
    "test_dtypes[block-torch.bfloat16]",
    "test_dtypes[cluster-torch.float64]",
    "test_misaligned_base_takes_the_scalar_path",
    "test_strided_logits_without_a_copy[warp]",
    "test_pixel_grid[streamed]",
    "test_per_map_beta_and_sigma[cluster-map]",
    "test_loss_epilogue[True-euclidean]",
    "test_none_upstream_gradients[block-only-reg]",
    "test_uniform_fallback_of_zero_sum_maps[relu-warp]",
    "test_non_finite_maps[cluster-nan]",
]
# A float32 block-class case of SUBSET: the float-only build of the proof runs float32 only.
PROOF_CASE = "test_size_classes[block-relu-kl]"


@pytest.fixture(scope="module")
def libraries():
    targets = ["ops-tsan", "ops-asan", "ops-tsan-drop-reduction"]
    return dict(zip(targets, emulate.build(*targets)))  # one ninja call, so both cores compile


def run_sanitized(library, sanitizer, cases):
    env = dict(emulate.sanitizer_env(sanitizer), DSNT_EMU_LIBRARY=str(library))
    # --capture=sys: a report written to fd 2 as the runtime stops the process must not be lost.
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys",
           *[f"{HERE / 'test_cuda_emulated.py'}::{case}" for case in cases]]
    return subprocess.run(cmd, cwd=emulate.ROOT, env=env, capture_output=True, text=True, timeout=1200)


def output(done):
    return f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[:12000]}"


def test_asan_subset_is_clean(libraries):
    done = run_sanitized(libraries["ops-asan"], "asan", SUBSET)
    assert done.returncode == 0 and f"{len(SUBSET)} passed" in done.stdout, output(done)


def test_tsan_subset_is_clean_and_sees_a_dropped_reduction_barrier(libraries):
    assert PROOF_CASE in SUBSET  # so this run is the proof's half with the barrier
    done = run_sanitized(libraries["ops-tsan"], "tsan", SUBSET)
    assert done.returncode == 0 and f"{len(SUBSET)} passed" in done.stdout, output(done)

    done = run_sanitized(libraries["ops-tsan-drop-reduction"], "tsan", [PROOF_CASE])
    assert done.returncode != 0, output(done)
    start = done.stderr.find("WARNING: ThreadSanitizer: data race")
    end = done.stderr.find("SUMMARY: ThreadSanitizer: data race", start)
    assert 0 <= start < end, output(done)
    # One side is a warp's store of its partial totals in cta_total, where the barrier was; the
    # other another warp's read of them. The compiler may inline cta_total into CtaGroup's sum
    # (then the report names sum, without a source line).
    report = done.stderr[start:done.stderr.find("\n", end)]
    summary = report.splitlines()[-1]
    assert "CtaGroup<" in summary and ("cta_total" in summary or "::sum<" in summary), output(done)
    print(report)
