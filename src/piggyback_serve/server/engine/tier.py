"""A tier of task states: kept ready up to a budget in bytes, least recently used evicted.

The catalog keeps one in host memory (states built from the registry); each CUDA worker
keeps one of device copies. An evicted state is rebuilt (or copied again) on its next use.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from piggyback_serve.server.engine.task_state import TaskState
from piggyback_serve.server.protocol import TierStats

TaskKey = tuple[str, str]  # (name, version)


@dataclass
class Tier:
    budget: int
    states: OrderedDict[TaskKey, TaskState] = field(default_factory=OrderedDict)
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def get(self, key: TaskKey) -> TaskState | None:
        """The state of `key` (now the most recently used), or None: a miss."""
        state = self.states.get(key)
        if state is None:
            self.misses += 1
            return None
        self.hits += 1
        self.states.move_to_end(key)
        return state

    def put(self, key: TaskKey, state: TaskState) -> list[TaskKey]:
        """Keep `state` as the most recent; returns the keys evicted to stay in budget (the
        newest state stays even when it alone is over)."""
        self.drop(key)
        self.states[key] = state
        self.bytes += state.nbytes
        evicted = []
        while self.bytes > self.budget and len(self.states) > 1:
            old, gone = self.states.popitem(last=False)
            self.bytes -= gone.nbytes
            self.evictions += 1
            evicted.append(old)
        return evicted

    def drop(self, key: TaskKey) -> None:
        gone = self.states.pop(key, None)
        if gone is not None:
            self.bytes -= gone.nbytes

    def stats(self) -> TierStats:
        return TierStats(
            len(self.states), self.bytes, self.budget, self.hits, self.misses, self.evictions
        )
