"""Mask values on the units of a dense model.

Every layer that *produces* a family's channels (convolution, linear and GroupNorm outputs) has those
channels multiplied by the mask value of their unit, so a unit at mask 0 is exactly absent
downstream. GroupNorm layers are made mask-aware: their statistics are taken over the channels whose
mask is non-zero, split into the groups the exported model will have
(:func:`~diffusers_gfprune.units.export_num_groups`). With binary masks the masked dense model
therefore computes what the exported model computes.

Masks are forward hooks: cheap, differentiable in the mask values, and removable.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .units import OUT, UnitSet, export_num_groups


class UnitMasks:
    """Mask values for every unit of a model, applied through forward hooks.

    Parameters
    ----------
    model : UNet2DModel
        The dense model the units were found on.
    units : UnitSet
        From :func:`~diffusers_gfprune.units.find_units`.

    Examples
    --------
    >>> masks = UnitMasks(unet, find_units(unet))
    >>> masks.attach()
    >>> masks.set_family("down_blocks.0.resnets.0.norm2", torch.tensor([1.0, 0.0, ...]))
    >>> masks.state_dict()  # {family name: tensor of unit values}
    >>> masks.detach()
    """

    def __init__(self, model: nn.Module, units: UnitSet):
        self.model = model
        self.units = units
        param = next(model.parameters())
        self.offsets: Dict[str, int] = {}
        total = 0
        for family in units:
            self.offsets[family.name] = total
            total += family.num_units
        # One flat vector for all units: the hooks gather from it, checkpoints store it per family.
        self.values = torch.ones(total, device=param.device, dtype=torch.float32)
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._gather = self._build_gather_indices(dict(model.named_modules()))

    # ------------------------------------------------------------------ index tables
    def _build_gather_indices(self, modules) -> Dict[str, torch.Tensor]:
        """For each producing layer, the flat unit index of each output channel (-1: not a unit)."""
        gather: Dict[str, torch.Tensor] = {}
        for family in self.units:
            unit_of_channel = family.channel_to_unit() + self.offsets[family.name]
            for s in family.slices:
                if s.dim != OUT:
                    continue
                if s.module not in gather:
                    size = _out_size(modules[s.module])
                    gather[s.module] = torch.full((size,), -1, dtype=torch.long)
                gather[s.module][s.layer_index] = unit_of_channel[s.family_index]
        device = self.values.device
        return {k: v.to(device) for k, v in gather.items()}

    def _channel_mask(self, module_name: str, dtype) -> torch.Tensor:
        index = self._gather[module_name]
        # Channels outside every family (none today, by construction) keep a factor of 1.
        padded = torch.cat([self.values, self.values.new_ones(1)])
        return padded[index].to(dtype)

    # ------------------------------------------------------------------ hooks
    def attach(self) -> "UnitMasks":
        """Put the masks on the model (idempotent)."""
        if self._handles:
            return self
        modules = dict(self.model.named_modules())
        for name in self._gather:
            module = modules[name]
            if isinstance(module, nn.GroupNorm):
                hook = self._group_norm_hook(name)
            else:
                hook = self._producer_hook(name)
            self._handles.append(module.register_forward_hook(hook))
        return self

    def detach(self) -> None:
        """Take the masks off; the model computes its dense function again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @contextmanager
    def applied(self):
        """Context manager: masks on inside, previous state restored outside."""
        was = self.attached
        self.attach()
        try:
            yield self
        finally:
            if not was:
                self.detach()

    def _producer_hook(self, name: str):
        def hook(module, args, output):
            mask = self._channel_mask(name, output.dtype)
            if output.dim() == 4:
                return output * mask.view(1, -1, 1, 1)
            return output * mask  # Linear, Embedding: channels are the last dimension

        return hook

    def _group_norm_hook(self, name: str):
        def hook(module: nn.GroupNorm, args, output):
            mask = self._channel_mask(name, output.dtype)
            alive = mask != 0
            if bool(alive.all()):
                return output * _expand(mask, output)
            # Recompute over the surviving channels, grouped as the exported layer groups them.
            (x,) = args
            keep = alive.nonzero().squeeze(1)
            num_groups = export_num_groups(int(keep.numel()), module.num_groups, module.num_channels)
            weight = module.weight[keep] if module.weight is not None else None
            bias = module.bias[keep] if module.bias is not None else None
            kept = F.group_norm(x.index_select(1, keep), num_groups, weight, bias, module.eps)
            full = x.new_zeros(x.shape).index_copy(1, keep, kept)
            return full * _expand(mask, full)

        return hook

    # ------------------------------------------------------------------ values
    def family_values(self, name: str) -> torch.Tensor:
        family = self.units[name]
        start = self.offsets[name]
        return self.values[start : start + family.num_units]

    def set_family(self, name: str, values: torch.Tensor) -> None:
        family = self.units[name]
        values = torch.as_tensor(values, dtype=self.values.dtype, device=self.values.device)
        if values.shape != (family.num_units,):
            raise ValueError(
                f"Family {name!r} has {family.num_units} units, got mask values of shape {tuple(values.shape)}."
            )
        _check_range(values, name)
        start = self.offsets[name]
        with torch.no_grad():
            self.values[start : start + family.num_units] = values

    def fill_(self, value: float = 1.0) -> None:
        with torch.no_grad():
            self.values.fill_(value)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """All mask values, one tensor per family (a copy; safe to save with safetensors)."""
        return {name: self.family_values(name).detach().clone().cpu() for name in self.units.names}

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Load mask values saved by :meth:`state_dict`; the families must match exactly."""
        expected, given = set(self.units.names), set(state_dict)
        if expected != given:
            missing = sorted(expected - given)[:5]
            unexpected = sorted(given - expected)[:5]
            raise ValueError(
                "The mask state dict does not match the units of this model "
                f"(missing: {missing}, unexpected: {unexpected}). Masks must come from the same "
                "architecture; re-create them with find_units on this model."
            )
        for name in self.units.names:
            self.set_family(name, state_dict[name])

    def is_binary(self) -> bool:
        return bool(((self.values == 0) | (self.values == 1)).all())

    def sparsity(self, name: Optional[str] = None) -> float:
        """Fraction of units at mask 0 (of one family, or of all units)."""
        values = self.family_values(name) if name else self.values
        return float((values == 0).float().mean())


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(1, -1, *([1] * (like.dim() - 2)))


def _out_size(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    return module.num_channels


def _check_range(values: torch.Tensor, name: str) -> None:
    if not torch.isfinite(values).all() or (values < 0).any() or (values > 1).any():
        raise ValueError(f"Mask values of family {name!r} must lie in [0, 1].")
