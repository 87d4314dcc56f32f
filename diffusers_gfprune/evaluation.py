"""Evaluation of dense and pruned DDPMs: FID/KID, SSIM against the teacher, digit recognition, throughput.

Small functions, each computing one thing honestly; where a number cannot be computed here (for
instance Inception FID without the Inception weights, offline) they raise an error that says why
and how to get it, rather than returning a stand-in.

FID and KID
    :func:`compute_fid_kid` wraps ``torch_fidelity.calculate_metrics(fid=True, kid=True)`` in one
    of two feature spaces:

    * ``"digits-classifier"``: the 64-d penultimate features of the small CNN shipped with the
      package (:mod:`diffusers_gfprune.digits_classifier`), meant for the built-in 16x16 digits.
      Works offline. Its numbers are reported under their own keys (``fid_digits_classifier``,
      ``kid_digits_classifier_mean``; display names in :data:`METRIC_DISPLAY_NAMES`) and are NOT
      Inception FIDs: they are comparable only with each other (same classifier weights, same
      reference set, similar sample counts).
    * ``"inception-v3-compat"``: torch-fidelity's Inception-v3 (2048-d pool features), the usual
      FID of the literature. Needs torch-fidelity's weights file: from ``inception_weights``, from
      the torch hub cache, or downloaded by torch-fidelity. Offline without a cached file it
      raises :class:`InceptionWeightsUnavailableError` at once (no network wait). Grayscale images
      are repeated to three channels.

    Features and FID statistics of a reference set are cached on disk by torch-fidelity
    (``cache_root``), under a name made of the data set, split, resolution, image count, a hash of
    the images and the feature extractor (with a hash of its weights); see :func:`digits_reference`.

SSIM against the teacher
    :func:`paired_samples` samples a teacher and a pruned model from the SAME initial noise with a
    DDIM scheduler (100 steps, eta 0 by default); :func:`ssim_vs_teacher` averages torchmetrics'
    SSIM over the pairs.

Digit recognition
    :func:`digits_accuracy` runs the shipped classifier on generated images: predicted-label
    distribution, mean confidence, fraction recognized with confidence > 0.9.

A pruned model against its teacher
    :func:`evaluate_against_teacher` puts these together for the prune script and the model card:
    SSIM to the teacher, and FID/KID of both models under one protocol, with what could not be
    computed listed with its reason.

Throughput
    :func:`measure_throughput` times UNet forward passes (the cost of one sampling step);
    :func:`compare_throughput` times two models in the same process, interleaved, and reports
    the speed ratio with its spread.

The digits feature extractor is registered with torch-fidelity only when FID/KID is computed
(:func:`register_digits_feature_extractor`, idempotent); importing this module neither imports nor
changes torch-fidelity.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .digits_classifier import ASSETS_DIR, WEIGHTS_NAME, load_digits_classifier, to_classifier_input

__all__ = [
    "METRIC_DISPLAY_NAMES",
    "DIGITS_FEATURE_EXTRACTOR",
    "INCEPTION_FEATURE_EXTRACTOR",
    "InceptionWeightsUnavailableError",
    "ReferenceSet",
    "digits_reference",
    "register_digits_feature_extractor",
    "compute_fid_kid",
    "ssim_vs_teacher",
    "paired_samples",
    "digits_accuracy",
    "ThroughputResult",
    "ThroughputComparison",
    "measure_throughput",
    "compare_throughput",
    "time_interleaved",
    "FID_CHOICES",
    "Metric",
    "TeacherComparison",
    "evaluate_against_teacher",
    "real_images",
    "digits_fid_kid",
    "validation_fid",
]

DIGITS_FEATURE_EXTRACTOR = "digits-classifier"
"""torch-fidelity name of the shipped digits classifier's feature extractor."""

INCEPTION_FEATURE_EXTRACTOR = "inception-v3-compat"
"""torch-fidelity's own Inception-v3 (the standard FID feature extractor)."""

# feature extractor -> (key prefix of the metrics, feature layer used for FID and KID)
_EXTRACTORS = {
    DIGITS_FEATURE_EXTRACTOR: ("digits_classifier", "features"),
    INCEPTION_FEATURE_EXTRACTOR: ("inception", "2048"),
}

METRIC_DISPLAY_NAMES: Dict[str, str] = {
    "fid_digits_classifier": "FID (digits classifier features)",
    "kid_digits_classifier_mean": "KID (digits classifier features)",
    "kid_digits_classifier_std": "KID std over subsets (digits classifier features)",
    "fid_inception": "FID (Inception-v3, torch-fidelity)",
    "kid_inception_mean": "KID (Inception-v3, torch-fidelity)",
    "kid_inception_std": "KID std over subsets (Inception-v3, torch-fidelity)",
    "ssim_vs_teacher": "SSIM vs teacher (same initial noise)",
}
"""How to label each metric key in tables and plots. Digits-classifier numbers are never Inception FIDs."""

