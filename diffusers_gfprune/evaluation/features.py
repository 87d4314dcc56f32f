"""Feature spaces for FID and KID: a registry of feature extractors, registered with torch-fidelity on demand.

Every feature space is a :class:`FeatureExtractor` in :data:`FEATURE_EXTRACTORS`, looked up by its
torch-fidelity name. Three are built in:

* ``"inception-v3-compat"``: torch-fidelity's own Inception-v3 (2048-d pool features), the usual FID
  of the literature. Its weights come from ``inception_weights``, torch hub's cache, or a download;
  offline without a cached file :func:`resolve_inception_weights` raises
  :class:`InceptionWeightsUnavailableError` at once (no network wait).
* ``"digits-classifier"``: the 64-d penultimate features of the small CNN shipped for the built-in
  16x16 digits (:mod:`diffusers_gfprune.digits_classifier`). Offline.
* ``"photos-classifier"``: the 64-d penultimate features of the small CNN shipped for the built-in
  32x32 colour ``photos`` (:mod:`diffusers_gfprune.photos_classifier`). Offline.

The classifier spaces are NOT Inception: their numbers carry their own keys (``fid_digits_classifier``,
``fid_photos_classifier``; display names in :data:`METRIC_DISPLAY_NAMES`) and are comparable only with
each other (same weights, same reference set, similar sample counts).

A further space is one :func:`register_classifier_feature_extractor` call: a name, a loader of the
classifier (a module with ``features(x)``, ``head`` and ``resolution``), and the function that turns
uint8 images into its input. Importing this module neither imports nor changes torch-fidelity; the
classes torch-fidelity needs are built and registered by :func:`register_with_torch_fidelity`, which
:func:`~diffusers_gfprune.evaluation.fid.compute_fid_kid` calls.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import urllib.request
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .. import digits_classifier, photos_classifier

__all__ = [
    "FeatureExtractor",
    "FEATURE_EXTRACTORS",
    "METRIC_DISPLAY_NAMES",
    "DIGITS_FEATURE_EXTRACTOR",
    "PHOTOS_FEATURE_EXTRACTOR",
    "INCEPTION_FEATURE_EXTRACTOR",
    "InceptionWeightsUnavailableError",
    "register_classifier_feature_extractor",
    "register_with_torch_fidelity",
    "register_digits_feature_extractor",
    "inception_weights_cache_path",
]

DIGITS_FEATURE_EXTRACTOR = "digits-classifier"
"""torch-fidelity name of the shipped digits classifier's feature extractor."""

PHOTOS_FEATURE_EXTRACTOR = "photos-classifier"
"""torch-fidelity name of the shipped photos classifier's feature extractor."""

INCEPTION_FEATURE_EXTRACTOR = "inception-v3-compat"
"""torch-fidelity's own Inception-v3 (the standard FID feature extractor)."""

METRIC_DISPLAY_NAMES: Dict[str, str] = {
    "fid_inception": "FID (Inception-v3, torch-fidelity)",
    "kid_inception_mean": "KID (Inception-v3, torch-fidelity)",
    "kid_inception_std": "KID std over subsets (Inception-v3, torch-fidelity)",
    "ssim_vs_teacher": "SSIM vs teacher (same initial noise)",
}
"""How to label each metric key in tables and plots. Classifier-feature numbers are never Inception FIDs."""


class InceptionWeightsUnavailableError(RuntimeError):
    """Inception FID/KID cannot be computed: torch-fidelity's Inception-v3 weights are not available."""


@dataclass(frozen=True)
class FeatureExtractor:
    """One feature space for FID/KID.

    Attributes
    ----------
    name : str
        The torch-fidelity name (``feature_extractor=`` of :func:`compute_fid_kid`).
    key : str
        Prefix of the metric keys: ``fid_<key>``, ``kid_<key>_mean``, ``kid_<key>_std``.
    label : str
        How people see the feature space, e.g. ``"photos classifier features"``.
    layer : str
        The feature layer used for FID and KID.
    channels : int or None
        Channels the extractor needs (grayscale is repeated to 3 for Inception); None: as given.
    load : callable or None
        ``load(path_or_None)`` -> the classifier (a shipped-classifier space); None for Inception.
    to_input : callable or None
        ``to_input(uint8 images, resolution)`` -> the classifier's float input.
    default_weights : callable or None
        Path of the shipped ``.safetensors`` weights (hashed into cache names).
    how_to_make : str
        What to run when the shipped weights are missing.
    """

    name: str
    key: str
    label: str
    layer: str
    channels: Optional[int] = None
    load: Optional[Callable] = None
    to_input: Optional[Callable] = None
    default_weights: Optional[Callable[[], str]] = None
    how_to_make: str = ""

    @property
    def is_classifier(self) -> bool:
        return self.load is not None


