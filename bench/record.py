"""The results store: one JSON record per scenario in bench/results/, named after it.

Every record names the commit, date, machine and command that made it, so a page rendered
from it says which code its figures belong to.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from bench.stats import Spread

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def commit() -> dict:
    """HEAD, and whether the working tree differs from it (bench/results aside: a run's
    own records, written as it goes, do not make the code it measures dirty)."""
    status = _git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    changed = [line for line in status.splitlines() if line]
    return {"commit": _git("rev-parse", "HEAD") or "unknown", "dirty": bool(changed)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict:
    import psutil
    import torch

    name = device
    if device.startswith("cuda") and torch.cuda.is_available():
        name = f"{device} ({torch.cuda.get_device_name(0)})"
    return {
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": _cpu_model(),
        "torch": torch.__version__,
        "device": name,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
    }


def provenance(device: str, command: str) -> dict:
    return {
        **commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(device),
        "command": command,
    }


def plain(value):
    """JSON-ready: a Spread as its median, low, high and n; NaN as null."""
    if isinstance(value, Spread):
        if value.n == 0:
            return None
        return {"median": value.median, "low": value.low, "high": value.high, "n": value.n}
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def write(folder: Path, name: str, record: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(plain(record), indent=1, default=str) + "\n")
    return path


def load(folder: Path) -> dict[str, dict]:
    """Every record in `folder`, by scenario name."""
    found = {}
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(record, dict) and "scenario" in record:
            found[record["scenario"]] = record
    return found
