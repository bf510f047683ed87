"""Benchmarks: `python -m bench` measures every scenario in bench/scenarios, stores one JSON
record each in bench/results/, and renders the pages there from those records
(bench/render.py). See bench/run.py.
"""
