"""Learned masks: every unit's mask is a trainable variable that descends an energy under a MACs budget.

The progressive process of :mod:`diffusers_gfprune.pruner` multiplies the units a ranking selected by a preset
value ``p_t``. Here the mask values move by gradient instead, as the paper's abstract describes the soft phase
("guides [the mask] along the gradient flow of the energy function based on the pruning criterion in sparse
space"), in the family of the strongest structured-pruning methods (gates under a constraint on the expected size:
CoFi, Xia et al. 2022; Sheared-LLaMA, Xia et al. 2024).

* **Parameters.** One logit ``a_u`` per unit, in the flat order of :attr:`UnitMasks.values`. A parametrization
  turns the logits into the gate values written into the masks before each forward pass, and into each unit's
  *keep probability* ``q_u`` (the probability that its gate is non-zero, i.e. that the unit costs MACs):

  - ``sigmoid`` (default): the deterministic gate ``sigmoid(a / tau)``, ``tau`` falling geometrically from
    ``temperature_start`` to ``temperature_end`` over the soft phase, so the gates are continuous in time and
    near-binary at its end; ``q`` is the gate itself (a relaxation: a gate of 0.5 costs all of its MACs until
    the hardening).
  - ``hard_concrete`` (Louizos, Welling & Kingma 2018; beta 2/3, gamma -0.1, zeta 1.1): ``s = sigmoid((log v -
    log(1 - v) + a) / beta)`` with ``v ~ U(0, 1)`` drawn once per step, stretched to ``(gamma, zeta)`` and clipped
    to [0, 1]; at evaluation ``s = sigmoid(a)``. Gates reach exactly 0 and 1 with finite logits, and ``q =
    sigmoid(a - beta log(-gamma / zeta))`` is the exact probability of a non-zero gate.
  - ``straight_through``: the binary gate ``[a > 0]`` forward, the gradient of ``sigmoid(a / tau)`` backward.

* **Energy.** ``E = L_task(masked network) [+ Lagrangian] [+ prior]``. The training loop owns ``L_task`` (the DDPM
  loss, plus distillation when on); :meth:`LearnedMasks.apply` returns the rest. Each *constraint* ``c`` has an
  expected value ``C_c`` (differentiable in the logits) and the schedule's target ``t`` at this step, from where
  the masks start at step 0 to the final target at ``soft_steps`` (the pruner's sparsity schedule,
  :mod:`diffusers_gfprune.schedules`). Two ways to hold ``C = t`` (``budget``):

  - ``projection`` (default): at every step a threshold ``b_c`` per constraint is solved by bisection so that
    ``C_c(a - b_c) = t`` exactly, and the gates are computed from ``a - b``. ``b`` enters the graph through one
    Newton step from the solution (:meth:`LearnedMasks._logits_on_target`), so the task gradient reaches the
    logits projected onto the constraint: the masks follow the gradient flow of the energy *on* the budget's
    surface, trading units against each other. This is the limit of the Lagrangian below where the multiplier is
    at its optimum at every step; it has no multiplier learning rate to tune and no overshoot.
  - ``lagrangian`` (CoFi, Sheared-LLaMA): ``sum_c lambda1_c (C_c - t) + lambda2_c (C_c - t)^2`` in the energy,
    the multipliers ascending it (``maximize``) with their own Adam. In a preliminary probe on the digits teacher
    (docs/benchmarks.md, learned masks) it stalls with the annealed sigmoid gates once they saturate (0.78 of the
    dense MACs at the end of a 30-step soft phase, 0.71 after 100 steps, against 0.48), and with hard-concrete
    gates it meets the target but leaves half of the gates undecided; hence not the default.

  The constraints (``scope``):

  - ``global``: one constraint on the expected MACs as a fraction of the dense MACs
    (:meth:`~diffusers_gfprune.unit_macs.UnitMacs.expected_fraction`), or, for a unit-count target in the
    per-layer layout, on the expected fraction of kept units. The per-layer hardening is one global ranking under
    the same budget, so one constraint lets the energy, not a preset split, decide where the MACs go.
  - ``family``: one constraint per unit family on its expected fraction of kept units, every family with the
    stock keep ratio as target. The stock layout keeps the same fraction of every family, so its MACs follow from
    that ratio; holding every family at the ratio through the soft phase makes the final per-family top-k a
    small step. This is Sheared-LLaMA's reason for a multiplier pair per unit type (a target *shape*, not only a
    size), at the granularity the stock layout fixes: a pair per type (all attention widths together, ...) would
    let the families of one type drift apart, and the hardening would then move them back at once.

* **The criterion.** Its scores start the logits (:func:`initial_logits`: ranks, not values, mapped linearly onto
  ``init_mean +- init_spread``; the criteria's scales differ by orders of magnitude, their orders are what they
  mean). An optional prior ``prior_weight * mean((a - a_0)^2)`` holds the logits near that start.

* **Hardening.** :meth:`LearnedMasks.harden` returns binary masks (1 = keep) that meet the target exactly, ranked
  by logit with the library's own selection (:func:`diffusers_gfprune.selection.select`): per-family top-k at the
  stock keep ratio (:func:`diffusers_gfprune.export.stock_keep_ratio`), one global ranking (units or MACs) for the
  per-layer layout. Equal logits are broken by unit order (stable sort), so the result is deterministic.

* **The gates' gradient without their memory** (``gate_gradient``, default ``"parameters"`` for sigmoid gates). A
  mask in the autograd graph makes autograd keep every masked layer's output before the mask (about 1.5x a training
  step's activations). Each mask multiplies the whole output of a layer linear in its own parameters, so ``m_u dL/dm_u
  = S_u = sum(theta * dL/dtheta)`` over the unit's producing layers (:meth:`UnitMasks.parameter_products`); with
  ``dm/dz = m (1 - m) / tau`` the logits' gradient is ``S_u (1 - m_u) / tau`` through the projection, formed after the
  backward pass from the gradients training computes anyway, with the masks constant in the forward pass. Equal to
  autograd's (tested); hard-concrete and straight-through gates need autograd (a division by the gate, or the
  gradient at a gate of 0).

* **Optimization and state.** The logits and the multipliers have their own Adam without weight decay (a decay
  would pull every logit to 0, a gate of about 0.5: a bias, not a regularizer). :meth:`LearnedMasks.state_dict`
  holds every tensor (logits, thresholds, multipliers, the prior's start, the optimizer's moments and step
  counts, the gate noise's random state) for safetensors and a JSON-able part, so a resumed run continues bit for
  bit. The masks are not parameters of the DDP-wrapped model: :meth:`LearnedMasks.all_reduce_gradients` averages
  the logits' gradients on their device, and the gate noise comes from the same seed on every process, so every
  process holds the same masks.

Per optimizer step::

    flow.begin_step(step)              # the step's target, temperature and gate noise
    for micro_batch in accumulation:   # before every forward pass: gates -> masks.values, and the budget terms
        loss = task_loss(model, micro_batch) + flow.apply()
        loss.backward()
    flow.all_reduce_gradients()        # the gates' gradient (from the weights' gradients: before clipping them); processes
    flow.update()                      # the logits descend the energy, the multipliers ascend it
    ...
    masks = flow.harden()              # at the end of the soft phase: binary, exactly at the target
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple

import torch

from . import schedules
from .distributed import all_reduce_mean, world_size
from .export import stock_keep_ratio
from .masks import UnitMasks
from .selection import SELECTIONS, check_round_to, select, select_local
from .state_files import load_state, save_state

PARAMETRIZATIONS = ("hard_concrete", "sigmoid", "straight_through")
GATE_GRADIENTS = ("auto", "autograd", "parameters")
SCOPES = ("global", "family")
BUDGETS = ("lagrangian", "projection")
UNDECIDED = (0.1, 0.9)  # a gate strictly between these is reported as not yet decided
FLOOR_GATE = 1e-3  # the gate of a family's last unit in a sample that would zero the whole family
BISECTION_STEPS = 40  # halvings of a threshold interval of about 100 logits: below float32 resolution


@dataclass
class LearnedMaskConfig:
    """How the learned masks are parametrized, started and optimized."""

    parametrization: str = field(
        default="sigmoid",
        metadata={"help": "Gate of each unit: 'hard_concrete' (stochastic L0 gates, Louizos et al. 2018; exact 0 and 1 "
                          "reachable, deterministic at evaluation), 'sigmoid' (deterministic sigmoid(a / tau) with tau "
                          "annealed over the soft phase) or 'straight_through' (binary forward, sigmoid gradient)."},
    )
    scope: Optional[str] = field(
        default=None,
        metadata={"help": "Budget constraints: 'global' (one multiplier pair on the expected MACs, or kept units for a "
                          "unit-count target), 'family' (one pair per family on its kept fraction). None: 'family' for "
                          "local selection (stock layout), 'global' for global selection (per-layer)."},
    )
    budget: str = field(
        default="projection",
        metadata={"help": "How the expected MACs follow the schedule's target: 'lagrangian' (lambda1 (C - t) + lambda2 "
                          "(C - t)^2 in the energy, multipliers by gradient ascent: CoFi, Sheared-LLaMA) or 'projection' "
                          "(a threshold per constraint solved at every step so that C = t exactly; the task gradient "
                          "reaches the logits projected onto the constraint)."},
    )
    mask_lr: Optional[float] = field(
        default=None,
        metadata={"help": "Adam learning rate of the mask logits. None: mask_travel / soft_steps, so that a logit can "
                          "cross the whole gate range within the soft phase (Adam moves a parameter by about its "
                          "learning rate per step)."},
    )
    mask_travel: float = field(
        default=10.0,
        metadata={"help": "With mask_lr=None: the logit distance one soft phase can cover. Under the Lagrangian the logits "
                          "themselves must travel from the start (3 to 7) to below the gates' zero (about -2.4 for "
                          "hard-concrete); under the projection the threshold moves and the logits only reorder."},
    )
    multiplier_lr: Optional[float] = field(
        default=None,
        metadata={"help": "Adam learning rate of the Lagrange multipliers (gradient ascent). None: the same as the "
                          "logits' learning rate."},
    )
    adam_betas: Tuple[float, float] = field(
        default=(0.5, 0.999),
        metadata={"help": "Adam betas of the logits and the multipliers. beta1 = 0.5, not Adam's 0.9: under the Lagrangian, "
                          "momentum delays the logits' answer to the multipliers and the budget overshoots or stalls "
                          "(docs/benchmarks.md, learned masks)."},
    )
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Adam epsilon of the logits and the multipliers."})
    init_mean: float = field(
        default=5.0,
        metadata={"help": "Logit of the median-ranked unit at the start. With the default spread every start logit is "
                          ">= 3: sigmoid gates >= 0.95 at tau = 1, hard-concrete evaluation gates exactly 1 (logit >= 2.4), "
                          "so the masked model starts close to the dense one."},
    )
    init_spread: float = field(
        default=2.0,
        metadata={"help": "The criterion's ranks map linearly onto [init_mean - init_spread, init_mean + init_spread] "
                          "(lowest score lowest); 0 ignores the criterion."},
    )
    prior_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the prior mean((a - a_0)^2) that holds the logits near the criterion's start a_0; "
                          "0 = off."},
    )
    beta: float = field(default=2.0 / 3.0, metadata={"help": "hard_concrete: temperature of the concrete distribution."})
    gamma: float = field(default=-0.1, metadata={"help": "hard_concrete: lower end of the stretch (< 0)."})
    zeta: float = field(default=1.1, metadata={"help": "hard_concrete: upper end of the stretch (> 1)."})
    temperature_start: float = field(default=1.0, metadata={"help": "sigmoid, straight_through: tau at step 0."})
    temperature_end: float = field(
        default=0.01,
        metadata={"help": "sigmoid, straight_through: tau at the end of the soft phase (geometric in between); small "
                          "tau makes the sigmoid gates near-binary."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the hard-concrete gate noise (the same on every process)."})
    gate_gradient: str = field(
        default="auto",
        metadata={"help": "How the logits get the task loss's gradient: 'autograd' (the gates are in the graph; autograd "
                          "keeps every masked layer's output before the mask, about 1.5x a training step's activation "
                          "memory) or 'parameters' (the masks are constants in the forward pass and the gradient is formed "
                          "after the backward pass from the producing layers' sum(theta * dL/dtheta): the same gradient, "
                          "the memory of a plain step; sigmoid gates only). 'auto': 'parameters' for sigmoid gates."},
    )

    def __post_init__(self):
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"Unknown parametrization {self.parametrization!r}; choose one of {PARAMETRIZATIONS}.")
        if self.budget not in BUDGETS:
            raise ValueError(f"Unknown budget {self.budget!r}; choose one of {BUDGETS}.")
        if self.scope is not None and self.scope not in SCOPES:
            raise ValueError(f"Unknown scope {self.scope!r}; choose one of {SCOPES} (or None for the layout's own).")
        for name in ("mask_lr", "multiplier_lr"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number (or None for the default), got {value!r}.")
        if not self.mask_travel > 0:
            raise ValueError(f"mask_travel must be > 0, got {self.mask_travel!r}.")
        self.adam_betas = tuple(self.adam_betas)
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}.")
        if not self.adam_epsilon > 0:
            raise ValueError(f"adam_epsilon must be > 0, got {self.adam_epsilon!r}.")
        if self.init_spread < 0:
            raise ValueError(f"init_spread must be >= 0, got {self.init_spread!r}.")
        if self.prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0, got {self.prior_weight!r}.")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta!r}.")
        if not (self.gamma < 0 and self.zeta > 1):
            raise ValueError(f"The hard-concrete stretch needs gamma < 0 < 1 < zeta, got gamma={self.gamma}, zeta={self.zeta}.")
        if self.gate_gradient not in GATE_GRADIENTS:
            raise ValueError(f"Unknown gate_gradient {self.gate_gradient!r}; choose one of {GATE_GRADIENTS}.")
        if self.gate_gradient == "parameters" and self.parametrization != "sigmoid":
            raise ValueError(f"gate_gradient='parameters' forms the gradient of sigmoid gates (d gate / d logit = m (1 - m) "
                             f"/ tau cancels the 1 / m it needs); {self.parametrization} gates need gate_gradient='autograd'.")
        if not (0 < self.temperature_end <= self.temperature_start):
            raise ValueError(f"Need 0 < temperature_end <= temperature_start, got {self.temperature_end} and "
                             f"{self.temperature_start}.")


@dataclass(frozen=True)
class MaskBudget:
    """What the pruning run must reach and when: the fields of :class:`~diffusers_gfprune.pruner.PrunerConfig`
    the learned masks read (:meth:`from_pruner_config` copies them)."""

    soft_steps: int = field(metadata={"help": "N: the soft phase, steps 0..N; the target is final at N."})
    target_sparsity: float = field(metadata={"help": "Fraction of units removed at the end (stock: on the stock grid)."})
    selection: str = field(default="local", metadata={"help": "'local' (stock layout) or 'global' (per-layer)."})
    target_macs: Optional[float] = field(default=None, metadata={"help": "Global selection: the MACs fraction to meet instead of a unit count."})
    min_keep_fraction: float = field(default=0.1, metadata={"help": "Global selection: every family keeps at least this fraction."})
    round_to: int = field(default=1, metadata={"help": "Kept widths rounded to multiples of this many channels."})
    sparsity_schedule: str = field(default="linear", metadata={"help": "Shape of the target over the soft phase."})
    schedule_sharpness: float = field(default=5.0, metadata={"help": "Steepness of the exponential schedule."})

    def __post_init__(self):
        if isinstance(self.soft_steps, bool) or not isinstance(self.soft_steps, int) or self.soft_steps < 1:
            raise ValueError(f"soft_steps must be an integer >= 1, got {self.soft_steps!r}.")
        if not isinstance(self.target_sparsity, (int, float)) or not 0 <= self.target_sparsity < 1:
            raise ValueError(f"target_sparsity must lie in [0, 1), got {self.target_sparsity!r}.")
        if self.selection not in SELECTIONS:
            raise ValueError(f"Unknown selection {self.selection!r}; choose one of {SELECTIONS}.")
        if self.target_macs is not None:
            if self.selection != "global":
                raise ValueError("A MACs target for learned masks needs selection='global' (the per-layer layout); the "
                                 "stock layout meets a MACs target through its sparsity (export.sparsity_for_macs).")
            if not 0 < self.target_macs <= 1:
                raise ValueError(f"target_macs is a fraction of the dense MACs in (0, 1], got {self.target_macs!r}.")
        if self.sparsity_schedule not in schedules.SCHEDULES:
            raise ValueError(f"Unknown sparsity_schedule {self.sparsity_schedule!r}; choose one of {schedules.SCHEDULES}.")
        check_round_to(self.round_to)

    @classmethod
    def from_pruner_config(cls, config) -> "MaskBudget":
        """The budget of a :class:`~diffusers_gfprune.pruner.PrunerConfig` (read by attribute name)."""
        return cls(
            soft_steps=config.soft_steps, target_sparsity=config.target_sparsity, selection=config.selection,
            target_macs=config.target_macs, min_keep_fraction=config.min_keep_fraction, round_to=config.round_to,
            sparsity_schedule=config.sparsity_schedule, schedule_sharpness=config.schedule_sharpness,
        )


def initial_logits(
    scores: Optional[Dict[str, torch.Tensor]], units, ranking: str = "family", mean: float = 5.0, spread: float = 2.0
) -> torch.Tensor:
    """Starting logits (flat, float32, on the host) from a criterion's unit scores (higher = keep).

    Parameters
    ----------
    scores : dict of str to torch.Tensor, or None
        One score per unit of every family; None starts every logit at ``mean``.
    units : UnitSet
    ranking : {"family", "global"}
        Rank within each family (the stock layout keeps a fraction of every family) or over all units at once
        (the per-layer layout ranks them globally).
    mean, spread : float
        The lowest-ranked unit gets ``mean - spread``, the highest ``mean + spread``, linearly in rank between.
        Equal scores get their mean rank, hence equal logits.

    Returns
    -------
    torch.Tensor
    """
    if ranking not in SCOPES:
        raise ValueError(f"Unknown ranking {ranking!r}; choose one of {SCOPES}.")
    total = units.num_units
    if scores is None:
        return torch.full((total,), float(mean))
    missing = [f.name for f in units if f.name not in scores]
    if missing:
        raise ValueError(f"Scores are missing for {len(missing)} unit families (e.g. {missing[:3]}); score every family.")
    for family in units:
        if scores[family.name].shape != (family.num_units,):
            raise ValueError(f"Family {family.name!r} has {family.num_units} units, got scores of shape "
                             f"{tuple(scores[family.name].shape)}.")
    if ranking == "global":
        flat = torch.cat([scores[f.name].detach().double().cpu() for f in units])
        if not torch.isfinite(flat).all():
            raise ValueError("The criterion returned non-finite scores; the learned masks cannot start from them.")
        return (mean + spread * (2 * _mean_rank(flat) - 1)).float()
    parts = []
    for family in units:
        values = scores[family.name].detach().double().cpu()
        if not torch.isfinite(values).all():
            raise ValueError(f"The criterion returned non-finite scores for {family.name!r}.")
        parts.append(mean + spread * (2 * _mean_rank(values) - 1))
    return torch.cat(parts).float()


def _mean_rank(values: torch.Tensor) -> torch.Tensor:
    """Ranks in [0, 1] (0 = lowest), ties at their mean rank; a single value ranks 0.5."""
    n = values.numel()
    if n == 1:
        return torch.full((1,), 0.5, dtype=torch.float64)
    unique, inverse = torch.unique(values, return_inverse=True)
    counts = torch.bincount(inverse, minlength=len(unique)).double()
    first = torch.cumsum(counts, 0) - counts  # rank of the first member of each distinct value
    mean_rank = first + (counts - 1) / 2
    return mean_rank[inverse] / (n - 1)


class LearnedMasks:
    """Trainable unit masks under a MACs budget, written into a :class:`UnitMasks` before every forward pass.

    Parameters
    ----------
    masks : UnitMasks
        The masks of the dense model (attached by the caller). Their ``values`` are replaced by the gates at
        every :meth:`apply`; nothing else of them is changed.
    config : LearnedMaskConfig
    budget : MaskBudget
        The target and the soft phase's length (:meth:`MaskBudget.from_pruner_config`).

    Notes
    -----
    The logits, multipliers and optimizer live on ``masks.device`` (move with :meth:`to`). Gates and the
    constraint terms are computed in float32 outside autocast; the masks cast them to each layer's dtype.
    Every family keeps at least one live unit in every sample (a sample that would zero a whole family keeps
    its highest-logit unit at :data:`FLOOR_GATE`): the hardening keeps one too, and a GroupNorm cannot
    normalize an empty family.
    """

    def __init__(self, masks: UnitMasks, config: Optional[LearnedMaskConfig] = None, budget: Optional[MaskBudget] = None):
        if budget is None:
            raise ValueError("LearnedMasks needs a MaskBudget (the target and the soft phase's length); build it with "
                             "MaskBudget.from_pruner_config(pruner_config).")
        self.masks = masks
        self.units = masks.units
        self.config = config if config is not None else LearnedMaskConfig()
        self.budget = budget
        self.scope = self.config.scope or ("family" if budget.selection == "local" else "global")
        self.step_count = 0
        self.progress = 0.0
        self.start_value = 1.0
        self._unit_macs = None
        device = masks.device
        self._stock_keep = None
        if budget.selection == "local":
            # The stock layout: the same keep ratio in every family, checked on the stock grid now, before any work.
            self._stock_keep = stock_keep_ratio(self.units, budget.target_sparsity, budget.round_to)
        self._family_of_unit = torch.cat([torch.full((f.num_units,), i, dtype=torch.long) for i, f in enumerate(self.units)])
        self._setup_constraints()
        self.logits = torch.full((self.units.num_units,), self.config.init_mean, device=device, requires_grad=True)
        self.prior = self.logits.detach().clone()
        k = self.num_constraints
        self.lambda1 = torch.zeros(k, device=device, requires_grad=True)
        self.lambda2 = torch.zeros(k, device=device, requires_grad=True)
        self.shift = torch.zeros(k, device=device)  # projection: the threshold that meets the target (0 otherwise)
        self.mask_lr = self.config.mask_lr if self.config.mask_lr is not None else self.config.mask_travel / budget.soft_steps
        self.multiplier_lr = self.config.multiplier_lr if self.config.multiplier_lr is not None else self.mask_lr
        self.optimizer = self._make_optimizer()
        self.generator = self._make_generator()
        self._noise: Optional[torch.Tensor] = None
        self._index_cache: Dict[tuple, torch.Tensor] = {}
        gate_gradient = self.config.gate_gradient
        self.from_parameters = gate_gradient == "parameters" or (gate_gradient == "auto" and self.config.parametrization == "sigmoid")
        self._applied = False  # apply() ran since the last update(): the parameters' gradients belong to these gates

    # ------------------------------------------------------------------ set-up
    def _setup_constraints(self) -> None:
        """What each constraint measures (``self.measure``), its units and its final target."""
        b = self.budget
        if self.scope == "family":
            self.measure = "family_units"
            self.num_constraints = len(self.units)
            self.final_target = float(self._stock_keep) if self._stock_keep is not None else 1 - b.target_sparsity
            self._constraint_of_unit = self._family_of_unit.clone()
        else:
            self.num_constraints = 1
            self._constraint_of_unit = torch.zeros(self.units.num_units, dtype=torch.long)
            if b.target_macs is not None:
                self.measure, self.final_target = "macs", float(b.target_macs)
            elif b.selection == "local":  # the stock layout under one MACs constraint: the stock model's MACs
                zeros = {f.name: torch.zeros(f.num_units) for f in self.units}
                self.measure = "macs"
                self.final_target = self.unit_macs.fraction(select_local(zeros, self.units, b.target_sparsity))
            else:
                self.measure, self.final_target = "units", 1 - b.target_sparsity
        self._constraint_sizes = torch.bincount(self._constraint_of_unit, minlength=self.num_constraints).float()

    @property
    def unit_macs(self):
        if self._unit_macs is None:
            self._unit_macs = self.units.unit_macs()
        return self._unit_macs

    def _on(self, name: str, device) -> torch.Tensor:
        """A host index table on ``device`` (cached)."""
        key = (name, torch.device(device))
        table = self._index_cache.get(key)
        if table is None:
            table = self._index_cache[key] = getattr(self, name).to(device)
        return table

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.Adam(
            [
                {"params": [self.logits], "lr": self.mask_lr, "maximize": False},
                {"params": [self.lambda1, self.lambda2], "lr": self.multiplier_lr, "maximize": True},
            ],
            betas=c.adam_betas, eps=c.adam_epsilon, weight_decay=0.0,
        )

    def _make_generator(self) -> torch.Generator:
        # On the host: the same noise on every device, and a state that a checkpoint can carry anywhere.
        generator = torch.Generator()
        generator.manual_seed(self.config.seed)
        return generator

    def to(self, device=None) -> "LearnedMasks":
        """Move the logits, multipliers and optimizer state to ``device`` (default: the masks' device).

        The gate noise is drawn on the host and copied over, so a run draws the same gates on any device.
        """
        device = torch.device(device) if device is not None else self.masks.device
        if self.logits.device == device:
            return self
        state = self.state_dict()
        for name in ("logits", "lambda1", "lambda2"):
            setattr(self, name, getattr(self, name).detach().to(device).requires_grad_(True))
        self.shift = self.shift.to(device)
        self.optimizer = self._make_optimizer()
        self.load_state_dict(state)
        return self

    # ------------------------------------------------------------------ start
    def initialize(self, scores: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Start the logits from the criterion's ``scores`` (:func:`initial_logits`); call once, before step 0."""
        c = self.config
        start = initial_logits(scores, self.units, self.scope, c.init_mean, c.init_spread).to(self.logits.device)
        with torch.no_grad():
            self.logits.copy_(start)
            self.shift.zero_()
        self.prior = start.clone()
        with torch.no_grad():
            # Gates start just below 1 (a hard-concrete gate is at 1 with probability < 1): the schedule starts there,
            # not at 1, or the first steps would push every logit up only to pull it down again.
            self.start_value = float(self.constraint_values().mean())
        self.write_deterministic()

    # ------------------------------------------------------------------ schedules
    def target_at(self, progress: float) -> float:
        """The constraints' common target at ``progress`` (step / soft_steps): from where the masks start
        (:attr:`start_value`, the mean constraint value after :meth:`initialize`) at 0 to the final target at 1."""
        b = self.budget
        start = max(self.start_value, self.final_target)
        return start - (start - self.final_target) * schedules.ramp(progress, b.sparsity_schedule, b.schedule_sharpness)

    def temperature_at(self, progress: float) -> float:
        c = self.config
        x = min(1.0, max(0.0, progress))
        return c.temperature_start * (c.temperature_end / c.temperature_start) ** x

    # ------------------------------------------------------------------ gates
    def _log_ratio(self) -> float:
        c = self.config
        return c.beta * math.log(-c.gamma / c.zeta)

    def _shifted(self, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The logits minus their constraint's threshold (the threshold is 0 under the Lagrangian)."""
        shift = self.shift if shift is None else shift
        return self.logits - shift[self._on("_constraint_of_unit", self.logits.device)]

    def keep_probabilities(self, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``q_u``: the probability that each unit's gate is non-zero, from the (shifted) logits ``z``."""
        z = self._shifted() if z is None else z
        if self.config.parametrization == "hard_concrete":
            return torch.sigmoid(z - self._log_ratio())
        return torch.sigmoid(z / self.temperature_at(self.progress))

    def _gates(self, z: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        """Gate values from the (shifted) logits: sampled with ``noise`` (hard-concrete training), else deterministic."""
        c = self.config
        if c.parametrization == "hard_concrete":
            if noise is None:
                s = torch.sigmoid(z)
            else:
                s = torch.sigmoid((torch.log(noise) - torch.log1p(-noise) + z) / c.beta)
            gates = (s * (c.zeta - c.gamma) + c.gamma).clamp(0.0, 1.0)
        else:
            soft = torch.sigmoid(z / self.temperature_at(self.progress))
            if c.parametrization == "sigmoid":
                return soft
            gates = (z > 0).to(soft.dtype) + soft - soft.detach()
        return self._keep_one_per_family(gates, z)

    def _keep_one_per_family(self, gates: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Where a family's gates are all 0, its highest-logit unit (ties: the last, as the hardening keeps it)
        gets :data:`FLOOR_GATE`; computed on the device, no read-back."""
        family = self._on("_family_of_unit", gates.device)
        count = len(self.units)
        top_gate = gates.detach().new_zeros(count).scatter_reduce(0, family, gates.detach(), "amax", include_self=False)
        key = z.detach()
        top_key = key.new_full((count,), -math.inf).scatter_reduce(0, family, key, "amax", include_self=True)
        index = torch.arange(gates.numel(), device=gates.device)
        candidate = torch.where(key == top_key[family], index, -1)
        top_index = candidate.new_full((count,), -1).scatter_reduce(0, family, candidate, "amax", include_self=True)
        floor = torch.zeros_like(gates).index_fill_(0, top_index, FLOOR_GATE) * (top_gate == 0).to(gates.dtype)[family]
        return torch.where(floor > gates, floor, gates)  # not torch.maximum: it halves the gradient at ties

    def deterministic_gates(self) -> torch.Tensor:
        """The evaluation gates (no noise), detached."""
        with torch.no_grad():
            return self._gates(self._shifted(), None).detach()

    # ------------------------------------------------------------------ one step
    def begin_step(self, step: int) -> dict:
        """Set the step's target (and temperature) and draw its gate noise; once per optimizer step.

        Parameters
        ----------
        step : int
            The optimizer step, 0 at the start of pruning; the soft phase is ``0 .. soft_steps``.

        Returns
        -------
        dict
            ``step``, ``target`` and ``temperature`` (None for hard-concrete gates); :meth:`report` has the rest
            (it reads values back from the device, so call it at the logging cadence).
        """
        self.step_count = int(step)
        self.progress = min(1.0, step / self.budget.soft_steps)
        if self.config.parametrization == "hard_concrete":
            # The same draw for every micro-batch of the step; the same on every process (same seed).
            eps = 1e-6
            noise = torch.rand(self.units.num_units, generator=self.generator).mul_(1 - 2 * eps).add_(eps)
            self._noise = noise.to(self.logits.device, non_blocking=True)
        return {"step": self.step_count, "target": self.target_at(self.progress),
                "temperature": self.temperature_at(self.progress) if self.config.parametrization != "hard_concrete" else None}

    def apply(self) -> torch.Tensor:
        """Write this step's gates into ``masks.values`` (differentiable in the logits) and return the energy's
        budget terms (the Lagrangian, plus the prior when on), a scalar to add to the training loss.

        Call before every forward pass of the step (every micro-batch under gradient accumulation: the backward
        pass frees the graph from the logits to the gates). Under ``budget="projection"`` the threshold that
        meets the target is solved here and the returned terms are the prior alone (0 when off).
        """
        if self._noise is None and self.config.parametrization == "hard_concrete":
            raise RuntimeError("Call begin_step(step) before apply(): the step's gate noise is not drawn yet.")
        with _no_autocast(self.logits.device):
            target = self.target_at(self.progress)
            z = self._on_target(target)
            gates = self._gates(z, self._noise)
            # gate_gradient="parameters": constants in the forward pass; collect_gradient() forms their gradient (from
            # the weights' gradients, so not for frozen weights: then autograd).
            self._applied = self.from_parameters and self.masks.producers_require_grad()
            self.masks.values = gates.detach() if self._applied else gates
            return self.energy_terms(z, target)

    def _on_target(self, target: float) -> torch.Tensor:
        return self._logits_on_target(target) if self.config.budget == "projection" else self._shifted()

    def collect_gradient(self) -> None:
        """``gate_gradient="parameters"``: add the task loss's gradient to the logits, formed from the weights' gradients.

        With ``m = sigmoid(z / tau)``, ``dL/dm_u = S_u / m_u`` (:meth:`UnitMasks.parameter_products`) and ``dm/dz = m
        (1 - m) / tau``, so ``dL/dz_u = S_u (1 - m_u) / tau``: no division by a gate that may be 0. The projection's
        Jacobian from the logits to ``z`` is applied by autograd. Call after the step's backward passes, before the
        gradients are clipped or stepped (and before :meth:`all_reduce_gradients`); a no-op otherwise.
        """
        if not (self.from_parameters and self._applied):
            return
        products = self.masks.parameter_products().to(self.logits.device)
        with _no_autocast(self.logits.device), torch.enable_grad():
            tau = self.temperature_at(self.progress)
            z = self._on_target(self.target_at(self.progress))
            gates = torch.sigmoid(z.detach() / tau)
            z.backward(products * (1 - gates) / tau)
        self._applied = False

    def _logits_on_target(self, target: float) -> torch.Tensor:
        """The logits shifted, per constraint, so that the constraints equal ``target``; differentiable.

        The threshold ``b*`` is found by bisection (no gradient); then ``b = b* + (C(a - b*) - t) / D`` with
        ``D = -dC/db`` detached has the value ``b*`` and the gradient of the implicit function ``C(a - b(a)) = t``,
        so the task gradient reaches the logits projected onto the constraint (it moves units against each other,
        not the budget).
        """
        a = self.logits
        idx = self._on("_constraint_of_unit", a.device)
        with torch.no_grad():
            scale = 1.0 if self.config.parametrization == "hard_concrete" else self.temperature_at(self.progress)
            margin = 60.0 * scale + 10.0
            low = (a.min() - margin).expand(self.num_constraints).clone()  # every constraint above the target here
            high = (a.max() + margin).expand(self.num_constraints).clone()
            for _ in range(BISECTION_STEPS):
                middle = (low + high) / 2
                above = self.constraint_values(self.keep_probabilities(a.detach() - middle[idx])) > target
                low = torch.where(above, middle, low)
                high = torch.where(above, high, middle)
            solved = (low + high) / 2
        probe = solved.clone().requires_grad_(True)
        with torch.enable_grad():
            value = self.constraint_values(self.keep_probabilities(a.detach() - probe[idx])).sum()
            (slope,) = torch.autograd.grad(value, probe)
        slope = (-slope).clamp_min(1e-12)
        violation = self.constraint_values(self.keep_probabilities(a - solved[idx])) - target
        shift = solved + violation / slope
        self.shift = solved.detach()
        return a - shift[idx]

    def constraint_values(self, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``C_c``: each constraint's expected value (differentiable in ``keep``), one per constraint."""
        q = self.keep_probabilities() if keep is None else keep
        if self.measure == "macs":
            return self.unit_macs.expected_fraction(q).reshape(1)
        if self.measure == "units":
            return q.mean().reshape(1)
        sums = q.new_zeros(self.num_constraints).index_add(0, self._on("_constraint_of_unit", q.device), q)
        return sums / self._on("_constraint_sizes", q.device).to(q.dtype)

    def energy_terms(self, z: Optional[torch.Tensor] = None, target: Optional[float] = None) -> torch.Tensor:
        """The Lagrangian ``sum lambda1 (C - t) + lambda2 (C - t)^2`` (``budget="lagrangian"``) and the prior."""
        z = self._shifted() if z is None else z
        target = self.target_at(self.progress) if target is None else target
        terms = self.logits.new_zeros(())
        if self.config.budget == "lagrangian":
            violation = self.constraint_values(self.keep_probabilities(z)) - target
            terms = terms + (self.lambda1 * violation + self.lambda2 * violation.square()).sum()
        if self.config.prior_weight > 0:
            terms = terms + self.config.prior_weight * (self.logits - self.prior).square().mean()
        return terms

    def all_reduce_gradients(self) -> None:
        """Average the logits' gradients across processes, on their own device (no-op in one process).

        The multipliers' gradients depend only on the logits, which every process holds alike, so they are already
        equal. Call after the backward passes of a step and before :meth:`update`.
        """
        self.collect_gradient()
        if world_size() == 1:
            return
        if self.logits.grad is None:  # a process whose step gave no gradient still joins the collective
            self.logits.grad = torch.zeros_like(self.logits)
        all_reduce_mean([self.logits.grad])

    def update(self, grad_scale: Optional[float] = None) -> bool:
        """One optimizer step: the logits descend the energy, the multipliers ascend it; gradients are cleared.

        Parameters
        ----------
        grad_scale : float, optional
            The loss scale of fp16 training (the gradients are divided by it); a step whose unscaled gradients are
            not finite is skipped, as the loss scaler skips the weights' step.

        Returns
        -------
        bool
            Whether the step was taken.
        """
        self.collect_gradient()
        params = [self.logits, self.lambda1, self.lambda2]
        taken = True
        if grad_scale is not None:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(grad_scale)
            taken = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
        if taken:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._applied = False
        # Drop the graph held by the last gates: validation and scoring between steps use plain values.
        with torch.no_grad():
            self.masks.values = self._gates(self._shifted(), self._noise).detach()
        return taken

    def write_deterministic(self) -> None:
        """Write the evaluation gates into the masks (detached)."""
        self.masks.values = self.deterministic_gates()

    @contextmanager
    def evaluating(self):
        """The evaluation gates in the masks inside the context (validation samples); the step's values after."""
        saved = self.masks.values
        self.write_deterministic()
        try:
            yield self
        finally:
            self.masks.values = saved

    # ------------------------------------------------------------------ reports
    def undecided_fraction(self, low: float = UNDECIDED[0], high: float = UNDECIDED[1]) -> float:
        """Fraction of units whose evaluation gate lies strictly between ``low`` and ``high``."""
        gates = self.deterministic_gates()
        return float(((gates > low) & (gates < high)).float().mean())

    def expected_macs_fraction(self) -> float:
        """Expected MACs of the masked model as a fraction of the dense MACs, at the current keep probabilities."""
        with torch.no_grad():
            return float(self.unit_macs.expected_fraction(self.keep_probabilities().detach().double().cpu()))

    def report(self) -> dict:
        """Numbers for the run's log: target, constraint values, expected MACs, undecided gates, multipliers."""
        with torch.no_grad():
            values = self.constraint_values().detach().cpu()
        target = self.target_at(self.progress)
        return {
            "step": self.step_count,
            "target": target,
            "constraint_mean": float(values.mean()),
            "constraint_max_violation": float((values - target).abs().max()),
            "expected_macs": self.expected_macs_fraction(),
            "undecided": self.undecided_fraction(),
            "lambda1_mean": float(self.lambda1.detach().mean()),
            "lambda2_mean": float(self.lambda2.detach().mean()),
            "shift_mean": float(self.shift.mean()),
            "temperature": self.temperature_at(self.progress) if self.config.parametrization != "hard_concrete" else None,
        }

    def family_logits(self) -> Dict[str, torch.Tensor]:
        """The logits per family (detached, float64, on the host): the scores of the hardening."""
        flat = self.logits.detach().double().cpu()
        out, start = {}, 0
        for family in self.units:
            out[family.name] = flat[start : start + family.num_units].clone()
            start += family.num_units
        return out

    # ------------------------------------------------------------------ hardening
    def harden(self) -> Dict[str, torch.Tensor]:
        """Binary masks (1 = keep, float32 per family, on the host) that meet the budget's target exactly.

        The logits are the scores of :func:`diffusers_gfprune.selection.select` (a constraint's threshold is common
        to its units, so it does not change their order): local selection keeps the stock keep ratio of every
        family (the highest logits of each), global selection one ranking over all units until the unit count or
        the MACs target is met (floors per family as the per-layer pruner has them). Equal logits: the lower unit
        index is pruned first. The same format as :meth:`~diffusers_gfprune.pruner.GradientFlowPruner.final_masks`.
        """
        b = self.budget
        scores = self.family_logits()
        pruned = select(scores, self.units, b.target_sparsity, b.selection, b.min_keep_fraction, b.round_to,
                        b.target_macs, b.target_sparsity)
        if self._stock_keep is not None:
            for family in self.units:
                kept = family.num_units - int(pruned[family.name].sum())
                if kept != self._stock_keep * family.num_units:
                    raise RuntimeError(f"Hardening kept {kept} of {family.num_units} units of {family.name!r}, not the "
                                       f"stock ratio {self._stock_keep}; please report this.")
        return {name: (~flags).float() for name, flags in pruned.items()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, object]:
        """``{"tensors": {...}, "meta": {...}}``: every tensor for safetensors, the rest JSON-able."""
        tensors = {
            "logits": self.logits.detach().cpu().clone(),
            "prior": self.prior.detach().cpu().clone(),
            "lambda1": self.lambda1.detach().cpu().clone(),
            "lambda2": self.lambda2.detach().cpu().clone(),
            "shift": self.shift.detach().cpu().clone(),
            "generator": self.generator.get_state().clone(),
        }
        if self._noise is not None:
            tensors["noise"] = self._noise.detach().cpu().clone()
        optimizer = self.optimizer.state_dict()
        for index, entries in optimizer["state"].items():
            for key, value in entries.items():
                tensors[f"optimizer/{index}/{key}"] = torch.as_tensor(value).detach().cpu().clone()
        meta = {
            "config": _jsonable(asdict(self.config)),
            "budget": asdict(self.budget),
            "scope": self.scope,
            "measure": self.measure,
            "num_units": self.units.num_units,
            "families": self.units.names,
            "step": self.step_count,
            "progress": self.progress,
            "start_value": self.start_value,
            "mask_lr": self.mask_lr,
            "multiplier_lr": self.multiplier_lr,
            "param_groups": optimizer["param_groups"],
        }
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore :meth:`state_dict`; the configuration, budget and units must be those of this object."""
        tensors, meta = state["tensors"], state["meta"]
        mine = {"config": _jsonable(asdict(self.config)), "budget": asdict(self.budget), "families": self.units.names}
        theirs = {"config": meta["config"], "budget": meta["budget"], "families": meta["families"]}
        if json.dumps(mine, sort_keys=True) != json.dumps(theirs, sort_keys=True):
            raise ValueError("The saved learned-mask state was made with another configuration, budget or model "
                             f"(saved: {theirs['config']}, {theirs['budget']}); resume with the same pruning arguments.")
        device = self.logits.device
        with torch.no_grad():
            self.logits.copy_(tensors["logits"].to(device))
            self.lambda1.copy_(tensors["lambda1"].to(device))
            self.lambda2.copy_(tensors["lambda2"].to(device))
        self.shift = tensors["shift"].to(device).clone()
        self.prior = tensors["prior"].to(device).clone()
        self.generator.set_state(tensors["generator"].clone())
        self._noise = tensors["noise"].to(device).clone() if "noise" in tensors else None
        opt_state: Dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/", 2)
                opt_state.setdefault(int(index), {})[name] = value.clone()
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
        self.step_count = int(meta["step"])
        self.progress = float(meta["progress"])
        self.start_value = float(meta["start_value"])
        with torch.no_grad():
            self.masks.values = self._gates(self._shifted(), self._noise).detach()

    def save(self, directory: str) -> None:
        """Write ``learned_masks.safetensors`` and ``learned_masks.json`` into ``directory``."""
        state = self.state_dict()
        save_state(directory, "learned_masks", state["tensors"], state["meta"])

    def load(self, directory: str) -> None:
        tensors, meta = load_state(directory, "learned_masks")
        self.load_state_dict({"tensors": tensors, "meta": meta})


def _jsonable(value):
    """Tuples as lists, so that a state compares equal after a JSON round trip."""
    return json.loads(json.dumps(value))


@contextmanager
def _no_autocast(device: torch.device):
    """Gates and budget terms in float32 even inside the training step's autocast region."""
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield
