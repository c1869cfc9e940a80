"""Time dsnt_cuda's fused backends against the reference, torch.compile, dsntnn and kornia.

    python -m bench.run [--device cpu|cuda] [--shapes pose2d,lowres] [--dtypes float32,bfloat16]
                        [--modes inference,training] [--providers cpu,reference,...]
                        [--threads N] [--full] [--quick] [--compile auto|all|none] [--out DIR]

Cases are shape x dtype x mode; every provider runs every case it can, and is skipped with a
printed reason otherwise. Results: a table on stdout, rows upserted into DIR/results.csv, and
DIR/latest_<device>.md (for the README). Plots: `python -m bench.plot`.
"""

import argparse
import atexit
import gc
import math
import os
import shutil
import sys
import tempfile
import traceback

import torch

from bench import config, report
from bench.providers import Kornia, Reference, ReferenceCompiled, kornia_to_dsntnn, make_providers
from bench.timing import first_call_seconds, time_cpu, time_cpu_interleaved, time_cuda

DEFAULT_OUT = os.path.join(report.REPO_ROOT, "bench", "results")


def _csv_list(text):
    return [s.strip() for s in text.split(",") if s.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--shapes",
        type=_csv_list,
        help=f"names ({', '.join(config.SHAPES)}) or BxLxHxW; default "
        f"{','.join(config.DEFAULT_SHAPES)}, --full: {','.join(config.FULL_SHAPES)}",
    )
    p.add_argument(
        "--dtypes",
        type=_csv_list,
        help=f"default {','.join(config.DEFAULT_DTYPES)}, --full: {','.join(config.FULL_DTYPES)}",
    )
    p.add_argument("--modes", type=_csv_list, default=list(config.MODES), help="inference,training")
    p.add_argument(
        "--providers",
        type=_csv_list,
        default=list(config.PROVIDERS),
        help=f"some of {','.join(config.PROVIDERS)} (default: all)",
    )
    p.add_argument("--threads", type=int, help="torch threads (default 2 on CPU; unchanged on CUDA)")
    p.add_argument("--full", action="store_true", help="all shapes, float32 and bfloat16, longer timing")
    p.add_argument("--quick", action="store_true", help="short timing (smoke tests)")
    p.add_argument(
        "--compile",
        choices=("auto", "all", "none"),
        default="auto",
        help="where to measure reference-compile: auto = every shape on CUDA, on CPU only "
        f"shapes of <= {config.CPU_COMPILE_MAX_NUMEL} logits unless --full",
    )
    p.add_argument(
        "--compile-cache",
        action="store_true",
        help="let torch.compile reuse its on-disk caches (default: a fresh cache, so "
        "compile_s is a cold compilation)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the error check against the reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help="directory of results.csv and latest_<device>.md")
    args = p.parse_args(argv)
    for mode in args.modes:
        if mode not in config.MODES:
            p.error(f"unknown mode {mode!r}; expected inference and/or training")
    for name in args.dtypes or []:
        if name not in config.DTYPES:
            p.error(f"unknown dtype {name!r}; expected some of {', '.join(config.DTYPES)}")
    return args


class Progress:
    """A tqdm bar on a terminal (when tqdm is installed), else one plain line per step on stderr."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.bar = None
        if sys.stderr.isatty():  # in a log file, plain lines read better than a redrawn bar
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def step(self, desc: str):
        self.done += 1
        if self.bar is not None:
            self.bar.set_description_str(desc)
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {desc}", file=sys.stderr, flush=True)

    def write(self, message: str):
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def make_step(fn, mode, x, target):
    """One timed call: coordinates (inference) or loss + d loss / d logits (training)."""
    if mode == "inference":
        return lambda: fn(x)

    def step():
        loss = fn(x, target)
        (grad,) = torch.autograd.grad(loss, x)
        return loss, grad

    return step


def step_result(out, mode) -> torch.Tensor:
    """What the error check compares: coordinates (inference) or the gradient (training)."""
    return out if mode == "inference" else out[1]


def saved_bytes(fn, x, target) -> tuple[int, int]:
    """Bytes of the unique storages autograd saves for backward in one forward, and of those
    the ones that are not the logits' own storage."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[(str(s.device), s.data_ptr())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(x, target)
    del loss
    total = sum(storages.values())
    own = storages.get((str(x.device), x.untyped_storage().data_ptr()), 0)
    return total, total - own


def peak_extra_bytes(step, device) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


def main(argv=None) -> int:
    args = parse_args(argv)
    level = "quick" if args.quick else "full" if args.full else "default"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        torch.set_num_threads(2)
    threads = torch.get_num_threads()
    if not args.compile_cache:  # a cold compile each run, comparable between runs
        cache = tempfile.mkdtemp(prefix="dsnt_bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    compile_policy = "all" if (args.full and args.compile == "auto") else args.compile

    try:
        shapes = [
            config.parse_shape(s)
            for s in (args.shapes or (config.FULL_SHAPES if args.full else config.DEFAULT_SHAPES))
        ]
        providers = make_providers(args.providers)
    except ValueError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    dtypes = list(args.dtypes or (config.FULL_DTYPES if args.full else config.DEFAULT_DTYPES))
    skipped = []
    if device.type == "cuda" and "bfloat16" in dtypes and not torch.cuda.is_bf16_supported():
        dtypes.remove("bfloat16")
        skipped.append("bfloat16: not supported by this GPU")
    opts = {"compile": compile_policy}

    env = report.environment(device, threads, report.command_line())
    print(
        f"bench: {env['device_name']} | torch {env['torch']} | triton {env['triton'] or '-'} | "
        f"{threads} threads | commit {env['git_commit']} | {level} timing",
        flush=True,
    )
    warning = report.load_warning(env)
    if warning:
        print(f"bench: warning: {warning}", flush=True)
    # The providers of a case: name -> Timing, or the exception that stopped the provider. CPU:
    # timed in turn (bench/timing.py), so that their ratios hold on a drifting machine; CUDA:
    # one after the other (do_bench's L2 flush and events, per provider).
    if device.type == "cpu":
        min_run_time = config.CPU_MIN_RUN_TIME[level]

        def time_case(steps):
            return time_cpu_interleaved(steps, threads, min_run_time)

        def copy_timer(fn):
            return time_cpu(fn, threads, max(min_run_time, 0.2))
    else:
        warmup_ms, rep_ms = config.GPU_WARMUP_REP_MS[level]
        copy_timer = lambda fn: time_cuda(fn, warmup_ms, rep_ms)  # noqa: E731

        def time_case(steps):
            timings = {}
            for name, step in steps.items():
                try:
                    timings[name] = time_cuda(step, warmup_ms, rep_ms)
                except Exception as error:  # noqa: BLE001
                    timings[name] = error
                    torch.cuda.empty_cache()
            return timings

    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "results.csv")
    md_path = os.path.join(args.out, f"latest_{device.type}.md")
    cases = [(name, sizes, dt, mode) for name, sizes in shapes for dt in dtypes for mode in args.modes]
    progress = Progress(len(cases) * len(providers))
    rows, notes, skip_reasons = [], [], {}
    generator = torch.Generator().manual_seed(args.seed)

    def skip(provider, case, reason):
        skip_reasons.setdefault((provider, reason), []).append(case)
        progress.write(f"  skip {provider} on {case}: {reason}")

    def failed(provider, case, error):
        progress.write("".join(traceback.format_exception(error, limit=-4)).rstrip())
        message = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        skip(provider.name, case, f"failed: {type(error).__name__}: {message}")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def flush_results():
        report.add_speedups(rows)
        report.upsert_csv(csv_path, rows)
        with open(md_path, "w") as f:
            f.write(report.markdown_report(env, rows, notes, _skip_lines(skip_reasons, skipped)))

    current = None
    for name, sizes, dtype_name, mode in cases:
        dtype = config.DTYPES[dtype_name]
        case = f"{name}/{dtype_name}/{mode}"
        if current != (name, dtype_name):  # new logits, and their copy bandwidth
            current = (name, dtype_name)
            logits = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            logits = torch.randn(sizes, generator=generator).to(device=device, dtype=dtype)
            target = (torch.rand(*sizes[:2], len(sizes) - 2, generator=generator) * 1.6 - 0.8).to(device)
            scratch = torch.empty_like(logits)
            copy_ms = copy_timer(lambda dst=scratch, src=logits: dst.copy_(src)).median_ms
            del scratch
            logits_bytes = logits.numel() * logits.element_size()
            copy_gbps = 2 * logits_bytes / (copy_ms * 1e-3) / 1e9
        x = logits.detach().requires_grad_(mode == "training")
        moved = logits_bytes * (1 if mode == "inference" else 3)
        expected = None
        if not args.no_check:
            try:
                expected = step_result(make_step(Reference().function(mode), mode, x, target)(), mode)
            except Exception as error:  # noqa: BLE001  (e.g. out of memory: time the providers anyway)
                progress.write(f"  no error check on {case}: the reference failed: {type(error).__name__}")

        prepared = []  # (provider, fn, step, compile_s, err): warmed up and checked
        for provider in providers:
            progress.step(f"{case} {provider.name}")
            reason = provider.unavailable(device, sizes, dtype, mode, opts)
            if reason is not None:
                skip(provider.name, case, reason)
                continue
            compile_s = float("nan")
            try:
                if isinstance(provider, ReferenceCompiled):
                    fn = provider.compiled((sizes, dtype_name, mode), mode)
                else:
                    fn = provider.function(mode)
                step = make_step(fn, mode, x, target)
                if isinstance(provider, ReferenceCompiled):
                    compile_s = first_call_seconds(step, device)
                out = step()  # warm-up, and the value checked against the reference
                err = float("nan")
                if expected is not None:
                    got = step_result(out, mode)
                    if isinstance(provider, Kornia):
                        got = kornia_to_dsntnn(got, sizes)
                    err = (got.float() - expected.float()).abs().max().item()
                del out
            except Exception as error:  # noqa: BLE001  (a backend in progress must not stop the others)
                failed(provider, case, error)
                continue
            prepared.append((provider, fn, step, compile_s, err))

        timings = time_case({provider.name: step for provider, _, step, _, _ in prepared})
        for provider, fn, step, compile_s, err in prepared:
            timing = timings[provider.name]
            try:
                if isinstance(timing, Exception):
                    raise timing
                saved = saved_extra = peak = float("nan")
                if mode == "training":
                    saved, saved_extra = saved_bytes(fn, x, target)
                if device.type == "cuda":
                    peak = peak_extra_bytes(step, device)
            except Exception as error:  # noqa: BLE001
                failed(provider, case, error)
                continue
            if provider.note and provider.note not in notes:
                notes.append(provider.note)
            gbps = moved / (timing.median_ms * 1e-3) / 1e9
            rows.append(
                {
                    **env,
                    "shape": name,
                    "sizes": config.shape_str(sizes),
                    "dtype": dtype_name,
                    "mode": mode,
                    "provider": provider.name,
                    "median_ms": timing.median_ms,
                    "p20_ms": timing.p20_ms,
                    "p80_ms": timing.p80_ms,
                    "runs": timing.runs,
                    "compile_s": compile_s,
                    "logits_bytes": logits_bytes,
                    "moved_bytes": moved,
                    "gbps": gbps,
                    "copy_gbps": copy_gbps,
                    "pct_copy": 100 * gbps / copy_gbps,
                    "saved_bytes": saved,
                    "saved_ratio": saved / logits_bytes,
                    "saved_extra_ratio": saved_extra / logits_bytes,
                    "peak_extra_bytes": peak,
                    "peak_ratio": peak / logits_bytes,
                    "max_err": err,
                }
            )
        flush_results()  # after every case: a run cut short keeps what it measured
    progress.close()

    flush_results()
    print()
    if rows:
        print(report.text_table(rows))
        print()
        print(report.summary_text(rows))
    else:
        print("bench: no provider could run any case")
    print()
    compiled = [r for r in rows if not math.isnan(r["compile_s"])]
    if compiled:
        print(
            "torch.compile first call (compilation included, not in the timings): "
            + ", ".join(f"{r['shape']}/{r['dtype']}/{r['mode']} {r['compile_s']:.1f} s" for r in compiled)
        )
    for note in notes:
        print(f"note: {note}")
    for line in _skip_lines(skip_reasons, skipped):
        print(f"skipped: {line}")
    for line in report.target_checks(rows, device.type):
        print(f"target: {line}")
    print(
        "copy bandwidth (y.copy_(x), read + write): "
        + ", ".join(
            f"{s}/{d} {g:.1f} GB/s"
            for (s, d), g in {(r["shape"], r["dtype"]): r["copy_gbps"] for r in rows}.items()
        )
    )
    print(f"results: {csv_path} ({len(rows)} rows upserted), {md_path}")
    return 0 if rows else 1


def _skip_lines(skip_reasons, skipped) -> list[str]:
    lines = list(skipped)
    for (provider, reason), cases in skip_reasons.items():
        where = cases[0] if len(cases) == 1 else f"{len(cases)} cases"
        lines.append(f"{provider} ({where}): {reason}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
