"""Repair at removal: fold the mean contribution of removed units into their consumer's bias.

When a unit is removed at once (the one-shot process), every layer that read its channels loses their contribution.
Where those channels feed a *linear consumer with no normalization between*, the contribution's mean over the data
can be kept by adding it to the consumer's bias (bias compensation, as FLAP does for large language models: An et
al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models", AAAI 2024):

    bias += W[:, removed] @ mean(x[removed])                                    (linear consumer)
    bias += (sum over the kernel's taps of W[:, removed]) @ mean(x[removed])    (convolution)

In a ``UNet2DModel`` that is the case for two unit families:

* attention heads (family kind ``attention_inner``): the heads' outputs are the input of the output projection
  ``to_out[0]`` (``nn.Linear`` with a bias);
* whole GroupNorm groups of a resnet's inner width (kind ``resnet_hidden``): ``norm2 -> SiLU -> dropout -> conv2``,
  so the removed groups' activations are input channels of ``conv2`` (``nn.Conv2d`` with a bias), and the groups
  that stay keep their statistics.

The consumers are found from the families' channel slices (every slice with ``dim == "in"`` on an ``nn.Linear`` or
``nn.Conv2d`` with a bias), not from module names. Other families (the residual streams, the time embedding's widths)
pass through normalizations whose groups change, or feed many layers; they are left alone and counted in the report.
The means are measured on calibration inputs with every mask at 1 (what the consumer saw before the removal), in
float32 with autocast off, in eval mode (dropout off), accumulated in float64 on the model's device.

Limits
------
* The mean is over the calibration images and timesteps, while a unit's real contribution depends on both (on the
  timestep most of all): the fold keeps the consumer's output mean over that mixture, not at every timestep.
* A convolution's fold is exact only away from its zero-padded border: a border output sees zeros through some taps,
  while the bias adds the whole kernel's sum.
* Exact means need the consumer's other inputs to be unchanged. That holds for a multi-head attention's
  ``to_out[0]`` and for ``conv2`` when nothing upstream is removed. With one attention head the units are channels
  of q, k and v together, and removing q/k channels changes the attention of the channels that stay; when upstream
  streams are removed too, the kept inputs shift as well. The fold then corrects only the removed channels' part.
* The repair changes what the masked dense model and the exported model both compute: the export stays exact (the
  export copies the consumer's bias).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn

from .distributed import all_reduce_mean, world_size
from .precision import full_precision
from .units import IN, UnitSet

REPAIRABLE_KINDS = ("attention_inner", "resnet_hidden")
"""Family kinds whose removed channels feed a biased linear consumer with no normalization between."""


@dataclass
class RepairReport:
    """What a repair folded.

    Attributes
    ----------
    channels : dict of str to int
        Consumer module name -> number of its removed input channels whose mean was folded into its bias.
    skipped : dict of str to int
        Family kind -> number of families with removed units that were left alone (no linear consumer); a key
        ``"consumer without bias: <type>"`` counts slices read by a layer that has no bias to fold into.
    num_images : int
        Calibration images the means were measured on (over all processes in a data-parallel run).
    bias_deltas : dict of str to torch.Tensor
        Consumer module name -> what was added to its bias (on the host), for :meth:`apply_to`.
    """

    channels: Dict[str, int] = field(default_factory=dict)
    skipped: Dict[str, int] = field(default_factory=dict)
    num_images: int = 0
    bias_deltas: Dict[str, torch.Tensor] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """A JSON-ready summary (without the bias changes themselves)."""
        return {"channels": dict(self.channels), "skipped": dict(self.skipped), "num_images": self.num_images,
                "consumers": len(self.channels)}

    def apply_to(self, model: nn.Module) -> None:
        """Add the same bias changes to another copy of the model (its EMA).

        Parameters
        ----------
        model : nn.Module
            A model with the same module names as the repaired one.
        """
        modules = dict(model.named_modules())
        missing = [name for name in self.bias_deltas if name not in modules or modules[name].bias is None]
        if missing:
            raise ValueError(f"The model has no biased layers named {missing[:3]}; apply the repair to a copy of the "
                             "model it was measured on.")
        with torch.no_grad():
            for name, delta in self.bias_deltas.items():
                bias = modules[name].bias
                bias.add_(delta.to(bias.device, bias.dtype))


def check_keep(units: UnitSet, keep: Dict[str, torch.Tensor]) -> None:
    """Refuse masks that do not name every family once with a 0/1 tensor of its number of units.

    Parameters
    ----------
    units : UnitSet
    keep : dict of str to torch.Tensor
        One tensor per family, 1 = keep, 0 = removed.

    Raises
    ------
    ValueError
        Naming the family and what to pass instead.
    """
    missing = [f.name for f in units if f.name not in keep]
    if missing:
        raise ValueError(f"The masks miss {len(missing)} unit families (e.g. {missing[:3]}); pass one mask per family "
                         "(GradientFlowPruner.final_masks()).")
    unknown = sorted(set(keep) - set(units.names))
    if unknown:
        raise ValueError(f"The masks name families these units do not have (e.g. {unknown[:3]}); pass the masks of "
                         "this model's units (find_units on the same architecture).")
    for family in units:
        value = torch.as_tensor(keep[family.name])
        if tuple(value.shape) != (family.num_units,):
            raise ValueError(f"Family {family.name!r} has {family.num_units} units, got a mask of shape "
                             f"{tuple(value.shape)}; pass one value per unit (GradientFlowPruner.final_masks()).")
        if not bool(((value == 0) | (value == 1)).all()):
            raise ValueError(f"The mask of family {family.name!r} is not binary; the repair folds a removal, so pass "
                             "the final 0/1 masks (finish the pruning stage first).")


def _check_inputs(inputs: List, in_channels: int) -> None:
    if not inputs:
        raise ValueError("The repair needs calibration inputs (noisy images and their timesteps); got none. Pass "
                         "inputs_from_losses(scoring mini-batches) or a list of (x_t, timesteps) pairs.")
    for i, item in enumerate(inputs):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(torch.is_tensor(v) for v in item)):
            raise ValueError(f"Calibration input {i} is not a pair of tensors (x_t, timesteps); "
                             f"got {type(item).__name__}.")
        sample, timesteps = item
        if sample.dim() != 4 or sample.shape[1] != in_channels:
            raise ValueError(f"Calibration input {i} has x_t of shape {tuple(sample.shape)}; the model takes "
                             f"(batch, {in_channels}, height, width).")
        if timesteps.dim() > 1 or (timesteps.dim() == 1 and timesteps.shape[0] not in (1, sample.shape[0])):
            raise ValueError(f"Calibration input {i} has timesteps of shape {tuple(timesteps.shape)} for a batch of "
                             f"{sample.shape[0]}; give one timestep per image (or one for all).")


def _removed_inputs(units: UnitSet, keep: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """Consumer module -> indices (along its input) of removed channels; and the skipped families per kind."""
    removed: Dict[str, List[torch.Tensor]] = {}
    skipped: Dict[str, int] = {}
    for family in units:
        gone = torch.as_tensor(keep[family.name]).detach().cpu() == 0
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


@torch.no_grad()
def repair_removed_units(model, units: UnitSet, masks, keep: Dict[str, torch.Tensor],
                         inputs: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> RepairReport:
    """Fold the removed channels' mean contribution into the biases of their linear consumers, in place.

    Call it after the selection and before the export: the export copies the consumers' biases, so the slim model
    computes what the repaired, masked dense model computes.

    Parameters
    ----------
    model : UNet2DModel
        The dense model with its masks attached (unwrapped; it may be under autocast, the calibration runs in
        float32). Only the consumers' biases change.
    units : UnitSet
        Its units (:func:`~diffusers_gfprune.units.find_units`).
    masks : UnitMasks or None
        The model's masks; every mask is set to 1 during the calibration and restored after. None: the model has no
        masks attached (it computes its dense function).
    keep : dict of str to torch.Tensor
        One 0/1 tensor per family, 1 = keep, 0 = removed (:meth:`GradientFlowPruner.final_masks`).
    inputs : iterable of (x_t, timesteps)
        Calibration inputs on the model's device, run as ``model(x_t, timesteps)`` (:func:`inputs_from_losses`).
        In a data-parallel run each process passes its own slice (every process must call this function): the
        sums are all-reduced, so every process folds the same global means.

    Returns
    -------
    RepairReport

    Raises
    ------
    ValueError
        For masks that do not match the units or are not binary, and for missing or malformed calibration inputs,
        before any forward pass.
    """
    check_keep(units, keep)
    inputs = list(inputs)
    _check_inputs(inputs, model.config.in_channels)
    removed, skipped = _removed_inputs(units, keep)
    modules = dict(model.named_modules())
    for name in list(removed):
        consumer = modules[name]
        if not isinstance(consumer, (nn.Linear, nn.Conv2d)) or consumer.bias is None:
            key = f"consumer without bias: {type(consumer).__name__}"
            skipped[key] = skipped.get(key, 0) + 1
            del removed[name]
    report = RepairReport(skipped=skipped)
    if not removed:
        return report

    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {name: 0 for name in removed}

    def hook_for(name, conv):
        def hook(module, args):
            x = args[0].detach()
            x = x.double() if x.device.type != "mps" else x.cpu().double()  # MPS has no float64
            channels = x.movedim(1, -1) if conv else x  # channels last
            flat = channels.reshape(-1, channels.shape[-1])
            sums[name] = sums[name] + flat.sum(0) if name in sums else flat.sum(0)
            counts[name] += flat.shape[0]

        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n, isinstance(modules[n], nn.Conv2d))) for n in removed]
    was_training = model.training
    try:
        model.eval()  # dropout off: the means of what the consumer sees at inference
        with masks.all_kept() if masks is not None else nullcontext(), full_precision(model):
            for sample, timesteps in inputs:
                model(sample, timesteps)
                report.num_images += sample.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    _gather_over_processes(report, removed, sums, counts)
    for name, index in removed.items():
        consumer = modules[name]
        mean = (sums[name] / counts[name])[index.to(sums[name].device)]
        weight = consumer.weight.detach().double()[:, index.to(consumer.weight.device)]
        if weight.dim() == 4:
            weight = weight.sum((2, 3))  # every tap of the kernel reads the same channel mean (away from the border)
        delta = (weight @ mean.to(weight.device)).to(consumer.bias.dtype)
        consumer.bias.add_(delta)
        report.channels[name] = int(index.numel())
        report.bias_deltas[name] = delta.detach().cpu()
    return report


def _gather_over_processes(report: RepairReport, removed, sums, counts) -> None:
    """Data-parallel runs: every process calibrated on its slice of the scoring batches; sum the slices' sums and
    counts (one all-reduce), so that every process folds the same global means (no-op in a single process)."""
    world = world_size()
    if world == 1:
        return
    names = list(removed)  # the same order on every process (the units' order; the selection agrees across ranks)
    sizes = [sums[name].numel() for name in names]
    flat = torch.cat([sums[name] for name in names]
                     + [torch.tensor([float(counts[name]) for name in names] + [float(report.num_images)],
                                     dtype=torch.float64, device=sums[names[0]].device)])
    all_reduce_mean([flat])
    flat = flat * world  # sums, not means
    for name, part in zip(names, flat[: sum(sizes)].split(sizes)):
        sums[name] = part
    totals = flat[sum(sizes):].tolist()
    for name, total in zip(names, totals):
        counts[name] = int(round(total))
    report.num_images = int(round(totals[-1]))


def inputs_from_losses(losses) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The (noisy images, timesteps) of :class:`~diffusers_gfprune.objective.DDPMLoss` mini-batches, chunk by chunk.

    Parameters
    ----------
    losses : sequence of DDPMLoss
        The pruner's scoring mini-batches (``training.scoring_losses``); each is split by its ``chunk_size``.

    Returns
    -------
    list of (torch.Tensor, torch.Tensor)
        ``(x_t, timesteps)`` pairs for :func:`repair_removed_units`.
    """
    out = []
    for loss in losses:
        for _, chunk in loss.chunks():
            out.append((chunk.noisy(), chunk.timesteps))
    return out
