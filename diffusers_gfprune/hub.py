"""The model card of a pruned pipeline, and pushing the finished folder to the Hub.

The card comes from ``model_card_template.md`` through huggingface_hub's ``ModelCard.from_template``;
its metadata (``ModelCardData``) carries ``base_model``, ``datasets``, ``library_name``,
``pipeline_tag``, tags and one ``EvalResult`` per measured metric. Tokens are passed to
huggingface_hub and nowhere else: never printed, logged or written.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .evaluation import Metric  # noqa: F401  (a card row; defined with the measurements)

TEMPLATE_NAME = "model_card_template.md"
# What never goes to the Hub: resumable checkpoints, tracker logs, temporary and hidden files.
PUSH_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "logs/**", ".*", ".*/**", "**/.*"]
REQUIRED_FILES = ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json", "README.md")


def template_path() -> str:
    """The card template: at the repository root (source checkout) or installed under share/."""
    candidates = [
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), TEMPLATE_NAME),
        os.path.join(sys.prefix, "share", "diffusers-gfprune", TEMPLATE_NAME),
    ]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{TEMPLATE_NAME} not found in {candidates}; reinstall diffusers-gfprune.")


@dataclass
class CardInfo:
    """Everything the card says about a pruning run."""

    repo_name: str
    base_model: str  # Hub id or local path of the teacher
    base_model_on_hub: bool
    dataset: str
    dataset_on_hub: bool
    criterion: str
    layout: str
    target_description: str
    sparsity: float
    params_dense: int
    params_pruned: int
    macs_dense: int
    macs_pruned: int
    macs_dense_noattn: int
    macs_pruned_noattn: int
    resolution: int  # of the UNet's input (a latent teacher's latents)
    soft_steps: int
    pruning_steps: int
    rescore_every: int
    sparsity_schedule: str
    mask_schedule: str
    max_train_steps: int
    hyperparameters: Dict[str, object] = field(default_factory=dict)
    metrics: List[Metric] = field(default_factory=list)
    not_computed: List[Tuple[str, str]] = field(default_factory=list)  # (metric, why it was not computed)
    extra_images: List[Tuple[str, str]] = field(default_factory=list)  # (path in the folder, caption)
    time_reembedding_error: Optional[float] = None
    grid_path: str = "teacher_vs_pruned.png"
    grid_sampler: str = "DDIM, 100 steps, eta 0"
    repo_id: Optional[str] = None
    local_paths: List[str] = field(default_factory=list)  # the run's folders, named by base name only in the card
    criterion_note: Optional[str] = None  # what the criterion ranks by (default: from the criterion's name)
    process: str = "progressive"  # or "one-shot": pruned at step 0, exported, fine-tuned
    pipeline_class: str = "DDPMPipeline"  # the teacher's (and the stock output's) class: PipelineKind.pipeline_class


def _human(n: float) -> str:
    from .counting import format_count

    return format_count(n)


def _kind(pipeline_class: str):
    from .pipeline_kinds import PIPELINE_CLASSES, PixelKind

    return PIPELINE_CLASSES.get(pipeline_class, PixelKind)


def loading_snippet(layout: str, repo_id: str, pipeline_class: str = "DDPMPipeline") -> str:
    """The card's code: the teacher's own pipeline class for the stock layout, remote code for per-layer."""
    if layout == "stock":
        return (
            f"from diffusers import {pipeline_class}\n\n"
            f'pipeline = {pipeline_class}.from_pretrained("{repo_id}")\n'
            "image = pipeline(batch_size=16).images[0]"
        )
    return (
        "from diffusers import DiffusionPipeline\n\n"
        f'pipeline = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)\n'
        "image = pipeline(batch_size=16).images[0]"
    )


def loading_note(layout: str, pipeline_class: str = "DDPMPipeline") -> str:
    frozen = list(_kind(pipeline_class).frozen_components)
    latent = (f" The {', '.join(f'`{c}`' for c in frozen)} and the scheduler are the teacher's, unchanged: only the "
              "UNet was pruned.") if frozen else ""
    if layout == "stock":
        return (
            "\nThis is a plain `UNet2DModel` with a smaller config: no extra package and no flags are needed." + latent
        )
    return (
        "\n`trust_remote_code=True` is needed because every layer keeps its own width, which a stock `UNet2DModel` "
        "config cannot express: the repo ships the small modeling file (`unet/modeling_pruned_unet.py`, torch and "
        "diffusers only) that rebuilds those widths. Read it before you trust it; with `diffusers-gfprune` installed "
        "you can also load it with `PrunedUNet2DModel.from_pretrained(repo, subfolder=\"unet\")`." + latent
    )


def public_name(name_or_path: str, on_hub: bool) -> str:
    """How a card names a teacher or a data set: the Hub id as the user typed it, else the folder's base name."""
    if on_hub:
        return name_or_path
    return os.path.basename(os.path.normpath(os.fspath(name_or_path))) or os.fspath(name_or_path)


