"""Distillation from the dense teacher, added to the DDPM loss while pruning and fine-tuning.

The student learns from the data (the DDPM loss) and, with a weight, from the teacher that sits in memory for the
whole run: on the *same* noisy input ``x_t`` and timestep ``t`` as the DDPM loss,

- **output level**: ``|| student(x_t, t) - teacher(x_t, t) ||^2`` (mean over all elements, the scale of the DDPM
  loss);
- **feature level** (optional): at the output of chosen UNet blocks (``down_blocks.<i>``, ``mid_block``,
  ``up_blocks.<i>``), the squared error between the student's features and the teacher's, relative to the teacher's
  (per image ``sum (s - t)^2 / sum t^2``, averaged over the batch and the chosen blocks). No projection layer is
  needed: a block's output channels are one unit family (the residual stream), so the teacher's features are mapped
  onto the student's through that family's masks. In the pruning stage the student is the dense masked model, and
  the target is the teacher's feature times the channel's mask value (a removed channel is zero in both); after the
  export the slim student's channels are the kept ones, in order, and the target is the teacher's feature at the
  kept channel indices. With binary masks both give the same number, so the term does not jump at the export.

The target is the *original* teacher, not the dense student at step 0: in the stock layout the student's time
sinusoid is narrowed once before pruning (``export.prepare_stock``), so even with every mask at 1 the student
computes a slightly different function. The evaluation (SSIM to the teacher, the card's numbers) compares to the
original teacher, and distilling from it lets the student make up for the re-embedding too.

The teacher runs in eval mode without gradients (one forward pass per step, no backward; its cost is in
docs/speed.md) and is never checkpointed: a resumed run loads it again from its source, and the term holds no
state of its own (its weight depends only on the step), so a resume ends where an uninterrupted run ends.

Weight schedule: the term is ``factor(step) * (output_weight * output_term + feature_weight * feature_term)`` with
``factor`` 1 throughout (``constant``, the pruning stage and the fine-tuning alike), or decaying from 1 at the first
step to 0 at the last (``linear_decay``, ``cosine_decay``): the teacher guides most where the student is furthest
from it, and the data alone has the last word.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .units import OUT, UnitSet

SCHEDULES = ("constant", "linear_decay", "cosine_decay")
ALL_BLOCKS = "all"
_BLOCK = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)$")


@dataclass
class DistillationConfig:
    """What the student learns from the teacher, besides the DDPM loss (all weights 0: no distillation).

    Examples
    --------
    >>> DistillationConfig(output_weight=1.0)  # output level only
    >>> DistillationConfig(output_weight=1.0, feature_weight=0.1, feature_layers=("mid_block", "up_blocks.0"))
    """

    output_weight: float = field(default=0.0, metadata={"help": (
        "Weight of ||student(x_t, t) - teacher(x_t, t)||^2 (mean over elements, the DDPM loss's scale) on the DDPM "
        "loss's own noisy input and timestep; 0 = off.")})
    feature_weight: float = field(default=0.0, metadata={"help": (
        "Weight of the relative squared error between the student's and the teacher's block outputs (mapped through "
        "the kept channels); 0 = off.")})
    feature_layers: Tuple[str, ...] = field(default=(), metadata={"help": (
        "Blocks whose outputs are matched: 'down_blocks.<i>', 'mid_block', 'up_blocks.<i>', or 'all'.")})
    schedule: str = field(default="constant", metadata={"help": (
        f"How the weights change over the run: one of {SCHEDULES} (decays go from 1 at step 0 to 0 at the last step).")})

    def __post_init__(self):
        self.feature_layers = tuple(self.feature_layers or ())
        for name in ("output_weight", "feature_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Distillation {name} must be a finite number >= 0 (0 = off), got {value!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Unknown distillation schedule {self.schedule!r}; choose one of {SCHEDULES}.")
        if self.feature_weight > 0 and not self.feature_layers:
            raise ValueError("A feature distillation weight needs the blocks to match (--distill_features, e.g. 'mid_block' "
                             "or 'all').")
        if self.feature_layers and self.feature_weight == 0:
            raise ValueError("Distillation feature layers were given with a feature weight of 0; set --distill_feature_weight "
                             "(e.g. 0.1) or drop --distill_features.")
        for layer in self.feature_layers:
            if layer != ALL_BLOCKS and not _BLOCK.match(layer):
                raise ValueError(f"Feature distillation is supported at block outputs only: 'down_blocks.<i>', 'mid_block', "
                                 f"'up_blocks.<i>' or 'all'; got {layer!r}.")

    @property
    def enabled(self) -> bool:
        return self.output_weight > 0 or self.feature_weight > 0

    def factor(self, step: int, max_steps: int) -> float:
        """The schedule's factor at optimizer step ``step`` (0-based) of ``max_steps``."""
        if self.schedule == "constant" or max_steps <= 1:
            return 1.0
        progress = min(max(step / (max_steps - 1), 0.0), 1.0)
        if self.schedule == "linear_decay":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def describe(self) -> str:
        """One line for the model card and logs."""
        if not self.enabled:
            return "none (the DDPM loss only)"
        parts = []
        if self.output_weight > 0:
            parts.append(f"output level, weight {self.output_weight:g}")
        if self.feature_weight > 0:
            parts.append(f"feature level at {', '.join(self.feature_layers)}, weight {self.feature_weight:g}")
        return (f"from the dense teacher on the same noisy input and timestep ({'; '.join(parts)}; {self.schedule} "
                "schedule), in the pruning stage and the fine-tuning")


