"""A small CNN that recognizes the built-in 16x16 digits, shipped with the package.

It serves two purposes in the evaluation (:mod:`diffusers_gfprune.evaluation`):

* its penultimate 64-d features are a feature space for a Frechet / kernel distance between
  generated and real digits (reported as "FID (digits classifier features)", never as Inception
  FID: Inception-v3 has never seen 16x16 grayscale digits and its numbers would not be comparable
  to published FIDs anyway);
* its softmax tells whether a DDPM draws recognizable digits at all (a real digits teacher should
  be recognized far above the chance level of 10%).

The weights live in ``diffusers_gfprune/assets/digits_classifier/`` (``model.safetensors`` and
``config.json``); ``training/train_digits_classifier.py`` made them, and its exact command, the
test accuracy and the training time are recorded in ``config.json``.

Input convention: ``(B, 1, 16, 16)`` float images in [-1, 1] (the digits' 0..16 pixel values
mapped linearly, upscaled bilinearly from 8x8, as :class:`diffusers_gfprune.data.DigitsDataset`
gives them).
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "DigitsClassifier",
    "ASSETS_DIR",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "load_digits_classifier",
    "to_classifier_input",
]

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "digits_classifier")
"""Folder of the shipped classifier: ``model.safetensors`` and ``config.json``."""

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

_ARCHITECTURE = "DigitsClassifier"
_CONFIG_KEYS = ("in_channels", "resolution", "num_classes", "channels", "feature_dim")


class DigitsClassifier(nn.Module):
    """A four-convolution CNN for 16x16 grayscale digits with a 64-d penultimate feature vector.

    Layout: ``conv3x3(c0) - ReLU - conv3x3(c0) - ReLU - maxpool2`` ->
    ``conv3x3(c1) - ReLU - conv3x3(c1) - ReLU - maxpool2`` -> flatten ->
    ``Linear(feature_dim) - ReLU`` (the features) -> dropout -> ``Linear(num_classes)``.
    No batch normalisation, so train and eval mode differ only in the dropout.

    Parameters
    ----------
    in_channels : int, default 1
        Image channels.
    resolution : int, default 16
        Image side length; must be divisible by 4 (two 2x poolings).
    num_classes : int, default 10
        Number of logits.
    channels : sequence of two ints, default (32, 64)
        Channels of the two convolution stages.
    feature_dim : int, default 64
        Size of the penultimate feature vector returned by :meth:`features`.
    dropout : float, default 0.2
        Dropout before the last layer (training only).
    """

    def __init__(
        self,
        in_channels: int = 1,
        resolution: int = 16,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64),
        feature_dim: int = 64,
        dropout: float = 0.2,
    ):
        super().__init__()
        if resolution % 4 != 0 or resolution < 4:
            raise ValueError(f"DigitsClassifier needs a resolution divisible by 4 (two 2x poolings), got {resolution}.")
        if len(channels) != 2:
            raise ValueError(f"DigitsClassifier has two convolution stages; give two channel counts, got {tuple(channels)}.")
        c0, c1 = (int(c) for c in channels)
        self.in_channels = int(in_channels)
        self.resolution = int(resolution)
        self.num_classes = int(num_classes)
        self.channels = (c0, c1)
        self.feature_dim = int(feature_dim)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, c0, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c0, c0, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c0, c1, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(c1 * (resolution // 4) ** 2, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def config(self) -> dict:
        """The constructor arguments that define the architecture (saved as ``config.json``)."""
        return {
            "architecture": _ARCHITECTURE,
            "in_channels": self.in_channels,
            "resolution": self.resolution,
            "num_classes": self.num_classes,
            "channels": list(self.channels),
            "feature_dim": self.feature_dim,
        }

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"DigitsClassifier expects images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}) in "
                f"[-1, 1], got {tuple(x.shape)}. Use to_classifier_input() to convert uint8 or [0, 1] images of "
                f"other sizes or 3 channels."
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate feature vector (after ReLU), shape (B, feature_dim).

        Parameters
        ----------
        x : torch.Tensor
            Float images (B, in_channels, resolution, resolution) in [-1, 1].
        """
        self._check_input(x)
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for float images (B, in_channels, resolution, resolution) in [-1, 1]."""
        return self.head(self.dropout(self.features(x)))


def to_classifier_input(images: torch.Tensor, resolution: int = 16) -> torch.Tensor:
    """Convert images to the classifier's input: float32 (B, 1, R, R) in [-1, 1].

    Parameters
    ----------
    images : torch.Tensor
        (B, C, H, W) with C = 1 or 3: ``uint8`` in 0..255, or floating point in [0, 1] (the
        convention of :func:`diffusers_gfprune.sampling.sample_images`). Three channels are
        averaged to gray; other sizes are resized (bilinear, antialiased).
    resolution : int, default 16
        The classifier's input size.

    Returns
    -------
    torch.Tensor
    """
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(
            f"Expected images as a tensor (B, C, H, W) with C = 1 or 3, got {shape}. Generated samples from "
            f"sample_images() already have this layout."
        )
    if images.dtype == torch.uint8:
        x = images.float() / 255.0
    elif images.is_floating_point():
        x = images.float()
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"Float images must be in [0, 1] (as sample_images returns them), got values in [{lo:.3g}, {hi:.3g}]. "
                f"Map images in [-1, 1] with (x + 1) / 2 first."
            )
        x = x.clamp(0.0, 1.0)
    else:
        raise ValueError(f"Images must be uint8 (0..255) or floating point in [0, 1], got dtype {images.dtype}.")
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x * 2.0 - 1.0


def load_digits_classifier(
    path: Optional[Union[str, os.PathLike]] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> DigitsClassifier:
    """Load the shipped digits classifier (or one saved the same way), in eval mode without gradients.

    Parameters
    ----------
    path : str or os.PathLike, optional
        A folder holding ``model.safetensors`` and ``config.json``, or the path of the
        ``.safetensors`` file itself (its folder must hold ``config.json``). Default: the shipped
        weights in :data:`ASSETS_DIR`.
    device : str or torch.device, optional
        Where to put the model (default CPU).

    Returns
    -------
    DigitsClassifier

    Raises
    ------
    FileNotFoundError
        When the weights or the config are missing, saying how to make them.
    ValueError
        When the config or the weights do not describe a :class:`DigitsClassifier`.
    """
    from safetensors.torch import load_file

    path = os.fspath(path) if path is not None else ASSETS_DIR
    if os.path.isdir(path):
        folder, weights = path, os.path.join(path, WEIGHTS_NAME)
    else:
        folder, weights = os.path.dirname(os.path.abspath(path)), path
    config_path = os.path.join(folder, CONFIG_NAME)
    how = (
        "Train it with `python training/train_digits_classifier.py` (writes both files into "
        f"{ASSETS_DIR}), or pass the folder of a classifier saved by that script."
    )
    if not os.path.exists(path):
        raise FileNotFoundError(f"Digits classifier path {path!r} does not exist. {how}")
    if not weights.endswith(".safetensors"):
        raise ValueError(f"The digits classifier is loaded from safetensors only; got {weights!r}. {how}")
    for needed in (weights, config_path):
        if not os.path.isfile(needed):
            raise FileNotFoundError(f"Digits classifier file {needed!r} does not exist. {how}")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("architecture") != _ARCHITECTURE or any(k not in config for k in _CONFIG_KEYS):
        raise ValueError(
            f"{config_path!r} does not describe a {_ARCHITECTURE} (needs 'architecture': {_ARCHITECTURE!r} and keys "
            f"{_CONFIG_KEYS}). {how}"
        )
    model = DigitsClassifier(**{k: config[k] for k in _CONFIG_KEYS})
    state_dict = load_file(weights)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"The weights in {weights!r} do not fit the architecture in {config_path!r}: {err}") from err
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    return model
