"""Reports: a pruned model against its teacher, measured (:func:`evaluate_against_teacher`) and shown as
markdown (:func:`comparison_markdown`).

:func:`evaluate_against_teacher` puts the other parts of :mod:`diffusers_gfprune.evaluation` together
for the prune script, ``training/evaluate.py`` and the model card: SSIM to the teacher, and FID/KID of
both models under one protocol, with what could not be computed listed with its reason.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Union

import numpy as np
import torch

from .features import (
    DIGITS_FEATURE_EXTRACTOR,
    INCEPTION_FEATURE_EXTRACTOR,
    PHOTOS_FEATURE_EXTRACTOR,
    InceptionWeightsUnavailableError,
    get_feature_extractor,
)
from .fid import BUILTIN_FEATURE_EXTRACTORS, builtin_fid_kid, builtin_reference, compute_fid_kid
from .recognition import digits_accuracy
from .ssim import paired_samples, ssim_vs_teacher
from .timing import ThroughputComparison

__all__ = ["FID_CHOICES", "Metric", "TeacherComparison", "evaluate_against_teacher", "comparison_markdown"]

FID_CHOICES = ("auto", DIGITS_FEATURE_EXTRACTOR, PHOTOS_FEATURE_EXTRACTOR, INCEPTION_FEATURE_EXTRACTOR, "none")


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
    teacher_images: torch.Tensor  # uint8 (B, C, H, W)
    pruned_images: torch.Tensor  # uint8, pair i from the same noise as teacher_images[i]
    details: dict

    def as_dict(self) -> dict:
        return {
            "metrics": [asdict(m) for m in self.metrics],
            "not_computed": [{"metric": name, "reason": reason} for name, reason in self.not_computed],
            "details": self.details,
        }


BUILTIN_DATASET_TYPES = {"digits": "sklearn-digits", "photos": "scikit-image-photos"}
_BUILTIN_WORDS = {"digits": ("digits", "held-out test digits"), "photos": ("crops", "held-out crops")}


def _builtin_fid_metrics(dataset_name, teacher_images, pruned_images, num_images, sampler, kind, details) -> list:
    """FID/KID of the pruned model, the teacher and real training images in a built-in data set's features."""
    spec = get_feature_extractor(BUILTIN_FEATURE_EXTRACTORS[dataset_name])
    key, label = spec.key, spec.label
    resolution = int(teacher_images.shape[-1])
    reference = builtin_reference(dataset_name, "test", resolution)
    real = builtin_reference(dataset_name, "train", resolution, max_samples=num_images)
    kid_size = max(2, min(num_images, len(reference)) // 2)  # builtin_fid_kid's rule
    scores = {
        "pruned": builtin_fid_kid(pruned_images, reference, dataset_name),
        "teacher": builtin_fid_kid(teacher_images, reference, dataset_name),
        "real": builtin_fid_kid(real.images, reference, dataset_name),
    }
    details[f"fid_{key}"] = scores
    things, held_out = _BUILTIN_WORDS[dataset_name]
    how = (f"Fréchet distance in the shipped {label.replace(' features', '')}'s {_feature_dim(spec)} features (NOT Inception) "
           f"to the {len(reference)} {held_out}; {sampler}; KID subsets of {kid_size}")
    return [
        Metric(f"fid_{key}", f"FID, {label}", scores["pruned"][f"fid_{key}"], how, **kind),
        Metric(f"fid_{key}_teacher", "FID of the teacher, same protocol", scores["teacher"][f"fid_{key}"], how, **kind),
        Metric(f"fid_{key}_real", f"FID of real training {things}, same protocol (the floor)",
               scores["real"][f"fid_{key}"], f"{len(real)} real training {things} instead of samples; " + how, **kind),
        Metric(f"kid_{key}", f"KID, {label}", scores["pruned"][f"kid_{key}_mean"],
               f"kernel inception distance (torch-fidelity's polynomial-kernel MMD, mean over 100 subsets of {kid_size}) "
               f"in the same features and against the same {things}; {sampler}", **kind),
    ]


def _feature_dim(spec) -> str:
    """``"64-d"``: the size of a classifier space's features, from the shipped classifier's config."""
    import json

    config_path = os.path.join(os.path.dirname(spec.default_weights()), "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            return f"{int(json.load(f)['feature_dim'])}-d"
    except (OSError, KeyError, ValueError):
        return "penultimate"



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
    pipeline_kind=None,
) -> TeacherComparison:
    """Sample teacher and pruned model from the same noise and measure how far apart they are.

    Always: SSIM of each pruned image to the teacher's image from the same noise (DDIM, eta 0; for a latent
    pipeline the same latent noise, decoded).
    FID/KID of the pruned model AND of the teacher, under the same protocol (so the gap is what the
    pruning cost, whatever the sample count does to the absolute numbers):

    * a built-in data set (``digits=True``, or ``dataset_name`` ``"digits"``/``"photos"``): in the
      shipped classifier's features of that data set, against its held-out split, plus the FID of
      as many real training images (the floor at this sample count); for the digits also the
      fraction of samples the classifier recognizes.
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
        The models were trained on the built-in digits (the same as ``dataset_name="digits"``).
    reference_images : torch.Tensor, optional
        Real images (B, C, H, W) in [0, 1] or uint8, for Inception FID on other data.
    dataset_name : str, default "digits"
        The data set's name for ``eval_results``; ``"photos"`` selects the built-in photos' protocol.
    inception_weights : str, optional
        Path of torch-fidelity's Inception-v3 weights (see :func:`compute_fid_kid`).
    batch_size : int, default 64
        Images per sampling batch.
    progress : bool, default True
        Show a progress bar over the sampling batches.
    pipeline_kind : diffusers_gfprune.pipeline_kinds.PipelineKind, optional
        The teacher's pipeline kind with its components loaded (``teacher.load_kind``). A latent kind samples both
        UNets from the same latent noise and decodes both with the teacher's autoencoder, so SSIM and FID are on
        images. Default: pixel pipelines.

    Returns
    -------
    TeacherComparison
        Its ``teacher_images`` and ``pruned_images`` are uint8 (B, C, H, W), a quarter of float32's memory.
    """
    if fid not in FID_CHOICES:
        raise ValueError(f"fid={fid!r}; choose one of {list(FID_CHOICES)}.")
    if num_images < 2:
        raise ValueError(f"num_images must be >= 2 (SSIM needs pairs, FID a spread), got {num_images}.")
    builtin = "digits" if digits else (dataset_name if dataset_name in BUILTIN_FEATURE_EXTRACTORS else None)
    for name, extractor_name in BUILTIN_FEATURE_EXTRACTORS.items():
        if fid == extractor_name and builtin != name:
            raise ValueError(
                f"fid='{extractor_name}' measures the built-in {name!r} only (dataset_name={name!r}); use "
                f"fid='{INCEPTION_FEATURE_EXTRACTOR}' (or 'auto') for other data."
            )
    from tqdm.auto import tqdm

    from ..sampling import to_uint8

    # Samples are kept as uint8 (what FID reads anyway); SSIM is computed per batch on the float images.
    teacher_parts, pruned_parts, ssim_parts = [], [], []
    batches = range(0, num_images, batch_size)
    for start in tqdm(batches, desc="evaluation samples", disable=not progress):
        count = min(batch_size, num_images - start)
        # One seed per batch: the pairs match, and the images do not depend on how many batches came before.
        t, p = paired_samples(teacher_unet, pruned_unet, scheduler, count, num_inference_steps, seed=seed + start,
                              batch_size=count, kind=pipeline_kind)
        ssim_parts.append(ssim_vs_teacher(t, p, per_image=True)[1])
        teacher_parts.append(to_uint8(t))
        pruned_parts.append(to_uint8(p))
    teacher_images, pruned_images = torch.cat(teacher_parts), torch.cat(pruned_parts)
    ssim = float(torch.cat(ssim_parts).double().mean())
    how_sampled = (pipeline_kind.describe_sampler(num_inference_steps) if pipeline_kind is not None
                   else f"DDIM {num_inference_steps} steps (eta 0)")
    sampler = f"{num_images} images, {how_sampled}, seed {seed}"
    kind = {"dataset_name": "digits" if digits else dataset_name,
            "dataset_type": BUILTIN_DATASET_TYPES.get(builtin, dataset_name)}

    metrics = [Metric("ssim_vs_teacher", "SSIM to the teacher (same noise)", ssim,
                      f"mean SSIM (torchmetrics, 11x11 Gaussian window) of each pruned sample to the teacher's sample from "
                      f"the same initial noise; {sampler}; 1 = identical", **kind)]
    not_computed = []
    details = {"num_images": num_images, "num_inference_steps": num_inference_steps, "seed": seed}

    extractor = None
    if fid == "auto":
        extractor = BUILTIN_FEATURE_EXTRACTORS[builtin] if builtin else INCEPTION_FEATURE_EXTRACTOR
    elif fid != "none":
        extractor = fid
    if fid == "none":
        not_computed.append(("FID/KID", "switched off (fid='none')"))

    if builtin and extractor == BUILTIN_FEATURE_EXTRACTORS[builtin]:
        metrics += _builtin_fid_metrics(builtin, teacher_images, pruned_images, num_images, sampler, kind, details)
    if builtin == "digits" and extractor == DIGITS_FEATURE_EXTRACTOR:
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




def _fmt_value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        from ..counting import format_count

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
