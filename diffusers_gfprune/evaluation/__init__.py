"""Evaluation of dense and pruned DDPMs: FID/KID, SSIM against the teacher, digit recognition, throughput, reports.

Small functions, each computing one thing honestly; where a number cannot be computed here (for
instance Inception FID without the Inception weights, offline) they raise an error that says why
and how to get it, rather than returning a stand-in. One module per concern:

:mod:`~diffusers_gfprune.evaluation.features`
    The feature spaces of FID/KID, by registration: torch-fidelity's Inception-v3
    (``"inception-v3-compat"``), the shipped digits classifier (``"digits-classifier"``) and the
    shipped photos classifier (``"photos-classifier"``). Classifier numbers are NOT Inception FIDs:
    they carry their own keys (``fid_digits_classifier``, ``fid_photos_classifier``) and display names
    (:data:`METRIC_DISPLAY_NAMES`). A further space is one
    :func:`~diffusers_gfprune.evaluation.features.register_classifier_feature_extractor` call.
:mod:`~diffusers_gfprune.evaluation.fid`
    :func:`compute_fid_kid` (torch-fidelity, with on-disk caching of reference statistics),
    reference sets of the built-in data sets (:func:`builtin_reference`), and the protocol the
    scripts and benchmarks share for them (:func:`builtin_fid_kid`, :func:`validation_fid`).
:mod:`~diffusers_gfprune.evaluation.ssim`
    :func:`paired_samples` (teacher and pruned model from the same noise, DDIM) and
    :func:`ssim_vs_teacher`.
:mod:`~diffusers_gfprune.evaluation.recognition`
    :func:`digits_accuracy`: what the shipped digits classifier sees in generated images.
:mod:`~diffusers_gfprune.evaluation.timing`
    :func:`measure_throughput`, :func:`compare_throughput`, :func:`time_interleaved`.
:mod:`~diffusers_gfprune.evaluation.report`
    :func:`evaluate_against_teacher` (SSIM and FID/KID of both models under one protocol) and
    :func:`comparison_markdown`.

Every public name is available from this package, as ``from diffusers_gfprune import evaluation;
evaluation.compute_fid_kid(...)``. Importing it neither imports nor changes torch-fidelity: the
classifier extractors are registered with torch-fidelity when FID/KID is computed.
"""

from .features import (
    DIGITS_FEATURE_EXTRACTOR,
    FEATURE_EXTRACTORS,
    INCEPTION_FEATURE_EXTRACTOR,
    METRIC_DISPLAY_NAMES,
    PHOTOS_FEATURE_EXTRACTOR,
    FeatureExtractor,
    InceptionWeightsUnavailableError,
    inception_weights_cache_path,
    register_classifier_feature_extractor,
    register_digits_feature_extractor,
    register_with_torch_fidelity,
)
from .fid import (
    BUILTIN_FEATURE_EXTRACTORS,
    ReferenceSet,
    builtin_fid_kid,
    builtin_reference,
    compute_fid_kid,
    digits_fid_kid,
    digits_reference,
    real_images,
    validation_fid,
)
from .recognition import digits_accuracy
from .report import FID_CHOICES, Metric, TeacherComparison, comparison_markdown, evaluate_against_teacher
from .ssim import paired_samples, ssim_vs_teacher
from .timing import ThroughputComparison, ThroughputResult, compare_throughput, measure_throughput, time_interleaved

__all__ = [
    "METRIC_DISPLAY_NAMES",
    "DIGITS_FEATURE_EXTRACTOR",
    "PHOTOS_FEATURE_EXTRACTOR",
    "INCEPTION_FEATURE_EXTRACTOR",
    "FEATURE_EXTRACTORS",
    "FeatureExtractor",
    "BUILTIN_FEATURE_EXTRACTORS",
    "InceptionWeightsUnavailableError",
    "ReferenceSet",
    "builtin_reference",
    "digits_reference",
    "register_classifier_feature_extractor",
    "register_with_torch_fidelity",
    "register_digits_feature_extractor",
    "inception_weights_cache_path",
    "compute_fid_kid",
    "builtin_fid_kid",
    "digits_fid_kid",
    "validation_fid",
    "real_images",
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
    "comparison_markdown",
]
