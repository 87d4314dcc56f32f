"""Save a pruned UNet as a published pipeline variant: ``GFPruneDDPMPipeline`` (pixel teachers) or
``GFPruneLDMPipeline`` (latent teachers, with the teacher's ``vqvae``), with its ``pruning_info``.

The saved folder (or Hub repository) is::

    model_index.json            "_class_name": ["pipeline_gfprune_ddpm", "GFPruneDDPMPipeline"],
                                "unet": ["modeling_pruned_unet", "PrunedUNet2DModel"],
                                "scheduler": ["diffusers", "DDPMScheduler"], "pruning_info": {...}
    pipeline_gfprune_ddpm.py    the pipeline class (self-contained)
    scheduler/scheduler_config.json
    unet/config.json
    unet/diffusion_pytorch_model.safetensors
    unet/modeling_pruned_unet.py  the unet class (self-contained)

and loads without this package with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` or
``DDPMPipeline.from_pretrained(folder, trust_remote_code=True)`` (both give a ``GFPruneDDPMPipeline``), or, in a
process that has this package, with ``GFPruneDDPMPipeline.from_pretrained(folder)`` after
``from pipelines.pipeline_gfprune_ddpm import GFPruneDDPMPipeline`` (no code from the folder runs then).

A latent teacher's folder is the same with ``vqvae/`` (the teacher's ``VQModel``, unchanged) and
``"_class_name": ["pipeline_gfprune_ldm", "GFPruneLDMPipeline"]``; it loads with
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` or ``LDMPipeline.from_pretrained(folder,
trust_remote_code=True)``. Which variant a teacher gets is its pipeline kind's (:mod:`diffusers_gfprune.pipeline_kinds`).
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Dict

from diffusers import SchedulerMixin, UNet2DModel, VQModel

from pipelines.pipeline_gfprune_ddpm import GFPruneDDPMPipeline
from pipelines.pipeline_gfprune_ldm import GFPruneLDMPipeline

from .modeling_pruned_unet import PrunedUNet2DModel, save_pruned_pipeline

REQUIRED_KEYS = ("base_model", "criterion", "sparsity", "layout", "params", "macs")


def check_pruning_info(pruning_info: Dict[str, Any], unet: UNet2DModel | None = None) -> None:
    """Raise ``ValueError`` unless ``pruning_info`` has the keys a published pipeline must carry.

    ``base_model``, ``criterion``, ``layout``: str; ``sparsity``: a number; ``params`` and ``macs``: dicts with
    numeric ``dense`` and ``pruned``. Other keys are free (JSON data only, checked by the pipeline). If ``unet`` is
    given, ``params["pruned"]`` must be its number of parameters.
    """
    if not isinstance(pruning_info, dict):
        raise ValueError(f"pruning_info must be a dict, got {type(pruning_info).__name__}.")
    missing = [k for k in REQUIRED_KEYS if k not in pruning_info]
    if missing:
        raise ValueError(f"pruning_info lacks {missing}; a published pipeline records {list(REQUIRED_KEYS)}.")
    for key in ("base_model", "criterion", "layout"):
        if not isinstance(pruning_info[key], str):
            raise ValueError(f"pruning_info[{key!r}] must be a str, got {pruning_info[key]!r}.")

    def is_number(value):
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    if not is_number(pruning_info["sparsity"]):
        raise ValueError(f"pruning_info['sparsity'] must be a number, got {pruning_info['sparsity']!r}.")
    for key in ("params", "macs"):
        value = pruning_info[key]
        if not isinstance(value, dict) or not all(is_number(value.get(k)) for k in ("dense", "pruned")):
            raise ValueError(f"pruning_info[{key!r}] must be a dict with numeric 'dense' and 'pruned', got {value!r}.")
    if unet is not None:
        count = sum(p.numel() for p in unet.parameters())
        if pruning_info["params"]["pruned"] != count:
            raise ValueError(
                f"pruning_info['params']['pruned'] is {pruning_info['params']['pruned']} but the unet has {count} "
                "parameters."
            )


def save_gfprune_pipeline(
    unet: UNet2DModel,
    scheduler: SchedulerMixin,
    pruning_info: Dict[str, Any],
    save_directory: str | os.PathLike,
    vqvae: VQModel | None = None,
) -> GFPruneDDPMPipeline | GFPruneLDMPipeline:
    """Save ``unet`` and ``scheduler`` as a ``GFPruneDDPMPipeline`` carrying ``pruning_info``, and return it
    (with ``vqvae``: a ``GFPruneLDMPipeline``).

    The folder holds the pipeline's code (``pipeline_gfprune_ddpm.py``) and, for a :class:`PrunedUNet2DModel`, the
    unet's code (``unet/modeling_pruned_unet.py``); weights are safetensors only. It is written next to
    ``save_directory`` and renamed into place (see :func:`save_pruned_pipeline`), replacing an existing folder.
    Loading it runs that code, so diffusers requires ``trust_remote_code=True`` (this function never sets it for
    anyone); see the module docstring for the calls that load it.

    Parameters
    ----------
    unet : UNet2DModel
        The pruned UNet, usually a :class:`PrunedUNet2DModel` (a stock ``UNet2DModel`` also works and ships no unet
        code, but then a plain ``DDPMPipeline`` is the simpler publication).
    scheduler : SchedulerMixin
        The scheduler, e.g. the teacher's ``DDPMScheduler``.
    pruning_info : dict
        JSON data with at least ``base_model``, ``criterion``, ``sparsity``, ``layout``, ``params`` and ``macs``
        (each ``{"dense": ..., "pruned": ...}``); ``params["pruned"]`` must be the unet's parameter count.
    save_directory : str or os.PathLike
        The folder to write.
    vqvae : VQModel, optional
        A latent teacher's autoencoder: the folder is then a ``GFPruneLDMPipeline`` (``LDMPipeline`` variant).

    Raises
    ------
    ValueError
        If ``pruning_info`` lacks a required key, is not JSON data, or disagrees with the unet's parameter count.
    """
    if not isinstance(unet, UNet2DModel):
        raise ValueError(f"unet must be a UNet2DModel (e.g. a PrunedUNet2DModel), got {type(unet).__name__}.")
    check_pruning_info(pruning_info, unet)
    if vqvae is not None:
        pipeline = GFPruneLDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler, pruning_info=pruning_info)
    else:
        pipeline = GFPruneDDPMPipeline(unet=unet, scheduler=scheduler, pruning_info=pruning_info)
    save_pruned_pipeline(pipeline, save_directory, safe_serialization=True)
    return pipeline


__all__ = ["GFPruneDDPMPipeline", "GFPruneLDMPipeline", "PrunedUNet2DModel", "check_pruning_info", "save_gfprune_pipeline"]
