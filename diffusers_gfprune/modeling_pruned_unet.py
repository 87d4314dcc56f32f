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
"""A ``UNet2DModel`` whose config records per-layer widths, so a structurally pruned UNet can be rebuilt.

This file is self-contained on purpose (only torch, diffusers and the standard library): it is copied next to the
weights of an exported pipeline and loaded there with ``trust_remote_code=True``.
"""

import inspect
import json
import os
import shutil
import uuid
from typing import Dict, Optional

import torch.nn as nn

# `ModelMixin` is unused here but must be a name of this module: a pipeline saved with plain `save_pretrained` names
# this module in model_index.json, and diffusers looks `ModelMixin` up in it to find the component's load method.
from diffusers import DiffusionPipeline, ModelMixin, UNet2DModel  # noqa: F401
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D


def _factory_kwargs(module: nn.Module) -> dict:
    tensor = next(module.parameters(), None)
    return {} if tensor is None else {"device": tensor.device, "dtype": tensor.dtype}


def _resize_conv(m: nn.Conv2d, in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size=m.kernel_size,
        stride=m.stride,
        padding=m.padding,
        dilation=m.dilation,
        groups=m.groups,
        bias=m.bias is not None,
        padding_mode=m.padding_mode,
        **_factory_kwargs(m),
    )


def _resize_linear(m: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=m.bias is not None, **_factory_kwargs(m))


