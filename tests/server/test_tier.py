"""server/engine/tier.py: task states kept up to a budget, least recently used evicted;
the catalog's host tier and a worker's device copies use it."""

from __future__ import annotations

import torch

from piggyback_serve.masks.backbones import load_backbone
from piggyback_serve.server.engine.config import WorkerConfig
from piggyback_serve.server.engine.tier import Tier, TierStats
from piggyback_serve.server.engine.worker import Row, Worker
from tests.server.server_support import BACKBONE, INPUT_SIZE, make_artifact


def sized(n: int):
    """A stand-in state of n bytes (the tier reads only nbytes)."""
    return type("State", (), {"nbytes": n})()


def test_least_recently_used_goes_first_and_the_newest_always_stays():
    tier = Tier(budget=250)
    for name in "abc":
        assert tier.put((name, "1"), sized(100)) == ([("a", "1")] if name == "c" else [])
    assert tier.get(("b", "1")) is not None  # b is now the most recent
    assert tier.put(("d", "1"), sized(100)) == [("c", "1")]
    assert tier.get(("c", "1")) is None
    assert tier.put(("e", "1"), sized(1000)) == [("b", "1"), ("d", "1")]  # alone over budget
    assert list(tier.states) == [("e", "1")] and tier.bytes == 1000
    expected = TierStats(resident=1, bytes=1000, budget=250, hits=1, misses=1, evictions=4)
    assert tier.stats() == expected
    tier.drop(("e", "1"))
    assert tier.bytes == 0 and not tier.states


def test_a_worker_keeps_device_copies_within_its_budget():
    # A CPU worker in bfloat16 copies each state (as a CUDA worker does to the device).
    backbone = load_backbone(BACKBONE, "random")
    config = WorkerConfig(0, "cpu", "bfloat16", 1, one_pass=False, device_state_bytes=1)
    worker = Worker.local(config, backbone)
    states = {
        name: worker.prepare(make_artifact(backbone, name, seed=i, keep=0.99))
        for i, name in enumerate(("a", "b", "c"))
    }
    pixels = torch.randint(0, 256, (1, 3, INPUT_SIZE, INPUT_SIZE), dtype=torch.uint8)
    first = {}
    for round_ in range(2):
        for name, state in states.items():
            (probs,) = worker.step([Row((name, "1"), state)], pixels)
            if round_:
                assert torch.allclose(probs, first[name])  # the same after an eviction
            first[name] = probs
    stats = worker.device_tier.stats()
    assert worker.copies_states and stats.resident == 1 and stats.misses == 6
    assert stats.evictions == 5 and stats.bytes == worker.device_state_bytes > 0
