"""Digit recognition: what the shipped digits classifier sees in generated images.

:func:`digits_accuracy` gives the predicted-label distribution, the mean confidence and the fraction
recognized with confidence > 0.9: whether a digits model draws recognizable digits at all.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch

from ..digits_classifier import load_digits_classifier, to_classifier_input

__all__ = ["digits_accuracy"]


@functools.lru_cache(maxsize=1)
def _shipped_classifier():
    return load_digits_classifier()


@torch.no_grad()
def digits_accuracy(
    images,
    labels: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    threshold: float = 0.9,
    classifier=None,
    batch_size: int = 512,
) -> dict:
    """What the shipped digits classifier sees in (generated) images.

    A real digits model should give a "recognized" fraction far above what noise gets and a
    label distribution near uniform (about 10% each); chance level for the labels is 10%.
    The classifier was trained to be unsure on noise and flat images (outlier exposure), but
    "recognized" is a heuristic, not a proof that an image is a good digit.

    Parameters
    ----------
    images : torch.Tensor
        (B, C, H, W), float in [0, 1] (``sample_images`` output) or uint8; 3 channels are averaged
        and other sizes resized to 16x16.
    labels : tensor or sequence of int, optional
        True labels; adds ``accuracy``.
    threshold : float, default 0.9
        A prediction with max probability above it counts as recognized.
    classifier : DigitsClassifier, optional
        Default: the shipped one (:func:`~diffusers_gfprune.digits_classifier.load_digits_classifier`).
    batch_size : int, default 512
        Images per forward pass.

    Returns
    -------
    dict
        ``num_images``; ``label_distribution`` (fraction predicted as each digit 0..9) and
        ``label_counts``; ``mean_confidence`` (mean max probability); ``recognized_fraction``
        (max probability > ``threshold``) and ``threshold``; ``label_entropy_bits`` of the
        predicted-label distribution (log2(10) = 3.32 for a uniform one); ``accuracy`` when
        ``labels`` are given.
    """
    classifier = classifier if classifier is not None else _shipped_classifier()
    if torch.is_tensor(images) and images.is_floating_point():
        images = images.detach().cpu()
    x = to_classifier_input(images if torch.is_tensor(images) else torch.as_tensor(images), classifier.resolution)
    device = next(classifier.parameters()).device
    probs = torch.cat([
        torch.softmax(classifier(x[i:i + batch_size].to(device)).float(), dim=1).cpu()
        for i in range(0, x.shape[0], batch_size)
    ])
    confidence, predicted = probs.max(dim=1)
    counts = torch.bincount(predicted, minlength=classifier.num_classes)
    distribution = counts.double() / counts.sum()
    nonzero = distribution[distribution > 0]
    out = {
        "num_images": int(x.shape[0]),
        "label_distribution": [float(v) for v in distribution],
        "label_counts": [int(v) for v in counts],
        "mean_confidence": float(confidence.double().mean()),
        "recognized_fraction": float((confidence > threshold).double().mean()),
        "threshold": float(threshold),
        "label_entropy_bits": float(-(nonzero * nonzero.log2()).sum()),
    }
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1).cpu()
        if labels.shape[0] != x.shape[0]:
            raise ValueError(f"Got {labels.shape[0]} labels for {x.shape[0]} images.")
        out["accuracy"] = float((predicted == labels).double().mean())
    return out
