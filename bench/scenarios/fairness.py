"""One hot task takes 90% of the requests, nine others share the rest, in an open loop.

The scheduler serves the queue whose oldest request waited longest, so a cold task's p99
should stay within a small multiple of the hot task's. The arrival rate is a fraction of
the server's closed-loop rate on the same traffic, measured first.
"""

from __future__ import annotations

import random

from bench.bed import Bed
from bench.stats import Spread, ratios

HOT_SHARE = 0.9
N_COLD = 9


def measure(bed: Bed, first: bool = False) -> dict:
    o = bed.options
    hot = [bed.predict(bed.names[0], j, tag="hot") for j in range(len(bed.images))]
    cold = [
        bed.predict(name, j, tag="cold")
        for name in bed.names[1 : 1 + N_COLD]
        for j in range(len(bed.images))
    ]

    def choose(rng: random.Random):
        return rng.choice(hot if rng.random() < HOT_SHARE else cold)

    capacity = bed.load(bed.server, choose, seed=99).images_per_s
    rate = max(1.0, o.load_fraction * capacity)
    runs = []
    for r in range(max(1, o.repeats - 1)):
        result = bed.open_load(bed.server, choose, rate, o.fairness_s, seed=100 + r)
        runs.append(
            {
                "images_per_s": result.images_per_s,
                "hot_p50_ms": result.p(50, "hot"),
                "hot_p99_ms": result.p(99, "hot"),
                "cold_p50_ms": result.p(50, "cold"),
                "cold_p99_ms": result.p(99, "cold"),
                "requests": result.requests,
                "errors": dict(result.errors),
            }
        )
    return {"rate": rate, "closed_loop_images_per_s": capacity, "runs": runs}


def summarize(beds: dict) -> dict:
    figures, rows = [], []
    for label, f in beds.items():
        rs = f["runs"]
        col = {
            k: [r[k] for r in rs]
            for k in ("hot_p50_ms", "hot_p99_ms", "cold_p50_ms", "cold_p99_ms")
        }
        fair = ratios(col["cold_p99_ms"], col["hot_p99_ms"])
        figures.append(
            {
                "figure": "cold p99 ÷ hot p99, 90% of requests to one task",
                "on": label,
                "value": fair,
            }
        )
        rows.append(
            [
                label,
                f["rate"],
                *(Spread.of(v) for v in col.values()),
                fair,
                sum(r["requests"] for r in rs),
                sum(sum(r["errors"].values()) for r in rs),
            ]
        )
    return {"figures": figures, "tables": {"latency": rows}}
