"""Throughput of UNets: the cost of one sampling step, and two models timed in one process, interleaved.

:func:`measure_throughput` times UNet forward passes (one sampling step each);
:func:`compare_throughput` times two models in the same process, interleaved, and reports the speed
ratio with its spread; :func:`time_interleaved` does the same for any number of models.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["ThroughputResult", "ThroughputComparison", "measure_throughput", "compare_throughput", "time_interleaved"]


@dataclass(frozen=True)
class ThroughputResult:
    """Timing of UNet forward passes (one sampling step each) for one model.

    Attributes
    ----------
    step_latencies_s : tuple of float
        Per repeat: seconds per forward pass (batch of ``batch_size``), the mean over
        ``num_steps`` passes.
    step_latency_median_s, step_latency_q25_s, step_latency_q75_s, step_latency_min_s, step_latency_max_s : float
        Median, quartiles and extremes over the repeats.
    images_per_second : float
        Images fully sampled per second with ``num_steps`` steps, from the median step latency
        (UNet only: no scheduler, no decoding): ``batch_size / (num_steps * median)``.
    unet_images_per_second : float
        Images per second through ONE forward pass: ``batch_size / median``.
    """

    device: str
    batch_size: int
    num_steps: int
    warmup: int
    repeats: int
    step_latencies_s: Tuple[float, ...]
    step_latency_median_s: float
    step_latency_q25_s: float
    step_latency_q75_s: float
    step_latency_min_s: float
    step_latency_max_s: float
    images_per_second: float
    unet_images_per_second: float

    def as_dict(self) -> dict:
        out = asdict(self)
        out["step_latencies_s"] = list(self.step_latencies_s)
        return out


@dataclass(frozen=True)
class ThroughputComparison:
    """Speed of a pruned model relative to a dense one, timed interleaved in one process.

    Attributes
    ----------
    ratios : tuple of float
        Per repeat: dense step latency / pruned step latency (> 1: the pruned model is faster).
    ratio : float
        Median of ``ratios`` (the speed-up).
    ratio_q25, ratio_q75, ratio_min, ratio_max : float
        Spread of ``ratios``.
    ratio_of_medians : float
        ``dense.step_latency_median_s / pruned.step_latency_median_s``.
    dense, pruned : ThroughputResult
    """

    ratios: Tuple[float, ...]
    ratio: float
    ratio_q25: float
    ratio_q75: float
    ratio_min: float
    ratio_max: float
    ratio_of_medians: float
    dense: ThroughputResult
    pruned: ThroughputResult

    def as_dict(self) -> dict:
        out = asdict(self)
        out["ratios"] = list(self.ratios)
        out["dense"], out["pruned"] = self.dense.as_dict(), self.pruned.as_dict()
        return out


def _quantiles(values: Sequence[float]) -> Tuple[float, float, float, float, float]:
    """median, q25, q75, min, max (linear interpolation, as numpy's default)."""
    array = np.asarray(values, dtype=np.float64)
    q25, median, q75 = np.quantile(array, [0.25, 0.5, 0.75])
    return float(median), float(q25), float(q75), float(array.min()), float(array.max())


def _check_counts(batch_size, num_steps, warmup, repeats):
    for name, value, low in (("batch_size", batch_size, 1), ("num_steps", num_steps, 1), ("warmup", warmup, 0),
                             ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


class _Timer:
    """Times ``num_steps`` forward passes of one model on fixed inputs."""

    def __init__(self, unet, batch_size: int, num_steps: int, device, seed: int = 0):
        self.unet = unet
        param = next(unet.parameters())
        self.device = torch.device(device) if device is not None else param.device
        if param.device != self.device:
            unet.to(self.device)
        dtype = param.dtype
        config = unet.config
        size = config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        generator = torch.Generator().manual_seed(seed)
        self.sample = torch.randn((batch_size, config.in_channels, *size), generator=generator).to(self.device, dtype)
        # Timesteps spread over the schedule, as in sampling (the cost does not depend on them).
        self.timesteps = [torch.tensor(int(t), device=self.device)
                          for t in np.linspace(999, 0, num_steps).round().astype(np.int64)]
        self.num_steps = num_steps
        self.was_training = unet.training

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def run(self) -> float:
        """Seconds per forward pass, averaged over ``num_steps`` passes."""
        self._sync()
        start = time.perf_counter()
        for t in self.timesteps:
            self.unet(self.sample, t)
        self._sync()
        return (time.perf_counter() - start) / self.num_steps

    def __enter__(self):
        self.unet.eval()
        return self

    def __exit__(self, *exc):
        self.unet.train(self.was_training)


def _result(timer: _Timer, latencies, batch_size, num_steps, warmup, repeats) -> ThroughputResult:
    median, q25, q75, lo, hi = _quantiles(latencies)
    return ThroughputResult(
        device=str(timer.device),
        batch_size=batch_size,
        num_steps=num_steps,
        warmup=warmup,
        repeats=repeats,
        step_latencies_s=tuple(float(v) for v in latencies),
        step_latency_median_s=median,
        step_latency_q25_s=q25,
        step_latency_q75_s=q75,
        step_latency_min_s=lo,
        step_latency_max_s=hi,
        images_per_second=batch_size / (num_steps * median),
        unet_images_per_second=batch_size / median,
    )


def measure_throughput(
    unet,
    batch_size: int = 16,
    num_steps: int = 10,
    warmup: int = 2,
    repeats: int = 5,
    device: Optional[Union[str, torch.device]] = None,
) -> ThroughputResult:
    """Time UNet forward passes, the cost of one sampling step, under ``torch.no_grad`` in eval mode.

    Each repeat runs ``num_steps`` forward passes on a fixed random batch (timesteps spread over
    999..0) and records the mean seconds per pass; ``warmup`` untimed repeats come first. CUDA is
    synchronized around each repeat. The model's train/eval mode is restored afterwards.

    Parameters
    ----------
    unet : diffusers.UNet2DModel
        Called as ``unet(sample, t)``.
    batch_size : int, default 16
        Images per forward pass.
    num_steps : int, default 10
        Forward passes per repeat.
    warmup : int, default 2
        Untimed repeats before timing.
    repeats : int, default 5
        Timed repeats (the spread is over them).
    device : str or torch.device, optional
        Default: where the model is. A different device MOVES the model there (in place).

    Returns
    -------
    ThroughputResult
    """
    _check_counts(batch_size, num_steps, warmup, repeats)
    timer = _Timer(unet, batch_size, num_steps, device)
    with timer:
        for _ in range(warmup):
            timer.run()
        latencies = [timer.run() for _ in range(repeats)]
    return _result(timer, latencies, batch_size, num_steps, warmup, repeats)


def _run_interleaved(timers: Dict[str, "_Timer"], warmup: int, repeats: int, desc: Optional[str] = None) -> Dict[str, list]:
    """Seconds per step of every timer, one value per timed round; the order reverses every round so
    that drifts of the machine (other jobs, clocks, caches) hit all models alike."""
    names = list(timers)
    shapes = {tuple(t.sample.shape) for t in timers.values()}
    if len(shapes) > 1:
        raise ValueError(
            f"The models take different inputs ({' vs '.join(str(s) for s in sorted(shapes))}); compare models with the "
            "same in_channels and sample_size."
        )
    from tqdm.auto import tqdm

    latencies = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        for timer in timers.values():
            stack.enter_context(timer)
        with tqdm(total=(warmup + repeats) * len(names), desc=desc, leave=False, disable=desc is None) as bar:
            for r in range(warmup + repeats):
                for name in names if r % 2 == 0 else names[::-1]:
                    seconds = timers[name].run()
                    if r >= warmup:
                        latencies[name].append(seconds)
                    bar.update()
    return latencies


def time_interleaved(
    models: Mapping[str, torch.nn.Module],
    batch_size: int = 16,
    num_steps: int = 10,
    warmup: int = 2,
    repeats: int = 7,
    device: Optional[Union[str, torch.device]] = None,
    desc: Optional[str] = None,
) -> Dict[str, list]:
    """Seconds per forward pass of several models, timed round by round in this process.

    The N-model form of :func:`compare_throughput`: every round times ``num_steps`` passes of each
    model on its fixed batch, in an order that reverses every round; ``warmup`` untimed rounds first.

    Parameters
    ----------
    models : mapping of str to torch.nn.Module
        UNets (or modules called as ``model(sample, timestep)`` with a ``config``) with the same inputs.
    batch_size, num_steps, warmup, repeats : int
        As in :func:`measure_throughput`.
    device : str or torch.device, optional
        Default: each model where it is. A given device MOVES the models there (in place).
    desc : str, optional
        Label of a progress bar (none without it).

    Returns
    -------
    dict of str to list of float
        Per model, ``repeats`` seconds per forward pass, in round order (round ``i`` of every model
        was timed back to back, so per-round ratios cancel slow drifts).
    """
    _check_counts(batch_size, num_steps, warmup, repeats)
    return _run_interleaved({name: _Timer(m, batch_size, num_steps, device) for name, m in models.items()}, warmup, repeats, desc)


def compare_throughput(
    dense,
    pruned,
    batch_size: int = 16,
    num_steps: int = 10,
    warmup: int = 2,
    repeats: int = 7,
    device: Optional[Union[str, torch.device]] = None,
) -> ThroughputComparison:
    """Speed-up of ``pruned`` over ``dense``: both timed in this process, same batch, interleaved.

    Repeats alternate the order (dense-pruned, pruned-dense, ...) so that drifts of the machine
    (other jobs, clocks, caches) hit both models alike; each repeat gives one ratio
    ``dense latency / pruned latency``, and the result reports their median and spread.
    No threshold is applied: read the spread before calling a difference real.

    Parameters
    ----------
    dense, pruned : diffusers.UNet2DModel
        The models, with the same ``in_channels`` and ``sample_size``.
    batch_size, num_steps, warmup, repeats : int
        As in :func:`measure_throughput` (``warmup`` and ``repeats`` per model).
    device : str or torch.device, optional
        Default: each model where it is. A given device MOVES the models there (in place).

    Returns
    -------
    ThroughputComparison
    """
    _check_counts(batch_size, num_steps, warmup, repeats)
    timers = {"dense": _Timer(dense, batch_size, num_steps, device), "pruned": _Timer(pruned, batch_size, num_steps, device)}
    latencies = _run_interleaved(timers, warmup, repeats)
    dense_timer, pruned_timer = timers["dense"], timers["pruned"]
    dense_lat, pruned_lat = latencies["dense"], latencies["pruned"]
    ratios = [d / p for d, p in zip(dense_lat, pruned_lat)]
    median, q25, q75, lo, hi = _quantiles(ratios)
    dense_result = _result(dense_timer, dense_lat, batch_size, num_steps, warmup, repeats)
    pruned_result = _result(pruned_timer, pruned_lat, batch_size, num_steps, warmup, repeats)
    return ThroughputComparison(
        ratios=tuple(ratios),
        ratio=median,
        ratio_q25=q25,
        ratio_q75=q75,
        ratio_min=lo,
        ratio_max=hi,
        ratio_of_medians=dense_result.step_latency_median_s / pruned_result.step_latency_median_s,
        dense=dense_result,
        pruned=pruned_result,
    )
