import os
import sys

# Before torch loads (here and in every server it starts, which inherit the environment):
# OpenMP workers that spin while waiting lose several times over on a CPU host where
# anything else wants a core. Every side of every comparison runs with the same setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.run import main  # noqa: E402

if __name__ == "__main__":  # engine worker processes import the main module
    sys.exit(main())