def scrub_local_paths(value, paths: Sequence[Optional[str]] = ()):
    """``value`` (text, or a JSON-like structure of texts) with no machine-local path or user name left in it.

    Each of ``paths`` (the run's teacher, data, output and cache folders) becomes its base name, in the form
    given and as an absolute path; the home folder becomes ``~``; any other absolute path keeps only its last
    component (``.../name``); the user name left in any other path becomes ``<user>``. Published files (the card, ``pruning_summary.json``) go through this.
    """
    if isinstance(value, dict):
        return {k: scrub_local_paths(v, paths) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_local_paths(v, paths) for v in value)
    if not isinstance(value, str):
        return value
    forms = []
    for path in paths:
        if not path:
            continue
        path = os.fspath(path)
        for form in {path.rstrip(os.sep), os.path.abspath(os.path.expanduser(path)), os.path.realpath(os.path.expanduser(path))}:
            if os.path.isabs(form) or form.startswith("~"):
                forms.append((form, os.path.basename(os.path.normpath(form))))
    text = value
    for form, base in sorted(forms, key=lambda f: -len(f[0])):  # longest first: a folder inside another
        text = text.replace(form, base)
    home = os.path.expanduser("~")
    if home and home not in ("/", "~"):
        text = re.sub(re.escape(home.rstrip(os.sep)) + r"(?=[/\\]|\b)", "~", text)
    # Any other absolute path (a cache folder, a temporary folder): only its last component is kept.
    text = _ABSOLUTE_PATH.sub(lambda m: ".../" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)
    user = _user_name()
    if user:
        text = re.sub(r"(?<=[/\\])" + re.escape(user) + r"(?=[/\\])", "<user>", text)
    return text


# Two or more components after a leading slash that does not continue a URL, a word or a relative path.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~<>-])/(?:[\w.@+-]+/)+[\w.@+-]+")


def _user_name() -> Optional[str]:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name known: nothing to scrub
        return None


def method_phrase(criterion: str, process: str) -> str:
    """How the card's first sentence names the method: the criterion that chose the units and the process."""
    how = "with gradient flow" if criterion.startswith("gradient_flow") else f"by {criterion.split(' ')[0]} scores"
    when = "in one shot, then fine-tuned" if process == "one-shot" else "through a progressive soft and hard pruning stage"
    return f"{how}, {when}"


def method_tag(criterion: str) -> str:
    return "gradient-flow" if criterion.startswith("gradient_flow") else f"criterion-{criterion.split(' ')[0].replace('_', '-')}"


