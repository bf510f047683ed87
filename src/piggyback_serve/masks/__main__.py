import sys

from piggyback_serve.masks.cli import main

# Guarded: engine worker processes start from a fork server, which imports the main module.
if __name__ == "__main__":
    sys.exit(main())
