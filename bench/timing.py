"""Timers: median and 20 / 80 % quantiles in milliseconds, warm-up excluded.

- CUDA: `triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])` (CUDA events, L2 flushed before
  each run); without triton, a CUDA-event loop doing the same.
- CPU, one callable (the copy bandwidth): `torch.utils.benchmark.Timer(...).blocked_autorange(
  min_run_time=...)` with `num_threads` fixed; the quantiles are taken over its measurements
  (each the mean of one block of runs).
- CPU, the providers of one case (`time_cpu_interleaved`): blocks of ~0.1 s of calls, taken in
  turn from every provider, each provider's quantiles over its blocks. A CPU shared with other
  machines (a cloud VM) drifts between faster and slower phases of seconds; timed one after
  the other, two providers can land in different phases (the same step measured 0.73 and 1.00 ms
  in two runs on the CI machine), timed in turn they see the same ones, and their ratio holds.
"""

import math
import statistics
import time
from typing import NamedTuple

import torch
import torch.utils.benchmark as torch_benchmark


class Timing(NamedTuple):
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int  # calls measured (0 when the timer does not say)


def quantile(values, q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without numpy."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_cpu(fn, threads: int, min_run_time: float) -> Timing:
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    times_ms = [t * 1e3 for t in measurement.times]
    runs = len(measurement.raw_times) * measurement.number_per_run
    return Timing(statistics.median(times_ms), quantile(times_ms, 0.2), quantile(times_ms, 0.8), runs)


def time_cpu_interleaved(fns: dict, threads: int, min_run_time: float, block_s: float = 0.1) -> dict:
    """name -> Timing for each zero-argument callable of `fns` (already warmed up), timed in
    turn: each gets about `min_run_time` seconds, in blocks of about `block_s`. A callable that
    raises is dropped: its name maps to the exception."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        per_block, results, times = {}, {}, {}
        for name, fn in fns.items():  # calls per block, from a short estimate
            try:
                start, calls = time.perf_counter(), 0
                while calls < 3 or time.perf_counter() - start < block_s:
                    fn()
                    calls += 1
                per_call = (time.perf_counter() - start) / calls
            except Exception as error:  # noqa: BLE001  (reported by the caller)
                results[name] = error
                continue
            per_block[name] = max(1, int(block_s / per_call))
            times[name] = []
        blocks = max(5, int(min_run_time / block_s))
        for _ in range(blocks):
            for name in list(per_block):
                fn, number = fns[name], per_block[name]
                try:
                    start = time.perf_counter()
                    for _ in range(number):
                        fn()
                    times[name].append((time.perf_counter() - start) / number * 1e3)
                except Exception as error:  # noqa: BLE001
                    results[name] = error
                    del per_block[name]
        for name, number in per_block.items():
            ms = times[name]
            runs = len(ms) * number
            results[name] = Timing(statistics.median(ms), quantile(ms, 0.2), quantile(ms, 0.8), runs)
        return results
    finally:
        torch.set_num_threads(previous)


def _cuda_event_bench(fn, warmup_ms: float, rep_ms: float) -> Timing:
    """do_bench's method without triton: estimate, warm up, then one event pair per run."""
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warmup, n_repeat = max(1, int(warmup_ms / estimate)), max(1, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    for _ in range(n_warmup):
        fn()
    for i in range(n_repeat):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return Timing(statistics.median(times), quantile(times, 0.2), quantile(times, 0.8), n_repeat)


def time_cuda(fn, warmup_ms: float, rep_ms: float) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:
        return _cuda_event_bench(fn, warmup_ms, rep_ms)
    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(float(median), float(p20), float(p80), 0)


def first_call_seconds(fn, device: torch.device) -> float:
    """Wall time of one call, synchronized (used for the first call of torch.compile)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
