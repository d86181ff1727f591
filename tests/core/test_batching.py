"""The row planner's sizing rules (the CUDA memory probe is exercised with a simulated allocator)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.core import batching
from attribution.core.batching import RowPlanner


def test_fixed_and_cpu_sizes():
    assert list(RowPlanner(10, 4, torch.device("cpu"))) == [(0, 4), (4, 8), (8, 10)]
    assert list(RowPlanner(40, None, torch.device("cpu")))[0] == (0, batching.CPU_ROWS)
    assert list(RowPlanner(10, np.int64(4), torch.device("cpu"))) == [(0, 4), (4, 8), (8, 10)]  # numpy's integers
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        RowPlanner(3, 0, torch.device("cpu"))


class FakeAllocator:
    """Peak memory rises by ``per_row`` bytes for each row of the probe pass."""

    def __init__(self, monkeypatch, free: int, per_row: int, earlier_peak: int = 0, counts: bool = True) -> None:
        self.peak = earlier_peak
        self.per_row = per_row
        self.allocated_so_far = 0  # what a pass allocates in all: here twice its peak's rise
        for name, fn in {
            "memory_allocated": lambda device=None: 1000,
            "max_memory_allocated": lambda device=None: self.peak,
            "memory_reserved": lambda device=None: 1000,
            "mem_get_info": lambda device=None: (free, 10 * free),
            "memory_stats": lambda device=None: {"allocated_bytes.all.allocated": self.allocated_so_far} if counts
            else {},
        }.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def run(self, planner: RowPlanner):
        chunks = []
        for start, stop in planner:
            chunks.append((start, stop))
            self.peak = max(self.peak, 1000 + self.per_row * (stop - start))
            self.allocated_so_far += 2 * self.per_row * (stop - start)
        return chunks


def test_cuda_probe_sizes_the_rest_to_a_third_of_free_memory(monkeypatch):
    fake = FakeAllocator(monkeypatch, free=30_000, per_row=100)
    planner = RowPlanner(500, None, torch.device("cuda"))
    chunks = fake.run(planner)
    assert chunks[0] == (0, batching.PROBE_ROWS)
    assert chunks[1] == (8, 108)  # 30000 / 3 // 100 = 100 rows per pass
    assert planner.size == 100
    assert fake.run(planner)[:2] == [(0, 100), (100, 200)]  # the next iteration reuses the size, no probe


def test_cuda_probe_uses_the_reported_cost_when_an_earlier_peak_hides_it(monkeypatch):
    fake = FakeAllocator(monkeypatch, free=30_000, per_row=100, earlier_peak=10**9)
    planner = RowPlanner(500, None, torch.device("cuda"))
    it = iter(planner)
    assert next(it) == (0, 8)
    planner.measure(500.0)  # a pass reports 500 bytes per row
    assert next(it) == (8, 28)  # 10000 // 500 = 20 rows
    bounded = RowPlanner(500, None, torch.device("cuda"))
    assert fake.run(bounded)[1] == (8, 58)  # nothing reported: all the probe allocated, 200 bytes a row, bounds it


def test_cuda_probe_falls_back_to_a_fixed_size_without_any_measure(monkeypatch):
    fake = FakeAllocator(monkeypatch, free=30_000, per_row=100, earlier_peak=10**9, counts=False)
    assert fake.run(RowPlanner(500, None, torch.device("cuda")))[1] == (8, 8 + batching.FALLBACK_ROWS)


def test_cuda_cap(monkeypatch):
    fake = FakeAllocator(monkeypatch, free=10**12, per_row=1)
    assert fake.run(RowPlanner(10_000, None, torch.device("cuda")))[1] == (8, 8 + batching.MAX_ROWS)
