"""Training step of the CPU ops against dsntnn and torch.compile(reference), ratios in one run.

    python -m bench.cpu_kernels [--shapes pose2d,lowres,lowres3d] [--threads 2] [--rounds 5]
                                [--min-run-time 0.3] [--providers ops,dsntnn,compile] [--cpu-time] [--min]

The training step is the standard loss (euclidean + JS, sigma_t = 1 px, plain mean) forward and
`torch.autograd.grad(loss, logits)`, float32:
- `ops`: the two ops directly, `torch.ops.dsnt_cuda.dsnt_fwd(...)` (loss epilogue in the op) and
  its backward through the registered autograd (no Python API in between);
- `dsntnn`: dsntnn 0.5.3's recipe, eager;
- `compile`: `dsnt_cuda.reference.dsnt_loss` under `torch.compile(dynamic=False)`.

The machine may be shared: each round times every provider once (blocked_autorange), rounds
interleave the providers, and the table reports the median over rounds; the ratios divide those
medians. On a machine loaded far beyond its cores, wall-clock medians mostly measure waiting for a
core: `--min` takes each round's fastest call instead, `--cpu-time` (one thread only) the
calling thread's CPU time.
Benchmarks only, never a test.
"""

import argparse
import functools
import importlib
import statistics
import sys
import time

import torch

from bench import config
from bench.timing import time_cpu
from dsnt_cuda import reference

SIGMA_T = 1.0


def ops_step(x, t):
    from dsnt_cuda import ops  # noqa: F401  (autograd of the C++ ops)

    loss = torch.ops.dsnt_cuda.dsnt_fwd(x, t, None, None, None, "softmax", 1.0, True, "js", SIGMA_T,
                                        "euclidean", 1.0)[4]
    return torch.autograd.grad(loss, x)


def dsntnn_step():
    dsntnn = importlib.import_module("dsntnn")

    def step(x, t):
        heatmaps = dsntnn.flat_softmax(x)
        coords = dsntnn.dsnt(heatmaps)
        loss = dsntnn.average_loss(dsntnn.euclidean_losses(coords, t) +
                                   dsntnn.js_reg_losses(heatmaps, t, sigma_t=SIGMA_T))
        return torch.autograd.grad(loss, x)

    return step


def compile_step():
    compiled = torch.compile(lambda x, t: reference.dsnt_loss(x, t, reg="js", sigma_t=SIGMA_T)[0],
                             dynamic=False)

    def step(x, t):
        return torch.autograd.grad(compiled(x, t), x)

    return step


PROVIDERS = {"ops": lambda: ops_step, "dsntnn": dsntnn_step, "compile": compile_step}


def per_call_ms(fn, min_run_time: float, clock, stat) -> float:
    """`stat` (median / min) of the time per call (ms) over calls for min_run_time seconds."""
    times, start = [], clock()
    while clock() - start < min_run_time or len(times) < 5:
        t0 = clock()
        fn()
        times.append((clock() - t0) * 1e3)
    return stat(times)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.cpu_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="pose2d,lowres,lowres3d")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-run-time", type=float, default=0.3)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--cpu-time", action="store_true", help="thread CPU time instead of wall time (1 thread)")
    p.add_argument("--min", action="store_true", help="the fastest call of each round instead of the median")
    args = p.parse_args(argv)
    if args.cpu_time and args.threads != 1:
        p.error("--cpu-time measures one thread: use --threads 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n for n in args.providers.split(",") if n]
    clock = "thread CPU time" if args.cpu_time else "wall time"
    per_round = "fastest call" if args.min else "median call"
    print(f"torch {torch.__version__}, {args.threads} threads, float32, {clock}, {per_round}, "
          f"median of {args.rounds} rounds (ms)")
    header = f"{'shape':<10}" + "".join(f"{n:>10}" for n in names)
    if "ops" in names:
        header += "".join(f"{'vs ' + n:>12}" for n in names if n != "ops")
    print(header)
    for shape_name in args.shapes.split(","):
        _, sizes = config.parse_shape(shape_name)
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(sizes, generator=g) * 2).requires_grad_(True)
        t = torch.rand(sizes[0], sizes[1], len(sizes) - 2, generator=g) * 1.6 - 0.8
        steps = {n: PROVIDERS[n]() for n in names}
        for step in steps.values():  # warm-up (and compilation)
            step(x, t)
        times = {n: [] for n in names}
        for _ in range(args.rounds):
            for n, step in steps.items():
                fn = functools.partial(step, x, t)
                if args.cpu_time or args.min:
                    clock = time.thread_time if args.cpu_time else time.perf_counter
                    stat = min if args.min else statistics.median
                    times[n].append(per_call_ms(fn, args.min_run_time, clock, stat))
                else:
                    times[n].append(time_cpu(fn, args.threads, args.min_run_time).median_ms)
        med = {n: statistics.median(v) for n, v in times.items()}
        row = f"{shape_name:<10}" + "".join(f"{med[n]:>10.3f}" for n in names)
        if "ops" in names:
            row += "".join(f"{med[n] / med['ops']:>11.2f}x" for n in names if n != "ops")
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
