"""The open-files limit: raised to the hard limit at start, and named when it runs out."""

from __future__ import annotations

import errno
import logging
import resource

log = logging.getLogger(__name__)


def raise_soft_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit and log it; returns
    (soft, hard) as they are now. Children (engine workers) inherit the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, _system_ceiling())
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("open files: could not raise the limit from %d: %s", soft, exc)
            return soft, hard
        if wanted != soft:
            log.info("open files: soft limit raised from %d to %d", soft, wanted)
        soft = wanted
    return soft, hard


def exhausted(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is the process or system running out of files."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def explain(exc: BaseException) -> str:
    """A message that names the cause when `exc` is running out of open files."""
    if not exhausted(exc):
        return str(exc)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (
        f"out of open files (limit {soft}, hard limit {hard}): raise it (ulimit -n, or "
        f"the container's nofile ulimit) and restart; {exc}"
    )


def _system_ceiling() -> int:
    """The most open files one process may have (Linux fs.nr_open), for an unlimited hard
    limit."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20
