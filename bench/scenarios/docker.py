"""The Docker image and the Compose stack, as `bash deploy/docker-check.sh` measures them
(it needs root and Docker, so `python -m bench` only renders its stored record)."""

from __future__ import annotations


def measure(ctx) -> dict:
    raise RuntimeError("recorded by `bash deploy/docker-check.sh`, not by python -m bench")


def summarize(raw: dict) -> dict:
    return {"tables": {"figures": [list(pair) for pair in raw["figures"]]}}
