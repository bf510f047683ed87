"""`python -m bench.gpu`: the GPU scenario alone (bench/scenarios/gpu.py), as a device run
calls it; the same as `python -m bench --scenarios gpu`. Where $OUT is set (a device run)
and --out is not given, the record and its pages go under $OUT."""

import os
import sys

from bench.__main__ import main

if __name__ == "__main__":
    args = ["--scenarios", "gpu", *sys.argv[1:]]
    if os.environ.get("OUT") and "--out" not in args:
        args += ["--out", os.environ["OUT"]]
    sys.exit(main(args))
