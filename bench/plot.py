"""Bar charts of the benchmark CSV: one PNG per device, dtype and mode.

    python -m bench.plot [--csv bench/results/results.csv] [--out bench/results]

Each chart has the shapes on the x axis and one bar per provider (median ms, log scale, the
20-80 % quantiles as error bars). Of repeated measurements it shows, per device, thread count,
shape, dtype, mode and provider, the most recent row. Without matplotlib it says so and exits 0.
"""

import argparse
import csv
import os
import re
import sys

from bench import config

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def latest_rows(rows: list[dict]) -> list[dict]:
    latest = {}
    for r in rows:
        key = (r["device_name"], r["threads"], r["shape"], r["dtype"], r["mode"], r["provider"])
        if key not in latest or r.get("timestamp", "") >= latest[key].get("timestamp", ""):
            latest[key] = r
    return list(latest.values())


def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def plot(rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = {}
    for r in latest_rows(rows):
        groups.setdefault((r["device_name"], r["threads"], r["dtype"], r["mode"]), []).append(r)
    for (device, threads, dtype, mode), group in sorted(groups.items()):
        shape_order = [s for s in config.SHAPES if any(r["shape"] == s for r in group)]
        shape_order += sorted({r["shape"] for r in group} - set(shape_order))
        providers = [p for p in config.PROVIDERS if any(r["provider"] == p for r in group)]
        providers += sorted({r["provider"] for r in group} - set(providers))
        by = {(r["shape"], r["provider"]): r for r in group}
        width = 0.8 / max(len(providers), 1)
        fig, ax = plt.subplots(figsize=(max(7.5, 1.6 * len(shape_order) + 3.5), 4.5))
        for i, provider in enumerate(providers):
            xs, medians, lo, hi = [], [], [], []
            for j, shape in enumerate(shape_order):
                r = by.get((shape, provider))
                if r is None or not _float(r["median_ms"]) > 0:
                    continue
                m = _float(r["median_ms"])
                xs.append(j - 0.4 + (i + 0.5) * width)
                medians.append(m)
                lo.append(max(m - _float(r["p20_ms"]), 0) if _float(r["p20_ms"]) > 0 else 0)
                hi.append(max(_float(r["p80_ms"]) - m, 0) if _float(r["p80_ms"]) > 0 else 0)
            if xs:
                ax.bar(xs, medians, width, label=provider, yerr=[lo, hi], capsize=2, color=color(provider))
        ax.set_yscale("log")
        ax.set_xticks(range(len(shape_order)))
        ax.set_xticklabels([f"{s}\n{by_shape_sizes(group, s)}" for s in shape_order], fontsize=8)
        ax.set_ylabel("median ms (log), 20-80 % bars")
        what = "coordinates (fused_dsnt)" if mode == "inference" else "loss forward + backward (dsnt_loss)"
        ax.set_title(f"{device}, {threads} threads\n{mode}: {what}, {dtype}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{slug(device)}_t{threads}_{dtype}_{mode}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def color(provider: str):
    """The same colour for a provider in every chart."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    order = list(config.PROVIDERS)
    index = order.index(provider) if provider in order else len(order)
    return palette[index % len(palette)]


def by_shape_sizes(group, shape) -> str:
    return next((r.get("sizes", "") for r in group if r["shape"] == shape), "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", default=os.path.join(RESULTS, "results.csv"))
    p.add_argument("--out", help="directory of the PNGs (default: the CSV's directory)")
    args = p.parse_args(argv)
    if not os.path.exists(args.csv):
        print(f"bench.plot: no results at {args.csv}; run python -m bench.run first", file=sys.stderr)
        return 1
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("bench.plot: matplotlib is not installed, no plots written")
        return 0
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    out_dir = args.out or os.path.dirname(os.path.abspath(args.csv))
    os.makedirs(out_dir, exist_ok=True)
    for path in plot(rows, out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
