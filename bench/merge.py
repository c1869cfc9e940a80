"""Upsert the rows of other results CSVs (say, the GPU machine's $OUT/bench.csv) into ours.

python -m bench.merge SRC.csv [SRC2.csv ...] [--into bench/results/results.csv]
"""

import argparse
import csv
import os
import sys

from bench import report

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "results.csv")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="+")
    p.add_argument("--into", default=DEFAULT)
    args = p.parse_args(argv)
    rows = []
    for path in args.sources:
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    total = report.upsert_csv(args.into, rows)
    print(f"merged {len(rows)} rows into {args.into} ({total} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
