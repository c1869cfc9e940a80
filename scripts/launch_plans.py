"""The launch plans of the CUDA ops for the benchmark shapes (docs/performance.md §5).

Each plan comes from the ops' own planner (csrc/cuda/launch_plan.cu, through its C entry
dsnt_cuda_launch_plan_json, scripts/cuda_objects.py), fed with an H100 / H200 model (132 SMs,
16-CTA clusters) and the registers of the built kernels (their disassembly): size class, CTAs
(per map), CTAs resident per SM, waves of work over the resident CTAs, the idle fraction of the
last wave, and the passes over the logits in HBM. Bandwidth-bound shapes must fill the GPU (at
least 132 CTAs, a last wave at most 10 % idle); a launch-bound one (batch-1) says so. Exit
status 1 when a bandwidth-bound plan does not fill the GPU.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_objects
import sass_count

SHAPES = {"pose2d": (32, 16, 64, 64), "wholebody": (64, 133, 64, 48), "face": (256, 98, 64, 64),
          "volume3d": (16, 17, 64, 64, 64), "batch1": (1, 17, 64, 48)}
BANDWIDTH_BOUND = ("wholebody", "face", "volume3d")
SMS = 132


def registers_by_dtype(binaries):
    """{dtype: {"fwd_block": registers, ...}} over the binaries holding the kernels."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        out[dtype] = {}
        for binary in binaries:
            out[dtype].update({k: r for k, r in sass_count.register_map(binary, dtype).items() if r})
    return out


def main():
    registers = registers_by_dtype(sass_count.binaries(parallel=2))
    ok = True
    print(f"{'shape':10} {'dtype':9} {'dir':4} {'class':9} {'CTAs':>6} {'per map':>8} {'CTAs/SM':>7} "
          f"{'waves':>5} {'idle':>6} {'HBM r/w':>7}  note")
    for name, shape in SHAPES.items():
        for dtype in ("float32", "bfloat16"):
            for backward in (False, True):
                p = cuda_objects.launch_plan(shape, sass_count.ELEM_SIZE[dtype], backward,
                                             registers[dtype], SMS)
                per_map = f"{p['ctas_per_map']}" if p["ctas_per_map"] > 1 else f"1/{p['maps_per_cta']}"
                note = ""
                if p["launch_bound"]:
                    note = "launch-latency-bound: too few bytes to fill the GPU"
                elif name in BANDWIDTH_BOUND:
                    fills = p["ctas"] >= SMS and p["last_wave_idle"] <= 0.10
                    note = "fills the GPU" if fills else "DOES NOT FILL THE GPU"
                    ok = ok and fills
                print(f"{name:10} {dtype:9} {'bwd' if backward else 'fwd':4} {p['class']:9} {p['ctas']:>6} "
                      f"{per_map:>8} {p['ctas_per_sm']:>7} {p['waves']:>5} {p['last_wave_idle']:>6.1%} "
                      f"{p['hbm_reads']}/{p['hbm_writes']:<5}  {note}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
