"""server/arena.py: pixels written once into shared memory, read by another process."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from piggyback_serve.server.arena import ALIGN, Arena, ArenaFull, ArenaReader
from piggyback_serve.server.protocol import PixelRef


def test_rows_round_trip_and_freed_runs_merge():
    arena = Arena(16 * ALIGN)
    try:
        a = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
        b = torch.randn(3, 8, 8)
        refs = [arena.put(a), arena.put(b), arena.put(a)]
        reader = ArenaReader()
        assert torch.equal(reader.tensor(refs[0]), a)
        assert torch.equal(reader.tensor(refs[1]), b)
        assert torch.equal(reader.stack([refs[0], refs[2]]), torch.stack([a, a]))
        for ref in refs:
            arena.free(ref)
        assert arena.used == 0 and arena._free == [(0, arena.size)]  # one run again
        reader.drop(arena.name)
    finally:
        arena.close()


def test_a_full_arena_refuses_until_rows_are_freed():
    arena = Arena(4 * ALIGN)
    try:
        row = torch.zeros(2 * ALIGN, dtype=torch.uint8)
        first, second = arena.put(row), arena.put(row)
        with pytest.raises(ArenaFull, match="no room"):
            arena.put(row)
        arena.free(first)
        assert arena.put(row).offset == first.offset
        arena.free(second)
    finally:
        arena.close()


def _read_in_child(ref: PixelRef, out) -> None:
    out.send(ArenaReader().tensor(ref).sum().item())


def test_another_process_reads_the_rows_and_leaves_the_segment_alone():
    """A reader maps the segment without owning it: its exit does not unlink it (before
    Python 3.13, SharedMemory(name) in a reader did, through its resource tracker)."""
    arena = Arena(4 * ALIGN)
    try:
        pixels = torch.arange(300, dtype=torch.float32)
        ref = arena.put(pixels)
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        child = context.Process(target=_read_in_child, args=(ref, theirs))
        child.start()
        assert ours.recv() == pixels.sum().item()
        child.join(30)
        assert child.exitcode == 0
        time.sleep(0.5)  # a resource tracker that meant to unlink it has done so by now
        assert Path(f"/dev/shm/{arena.name.lstrip('/')}").exists()
        assert torch.equal(ArenaReader().tensor(ref), pixels)
    finally:
        arena.close()
    assert not Path(f"/dev/shm/{arena.name.lstrip('/')}").exists()


def test_holding_frees_every_row_and_keeps_none_when_they_do_not_fit():
    arena = Arena(4 * ALIGN)
    try:
        with arena.holding([torch.zeros(ALIGN, dtype=torch.uint8)] * 2) as refs:
            assert len(refs) == 2 and arena.used == 2 * ALIGN
        assert arena.used == 0
        with pytest.raises(ArenaFull), arena.holding([torch.zeros(ALIGN, dtype=torch.uint8)] * 5):
            pass
        assert arena.used == 0
    finally:
        arena.close()
