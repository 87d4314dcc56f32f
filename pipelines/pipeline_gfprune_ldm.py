# Copyright 2026 The diffusers-gfprune authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The pipeline of a published per-layer pruned latent diffusion model: an ``LDMPipeline`` that also carries its
``pruning_info``.

This file is self-contained on purpose (only torch, diffusers and the standard library): it is copied to the root of
an exported pipeline, which model_index.json names as ``"_class_name": ["pipeline_gfprune_ldm",
"GFPruneLDMPipeline"]``, and loaded there with ``trust_remote_code=True``. The autoencoder (``vqvae``) and the
scheduler are the teacher's, unchanged; only the unet is pruned.
"""

import copy
import math
import os
from typing import Any, Dict, Optional

import diffusers
from diffusers import LDMPipeline, UNet2DModel, VQModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import DIFFUSERS_DYNAMIC_MODULE_NAME

# Hub / cache arguments that `from_pretrained` passes to every file it reads.
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


def _check_json_data(value: Any, where: str = "pruning_info") -> None:
    # Only what model_index.json gives back unchanged: dicts with str keys, lists, str, finite numbers, bool, None.
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} must be JSON data: key {key!r} is not a str.")
            _check_json_data(item, f"{where}[{key!r}]")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_data(item, f"{where}[{i}]")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} must be JSON data: {value!r} is not a finite number.")
    elif value is not None and not isinstance(value, (str, bool, int)):
        raise ValueError(
            f"{where} must be JSON data (dict, list, str, int, float, bool, None), got {type(value).__name__}."
        )


def _local_subclass(base: type, class_name: str, library: str) -> type:
    # The one class named `class_name` that this process imported itself (not code diffusers loaded from a repository).
    found, todo = [], [base]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__name__ == class_name and cls.__module__.split(".")[0] != DIFFUSERS_DYNAMIC_MODULE_NAME:
            found.append(cls)
    found = list(dict.fromkeys(found))
    if len(found) != 1:
        names = [f"{c.__module__}.{c.__qualname__}" for c in found]
        raise ValueError(
            f"The unet is custom code {[library, class_name]} and this process has imported {names if names else 'no'} "
            f"{base.__name__} subclass named {class_name!r} (exactly one is needed). Import the package that defines it "
            "before loading, pass `unet=`, or pass `trust_remote_code=True` to run the repository's code."
        )
    return found[0]


class GFPruneLDMPipeline(LDMPipeline):
    r"""
    An [`LDMPipeline`] whose UNet is structurally pruned, and which also records how it was pruned.

    Sampling is exactly `LDMPipeline.__call__`. `pruning_info` is stored in the pipeline's config, so it is saved in
    `model_index.json` and restored by `from_pretrained`.

    Parameters
    ----------
    vqvae : VQModel
        The teacher's autoencoder, unchanged.
    unet : UNet2DModel
        The pruned UNet (typically a `PrunedUNet2DModel`, a `UNet2DModel` subclass with per-layer widths).
    scheduler : SchedulerMixin
        The teacher's scheduler (a `DDIMScheduler` for `LDMPipeline`).
    pruning_info : dict, optional
        JSON data describing the pruning, e.g. `base_model`, `criterion`, `sparsity`, `layout`,
        `params: {"dense", "pruned"}` and `macs: {"dense", "pruned"}`. Defaults to `{}`.
    """

    def __init__(self, vqvae: VQModel, unet: UNet2DModel, scheduler: SchedulerMixin,
                 pruning_info: Optional[Dict[str, Any]] = None):
        super().__init__(vqvae=vqvae, unet=unet, scheduler=scheduler)
        pruning_info = {} if pruning_info is None else pruning_info
        if not isinstance(pruning_info, dict):
            raise ValueError(f"pruning_info must be a dict, got {type(pruning_info).__name__}.")
        _check_json_data(pruning_info)
        self.register_to_config(pruning_info=copy.deepcopy(pruning_info))

    @property
    def pruning_info(self) -> Dict[str, Any]:
        """How the UNet was pruned (a copy: edit it through `register_to_config(pruning_info=...)`)."""
        return copy.deepcopy(dict(self.config.pruning_info))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "GFPruneLDMPipeline":
        r"""
        Load a saved pipeline with the classes of this process, or with the repository's code if trusted.

        Called on this class without `trust_remote_code`, no code from the repository runs: the autoencoder and the
        scheduler come from diffusers, the unet from diffusers or (custom code such as
        `["modeling_pruned_unet", "PrunedUNet2DModel"]`) from the class of that name already imported in this process.
        With `trust_remote_code=True` this defers to `DiffusionPipeline.from_pretrained`, which runs the repository's
        code.

        Parameters
        ----------
        pretrained_model_name_or_path : str or os.PathLike
            A local folder or a Hub repository id.
        trust_remote_code : bool, default False
            See above.
        vqvae, unet, scheduler : optional
            Ready components to use instead of loading them.
        **kwargs
            `cache_dir`, `force_download`, `proxies`, `local_files_only`, `token`, `revision` apply to every file;
            any other keyword (e.g. `torch_dtype`, `use_safetensors`) is passed to the models' `from_pretrained`.
        """
        if kwargs.get("trust_remote_code", False):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        kwargs.pop("trust_remote_code", None)
        given = {name: kwargs.pop(name) for name in ("vqvae", "unet", "scheduler") if kwargs.get(name) is not None}
        hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        config = cls.load_config(pretrained_model_name_or_path, **hub_kwargs)
        parts = {}
        for name, base in (("vqvae", VQModel), ("unet", UNet2DModel), ("scheduler", SchedulerMixin)):
            if name in given:
                parts[name] = given[name]
                continue
            library, class_name = config[name]
            if library == "diffusers":
                component_class = getattr(diffusers, class_name)
            elif base is UNet2DModel:
                component_class = _local_subclass(base, class_name, library)
            else:
                raise ValueError(f"{name} {[library, class_name]} is not a diffusers class; pass `{name}=`.")
            extra = {} if base is SchedulerMixin else kwargs
            parts[name] = component_class.from_pretrained(pretrained_model_name_or_path, subfolder=name, **hub_kwargs, **extra)
        pipeline = cls(**parts, pruning_info=config.get("pruning_info"))
        pipeline.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipeline
