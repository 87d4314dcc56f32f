"""The MACs of a model as a function of which units it keeps, without building the model.

Every counted product of a ``UNet2DModel`` forward pass (see :mod:`diffusers_gfprune.counting`) is
a convolution or linear layer, whose MACs are ``c * kept_inputs * kept_outputs`` (``c`` = output
positions times kernel size), or an attention matrix product, whose MACs are ``2 * L**2 *
kept_inner_width``. The kept widths are linear in the unit flags, so the MACs of any selection
follow from one traced forward pass (on the meta device if wanted). The per-layer layout uses this
to meet a MACs target (:func:`diffusers_gfprune.selection.select_global_macs`).

Learned masks (:mod:`diffusers_gfprune.learned_masks`) need the same count as a differentiable function of
per-unit keep probabilities: :meth:`UnitMacs.expected_macs` is the expectation of the MACs when every unit is
kept independently with its probability, exact (a bilinear term's covariance included), on the probabilities'
device and dtype.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .units import IN, OUT, UnitSet, _example_inputs


class UnitMacs:
    """MACs per image of ``model`` with any units removed.

    Parameters
    ----------
    model : UNet2DModel
        The dense model the units were found on (any device, ``meta`` included).
    units : UnitSet
        Its units.
    sample_size : int, optional
        Resolution of the counted forward pass; defaults to ``model.config.sample_size``.
    """

    def __init__(self, model, units: UnitSet, sample_size: Optional[int] = None):
        from diffusers.models.attention_processor import Attention

        self.units = units
        offsets, total = {}, 0
        for family in units:
            offsets[family.name] = total
            total += family.num_units
        self.num_units = total
        # Layer channels removed per unit: one row per (module, dim), a count per flat unit index.
        rows: Dict[tuple, torch.Tensor] = {}
        for family in units:
            unit = family.channel_to_unit() + offsets[family.name]
            for s in family.slices:
                row = rows.setdefault((s.module, s.dim), torch.zeros(total, dtype=torch.float64))
                row.index_add_(0, unit[s.family_index], torch.ones(len(s.family_index), dtype=torch.float64))

        coefficient: Dict[str, float] = {}
        attention_tokens: Dict[str, int] = {}
        handles = []

        def layer_hook(name):
            def hook(module, args, output):
                if isinstance(module, nn.Conv2d):
                    kh, kw = module.kernel_size
                    coefficient[name] = output.shape[-1] * output.shape[-2] * kh * kw / module.groups
                else:
                    coefficient[name] = output.numel() / output.shape[0] / module.out_features
            return hook

        def attention_hook(name):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                attention_tokens[name] = hidden.shape[-1] * hidden.shape[-2] if hidden.dim() == 4 else hidden.shape[1]
            return hook

        modules = dict(model.named_modules())
        for name, module in modules.items():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                handles.append(module.register_forward_hook(layer_hook(name)))
            elif isinstance(module, Attention):
                handles.append(module.register_forward_pre_hook(attention_hook(name), with_kwargs=True))
        try:
            with torch.no_grad():
                model(**_example_inputs(model, sample_size))
        finally:
            for handle in handles:
                handle.remove()

        names = list(coefficient)
        zero = torch.zeros(total, dtype=torch.float64)
        self._coefficient = torch.tensor([coefficient[n] for n in names], dtype=torch.float64)
        self._in = torch.tensor([float(_size(modules[n], IN)) for n in names], dtype=torch.float64)
        self._out = torch.tensor([float(_size(modules[n], OUT)) for n in names], dtype=torch.float64)
        self._in_removed = torch.stack([rows.get((n, IN), zero) for n in names]) if names else zero[None]
        self._out_removed = torch.stack([rows.get((n, OUT), zero) for n in names]) if names else zero[None]
        attn = list(attention_tokens)
        self._attn_coefficient = torch.tensor([2.0 * attention_tokens[n] ** 2 for n in attn], dtype=torch.float64)
        self._attn_inner = torch.tensor([float(modules[n].inner_dim) for n in attn], dtype=torch.float64)
        self._attn_removed = (torch.stack([rows.get((f"{n}.to_q", OUT), zero) for n in attn])
                              if attn else torch.zeros(0, total, dtype=torch.float64))
        # A unit that feeds both sides of one layer makes kept_in and kept_out covary: Var(kept) per layer.
        self._both = self._in_removed * self._out_removed
        self.offsets = offsets
        self.dense = self.macs_of_flat(torch.zeros(total, dtype=torch.float64))
        self._on_device: Dict[tuple, tuple] = {}

    def flat(self, pruned: Dict[str, torch.Tensor]) -> torch.Tensor:
        """One float vector over all units (1 = pruned) from per-family flags."""
        return torch.cat([pruned[f.name].to(torch.float64).cpu() for f in self.units])

    def macs_of_flat(self, pruned: torch.Tensor) -> float:
        kept_in = self._in - self._in_removed @ pruned
        kept_out = self._out - self._out_removed @ pruned
        macs = (self._coefficient * kept_in * kept_out).sum()
        if len(self._attn_coefficient):
            macs = macs + (self._attn_coefficient * (self._attn_inner - self._attn_removed @ pruned)).sum()
        return float(macs)

    def macs(self, pruned: Dict[str, torch.Tensor]) -> float:
        """MACs per image with the units flagged in ``pruned`` (family -> bool tensor, True = pruned) removed."""
        return self.macs_of_flat(self.flat(pruned))

    def fraction(self, pruned: Dict[str, torch.Tensor]) -> float:
        """MACs with ``pruned`` removed, as a fraction of the dense MACs."""
        return self.macs(pruned) / self.dense

    def _tables(self, device, dtype) -> tuple:
        key = (torch.device(device), dtype)
        tables = self._on_device.get(key)
        if tables is None:
            names = ("_coefficient", "_in", "_out", "_in_removed", "_out_removed", "_both", "_attn_coefficient",
                     "_attn_inner", "_attn_removed")
            tables = self._on_device[key] = tuple(getattr(self, n).to(device, dtype) for n in names)
        return tables

    def expected_macs(self, keep: torch.Tensor) -> torch.Tensor:
        """Expected MACs per image when unit ``u`` is kept, independently of the others, with probability ``keep[u]``.

        Parameters
        ----------
        keep : torch.Tensor
            One probability per unit in the flat order of :attr:`offsets` (the order of
            :attr:`diffusers_gfprune.masks.UnitMasks.values`), on any device, float32 or float64.

        Returns
        -------
        torch.Tensor
            A scalar on ``keep``'s device and dtype, differentiable in ``keep``. At binary ``keep`` it equals
            :meth:`macs_of_flat` ``(1 - keep)``. A layer's MACs ``c * kept_in * kept_out`` is bilinear, so its
            expectation is ``c * (E[kept_in] E[kept_out] + Cov)``, where the covariance is the sum of
            ``keep (1 - keep)`` over units that feed both sides of the layer (none in the architectures tested,
            kept for exactness).
        """
        if keep.shape != (self.num_units,):
            raise ValueError(f"Expected one keep probability per unit ({self.num_units}), got shape {tuple(keep.shape)}.")
        coefficient, size_in, size_out, in_removed, out_removed, both, attn_coefficient, attn_inner, attn_removed = (
            self._tables(keep.device, keep.dtype))
        pruned = 1 - keep
        kept_in = size_in - in_removed @ pruned
        kept_out = size_out - out_removed @ pruned
        macs = (coefficient * (kept_in * kept_out + both @ (keep * pruned))).sum()
        if len(attn_coefficient):
            macs = macs + (attn_coefficient * (attn_inner - attn_removed @ pruned)).sum()
        return macs

    def expected_fraction(self, keep: torch.Tensor) -> torch.Tensor:
        """:meth:`expected_macs` as a fraction of the dense MACs (differentiable)."""
        return self.expected_macs(keep) / self.dense


def _size(module: nn.Module, dim: str) -> int:
    if isinstance(module, nn.Conv2d):
        return module.in_channels if dim == IN else module.out_channels
    return module.in_features if dim == IN else module.out_features
