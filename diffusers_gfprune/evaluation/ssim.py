"""SSIM against the teacher: a teacher and a pruned model sampled from the same noise, compared image by image.

:func:`paired_samples` samples both from the SAME initial noise with a DDIM scheduler (100 steps,
eta 0 by default); :func:`ssim_vs_teacher` averages torchmetrics' SSIM over the pairs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["ssim_vs_teacher", "paired_samples"]

def _as_unit_float(images, what: str) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ValueError(f"{what} must be a tensor (B, C, H, W), got {getattr(images, 'shape', type(images).__name__)}.")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images.double() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"{what} must be uint8 or floating point in [0, 1], got dtype {images.dtype}.")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"{what} has values in [{lo:.3g}, {hi:.3g}]; SSIM here uses data_range=1, so images must be in [0, 1] "
            f"(as sample_images returns them). Map [-1, 1] images with (x + 1) / 2."
        )
    return images.double().clamp(0.0, 1.0)


def ssim_vs_teacher(teacher_images, pruned_images, kernel_size: int = 11, per_image: bool = False):
    """Mean SSIM between teacher and pruned samples drawn from the same noise.

    Uses torchmetrics' ``StructuralSimilarityIndexMeasure(data_range=1.0)`` (Gaussian window,
    sigma 1.5), computed per image pair in float64 and averaged over the pairs.

    Parameters
    ----------
    teacher_images, pruned_images : torch.Tensor
        (B, C, H, W) in [0, 1] (or uint8), paired image by image (see :func:`paired_samples`).
    kernel_size : int, default 11
        Side of the Gaussian window; images must be at least this large.
    per_image : bool, default False
        Also return the per-pair values.

    Returns
    -------
    float, or (float, torch.Tensor) with ``per_image=True``
        The mean SSIM (1 for identical images).
    """
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    teacher = _as_unit_float(teacher_images, "teacher_images")
    pruned = _as_unit_float(pruned_images, "pruned_images")
    if teacher.shape != pruned.shape:
        raise ValueError(
            f"teacher_images {tuple(teacher.shape)} and pruned_images {tuple(pruned.shape)} must have the same shape: "
            f"SSIM compares pairs sampled from the same noise (use paired_samples)."
        )
    if min(teacher.shape[-2:]) < kernel_size:
        raise ValueError(
            f"Images of {teacher.shape[-2]}x{teacher.shape[-1]} are smaller than the SSIM window ({kernel_size}); "
            f"pass a smaller odd kernel_size (e.g. 7)."
        )
    metric = StructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=kernel_size, reduction="none")
    values = metric(pruned, teacher).reshape(-1).float()
    mean = float(values.double().mean())
    return (mean, values) if per_image else mean


@torch.no_grad()
def paired_samples(
    teacher_unet,
    pruned_unet,
    scheduler,
    num_images: int,
    num_inference_steps: int = 100,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    kind=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample a teacher and a pruned UNet from the same initial noise with DDIM.

    The DDIM scheduler is made from ``scheduler.config`` (so a DDPM teacher's betas are kept). The
    noise is drawn at once for all images from ``torch.Generator().manual_seed(seed)``, so the
    images do not depend on ``batch_size`` (with ``eta > 0`` the per-step noise comes from a
    generator seeded per batch, the same for both models; then they do).

    Parameters
    ----------
    teacher_unet, pruned_unet : diffusers.UNet2DModel
        The models (each sampled on its own device).
    scheduler : diffusers.SchedulerMixin
        The teacher's scheduler (any; only its config is used).
    num_images : int
        Pairs to draw.
    num_inference_steps : int, default 100
        DDIM steps.
    eta : float, default 0.0
        DDIM eta (0: deterministic).
    seed : int, default 0
        Seed of the initial noise.
    batch_size : int, default 64
        Images per sampling batch.
    kind : diffusers_gfprune.pipeline_kinds.PipelineKind, optional
        The teacher's pipeline kind, with its components loaded; it decodes the samples (a latent pipeline's
        autoencoder). Default: pixel samples.

    Returns
    -------
    teacher_images, pruned_images : torch.Tensor
        (num_images, C, H, W) in [0, 1] on the CPU, pair i sampled from the same noise.
    """
    from diffusers import DDIMScheduler

    from ..sampling import sample_images

    sample = kind.sample if kind is not None else sample_images
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be positive, got {num_images} and {batch_size}.")
    shapes = []
    for name, unet in (("teacher_unet", teacher_unet), ("pruned_unet", pruned_unet)):
        config = unet.config
        size = config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shapes.append((config.in_channels, config.out_channels, *size))
    if shapes[0] != shapes[1]:
        raise ValueError(
            f"teacher and pruned UNets disagree on (in_channels, out_channels, height, width): {shapes[0]} vs "
            f"{shapes[1]}; structured pruning keeps the image interface, so these should be the same model family."
        )
    ddim = DDIMScheduler.from_config(scheduler.config)
    noise = torch.randn((num_images, shapes[0][0], *shapes[0][2:]), generator=torch.Generator().manual_seed(seed))
    teacher_out, pruned_out = [], []
    for index, start in enumerate(range(0, num_images, batch_size)):
        batch = noise[start:start + batch_size]
        for unet, out in ((teacher_unet, teacher_out), (pruned_unet, pruned_out)):
            generator = torch.Generator().manual_seed(seed + 1_000_003 * (index + 1)) if eta > 0 else None
            out.append(sample(unet, ddim, batch, num_inference_steps, generator=generator, eta=eta))
    return torch.cat(teacher_out), torch.cat(pruned_out)