FEATURE_EXTRACTORS: Dict[str, FeatureExtractor] = {}
"""Every known feature space, by torch-fidelity name."""


def _add_display_names(extractor: FeatureExtractor) -> None:
    METRIC_DISPLAY_NAMES.setdefault(f"fid_{extractor.key}", f"FID ({extractor.label})")
    METRIC_DISPLAY_NAMES.setdefault(f"kid_{extractor.key}_mean", f"KID ({extractor.label})")
    METRIC_DISPLAY_NAMES.setdefault(f"kid_{extractor.key}_std", f"KID std over subsets ({extractor.label})")


def register_classifier_feature_extractor(extractor: FeatureExtractor) -> FeatureExtractor:
    """Add a classifier feature space to :data:`FEATURE_EXTRACTORS` (and its display names).

    Raises
    ------
    ValueError
        When another, different feature space already holds the name.
    """
    if not extractor.is_classifier:
        raise ValueError(f"{extractor.name!r}: a classifier feature space needs a load() function.")
    existing = FEATURE_EXTRACTORS.get(extractor.name)
    if existing is not None and existing != extractor:
        raise ValueError(f"A feature extractor named {extractor.name!r} is already registered ({existing}); choose another name.")
    FEATURE_EXTRACTORS[extractor.name] = extractor
    _add_display_names(extractor)
    return extractor


FEATURE_EXTRACTORS[INCEPTION_FEATURE_EXTRACTOR] = FeatureExtractor(
    INCEPTION_FEATURE_EXTRACTOR, "inception", "Inception-v3, torch-fidelity", "2048", channels=3)

register_classifier_feature_extractor(FeatureExtractor(
    DIGITS_FEATURE_EXTRACTOR, "digits_classifier", "digits classifier features", "features",
    load=digits_classifier.load_digits_classifier,
    to_input=digits_classifier.to_classifier_input,
    default_weights=lambda: os.path.join(digits_classifier.ASSETS_DIR, digits_classifier.WEIGHTS_NAME),
    how_to_make="python training/train_digits_classifier.py",
))

register_classifier_feature_extractor(FeatureExtractor(
    PHOTOS_FEATURE_EXTRACTOR, "photos_classifier", "photos classifier features", "features",
    channels=3,
    load=photos_classifier.load_photos_classifier,
    to_input=photos_classifier.to_photos_classifier_input,
    default_weights=lambda: os.path.join(photos_classifier.ASSETS_DIR, photos_classifier.WEIGHTS_NAME),
    how_to_make="python training/train_photos_classifier.py",
))


def get_feature_extractor(name: str) -> FeatureExtractor:
    """The registered feature space ``name``, or a ``ValueError`` listing the known ones."""
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(
            f"feature_extractor must be one of {tuple(FEATURE_EXTRACTORS)}, got {name!r}. Use "
            f"'{DIGITS_FEATURE_EXTRACTOR}' for the built-in digits and '{PHOTOS_FEATURE_EXTRACTOR}' for the built-in "
            f"photos (both offline), and '{INCEPTION_FEATURE_EXTRACTOR}' for the standard Inception FID of natural images."
        )
    return FEATURE_EXTRACTORS[name]


