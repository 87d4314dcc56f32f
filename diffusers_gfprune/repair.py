"""Repair at removal: fold the mean contribution of removed units into their consumer's bias.

When a unit is removed at once (the one-shot process), every layer that read its channels loses their contribution.
Where those channels feed a *linear consumer with no normalization between*, the contribution's mean over the data
can be kept exactly in expectation by adding it to the consumer's bias (bias compensation, as FLAP does for large
language models: An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models", AAAI 2024):

    bias += W[:, removed] @ mean(x[removed])          (linear consumer)
    bias += (sum over the kernel's taps of W[:, removed]) @ mean(x[removed])    (convolution)

In a ``UNet2DModel`` that is the case for two unit families:

* attention heads (family kind ``attention_inner``): the heads' outputs are the input of the output projection
  ``to_out[0]`` (``nn.Linear`` with a bias);
* whole GroupNorm groups of a resnet's inner width (kind ``resnet_hidden``): ``norm2 -> SiLU -> dropout -> conv2``,
  so the removed groups' activations are the input channels of ``conv2`` (``nn.Conv2d`` with a bias).

Other families (the residual streams, the time embedding's widths) pass through normalizations or feed several
layers; they are left alone and counted in the report. The means are measured on calibration inputs with every mask
at 1 (what the consumer saw before the removal), accumulated in float64.

Limits: the mean is over the calibration timesteps, while a unit's real contribution depends on the timestep and the
image; for a convolution the fold is exact only away from the zero-padded border (the border taps see zeros, the
bias adds the whole kernel's sum). The repair changes what the masked dense model and the exported model both
compute: the export stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn

from .precision import full_precision
from .units import IN, UnitSet

REPAIRABLE_KINDS = ("attention_inner", "resnet_hidden")


@dataclass
class RepairReport:
    """What a repair folded."""

    channels: Dict[str, int] = field(default_factory=dict)  # consumer module -> removed input channels folded
    skipped: Dict[str, int] = field(default_factory=dict)  # family kind -> families with removed units left alone
    num_images: int = 0
    bias_deltas: Dict[str, torch.Tensor] = field(default_factory=dict)  # consumer module -> what was added (host)

    def as_dict(self) -> dict:
        return {"channels": dict(self.channels), "skipped": dict(self.skipped), "num_images": self.num_images,
                "consumers": len(self.channels)}

    def apply_to(self, model: nn.Module) -> None:
        """Add the same bias changes to another copy of the model (its EMA)."""
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, delta in self.bias_deltas.items():
                bias = modules[name].bias
                bias.add_(delta.to(bias.device, bias.dtype))


def _removed_inputs(units: UnitSet, keep: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """Consumer module -> indices (along its input) of removed channels; and the skipped families per kind."""
    removed: Dict[str, List[torch.Tensor]] = {}
    skipped: Dict[str, int] = {}
    for family in units:
        gone = keep[family.name].detach().cpu() == 0
        if not bool(gone.any()):
            continue
        if family.kind not in REPAIRABLE_KINDS:
            skipped[family.kind] = skipped.get(family.kind, 0) + 1
            continue
        channel_gone = gone[family.channel_to_unit()]
        for s in family.slices:
            if s.dim != IN:
                continue
            removed.setdefault(s.module, []).append(s.layer_index[channel_gone[s.family_index]])
    return {name: torch.cat(parts).unique() for name, parts in removed.items()}, skipped


def check_keep(units: UnitSet, keep: Dict[str, torch.Tensor]) -> None:
    missing = [f.name for f in units if f.name not in keep]
    if missing:
        raise ValueError(f"The masks miss {len(missing)} unit families (e.g. {missing[:3]}); pass one mask per family "
                         "(GradientFlowPruner.final_masks()).")
    for family in units:
        if tuple(keep[family.name].shape) != (family.num_units,):
            raise ValueError(f"Family {family.name!r} has {family.num_units} units, got a mask of shape "
                             f"{tuple(keep[family.name].shape)}.")


@torch.no_grad()
def repair_removed_units(model, units: UnitSet, masks, keep: Dict[str, torch.Tensor],
                         inputs: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> RepairReport:
    """Fold the removed channels' mean contribution into the biases of their linear consumers, in place.

    Parameters
    ----------
    model : UNet2DModel
        The dense model with its masks attached.
    units : UnitSet
    masks : UnitMasks
        The model's masks; every mask is set to 1 during the calibration and restored after.
    keep : dict of str to torch.Tensor
        One tensor per family, 1 = keep, 0 = removed (:meth:`GradientFlowPruner.final_masks`).
    inputs : iterable of (x_t, timesteps)
        Calibration inputs (:func:`inputs_from_losses`).

    Returns
    -------
    RepairReport
    """
    check_keep(units, keep)
    inputs = list(inputs)
    if not inputs:
        raise ValueError("The repair needs calibration inputs (noisy images and their timesteps); got none.")
    removed, skipped = _removed_inputs(units, keep)
    modules = dict(model.named_modules())
    for name in list(removed):
        consumer = modules[name]
        if not isinstance(consumer, (nn.Linear, nn.Conv2d)) or consumer.bias is None:
            skipped[f"consumer without bias: {type(consumer).__name__}"] = skipped.get(
                f"consumer without bias: {type(consumer).__name__}", 0) + 1
            del removed[name]
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {name: 0 for name in removed}

    def hook_for(name, conv):
        def hook(module, args):
            x = args[0].detach().double()
            channels = x.movedim(1, -1) if conv else x  # channels last
            flat = channels.reshape(-1, channels.shape[-1])
            sums[name] = sums.get(name, 0) + flat.sum(0)
            counts[name] += flat.shape[0]

        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n, isinstance(modules[n], nn.Conv2d))) for n in removed]
    images = 0
    try:
        with masks.all_kept(), full_precision(model):
            for sample, timesteps in inputs:
                model(sample, timesteps)
                images += sample.shape[0]
    finally:
        for h in handles:
            h.remove()
    report = RepairReport(skipped=skipped, num_images=images)
    for name, index in removed.items():
        consumer = modules[name]
        mean = (sums[name] / counts[name])[index.to(sums[name].device)]
        weight = consumer.weight.detach().double()[:, index.to(consumer.weight.device)]
        if weight.dim() == 4:
            weight = weight.sum((2, 3))
        delta = (weight @ mean.to(weight.device)).to(consumer.bias.dtype)
        consumer.bias.add_(delta)
        report.channels[name] = int(index.numel())
        report.bias_deltas[name] = delta.detach().cpu()
    return report


def inputs_from_losses(losses) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The (noisy images, timesteps) of :class:`~diffusers_gfprune.objective.DDPMLoss` mini-batches, chunk by chunk."""
    out = []
    for loss in losses:
        for _, chunk in loss.chunks():
            out.append((chunk.noisy(), chunk.timesteps))
    return out