def _resize_embedding(m: nn.Embedding, num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    return nn.Embedding(num_embeddings, embedding_dim, padding_idx=m.padding_idx, max_norm=m.max_norm,
                        norm_type=m.norm_type, scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse,
                        **_factory_kwargs(m))


def _resize_group_norm(m: nn.GroupNorm, num_groups: int, num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups, num_channels, eps=m.eps, affine=m.affine, **_factory_kwargs(m))


def _resize_attention(m: Attention, heads: int, dim_head: int) -> Attention:
    # Only the attributes the processors read; `to_q`/`to_k`/`to_v`/`to_out.0` are resized by their own entries.
    m.heads = m.sliceable_head_dim = heads
    m.inner_dim = m.inner_kv_dim = heads * dim_head
    m.scale = dim_head**-0.5 if m.scale_qk else 1.0
    return m


def _resize_timesteps(m: Timesteps, num_channels: int) -> Timesteps:
    m.num_channels = num_channels
    return m


def _resize_sampler(m: nn.Module, channels: int, out_channels: Optional[int] = None) -> nn.Module:
    # Downsample2D / Upsample2D assert `channels` at run time; their `conv` is resized by its own entry.
    m.channels = channels
    m.out_channels = channels if out_channels is None else out_channels
    return m


def _resize_resnet(m: ResnetBlock2D, in_channels: int, out_channels: int) -> ResnetBlock2D:
    m.in_channels, m.out_channels = in_channels, out_channels
    return m


# exact module type -> (resize function, required keys, optional keys)
_RESIZERS = {
    nn.Conv2d: (_resize_conv, {"in_channels", "out_channels"}, set()),
    nn.Linear: (_resize_linear, {"in_features", "out_features"}, set()),
    nn.GroupNorm: (_resize_group_norm, {"num_groups", "num_channels"}, set()),
    nn.Embedding: (_resize_embedding, {"num_embeddings", "embedding_dim"}, set()),
    Attention: (_resize_attention, {"heads", "dim_head"}, set()),
    Timesteps: (_resize_timesteps, {"num_channels"}, set()),
    Downsample2D: (_resize_sampler, {"channels"}, {"out_channels"}),
    Upsample2D: (_resize_sampler, {"channels"}, {"out_channels"}),
    ResnetBlock2D: (_resize_resnet, {"in_channels", "out_channels"}, set()),
}


def _supported() -> str:
    return "; ".join(
        f"{t.__name__}: {sorted(req)}" + (f" (optional {sorted(opt)})" if opt else "")
        for t, (_, req, opt) in _RESIZERS.items()
    )


class PrunedUNet2DModel(UNet2DModel):
    r"""
    A [`UNet2DModel`] with arbitrary per-layer widths, as produced by structured pruning.

    The model is first built exactly like a dense `UNet2DModel`, then every submodule named in `pruned_widths` is
    resized. Because the widths are part of the config, `save_pretrained`/`from_pretrained` rebuild the pruned
    architecture before loading its weights.

    Parameters
    ----------
    sample_size, in_channels, out_channels, ..., num_train_timesteps
        The dense architecture, exactly as in [`UNet2DModel`] (same names and defaults).
    pruned_widths : dict of str to dict of str to int, optional
        Maps dotted module names (as in `named_modules()`) to their new sizes. A module that keeps its dense size is
        not listed. Supported module types and keys:

        - `nn.Conv2d`: `{"in_channels", "out_channels"}`
        - `nn.Linear`: `{"in_features", "out_features"}`
        - `nn.GroupNorm`: `{"num_groups", "num_channels"}`
        - `nn.Embedding`: `{"num_embeddings", "embedding_dim"}` (a class embedding, a learned time embedding)
        - `Attention`: `{"heads", "dim_head"}` (its `to_q`/`to_k`/`to_v`/`to_out.0`/`group_norm` are listed
          separately as `nn.Linear`/`nn.GroupNorm`)
        - `Timesteps`: `{"num_channels"}`
        - `Downsample2D`, `Upsample2D`: `{"channels"}`, optionally `"out_channels"` (defaults to `channels`)
        - `ResnetBlock2D`: `{"in_channels", "out_channels"}` (its convs and norms are listed separately)

        Conv, Linear and GroupNorm modules are replaced by fresh modules (every other setting, dtype and device kept);
        the other types only have their width attributes updated.

    Raises
    ------
    ValueError
        If a name is not a submodule, its type is not supported, its keys are not the ones listed above, or an
        attention's `heads * dim_head` disagrees with the widths of its projections.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
        pruned_widths: Optional[Dict[str, Dict[str, int]]] = None,
    ):
        super().__init__(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            center_input_sample=center_input_sample,
            time_embedding_type=time_embedding_type,
            time_embedding_dim=time_embedding_dim,
            freq_shift=freq_shift,
            flip_sin_to_cos=flip_sin_to_cos,
            down_block_types=down_block_types,
            mid_block_type=mid_block_type,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            mid_block_scale_factor=mid_block_scale_factor,
            downsample_padding=downsample_padding,
            downsample_type=downsample_type,
            upsample_type=upsample_type,
            dropout=dropout,
            act_fn=act_fn,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            attn_norm_num_groups=attn_norm_num_groups,
            norm_eps=norm_eps,
            resnet_time_scale_shift=resnet_time_scale_shift,
            add_attention=add_attention,
            class_embed_type=class_embed_type,
            num_class_embeds=num_class_embeds,
            num_train_timesteps=num_train_timesteps,
        )
        self._apply_pruned_widths(pruned_widths or {})

    def _apply_pruned_widths(self, pruned_widths: Dict[str, Dict[str, int]]) -> None:
        if not pruned_widths:
            return
        modules = dict(self.named_modules())
        for name, widths in pruned_widths.items():
            module = modules.get(name) if name else None
            if module is None:
                raise ValueError(f"pruned_widths: {name!r} is not a submodule of {type(self).__name__}.")
            if type(module) not in _RESIZERS:
                raise ValueError(
                    f"pruned_widths: {name!r} is a {type(module).__name__}, which cannot be resized. "
                    f"Supported types and keys: {_supported()}."
                )
            resize, required, optional = _RESIZERS[type(module)]
            if not required <= set(widths) <= required | optional or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in widths.values()
            ):
                raise ValueError(
                    f"pruned_widths: {name!r} ({type(module).__name__}) needs positive integers for the keys "
                    f"{sorted(required)}" + (f" and optionally {sorted(optional)}" if optional else "")
                    + f", got {dict(widths)}."
                )
            new = resize(module, **widths)
            if new is not module:
                parent_name, _, child_name = name.rpartition(".")
                setattr(self.get_submodule(parent_name), child_name, new)

        # Heads that disagree with the projections would silently run with another head size: refuse them.
        for name, attn in self.named_modules():
            if isinstance(attn, Attention):
                widths = {"to_q": attn.to_q.out_features, "to_out.0": attn.to_out[0].in_features}
                if attn.to_k is not None:
                    widths.update({"to_k": attn.to_k.out_features, "to_v": attn.to_v.out_features})
                if set(widths.values()) != {attn.inner_dim}:
                    raise ValueError(
                        f"pruned_widths: attention {name!r} has heads * dim_head = {attn.inner_dim} but its "
                        f"projections have inner widths {widths}; list the attention and its projections consistently."
                    )


def save_pruned_pipeline(
    pipeline: DiffusionPipeline, save_directory: str | os.PathLike, safe_serialization: bool = True
) -> None:
    r"""
    Save a pipeline holding [`PrunedUNet2DModel`] components so it loads without `diffusers_gfprune`.

    Every `PrunedUNet2DModel` component `<name>` gets a copy of this file as `<name>/modeling_pruned_unet.py`, and
    `model_index.json` declares it as `["modeling_pruned_unet", "PrunedUNet2DModel"]`. Any process can then load the
    folder with `DiffusionPipeline.from_pretrained(save_directory, trust_remote_code=True)` (diffusers refuses
    without `trust_remote_code=True`). A pipeline whose class is not from diffusers (e.g. `GFPruneDDPMPipeline`) is
    shipped the same way: a copy of its (self-contained) source file as `<module>.py` at the root of the folder, and
    `"_class_name": ["<module>", "<class>"]` in `model_index.json`. The folder is written next to `save_directory`
    and renamed into place at the end, so an interrupted save leaves no half-written pipeline; an existing
    `save_directory` is replaced.

    Parameters
    ----------
    pipeline : DiffusionPipeline
        The pipeline to save, e.g. a `DDPMPipeline` whose `unet` is a `PrunedUNet2DModel`.
    save_directory : str or os.PathLike
        The folder to write.
    safe_serialization : bool, default True
        Passed to `save_pretrained`; weights are written as safetensors unless set to False.
    """
    save_directory = os.path.abspath(os.fspath(save_directory))
    parent, base = os.path.split(save_directory)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex}")  # not mkdtemp: keep the umask's permissions
    old_dir = None
    try:
        pipeline.save_pretrained(tmp_dir, safe_serialization=safe_serialization)
        index_path = os.path.join(tmp_dir, "model_index.json")
        with open(index_path, encoding="utf-8") as f:
            model_index = json.load(f)
        for name, component in pipeline.components.items():
            # Match by name as well as by class: a unet loaded from remote code is this class from another module.
            if not isinstance(component, UNet2DModel) or type(component).__name__ != PrunedUNet2DModel.__name__:
                continue
            source = inspect.getsourcefile(type(component))
            module_name = os.path.splitext(os.path.basename(source))[0]
            shutil.copyfile(source, os.path.join(tmp_dir, name, module_name + ".py"))
            model_index[name] = [module_name, type(component).__name__]
        pipeline_class = type(pipeline)
        if pipeline_class.__module__.split(".")[0] != "diffusers":
            # A pipeline class from outside diffusers ships as code at the root of the folder; diffusers loads it
            # (with trust_remote_code=True) when `_class_name` is [module, class] and `<module>.py` is there.
            source = inspect.getsourcefile(pipeline_class)
            module_name = os.path.splitext(os.path.basename(source))[0]
            shutil.copyfile(source, os.path.join(tmp_dir, module_name + ".py"))
            model_index["_class_name"] = [module_name, pipeline_class.__name__]
        with open(index_path, "w", encoding="utf-8") as f:
            f.write(json.dumps(model_index, indent=2, sort_keys=True) + "\n")

        if os.path.exists(save_directory):
            old_dir = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex}")
            os.makedirs(old_dir)
            os.rename(save_directory, os.path.join(old_dir, base))
        os.rename(tmp_dir, save_directory)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if old_dir is not None and not os.path.exists(save_directory):
            os.rename(os.path.join(old_dir, base), save_directory)
        raise
    finally:
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