def block_names(model) -> List[str]:
    """The blocks of a ``UNet2DModel`` whose outputs can be distilled, in execution order."""
    return ([f"down_blocks.{i}" for i in range(len(model.down_blocks))] + ["mid_block"]
            + [f"up_blocks.{i}" for i in range(len(model.up_blocks))])


def resolve_feature_layers(model, layers: Sequence[str]) -> List[str]:
    """``layers`` with ``'all'`` expanded, checked against ``model`` (works on a model on the meta device)."""
    available = block_names(model)
    if getattr(model, "mid_block", None) is None:
        available.remove("mid_block")
    out: List[str] = []
    for layer in layers:
        for name in (available if layer == ALL_BLOCKS else [layer]):
            if name not in available:
                raise ValueError(f"Feature distillation layer {name!r} is not a block of this model; choose from {available} "
                                 "or 'all'.")
            if name not in out:
                out.append(name)
    for name in out:
        block_output_producer(model, name)  # a clear error for a block whose output channels cannot be mapped
    return out


def block_output_producer(model, block: str) -> str:
    """The layer that writes a block's output channels, at the same channel indices (one residual-stream family).

    A block's output is its sampler's output when it has a convolutional (or ResNet) sampler, otherwise the
    output of its last ResNet (``shortcut + conv2``; an attention after it adds ``to_out`` into the same channels).
    """
    from diffusers.models.resnet import ResnetBlock2D

    names = {m: n for n, m in model.named_modules()}
    module = model.get_submodule(block)
    samplers = getattr(module, "downsamplers", None) or getattr(module, "upsamplers", None)
    if samplers:
        last = samplers[-1]
        if isinstance(last, ResnetBlock2D):
            return names[last.conv2]
        conv = getattr(last, "conv", None)
        if isinstance(conv, nn.Conv2d):
            return names[conv]
    resnets = getattr(module, "resnets", None)
    if not resnets or not isinstance(resnets[-1], ResnetBlock2D) or getattr(module, "skip_conv", None) is not None:
        raise ValueError(f"Feature distillation cannot map the output channels of {block} ({type(module).__name__}); "
                         "drop it from --distill_features.")
    return names[resnets[-1].conv2]


def channel_values(units: UnitSet, family_values: Mapping[str, torch.Tensor], module: str, size: int) -> torch.Tensor:
    """The mask value of each output channel of the producing layer ``module`` (dense indexing).

    ``family_values``: one tensor of unit values per family (``UnitMasks.family_values`` or final masks).
    """
    found = False
    out = None
    for family in units:
        for s in family.slices:
            if s.module != module or s.dim != OUT:
                continue
            values = family_values[family.name]
            if out is None:
                out = values.new_ones(size)
            unit = family.channel_to_unit().to(values.device)[s.family_index.to(values.device)]
            out[s.layer_index.to(values.device)] = values[unit].to(out.dtype)
            found = True
    if not found:
        raise ValueError(f"The layer {module!r} belongs to no unit family; its channels cannot be mapped.")
    return out


class FeatureMap:
    """How the teacher's block outputs become targets for the student's (see the module docstring).

    Build one with :meth:`for_masked` (pruning stage: live masks on the dense student) or :meth:`for_exported`
    (after the export: the final binary masks).
    """

    def __init__(self, layers: Dict[str, str], units: UnitSet, values: Callable[[], Mapping[str, torch.Tensor]],
                 exported: bool, masks=None):
        self.layers = layers  # block -> producing layer
        self.units = units
        self.values = values
        self.exported = exported
        self.masks = masks
        self._kept: Dict[str, torch.Tensor] = {}

    @classmethod
    def for_masked(cls, model, units: UnitSet, masks, layers: Sequence[str]) -> "FeatureMap":
        """``masks``: the :class:`~diffusers_gfprune.masks.UnitMasks` on the dense student (read at every step,
        through their index tables on the device: no Python loop over the families per step)."""
        return cls(_producers(model, units, layers), units, lambda: {n: masks.family_values(n) for n in units.names}, False,
                   masks)

    @classmethod
    def for_exported(cls, model, units: UnitSet, final_masks: Mapping[str, torch.Tensor], layers: Sequence[str]) -> "FeatureMap":
        """``model``: the dense teacher (or dense student) the units and block names refer to."""
        return cls(_producers(model, units, layers), units, lambda: final_masks, True)

    def kept_channels(self, block: str, size: int) -> torch.Tensor:
        """Indices of the teacher's channels that the exported student keeps at ``block``'s output, in its order."""
        if block not in self._kept:
            values = channel_values(self.units, self.values(), self.layers[block], size)
            self._kept[block] = (values != 0).nonzero().squeeze(1)
        return self._kept[block]

    def target(self, block: str, teacher_feature: torch.Tensor) -> torch.Tensor:
        size = teacher_feature.shape[1]
        if self.exported:
            return teacher_feature.index_select(1, self.kept_channels(block, size).to(teacher_feature.device))
        if self.masks is not None:
            mask = self.masks.channel_mask(self.layers[block], teacher_feature.dtype, teacher_feature.device)
        else:
            mask = channel_values(self.units, self.values(), self.layers[block], size)
        return teacher_feature * mask.to(teacher_feature.device, teacher_feature.dtype).view(1, -1, 1, 1)


