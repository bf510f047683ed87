"""Benchmarks: serving vs the raw backbone, per-task cost, cold tasks, peers, fairness.

`python -m bench` runs every scenario (bounded in time and request count, loopback only)
and writes bench/results/RESULTS.md and PNG plots. See bench/run.py.
"""
