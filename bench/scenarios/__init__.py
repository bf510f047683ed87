"""One module per scenario of the benchmark issue; each `run` returns plain data."""
