"""What the three command-line tools share: a quiet end when stdout's reader leaves.

Kept at the package root, importing nothing else of ours, so that the client (installed
without torch) can use it too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def quiet_when_the_reader_leaves(run: Callable[[], int]) -> int:
    """run(), ending with status 1 and no traceback when stdout's reader has gone
    (`piggy tasks | head -1`): Python's recipe in its `signal` docs ("Note on SIGPIPE"),
    not SIG_DFL, which would also kill the process on a write to a closed socket."""
    try:
        try:
            return run()
        finally:
            sys.stdout.flush()  # --help's SystemExit too: a failed flush at exit is noisy
    except BrokenPipeError:
        # The interpreter flushes stdout again as it exits: give that flush a sink.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
