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

from .classifier_files import CONFIG_NAME, WEIGHTS_NAME, load_classifier, to_model_range, unit_range_images  # noqa: E402

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
    x = unit_range_images(images, (1, 3), "The digits classifier")
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    return to_model_range(x, resolution)


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
    how = (
        "Train it with `python training/train_digits_classifier.py` (writes both files into "
        f"{ASSETS_DIR}), or pass the folder of a classifier saved by that script."
    )
    return load_classifier(DigitsClassifier, path, ASSETS_DIR, _ARCHITECTURE, _CONFIG_KEYS, "digits classifier", how, device)