def _producers(model, units: UnitSet, layers: Sequence[str]) -> Dict[str, str]:
    producers = {block: block_output_producer(model, block) for block in layers}
    for block, module in producers.items():
        if not any(s.module == module and s.dim == OUT for f in units for s in f.slices):
            raise ValueError(f"The output of {block} ({module}) belongs to no unit family; drop it from --distill_features.")
    return producers


@contextmanager
def capture_outputs(model: nn.Module, blocks: Sequence[str]):
    """Record the output tensor of each block in ``blocks`` during the forward passes inside the context."""
    model = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    seen: Dict[str, torch.Tensor] = {}
    handles = []
    for block in blocks:
        def hook(module, args, output, block=block):
            seen[block] = output[0] if isinstance(output, tuple) else output  # down blocks return (hidden, skips)

        handles.append(model.get_submodule(block).register_forward_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def relative_feature_error(student: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per image ``sum (student - target)^2 / sum teacher^2``, averaged over the batch (float32)."""
    dims = tuple(range(1, teacher.dim()))
    error = (student.float() - target.float()).pow(2).sum(dims)
    scale = teacher.float().pow(2).sum(dims).clamp_min(1e-12)
    return (error / scale).mean()


class Distiller:
    """The DDPM loss plus the distillation term, on one forward pass of the student and one of the teacher.

    Parameters
    ----------
    teacher : UNet2DModel
        The dense teacher; put in eval mode without gradients here.
    config : DistillationConfig
    max_train_steps : int
        For the weight schedule.
    autocast : callable, optional
        A context manager factory for the teacher's forward pass (``accelerator.autocast`` under mixed precision).
    """

    def __init__(self, teacher: nn.Module, config: DistillationConfig, max_train_steps: int,
                 autocast: Optional[Callable] = None):
        if not config.enabled:
            raise ValueError("The distillation config has every weight at 0; train on the DDPM loss alone instead.")
        self.teacher = teacher.eval().requires_grad_(False)
        self.config = config
        self.max_train_steps = max_train_steps
        self.autocast = autocast or nullcontext
        self.blocks: Tuple[str, ...] = ()
        if config.feature_weight > 0:
            self.blocks = tuple(resolve_feature_layers(teacher, config.feature_layers))

    def __call__(self, ddpm, student: nn.Module, step: int, feature_map: Optional[FeatureMap] = None):
        """``(loss to backpropagate, parts)``; ``parts`` holds the detached ``ddpm``, ``output`` and ``feature`` terms.

        ``ddpm``: the step's :class:`~diffusers_gfprune.objective.DDPMLoss` (its noise and timesteps are used as drawn).
        """
        if self.blocks and feature_map is None:
            raise ValueError("Feature distillation needs a FeatureMap (FeatureMap.for_masked or FeatureMap.for_exported).")
        noisy, timesteps = ddpm.noisy(), ddpm.timesteps
        with torch.no_grad(), self.autocast(), capture_outputs(self.teacher, self.blocks) as teacher_features:
            teacher_out = self.teacher(noisy, timesteps).sample
        with capture_outputs(student, self.blocks) as student_features:
            student_out = student(noisy, timesteps).sample
        data = F.mse_loss(student_out.float(), ddpm.target().float())
        factor = self.config.factor(step, self.max_train_steps)
        total = data
        parts = {"ddpm": data.detach()}
        if self.config.output_weight > 0:
            output = F.mse_loss(student_out.float(), teacher_out.float())
            total = total + factor * self.config.output_weight * output
            parts["output"] = output.detach()
        if self.blocks:
            feature = sum(relative_feature_error(student_features[b], feature_map.target(b, teacher_features[b]),
                                                 teacher_features[b]) for b in self.blocks) / len(self.blocks)
            total = total + factor * self.config.feature_weight * feature
            parts["feature"] = feature.detach()
        return total, parts
