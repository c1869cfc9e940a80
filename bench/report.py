"""Where results go: the environment they were measured in, the CSV (upserted by key), the
printed table and the markdown file ready for the README."""

import csv
import datetime
import math
import os
import platform
import subprocess
import sys
import tempfile

import torch

from bench import config

# One CSV row per (environment, case, provider). KEY columns identify a row: a rerun with the
# same key replaces it, anything else is appended.
KEY = ("device_name", "torch", "git_commit", "date", "shape", "dtype", "mode", "provider", "threads")
FIELDS = (
    *KEY,
    "device_type",
    "sizes",
    "timestamp",
    "git_dirty",
    "triton",
    "python",
    "load_avg",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "runs",
    "compile_s",
    "logits_bytes",
    "moved_bytes",
    "gbps",
    "copy_gbps",
    "pct_copy",
    "saved_bytes",
    "saved_ratio",
    "saved_extra_ratio",
    "peak_extra_bytes",
    "peak_ratio",
    "max_err",
    "speedup_vs_dsntnn",
    "speedup_vs_compile",
    "command",
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device, threads: int, command: str) -> dict:
    """The columns shared by every row of this run."""
    now = datetime.datetime.now(datetime.timezone.utc)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()} ({os.cpu_count()} cores)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    commit = os.environ.get("DSNT_BENCH_COMMIT") or _git("rev-parse", "--short=12", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    try:
        load = f"{os.getloadavg()[0]:.2f}"
    except OSError:
        load = ""
    return {
        "device_type": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": "" if status is None else str(bool(status)),
        "date": now.strftime("%Y-%m-%d"),
        "timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "threads": str(threads),
        "load_avg": load,  # 1-minute load average at the start: other work skews CPU timings
        "command": command,
    }


def load_warning(env: dict) -> str | None:
    """A warning when other processes kept the CPUs busy as the run started."""
    try:
        load = float(env["load_avg"])
    except (KeyError, ValueError):
        return None
    cores = os.cpu_count() or 1
    if load > 0.5 * cores:
        return (
            f"the 1-minute load average was {load:.1f} on {cores} cores at the start: other work "
            "is running, CPU timings (and copy bandwidth) will be noisy"
        )
    return None


def row_key(row: dict) -> tuple:
    return tuple(str(row.get(k, "")) for k in KEY)


def _missing(value) -> bool:
    """None or NaN (an unmeasured quantity)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt_csv(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def upsert_csv(path: str, rows: list[dict]) -> int:
    """Merge `rows` into the CSV at `path` by KEY (replace or append); returns the row count."""
    existing, fields = [], list(FIELDS)
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields += [c for c in reader.fieldnames or [] if c not in fields]
            existing = list(reader)
    merged = {row_key(r): r for r in existing}
    for row in rows:
        merged[row_key(row)] = {k: _fmt_csv(v) for k, v in row.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".csv.tmp")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged.values())
    os.replace(tmp, path)
    return len(merged)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

COLUMNS = (  # (header, row -> text)
    ("shape", lambda r: r["shape"]),
    ("dtype", lambda r: r["dtype"]),
    ("mode", lambda r: r["mode"]),
    ("provider", lambda r: r["provider"]),
    ("median ms", lambda r: _num(r["median_ms"], 4)),
    ("20-80% ms", lambda r: f"{_num(r['p20_ms'], 3)}-{_num(r['p80_ms'], 3)}"),
    ("GB/s", lambda r: _num(r["gbps"], 3)),
    ("% copy", lambda r: _num(r["pct_copy"], 3)),
    ("saved x", lambda r: _num(r["saved_ratio"], 3)),
    ("peak x", lambda r: _num(r["peak_ratio"], 3)),
    ("max err", lambda r: _num(r["max_err"], 2, sci=True)),
    ("x dsntnn", lambda r: _ratio(r["speedup_vs_dsntnn"])),
    ("x compile", lambda r: _ratio(r["speedup_vs_compile"])),
)


def _num(value, digits: int, sci: bool = False) -> str:
    if _missing(value):
        return "-"
    if sci:
        return f"{value:.{digits}g}" if value == 0 or abs(value) >= 1e-3 else f"{value:.1e}"
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"


def _ratio(value) -> str:
    if _missing(value):
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_<baseline> = baseline median / this median, within one shape/dtype/mode."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r["shape"], r["dtype"], r["mode"]), {})[r["provider"]] = r
    for case in by_case.values():
        for column, baseline in (
            ("speedup_vs_dsntnn", "dsntnn"),
            ("speedup_vs_compile", "reference-compile"),
        ):
            base = case.get(baseline)
            for r in case.values():
                ok = base is not None and base["median_ms"] > 0 and r["median_ms"] > 0
                r[column] = base["median_ms"] / r["median_ms"] if ok else float("nan")


def text_table(rows: list[dict]) -> str:
    cells = [[h for h, _ in COLUMNS]] + [[f(r) for _, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = []
    for n, c in enumerate(cells):
        lines.append(
            "  ".join(s.ljust(w) if i < 4 else s.rjust(w) for i, (s, w) in enumerate(zip(c, widths)))
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    header = [h for h, _ in COLUMNS]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 4 else "---:" for i in range(len(header))) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(f(r) for _, f in COLUMNS) + " |")
    return "\n".join(lines)


FUSED = ("cuda", "triton", "cpu")


def summary_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One line per shape/dtype/mode: each provider's median ms, then the fastest fused backend's
    speed-up over dsntnn and over the compiled reference."""
    providers = [p for p in config.PROVIDERS if any(r["provider"] == p for r in rows)]
    cases = {}
    for r in rows:
        cases.setdefault((r["shape"], r["dtype"], r["mode"]), {})[r["provider"]] = r
    header = ["shape", "dtype", "mode", *[f"{p} ms" for p in providers], "fused x dsntnn", "fused x compile"]
    lines = []
    for (shape, dtype, mode), by in cases.items():
        fused = [by[p] for p in FUSED if p in by]
        best = min(fused, key=lambda r: r["median_ms"]) if fused else None
        cells = [shape, dtype, mode] + [_num(by[p]["median_ms"], 4) if p in by else "-" for p in providers]
        for column in ("speedup_vs_dsntnn", "speedup_vs_compile"):
            value = best.get(column) if best else None
            cells.append("-" if best is None or _missing(value) else f"{_ratio(value)} ({best['provider']})")
        lines.append(cells)
    return header, lines


def summary_text(rows: list[dict]) -> str:
    header, lines = summary_rows(rows)
    cells = [header, *lines]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    out = []
    for n, c in enumerate(cells):
        out.append("  ".join(t.ljust(w) if i < 3 else t.rjust(w) for i, (t, w) in enumerate(zip(c, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def summary_markdown(rows: list[dict]) -> str:
    header, lines = summary_rows(rows)
    out = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|",
    ]
    out += ["| " + " | ".join(c) + " |" for c in lines]
    return "\n".join(out)


LEGEND = (
    "median and 20-80 % quantiles of the time of one call (training: loss forward + "
    "torch.autograd.grad w.r.t. the logits); GB/s = bytes that must move / median (inference "
    "reads the logits once, training reads them twice and writes the gradient once); % copy = "
    "that rate over a device-to-device y.copy_(x) of the logits' size in the same run; saved x = "
    "bytes of the unique storages autograd saves for backward / logits bytes (logits included); "
    "peak x = GPU peak allocated minus before the call / logits bytes; max err = max abs "
    "difference to dsnt_cuda.reference eager (coordinates; training: gradient); x dsntnn / "
    "x compile = median of dsntnn / reference-compile over this median."
)


# Training speed-up targets (docs/performance.md §2): (device type, provider, shapes (None: all
# of config.FULL_SHAPES), least speed-up over dsntnn, over torch.compile of the reference).
SPEEDUP_TARGETS = (("cpu", "cpu", None, 5, 2), ("cuda", "cuda", ("pose2d",), 10, 2))


def _speedup_checks(r: dict, case: str, device_type: str, provider: str, shape: str) -> list[tuple]:
    """(ok, text) of the speed-up targets that apply to a training row."""
    checks = []
    for target_device, target_provider, shapes, *goals in SPEEDUP_TARGETS:
        if (target_device, target_provider) != (device_type, provider) or shape not in (shapes or (shape,)):
            continue
        for (column, name), goal in zip(
            (("speedup_vs_dsntnn", "dsntnn"), ("speedup_vs_compile", "torch.compile")), goals, strict=True
        ):
            if not _missing(r[column]):
                text = f"{case}: {provider} {r[column]:.2f}x {name} (target >= {goal}x)"
                checks.append((r[column] >= goal, text))
    return checks


def target_checks(rows: list[dict], device_type: str) -> list[str]:
    """The targets of docs/performance.md §2 that this run measured, each with its measured value."""
    by = {(r["shape"], r["dtype"], r["mode"], r["provider"]): r for r in rows}
    checks = []

    def check(ok, text):
        checks.append(f"{'PASS' if ok else 'MISS'}  {text}")

    for (shape, dtype, mode, provider), r in sorted(by.items()):
        if shape not in config.FULL_SHAPES:  # the targets are about the benchmark shapes
            continue
        case = f"{shape}/{dtype}/{mode}"
        if mode == "training":
            for ok, text in _speedup_checks(r, case, device_type, provider, shape):
                check(ok, text)
        if device_type != "cuda" or provider not in ("cuda", "triton"):
            continue
        if shape in ("wholebody", "volume3d"):
            check(
                r["pct_copy"] >= 80,
                f"{case}: {provider} at {r['pct_copy']:.0f} % of copy bandwidth (target >= 80 %)",
            )
        if provider == "cuda" and mode == "training" and not _missing(r["peak_ratio"]):
            check(
                r["peak_ratio"] <= 1.25,
                f"{case}: cuda peak extra memory {r['peak_ratio']:.2f}x logits "
                "(target about one gradient, <= 1.25x)",
            )
        cuda = by.get((shape, dtype, mode, "cuda"))
        if provider == "triton" and cuda is not None:
            ratio = r["median_ms"] / cuda["median_ms"]
            check(ratio <= 1.3, f"{case}: triton {ratio:.2f}x the cuda time (target <= 1.3x)")
    return checks


def markdown_report(env: dict, rows: list[dict], notes: list[str], skipped: list[str]) -> str:
    modes = sorted({r["mode"] for r in rows})
    lines = [
        f"# dsnt_cuda benchmark: {env['device_type']}",
        "",
        f"- machine: {env['device_name']}, {env['threads']} CPU threads",
        f"- torch {env['torch']}, triton {env['triton'] or '-'}, Python {env['python']}",
        f"- load average at the start: {env['load_avg'] or '-'} ({os.cpu_count()} cores)",
        f"- date: {env['timestamp']}, commit {env['git_commit']}"
        + (" (uncommitted changes)" if env["git_dirty"] == "True" else ""),
        f"- command: `{env['command']}`",
        *([f"- **warning**: {load_warning(env)}"] if load_warning(env) else []),
        "",
        "Median time of one call, ms (fused = the fastest of cuda / triton / cpu):",
        "",
        summary_markdown(rows),
        "",
        "All measurements: " + LEGEND,
        "",
    ]
    for mode in modes:
        lines += [f"## {mode}", "", markdown_table([r for r in rows if r["mode"] == mode]), ""]
    compile_rows = [r for r in rows if not _missing(r.get("compile_s"))]
    if compile_rows:
        lines += [
            "torch.compile first call (compilation included): "
            + ", ".join(
                f"{r['shape']}/{r['dtype']}/{r['mode']} {r['compile_s']:.1f} s" for r in compile_rows
            ),
            "",
        ]
    lines += [f"- {n}" for n in notes]
    checks = target_checks(rows, env["device_type"])
    if checks:
        heading = "Targets of docs/performance.md §2 measured in this run:"
        lines += ["", heading, ""] + [f"- {c}" for c in checks]
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def command_line() -> str:
    return " ".join(["python -m bench.run", *sys.argv[1:]])
