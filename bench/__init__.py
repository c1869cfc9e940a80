"""Benchmarks of dsnt_cuda against its baselines (see bench/README.md).

Entry points: `python -m bench.run` (measure, print, upsert bench/results/results.csv, write
bench/results/latest_<device>.md) and `python -m bench.plot` (PNG charts from the CSV).
"""
