"""Sampling from a UNet with fixed initial noise (pixel or latent), and image grids for people to look at."""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


@torch.no_grad()
def sample_images(
    unet,
    scheduler,
    noise: torch.Tensor,
    num_inference_steps: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    eta: float = 0.0,
    progress: bool = False,
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Run the reverse process from ``noise``; returns images in [0, 1], shape (B, C, H, W), on the CPU.

    Works with any diffusers scheduler (DDPM, DDIM, ...). Two models sampled from the same
    ``noise`` (and, for stochastic schedulers, a generator with the same seed) can be compared
    image by image.

    Parameters
    ----------
    unet : UNet2DModel
        The denoiser; ``noise`` has its input shape (for a latent pipeline, the latents').
    scheduler : diffusers.SchedulerMixin
        A copy is made from its config, so the caller's scheduler is never changed.
    noise : torch.Tensor
        The initial noise (B, C, h, w); scaled by the scheduler's ``init_noise_sigma``.
    num_inference_steps : int, optional
        Default: the scheduler's ``num_train_timesteps``.
    generator : torch.Generator, optional
        For the noise of stochastic schedulers.
    eta : float, default 0.0
        DDIM's eta (passed to schedulers whose ``step`` takes it).
    progress : bool, default False
        A progress bar over the steps.
    decode : callable, optional
        Maps the final samples to pixel images in [-1, 1] (a latent pipeline's autoencoder:
        :meth:`diffusers_gfprune.pipeline_kinds.PipelineKind.decode`); default: the samples are the images.
    """
    from tqdm.auto import tqdm

    scheduler = scheduler.__class__.from_config(scheduler.config)
    scheduler.set_timesteps(num_inference_steps or scheduler.config.num_train_timesteps)
    param = next(unet.parameters())
    image = noise.to(param.device, param.dtype) * scheduler.init_noise_sigma
    step_kwargs = {"generator": generator}
    if "eta" in scheduler.step.__code__.co_varnames:
        step_kwargs["eta"] = eta
    was_training = unet.training
    unet.eval()
    try:
        for t in tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False):
            model_input = scheduler.scale_model_input(image, t)
            output = unet(model_input, t).sample
            image = scheduler.step(output, t, image, **step_kwargs).prev_sample
    finally:
        unet.train(was_training)
    if decode is not None:
        image = decode(image)
    return (image.float() / 2 + 0.5).clamp(0, 1).cpu()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] (float) or uint8 -> uint8 on the CPU (a quarter of float32's memory)."""
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)


def to_pil(images: torch.Tensor) -> List[Image.Image]:
    """(B, C, H, W) in [0, 1] or uint8 -> PIL images (grayscale for one channel)."""
    array = to_uint8(images).permute(0, 2, 3, 1).numpy()
    if array.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in array]
    return [Image.fromarray(a) for a in array]


def make_grid(images: torch.Tensor, rows: Optional[int] = None, scale: int = 1, padding: int = 2) -> Image.Image:
    """One image holding ``images`` (B, C, H, W in [0, 1], or uint8) in a grid, each scaled up by ``scale``."""
    count = images.shape[0]
    rows = rows or int(math.floor(math.sqrt(count)))
    cols = math.ceil(count / rows)
    tiles = [t.convert("RGB").resize((t.width * scale, t.height * scale), Image.NEAREST) for t in to_pil(images)]
    w, h = tiles[0].size
    grid = Image.new("RGB", (cols * (w + padding) + padding, rows * (h + padding) + padding), "white")
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid.paste(tile, (padding + c * (w + padding), padding + r * (h + padding)))
    return grid


def comparison_grid(rows: Sequence[torch.Tensor], labels: Sequence[str], scale: int = 1) -> Image.Image:
    """Rows of images (e.g. teacher, pruned) sampled from the same noise, with a label per row."""
    grids = [make_grid(images, rows=1, scale=scale) for images in rows]
    label_width = 8 + 7 * max(len(label) for label in labels)
    width = max(g.width for g in grids) + label_width
    out = Image.new("RGB", (width, sum(g.height for g in grids)), "white")
    draw = ImageDraw.Draw(out)
    y = 0
    for grid, label in zip(grids, labels):
        draw.text((4, y + grid.height // 2 - 5), label, fill="black")
        out.paste(grid, (label_width, y))
        y += grid.height
    return out
