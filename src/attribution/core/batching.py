"""Internal batching: how many rows (integration steps, noise samples, occluded copies) go through one pass.

``batch_size`` given by the user caps the rows per pass.  Left at ``None``, the cap is chosen so that peak memory
stays bounded without tuning: on a CPU a fixed number of rows (throughput on a CPU barely grows past it); on a
CUDA device the first pass runs a small probe batch, its measured peak memory per row sets the size of the rest
so that one pass uses at most about a third of the memory that is free (never more than ``MAX_ROWS`` rows).
The probe's cost per row is the larger of what the pass reports through :meth:`RowPlanner.measure` and the rise
of the device's peak memory (read, never reset: the user's own peak statistics stay as they were).  When an earlier
peak hides the probe's and the pass reports nothing, all the bytes the probe allocated bound its cost from above
(a smaller, safe size; ``FALLBACK_ROWS`` only when the allocator keeps no such count).
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Iterator, Optional

import torch

CPU_ROWS = 16
PROBE_ROWS = 8
MAX_ROWS = 256
MEMORY_FRACTION = 1 / 3
FALLBACK_ROWS = 64


def check_batch_size(batch_size: Optional[int]) -> None:
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")


class RowPlanner:
    """Splits ``total`` rows into consecutive ``(start, stop)`` chunks; see the module docstring for sizes."""

    def __init__(self, total: int, batch_size: Optional[int], device: torch.device) -> None:
        check_batch_size(batch_size)
        self.total = total
        self.device = device
        self.fixed = None if batch_size is None else int(batch_size)
        self.adaptive = batch_size is None and device.type == "cuda"
        self.measured_per_row: Optional[float] = None
        self.size: Optional[int] = self.fixed  # rows per pass, known after the first full iteration

    def measure(self, bytes_per_row: float) -> None:
        """Let a pass report the memory one row holds (e.g. the activations a forward keeps for backward)."""
        self.measured_per_row = max(self.measured_per_row or 0.0, bytes_per_row)

    @contextlib.contextmanager
    def recording(self, rows: torch.Tensor) -> Iterator[None]:
        """Around a forward whose graph is kept for a backward: on the first pass of an adaptive plan, reports the
        memory per row the forward keeps (the allocation's rise, doubled for the backward's own buffers)."""
        measure = self.adaptive and self.measured_per_row is None
        before = torch.cuda.memory_allocated(rows.device) if measure else 0
        yield
        if measure:
            self.measure(2.0 * (torch.cuda.memory_allocated(rows.device) - before) / rows.shape[0])

    def _rows_that_fit(self, per_row: float) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return int(max(1, min(MAX_ROWS, free * MEMORY_FRACTION // max(per_row, 1.0))))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Chunks of all ``total`` rows; iterating again (e.g. once per Guided IG step) reuses the size found."""
        start = 0
        size = self.size
        if size is None and not self.adaptive:
            size = CPU_ROWS
        if size is None:
            size = min(PROBE_ROWS, self.total)
            if size < self.total:
                allocated = torch.cuda.memory_allocated(self.device)
                peak_before = torch.cuda.max_memory_allocated(self.device)
                total_before = _bytes_allocated_so_far(self.device)
                yield 0, size
                start = size
                peak = torch.cuda.max_memory_allocated(self.device)
                estimates = [self.measured_per_row] if self.measured_per_row else []
                if peak > peak_before:  # the probe set a new peak, so the peak measures it
                    estimates.append((peak - allocated) / size)
                elif not estimates:  # an earlier peak hides the probe's: bound it by all it allocated
                    allocated_in_probe = _bytes_allocated_so_far(self.device) - total_before
                    if allocated_in_probe > 0:
                        estimates.append(allocated_in_probe / size)
                size = self._rows_that_fit(max(estimates)) if estimates else FALLBACK_ROWS
                self.size = size
        while start < self.total:
            stop = min(start + size, self.total)
            yield start, stop
            start = stop


def _bytes_allocated_so_far(device: torch.device) -> int:
    """The device's running total of bytes ever allocated (CUDA's cumulative ``allocated_bytes.all.allocated``):
    what a pass allocates in all is an upper bound of the peak it adds, whatever peak came before."""
    return int(torch.cuda.memory_stats(device).get("allocated_bytes.all.allocated", 0))