# --------------------------------------------------------------------------------------------
# torch-fidelity classes of the classifier spaces
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _fidelity_class(name: str):
    """Build the torch-fidelity feature extractor class of a classifier space (imports torch-fidelity)."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.helpers import vassert

    spec = FEATURE_EXTRACTORS[name]

    class ClassifierFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity feature extractor from a shipped classifier of diffusers_gfprune.

        Features: ``"features"`` (penultimate, for FID/KID/PRC) and ``"logits"`` (for the
        Inception-Score analogue). Takes uint8 (B, C, H, W) images, converted by the space's
        ``to_input``. ``feature_extractor_weights_path`` may name another classifier folder or
        ``.safetensors`` file saved by the training script.
        """

        _diffusers_gfprune_space = name

        def __init__(self, fidelity_name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(fidelity_name, features_list)
            self.classifier = spec.load(feature_extractor_weights_path)

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
            return torch.zeros(1, spec.channels or 1, 16, 16, dtype=torch.uint8)

        def forward(self, x):
            vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
            vassert(x.dim() == 4 and x.shape[1] in (1, 3), f"Input is not Bx1xHxW or Bx3xHxW: {tuple(x.shape)}")
            features = self.classifier.features(spec.to_input(x, self.classifier.resolution))
            out = {"features": features}
            if "logits" in self.features_list:
                out["logits"] = self.classifier.head(features)
            return tuple(out[key].float() for key in self.features_list)

    ClassifierFeatureExtractor.__name__ = f"{name.title().replace('-', '')}FeatureExtractor"
    return ClassifierFeatureExtractor


def register_with_torch_fidelity(name: str) -> str:
    """Register the classifier space ``name`` with torch-fidelity under that name; idempotent.

    Called by :func:`~diffusers_gfprune.evaluation.fid.compute_fid_kid`; call it yourself to use the
    extractor with ``torch_fidelity.calculate_metrics(feature_extractor=name, ...)`` directly.

    Raises
    ------
    ValueError
        For an unknown space, or when torch-fidelity already has an unrelated extractor of that name.
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    spec = get_feature_extractor(name)
    if not spec.is_classifier:
        return name  # torch-fidelity's own
    registered = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if registered is None:
        register_feature_extractor(name, _fidelity_class(name))
    elif getattr(registered, "_diffusers_gfprune_space", None) != name:
        raise ValueError(
            f"torch-fidelity already has a feature extractor named {name!r} ({registered!r}) that is not "
            f"diffusers_gfprune's; unregister it or rename it."
        )
    return name


def register_digits_feature_extractor() -> str:
    """Register the digits classifier with torch-fidelity as ``"digits-classifier"``; idempotent."""
    return register_with_torch_fidelity(DIGITS_FEATURE_EXTRACTOR)


# --------------------------------------------------------------------------------------------
# Weights: cache tags and Inception's file
# --------------------------------------------------------------------------------------------

_OFFLINE_VARS = ("DIFFUSERS_GFPRUNE_OFFLINE", "HF_HUB_OFFLINE")
_TRUE = {"1", "on", "yes", "true"}


@functools.lru_cache(maxsize=8)
def _file_hash(path: str, size: int, mtime: float) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def weights_tag(path: str) -> str:
    """A short hash of a weights file (cached by path, size and modification time)."""
    stat = os.stat(path)
    return _file_hash(os.path.abspath(path), stat.st_size, stat.st_mtime)


def classifier_weights(spec: FeatureExtractor, classifier_path=None) -> Tuple[str, dict]:
    """The weights file of a classifier space (raising its loader's explanatory error when missing)
    and the extra torch-fidelity arguments that select it."""
    path = os.fspath(classifier_path) if classifier_path is not None else spec.default_weights()
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not os.path.isfile(path):
        spec.load(path)  # raises the explanatory error
    kwargs = {"feature_extractor_weights_path": os.fspath(classifier_path)} if classifier_path is not None else {}
    return path, kwargs


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


def resolve_inception_weights(inception_weights, network_timeout: float) -> Tuple[Optional[str], str]:
    """Return (path for torch-fidelity or None to let it load/download, cache tag), or raise a clear error."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    if inception_weights is not None:
        path = os.fspath(inception_weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"inception_weights={path!r} is not a file. Give the path of torch-fidelity's Inception-v3 weights "
                f"(weights-inception-2015-12-05-6726825d.pth, downloadable from {URL_INCEPTION_V3})."
            )
        return path, weights_tag(path)
    cached = inception_weights_cache_path()
    # torch-fidelity's own file (cached or about to be downloaded): its name carries its hash.
    default_tag = os.path.splitext(os.path.basename(cached))[0].rsplit("-", 1)[-1]
    if os.path.isfile(cached):
        return None, default_tag
    how = (
        f"Either pass inception_weights='/path/to/{os.path.basename(cached)}' (download it elsewhere from "
        f"{URL_INCEPTION_V3}; torch-fidelity reads it with torch.load, so use a trusted copy), or put that file at "
        f"{cached} (torch hub's cache; set TORCH_HOME to move it), or run once with network access. "
        f"FID/KID in the digits classifier's features (feature_extractor='{DIGITS_FEATURE_EXTRACTOR}') or the "
        f"photos classifier's ('{PHOTOS_FEATURE_EXTRACTOR}') work offline."
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
