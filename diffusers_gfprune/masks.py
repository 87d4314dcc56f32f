"""Mask values on the units of a dense model.

Every layer that *produces* a family's channels (convolution, linear and GroupNorm outputs) has those
channels multiplied by the mask value of their unit, so a unit at mask 0 is exactly absent
downstream. GroupNorm layers are made mask-aware: their statistics are taken over the channels whose
mask is non-zero, split into the groups the exported model will have
(:func:`~diffusers_gfprune.units.export_num_groups`). With binary masks the masked dense model
therefore computes what the exported model computes.

Masks are forward hooks: cheap, differentiable in the mask values, and removable.

Placement: the mask values and index tables follow the model. A hook that meets an output on another device
moves them there (a model moved by ``accelerate.prepare`` after the masks were made keeps working), and
:meth:`UnitMasks.to` moves them explicitly. The mask is cast to each output's dtype, so mixed precision and a
model cast after the masks were made both work; under CUDA autocast a GroupNorm returns float32 from half inputs,
and the mask-aware GroupNorm keeps the dtype the layer returned.

Host synchronisation: which units are at exactly 0 decides the GroupNorm's grouping and needs the values on the
host. Values written through :meth:`UnitMasks.set_family`, :meth:`UnitMasks.set_all` or :meth:`UnitMasks.fill_`
come from the host, so their zero pattern is recorded then and the forward pass never waits for the device. Values
changed any other way (in place on the device, or a new tensor assigned to ``values``) are detected through the
tensor's version counter and read back once, not at every forward.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

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
        self._gather_host = self._build_gather_indices(dict(model.named_modules()))
        self._gather: Dict[str, torch.Tensor] = {}  # the tables on the values' device
        self._alive_host = torch.ones(total, dtype=torch.bool)  # which units are non-zero, known on the host
        self._alive_key: Optional[Tuple[weakref.ref, int]] = None
        self._keep_cache: Dict[str, Tuple[Optional[torch.Tensor], int]] = {}  # GroupNorm: kept channels, groups
        self._mark_alive_known()

    # ------------------------------------------------------------------ placement
    def to(self, device=None) -> "UnitMasks":
        """Move the mask values and index tables to ``device`` (the model's device, by default)."""
        device = torch.device(device) if device is not None else next(self.model.parameters()).device
        if self.values.device != device:
            known = self._alive_known()
            requires_grad = self.values.requires_grad
            with torch.no_grad():
                self.values = self.values.detach().to(device).requires_grad_(requires_grad)
            self._gather = {}
            self._keep_cache = {}
            if known:
                self._mark_alive_known()
        return self

    @property
    def device(self) -> torch.device:
        return self.values.device

    # ------------------------------------------------------------------ index tables
    def _build_gather_indices(self, modules) -> Dict[str, torch.Tensor]:
        """For each producing layer, the flat unit index of each output channel (-1: not a unit), on the host."""
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
        return gather

    def _table(self, module_name: str) -> torch.Tensor:
        table = self._gather.get(module_name)
        if table is None or table.device != self.values.device:
            table = self._gather[module_name] = self._gather_host[module_name].to(self.values.device)
        return table

    def channel_mask(self, module_name: str, dtype=torch.float32, device=None) -> torch.Tensor:
        """The mask value of every output channel of the producing layer ``module_name`` (dense indexing), moving the
        masks to ``device`` first when the model has moved there."""
        if device is not None and device != self.values.device:
            self.to(device)  # the model moved after the masks were made (accelerate.prepare, .to(...))
        index = self._table(module_name)
        # Channels outside every family (none today, by construction) keep a factor of 1.
        padded = torch.cat([self.values, self.values.new_ones(1)])
        return padded[index].to(dtype)

    # ------------------------------------------------------------------ which units are alive (host side)
    def _alive_known(self) -> bool:
        if self._alive_key is None:
            return False
        ref, version = self._alive_key
        return ref() is self.values and version == self.values._version

    def _mark_alive_known(self, alive: Optional[torch.Tensor] = None) -> None:
        """Record the host copy of the zero pattern as valid for the values as they are now."""
        if alive is not None:
            self._alive_host = alive
        self._alive_key = (weakref.ref(self.values), self.values._version)
        self._keep_cache = {}

    def alive(self) -> torch.Tensor:
        """Boolean per unit on the host: mask value non-zero (read back from the device only when it changed)."""
        if not self._alive_known():
            self._mark_alive_known((self.values.detach() != 0).cpu())
        return self._alive_host

    def _group_norm_plan(self, module_name: str, module: nn.GroupNorm):
        """(kept channel indices on the values' device or None when every channel lives, groups of the kept ones)."""
        alive = self.alive()  # may refresh the cache
        plan = self._keep_cache.get(module_name)
        if plan is not None and (plan[0] is None or plan[0].device == self.values.device):
            return plan
        index = self._gather_host[module_name]
        padded = torch.cat([alive, torch.ones(1, dtype=torch.bool)])
        channel_alive = padded[index]
        if bool(channel_alive.all()):
            plan = (None, module.num_groups)
        else:
            keep = channel_alive.nonzero().squeeze(1)
            plan = (keep.to(self.values.device), export_num_groups(int(keep.numel()), module.num_groups, module.num_channels))
        self._keep_cache[module_name] = plan
        return plan

    # ------------------------------------------------------------------ hooks
    def attach(self) -> "UnitMasks":
        """Put the masks on the model (idempotent)."""
        if self._handles:
            return self
        modules = dict(self.model.named_modules())
        for name in self._gather_host:
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

    @contextmanager
    def substituted(self, values: torch.Tensor):
        """The hooks read ``values`` inside the context: a tensor with the same zero pattern as the current values
        (a float64 leaf to differentiate with respect to the masks, say), so the known pattern carries over."""
        original, known, alive = self.values, self._alive_known(), self._alive_host
        self.values = values
        if known:
            self._mark_alive_known(alive)
        try:
            yield values
        finally:
            self.values = original
            if known:
                self._mark_alive_known(alive)

    @contextmanager
    def all_kept(self):
        """Every mask at 1 inside the context; the values (and their known zero pattern) restored after."""
        saved = self.values.detach().clone()
        known, alive = self._alive_known(), self._alive_host
        self.fill_(1.0)
        try:
            yield self
        finally:
            with torch.no_grad():
                self.values.copy_(saved)
            if known:
                self._mark_alive_known(alive)

    def _producer_hook(self, name: str):
        def hook(module, args, output):
            mask = self.channel_mask(name, output.dtype, output.device)
            if output.dim() == 4:
                return output * mask.view(1, -1, 1, 1)
            return output * mask  # Linear, Embedding: channels are the last dimension

        return hook

    def _group_norm_hook(self, name: str):
        def hook(module: nn.GroupNorm, args, output):
            mask = self.channel_mask(name, output.dtype, output.device)
            keep, num_groups = self._group_norm_plan(name, module)
            if keep is None:
                return output * _expand(mask, output)
            # Recompute over the surviving channels, grouped as the exported layer groups them. The result keeps
            # the dtype the layer returned (float32 under CUDA autocast, whatever the input's dtype).
            (x,) = args
            weight = module.weight[keep] if module.weight is not None else None
            bias = module.bias[keep] if module.bias is not None else None
            # In the layer's output precision: float32 under autocast even for half inputs, as the layer computed.
            kept = F.group_norm(x.index_select(1, keep).to(output.dtype), num_groups, weight, bias, module.eps).to(output.dtype)
            kept = kept * _expand(mask.index_select(0, keep), kept)
            # Removed channels are exactly 0; one buffer, no further copy of the activation. An indexed assignment,
            # not index_copy: autograd keeps only the index for it (index_copy keeps the kept channels' values too).
            out = kept.new_zeros(output.shape)
            out[:, keep] = kept
            return out

        return hook

    # ------------------------------------------------------------------ gradients
    def producers_require_grad(self) -> bool:
        """Whether every producing layer's parameters get gradients (needed by :meth:`parameter_products`)."""
        modules = dict(self.model.named_modules())
        return all(p.requires_grad for name in self._gather_host for p in modules[name].parameters(recurse=False))

    def parameter_products(self) -> torch.Tensor:
        """``S_u``: the sum of ``theta * dL/dtheta`` over the parameters that produce each unit's channels (flat order).

        Every mask multiplies the whole output of a layer that is linear in its own parameters (a convolution's,
        linear layer's or embedding's weight and bias, a GroupNorm's affine pair), so for ``y = m_u * f(theta)``:
        ``sum(theta * dL/dtheta) = m_u * dL/dm_u`` summed over the unit's producing layers. The masks' gradient can
        thus be formed from the weights' gradients, which training computes anyway, with the masks held constant in
        the forward pass: autograd then keeps no layer's output before the mask (:mod:`~diffusers_gfprune.learned_masks`,
        ``gate_gradient="parameters"``). Call after the backward pass and before anything changes the gradients
        (clipping, the optimizer's step). Parameters without a gradient count 0.
        """
        modules = dict(self.model.named_modules())
        total = self.values.new_zeros(self.units.num_units + 1, dtype=torch.float32)  # the last slot: no unit
        for name in self._gather_host:
            module = modules[name]
            per_channel = None
            for param in (module.weight, getattr(module, "bias", None)):
                if param is None or param.grad is None:
                    continue
                product = (param.detach().float() * param.grad.float())
                product = product.sum(0) if isinstance(module, nn.Embedding) else product.reshape(product.shape[0], -1).sum(1)
                per_channel = product if per_channel is None else per_channel + product
            if per_channel is not None:
                index = self._table(name).clone()
                index[index < 0] = self.units.num_units
                total.index_add_(0, index.to(per_channel.device), per_channel)
        return total[:-1]

    # ------------------------------------------------------------------ values
    def family_values(self, name: str) -> torch.Tensor:
        family = self.units[name]
        start = self.offsets[name]
        return self.values[start : start + family.num_units]

    def set_family(self, name: str, values: torch.Tensor) -> None:
        family = self.units[name]
        given = torch.as_tensor(values)
        if given.shape != (family.num_units,):
            raise ValueError(
                f"Family {name!r} has {family.num_units} units, got mask values of shape {tuple(given.shape)}."
            )
        start = self.offsets[name]
        self._write(slice(start, start + family.num_units), given, name)

    def set_all(self, values: torch.Tensor) -> None:
        """Every unit's value at once, in the flat order of :attr:`values` (one copy to the device)."""
        given = torch.as_tensor(values)
        if given.shape != self.values.shape:
            raise ValueError(f"Expected {self.values.numel()} mask values, got shape {tuple(given.shape)}.")
        self._write(slice(None), given, "all units")

    def _write(self, where: slice, given: torch.Tensor, what: str) -> None:
        known = self._alive_known()
        on_host = given.device.type == "cpu"
        _check_range(given, what)  # values from the host (the pruner's) are checked without waiting for the device
        with torch.no_grad():
            self.values[where] = given.to(self.values.device, self.values.dtype, non_blocking=True)
        if on_host and known:
            alive = self._alive_host.clone()
            alive[where] = given != 0
            self._mark_alive_known(alive)
        elif on_host and where == slice(None):
            self._mark_alive_known(given != 0)

    def fill_(self, value: float = 1.0) -> None:
        with torch.no_grad():
            self.values.fill_(value)
        self._mark_alive_known(torch.full_like(self._alive_host, value != 0))

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
