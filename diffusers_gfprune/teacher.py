"""The teacher: a Hub id or a local folder, holding a UNet2DModel pipeline or a bare UNet2DModel.

The pipeline's kind (pixel: ``DDPMPipeline``, ``DDIMPipeline``, ``PNDMPipeline``; latent: ``LDMPipeline``) is
read from its ``model_index.json`` (:mod:`diffusers_gfprune.pipeline_kinds`), and an unsupported class is
refused there. Only safetensors weights are loaded (never pickles). The configs are read and checked before
any weights are, so a wrong teacher is reported before heavy work.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from .pipeline_kinds import PipelineKind, PixelKind, kind_for_index

logger = logging.getLogger(__name__)

SUPPORTED_CLASSES = ("UNet2DModel", "PrunedUNet2DModel")


@dataclass
class TeacherSource:
    """Where the teacher's UNet (and scheduler, if any) live."""

    path: str  # Hub id or local folder
    revision: Optional[str]
    unet_subfolder: Optional[str]  # "unet" for a pipeline, None for a bare UNet
    has_scheduler: bool
    unet_config: dict
    # What kind of pipeline it is (not yet loaded: see load_kind); a bare UNet is a pixel DDPM.
    kind: PipelineKind = field(default_factory=PixelKind)

    @property
    def class_name(self) -> str:
        return self.unet_config.get("_class_name", "")


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _hub_json(repo_id: str, filename: str, revision, cache_dir, token) -> Optional[dict]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return _read_json(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, token=token))
    except EntryNotFoundError:
        return None


def resolve_teacher(path: str, revision: Optional[str] = None, cache_dir: Optional[str] = None, token=None) -> TeacherSource:
    """Find the teacher's UNet config (a cheap read) and check that it is a ``UNet2DModel``."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if not path:
        raise ValueError(
            "No teacher given: pass --pretrained_model_name_or_path with a Hub id (e.g. google/ddpm-cifar10-32) "
            "or a local folder holding a DDPMPipeline, DDIMPipeline, PNDMPipeline, LDMPipeline or a UNet2DModel."
        )
    if os.path.isdir(path):
        index = os.path.join(path, "model_index.json")
        if os.path.isfile(index):
            model_index = _read_json(index)
            kind = kind_for_index(model_index, path)  # refuses an unsupported pipeline class first
            config_path = os.path.join(path, "unet", "config.json")
            if not os.path.isfile(config_path):
                raise ValueError(f"{path} holds a pipeline without a 'unet' component; the teacher must be a UNet2DModel DDPM.")
            configs = {}
            for name in kind.frozen_components:
                component_config = os.path.join(path, name, "config.json")
                if not os.path.isfile(component_config):
                    raise ValueError(f"{path} lists a {name!r} component but has no {name}/config.json.")
                configs[name] = _read_json(component_config)
            kind = kind_for_index(model_index, path, configs)
            return TeacherSource(path, revision, "unet", os.path.isdir(os.path.join(path, "scheduler")),
                                 _checked(_read_json(config_path), path), kind)
        config_path = os.path.join(path, "config.json")
        if os.path.isfile(config_path):
            return TeacherSource(path, revision, None, False, _checked(_read_json(config_path), path))
        raise ValueError(f"{path} holds neither a pipeline (model_index.json) nor a model (config.json).")
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ValueError(f"The teacher folder {path!r} does not exist.")
    try:
        index = _hub_json(path, "model_index.json", revision, cache_dir, token)
        if index is not None:
            kind = kind_for_index(index, path)  # refuses an unsupported pipeline class first
            configs = {name: _hub_json(path, f"{name}/config.json", revision, cache_dir, token) or {}
                       for name in kind.frozen_components}
            config = _hub_json(path, "unet/config.json", revision, cache_dir, token) or {}
            return TeacherSource(path, revision, "unet", "scheduler" in index, _checked(config, path),
                                 kind_for_index(index, path, configs))
        config = _hub_json(path, "config.json", revision, cache_dir, token)
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise ValueError(
            f"The teacher {path!r} (revision {revision or 'main'}) was not found on the Hub or is private: "
            "check the id, the --revision, and that you are logged in (HF_TOKEN) for private repos."
        ) from error
    if config is None:
        raise ValueError(f"The Hub repo {path} holds neither a pipeline (model_index.json) nor a model (config.json).")
    return TeacherSource(path, revision, None, False, _checked(config, path))


def _checked(config: dict, where: str) -> dict:
    name = config.get("_class_name")
    if name not in SUPPORTED_CLASSES:
        raise ValueError(
            f"The teacher at {where} is a {name or 'model of unknown class'}, not a UNet2DModel. diffusers-gfprune "
            "prunes unconditional UNet2DModel DDPMs (e.g. google/ddpm-cifar10-32)."
        )
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise ValueError(
            f"The teacher at {where} is class-conditional (num_class_embeds / class_embed_type), but the scripts train "
            "and sample through DDPMPipeline, which passes no class labels. Prune it with the library instead: "
            "find_units, UnitMasks, GradientFlowPruner and export_model take class-conditional UNet2DModels (pass "
            "class_labels in your own training loop)."
        )
    return config


def load_kind(source: TeacherSource, cache_dir: Optional[str] = None, token=None, device=None) -> PipelineKind:
    """The teacher's pipeline kind with its own scheduler and frozen components loaded (safetensors only).

    For a latent teacher that is its ``VQModel``, in eval mode with gradients off; for a pixel teacher nothing but
    the scheduler. ``device``: where the frozen components go.
    """
    kind = source.kind.load_components(source.path, source.revision, cache_dir, token, has_scheduler=source.has_scheduler)
    for note in kind.notes:
        logger.warning("%s", note)
    return kind.to(device) if device is not None else kind


def load_teacher(source: TeacherSource, cache_dir: Optional[str] = None, token=None):
    """Load the UNet (safetensors only) and the training scheduler: a ``DDPMScheduler`` with the teacher's
    scheduler config (its betas and prediction type), else a default 1000-step one. The teacher's own scheduler
    (e.g. a ``DDIMScheduler``) and its frozen components come with :func:`load_kind`."""
    from diffusers import DDPMScheduler, UNet2DModel

    from .modeling_pruned_unet import PrunedUNet2DModel

    cls = PrunedUNet2DModel if source.class_name == "PrunedUNet2DModel" else UNet2DModel
    try:
        unet = cls.from_pretrained(
            source.path, subfolder=source.unet_subfolder, revision=source.revision, cache_dir=cache_dir,
            token=token, use_safetensors=True,
        )
    except (EnvironmentError, OSError) as error:
        if "safetensors" in str(error).lower() or "diffusion_pytorch_model" in str(error):
            raise ValueError(
                f"The teacher {source.path} has no safetensors weights. diffusers-gfprune never loads pickled "
                "weights (.bin). Use a revision with safetensors (many Hub repos have one in a 'refs/pr/N' "
                "conversion pull request: --revision refs/pr/N), or convert the weights yourself with "
                "UNet2DModel.from_pretrained(..., use_safetensors=False).save_pretrained(folder) on a machine you trust."
            ) from error
        raise
    if source.has_scheduler:
        scheduler = DDPMScheduler.from_pretrained(
            source.path, subfolder="scheduler", revision=source.revision, cache_dir=cache_dir, token=token
        )
    else:
        scheduler = DDPMScheduler(num_train_timesteps=1000)
    return unet, scheduler
