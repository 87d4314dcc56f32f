"""What the shipped FID classifiers (digits, photos) share: their image input and their files on disk.

Each classifier is a small ``nn.Module`` saved as ``model.safetensors`` plus a ``config.json`` naming its
architecture and constructor arguments; it takes images in [-1, 1] at a fixed resolution.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Union

import torch
from torch.nn import functional as F

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def unit_range_images(images: torch.Tensor, channels: Sequence[int], what: str) -> torch.Tensor:
    """``images`` (B, C, H, W) as float32 in [0, 1]: ``uint8`` 0..255 or float in [0, 1], C in ``channels``."""
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] not in tuple(channels):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{what} takes images as a tensor (B, C, H, W) with C in {tuple(channels)}, got {shape}. "
                         "Generated samples from sample_images() already have this layout.")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"Images must be uint8 (0..255) or floating point in [0, 1], got dtype {images.dtype}.")
    x = images.float()
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"Float images must be in [0, 1] (as sample_images returns them), got values in [{lo:.3g}, "
                         f"{hi:.3g}]. Map images in [-1, 1] with (x + 1) / 2 first.")
    return x.clamp(0.0, 1.0)


def to_model_range(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Images in [0, 1] resized (bilinear, antialiased) to ``resolution`` and mapped to [-1, 1]."""
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x * 2.0 - 1.0


def load_classifier(cls, path: Optional[Union[str, os.PathLike]], assets_dir: str, architecture: str,
                    config_keys: Sequence[str], what: str, how: str, device=None):
    """A classifier saved as safetensors + config.json, in eval mode without gradients.

    ``path`` is a folder holding both files or the ``.safetensors`` file itself (default: ``assets_dir``);
    ``what`` names the classifier in errors and ``how`` says how to make the files.
    """
    from safetensors.torch import load_file

    path = os.fspath(path) if path is not None else assets_dir
    if os.path.isdir(path):
        folder, weights = path, os.path.join(path, WEIGHTS_NAME)
    else:
        folder, weights = os.path.dirname(os.path.abspath(path)), path
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} path {path!r} does not exist. {how}")
    if not weights.endswith(".safetensors"):
        raise ValueError(f"The {what} is loaded from safetensors only; got {weights!r}. {how}")
    for needed in (weights, config_path):
        if not os.path.isfile(needed):
            raise FileNotFoundError(f"{what} file {needed!r} does not exist. {how}")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("architecture") != architecture or any(k not in config for k in config_keys):
        raise ValueError(f"{config_path!r} does not describe a {architecture} (needs 'architecture': {architecture!r} and "
                         f"keys {tuple(config_keys)}). {how}")
    model = cls(**{k: config[k] for k in config_keys})
    try:
        model.load_state_dict(load_file(weights), strict=True)
    except RuntimeError as err:
        raise ValueError(f"The weights in {weights!r} do not fit the architecture in {config_path!r}: {err}") from err
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    return model
