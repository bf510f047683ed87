"""LRU of materialised task weights, bounded in bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import torch

Params = dict[str, torch.Tensor]


class WeightCache:
    """Keys are (task name, version); least recently used entries go first.

    An entry larger than the whole budget is not kept: it is used once and dropped.
    Thread-safe: the engine thread fills it, the event loop drops tasks and reads stats.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Hashable, tuple[Params, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable) -> Params | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found[0]

    def put(self, key: Hashable, params: Params, nbytes: int) -> None:
        with self._lock:
            self._remove(key)
            if nbytes > self.budget_bytes:
                return
            while self.bytes + nbytes > self.budget_bytes and self._entries:
                oldest = next(iter(self._entries))
                self._remove(oldest)
                self.evictions += 1
            self._entries[key] = (params, nbytes)
            self.bytes += nbytes

    def drop(self, name: str) -> None:
        """Forget every version of a task (it was deleted or replaced)."""
        with self._lock:
            for key in [k for k in self._entries if isinstance(k, tuple) and k[0] == name]:
                self._remove(key)

    def __len__(self) -> int:
        return len(self._entries)

    def _remove(self, key: Hashable) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self.bytes -= found[1]
