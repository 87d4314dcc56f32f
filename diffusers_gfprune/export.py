"""From a dense model and binary unit masks to a physically smaller model.

Two layouts:

``"stock"``
    The same keep ratio for every unit family, so the result is a plain ``UNet2DModel`` with a
    smaller config (``block_out_channels``, ``norm_num_groups``, ...). It loads everywhere with
    ``DDPMPipeline.from_pretrained`` and no extra code. The stock config ties the time sinusoid to
    ``block_out_channels[0]``, so the dense model must first be given a narrower sinusoid with
    :func:`reembed_time` (once, before pruning starts).
``"per-layer"``
    Any number of units kept per family; the widths are stored in the config of
    :class:`~diffusers_gfprune.modeling_pruned_unet.PrunedUNet2DModel`.

The exported model is built fresh from its config (so every width-dependent attribute, such as
``Attention.heads`` or ``Downsample2D.channels``, is set by diffusers itself) and then receives the
sliced weights; only the softmax scale of a single-head attention whose width changed needs a
correction, folded into ``to_q``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache, reduce
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .masks import UnitMasks
from .selection import check_round_to
from .units import IN, OUT, UnitSet, _check_unet, export_num_groups

LAYOUTS = ("stock", "per-layer")


@dataclass
class TimeReembedding:
    """What :func:`reembed_time` changed and how much the time embedding moved."""

    old_num_channels: int
    new_num_channels: int
    embedding_relative_error: float  # ||emb' - emb|| / ||emb|| over all training timesteps


def check_layout(config, layout: str) -> None:
    """Refuse, before any work, a layout that cannot hold this ``UNet2DModel`` config.

    The stock config ties the time sinusoid to ``block_out_channels[0]``, so the stock layout narrows
    the positional sinusoid (:func:`reembed_time`); a Fourier or learned time embedding, or a
    ``class_embed_type="timestep"`` that embeds the labels with the same sinusoid, cannot be narrowed
    that way. The per-layer layout keeps the sinusoid and holds all of them.
    """
    from .units import check_unet_config

    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; choose one of {LAYOUTS}.")
    check_unet_config(config)
    if layout != "stock":
        return
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    if get("time_embedding_type", "positional") != "positional":
        raise ValueError(
            "The stock layout re-embeds the positional time sinusoid at the pruned width; this model uses "
            f"time_embedding_type={get('time_embedding_type')!r}. Use layout='per-layer'."
        )
    if get("class_embed_type") == "timestep":
        raise ValueError(
            "The stock layout narrows the time sinusoid, which class_embed_type='timestep' also embeds the class "
            "labels with; this model cannot be exported in the stock layout. Use layout='per-layer'."
        )


def reembed_time(
    model, num_channels: int, num_train_timesteps: int = 1000, refine_steps: int = 500, learning_rate: float = 1e-3
) -> TimeReembedding:
    """Give the dense model a sinusoidal time projection of ``num_channels`` features, in place.

    ``time_embedding.linear_1`` is refit by least squares so that, over every training timestep,
    its output on the new sinusoid is as close as possible to its output on the old one; then both
    linear layers of the time embedding are refined (full-batch Adam over all timesteps) to match the
    old embedding after ``linear_2``, which is what every ResNet block sees. The relative change of
    that embedding is returned.

    Parameters
    ----------
    model : UNet2DModel
        Dense model with ``time_embedding_type="positional"``.
    num_channels : int
        The new sinusoid width, ``block_out_channels[0]`` of the stock config to be exported.
    num_train_timesteps : int
        Timesteps the refit covers (those of the model's scheduler).
    refine_steps : int
        Adam steps of the refinement (0: least squares only).
    learning_rate : float
        Adam learning rate of the refinement.
    """
    from diffusers.models.embeddings import Timesteps

    _check_unet(model)
    check_layout(model.config, "stock")
    old_proj = model.time_proj
    linear_1 = model.time_embedding.linear_1
    if num_channels == old_proj.num_channels:
        return TimeReembedding(num_channels, num_channels, 0.0)
    new_proj = Timesteps(num_channels, old_proj.flip_sin_to_cos, old_proj.downscale_freq_shift, old_proj.scale)
    t = torch.arange(num_train_timesteps, device=linear_1.weight.device)
    with torch.no_grad():
        target = linear_1(old_proj(t).to(linear_1.weight.dtype)).double()
        before = model.time_embedding(old_proj(t).to(linear_1.weight.dtype)).double()
        features = new_proj(t).double()
        design = torch.cat([features, torch.ones_like(features[:, :1])], dim=1)
        solution = torch.linalg.lstsq(design.cpu(), target.cpu()).solution.to(design.device)
        new_linear = nn.Linear(num_channels, linear_1.out_features, bias=True)
        new_linear.to(device=linear_1.weight.device, dtype=linear_1.weight.dtype)
        new_linear.weight.copy_(solution[:-1].T)
        new_linear.bias.copy_(solution[-1])
        model.time_proj = new_proj
        model.time_embedding.linear_1 = new_linear
    features = new_proj(t).to(linear_1.weight.dtype)
    if refine_steps > 0:
        _refine_time_embedding(model.time_embedding, features, before.to(features.dtype), refine_steps, learning_rate)
    with torch.no_grad():
        after = model.time_embedding(features).double()
    error = float((after - before).norm() / before.norm())
    return TimeReembedding(old_proj.num_channels, num_channels, error)


def _refine_time_embedding(embedding, features, target, steps, learning_rate) -> None:
    params = list(embedding.parameters())
    best = [p.detach().clone() for p in params]
    with torch.no_grad():
        best_loss = float(((embedding(features) - target) ** 2).mean())
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = ((embedding(features) - target) ** 2).mean()
            loss.backward()
            optimizer.step()
            if float(loss.detach()) < best_loss:
                best_loss = float(loss.detach())
                best = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, best):
            p.copy_(b)
        for p in params:
            p.grad = None


# ---------------------------------------------------------------------- stock arithmetic
def stock_unit_quantum(units: UnitSet) -> int:
    """The stock layout keeps ``k / q`` of every family, for an integer k; this returns q."""
    return reduce(math.gcd, (f.num_units for f in units))


def stock_keeps_width_multiple(units: UnitSet, keep: Fraction, round_to: int = 1) -> bool:
    """Whether keeping ``keep`` of every family leaves every width a multiple of ``round_to``.

    The dense model itself (``keep == 1``) always qualifies: rounding never widens a layer.
    """
    return keep == 1 or all((f.num_channels * keep).denominator == 1 and int(f.num_channels * keep) % round_to == 0
                            for f in units)


def stock_sparsities(units: UnitSet, round_to: int = 1) -> List[float]:
    """All sparsities in [0, 1) that the stock layout can meet exactly.

    With ``round_to > 1``, only those whose every width (all block widths, attention and time
    embedding widths) is a multiple of ``round_to`` channels.
    """
    check_round_to(round_to)
    q = stock_unit_quantum(units)
    return [1 - k / q for k in range(q, 0, -1) if stock_keeps_width_multiple(units, Fraction(k, q), round_to)]


def stock_keep_ratio(units: UnitSet, sparsity: float, round_to: int = 1) -> Fraction:
    """Keep ratio of the stock layout for ``sparsity``; a clear error if it cannot be met.

    With ``round_to > 1`` the sparsity must also leave every width a multiple of ``round_to``
    channels (see :func:`stock_sparsities`).
    """
    check_sparsity(sparsity)
    check_round_to(round_to)
    q = stock_unit_quantum(units)
    keep = Fraction(1 - sparsity).limit_denominator(10**6)
    on_grid = (keep * q).denominator == 1
    if not on_grid or not stock_keeps_width_multiple(units, keep, round_to):
        achievable = stock_sparsities(units, round_to)
        near = sorted(achievable, key=lambda s: abs(s - sparsity))[:3]
        why = (
            f"it keeps the same fraction of every unit family, and the families of this model split into "
            f"multiples of 1/{q} (GroupNorm groups and attention heads)"
            if not on_grid
            else f"keeping {float(keep):.4g} of every family leaves some widths that are not multiples of "
            f"round_to={round_to} channels"
        )
        raise ValueError(
            f"The stock layout cannot prune {sparsity:.4g} of the units: {why}. Nearest achievable sparsities"
            f"{f' with round_to={round_to}' if round_to > 1 else ''}: {', '.join(f'{s:.4g}' for s in sorted(near))}; "
            "or use layout='per-layer', which takes any sparsity."
        )
    return keep


def stock_block_out_channels(model, keep: Fraction) -> List[int]:
    return [int(c * keep) for c in model.config.block_out_channels]


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or not (0 <= sparsity < 1):
        raise ValueError(
            f"Sparsity must be a number in [0, 1) (the fraction of units to remove), got {sparsity!r}."
        )


def prepare_stock(
    model, units: UnitSet, sparsity: float, num_train_timesteps: int = 1000, refine_steps: int = 500
) -> TimeReembedding:
    """Check that the stock layout can meet ``sparsity`` and re-embed the time sinusoid for it.

    Call once, on the dense model, before pruning starts; everything after it is exact.
    ``refine_steps`` as in :func:`reembed_time` (0: least squares only, when only the shapes matter,
    e.g. for speed measurements).
    """
    keep = stock_keep_ratio(units, sparsity)
    width = stock_block_out_channels(model, keep)[0]
    return reembed_time(model, width, num_train_timesteps, refine_steps=refine_steps)


def dense_student(teacher, units: UnitSet, layout: str, sparsity: float, num_train_timesteps: int = 1000):
    """The dense model that pruning trains and masks, built from a copy of ``teacher``.

    Stock layout: the time sinusoid is narrowed first (:func:`prepare_stock`, once, measured). The
    result is a :class:`PrunedUNet2DModel` with every unit kept, so that the (possibly re-embedded)
    dense model saves and loads in diffusers format.

    Returns
    -------
    (student, units, reembedding)
        The student in train mode with gradients on, its units (traced again), and the
        :class:`TimeReembedding` (None for the per-layer layout).
    """
    from .units import find_units

    student = copy.deepcopy(teacher).requires_grad_(True).train()
    reembedding = prepare_stock(student, units, sparsity, num_train_timesteps) if layout == "stock" else None
    ones = {f.name: torch.ones(f.num_units) for f in units}
    student = export_model(student, units, ones, "per-layer").train()
    return student, find_units(student), reembedding


# ---------------------------------------------------------------------- export
def _binary_masks(masks: Union[UnitMasks, Mapping[str, torch.Tensor]], units: UnitSet) -> Dict[str, torch.Tensor]:
    state = masks.state_dict() if isinstance(masks, UnitMasks) else dict(masks)
    if set(state) != set(units.names):
        missing = sorted(set(units.names) - set(state))[:5]
        unexpected = sorted(set(state) - set(units.names))[:5]
        raise ValueError(
            f"The masks do not match the units of this model (missing: {missing}, unexpected: {unexpected}). "
            "Build masks with UnitMasks(model, find_units(model)) on the same architecture."
        )
    out = {}
    for family in units:
        value = torch.as_tensor(state[family.name]).detach().cpu()
        if value.shape != (family.num_units,):
            raise ValueError(
                f"Masks of family {family.name!r} have shape {tuple(value.shape)}, expected ({family.num_units},)."
            )
        if not bool(((value == 0) | (value == 1)).all()):
            raise ValueError(
                f"Masks of family {family.name!r} are not binary; export needs the final 0/1 masks "
                "(finish the pruning stage first)."
            )
        if int(value.sum()) == 0:
            raise ValueError(f"Family {family.name!r} would lose every unit; keep at least one.")
        out[family.name] = value.bool()
    return out


def _removed_indices(units: UnitSet, keep: Dict[str, torch.Tensor]) -> Dict[Tuple[str, str], torch.Tensor]:
    removed: Dict[Tuple[str, str], List[torch.Tensor]] = {}
    for family in units:
        channel_kept = keep[family.name][family.channel_to_unit()]
        for s in family.slices:
            gone = s.layer_index[~channel_kept[s.family_index]]
            removed.setdefault((s.module, s.dim), []).append(gone)
    return {k: torch.unique(torch.cat(v)) for k, v in removed.items()}


def _kept(size: int, removed: Optional[torch.Tensor]) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    if removed is not None and removed.numel():
        keep[removed] = False
    return keep.nonzero().squeeze(1)


def export_model(model, units: UnitSet, masks, layout: str = "stock"):
    """Build the physically smaller model that computes what ``model`` computes under ``masks``.

    Parameters
    ----------
    model : UNet2DModel
        The dense model (for ``"stock"``, after :func:`prepare_stock`). Not modified.
    units : UnitSet
        Its units.
    masks : UnitMasks or dict
        Binary mask values, one tensor per family.
    layout : {"stock", "per-layer"}

    Returns
    -------
    UNet2DModel or PrunedUNet2DModel
    """
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import Attention

    _check_unet(model)
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; choose one of {LAYOUTS}.")
    keep = _binary_masks(masks, units)
    removed = _removed_indices(units, keep)
    modules = dict(model.named_modules())

    kept_index: Dict[Tuple[str, str], torch.Tensor] = {}
    for (name, dim), gone in removed.items():
        size = _size(modules[name], dim)
        kept_index[(name, dim)] = _kept(size, gone)

    state = {}
    for key, tensor in model.state_dict().items():
        module_name, _, param = key.rpartition(".")
        out_keep = kept_index.get((module_name, OUT))
        in_keep = kept_index.get((module_name, IN))
        if out_keep is not None and isinstance(modules[module_name], nn.Embedding):
            tensor = tensor.index_select(1, out_keep.to(tensor.device))  # (num_embeddings, embedding_dim)
        elif out_keep is not None and tensor.dim() >= 1:
            tensor = tensor.index_select(0, out_keep.to(tensor.device))
        if in_keep is not None and param == "weight" and tensor.dim() >= 2:
            tensor = tensor.index_select(1, in_keep.to(tensor.device))
        state[key] = tensor.clone()

    widths: Dict[str, Dict[str, int]] = {}
    for name, module in modules.items():
        if isinstance(module, Attention):
            heads, dim_head = _attention_shape(module, kept_index.get((f"{name}.to_q", OUT)))
            old_dim_head = module.inner_dim // module.heads
            if dim_head != old_dim_head and module.scale_qk:
                # logits = q.k / sqrt(d): keep them identical under the new head width.
                factor = math.sqrt(dim_head / old_dim_head)
                state[f"{name}.to_q.weight"] = state[f"{name}.to_q.weight"] * factor
                if f"{name}.to_q.bias" in state:
                    state[f"{name}.to_q.bias"] = state[f"{name}.to_q.bias"] * factor
            if heads * dim_head != module.inner_dim:
                widths[name] = {"heads": heads, "dim_head": dim_head}
    widths.update(_layer_widths(modules, kept_index, units))

    if layout == "stock":
        pruned = _stock_model(model, units, keep, state)
    else:
        from .modeling_pruned_unet import PrunedUNet2DModel

        config = {k: v for k, v in model.config.items() if not k.startswith("_")}
        config.pop("pruned_widths", None)
        if getattr(model.time_proj, "num_channels", model.config.block_out_channels[0]) != model.config.block_out_channels[0]:
            widths["time_proj"] = {"num_channels": model.time_proj.num_channels}
            linear_1 = model.time_embedding.linear_1
            entry = widths.setdefault("time_embedding.linear_1", {})
            entry.setdefault("in_features", linear_1.in_features)
            entry.setdefault("out_features", linear_1.out_features)
        pruned = PrunedUNet2DModel(**config, pruned_widths=widths)
        _load_exact(pruned, state, layout)
    param = next(model.parameters())
    pruned.to(param.device)
    if param.dtype != torch.float32:
        pruned.to(param.dtype)
    return pruned.train(model.training)


def _size(module: nn.Module, dim: str) -> int:
    from .units import _layer_size

    return _layer_size(module, dim)


def _attention_shape(module, q_keep: Optional[torch.Tensor]) -> Tuple[int, int]:
    inner = module.inner_dim if q_keep is None else int(q_keep.numel())
    if module.heads == 1:
        return 1, inner
    dim_head = module.inner_dim // module.heads
    return inner // dim_head, dim_head


def _layer_widths(modules, kept_index, units: UnitSet) -> Dict[str, Dict[str, int]]:
    """New sizes of every layer whose width changed, in PrunedUNet2DModel's config format."""
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    def kept(name, dim, default):
        index = kept_index.get((name, dim))
        return default if index is None else int(index.numel())

    widths: Dict[str, Dict[str, int]] = {}
    for name, module in modules.items():
        if isinstance(module, nn.Conv2d):
            new = {"in_channels": kept(name, IN, module.in_channels), "out_channels": kept(name, OUT, module.out_channels)}
            old = {"in_channels": module.in_channels, "out_channels": module.out_channels}
        elif isinstance(module, nn.Linear):
            new = {"in_features": kept(name, IN, module.in_features), "out_features": kept(name, OUT, module.out_features)}
            old = {"in_features": module.in_features, "out_features": module.out_features}
        elif isinstance(module, nn.GroupNorm):
            channels = kept(name, OUT, module.num_channels)
            new = {"num_groups": export_num_groups(channels, module.num_groups, module.num_channels), "num_channels": channels}
            old = {"num_groups": module.num_groups, "num_channels": module.num_channels}
        elif isinstance(module, ResnetBlock2D):
            new = {"in_channels": kept(f"{name}.conv1", IN, module.in_channels), "out_channels": kept(f"{name}.conv2", OUT, module.out_channels)}
            old = {"in_channels": module.in_channels, "out_channels": module.out_channels}
        elif isinstance(module, nn.Embedding):
            new = {"num_embeddings": module.num_embeddings, "embedding_dim": kept(name, OUT, module.embedding_dim)}
            old = {"num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim}
        elif isinstance(module, (Downsample2D, Upsample2D)):
            if isinstance(module.conv, nn.Conv2d):
                channels = kept(_conv_name(name, module), IN, module.conv.in_channels)
            else:
                # No conv (average pooling or interpolation inside a ResNet block with down/up=True): it resamples
                # the block's input, whose width the block's first GroupNorm holds.
                parent = name.rpartition(".")[0]
                if not isinstance(modules.get(parent), ResnetBlock2D):
                    raise ValueError(f"Cannot tell the width of {name} ({type(module).__name__} without a conv).")
                channels = kept(f"{parent}.norm1", OUT, module.channels)
            new = {"channels": channels}
            old = {"channels": module.channels}
        else:
            continue
        if new != old:
            widths[name] = new
    return widths


def _conv_name(name: str, module) -> str:
    for child_name, child in module.named_children():
        if child is module.conv:
            return f"{name}.{child_name}"
    raise RuntimeError(f"{name} has no conv child")


def _stock_model(model, units: UnitSet, keep: Dict[str, torch.Tensor], state):
    from diffusers import UNet2DModel

    ratios = {name: Fraction(int(k.sum()), k.numel()) for name, k in keep.items()}
    distinct = sorted(set(ratios.values()))
    if len(distinct) != 1:
        lo = min(ratios, key=ratios.get)
        hi = max(ratios, key=ratios.get)
        raise ValueError(
            "The stock layout needs the same keep ratio in every unit family, but the masks keep "
            f"{float(ratios[lo]):.3f} of {lo!r} and {float(ratios[hi]):.3f} of {hi!r}. Select units per "
            "family (local selection), or export with layout='per-layer'."
        )
    ratio = distinct[0]
    dense = model.config
    scaled = [c * ratio for c in dense["block_out_channels"]] + [dense["norm_num_groups"] * ratio]
    scaled += [dense[k] * ratio for k in ("attn_norm_num_groups", "time_embedding_dim") if dense.get(k) is not None]
    if any(x.denominator != 1 for x in scaled):
        raise ValueError(
            f"A keep ratio of {ratio} gives non-integer widths or group counts ({[str(x) for x in scaled]}); "
            "choose a sparsity from stock_sparsities(units)."
        )
    config = stock_config(model, ratio)
    if model.time_proj.num_channels != config["block_out_channels"][0]:
        raise ValueError(
            f"The stock layout ties the time sinusoid to block_out_channels[0] = {config['block_out_channels'][0]}, "
            f"but the model's sinusoid has {model.time_proj.num_channels} features. Call "
            "prepare_stock(model, units, sparsity) (or reembed_time) on the dense model before pruning."
        )
    pruned = UNet2DModel(**config)
    _load_exact(pruned, state, "stock")
    return pruned


def _load_exact(pruned: nn.Module, state, layout: str) -> None:
    expected = pruned.state_dict()
    for key, tensor in expected.items():
        if key not in state or state[key].shape != tensor.shape:
            got = tuple(state[key].shape) if key in state else "missing"
            raise ValueError(
                f"The {layout} layout cannot hold these masks: {key} must have shape {tuple(tensor.shape)} "
                f"but the pruned weights have {got}."
            )
    pruned.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------- MACs targets
def stock_config(model, keep: Fraction) -> dict:
    """The stock ``UNet2DModel`` config that keeps ``keep`` of every unit family."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_") and k != "pruned_widths"}
    config["block_out_channels"] = [int(c * keep) for c in config["block_out_channels"]]
    config["norm_num_groups"] = int(config["norm_num_groups"] * keep)
    if config.get("attn_norm_num_groups") is not None:
        config["attn_norm_num_groups"] = int(config["attn_norm_num_groups"] * keep)
    if config.get("time_embedding_dim") is not None:
        config["time_embedding_dim"] = int(config["time_embedding_dim"] * keep)
    return config


def sparsity_for_macs(model, units: UnitSet, macs_fraction: float, round_to: int = 1) -> Tuple[float, float]:
    """The unit sparsity whose stock model has the MACs closest to ``macs_fraction`` of the dense MACs.

    MACs are counted with attention matmuls, on shapes only (the models are built on the meta
    device). The stock grid is exact for the stock layout; for global (per-layer) selection it is
    the uniform-width estimate, and the exported model's real MACs are what the reports show.
    With ``round_to > 1`` the grid holds only sparsities whose widths are all multiples of
    ``round_to`` channels (see :func:`stock_sparsities`).

    Returns
    -------
    (sparsity, achieved_fraction)
    """
    if not 0 < macs_fraction <= 1:
        raise ValueError(f"A MACs target is a fraction of the dense MACs in (0, 1], got {macs_fraction!r}.")
    check_round_to(round_to)
    q = stock_unit_quantum(units)
    dense = _stock_macs(_config_key(stock_config(model, Fraction(1))))
    best = (0.0, 1.0)
    for k in range(q, 0, -1):
        keep = Fraction(k, q)
        if not stock_keeps_width_multiple(units, keep, round_to):
            continue
        fraction = _stock_macs(_config_key(stock_config(model, keep))) / dense
        if abs(fraction - macs_fraction) < abs(best[1] - macs_fraction):
            best = (float(1 - keep), fraction)
    return best


def _config_key(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=list)


@lru_cache(maxsize=512)
def _stock_macs(config_key: str) -> int:
    """MACs of a stock config, counted once per config on the meta device (a grid search asks again)."""
    from diffusers import UNet2DModel

    from .counting import count_macs

    with torch.device("meta"):
        return count_macs(UNet2DModel(**json.loads(config_key)))
