import os
import sys

# Before torch loads (here and in every server it starts, which inherit the environment):
# OpenMP workers that spin while waiting lose 3-10x on a CPU host where anything else
# wants a core (measured here: EfficientNet-Lite0 b8, 2 threads, 2.0 img/s spinning vs
# 7.5 passive). Every side of every comparison runs with the same setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.run import main  # noqa: E402

if __name__ == "__main__":  # engine worker processes import the main module
    sys.exit(main())
