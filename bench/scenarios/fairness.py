"""Scenario 5: one hot task takes 90% of the traffic, nine cold ones share the rest.

The scheduler serves the queue whose oldest request waited longest, so a cold task's
p99 should stay within a small multiple of the hot task's.
"""

from __future__ import annotations

import random

from bench.bed import Bed

HOT_SHARE = 0.9
N_COLD = 9


def run(bed: Bed) -> dict:
    o = bed.options
    hot = [bed.predict(bed.names[0], j, tag="hot") for j in range(len(bed.images))]
    cold = [
        bed.predict(name, j, tag="cold")
        for name in bed.names[1 : 1 + N_COLD]
        for j in range(len(bed.images))
    ]

    def choose(rng: random.Random):
        return rng.choice(hot if rng.random() < HOT_SHARE else cold)

    runs = []
    for r in range(max(1, o.repeats - 1)):
        result = bed.load(bed.server, choose, seed=100 + r, seconds=o.fairness_s)
        runs.append(
            {
                "images_per_s": result.images_per_s,
                "hot_p50_ms": result.p(50, "hot"),
                "hot_p99_ms": result.p(99, "hot"),
                "cold_p50_ms": result.p(50, "cold"),
                "cold_p99_ms": result.p(99, "cold"),
                "hot_requests": len(result.by_tag.get("hot", [])),
                "cold_requests": len(result.by_tag.get("cold", [])),
                "errors": dict(result.errors),
            }
        )
    return {"runs": runs}