_OFFLINE_VARS = ("DIFFUSERS_GFPRUNE_OFFLINE", "HF_HUB_OFFLINE")
_TRUE = {"1", "on", "yes", "true"}


class InceptionWeightsUnavailableError(RuntimeError):
    """Inception FID/KID cannot be computed: torch-fidelity's Inception-v3 weights are not available."""


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _to_uint8(images, what: str) -> torch.Tensor:
    """(N, C, H, W) uint8 0..255 or float [0, 1] (tensor or numpy) -> contiguous uint8 CPU tensor."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(
            f"{what} must be images (N, C, H, W) with C = 1 or 3 (a tensor or numpy array), got {shape}. "
            f"Stack generated samples with torch.cat; for a folder of image files pass its path as a str."
        )
    if images.shape[0] < 2:
        raise ValueError(f"{what} holds {images.shape[0]} image(s); FID and KID need at least 2 (far more in practice).")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images.contiguous()
    if not images.is_floating_point():
        raise ValueError(f"{what} must be uint8 (0..255) or floating point in [0, 1], got dtype {images.dtype}.")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"{what} are floats in [{lo:.3g}, {hi:.3g}], but float images must be in [0, 1] (as sample_images "
            f"returns them). Map model outputs in [-1, 1] with (x + 1) / 2 first."
        )
    return (images.float() * 255.0).round().clamp(0, 255).to(torch.uint8).contiguous()


def _images_hash(images: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.numpy().tobytes())
    return digest.hexdigest()[:10]


class _UInt8Images(Dataset):
    """Items are uint8 (C, H, W) tensors, as torch-fidelity expects from a Dataset input."""

    def __init__(self, images: torch.Tensor, channels: Optional[int] = None):
        self.images = images
        self.channels = channels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        if self.channels == 3 and image.shape[0] == 1:
            image = image.expand(3, -1, -1).contiguous()
        return image


@dataclass(frozen=True)
class ReferenceSet:
    """Real images to compare generated ones with, and the name their cached statistics go under.

    Attributes
    ----------
    images : torch.Tensor
        uint8 (N, C, H, W).
    name : str
        Describes the data (data set, split, resolution, count), e.g. ``"digits-test-r16-n297"``.
        :func:`compute_fid_kid` adds a hash of the images and the feature extractor to it to form
        the torch-fidelity cache name, so two different image sets never share cached statistics.
    """

    images: torch.Tensor
    name: str

    def __post_init__(self):
        object.__setattr__(self, "images", _to_uint8(self.images, "ReferenceSet.images"))
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ValueError(f"ReferenceSet.name must be a non-empty file-name-safe string, got {self.name!r}.")

    def __len__(self) -> int:
        return self.images.shape[0]


def digits_reference(split: str = "test", resolution: int = 16, max_samples: Optional[int] = None) -> ReferenceSet:
    """The built-in digits of one split as a :class:`ReferenceSet` (uint8, 1 channel).

    The images are exactly what a DDPM trained with ``DataConfig(dataset_name="digits",
    resolution=resolution)`` learns from (:class:`diffusers_gfprune.data.DigitsDataset`), mapped
    from [-1, 1] to 0..255.

    Parameters
    ----------
    split : str, default "test"
        ``"train"`` (1500 images), ``"test"`` (297, held out) or ``"all"``.
    resolution : int, default 16
        Image side length (the model's ``sample_size``).
    max_samples : int, optional
        Keep only the first N images.

    Returns
    -------
    ReferenceSet
        Named ``"digits-{split}-r{resolution}-n{N}"``.
    """
    from .data import DigitsDataset

    dataset = DigitsDataset(split=split, resolution=resolution, max_samples=max_samples)
    images = torch.stack([dataset[i]["images"] for i in range(len(dataset))])
    images = ((images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return ReferenceSet(images, f"digits-{split}-r{resolution}-n{len(dataset)}")


# --------------------------------------------------------------------------------------------
# torch-fidelity feature extractors
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_extractor_class():
    """Build the torch-fidelity feature extractor class (imports torch-fidelity only when needed)."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.helpers import vassert

    class DigitsClassifierFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity feature extractor from the shipped digits classifier.

        Features: ``"features"`` (64-d penultimate, used for FID/KID/PRC) and ``"logits"`` (10-d,
        used for the Inception-Score analogue). Takes uint8 (B, C, H, W) images with C = 1 or 3
        (averaged to gray), resized to 16x16 if needed. ``feature_extractor_weights_path`` may name
        another classifier folder or ``.safetensors`` file saved by the training script.
        """

        _diffusers_gfprune_digits = True

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            self.classifier = load_digits_classifier(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return "features", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 1, 16, 16, dtype=torch.uint8)

        def forward(self, x):
            vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
            vassert(x.dim() == 4 and x.shape[1] in (1, 3), f"Input is not Bx1xHxW or Bx3xHxW: {tuple(x.shape)}")
            features = self.classifier.features(to_classifier_input(x, self.classifier.resolution))
            out = {"features": features}
            if "logits" in self.features_list:
                out["logits"] = self.classifier.head(features)
            return tuple(out[name].float() for name in self.features_list)

    return DigitsClassifierFeatureExtractor


def register_digits_feature_extractor() -> str:
    """Register the digits classifier with torch-fidelity as ``"digits-classifier"``; idempotent.

    Called by :func:`compute_fid_kid`; call it yourself to use the extractor with
    ``torch_fidelity.calculate_metrics(feature_extractor="digits-classifier", ...)`` directly.

    Returns
    -------
    str
        The registered name.

    Raises
    ------
    ValueError
        When another, unrelated feature extractor already holds that name.
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    registered = FEATURE_EXTRACTORS_REGISTRY.get(DIGITS_FEATURE_EXTRACTOR)
    if registered is None:
        register_feature_extractor(DIGITS_FEATURE_EXTRACTOR, _digits_extractor_class())
    elif not getattr(registered, "_diffusers_gfprune_digits", False):
        raise ValueError(
            f"torch-fidelity already has a feature extractor named {DIGITS_FEATURE_EXTRACTOR!r} ({registered!r}) that "
            f"is not diffusers_gfprune's digits classifier; unregister it or rename it."
        )
    return DIGITS_FEATURE_EXTRACTOR


@functools.lru_cache(maxsize=8)
def _file_hash(path: str, size: int, mtime: float) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def _weights_tag(path: str) -> str:
    stat = os.stat(path)
    return _file_hash(os.path.abspath(path), stat.st_size, stat.st_mtime)


def _offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in _OFFLINE_VARS)


