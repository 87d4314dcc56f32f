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
"""The pipeline of a published per-layer pruned DDPM: a ``DDPMPipeline`` that also carries its ``pruning_info``.

This file is self-contained on purpose (only torch, diffusers and the standard library): it is copied to the root of
an exported pipeline, which model_index.json names as ``"_class_name": ["pipeline_gfprune_ddpm",
"GFPruneDDPMPipeline"]``, and loaded there with ``trust_remote_code=True``.
"""

import copy
import math
import os
from typing import Any, Dict, Optional

import diffusers
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
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


def _local_subclasses(base: type, class_name: str) -> list:
    # Classes named `class_name` that this process imported itself, not code diffusers loaded from a repository.
    found, todo = [], [base]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__name__ == class_name and cls.__module__.split(".")[0] != DIFFUSERS_DYNAMIC_MODULE_NAME:
            found.append(cls)
    return list(dict.fromkeys(found))


class GFPruneDDPMPipeline(DDPMPipeline):
    r"""
    A [`DDPMPipeline`] for a structurally pruned UNet, which also records how the UNet was pruned.

    Sampling is exactly `DDPMPipeline.__call__`. `pruning_info` is stored in the pipeline's config, so it is saved in
    `model_index.json` and restored by `from_pretrained`.

    Parameters
    ----------
    unet : UNet2DModel
        The pruned UNet (typically a `PrunedUNet2DModel`, a `UNet2DModel` subclass with per-layer widths).
    scheduler : DDPMScheduler
        The scheduler, as for `DDPMPipeline`.
    pruning_info : dict, optional
        JSON data describing the pruning, e.g. `base_model`, `criterion`, `sparsity`, `layout`,
        `params: {"dense", "pruned"}` and `macs: {"dense", "pruned"}`. Defaults to `{}`.
    """

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, pruning_info: Optional[Dict[str, Any]] = None):
        super().__init__(unet=unet, scheduler=scheduler)
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
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "GFPruneDDPMPipeline":
        r"""
        Load a saved pipeline with the classes of this process, or with the repository's code if trusted.

        `DiffusionPipeline.from_pretrained` always runs the pipeline and model code shipped in a repository (and
        refuses without `trust_remote_code=True`), even when called on this class. Called on this class without
        `trust_remote_code`, this method runs no code from the repository: it builds this class, loads a `diffusers`
        unet class from diffusers, and a custom one (e.g. `["modeling_pruned_unet", "PrunedUNet2DModel"]`) with the
        class of that name already imported in this process (import the package that defines it first). The
        scheduler always comes from diffusers.

        Parameters
        ----------
        pretrained_model_name_or_path : str or os.PathLike
            A local folder or a Hub repository id.
        trust_remote_code : bool, default False
            If True, defer to `DiffusionPipeline.from_pretrained`, which runs the repository's code: the result is
            then an instance of the repository's `GFPruneDDPMPipeline`, not necessarily of this class.
        unet, scheduler : optional
            Ready components to use instead of loading them.
        **kwargs
            `cache_dir`, `force_download`, `proxies`, `local_files_only`, `token`, `revision` apply to every file;
            any other keyword (e.g. `torch_dtype`, `variant`, `use_safetensors`) is passed to the unet's
            `from_pretrained`.
        """
        if kwargs.get("trust_remote_code", False):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        kwargs.pop("trust_remote_code", None)
        unet = kwargs.pop("unet", None)
        scheduler = kwargs.pop("scheduler", None)
        hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}

        config = cls.load_config(pretrained_model_name_or_path, **hub_kwargs)
        if scheduler is None:
            library, class_name = config["scheduler"]
            if library != "diffusers":
                raise ValueError(f"scheduler {[library, class_name]} is not a diffusers scheduler; pass `scheduler=`.")
            scheduler = getattr(diffusers, class_name).from_pretrained(
                pretrained_model_name_or_path, subfolder="scheduler", **hub_kwargs
            )
        if unet is None:
            library, class_name = config["unet"]
            if library == "diffusers":
                unet_class = getattr(diffusers, class_name)
            else:
                candidates = _local_subclasses(UNet2DModel, class_name)
                if len(candidates) != 1:
                    found = [f"{c.__module__}.{c.__qualname__}" for c in candidates]
                    raise ValueError(
                        f"The unet is custom code {[library, class_name]} and this process has imported "
                        f"{found if found else 'no'} UNet2DModel subclass named {class_name!r} (exactly one is "
                        "needed). Import the package that defines it before loading, pass `unet=`, or pass "
                        "`trust_remote_code=True` to run the repository's code."
                    )
                unet_class = candidates[0]
            unet = unet_class.from_pretrained(pretrained_model_name_or_path, subfolder="unet", **hub_kwargs, **kwargs)

        pipeline = cls(unet=unet, scheduler=scheduler, pruning_info=config.get("pruning_info"))
        pipeline.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipeline
