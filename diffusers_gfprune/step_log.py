"""What a training loop records per step, without waiting for the device at every step.

Reading a loss back (``.item()``) makes the host wait until the GPU has finished the step, so the next step's
kernels are not queued in time. :class:`StepLog` keeps the per-step scalars on the device and reads them back, for
all buffered steps and all processes at once, when the loop needs the numbers (every ``logging_steps``, before a
checkpoint or a validation, at the end). :class:`PeakMemory` records the peak GPU memory of each phase of a run.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

import torch


class StepLog:
    """Per-step scalars kept on the device until :meth:`flush`.

    Parameters
    ----------
    gather : callable, optional
        ``accelerator.gather``: the flush averages each scalar over the processes (a collective, so every process
        must flush at the same steps). ``None``: this process's values.
    num_processes : int
        The number of processes ``gather`` concatenates.
    every : int
        :meth:`due` says to flush every ``every`` steps.
    """

    def __init__(self, gather: Optional[Callable] = None, num_processes: int = 1, every: int = 10):
        if every < 1:
            raise ValueError(f"every must be >= 1 (steps between read-backs), got {every}.")
        self.gather = gather
        self.num_processes = num_processes
        self.every = every
        self._pending: List[tuple] = []  # (host values, names, device scalars)

    def add(self, row: Dict[str, object], tensors: Dict[str, torch.Tensor]) -> None:
        """Buffer one step: ``row`` holds host values (step, phase, ...), ``tensors`` scalars on the device."""
        names = tuple(sorted(tensors))
        values = torch.stack([tensors[n].detach().float().reshape(()) for n in names]) if names else None
        self._pending.append((dict(row), names, values))

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def flush(self) -> List[Dict[str, object]]:
        """The buffered rows with their scalars as Python floats (averaged over processes); one read-back."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        rows = []
        start = 0
        while start < len(pending):  # runs of rows with the same scalar names (distillation terms come and go)
            names = pending[start][1]
            end = start
            while end < len(pending) and pending[end][1] == names:
                end += 1
            if names:
                stacked = torch.stack([p[2] for p in pending[start:end]])
                if self.gather is not None and self.num_processes > 1:
                    stacked = self.gather(stacked).view(self.num_processes, *stacked.shape).mean(0)
                values = stacked.tolist()
            else:
                values = [[] for _ in range(end - start)]
            for (row, _, _), numbers in zip(pending[start:end], values):
                rows.append({**row, **dict(zip(names, numbers))})
            start = end
        return rows


class PeakMemory:
    """Peak memory allocated on a CUDA device, per named phase (nothing is recorded on other devices).

    Each :meth:`phase` resets the device's peak counter on entry and keeps the largest peak seen over all the times
    the phase was entered.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda"
        self.peaks: Dict[str, int] = {}

    @contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peaks[name] = max(self.peaks.get(name, 0), peak)

    def as_dict(self, names) -> Dict[str, Optional[int]]:
        """Bytes per phase in ``names`` (``None`` where not measured: not a CUDA device, or the phase did not run)."""
        return {name: self.peaks.get(name) for name in names}
