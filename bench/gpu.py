"""`python -m bench.gpu`: the GPU scenario alone (bench/scenarios/gpu.py), as a device run
calls it; the same as `python -m bench --scenarios gpu`."""

import sys

from bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--scenarios", "gpu", *sys.argv[1:]]))
