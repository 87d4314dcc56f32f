"""A small CNN that tells which photograph and which scale a 32x32 crop of the built-in ``photos`` comes from.

It gives the FID/KID of the colour teacher a feature space that works offline: its penultimate
64-d features (reported as "FID (photos classifier features)", never as Inception FID; Inception-v3
was trained on ImageNet at 299 px and its numbers would not be comparable to published FIDs anyway).

Labels are those the data set defines (:mod:`diffusers_gfprune.photos`): ``photo * 3 + scale_bin``,
21 classes. The weights live in ``diffusers_gfprune/assets/photos_classifier/`` (``model.safetensors``
and ``config.json``); ``training/train_photos_classifier.py`` made them and recorded its command,
the held-out accuracy and the training time in ``config.json``.

Input convention: ``(B, 3, 32, 32)`` float images in [-1, 1], as
:class:`diffusers_gfprune.photos.PhotosDataset` gives them; :func:`to_photos_classifier_input`
converts uint8 or [0, 1] images (and other sizes).
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from .photos import NUM_CLASSES

__all__ = [
    "PhotosClassifier",
    "ASSETS_DIR",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "load_photos_classifier",
    "to_photos_classifier_input",
]

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "photos_classifier")
"""Folder of the shipped classifier: ``model.safetensors`` and ``config.json``."""

from .classifier_files import CONFIG_NAME, WEIGHTS_NAME, load_classifier, to_model_range, unit_range_images  # noqa: E402

_ARCHITECTURE = "PhotosClassifier"
_CONFIG_KEYS = ("in_channels", "resolution", "num_classes", "channels", "feature_dim")


class PhotosClassifier(nn.Module):
    """A six-convolution CNN for 32x32 colour crops with a 64-d penultimate feature vector.

    Layout: three stages ``conv3x3(c) - ReLU - conv3x3(c) - ReLU - maxpool2`` (32 -> 16 -> 8 -> 4
    px), flatten, ``Linear(feature_dim) - ReLU`` (the features), dropout, ``Linear(num_classes)``.
    No batch normalisation, so train and eval mode differ only in the dropout.

    Parameters
    ----------
    in_channels : int, default 3
        Image channels.
    resolution : int, default 32
        Image side length; divisible by 8 (three 2x poolings).
    num_classes : int, default 21
        Number of logits (photograph x scale bin).
    channels : sequence of three ints, default (16, 32, 64)
        Channels of the three stages.
    feature_dim : int, default 64
        Size of the penultimate feature vector returned by :meth:`features`.
    dropout : float, default 0.2
        Dropout before the last layer (training only).
    """

    def __init__(
        self,
        in_channels: int = 3,
        resolution: int = 32,
        num_classes: int = NUM_CLASSES,
        channels: Sequence[int] = (16, 32, 64),
        feature_dim: int = 64,
        dropout: float = 0.2,
    ):
        super().__init__()
        if resolution % 8 != 0:
            raise ValueError(f"PhotosClassifier needs a resolution divisible by 8 (three 2x poolings), got {resolution}.")
        if len(channels) != 3:
            raise ValueError(f"PhotosClassifier has three convolution stages; give three channel counts, got {tuple(channels)}.")
        self.in_channels = int(in_channels)
        self.resolution = int(resolution)
        self.num_classes = int(num_classes)
        self.channels = tuple(int(c) for c in channels)
        self.feature_dim = int(feature_dim)
        layers, previous = [], self.in_channels
        for c in self.channels:
            layers += [nn.Conv2d(previous, c, 3, padding=1), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            previous = c
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(previous * (self.resolution // 8) ** 2, self.feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate feature vector (after ReLU), shape (B, feature_dim), of float images in [-1, 1]."""
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"PhotosClassifier expects images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}) in "
                f"[-1, 1], got {tuple(x.shape)}. Use to_photos_classifier_input() to convert uint8 or [0, 1] images."
            )
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for float images (B, 3, R, R) in [-1, 1]."""
        return self.head(self.dropout(self.features(x)))


def to_photos_classifier_input(images: torch.Tensor, resolution: int = 32) -> torch.Tensor:
    """Convert images to the classifier's input: float32 (B, 3, R, R) in [-1, 1].

    Parameters
    ----------
    images : torch.Tensor
        (B, 3, H, W): ``uint8`` in 0..255, or floating point in [0, 1] (the convention of
        :func:`diffusers_gfprune.sampling.sample_images`). Other sizes are resized (bilinear,
        antialiased). Grayscale images are refused: the classifier knows colour photographs.
    resolution : int, default 32
        The classifier's input size.
    """
    if torch.is_tensor(images) and images.dim() == 4 and images.shape[1] == 1:
        raise ValueError("The photos classifier takes colour images (B, 3, H, W); for 1-channel images use the digits "
                         "classifier (feature extractor 'digits-classifier').")
    return to_model_range(unit_range_images(images, (3,), "The photos classifier"), resolution)


def load_photos_classifier(
    path: Optional[Union[str, os.PathLike]] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> PhotosClassifier:
    """Load the shipped photos classifier (or one saved the same way), in eval mode without gradients.

    Parameters
    ----------
    path : str or os.PathLike, optional
        A folder holding ``model.safetensors`` and ``config.json``, or the ``.safetensors`` file
        itself (its folder must hold ``config.json``). Default: :data:`ASSETS_DIR`.
    device : str or torch.device, optional
        Where to put the model (default CPU).

    Raises
    ------
    FileNotFoundError
        When the weights or the config are missing, saying how to make them.
    ValueError
        When the files do not describe a :class:`PhotosClassifier` or are not safetensors.
    """
    how = (
        "Train it with `python training/train_photos_classifier.py` (writes both files into "
        f"{ASSETS_DIR}), or pass the folder of a classifier saved by that script."
    )
    return load_classifier(PhotosClassifier, path, ASSETS_DIR, _ARCHITECTURE, _CONFIG_KEYS, "photos classifier", how, device)