def _url_reachable(url: str, timeout: float) -> Tuple[bool, str]:
    """HEAD ``url`` in a daemon thread; give up after ``timeout`` seconds even if DNS hangs."""
    result = {}

    def probe():
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout) as response:
                result["ok"] = response.status < 400
                result["why"] = f"HTTP {response.status}"
        except Exception as err:  # noqa: BLE001 - any failure means "cannot download"
            result["ok"], result["why"] = False, f"{type(err).__name__}: {err}"

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if thread.is_alive():
        return False, f"no answer within {timeout:g} s"
    return result.get("ok", False), result.get("why", "unknown error")


def inception_weights_cache_path() -> str:
    """Where torch-fidelity's downloaded Inception-v3 weights live (torch hub's checkpoint cache)."""
    from urllib.parse import urlparse

    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(URL_INCEPTION_V3).path))


def _resolve_inception_weights(inception_weights, network_timeout: float) -> Tuple[Optional[str], str]:
    """Return (path for torch-fidelity or None to let it load/download, cache tag), or raise a clear error."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    if inception_weights is not None:
        path = os.fspath(inception_weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"inception_weights={path!r} is not a file. Give the path of torch-fidelity's Inception-v3 weights "
                f"(weights-inception-2015-12-05-6726825d.pth, downloadable from {URL_INCEPTION_V3})."
            )
        return path, _weights_tag(path)
    cached = inception_weights_cache_path()
    # torch-fidelity's own file (cached or about to be downloaded): its name carries its hash.
    default_tag = os.path.splitext(os.path.basename(cached))[0].rsplit("-", 1)[-1]
    if os.path.isfile(cached):
        return None, default_tag
    how = (
        f"Either pass inception_weights='/path/to/{os.path.basename(cached)}' (download it elsewhere from "
        f"{URL_INCEPTION_V3}; torch-fidelity reads it with torch.load, so use a trusted copy), or put that file at "
        f"{cached} (torch hub's cache; set TORCH_HOME to move it), or run once with network access. "
        f"FID/KID in the digits classifier's features (feature_extractor='{DIGITS_FEATURE_EXTRACTOR}') work offline."
    )
    if _offline():
        flags = ", ".join(f"{v}={os.environ[v]}" for v in _OFFLINE_VARS if v in os.environ)
        raise InceptionWeightsUnavailableError(
            f"Inception FID/KID cannot be computed here: torch-fidelity's Inception-v3 weights are not cached at "
            f"{cached} and downloads are switched off ({flags}). {how}"
        )
    ok, why = _url_reachable(URL_INCEPTION_V3, network_timeout)
    if not ok:
        raise InceptionWeightsUnavailableError(
            f"Inception FID/KID cannot be computed here: torch-fidelity's Inception-v3 weights are not cached at "
            f"{cached} and cannot be downloaded from {URL_INCEPTION_V3} ({why}). {how}"
        )
    return None, default_tag


def _default_cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "diffusers_gfprune", "fidelity")


def compute_fid_kid(
    generated,
    reference,
    feature_extractor: str = DIGITS_FEATURE_EXTRACTOR,
    inception_weights: Optional[Union[str, os.PathLike]] = None,
    kid_subset_size: Optional[int] = None,
    kid_subsets: int = 100,
    classifier_path: Optional[Union[str, os.PathLike]] = None,
    cache_root: Optional[Union[str, os.PathLike]] = None,
    reference_cache_name: Optional[str] = None,
    batch_size: int = 64,
    device: Optional[Union[str, torch.device]] = None,
    seed: int = 2020,
    network_timeout: float = 5.0,
    verbose: bool = False,
) -> dict:
    """FID and KID between generated and reference images, with torch-fidelity.

    Parameters
    ----------
    generated : torch.Tensor, numpy.ndarray or str
        Generated images (N, C, H, W), C = 1 or 3, uint8 0..255 or float in [0, 1] (the output of
        :func:`diffusers_gfprune.sampling.sample_images`); or a folder of image files (png/jpg).
    reference : ReferenceSet, torch.Tensor, numpy.ndarray or str
        Real images, as for ``generated``. A :class:`ReferenceSet` (e.g. from
        :func:`digits_reference`) has its features and FID statistics cached on disk; a bare
        tensor or folder is cached only when ``reference_cache_name`` is given.
    feature_extractor : {"digits-classifier", "inception-v3-compat"}
        The feature space (see the module docstring). The result keys name it.
    inception_weights : str or os.PathLike, optional
        Path of torch-fidelity's Inception-v3 weights (``.pth``), for ``"inception-v3-compat"``.
        Without it, torch-fidelity's cached copy is used, or downloaded; offline and uncached this
        raises :class:`InceptionWeightsUnavailableError` without waiting for the network.
    kid_subset_size : int, optional
        Images per KID subset; default ``min(1000, min(N_generated, N_reference) // 2)``. Half the
        smaller set, so that the subsets differ and the reported std means something (with the
        full set size every subset is the whole set and the std is 0). KID is torch-fidelity's
        unbiased MMD estimate: it can be slightly negative, and for two sets holding the SAME
        images it is about ``-2 / N * (mean k(x, x) - mean k(x, y))``, not exactly 0.
    kid_subsets : int, default 100
        Number of KID subsets (the std is over them).
    classifier_path : str or os.PathLike, optional
        Another digits classifier (folder or ``.safetensors``) for ``"digits-classifier"``.
    cache_root : str or os.PathLike, optional
        Folder of the on-disk cache (default ``$XDG_CACHE_HOME/diffusers_gfprune/fidelity`` or
        ``~/.cache/diffusers_gfprune/fidelity``).
    reference_cache_name : str, optional
        Cache name for a reference given as a tensor or folder (a tensor's name gets a hash of its
        images appended). For a folder you are responsible for using a new name when its
        content changes.
    batch_size : int, default 64
        Images per feature-extractor batch.
    device : str or torch.device, optional
        ``"cuda"`` or ``"cpu"``; default CUDA when available.
    seed : int, default 2020
        Seed of the KID subsets.
    network_timeout : float, default 5.0
        Seconds to wait when checking whether the Inception weights can be downloaded.
    verbose : bool, default False
        torch-fidelity's progress output.

    Returns
    -------
    dict
        ``fid_<space>``, ``kid_<space>_mean``, ``kid_<space>_std`` with ``<space>`` =
        ``digits_classifier`` or ``inception`` (labels in :data:`METRIC_DISPLAY_NAMES`), and
        ``feature_extractor``, ``feature_layer``, ``num_generated``, ``num_reference``,
        ``kid_subset_size``, ``kid_subsets``, ``reference_cache_name`` (None when not cached).

    Raises
    ------
    InceptionWeightsUnavailableError
        Inception requested but its weights are neither given, cached nor downloadable.
    ValueError
        Bad images, an unknown feature extractor, or a KID subset larger than a set.
    """
    import torch_fidelity

    if feature_extractor not in _EXTRACTORS:
        raise ValueError(
            f"feature_extractor must be one of {tuple(_EXTRACTORS)}, got {feature_extractor!r}. Use "
            f"'{DIGITS_FEATURE_EXTRACTOR}' for the built-in digits (offline) and '{INCEPTION_FEATURE_EXTRACTOR}' "
            f"for the standard Inception FID of natural images."
        )
    prefix, layer = _EXTRACTORS[feature_extractor]
    kwargs = {}
    if feature_extractor == DIGITS_FEATURE_EXTRACTOR:
        register_digits_feature_extractor()
        weights_path = os.fspath(classifier_path) if classifier_path is not None else os.path.join(ASSETS_DIR, WEIGHTS_NAME)
        if os.path.isdir(weights_path):
            weights_path = os.path.join(weights_path, WEIGHTS_NAME)
        if not os.path.isfile(weights_path):
            load_digits_classifier(weights_path)  # raises the explanatory error
        extractor_tag = f"{feature_extractor}-{_weights_tag(weights_path)}"
        if classifier_path is not None:
            kwargs["feature_extractor_weights_path"] = os.fspath(classifier_path)
        channels = None
    else:
        if inception_weights is None and classifier_path is not None:
            raise ValueError("classifier_path is for the digits classifier; pass inception_weights for Inception.")
        weights_path, weights_tag = _resolve_inception_weights(inception_weights, network_timeout)
        extractor_tag = f"{feature_extractor}-{weights_tag}"
        if weights_path is not None:
            kwargs["feature_extractor_weights_path"] = weights_path
        channels = 3

    def as_input(images, what):
        if isinstance(images, (str, os.PathLike)):
            path = os.fspath(images)
            if not os.path.isdir(path):
                raise ValueError(f"{what} {path!r} is not a folder of images.")
            return path, None, None
        if isinstance(images, ReferenceSet):
            return _UInt8Images(images.images, channels), len(images), f"{images.name}-{_images_hash(images.images)}"
        tensor = _to_uint8(images, what)
        return _UInt8Images(tensor, channels), tensor.shape[0], _images_hash(tensor)

    input1, n1, _ = as_input(generated, "generated")
    input2, n2, ref_tag = as_input(reference, "reference")
    if isinstance(reference, ReferenceSet):
        cache_name = f"{ref_tag}-{extractor_tag}"
    elif reference_cache_name is not None:
        base = reference_cache_name if ref_tag is None else f"{reference_cache_name}-{ref_tag}"
        cache_name = f"{base}-{extractor_tag}"
    else:
        cache_name = None

    sizes = [n for n in (n1, n2) if n is not None]
    if kid_subset_size is None:
        if len(sizes) < 2:
            raise ValueError("Give kid_subset_size when an input is a folder (its image count is not known here).")
        kid_subset_size = min(1000, min(sizes) // 2)
    elif sizes and kid_subset_size > min(sizes):
        raise ValueError(
            f"kid_subset_size={kid_subset_size} is larger than a set (generated: {n1}, reference: {n2}); use at most "
            f"{min(sizes)}."
        )
    if kid_subset_size < 2:
        raise ValueError(
            f"KID needs subsets of at least 2 images, got kid_subset_size={kid_subset_size} (generated: {n1}, "
            f"reference: {n2} images). Use more images (hundreds at least for meaningful FID/KID)."
        )

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics = torch_fidelity.calculate_metrics(
        input1=input1,
        input2=input2,
        fid=True,
        kid=True,
        feature_extractor=feature_extractor,
        feature_layer_fid=layer,
        feature_layer_kid=layer,
        kid_subset_size=int(kid_subset_size),
        kid_subsets=int(kid_subsets),
        cuda=device.type == "cuda",
        batch_size=int(batch_size),
        cache=True,
        cache_root=os.fspath(cache_root) if cache_root is not None else _default_cache_root(),
        input2_cache_name=cache_name,
        save_cpu_ram=True,  # no DataLoader worker processes for in-memory images
        rng_seed=int(seed),
        verbose=verbose,
        **kwargs,
    )
    return {
        f"fid_{prefix}": float(metrics[torch_fidelity.KEY_METRIC_FID]),
        f"kid_{prefix}_mean": float(metrics[torch_fidelity.KEY_METRIC_KID_MEAN]),
        f"kid_{prefix}_std": float(metrics[torch_fidelity.KEY_METRIC_KID_STD]),
        "feature_extractor": feature_extractor,
        "feature_layer": layer,
        "num_generated": n1,
        "num_reference": n2,
        "kid_subset_size": int(kid_subset_size),
        "kid_subsets": int(kid_subsets),
        "reference_cache_name": cache_name,
    }


# --------------------------------------------------------------------------------------------
# SSIM against the teacher
# --------------------------------------------------------------------------------------------


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

    Returns
    -------
    teacher_images, pruned_images : torch.Tensor
        (num_images, C, H, W) in [0, 1] on the CPU, pair i sampled from the same noise.
    """
    from diffusers import DDIMScheduler

    from .sampling import sample_images

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
            out.append(sample_images(unet, ddim, batch, num_inference_steps, generator=generator, eta=eta))
    return torch.cat(teacher_out), torch.cat(pruned_out)


# --------------------------------------------------------------------------------------------
# Digit recognition
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# A pruned model against its teacher (what the prune script reports and the card shows)
# --------------------------------------------------------------------------------------------

FID_CHOICES = ("auto", DIGITS_FEATURE_EXTRACTOR, INCEPTION_FEATURE_EXTRACTOR, "none")


@dataclass
class Metric:
    """One measured number, with how it was measured (a row of the card and an ``eval_results`` entry)."""

    key: str  # machine name, e.g. "fid_digits_classifier"
    name: str  # shown to people, e.g. "FID (digits classifier features)"
    value: float
    how: str
    dataset_name: str = "digits"
    dataset_type: str = "sklearn-digits"


@dataclass
class TeacherComparison:
    """What :func:`evaluate_against_teacher` measured, and what it could not measure and why."""

    metrics: list  # of Metric
    not_computed: list  # of (metric name, reason)
    teacher_images: torch.Tensor
    pruned_images: torch.Tensor
    details: dict

    def as_dict(self) -> dict:
        return {
            "metrics": [asdict(m) for m in self.metrics],
            "not_computed": [{"metric": name, "reason": reason} for name, reason in self.not_computed],
            "details": self.details,
        }


def digits_fid_kid(images: torch.Tensor, reference: torch.Tensor) -> dict:
    """FID and KID in the shipped digits classifier's features (NOT Inception), KID subsets of half
    the smaller set (at least 2): the protocol of the FID during training and of the criteria benchmark."""
    return compute_fid_kid(images, reference, feature_extractor=DIGITS_FEATURE_EXTRACTOR,
                           kid_subset_size=max(2, min(len(images), len(reference)) // 2))


def validation_fid(unet, ddim, num_images: int, num_inference_steps: int, seed: int, reference: torch.Tensor) -> float:
    """FID (digits classifier features) of ``num_images`` DDIM samples from the noise of ``seed + 1``.

    What ``training/prune.py --validation_fid_images`` records during training; the criteria
    benchmark measures the teacher with it, so that the two are on one protocol.
    """
    from .sampling import sample_images

    config = unet.config
    size = config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    noise = torch.randn((num_images, config.in_channels, *size), generator=torch.Generator().manual_seed(seed + 1))
    images = torch.cat([sample_images(unet, ddim, chunk, num_inference_steps) for chunk in noise.split(64)])
    return digits_fid_kid(images, reference)["fid_digits_classifier"]


def real_images(dataset, num_images: int, seed: int = 0) -> torch.Tensor:
    """Real images for FID: the first ``num_images`` of ``dataset`` shuffled with ``seed``, in [0, 1].

    ``dataset`` yields ``{"images": tensor in [-1, 1]}`` (:mod:`diffusers_gfprune.data`); the prune
    script and ``training/evaluate.py`` draw the same images for the same seed.
    """
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_images]
    return torch.stack([dataset[int(i)]["images"] for i in order]).add(1).div(2).clamp(0, 1)


def evaluate_against_teacher(
    teacher_unet,
    pruned_unet,
    scheduler,
    num_images: int,
    num_inference_steps: int = 100,
    seed: int = 0,
    fid: str = "auto",
    digits: bool = False,
    reference_images: Optional[torch.Tensor] = None,
    dataset_name: str = "digits",
    inception_weights: Optional[Union[str, os.PathLike]] = None,
    batch_size: int = 64,
    progress: bool = True,
) -> TeacherComparison:
    """Sample teacher and pruned model from the same noise and measure how far apart they are.

    Always: SSIM of each pruned image to the teacher's image from the same noise (DDIM, eta 0).
    FID/KID of the pruned model AND of the teacher, under the same protocol (so the gap is what the
    pruning cost, whatever the sample count does to the absolute numbers):

    * ``digits=True`` (the built-in digits): in the shipped digits classifier's features, against the
      held-out test digits, plus the FID of as many real training digits (the floor at this sample
      count) and the fraction of samples the classifier recognizes.
    * otherwise, ``fid="inception"`` or ``"auto"``: Inception FID against ``reference_images`` (real
      training images). When the Inception weights are not available, the FID is listed in
      ``not_computed`` with the reason (``fid="inception"`` raises instead); nothing stands in for it.

    Parameters
    ----------
    teacher_unet, pruned_unet : diffusers.UNet2DModel
        The dense teacher and the pruned model.
    scheduler : diffusers.SchedulerMixin
        The teacher's scheduler (its config makes the DDIM sampler).
    num_images : int
        Image pairs to sample (at least 2 for FID/KID).
    num_inference_steps : int, default 100
        DDIM steps.
    seed : int, default 0
        Seed of the initial noise.
    fid : str, default "auto"
        One of :data:`FID_CHOICES`.
    digits : bool, default False
        The models were trained on the built-in digits.
    reference_images : torch.Tensor, optional
        Real images (B, C, H, W) in [0, 1] or uint8, for Inception FID on other data.
    dataset_name : str, default "digits"
        The data set's name for ``eval_results``.
    inception_weights : str, optional
        Path of torch-fidelity's Inception-v3 weights (see :func:`compute_fid_kid`).
    batch_size : int, default 64
        Images per sampling batch.
    progress : bool, default True
        Show a progress bar over the sampling batches.

    Returns
    -------
    TeacherComparison
    """
    if fid not in FID_CHOICES:
        raise ValueError(f"fid={fid!r}; choose one of {list(FID_CHOICES)}.")
    if num_images < 2:
        raise ValueError(f"num_images must be >= 2 (SSIM needs pairs, FID a spread), got {num_images}.")
    if fid == DIGITS_FEATURE_EXTRACTOR and not digits:
        raise ValueError(
            f"fid='{DIGITS_FEATURE_EXTRACTOR}' measures the built-in digits only; use fid='{INCEPTION_FEATURE_EXTRACTOR}' "
            "(or 'auto') for other data."
        )
    from tqdm.auto import tqdm

    teacher_parts, pruned_parts = [], []
    batches = range(0, num_images, batch_size)
    for start in tqdm(batches, desc="evaluation samples", disable=not progress):
        count = min(batch_size, num_images - start)
        # One seed per batch: the pairs match, and the images do not depend on how many batches came before.
        t, p = paired_samples(teacher_unet, pruned_unet, scheduler, count, num_inference_steps, seed=seed + start, batch_size=count)
        teacher_parts.append(t)
        pruned_parts.append(p)
    teacher_images, pruned_images = torch.cat(teacher_parts), torch.cat(pruned_parts)
    sampler = f"{num_images} images, DDIM {num_inference_steps} steps (eta 0), seed {seed}"
    kind = {"dataset_name": dataset_name, "dataset_type": "sklearn-digits" if digits else dataset_name}

    metrics = [Metric("ssim_vs_teacher", "SSIM to the teacher (same noise)", ssim_vs_teacher(teacher_images, pruned_images),
                      f"mean SSIM (torchmetrics, 11x11 Gaussian window) of each pruned sample to the teacher's sample from "
                      f"the same initial noise; {sampler}; 1 = identical", **kind)]
    not_computed = []
    details = {"num_images": num_images, "num_inference_steps": num_inference_steps, "seed": seed}

    extractor = None
    if fid == "auto":
        extractor = DIGITS_FEATURE_EXTRACTOR if digits else INCEPTION_FEATURE_EXTRACTOR
    elif fid != "none":
        extractor = fid
    if fid == "none":
        not_computed.append(("FID/KID", "switched off (fid='none')"))

    if digits and extractor == DIGITS_FEATURE_EXTRACTOR:
        resolution = int(teacher_images.shape[-1])
        reference = digits_reference("test", resolution)
        real = digits_reference("train", resolution, max_samples=num_images)
        kid_size = max(2, min(num_images, len(reference)) // 2)  # digits_fid_kid's rule
        scores = {
            "pruned": digits_fid_kid(pruned_images, reference),
            "teacher": digits_fid_kid(teacher_images, reference),
            "real": digits_fid_kid(real.images, reference),
        }
        details["fid_digits_classifier"] = scores
        how = (f"Fréchet distance in the shipped digits classifier's 64-d features (NOT Inception) to the "
               f"{len(reference)} held-out test digits; {sampler}; KID subsets of {kid_size}")
        metrics += [
            Metric("fid_digits_classifier", "FID, digits classifier features", scores["pruned"]["fid_digits_classifier"], how, **kind),
            Metric("fid_digits_classifier_teacher", "FID of the teacher, same protocol",
                   scores["teacher"]["fid_digits_classifier"], how, **kind),
            Metric("fid_digits_classifier_real", "FID of real training digits, same protocol (the floor)",
                   scores["real"]["fid_digits_classifier"], f"{len(real)} real training digits instead of samples; " + how, **kind),
            Metric("kid_digits_classifier", "KID, digits classifier features", scores["pruned"]["kid_digits_classifier_mean"],
                   f"kernel inception distance (torch-fidelity's polynomial-kernel MMD, mean over 100 subsets of {kid_size}) "
                   f"in the same features and against the same digits; {sampler}", **kind),
        ]
        recognized = {"pruned": digits_accuracy(pruned_images), "teacher": digits_accuracy(teacher_images)}
        details["digits_recognition"] = recognized
        how = f"fraction of samples the shipped digits classifier labels with confidence > 0.9; {sampler}"
        metrics += [
            Metric("digits_recognized", "samples recognized as digits", recognized["pruned"]["recognized_fraction"], how, **kind),
            Metric("digits_recognized_teacher", "teacher samples recognized as digits",
                   recognized["teacher"]["recognized_fraction"], how, **kind),
        ]
    elif extractor == INCEPTION_FEATURE_EXTRACTOR:
        if reference_images is None:
            raise ValueError("Inception FID needs reference_images (real images of the training data).")
        try:
            common = dict(feature_extractor=INCEPTION_FEATURE_EXTRACTOR, inception_weights=inception_weights)
            scores = {
                "pruned": compute_fid_kid(pruned_images, reference_images, **common),
                "teacher": compute_fid_kid(teacher_images, reference_images, **common),
            }
        except InceptionWeightsUnavailableError as error:
            if fid != "auto":
                raise
            not_computed.append(("Inception FID/KID", str(error)))
        else:
            details["fid_inception"] = scores
            how = (f"Inception-v3 (torch-fidelity) FID against {len(reference_images)} real training images; {sampler}; "
                   "far fewer samples than the usual 50k, so compare only with the teacher's number beside it")
            metrics += [
                Metric("fid_inception", "FID (Inception-v3)", scores["pruned"]["fid_inception"], how, **kind),
                Metric("fid_inception_teacher", "FID of the teacher, same protocol", scores["teacher"]["fid_inception"], how, **kind),
                Metric("kid_inception", "KID (Inception-v3)", scores["pruned"]["kid_inception_mean"],
                       "kernel inception distance (torch-fidelity, polynomial-kernel MMD) in the same features; " + how, **kind),
            ]
    return TeacherComparison(metrics, not_computed, teacher_images, pruned_images, details)


# --------------------------------------------------------------------------------------------
# Reports: a pruned model against its teacher as one markdown table (evaluate.py, benchmarks)
# --------------------------------------------------------------------------------------------


def _fmt_value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        from .counting import format_count

        return format_count(int(value))
    value = float(value)
    if not np.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def comparison_markdown(
    comparison: Optional[TeacherComparison],
    counts: Optional[Dict[str, dict]] = None,
    throughput: Optional[ThroughputComparison] = None,
    title: Optional[str] = None,
) -> str:
    """Markdown tables of a pruned model against its teacher: quality, size and speed.

    Parameters
    ----------
    comparison : TeacherComparison, optional
        From :func:`evaluate_against_teacher`; one row per metric with how it was measured, then
        what was not computed and why.
    counts : dict, optional
        ``{"teacher": counting.model_counts(teacher), "pruned": counting.model_counts(pruned)}``.
    throughput : ThroughputComparison, optional
        From :func:`compare_throughput`; the speed-up with its spread over the repeats.
    title : str, optional
        A heading put above the tables.

    Returns
    -------
    str
        Markdown text ending with a newline.
    """
    lines = []
    if title:
        lines += [f"## {title}", ""]
    if comparison is not None:
        lines += ["| metric | value | how it was measured |", "|---|---|---|"]
        for m in comparison.metrics:
            lines.append(f"| {m.name} | {_fmt_value(m.value)} | {m.how.replace('|', '/')} |")
        lines.append("")
        if comparison.not_computed:
            lines += ["Not computed:", ""]
            lines += [f"- {name}: {reason}" for name, reason in comparison.not_computed]
            lines.append("")
    if counts or throughput is not None:
        lines += ["| | teacher | pruned | pruned / teacher |", "|---|---|---|---|"]
        rows = [("parameters", "params"), ("MACs per image (attention matmuls included)", "macs"),
                ("MACs per image (convolutions and linear layers only)", "macs_without_attention")]
        for label, key in rows if counts else ():
            dense, pruned = counts["teacher"][key], counts["pruned"][key]
            lines.append(f"| {label} | {_fmt_value(dense)} | {_fmt_value(pruned)} | {pruned / dense:.3f} |")
        if throughput is not None:
            d, p = throughput.dense, throughput.pruned
            lines.append(
                f"| UNet step latency, batch {d.batch_size}, {d.device} (median of {d.repeats}) | "
                f"{d.step_latency_median_s * 1e3:.2f} ms | {p.step_latency_median_s * 1e3:.2f} ms | "
                f"{p.step_latency_median_s / d.step_latency_median_s:.3f} |"
            )
            lines += [
                "",
                f"Speed-up (teacher latency / pruned latency, per interleaved repeat): median {throughput.ratio:.3f}, "
                f"quartiles {throughput.ratio_q25:.3f}-{throughput.ratio_q75:.3f}, range "
                f"{throughput.ratio_min:.3f}-{throughput.ratio_max:.3f} over {len(throughput.ratios)} repeats.",
            ]
        lines.append("")
    return "\n".join(lines)


__all__ += ["comparison_markdown"]
