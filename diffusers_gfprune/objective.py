"""The DDPM training objective, as a loss on a fixed draw of noise and timesteps.

Criteria need the *same* loss several times (finite differences evaluate it at two points, the
distributed check splits one global batch across processes), so a :class:`DDPMLoss` draws its noise
and timesteps once, when it is made, and can be called again and again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclass
class DDPMLoss:
    """``|| target - model(x_t, t) ||^2`` for one fixed mini-batch, noise and timesteps.

    Parameters
    ----------
    images : torch.Tensor
        Clean images ``x_0`` in [-1, 1], shape (batch, channels, height, width).
    noise : torch.Tensor
        The noise ``epsilon``, same shape.
    timesteps : torch.Tensor
        One integer timestep per image.
    scheduler : DDPMScheduler
        Gives ``alphas_cumprod`` (through ``add_noise`` and ``get_velocity``).
    prediction_type : str
        ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
    chunk_size : int, optional
        Criteria that differentiate this loss do it at most ``chunk_size`` images at a time and sum the pieces
        (:meth:`chunks`), so that their memory is bounded by this number, not by the mini-batch (a double backward
        holds several times the activations of a training step). ``None``: the whole mini-batch at once.
    """

    images: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    scheduler: object
    prediction_type: str = "epsilon"
    chunk_size: Optional[int] = None

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"Unknown prediction_type {self.prediction_type!r}; choose one of {PREDICTION_TYPES}.")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be None or >= 1, got {self.chunk_size}.")

    def __call__(self, model) -> torch.Tensor:
        output = model(self.noisy(), self.timesteps).sample
        return F.mse_loss(output.float(), self.target().float())

    def noisy(self) -> torch.Tensor:
        """The model's input ``x_t``."""
        return self.scheduler.add_noise(self.images, self.noise, self.timesteps)

    def target(self) -> torch.Tensor:
        """What the model should predict for :meth:`noisy` (by ``prediction_type``)."""
        if self.prediction_type == "epsilon":
            return self.noise
        if self.prediction_type == "sample":
            return self.images
        return self.scheduler.get_velocity(self.images, self.noise, self.timesteps)

    def subset(self, index) -> "DDPMLoss":
        """The same loss on the images selected by ``index`` (a slice or index tensor)."""
        return DDPMLoss(self.images[index], self.noise[index], self.timesteps[index], self.scheduler, self.prediction_type,
                        self.chunk_size)

    def with_timesteps(self, timesteps: torch.Tensor) -> "DDPMLoss":
        """The same images and noise at other timesteps."""
        return DDPMLoss(self.images, self.noise, timesteps, self.scheduler, self.prediction_type, self.chunk_size)

    def chunks(self):
        """``[(weight, loss)]`` whose weighted sum is this loss, each on at most ``chunk_size`` images.

        The loss is a mean over images of equal size, so the weights are the chunks' shares of the batch and any
        gradient (or Hessian-vector product) of the whole is the weighted sum of the chunks' ones.
        """
        size = self.images.shape[0]
        if self.chunk_size is None or size <= self.chunk_size:
            return [(1.0, self)]
        return [(min(self.chunk_size, size - start) / size, self.subset(slice(start, start + self.chunk_size)))
                for start in range(0, size, self.chunk_size)]

    def split(self, parts: int, index: int) -> "DDPMLoss":
        """The ``index``-th of ``parts`` equal slices of the batch (for data-parallel scoring)."""
        size = self.images.shape[0]
        if size % parts:
            raise ValueError(f"A batch of {size} cannot be split into {parts} equal parts.")
        step = size // parts
        return self.subset(slice(index * step, (index + 1) * step))


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    generator: Optional[torch.Generator] = None,
    low: int = 0,
    high: Optional[int] = None,
    device=None,
) -> torch.Tensor:
    """Uniform integer timesteps in ``[low, high)`` (default: all training timesteps)."""
    high = num_train_timesteps if high is None else high
    if not 0 <= low < high <= num_train_timesteps:
        raise ValueError(f"Timestep range [{low}, {high}) must lie inside [0, {num_train_timesteps}).")
    return torch.randint(low, high, (batch_size,), generator=generator, device="cpu").to(device or "cpu")


def stratified_timesteps(
    batch_size: int, num_train_timesteps: int, generator: Optional[torch.Generator] = None, device=None
) -> torch.Tensor:
    """One timestep in each of ``batch_size`` equal strata of ``[0, T)``, at a random offset shared by all strata.

    A batch then covers the whole noise range evenly instead of by chance, which removes the
    timestep draw from the variance of a loss or gradient estimate (the per-timestep losses of a
    DDPM differ by orders of magnitude). A batch larger than ``T`` (a global scoring batch of 128 on 8 GPUs)
    takes every timestep ``floor(B / T)`` or ``ceil(B / T)`` times.
    """
    if batch_size < 1 or num_train_timesteps < 1:
        raise ValueError(f"Stratified timesteps need a batch size >= 1 and T >= 1, got {batch_size} and {num_train_timesteps}.")
    offset = float(torch.rand((), generator=generator))
    if batch_size > num_train_timesteps:
        # Strata narrower than one timestep: image i takes floor(i T / B), every timestep as evenly often as B allows.
        return torch.div(torch.arange(batch_size) * num_train_timesteps, batch_size, rounding_mode="floor").to(device or "cpu")
    # Integer stratum boundaries floor(i T / B): every timestep lies inside its own stratum.
    bounds = torch.div(torch.arange(batch_size + 1) * num_train_timesteps, batch_size, rounding_mode="floor")
    widths = bounds[1:] - bounds[:-1]
    return (bounds[:-1] + (offset * widths).long()).to(device or "cpu")


def make_loss(
    images: torch.Tensor,
    scheduler,
    generator: Optional[torch.Generator] = None,
    prediction_type: Optional[str] = None,
    timestep_range=(0, None),
) -> DDPMLoss:
    """A :class:`DDPMLoss` with fresh noise and uniform timesteps drawn from ``generator``."""
    num = scheduler.config.num_train_timesteps
    prediction_type = prediction_type or scheduler.config.prediction_type
    noise = torch.randn(images.shape, generator=generator, device="cpu").to(images.device, images.dtype)
    timesteps = sample_timesteps(images.shape[0], num, generator, timestep_range[0], timestep_range[1], images.device)
    return DDPMLoss(images, noise, timesteps, scheduler, prediction_type)