def make_model_card(info: CardInfo):
    """A ``huggingface_hub.ModelCard`` for a pruning run."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    repo_id = info.repo_id or f"<user>/{info.repo_name}"
    eval_results = [
        EvalResult(
            task_type="unconditional-image-generation",
            dataset_type=m.dataset_type,
            dataset_name=m.dataset_name,
            metric_type=m.key,
            metric_name=m.name,
            metric_value=float(m.value),
        )
        for m in info.metrics
    ]
    card_data = ModelCardData(
        model_name=info.repo_name,
        base_model=info.base_model if info.base_model_on_hub else None,
        datasets=[info.dataset] if info.dataset_on_hub else None,
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        license="apache-2.0",
        tags=["diffusers", _kind(info.pipeline_class).card_tag, "pruning", "structured-pruning", method_tag(info.criterion),
              "diffusers-gfprune",
              f"layout-{info.layout}"],
        eval_results=eval_results or None,
    )
    if info.metrics:
        rows = "\n".join(f"| {m.name} | {m.value:.4g} | {m.how} |" for m in info.metrics)
        metrics_section = "| metric | value | how it was measured |\n|---|---:|---|\n" + rows
    else:
        metrics_section = "No quality metric was computed for this run."
    if info.not_computed:
        metrics_section += "\n\nNot computed:\n" + "\n".join(f"- {name}: {why}" for name, why in info.not_computed)
    for path, caption in info.extra_images:
        metrics_section += f"\n\n![{caption}]({path})\n\n*{caption}*"
    hyper = "\n".join(f"- `{k}`: {v}" for k, v in info.hyperparameters.items())
    layout_description = (
        "plain `UNet2DModel` (stock layout): the same fraction of every unit family was kept, so it loads anywhere."
        if info.layout == "stock"
        else "per-layer pruned `UNet2DModel` subclass: each layer keeps the width the criterion chose."
    )
    reembedding_line = (
        f"- Time embedding: the stock config ties the time sinusoid to the first level's width, so it was re-embedded "
        f"once before pruning (relative change of the time embedding: {info.time_reembedding_error:.4f})."
        if info.time_reembedding_error is not None
        else ""
    )
    card = ModelCard.from_template(
        card_data,
        template_path=template_path(),
        model_name=info.repo_name,
        base_model_display=f"`{info.base_model}`",
        method_phrase=method_phrase(info.criterion, info.process),
        params_dense=_human(info.params_dense),
        params_pruned=_human(info.params_pruned),
        params_ratio=f"{info.params_pruned / info.params_dense:.3f}",
        macs_dense=_human(info.macs_dense),
        macs_pruned=_human(info.macs_pruned),
        macs_ratio=f"{info.macs_pruned / info.macs_dense:.3f}",
        macs_dense_noattn=_human(info.macs_dense_noattn),
        macs_pruned_noattn=_human(info.macs_pruned_noattn),
        macs_noattn_ratio=f"{info.macs_pruned_noattn / info.macs_dense_noattn:.3f}",
        layout_description=layout_description,
        grid_path=info.grid_path,
        grid_sampler=info.grid_sampler,
        loading_snippet=loading_snippet(info.layout, repo_id, info.pipeline_class),
        loading_note=loading_note(info.layout, info.pipeline_class),
        resolution_text=(f"{info.resolution}x{info.resolution}"
                         + (" (latents; the autoencoder's cost is not included)" if _kind(info.pipeline_class).frozen_components else "")),
        metrics_section=metrics_section,
        dataset_display=f"`{info.dataset}`",
        criterion=info.criterion,
        criterion_note=(f" ({info.criterion_note})" if info.criterion_note else ""),
        target_description=info.target_description,
        sparsity=f"{info.sparsity:.4g}",
        layout=info.layout,
        soft_steps=info.soft_steps,
        pruning_steps=info.pruning_steps,
        rescore_every=info.rescore_every,
        sparsity_schedule=info.sparsity_schedule,
        mask_schedule=info.mask_schedule,
        max_train_steps=info.max_train_steps,
        schedule_line=(
            f"one shot: the dense teacher scored once, pruned and exported at step 0, then fine-tuned to step {info.max_train_steps}."
            if info.process == "one-shot" else
            f"progressive soft phase for {info.soft_steps} steps (sparsity `{info.sparsity_schedule}`, mask value "
            f"`{info.mask_schedule}`),\n  hard phase with reactivation to step {info.pruning_steps}, re-scoring every "
            f"{info.rescore_every} steps; export at step {info.pruning_steps}, then fine-tuning to step {info.max_train_steps}."
        ),
        reembedding_line=reembedding_line,
        hyperparameters=hyper or "-",
    )
    card.content = scrub_local_paths(card.content, info.local_paths)
    return card


def check_folder_complete(folder: str) -> None:
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, f))]
    weights = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    if not os.path.isfile(weights):
        missing.append("unet/diffusion_pytorch_model.safetensors")
    if missing:
        raise ValueError(f"{folder} is not a finished pipeline folder (missing {missing}); nothing was pushed.")


def push_folder(folder: str, repo_id: str, token: Optional[str] = None, private: bool = False, commit_message: Optional[str] = None) -> str:
    """Create the repo if needed and upload the finished folder (no checkpoints, logs or hidden files).

    Returns the commit URL. The token goes to huggingface_hub only.
    """
    from huggingface_hub import create_repo, upload_folder

    check_folder_complete(folder)
    repo = create_repo(repo_id, token=token, private=private, exist_ok=True)
    commit = upload_folder(
        repo_id=repo.repo_id,
        folder_path=folder,
        token=token,
        ignore_patterns=PUSH_IGNORE_PATTERNS,
        commit_message=commit_message or "Upload pruned pipeline (diffusers-gfprune)",
    )
    return str(commit)
