"""Routing by task on Ray (`serve.multiplexed`): measured once on the engine that mixes
tasks in a batch, and not kept; `python -m bench` only renders its stored record."""

from __future__ import annotations


def measure(ctx) -> dict:
    raise RuntimeError("a stored record: the code that measured it was not kept")


def summarize(raw: dict) -> dict:
    figures = [
        {
            "figure": "routed ÷ plain, 50 tasks, 2 replicas, images per CPU-s",
            "on": raw["config"],
            "value": raw["routed_over_plain_cpu"],
        }
    ]
    return {"figures": figures, "tables": {"sides": raw["sides"]}}
