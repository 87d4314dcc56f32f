"""Pruning criteria: one score per unit, higher = keep.

All criteria share one interface, :meth:`Criterion.score`, called on the *unwrapped* masked model
with a list of :class:`~diffusers_gfprune.objective.DDPMLoss` mini-batches (and the model's
:class:`~diffusers_gfprune.masks.UnitMasks`), and return a tensor of unit scores per family. A
criterion is picked by name (:func:`get_criterion`) and configured by a dataclass whose fields carry
their help text.

``gradient_flow``
    The gradient-flow family, one criterion with a ``form`` option (see :class:`GradientFlowConfig`):

    * ``increase`` (the paper's reading): ``I_u = sum_{i in u} theta_i (H g)_i``. To first order,
      removing unit u changes the squared gradient norm ``G = ||g||^2`` by ``-2 I_u``; units with the
      lowest ``I_u`` (whose removal raises ``G`` most) go first.
    * ``preserve`` (Lubana & Dick, ICLR 2021): prune the lowest ``|I_u|``, the units whose removal
      changes ``G`` least.
    * ``loss_change``: the second-order change of the loss when the unit is removed,
      ``dL_u = -theta_u . g + 1/2 theta_u . H theta_u`` (``theta_u``: the unit's parameters); the units whose
      removal is predicted to raise the loss least go first. One Hessian-vector product per mini-batch
      estimates every unit's quadratic term at once (random unit signs, see :meth:`GradientFlow._loss_change`).
    * ``mask_flow``: each unit's share of the gradient flow of the masks, ``(dL/dm_u)^2`` averaged over
      mini-batches. Along the gradient flow of the masks the loss falls at the rate
      ``sum_u (dL/dm_u)^2``; units that carry the least of it go first. During pruning the mini-batches
      are the training steps themselves (:meth:`GradientFlow.observe`), so it needs no extra pass and
      averages every step since the last re-scoring.

    ``g`` is averaged over its own samples and ``H g`` is computed on disjoint samples (every other
    image of each scoring mini-batch), so that the product is not biased by the noise they share; on a
    trained teacher the mean gradient is almost zero and a same-sample ``g . H g`` is mostly that noise.
    ``H v`` comes from a double backward (exact) or from central differences of gradients.
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
that sees the whole global batch (for ``gradient_flow``: with an even number of images per process,
so that "every other image" picks the same images).

Placement and memory: everything is computed and averaged on the model's device (NCCL reduces only CUDA
tensors) and the scores are returned there; the pruner brings them to the host where it decides. A loss with a
``chunk_size`` (:class:`~diffusers_gfprune.objective.DDPMLoss`) is differentiated that many images at a time,
so a criterion's memory is bounded by that setting, not by the scoring mini-batch. Criteria run in whatever
precision the model runs; the pruner calls them in float32 (:func:`~diffusers_gfprune.precision.full_precision`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Type

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .distributed import all_reduce_mean
from .objective import DDPMLoss
from .units import OUT, UnitSet


# ---------------------------------------------------------------------- configs
GRADIENT_FLOW_FORMS = ("increase", "preserve", "loss_change", "mask_flow")


@dataclass
class GradientFlowConfig:
    form: str = field(
        default="loss_change",  # prune.py's default (docs/benchmarks.md: the only form that replicates at 256 samples)
        metadata={"help": "Which member of the gradient-flow family ranks the units: 'increase' (the paper: prune the "
                  "lowest theta.Hg, whose removal raises ||g||^2 most), 'preserve' (prune the lowest |theta.Hg|, "
                  "Lubana & Dick), 'loss_change' (prune the lowest -theta.g + 1/2 theta.H theta, the predicted "
                  "second-order loss increase) or 'mask_flow' (prune the units with the least (dL/dm_u)^2, the mask's share of "
                  "the gradient flow, accumulated over the training steps)."},
    )
    hvp: str = field(
        default="exact",
        metadata={"help": "How H v is computed: 'exact' (double backward) or 'finite_difference' "
                  "(two extra gradients at theta +- eps v; no second-order graph in memory)."},
    )
    fd_epsilon: float = field(
        default=1e-3,
        metadata={"help": "Finite-difference step relative to ||theta|| / ||v|| (only for hvp='finite_difference')."},
    )
    disjoint: bool = field(
        default=True,
        metadata={"help": "'increase'/'preserve': g from every other image, H g from the others (unbiased); False = "
                  "both from all images (the product then carries the square of their shared noise)."},
    )
    probe_seed: int = field(
        default=0,
        metadata={"help": "'loss_change': seed of the random unit signs that estimate every unit's theta.H theta at once."},
    )
    trajectory: bool = field(
        default=True,
        metadata={"help": "'mask_flow': use the mask gradients of the training steps since the last re-scoring when "
                  "there are any (no extra pass); the scoring mini-batches otherwise."},
    )

    def __post_init__(self):
        if self.form not in GRADIENT_FLOW_FORMS:
            raise ValueError(f"form must be one of {GRADIENT_FLOW_FORMS}, got {self.form!r}.")
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


def _loss_grad(model, loss_fn: DDPMLoss, params) -> List[torch.Tensor]:
    """The gradient of ``loss_fn`` (this process), chunk by chunk (:meth:`DDPMLoss.chunks`)."""
    total = [torch.zeros_like(p) for p in params]
    for weight, piece in loss_fn.chunks():
        for acc, g in zip(total, _grad(piece(model), params)):
            acc.add_(g, alpha=weight)
    return total


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

        self._indices: Dict[torch.device, list] = {}

    def _on(self, device) -> list:
        """The index tensors of :attr:`terms` on ``device`` (moved once per device)."""
        device = torch.device(device)
        if device not in self._indices:
            self._indices[device] = [(f.to(device), l.to(device)) for _, _, _, f, l in self.terms]
        return self._indices[device]

    def __call__(self, per_param: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Unit sums in float64, on the device of the per-parameter values (no copy to the host)."""
        device = next(iter(per_param.values())).device
        channel_sums = {f.name: torch.zeros(f.num_channels, dtype=torch.float64, device=device) for f in self.units}
        for (family, pname, axis, _, _), (family_index, layer_index) in zip(self.terms, self._on(device)):
            value = per_param[pname].detach().double()
            dims = [d for d in range(value.dim()) if d != axis]
            per_channel = value.sum(dim=dims) if dims else value
            channel_sums[family].index_add_(0, family_index, per_channel[layer_index])
        return {
            f.name: channel_sums[f.name].view(f.num_units, f.unit_size).sum(1) for f in self.units
        }

    def expand(self, model, unit_values: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The adjoint of :meth:`__call__`: every parameter element gets the sum of the values of the units it belongs to.

        Elements of no unit (never removed) get 0. ``theta * expand(model, {u: 1 for u})`` restricted to one
        unit is the step that removes it.
        """
        params = dict(model.named_parameters())
        out: Dict[str, torch.Tensor] = {}
        for family_name, pname, axis, family_index, layer_index in self.terms:
            family = self.units[family_name]
            param = params[pname]
            device = param.device
            per_channel = unit_values[family_name].to(device, param.dtype)[(family_index // family.unit_size).to(device)]
            vector = torch.zeros(param.shape[axis], dtype=param.dtype, device=device).index_add_(0, layer_index.to(device), per_channel)
            shape = [1] * param.dim()
            shape[axis] = -1
            if pname not in out:
                out[pname] = torch.zeros_like(param)
            out[pname] += vector.view(shape)
        return out


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
    def score(self, model, units: UnitSet, losses: Sequence[DDPMLoss], masks=None) -> Dict[str, torch.Tensor]:
        """Unit scores of the masked ``model`` on ``losses`` (higher = keep); ``masks`` are its UnitMasks."""

    #: Whether the criterion learns from the training steps themselves (see :meth:`observe`).
    uses_trajectory: bool = False

    def observe(self, mask_grad: torch.Tensor) -> None:
        """Called after every training step of the pruning stage with ``dL/dm`` (flat); most criteria ignore it."""

    def _named(self, model, values: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return dict(zip(names, values))


class GradientFlow(Criterion):
    name = "gradient_flow"
    config_class = GradientFlowConfig

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self._observed: Optional[torch.Tensor] = None  # sum of (dL/dm)^2 over the training steps since the last scoring
        self._num_observed = 0

    # -------------------------------------------------------------- Hessian-vector products
    def hessian_vector_product(self, model, losses: Sequence[DDPMLoss], vector: Sequence[torch.Tensor]):
        """``(H v, g)`` of the mean loss over ``losses`` (averaged across processes); ``v`` is held fixed."""
        params = _params(model)
        vector = [v.detach() for v in vector]
        hv = [torch.zeros_like(p) for p in params]
        g = [torch.zeros_like(p) for p in params]
        for loss_fn in losses:
            if self.config.hvp == "exact":
                part = [torch.zeros_like(p) for p in params]
                grads = [torch.zeros_like(p) for p in params]
                for weight, piece in loss_fn.chunks():  # H v is linear in the loss: chunk by chunk, v fixed
                    with math_attention():
                        piece_grads = _grad(piece(model), params, create_graph=True)
                        dot = sum((x * v).sum() for x, v in zip(piece_grads, vector))
                        piece_part = _grad(dot, params)
                    for acc, x in zip(part, piece_part):
                        acc.add_(x, alpha=weight)
                    for acc, x in zip(grads, piece_grads):
                        acc.add_(x.detach(), alpha=weight)
                    del piece_grads, dot, piece_part
            else:
                part, grads = self._finite_difference(model, loss_fn, params, vector)
            for acc, x in zip(hv, part):
                acc.add_(x, alpha=1.0 / len(losses))
            for acc, x in zip(g, grads):
                acc.add_(x, alpha=1.0 / len(losses))
        all_reduce_mean(hv)
        all_reduce_mean(g)
        return hv, g

    def _finite_difference(self, model, loss_fn, params, vector):
        theta = [p.detach().clone() for p in params]
        v_norm = torch.sqrt(sum((x.double() ** 2).sum() for x in vector))
        t_norm = torch.sqrt(sum((x.double() ** 2).sum() for x in theta))
        # A 0-dim tensor on the device: the step needs no read-back to the host.
        eps = (self.config.fd_epsilon * t_norm / v_norm.clamp_min(1e-30)).to(params[0].dtype)
        try:
            with torch.no_grad():
                for p, t, d in zip(params, theta, vector):
                    p.copy_(t + eps * d)
            plus = _loss_grad(model, loss_fn, params)
            with torch.no_grad():
                for p, t, d in zip(params, theta, vector):
                    p.copy_(t - eps * d)
            minus = _loss_grad(model, loss_fn, params)
        finally:
            with torch.no_grad():
                for p, t in zip(params, theta):
                    p.copy_(t)
        return [(a - b) / (2 * eps) for a, b in zip(plus, minus)], [(a + b) / 2 for a, b in zip(plus, minus)]

    def gradient(self, model, losses: Sequence[DDPMLoss]) -> List[torch.Tensor]:
        """The mean gradient over ``losses``, averaged across processes."""
        params = _params(model)
        g = [torch.zeros_like(p) for p in params]
        for loss_fn in losses:
            for acc, x in zip(g, _loss_grad(model, loss_fn, params)):
                acc.add_(x, alpha=1.0 / len(losses))
        all_reduce_mean(g)
        return g

    def hessian_gradient_product(self, model, loss_fn: DDPMLoss) -> List[torch.Tensor]:
        """``H g`` with ``g`` and ``H`` from the same mini-batch (``g`` held fixed), averaged across processes."""
        g = self.gradient(model, [loss_fn])
        return self.hessian_vector_product(model, [loss_fn], g)[0]

    @staticmethod
    def split_samples(losses: Sequence[DDPMLoss]):
        """Two disjoint halves of every mini-batch: the even and the odd images (the same images however the
        global batch is split across processes, when each process holds an even number)."""
        for loss_fn in losses:
            if loss_fn.images.shape[0] < 2:
                raise ValueError("gradient_flow with disjoint=True needs at least 2 images per scoring mini-batch "
                                 "(g and H g come from different images); raise --score_batch_size.")
        return [l.subset(slice(0, None, 2)) for l in losses], [l.subset(slice(1, None, 2)) for l in losses]

    # -------------------------------------------------------------- mask gradients
    @staticmethod
    def mask_gradient(model, masks, loss_fn: DDPMLoss) -> torch.Tensor:
        """``dL/dm`` for every unit (flat, in the masks' order), averaged across processes."""
        # A float64 leaf for the hooks to gather from: the gradient is then as precise as the model allows.
        with masks.substituted(masks.values.detach().double().requires_grad_(True)) as leaf:
            grad = torch.zeros_like(leaf)
            for weight, piece in loss_fn.chunks():
                (part,) = torch.autograd.grad(piece(model), leaf)
                grad.add_(part, alpha=weight)
        all_reduce_mean([grad])  # on the model's device
        return grad

    def observe(self, mask_grad: torch.Tensor) -> None:
        """Record the mask gradient of one training step (already averaged across processes)."""
        if self.config.form != "mask_flow" or not self.config.trajectory:
            return
        square = mask_grad.detach().double() ** 2  # stays on the device: no wait for it at every step
        self._observed = square if self._observed is None else self._observed + square
        self._num_observed += 1

    @property
    def uses_trajectory(self) -> bool:
        return self.config.form == "mask_flow" and self.config.trajectory

    def _per_family(self, flat: torch.Tensor, masks) -> Dict[str, torch.Tensor]:
        return {name: flat[start : start + masks.units[name].num_units].clone() for name, start in masks.offsets.items()}

    # -------------------------------------------------------------- scores
    def score(self, model, units, losses, masks=None):
        form = self.config.form
        if form == "mask_flow":
            return self._mask_flow(model, units, losses, masks)
        reducer = self.reducer(model, units)
        params = _params(model)
        if form == "loss_change":
            return self._loss_change(model, units, losses)
        first, second = self.split_samples(losses) if self.config.disjoint else (losses, losses)
        g = self.gradient(model, first)
        hg, _ = self.hessian_vector_product(model, second, g)
        scores = reducer(self._named(model, [p.detach() * h for p, h in zip(params, hg)]))
        if form == "preserve":
            return {k: v.abs() for k, v in scores.items()}
        return scores

    def _loss_change(self, model, units, losses):
        """``dL_u = -theta_u . g + 1/2 theta_u . H theta_u`` for every unit u at once.

        The quadratic term needs ``H theta_u`` for each unit; one Hessian-vector product per mini-batch gives all of
        them without bias: with a random sign ``r_u`` per unit and ``v = sum_u r_u theta_u``,
        ``E[r_u theta_u . H v] = theta_u . H theta_u`` (the cross terms between units average out over the
        mini-batches, each with its own signs). The signs come from ``probe_seed``, the same on every process
        and at every re-scoring.
        """
        reducer = self.reducer(model, units)
        params = _params(model)
        device = params[0].device
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        linear = {f.name: torch.zeros(f.num_units, dtype=torch.float64, device=device) for f in units}
        quadratic = {f.name: torch.zeros(f.num_units, dtype=torch.float64, device=device) for f in units}
        for b, loss_fn in enumerate(losses):
            generator = torch.Generator().manual_seed(self.config.probe_seed * 1_000_003 + b)
            # Drawn on the host (the same signs on every device and process), used on the model's device.
            signs = {f.name: (torch.randint(0, 2, (f.num_units,), generator=generator).double() * 2 - 1).to(device) for f in units}
            spread = reducer.expand(model, signs)
            vector = [p.detach() * spread[n] if n in spread else torch.zeros_like(p) for n, p in zip(names, params)]
            hv, g = self.hessian_vector_product(model, [loss_fn], vector)
            lin = reducer(self._named(model, [p.detach() * x for p, x in zip(params, g)]))
            quad = reducer(self._named(model, [p.detach() * x for p, x in zip(params, hv)]))
            for k in linear:
                linear[k] += lin[k] / len(losses)
                quadratic[k] += signs[k] * quad[k] / len(losses)
        # Keep the units whose removal is predicted to raise the loss most; prune the lowest.
        return {k: -linear[k] + 0.5 * quadratic[k] for k in linear}

    def _mask_flow(self, model, units, losses, masks):
        if masks is None:
            raise ValueError("gradient_flow with form='mask_flow' needs the model's UnitMasks (score(..., masks=masks)).")
        if self._num_observed and masks.units is units:
            flat = self._observed / self._num_observed
        else:
            flat = torch.zeros(masks.values.numel(), dtype=torch.float64, device=masks.values.device)
            for loss_fn in losses:
                flat += self.mask_gradient(model, masks, loss_fn) ** 2 / len(losses)
        self.reset_observations()
        return self._per_family(flat, masks)

    def reset_observations(self) -> None:
        self._observed, self._num_observed = None, 0

    def observation_state(self) -> Dict[str, object]:
        """What :meth:`observe` accumulated, for checkpoints."""
        return {"observed": self._observed, "num_observed": self._num_observed}

    def load_observation_state(self, state: Dict[str, object]) -> None:
        self._observed = state.get("observed")
        self._num_observed = int(state.get("num_observed", 0))


class Taylor(Criterion):
    name = "taylor"
    config_class = TaylorConfig

    def score(self, model, units, losses, masks=None):
        params = _params(model)
        grads = [torch.zeros_like(p) for p in params]
        for loss_fn in losses:
            for acc, g in zip(grads, _loss_grad(model, loss_fn, params)):
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

    def score(self, model, units, losses=(), masks=None):
        per_param = {n: p.detach() ** 2 for n, p in model.named_parameters()}
        return {k: v.sqrt() for k, v in self.reducer(model, units)(per_param).items()}


class Random(Criterion):
    name = "random"
    config_class = RandomConfig
    needs_data = False

    def score(self, model, units, losses=(), masks=None):
        generator = torch.Generator().manual_seed(self.config.seed)  # on the host: the same scores on every device
        return {f.name: torch.rand(f.num_units, generator=generator, dtype=torch.float64) for f in units}


class DiffPruning(Taylor):
    name = "diff_pruning"
    config_class = DiffPruningConfig

    def score(self, model, units, losses, masks=None):
        params = _params(model)
        grads = [torch.zeros_like(p) for p in params]
        num_train = losses[0].scheduler.config.num_train_timesteps
        steps = torch.linspace(0, num_train - 1, self.config.num_timesteps).round().long().unique()
        max_loss = 0.0
        device = params[0].device
        for t in steps.tolist():
            step_grads = [torch.zeros_like(p) for p in params]
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            for loss_fn in losses:
                fixed = loss_fn.with_timesteps(torch.full_like(loss_fn.timesteps, t))
                for weight, piece in fixed.chunks():
                    loss = piece(model)
                    step_loss += loss.detach().double() * (weight / len(losses))
                    for acc, g in zip(step_grads, _grad(loss, params)):
                        acc.add_(g, alpha=weight / len(losses))
            all_reduce_mean([step_loss])  # on the device; the stop below is a decision, read once per timestep
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
