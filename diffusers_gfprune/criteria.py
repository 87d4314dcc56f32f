"""Pruning criteria: one score per unit, higher = keep.

All criteria share one interface, :meth:`Criterion.score`, called on the *unwrapped* masked model
with a list of :class:`~diffusers_gfprune.objective.DDPMLoss` mini-batches, and return a tensor of
unit scores per family. A criterion is picked by name (:func:`get_criterion`) and configured by a
dataclass whose fields carry their help text.

``gradient_flow``
    ``I_u = sum_{i in u} theta_i (H g)_i`` with ``g`` the loss gradient and ``H`` its Hessian. To
    first order, removing unit u changes the squared gradient norm by ``-2 I_u``; units with the
    lowest ``I_u`` go first. ``H g`` comes from a double backward (exact) or from central
    differences of gradients (memory-light).
``taylor``
    ``|sum_{i in u} theta_i g_i|``.
``magnitude``
    L2 norm of the unit's parameters.
``random``
    Seeded uniform scores (fixed for a seed, so that re-scoring does not churn).
``diff_pruning``
    Taylor scores with the gradient accumulated over timesteps from low to high noise, stopping
    once the loss falls below ``thr`` times the largest loss seen (Diff-Pruning).

In a data-parallel run every process passes its own slice of the global batch; gradients, Hessian-
vector products and losses are averaged across processes, so the scores equal those of one process
that sees the whole global batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Type

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from .objective import DDPMLoss
from .units import OUT, UnitSet


# ---------------------------------------------------------------------- configs
@dataclass
class GradientFlowConfig:
    hvp: str = field(
        default="exact",
        metadata={"help": "How H g is computed: 'exact' (double backward) or 'finite_difference' "
                  "(two extra gradients at theta +- eps g; no second-order graph in memory)."},
    )
    fd_epsilon: float = field(
        default=1e-3,
        metadata={"help": "Finite-difference step relative to ||theta|| / ||g|| (only for hvp='finite_difference')."},
    )

    def __post_init__(self):
        if self.hvp not in ("exact", "finite_difference"):
            raise ValueError(f"hvp must be 'exact' or 'finite_difference', got {self.hvp!r}.")
        if not self.fd_epsilon > 0:
            raise ValueError("fd_epsilon must be > 0.")


@dataclass
class TaylorConfig:
    pass


@dataclass
class MagnitudeConfig:
    pass


@dataclass
class RandomConfig:
    seed: int = field(default=0, metadata={"help": "Seed of the random scores."})


@dataclass
class DiffPruningConfig:
    thr: float = field(
        default=0.05,
        metadata={"help": "Stop accumulating once the loss falls below thr x the largest loss seen."},
    )
    num_timesteps: int = field(
        default=100,
        metadata={"help": "Timesteps scanned, evenly spaced from 0 (low noise) to T-1 (high noise)."},
    )

    def __post_init__(self):
        if not 0 < self.thr < 1:
            raise ValueError("thr must lie in (0, 1).")
        if self.num_timesteps < 1:
            raise ValueError("num_timesteps must be >= 1.")


# ---------------------------------------------------------------------- helpers
def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean(tensors: Sequence[torch.Tensor]) -> None:
    """Average tensors in place across processes (no-op in a single process)."""
    world = _world_size()
    if world == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world)


@contextmanager
def math_attention():
    """The fused CPU SDPA kernel has no double backward; the math kernel has."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _params(model) -> List[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _grad(loss: torch.Tensor, params, create_graph: bool = False) -> List[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


class UnitReducer:
    """Sums per-parameter quantities (same shapes as the parameters) into one number per unit."""

    def __init__(self, model, units: UnitSet):
        self.units = units
        modules = dict(model.named_modules())
        self.terms = []  # (family, param name, axis, family_index, layer_index)
        for family in units:
            for s in family.slices:
                module = modules[s.module]
                for pname, param in module.named_parameters(recurse=False):
                    if s.dim == OUT:
                        axis = 0
                    elif param.dim() >= 2:
                        axis = 1
                    else:
                        continue  # a bias belongs to the output channels only
                    self.terms.append((family.name, f"{s.module}.{pname}", axis, s.family_index, s.layer_index))

    def __call__(self, per_param: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        channel_sums = {f.name: torch.zeros(f.num_channels, dtype=torch.float64) for f in self.units}
        for family, pname, axis, family_index, layer_index in self.terms:
            value = per_param[pname].detach().double()
            dims = [d for d in range(value.dim()) if d != axis]
            per_channel = value.sum(dim=dims) if dims else value
            channel_sums[family].index_add_(0, family_index, per_channel.cpu()[layer_index])
        return {
            f.name: channel_sums[f.name].view(f.num_units, f.unit_size).sum(1) for f in self.units
        }


# ---------------------------------------------------------------------- criteria
class Criterion(ABC):
    """Base class: ``score(model, units, losses)`` -> {family name: unit scores}, higher = keep."""

    name: str = ""
    config_class: Type = object
    needs_data: bool = True

    def __init__(self, config=None, **kwargs):
        if config is None:
            config = self.config_class(**kwargs)
        elif kwargs:
            raise TypeError("Pass either a config or keyword arguments, not both.")
        self.config = config
        self._reducer: Optional[UnitReducer] = None

    def reducer(self, model, units: UnitSet) -> UnitReducer:
        if self._reducer is None or self._reducer.units is not units:
            self._reducer = UnitReducer(model, units)
        return self._reducer

    @abstractmethod
    def score(self, model, units: UnitSet, losses: Sequence[DDPMLoss]) -> Dict[str, torch.Tensor]:
        """Unit scores of the masked ``model`` on ``losses`` (higher = keep)."""

    def _named(self, model, values: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return dict(zip(names, values))


class GradientFlow(Criterion):
    name = "gradient_flow"
    config_class = GradientFlowConfig

    def hessian_gradient_product(self, model, loss_fn: DDPMLoss) -> List[torch.Tensor]:
        """``H g`` for one mini-batch, averaged across processes."""
        params = _params(model)
        if self.config.hvp == "exact":
            with math_attention():
                grads = _grad(loss_fn(model), params, create_graph=True)
                g = [x.detach().clone() for x in grads]
                all_reduce_mean(g)
                dot = sum((x * v).sum() for x, v in zip(grads, g))
                hg = _grad(dot, params)
            all_reduce_mean(hg)
            return hg
        g = _grad(loss_fn(model), params)
        all_reduce_mean(g)
        theta = [p.detach().clone() for p in params]
        g_norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g))
        t_norm = torch.sqrt(sum((x.double() ** 2).sum() for x in theta))
        eps = float(self.config.fd_epsilon * t_norm / g_norm.clamp_min(1e-30))
        try:
            with torch.no_grad():
                for p, t, d in zip(params, theta, g):
                    p.copy_(t + eps * d)
            plus = _grad(loss_fn(model), params)
            with torch.no_grad():
                for p, t, d in zip(params, theta, g):
                    p.copy_(t - eps * d)
            minus = _grad(loss_fn(model), params)
        finally:
            with torch.no_grad():
                for p, t in zip(params, theta):
                    p.copy_(t)
        hg = [(a - b) / (2 * eps) for a, b in zip(plus, minus)]
        all_reduce_mean(hg)
        return hg

    def score(self, model, units, losses):
        reducer = self.reducer(model, units)
        total = None
        params = _params(model)
        for loss_fn in losses:
            hg = self.hessian_gradient_product(model, loss_fn)
            per_param = self._named(model, [p.detach() * h for p, h in zip(params, hg)])
            scores = reducer(per_param)
            total = scores if total is None else {k: total[k] + scores[k] for k in total}
        return {k: v / len(losses) for k, v in total.items()}


class Taylor(Criterion):
    name = "taylor"
    config_class = TaylorConfig

    def score(self, model, units, losses):
        params = _params(model)
        grads = [torch.zeros_like(p) for p in params]
        for loss_fn in losses:
            for acc, g in zip(grads, _grad(loss_fn(model), params)):
                acc.add_(g, alpha=1.0 / len(losses))
        all_reduce_mean(grads)
        return self._taylor(model, units, params, grads)

    def _taylor(self, model, units, params, grads):
        per_param = self._named(model, [p.detach() * g for p, g in zip(params, grads)])
        return {k: v.abs() for k, v in self.reducer(model, units)(per_param).items()}


class Magnitude(Criterion):
    name = "magnitude"
    config_class = MagnitudeConfig
    needs_data = False

    def score(self, model, units, losses=()):
        per_param = {n: p.detach() ** 2 for n, p in model.named_parameters()}
        return {k: v.sqrt() for k, v in self.reducer(model, units)(per_param).items()}


class Random(Criterion):
    name = "random"
    config_class = RandomConfig
    needs_data = False

    def score(self, model, units, losses=()):
        generator = torch.Generator().manual_seed(self.config.seed)
        return {f.name: torch.rand(f.num_units, generator=generator, dtype=torch.float64) for f in units}


class DiffPruning(Taylor):
    name = "diff_pruning"
    config_class = DiffPruningConfig

    def score(self, model, units, losses):
        params = _params(model)
        grads = [torch.zeros_like(p) for p in params]
        num_train = losses[0].scheduler.config.num_train_timesteps
        steps = torch.linspace(0, num_train - 1, self.config.num_timesteps).round().long().unique()
        max_loss = 0.0
        for t in steps.tolist():
            step_grads = [torch.zeros_like(p) for p in params]
            step_loss = torch.zeros((), dtype=torch.float64)
            for loss_fn in losses:
                fixed = DDPMLoss(
                    loss_fn.images, loss_fn.noise, torch.full_like(loss_fn.timesteps, t),
                    loss_fn.scheduler, loss_fn.prediction_type,
                )
                loss = fixed(model)
                step_loss += float(loss.detach()) / len(losses)
                for acc, g in zip(step_grads, _grad(loss, params)):
                    acc.add_(g, alpha=1.0 / len(losses))
            all_reduce_mean([step_loss])
            max_loss = max(max_loss, float(step_loss))
            if float(step_loss) < self.config.thr * max_loss:
                break  # the rest of the trajectory is high-noise and barely informative
            for acc, g in zip(grads, step_grads):
                acc.add_(g)
        all_reduce_mean(grads)
        return self._taylor(model, units, params, grads)


CRITERIA: Dict[str, Type[Criterion]] = {
    c.name: c for c in (GradientFlow, DiffPruning, Taylor, Magnitude, Random)
}


def get_criterion(name: str, config=None, **kwargs) -> Criterion:
    """A criterion by name, with its config (or keyword arguments for its config)."""
    if name not in CRITERIA:
        raise ValueError(f"Unknown criterion {name!r}; choose one of {sorted(CRITERIA)}.")
    return CRITERIA[name](config, **kwargs)


def config_help(name: str) -> Dict[str, str]:
    """Help text of every field of a criterion's config."""
    return {f.name: f.metadata.get("help", "") for f in fields(CRITERIA[name].config_class)}


def config_dict(criterion: Criterion) -> dict:
    return asdict(criterion.config)
