"""Prunable units of a ``UNet2DModel``, derived from Torch-Pruning's dependency graph.

A *family* is a set of coupled channels: every layer that reads or writes one of them must lose it
together with the others (a residual stream, the hidden width of one ResNet block, the inner width of
one attention layer, the time embedding). A family is cut into *units*, the smallest pieces that can
be removed: a whole GroupNorm group where the family owns a GroupNorm (so removing a unit never
changes the statistics of the groups that stay), a whole head in multi-head attention, one channel
otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

OUT = "out"
IN = "in"


@dataclass
class ChannelSlice:
    """Where the channels of one family sit in one layer.

    ``layer_index[k]`` is the index, along the layer's ``dim`` (``"out"`` or ``"in"``), of the family
    channel ``family_index[k]``. A family channel may appear several times in a layer (the same skip
    concatenated twice, or the scale and shift halves of a ``scale_shift`` time projection).
    """

    module: str
    dim: str
    family_index: torch.Tensor
    layer_index: torch.Tensor


@dataclass
class UnitFamily:
    """A set of coupled channels and how it is cut into units."""

    name: str
    kind: str
    num_channels: int
    unit_size: int
    slices: List[ChannelSlice] = field(default_factory=list)

    @property
    def num_units(self) -> int:
        return self.num_channels // self.unit_size

    def channel_to_unit(self) -> torch.Tensor:
        return torch.arange(self.num_channels) // self.unit_size


@dataclass
class UnitSet:
    """All unit families of one model, in a fixed order (the order of the mask state dict)."""

    families: List[UnitFamily]
    group_norms: Dict[str, Tuple[int, int]]  # GroupNorm name -> dense (num_groups, num_channels)
    macs_source: Optional[object] = field(default=None, repr=False, compare=False)  # (model, sample_size)
    _unit_macs: Optional[object] = field(default=None, repr=False, compare=False)

    def unit_macs(self):
        """The :class:`~diffusers_gfprune.unit_macs.UnitMacs` of the model these units were found on (built once)."""
        if self._unit_macs is None:
            if self.macs_source is None:
                raise ValueError("These units were not found by find_units on a model; MACs of a selection are unknown.")
            from .unit_macs import UnitMacs

            model, sample_size = self.macs_source
            self._unit_macs = UnitMacs(model, self, sample_size)
            self.macs_source = None  # do not keep the model alive
        return self._unit_macs

    def __iter__(self):
        return iter(self.families)

    def __len__(self) -> int:
        return len(self.families)

    def __getitem__(self, name: str) -> UnitFamily:
        for family in self.families:
            if family.name == name:
                return family
        raise KeyError(f"No unit family named {name!r}.")

    @property
    def names(self) -> List[str]:
        return [f.name for f in self.families]

    @property
    def num_units(self) -> int:
        return sum(f.num_units for f in self.families)


def export_num_groups(num_channels: int, dense_num_groups: int, dense_num_channels: int) -> int:
    """Number of GroupNorm groups for ``num_channels`` kept channels of a dense GroupNorm.

    The channels per group of the dense layer are kept when they divide the kept channels (always
    true in the stock layout); otherwise the divisor of ``num_channels`` nearest to them is used.
    The masked model and the exported model both call this, so they normalize alike.
    """
    if num_channels < 1:
        raise ValueError("A GroupNorm must keep at least one channel.")
    per_group = dense_num_channels // dense_num_groups
    if num_channels % per_group == 0:
        return num_channels // per_group
    divisors = [d for d in range(1, num_channels + 1) if num_channels % d == 0]
    best = min(divisors, key=lambda d: (abs(d - per_group), d))
    return num_channels // best


class _UnionFind:
    def __init__(self):
        self.parent: Dict[tuple, tuple] = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


# Block types whose channel coupling the unit model covers (exactness tested in tests/test_config_space.py).
SUPPORTED_DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
SUPPORTED_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")
SKIP_BLOCKS = ("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D")


def check_unet_config(config) -> None:
    """Refuse, with the reason and what to do instead, a ``UNet2DModel`` config the unit model does not cover.

    Called by :func:`find_units` before any tracing, and usable on a config alone (a Hub teacher's
    ``config.json``) before any weights are loaded.
    """
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    blocks = list(get("down_block_types", ()) or ()) + list(get("up_block_types", ()) or ())
    skip = sorted({b for b in blocks if b in SKIP_BLOCKS})
    if skip:
        raise ValueError(
            f"This UNet2DModel uses the skip blocks {skip} (the NCSN++ / score-SDE layout), which diffusers-gfprune "
            "does not prune: those blocks size their GroupNorms from the width (min(channels // 4, 32) groups) instead "
            "of norm_num_groups, so a stock model with narrower blocks groups its channels differently from the dense "
            "one, and they carry a 3-channel image path (FIR resampling, skip_conv) beside the feature stream that the "
            f"unit model does not trace. Supported down blocks: {list(SUPPORTED_DOWN_BLOCKS)}; up blocks: {list(SUPPORTED_UP_BLOCKS)}."
        )
    down = [b for b in get("down_block_types", ()) or () if b not in SUPPORTED_DOWN_BLOCKS]
    up = [b for b in get("up_block_types", ()) or () if b not in SUPPORTED_UP_BLOCKS]
    if down or up:
        raise ValueError(
            f"This UNet2DModel uses the block types {sorted(set(down + up))}, which diffusers-gfprune does not prune "
            "(in UNet2DModel they need a cross-attention context or take no time embedding). Supported down blocks: "
            f"{list(SUPPORTED_DOWN_BLOCKS)}; up blocks: {list(SUPPORTED_UP_BLOCKS)}; mid block: UNetMidBlock2D or None."
        )
    if get("mid_block_type", "UNetMidBlock2D") not in ("UNetMidBlock2D", None):
        raise ValueError(f"mid_block_type={get('mid_block_type')!r} is not supported; use 'UNetMidBlock2D' or None.")
    if get("class_embed_type") == "identity":
        raise ValueError(
            "class_embed_type='identity' adds the caller's class_labels tensor to the time embedding, so its width is "
            "part of the model's input and the time embedding cannot be pruned. Use num_class_embeds (an embedding "
            "table) or class_embed_type='timestep', which diffusers-gfprune prunes."
        )
    if get("class_embed_type") not in (None, "timestep"):
        raise ValueError(f"class_embed_type={get('class_embed_type')!r} is not supported; use None, 'timestep' or num_class_embeds.")


def _check_unet(model) -> None:
    from diffusers import UNet2DModel

    if not isinstance(model, UNet2DModel):
        raise TypeError(
            f"Expected a diffusers UNet2DModel, got {type(model).__name__}. diffusers-gfprune prunes "
            "UNet2DModel DDPMs; load one with UNet2DModel.from_pretrained(repo, subfolder='unet')."
        )
    check_unet_config(model.config)


def example_class_labels(model, batch: int = 1) -> Optional[torch.Tensor]:
    """Class labels a forward pass of a class-conditional model needs (None for an unconditional one)."""
    if model.class_embedding is None:
        return None
    device = next(model.parameters()).device
    return torch.arange(batch, device=device) % (model.config.num_class_embeds or 1)


def _example_inputs(model, sample_size: Optional[int]) -> Dict[str, torch.Tensor]:
    size = sample_size or model.config.sample_size
    if isinstance(size, int):
        size = (size, size)
    param = next(model.parameters())
    sample = torch.randn(1, model.config.in_channels, *size, device=param.device, dtype=param.dtype)
    timestep = torch.tensor([1], device=param.device)
    inputs = {"sample": sample, "timestep": timestep}
    labels = example_class_labels(model)
    if labels is not None:
        inputs["class_labels"] = labels
    return inputs


def find_units(model, sample_size: Optional[int] = None) -> UnitSet:
    """Find the prunable unit families of a ``UNet2DModel``.

    The coupling of channels comes from Torch-Pruning's ``DependencyGraph`` traced on one forward
    pass. The input and output image channels are never prunable.

    Parameters
    ----------
    model : UNet2DModel
        The dense model (its weights are not changed).
    sample_size : int, optional
        Spatial size of the traced example; defaults to ``model.config.sample_size``. A smaller size
        traces faster and finds the same coupling.

    Returns
    -------
    UnitSet
    """
    import torch_pruning as tp
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    _check_unet(model)
    names = {module: name for name, module in model.named_modules()}
    param_modules = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Embedding)
    # Torch-Pruning traces the autograd graph: parameters must require grad while it runs.
    flags = [p.requires_grad for p in model.parameters()]
    try:
        model.requires_grad_(True)
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=_example_inputs(model, sample_size),
                forward_fn=lambda m, inputs: m(**inputs).sample,
            )
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)

    # One node per (layer, dim, index); channels coupled in any Torch-Pruning group are merged.
    uf = _UnionFind()
    sizes: Dict[Tuple[str, str], int] = {}
    for group in graph.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
        by_root: Dict[int, list] = {}
        for item in group:
            module = item.dep.target.module
            if not isinstance(module, param_modules) or module not in names:
                continue
            # An embedding table produces its channels (Torch-Pruning may list it as an input dimension).
            out = isinstance(module, nn.Embedding) or graph.is_out_channel_pruning_fn(item.dep.handler)
            dim = OUT if out else IN
            key = (names[module], dim)
            sizes[key] = _layer_size(module, dim)
            for idx, root in zip(item.idxs, item.root_idxs):
                by_root.setdefault(root, []).append((key[0], key[1], int(idx)))
        for nodes in by_root.values():
            for node in nodes[1:]:
                uf.union(nodes[0], node)

    # Torch-Pruning does not see that the two halves of a scale_shift time projection (chunked,
    # then ``h * (1 + scale) + shift``) both belong to channel c of the block.
    for name, module in model.named_modules():
        if isinstance(module, ResnetBlock2D) and module.time_emb_proj is not None:
            if module.time_embedding_norm == "scale_shift":
                proj = f"{name}.time_emb_proj"
                half = module.time_emb_proj.out_features // 2
                for c in range(half):
                    uf.union((f"{name}.norm2", OUT, c), (proj, OUT, c))
                    uf.union((f"{name}.norm2", OUT, c), (proj, OUT, c + half))

    components: Dict[tuple, List[tuple]] = {}
    for node in list(uf.parent):
        components.setdefault(uf.find(node), []).append(node)

    protected = {("conv_out", OUT), ("conv_in", IN)}
    by_signature: Dict[frozenset, List[List[tuple]]] = {}
    for nodes in components.values():
        signature = frozenset((n[0], n[1]) for n in nodes)
        if signature & protected:
            continue
        by_signature.setdefault(signature, []).append(nodes)

    group_norms = {
        n: (m.num_groups, m.num_channels) for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)
    }
    attentions = {n: m for n, m in model.named_modules() if isinstance(m, Attention)}

    families = []
    for signature, channels in by_signature.items():
        families.append(_make_family(signature, channels, sizes, group_norms, attentions, model))
    if not families:
        raise RuntimeError("No prunable channels were found in this model; please report its config.")
    families.sort(key=lambda f: _module_order(model, f.name))
    _check_unique_names(families)
    units = UnitSet(families=families, group_norms=group_norms)
    units.macs_source = (model, sample_size)
    return units


def _layer_size(module: nn.Module, dim: str) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels if dim == OUT else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if dim == OUT else module.in_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    return module.num_channels


def _module_order(model, name: str) -> int:
    for i, (n, _) in enumerate(model.named_modules()):
        if n == name:
            return i
    return 10**9


def _make_family(signature, channels, sizes, group_norms, attentions, model) -> UnitFamily:
    # Canonical channel order: a producing layer that holds each channel once, preferring a
    # GroupNorm that covers exactly this family (its groups then are contiguous units).
    n = len(channels)
    counts: Dict[Tuple[str, str], int] = {}
    for nodes in channels:
        for m, d, _ in nodes:
            counts[(m, d)] = counts.get((m, d), 0) + 1
    once = [k for k in sorted(signature) if k[1] == OUT and counts[k] == n and sizes[k] >= n]
    own_norms = [k for k in once if k[0] in group_norms and group_norms[k[0]][1] == n]
    candidates = own_norms or once
    if not candidates:
        raise RuntimeError(f"Cannot order the coupled channels {sorted(signature)[:4]}...: no layer produces them once.")
    canonical = min(candidates, key=lambda k: _module_order(model, k[0]))
    position = {}
    for nodes in channels:
        pos = [i for m, d, i in nodes if (m, d) == canonical]
        position[id(nodes)] = pos[0]
    channels = sorted(channels, key=lambda nodes: position[id(nodes)])

    slices: Dict[Tuple[str, str], Tuple[list, list]] = {}
    for fc, nodes in enumerate(channels):
        for m, d, i in nodes:
            fam_idx, lay_idx = slices.setdefault((m, d), ([], []))
            fam_idx.append(fc)
            lay_idx.append(i)

    unit_size = 1
    for key in own_norms:
        num_groups, num_channels = group_norms[key[0]]
        unit_size = math.lcm(unit_size, num_channels // num_groups)
    kind = "stream"
    modules = {m for m, _ in signature}
    for attn_name, attn in attentions.items():
        if (f"{attn_name}.to_q", OUT) in signature:
            kind = "attention_inner"
            if attn.heads > 1:
                unit_size = math.lcm(unit_size, attn.inner_dim // attn.heads)
    if kind == "stream":
        if ("time_embedding.linear_1", OUT) in signature:
            kind = "time_hidden"
        elif ("time_embedding.linear_2", OUT) in signature:
            kind = "time_embedding"
        elif any(m.endswith(".conv1") and (m, OUT) in signature for m in modules):
            kind = "resnet_hidden"
    if n % unit_size:
        unit_size = 1

    family = UnitFamily(name=canonical[0], kind=kind, num_channels=n, unit_size=unit_size)
    for (m, d), (fam_idx, lay_idx) in sorted(slices.items(), key=lambda kv: (_module_order(model, kv[0][0]), kv[0][1])):
        family.slices.append(
            ChannelSlice(m, d, torch.tensor(fam_idx, dtype=torch.long), torch.tensor(lay_idx, dtype=torch.long))
        )
    return family


def _check_unique_names(families: List[UnitFamily]) -> None:
    seen = set()
    for family in families:
        if family.name in seen:
            raise RuntimeError(f"Two unit families are named {family.name!r}.")
        seen.add(family.name)
