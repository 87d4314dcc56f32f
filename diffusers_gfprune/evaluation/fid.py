"""FID and KID: reference sets of real images, torch-fidelity's metrics in a registered feature space,
and the protocol the scripts and benchmarks share for the built-in data sets.

:func:`compute_fid_kid` wraps ``torch_fidelity.calculate_metrics(fid=True, kid=True)`` in one of the
feature spaces of :mod:`diffusers_gfprune.evaluation.features`. Features and FID statistics of a
reference set are cached on disk by torch-fidelity (``cache_root``), under a name made of the data
set, split, resolution, image count, a hash of the images and the feature extractor (with a hash of
its weights).

Built-in data sets (:data:`BUILTIN_FEATURE_EXTRACTORS`): each has its own offline feature space, so
:func:`builtin_reference`, :func:`builtin_fid_kid` and :func:`validation_fid` take a data set name
(``"digits"`` or ``"photos"``) and need nothing else.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .features import (
    DIGITS_FEATURE_EXTRACTOR,
    PHOTOS_FEATURE_EXTRACTOR,
    classifier_weights,
    get_feature_extractor,
    register_with_torch_fidelity,
    resolve_inception_weights,
    weights_tag,
)

__all__ = [
    "BUILTIN_FEATURE_EXTRACTORS",
    "ReferenceSet",
    "builtin_reference",
    "digits_reference",
    "compute_fid_kid",
    "builtin_fid_kid",
    "digits_fid_kid",
    "validation_fid",
    "real_images",
]

BUILTIN_FEATURE_EXTRACTORS = {"digits": DIGITS_FEATURE_EXTRACTOR, "photos": PHOTOS_FEATURE_EXTRACTOR}
"""The offline feature space of each built-in data set (``--eval_fid auto`` picks it)."""

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


def builtin_reference(dataset_name: str, split: str = "test", resolution: Optional[int] = None,
                      max_samples: Optional[int] = None) -> ReferenceSet:
    """The images of one split of a built-in data set as a :class:`ReferenceSet` (uint8).

    The images are exactly what a DDPM trained with ``DataConfig(dataset_name=dataset_name,
    resolution=resolution)`` learns from (:mod:`diffusers_gfprune.data`), mapped from [-1, 1] to 0..255.

    Parameters
    ----------
    dataset_name : str
        ``"digits"`` or ``"photos"``.
    split : str, default "test"
        The held-out split (``"test"``), ``"train"``, or (digits) ``"all"``.
    resolution : int, optional
        Image side length (the model's ``sample_size``); default 16 for digits, 32 for photos.
    max_samples : int, optional
        Keep only N images (the first N digits; for photos N crops spread evenly over the photographs).

    Returns
    -------
    ReferenceSet
        Named ``"{dataset_name}-{split}-r{resolution}-n{N}"``.
    """
    from ..data import DigitsDataset
    from ..photos import PhotosDataset

    datasets = {"digits": (DigitsDataset, 16), "photos": (PhotosDataset, 32)}
    if dataset_name not in datasets:
        raise ValueError(
            f"{dataset_name!r} is not a built-in data set; choose one of {tuple(datasets)}, or compare with "
            f"your own real images (compute_fid_kid with a tensor or folder reference)."
        )
    dataset_class, default_resolution = datasets[dataset_name]
    resolution = default_resolution if resolution is None else int(resolution)
    dataset = dataset_class(split=split, resolution=resolution, max_samples=max_samples)
    images = torch.stack([dataset[i]["images"] for i in range(len(dataset))])
    images = ((images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return ReferenceSet(images, f"{dataset_name}-{split}-r{resolution}-n{len(dataset)}")


def digits_reference(split: str = "test", resolution: int = 16, max_samples: Optional[int] = None) -> ReferenceSet:
    """The built-in digits of one split as a :class:`ReferenceSet`: ``builtin_reference("digits", ...)``."""
    return builtin_reference("digits", split, resolution, max_samples)


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
    feature_extractor : str
        A registered feature space (:data:`~diffusers_gfprune.evaluation.features.FEATURE_EXTRACTORS`):
        ``"digits-classifier"``, ``"photos-classifier"`` or ``"inception-v3-compat"``. The result keys name it.
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
        Another classifier (folder or ``.safetensors``) for a classifier feature space.
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
        the space's key (``digits_classifier``, ``photos_classifier``, ``inception``) (labels in :data:`METRIC_DISPLAY_NAMES`), and
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

    spec = get_feature_extractor(feature_extractor)
    prefix, layer, channels = spec.key, spec.layer, spec.channels
    kwargs = {}
    if spec.is_classifier:
        register_with_torch_fidelity(feature_extractor)
        weights_path, kwargs = classifier_weights(spec, classifier_path)
        extractor_tag = f"{feature_extractor}-{weights_tag(weights_path)}"
    else:
        if inception_weights is None and classifier_path is not None:
            raise ValueError("classifier_path is for a classifier feature space; pass inception_weights for Inception.")
        weights_path, inception_tag = resolve_inception_weights(inception_weights, network_timeout)
        extractor_tag = f"{feature_extractor}-{inception_tag}"
        if weights_path is not None:
            kwargs["feature_extractor_weights_path"] = weights_path

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


def builtin_fid_kid(images: torch.Tensor, reference, dataset_name: str = "digits") -> dict:
    """FID and KID in the offline feature space of a built-in data set (NOT Inception), KID subsets of
    half the smaller set (at least 2): the protocol of the FID during training and of the benchmarks.

    Parameters
    ----------
    images : torch.Tensor
        Generated images (N, C, H, W) in [0, 1] or uint8.
    reference : ReferenceSet or torch.Tensor
        Real images, e.g. ``builtin_reference(dataset_name, "test", resolution)``.
    dataset_name : str, default "digits"
        A key of :data:`BUILTIN_FEATURE_EXTRACTORS`.
    """
    if dataset_name not in BUILTIN_FEATURE_EXTRACTORS:
        raise ValueError(
            f"{dataset_name!r} has no built-in feature space; choose one of {tuple(BUILTIN_FEATURE_EXTRACTORS)}, "
            f"or use compute_fid_kid(..., feature_extractor='inception-v3-compat') for other data."
        )
    return compute_fid_kid(images, reference, feature_extractor=BUILTIN_FEATURE_EXTRACTORS[dataset_name],
                           kid_subset_size=max(2, min(len(images), len(reference)) // 2))


def digits_fid_kid(images: torch.Tensor, reference) -> dict:
    """FID and KID in the shipped digits classifier's features: ``builtin_fid_kid(images, reference, "digits")``."""
    return builtin_fid_kid(images, reference, "digits")


def validation_fid(unet, ddim, num_images: int, num_inference_steps: int, seed: int, reference,
                   dataset_name: str = "digits", kind=None) -> float:
    """FID (the built-in data set's classifier features) of ``num_images`` DDIM samples from the noise of ``seed + 1``.

    What ``training/prune.py --validation_fid_images`` records during training; the criteria
    benchmark measures the teacher with it, so that the two are on one protocol. ``kind`` (a
    :class:`~diffusers_gfprune.pipeline_kinds.PipelineKind` with its components loaded) decodes
    latent samples; default: pixel samples.
    """
    from ..sampling import sample_images, to_uint8

    sample = kind.sample if kind is not None else sample_images

    config = unet.config
    size = config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    noise = torch.randn((num_images, config.in_channels, *size), generator=torch.Generator().manual_seed(seed + 1))
    images = torch.cat([to_uint8(sample(unet, ddim, chunk, num_inference_steps)) for chunk in noise.split(64)])
    key = get_feature_extractor(BUILTIN_FEATURE_EXTRACTORS[dataset_name]).key
    return builtin_fid_kid(images, reference, dataset_name)[f"fid_{key}"]


def real_images(dataset, num_images: int, seed: int = 0) -> torch.Tensor:
    """Real images for FID: the first ``num_images`` of ``dataset`` shuffled with ``seed``, in [0, 1].

    ``dataset`` yields ``{"images": tensor in [-1, 1]}`` (:mod:`diffusers_gfprune.data`); the prune
    script and ``training/evaluate.py`` draw the same images for the same seed.
    """
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_images]
    return torch.stack([dataset[int(i)]["images"] for i in order]).add(1).div(2).clamp(0, 1)
