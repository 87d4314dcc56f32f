"""The gradient-flow pruning process, driven once per training step.

Steps ``t = 0 .. T``. With the soft phase ending at ``N`` and the pruning stage at ``M``:

* soft phase (``t <= N``): every ``K`` steps the criterion re-scores the units; the ``s_t`` fraction
  with the lowest (smoothed) scores is *selected* and multiplied by ``p_t``; the others are at 1.
  The selection leads the sparsity schedule by one interval, so that the last re-scoring (at the
  latest ``N - K``) already selects the target sparsity and no unit is newly selected when ``p_t``
  is near 0: mask values never jump from 1 to 0 in one step.
* hard phase (``N < t <= M``): binary masks at the target sparsity; re-scoring continues and a unit
  pruned earlier comes back when its score rises (its weights were only masked).
* at ``M``: :meth:`GradientFlowPruner.final_masks` are binary, ready for export.

Units that are masked to 0 give no gradient signal, so in the hard phase they are scored in a
second pass with their masks at 1 ("probe", ``reactivation=True``).

``process="flow"`` replaces the soft phase's ranking and preset ``p_t`` by learned masks
(:mod:`diffusers_gfprune.learned_masks`): the criterion scores the dense model once at step 0 and its ranks start
one logit per unit; through the soft phase the training loop calls :meth:`GradientFlowPruner.mask_energy` before
every forward pass (the gates go into the masks) and :meth:`GradientFlowPruner.update_masks` after the synchronized
backward pass (the logits descend the same loss as the weights, the expected MACs held on the schedule). At
``N + 1`` the masks are hardened exactly at the target (:meth:`LearnedMasks.harden`), the step's DDPM loss on the
first scoring mini-batch is measured with the gates and with the hardened masks (the loss jump, in
:attr:`GradientFlowPruner.hardening`), and the hard phase, the export and the fine-tuning are the progressive
process's.

Placement and precision: the masks follow the model's device (:meth:`GradientFlowPruner.to`, and the hooks move
them on first use); the criteria run in float32 whatever the training precision
(:func:`~diffusers_gfprune.precision.full_precision`) and compute on the device; the scores come to the host once
per re-scoring, where the selection is decided, and every process checks that all processes selected the same
units (:func:`~diffusers_gfprune.distributed.check_rank_agreement`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import schedules
from .criteria import Criterion, get_criterion
from .distributed import all_reduce_mean, check_rank_agreement
from .learned_masks import LearnedMaskConfig, LearnedMasks, MaskBudget
from .masks import UnitMasks
from .precision import full_precision, unscaled
from .selection import SELECTIONS, check_round_to, prune_counts_local, select
from .state_files import load_state, save_state
from .units import UnitSet

PHASES = ("soft", "hard", "done")
PROCESSES = ("progressive", "one-shot", "flow")
SOFT_COMMITS = ("monotone", "reselect")
REACTIVATION_RULES = ("fair", "mixed")


@dataclass
class PrunerConfig:
    """How the pruning process runs. Step counts are in optimizer steps."""

    target_sparsity: float = field(default=0.5, metadata={"help": "Fraction of units removed at the end, in [0, 1)."})
    soft_steps: int = field(default=100, metadata={"help": "N: length of the progressive soft phase (paper: 0.1 T)."})
    pruning_steps: int = field(default=200, metadata={"help": "M: end of the pruning stage, > N (paper: 0.2 T); export happens here."})
    rescore_every: int = field(default=20, metadata={"help": "K: re-score the units every K steps."})
    sparsity_schedule: str = field(default="linear", metadata={"help": "Shape of s_t: linear, cosine or exponential."})
    mask_schedule: str = field(default="linear", metadata={"help": "Shape of p_t: linear, cosine or exponential."})
    schedule_sharpness: float = field(default=5.0, metadata={"help": "Steepness of the exponential schedules."})
    selection: str = field(default="local", metadata={"help": "'local': same fraction per family (stock layout); 'global': one ranking (per-layer layout)."})
    min_keep_fraction: float = field(default=0.1, metadata={"help": "Global selection: every family keeps at least this fraction (and one unit)."})
    score_ema: float = field(default=0.5, metadata={"help": "Smoothing of scores between re-scorings: s <- ema * s + (1 - ema) * new; 0 = no smoothing."})
    process: str = field(
        default="progressive",
        metadata={"help": "'progressive': the soft phase, then the hard phase, export at M (the paper); 'one-shot': score "
                          "the dense model once at step 0, prune the target at once and export (as Diff-Pruning is "
                          "published), then fine-tune. soft_steps and pruning_steps are ignored by 'one-shot'. 'flow': "
                          "the soft phase's masks are trainable gates that descend the training loss under the MACs "
                          "schedule (learned_masks.py), hardened exactly at the target at N + 1; then as 'progressive'."},
    )
    soft_commit: str = field(
        default="monotone",
        metadata={"help": "Soft phase: 'monotone' keeps a selected unit selected until the hard phase (its mask keeps "
                          "decaying); 'reselect' selects anew from the current scores at every re-scoring (a released "
                          "unit's mask returns to 1)."},
    )
    reactivation: bool = field(default=True, metadata={"help": "Hard phase: score pruned units with their masks at 1 so they can come back."})
    reactivation_rule: str = field(
        default="fair",
        metadata={"help": "Hard phase: 'fair' scores pruned and kept units in the same state (every mask at 1) before "
                          "they swap; 'mixed' compares pruned units scored with masks at 1 against kept units scored in "
                          "the masked model."},
    )
    reactivation_fraction: float = field(
        default=0.05,
        metadata={"help": "Hard phase: at most this fraction of each family's pruned units (at least one) swaps places with kept "
                          "units per re-scoring, and only where the pruned unit scores higher. Mini-batch scores are noisy; "
                          "unbounded swapping zeroes a different half of the selection at every re-scoring."},
    )
    round_to: int = field(
        default=1,
        metadata={"help": "Round every family's kept width to a multiple of this many channels (8, 16, 32: faster "
                          "kernels, see docs/speed.md); 1 = no rounding. With local selection (stock layout), give a "
                          "target sparsity whose widths are already multiples (export.stock_sparsities(units, round_to))."},
    )

    target_macs: Optional[float] = field(
        default=None,
        metadata={"help": "Global selection: prune until the MACs are this fraction of the dense MACs (the selection at "
                          "target_sparsity meets it exactly, earlier ones in proportion); None = count units."},
    )

    def __post_init__(self):
        if not isinstance(self.target_sparsity, (int, float)) or not 0 <= self.target_sparsity < 1:
            raise ValueError(f"target_sparsity must lie in [0, 1), got {self.target_sparsity!r}.")
        if self.process not in PROCESSES:
            raise ValueError(f"Unknown process {self.process!r}; choose one of {PROCESSES}.")
        if self.soft_commit not in SOFT_COMMITS:
            raise ValueError(f"Unknown soft_commit {self.soft_commit!r}; choose one of {SOFT_COMMITS}.")
        if self.reactivation_rule not in REACTIVATION_RULES:
            raise ValueError(f"Unknown reactivation_rule {self.reactivation_rule!r}; choose one of {REACTIVATION_RULES}.")
        if self.process == "one-shot":
            self.soft_steps, self.pruning_steps, self.rescore_every = 0, 0, 1
        elif not 0 < self.soft_steps < self.pruning_steps:
            raise ValueError(
                f"Need 0 < soft_steps < pruning_steps, got soft_steps={self.soft_steps}, pruning_steps={self.pruning_steps}."
            )
        if self.process != "one-shot" and not 1 <= self.rescore_every <= self.soft_steps:
            raise ValueError(f"rescore_every must lie in [1, soft_steps={self.soft_steps}], got {self.rescore_every}.")
        for name, kind in (("sparsity_schedule", self.sparsity_schedule), ("mask_schedule", self.mask_schedule)):
            if kind not in schedules.SCHEDULES:
                raise ValueError(f"Unknown {name} {kind!r}; choose one of {schedules.SCHEDULES}.")
        if self.selection not in SELECTIONS:
            raise ValueError(f"Unknown selection {self.selection!r}; choose one of {SELECTIONS}.")
        if not 0 <= self.score_ema < 1:
            raise ValueError("score_ema must lie in [0, 1).")
        if not 0 <= self.reactivation_fraction <= 1:
            raise ValueError(f"reactivation_fraction must lie in [0, 1], got {self.reactivation_fraction!r}.")
        check_round_to(self.round_to)

    @classmethod
    def from_total_steps(cls, max_train_steps: int, soft_fraction: float = 0.1, pruning_fraction: float = 0.2, **kwargs):
        """The paper's ratios: N = 0.1 T, M = 0.2 T, and K = N / 10 unless given."""
        soft = max(1, int(round(soft_fraction * max_train_steps)))
        pruning = max(soft + 1, int(round(pruning_fraction * max_train_steps)))
        kwargs.setdefault("rescore_every", max(1, soft // 10))
        return cls(soft_steps=soft, pruning_steps=pruning, **kwargs)


class GradientFlowPruner:
    """Drives the unit masks of a dense model through the soft and hard phases.

    Parameters
    ----------
    model : UNet2DModel
        The dense model, unwrapped (criteria differentiate it directly, never through DDP).
    units : UnitSet
    config : PrunerConfig
    criterion : Criterion or str
        A criterion object or its name.
    masks : UnitMasks, optional
        Created and attached if not given.
    flow : LearnedMaskConfig, optional
        ``process="flow"``: how the learned masks are parametrized and optimized (default
        :class:`~diffusers_gfprune.learned_masks.LearnedMaskConfig`); refused with another process.

    Call :meth:`step` once per optimizer step with a callable that returns the criterion's
    mini-batch losses (only called when a re-scoring happens).
    """

    def __init__(self, model, units: UnitSet, config: PrunerConfig, criterion="gradient_flow", masks: Optional[UnitMasks] = None,
                 flow: Optional[LearnedMaskConfig] = None):
        self.model = model
        self.units = units
        self.config = config
        self.criterion: Criterion = get_criterion(criterion) if isinstance(criterion, str) else criterion
        if flow is not None and config.process != "flow":
            raise ValueError(f"Learned-mask settings were given for process {config.process!r}; they need process='flow'.")
        if config.process == "flow" and getattr(self.criterion, "uses_trajectory", False):
            raise ValueError(f"The {self.criterion.name} criterion learns from the masks' gradients over the training steps; "
                             "under process 'flow' those gradients train the masks. Choose another criterion (magnitude, "
                             "gradient_flow with --gradient_flow_form loss_change, ...) or another process.")
        self.masks = masks if masks is not None else UnitMasks(model, units)
        self.masks.attach()
        self.flow: Optional[LearnedMasks] = None
        if config.process == "flow":
            self.flow = LearnedMasks(self.masks, flow, MaskBudget.from_pruner_config(config))
        self.hardening: Optional[dict] = None  # flow: the loss jump and the gates' state at the hardening
        self._flow_sparsity = 0.0
        self.scores: Optional[Dict[str, torch.Tensor]] = None
        self.pruned: Dict[str, torch.Tensor] = {f.name: torch.zeros(f.num_units, dtype=torch.bool) for f in units}
        self.step_count = 0
        self.num_rescorings = 0
        self.last_changes = 0
        self.history: List[dict] = []

    def to(self, device=None) -> "GradientFlowPruner":
        """Move the masks to ``device`` (default: the model's); call after ``accelerator.prepare`` moved the model."""
        self.masks.to(device)
        if self.flow is not None:
            self.flow.to(self.masks.device)
        return self

    @property
    def learning_masks(self) -> bool:
        """Whether the masks are trainable at this step (``process="flow"``, soft phase): the training loop then calls
        :meth:`mask_energy` before every forward pass and :meth:`update_masks` after the synchronized backward pass."""
        return self.flow is not None and self.phase() == "soft"

    # ------------------------------------------------------------------ phases
    def phase(self, step: Optional[int] = None) -> str:
        step = self.step_count if step is None else step
        if self.config.process == "one-shot":
            return "hard" if step == 0 else "done"
        if step <= self.config.soft_steps:
            return "soft"
        if step <= self.config.pruning_steps:
            return "hard"
        return "done"

    def last_soft_rescoring(self) -> int:
        n, k = self.config.soft_steps, self.config.rescore_every
        return ((n - 1) // k) * k

    def sparsity_at(self, step: int) -> float:
        """Target sparsity of the selection made at ``step``."""
        c = self.config
        if self.phase(step) != "soft":
            return c.target_sparsity
        # Lead by one interval: the last soft re-scoring selects the full target.
        x = min(1.0, (step + c.rescore_every) / (self.last_soft_rescoring() + c.rescore_every))
        return schedules.sparsity(x, c.target_sparsity, c.sparsity_schedule, c.schedule_sharpness)

    def mask_value_at(self, step: int) -> float:
        c = self.config
        if self.phase(step) != "soft":
            return 0.0
        return schedules.mask_value(step / c.soft_steps, c.mask_schedule, c.schedule_sharpness)

    def is_rescoring_step(self, step: int) -> bool:
        c = self.config
        phase = self.phase(step)
        if c.process == "one-shot":
            return step == 0
        if c.process == "flow" and phase == "soft":
            return step == 0  # the criterion starts the logits; the gradient moves them
        if c.process == "flow" and step == c.soft_steps + 1:
            return False  # the hardening selects
        if phase == "soft":
            return step % c.rescore_every == 0 and step <= self.last_soft_rescoring()
        if phase == "hard":
            return step % c.rescore_every == 0 or step == c.soft_steps + 1
        return False

    # ------------------------------------------------------------------ the step
    def step(self, step: int, losses: Optional[Callable[[], Sequence]] = None) -> dict:
        """Advance to ``step``: re-score if due, select, and write the mask values.

        Parameters
        ----------
        step : int
            The current optimizer step, counted from 0 at the start of pruning.
        losses : callable, optional
            Returns a list of :class:`~diffusers_gfprune.objective.DDPMLoss` for the criterion;
            needed by data-driven criteria on re-scoring steps.

        Returns
        -------
        dict
            ``phase``, ``sparsity`` (fraction of units currently selected), ``mask_value``,
            ``rescored``.
        """
        self.step_count = step
        phase = self.phase(step)
        if self.flow is not None and (phase == "soft" or (phase == "hard" and self.hardening is None)):
            return self._flow_step(step, phase, losses)
        rescored = False
        if phase != "done" and self.is_rescoring_step(step):
            self._rescore(losses, phase)
            proposal = select(
                self.scores, self.units, self.sparsity_at(step), self.config.selection, self.config.min_keep_fraction,
                self.config.round_to, self.config.target_macs, self.config.target_sparsity,
            )
            previous = self.pruned
            self.pruned = proposal if self.config.process == "one-shot" else self._evolve(previous, proposal, phase)
            check_rank_agreement(self.pruned, f"the units selected at step {step}", self.masks.device)
            self.last_changes = sum(int((self.pruned[k] & ~previous[k]).sum()) for k in self.pruned)
            rescored = True
        if phase != "done":
            self._write_masks(self.mask_value_at(step))
        info = {
            "step": step,
            "phase": phase,
            "sparsity": self.current_sparsity(),
            "mask_value": self.mask_value_at(step) if phase == "soft" else 0.0,
            "rescored": rescored,
            "newly_pruned": self.last_changes if rescored else 0,
        }
        if rescored:
            self.history.append({k: info[k] for k in ("step", "phase", "sparsity", "newly_pruned")})
        return info

    # ------------------------------------------------------------------ process "flow"
    def _flow_step(self, step: int, phase: str, losses) -> dict:
        """The soft phase of the learned masks (start at step 0, the step's target and noise), or the hardening."""
        flow = self.flow
        rescored = False
        if phase == "soft":
            if self.scores is None:
                self._rescore(losses, "soft")  # the dense model, every mask at 1
                flow.initialize(self.scores)
                rescored = True
            info = {"step": step, "phase": "soft", "sparsity": self._flow_sparsity, "mask_value": None, "rescored": rescored,
                    "newly_pruned": 0}
            reporting = rescored or step % self.config.rescore_every == 0 or step == self.config.soft_steps
            # Reads the device back, so at the re-scoring cadence only; before this step's target is set, so it says
            # where the last update left the masks against the target they were solved for.
            report = flow.report() if reporting else None
            flow.begin_step(step)
            if reporting:
                # The fraction of units whose gate is below 0.5: kept until the next report.
                self._flow_sparsity = 1 - float(flow.deterministic_gates().gt(0.5).float().mean())
                info.update(flow={k: report[k] for k in ("target", "expected_macs", "undecided", "constraint_max_violation")},
                            sparsity=self._flow_sparsity)
                self.history.append({"step": step, "phase": "soft", "sparsity": info["sparsity"], "newly_pruned": 0, **info["flow"]})
            return info
        # The first hard step: binary masks exactly at the target, ranked by the logits.
        report = flow.report()
        before = self.probe_loss(losses, flow.evaluating)
        self.pruned = {name: keep == 0 for name, keep in flow.harden().items()}
        check_rank_agreement(self.pruned, f"the units kept at the hardening (step {step})", self.masks.device)
        self._write_masks(0.0)
        after = self.probe_loss(losses, contextlib.nullcontext)
        self.hardening = {
            "step": step, "undecided": report["undecided"], "expected_macs": report["expected_macs"],
            "loss_gates": before, "loss_hard": after, "loss_jump": None if before is None else after - before,
        }
        self.last_changes = sum(int(p.sum()) for p in self.pruned.values())
        self.history.append({"step": step, "phase": "hard", "sparsity": self.current_sparsity(),
                             "newly_pruned": self.last_changes, "hardening": dict(self.hardening)})
        return {"step": step, "phase": "hard", "sparsity": self.current_sparsity(), "mask_value": 0.0, "rescored": False,
                "newly_pruned": self.last_changes, "hardening": dict(self.hardening)}

    def probe_loss(self, losses, masks_context=contextlib.nullcontext) -> Optional[float]:
        """The DDPM loss of the first scoring mini-batch under ``masks_context``, in float32, averaged over processes."""
        data = losses() if losses is not None else []
        if not data:
            return None
        total = None
        with torch.no_grad(), full_precision(self.model), masks_context():
            for weight, chunk in data[0].chunks():
                value = weight * chunk(self.model).detach().double()
                total = value if total is None else total + value
        all_reduce_mean([total])
        return float(total)

    def mask_energy(self) -> Optional[torch.Tensor]:
        """``process="flow"``, soft phase: write this step's gates into the masks and return the energy's budget terms
        (a scalar to add to the training objective); call before every forward pass. None otherwise."""
        return self.flow.apply() if self.learning_masks else None

    def update_masks(self, grad_scale: Optional[float] = None) -> bool:
        """``process="flow"``, soft phase: average the logits' gradients across processes and take the masks' step;
        call after the synchronized backward pass of every optimizer step. Returns whether a step was taken."""
        if not self.learning_masks:
            return False
        self.flow.all_reduce_gradients()
        return self.flow.update(grad_scale)

    @contextlib.contextmanager
    def evaluating(self):
        """The masks to sample with inside the context (validation): the learned masks' evaluation gates in the soft
        phase of ``process="flow"``, the current values otherwise."""
        with (self.flow.evaluating() if self.learning_masks else contextlib.nullcontext()):
            yield self

    def _evolve(self, previous: Dict[str, torch.Tensor], proposal: Dict[str, torch.Tensor], phase: str) -> Dict[str, torch.Tensor]:
        """The new selection: ``proposal``'s count per family, as close to ``previous`` as the rules allow.

        Soft phase: monotone. Units already selected stay selected (their mask keeps decaying, it never
        jumps back to 1); the family's new units are its lowest-scoring unselected ones.
        Hard phase: the counts stay; up to ``reactivation_fraction`` of a family's pruned units (at least
        one) come back, each in exchange for the lowest-scoring kept unit it outscores.
        """
        out = {}
        for family in self.units:
            name = family.name
            flags = previous[name].clone()
            score = self.scores[name].double().cpu()
            if phase == "soft" and self.config.soft_commit == "reselect":
                flags = proposal[name].clone()
            elif phase == "soft":
                target = int(proposal[name].sum())
                have = int(flags.sum())
                if target > have:
                    free = (~flags).nonzero().squeeze(1)
                    flags[free[torch.sort(score[free], stable=True).indices[: target - have]]] = True
                elif target < have:  # global selection moved width elsewhere: release the best selected units
                    taken = flags.nonzero().squeeze(1)
                    flags[taken[torch.sort(-score[taken], stable=True).indices[: have - target]]] = False
            elif self.config.reactivation:
                pruned_idx = flags.nonzero().squeeze(1)
                kept_idx = (~flags).nonzero().squeeze(1)
                budget = math.ceil(self.config.reactivation_fraction * len(pruned_idx)) if len(pruned_idx) else 0
                back = pruned_idx[torch.sort(-score[pruned_idx], stable=True).indices]  # best pruned first
                out_ = kept_idx[torch.sort(score[kept_idx], stable=True).indices]  # worst kept first
                for u, v in list(zip(back.tolist(), out_.tolist()))[:budget]:
                    if score[u] <= score[v]:
                        break
                    flags[u], flags[v] = False, True
            out[name] = flags
        return out

    def _rescore(self, losses, phase: str) -> None:
        data = losses() if (losses is not None and self.criterion.needs_data) else []
        if self.criterion.needs_data and not data:
            raise ValueError(f"The {self.criterion.name} criterion needs loss mini-batches at step {self.step_count}.")
        probing = phase == "hard" and self.config.reactivation and any(bool(p.any()) for p in self.pruned.values())
        fair = probing and self.config.reactivation_rule == "fair"
        if fair:
            # Every unit is scored with every mask at 1, so pruned and kept units compete on equal terms;
            # the training steps observed in the masked model are not in that state.
            self._reset_observations()
        else:
            fresh = self._score(data)
        if probing:
            # Pruned units have zero gradient; score them as if they were back.
            with self.masks.all_kept():
                probe = self._score(data)
            fresh = probe if fair else {k: torch.where(self.pruned[k], probe[k], fresh[k]) for k in fresh}
        ema = self.config.score_ema
        if self.scores is None or ema == 0:
            self.scores = {k: v.clone() for k, v in fresh.items()}
        else:
            self.scores = {k: ema * self.scores[k] + (1 - ema) * fresh[k] for k in fresh}
        self.num_rescorings += 1

    def _score(self, data) -> Dict[str, torch.Tensor]:
        """The criterion's scores in float32 arithmetic (or finer), brought to the host where the selection is made."""
        with full_precision(self.model):
            scores = self.criterion.score(self.model, self.units, data, masks=self.masks)
        return {k: v.detach().double().cpu() for k, v in scores.items()}

    # ------------------------------------------------------------------ the training trajectory
    @property
    def wants_mask_gradients(self) -> bool:
        """Whether the training loop should keep ``masks.values.grad`` for :meth:`observe_training_step`."""
        return bool(getattr(self.criterion, "uses_trajectory", False)) and self.phase() != "done"

    def observe_training_step(self, grad_scale: Optional[float] = None) -> None:
        """Hand the mask gradient of the training step just taken to the criterion (then clear it).

        Call after the backward pass of every optimizer step of the pruning stage; the gradient is
        averaged across processes first (on the device), so every process records what one process with the whole
        global batch would.

        Parameters
        ----------
        grad_scale : float, optional
            The loss scale of fp16 training (``accelerator.scaler.get_scale()``): the gradient is divided by it, and a
            step whose gradient overflowed (the optimizer skips it too) is not recorded. ``None``: no scaling.
        """
        values = self.masks.values
        if values.grad is None:
            return
        grad = unscaled(values.grad.detach().double(), grad_scale)
        values.grad = None
        all_reduce_mean([grad])
        if grad_scale is not None and not bool(torch.isfinite(grad).all()):
            return  # an overflowed fp16 step: the scaler skips the update and lowers the scale
        self.criterion.observe(grad)

    def _reset_observations(self) -> None:
        reset = getattr(self.criterion, "reset_observations", None)
        if reset is not None:
            reset()

    def _write_masks(self, value: float) -> None:
        # Built on the host and copied once: the masks know their zero pattern without reading the device.
        flat = torch.ones(self.units.num_units)
        for family in self.units:
            start = self.masks.offsets[family.name]
            flat[start : start + family.num_units][self.pruned[family.name]] = value
        self.masks.set_all(flat)

    # ------------------------------------------------------------------ results
    def current_sparsity(self) -> float:
        total = sum(int(p.sum()) for p in self.pruned.values())
        return total / self.units.num_units

    def final_masks(self) -> Dict[str, torch.Tensor]:
        """Binary masks (1 = keep) at the target sparsity, for export."""
        if self.scores is None:
            raise RuntimeError("The pruner has not scored the units yet; run the pruning stage first.")
        return {k: (~v).float() for k, v in self.pruned.items()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, object]:
        """Tensors (masks, scores, selection) and a JSON-able part (step, config, history)."""
        tensors = {}
        for name, value in self.masks.state_dict().items():
            tensors[f"mask/{name}"] = value
        for name, value in self.pruned.items():
            tensors[f"pruned/{name}"] = value.to(torch.uint8)
        if self.scores is not None:
            for name, value in self.scores.items():
                tensors[f"score/{name}"] = value.double()
        observed = getattr(self.criterion, "observation_state", lambda: {})()
        if observed.get("observed") is not None:
            tensors["observed"] = observed["observed"].double().cpu()
        meta = {
            "step": self.step_count,
            "num_rescorings": self.num_rescorings,
            "criterion": self.criterion.name,
            "criterion_config": asdict(self.criterion.config),
            "config": asdict(self.config),
            "history": self.history,
            "num_observed": observed.get("num_observed", 0),
            "hardening": self.hardening,
        }
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        tensors, meta = state["tensors"], state["meta"]
        if meta["config"] != asdict(self.config) or meta["criterion"] != self.criterion.name:
            raise ValueError(
                "The saved pruner state was made with another configuration "
                f"({meta['criterion']}, {meta['config']}); resume with the same pruning arguments."
            )
        self.masks.load_state_dict({n: tensors[f"mask/{n}"] for n in self.units.names})
        self.pruned = {n: tensors[f"pruned/{n}"].bool() for n in self.units.names}
        if f"score/{self.units.names[0]}" in tensors:
            self.scores = {n: tensors[f"score/{n}"].double() for n in self.units.names}
        self.step_count = int(meta["step"])
        self.num_rescorings = int(meta["num_rescorings"])
        self.history = list(meta["history"])
        self.hardening = meta.get("hardening")
        if hasattr(self.criterion, "load_observation_state"):
            observed = tensors.get("observed")
            observed = observed.to(self.masks.device) if observed is not None else None
            self.criterion.load_observation_state({"observed": observed, "num_observed": meta.get("num_observed", 0)})

    def save(self, directory: str) -> None:
        """Write ``pruner.safetensors`` and ``pruner.json`` into ``directory`` (and the learned masks' files, soft phase
        of ``process="flow"``)."""
        state = self.state_dict()
        save_state(directory, "pruner", state["tensors"], state["meta"])
        if self.flow is not None and self.hardening is None:  # the learned masks' own state, until the hardening
            self.flow.save(directory)

    def load(self, directory: str) -> None:
        tensors, meta = load_state(directory, "pruner")
        self.load_state_dict({"tensors": tensors, "meta": meta})
        if self.flow is not None and self.hardening is None and self.scores is not None:
            self.flow.load(directory)
