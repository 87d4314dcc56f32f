"""Learned masks: the budget is met, the hardening is exact and deterministic, removed units export exactly,
gradients reach every unit family, the state resumes bit for bit, and two processes keep the same masks."""

import copy
import weakref

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from diffusers_gfprune.export import export_model, prepare_stock, stock_keep_ratio
from diffusers_gfprune.learned_masks import (
    FLOOR_GATE,
    LearnedMaskConfig,
    LearnedMasks,
    MaskBudget,
    initial_logits,
)
from diffusers_gfprune.masks import UnitMasks
from diffusers_gfprune.objective import make_loss
from diffusers_gfprune.units import find_units

from . import gloo
from .architectures import build, random_inputs

ARCH = "tiny_1ch_16px"
STOCK_SPARSITY = 0.5  # on the stock grid of every architecture used here (families of 8 units: 4/8)
PROJECTION_TOLERANCE = 1e-4  # |C - t| right after apply(): bisection to float32 resolution, far below one unit
LAGRANGIAN_TOLERANCE = 0.01  # |C - t| after the hold: the multipliers settle, one unit of 920 is ~0.001
EXPORT_TOLERANCE = 1e-4  # relative error, as tests/test_exactness.py


@pytest.fixture(scope="module")
def tiny():
    model = build(ARCH)
    return model, find_units(model)


def make_flow(model, units, config=None, **budget):
    masks = UnitMasks(model, units).attach()
    budget = {"soft_steps": 10, "target_sparsity": STOCK_SPARSITY, **budget}
    return LearnedMasks(masks, config or LearnedMaskConfig(), MaskBudget(**budget))


def random_scores(units, seed=0, levels=None):
    """One score per unit; with ``levels`` only that many distinct values (ties)."""
    g = torch.Generator().manual_seed(seed)
    if levels:
        return {f.name: torch.randint(0, levels, (f.num_units,), generator=g).double() for f in units}
    return {f.name: torch.rand(f.num_units, generator=g, dtype=torch.float64) for f in units}


def task_loss(model, seed, batch=2):
    sample, _ = random_inputs(model, batch=batch, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return make_loss(sample, DDPMScheduler(num_train_timesteps=1000), g)


# ---------------------------------------------------------------------- expected MACs
def test_expected_macs_is_exact(tiny):
    """Binary keep: the exact MACs; random keep: the Monte Carlo mean of the MACs of sampled selections."""
    _, units = tiny
    macs = units.unit_macs()
    g = torch.Generator().manual_seed(0)
    binary = (torch.rand(units.num_units, generator=g) < 0.6).double()
    assert float(macs.expected_macs(binary)) == pytest.approx(macs.macs_of_flat(1 - binary), rel=1e-12)
    keep = torch.rand(units.num_units, generator=g, dtype=torch.float64)
    samples = torch.tensor([macs.macs_of_flat(1 - (torch.rand(units.num_units, generator=g) < keep).double())
                            for _ in range(2000)])
    standard_error = float(samples.std() / len(samples) ** 0.5)
    assert abs(float(macs.expected_macs(keep)) - float(samples.mean())) < 4 * standard_error
    # Differentiable, on the probabilities' dtype; a unit that costs MACs has a positive derivative.
    keep32 = keep.float().requires_grad_(True)
    value = macs.expected_fraction(keep32)
    assert value.dtype == torch.float32
    value.backward()
    assert bool((keep32.grad >= 0).all()) and float(keep32.grad.max()) > 0


# ---------------------------------------------------------------------- the budget term alone
BUDGET_CASES = {
    # name: (config, budget), per-layer MACs, stock per-family, and the Lagrangian
    "projection_sigmoid_macs": (dict(), dict(selection="global", target_macs=0.5)),
    "projection_sigmoid_stock": (dict(), dict()),
    "projection_hard_concrete_macs": (dict(parametrization="hard_concrete"), dict(selection="global", target_macs=0.3)),
    "projection_straight_through_units": (dict(parametrization="straight_through"), dict(selection="global")),
    "lagrangian_hard_concrete_macs": (dict(parametrization="hard_concrete", budget="lagrangian"),
                                      dict(selection="global", target_macs=0.5)),
    "lagrangian_hard_concrete_stock": (dict(parametrization="hard_concrete", budget="lagrangian"), dict()),
}


@pytest.mark.parametrize("case", sorted(BUDGET_CASES))
def test_budget_term_alone_meets_the_target(tiny, case):
    """Without a task loss: the projection meets every step's target; the Lagrangian reaches the final one."""
    model, units = tiny
    config, budget = BUDGET_CASES[case]
    soft_steps, hold = 20, 120
    flow = make_flow(model, units, LearnedMaskConfig(**config), soft_steps=soft_steps, **budget)
    flow.initialize(random_scores(units))
    assert flow.start_value < 1
    for step in range(soft_steps + hold):
        flow.begin_step(min(step, soft_steps))
        terms = flow.apply()
        target = flow.target_at(flow.progress)
        if flow.config.budget == "projection":
            with torch.no_grad():
                values = flow.constraint_values(flow.keep_probabilities())
            assert float((values - target).abs().max()) < PROJECTION_TOLERANCE, (step, values, target)
        else:
            terms.backward()
        flow.update()
    assert flow.target_at(flow.progress) == pytest.approx(flow.final_target)
    values = flow.constraint_values().detach()
    tolerance = PROJECTION_TOLERANCE * 10 if flow.config.budget == "projection" else LAGRANGIAN_TOLERANCE
    assert float((values - flow.final_target).abs().max()) < tolerance
    # Without the budget term nothing would have moved: the start is far from the target.
    assert flow.start_value - flow.final_target > 0.2
    if flow.measure == "macs":
        assert flow.expected_macs_fraction() == pytest.approx(budget["target_macs"], abs=tolerance)


def test_sigmoid_gates_end_near_binary_and_harden_without_a_jump(tiny):
    """By the end of the soft phase (tau = temperature_end) the gates are near-binary and the hardening keeps the
    units whose gates are near 1."""
    model, units = tiny
    flow = make_flow(model, units, soft_steps=10)
    flow.initialize(random_scores(units))
    undecided = []
    for step in range(11):
        flow.begin_step(step)
        flow.apply()
        flow.update()
        undecided.append(flow.undecided_fraction())
    assert max(undecided) > 0.05  # while tau is large and the threshold crosses the logits, gates are spread
    assert undecided[-1] < 0.02
    gates = flow.deterministic_gates()
    hard = torch.cat([m for m in flow.harden().values()])
    assert float((gates - hard).abs().max()) < 0.9  # no unit flips from one side to the other
    assert float((gates - hard).abs().mean()) < 0.02


# ---------------------------------------------------------------------- hardening
HARDEN_CASES = {
    "stock_0.25": dict(target_sparsity=0.25),
    "stock_0.5": dict(target_sparsity=0.5),
    "stock_0.75": dict(target_sparsity=0.75),
    "per_layer_units_0.5": dict(selection="global", target_sparsity=0.5),
    "per_layer_macs_0.5": dict(selection="global", target_macs=0.5),
    "per_layer_macs_0.3": dict(selection="global", target_macs=0.3),
}


@pytest.mark.parametrize("case", sorted(HARDEN_CASES))
def test_harden_is_exact_and_deterministic(tiny, case):
    model, units = tiny
    budget = HARDEN_CASES[case]
    flow = make_flow(model, units, **budget)
    flow.initialize(random_scores(units, levels=3))  # three distinct scores: many ties
    hard = flow.harden()
    assert set(hard) == set(units.names)
    assert all(m.dtype == torch.float32 and bool(((m == 0) | (m == 1)).all()) for m in hard.values())
    pruned = {k: v == 0 for k, v in hard.items()}
    macs = units.unit_macs()
    if budget.get("selection", "local") == "local":
        keep = stock_keep_ratio(units, budget["target_sparsity"])
        for family in units:
            assert int(hard[family.name].sum()) == keep * family.num_units, family.name
    elif "target_macs" in budget:
        fraction = macs.fraction(pruned)
        largest_unit = max((macs.dense - macs.macs_of_flat(torch.eye(units.num_units, dtype=torch.float64)[i])) / macs.dense
                           for i in range(units.num_units))
        assert budget["target_macs"] - largest_unit < fraction <= budget["target_macs"] + 1e-12
    else:
        assert sum(int(p.sum()) for p in pruned.values()) == int(budget["target_sparsity"] * units.num_units + 0.5)
    # Within a family, no kept unit has a lower logit than a pruned one.
    logits = flow.family_logits()
    for family in units:
        kept, gone = logits[family.name][~pruned[family.name]], logits[family.name][pruned[family.name]]
        if len(kept) and len(gone):
            assert float(kept.min()) >= float(gone.max())
    # Deterministic: again, and from a fresh object with the same logits.
    assert all(torch.equal(hard[k], v) for k, v in flow.harden().items())
    other = make_flow(model, units, **budget)
    other.load_state_dict(flow.state_dict())
    assert all(torch.equal(hard[k], v) for k, v in other.harden().items())


def test_harden_breaks_ties_by_unit_order(tiny):
    """Every logit equal: each family loses its first units (the stable order of the library's selection)."""
    model, units = tiny
    flow = make_flow(model, units)
    flow.initialize(None)
    keep = stock_keep_ratio(units, STOCK_SPARSITY)
    for family in units:
        gone = family.num_units - int(keep * family.num_units)
        expected = torch.cat([torch.zeros(gone), torch.ones(family.num_units - gone)])
        assert torch.equal(flow.harden()[family.name], expected), family.name


# ---------------------------------------------------------------------- removed units and the export
@pytest.mark.parametrize("layout", ["stock", "per-layer"])
@pytest.mark.parametrize("arch", ["tiny_1ch_16px", "multi_head"])
def test_units_at_gate_zero_are_removed_and_the_export_is_exact(arch, layout):
    model = build(arch)
    units = find_units(model)
    budget = dict(target_sparsity=STOCK_SPARSITY) if layout == "stock" else dict(selection="global", target_macs=0.5)
    if layout == "stock":
        prepare_stock(model, units, STOCK_SPARSITY, refine_steps=0)
    config = LearnedMaskConfig(parametrization="hard_concrete")
    flow = make_flow(model, units, config, soft_steps=4, **budget)
    flow.initialize(random_scores(units, seed=3))
    for step in range(5):  # the threshold moves to the final target: the lowest units reach gate 0
        flow.begin_step(step)
        flow.apply()
        flow.update()
    gates = flow.deterministic_gates()
    assert int((gates == 0).sum()) > 0
    hard = flow.harden()
    removed = torch.cat([hard[f.name] == 0 for f in units])
    assert bool(removed[gates == 0].all()), "a unit at gate 0 survived the hardening"
    # Gates at exactly 0 and 1 where the hardening says: the masked model under the learned masks is the export.
    with torch.no_grad():
        flow.logits.copy_(torch.where(removed, -10.0, 10.0))
        flow.shift.zero_()
    sample, timestep = random_inputs(model, batch=2, seed=1)
    with torch.no_grad(), flow.evaluating():
        assert torch.equal(flow.masks.values, (~removed).float())
        reference = model(sample, timestep).sample
    flow.masks.detach()
    pruned = export_model(model, units, hard, layout)
    with torch.no_grad():
        out = pruned(sample, timestep).sample
    error = float((out - reference).norm() / reference.norm())
    assert error < EXPORT_TOLERANCE, f"{arch} {layout}: relative error {error:.2e}"
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_a_family_never_samples_empty(tiny):
    """Logits far below the threshold in one family: its highest-logit unit stays at the floor gate."""
    base, units = tiny
    model = copy.deepcopy(base)
    flow = make_flow(model, units, LearnedMaskConfig(parametrization="hard_concrete", budget="lagrangian"))
    flow.initialize(None)
    family = units.families[3]
    start = flow.masks.offsets[family.name]
    with torch.no_grad():
        flow.logits[start : start + family.num_units] = -50.0
        flow.logits[start + 2] = -40.0
    flow.begin_step(0)
    flow.apply()
    values = flow.masks.values.detach()[start : start + family.num_units]
    assert float(values[2]) == pytest.approx(FLOOR_GATE) and int((values > 0).sum()) == 1
    assert family.unit_size > 1  # a GroupNorm family
    with torch.no_grad():
        out = model(*random_inputs(model)).sample  # the mask-aware GroupNorm normalizes the one live group
    assert bool(torch.isfinite(out).all())
    flow.masks.detach()


# ---------------------------------------------------------------------- gradients
PARAMETRIZATIONS = {
    "sigmoid": dict(),
    # A clipped hard-concrete gate passes no gradient (by design): start the logits where most gates are interior.
    "hard_concrete": dict(parametrization="hard_concrete", init_mean=0.0, init_spread=0.5),
    "straight_through": dict(parametrization="straight_through"),
    "lagrangian": dict(budget="lagrangian"),
}


@pytest.mark.parametrize("arch", ["tiny_1ch_16px", "multi_head", "scale_shift"])
@pytest.mark.parametrize("name", sorted(PARAMETRIZATIONS))
def test_task_gradient_reaches_every_unit_family(arch, name):
    model = build(arch).train()
    units = find_units(model)
    flow = make_flow(model, units, LearnedMaskConfig(**PARAMETRIZATIONS[name]))
    flow.initialize(random_scores(units))
    flow.begin_step(3)
    terms = flow.apply()
    (task_loss(model, seed=0)(model) + terms).backward()
    flow.collect_gradient()  # sigmoid gates: from the weights' gradients
    grad = flow.logits.grad
    assert grad is not None and bool(torch.isfinite(grad).all())
    kinds = set()
    for family in units:
        start = flow.masks.offsets[family.name]
        assert float(grad[start : start + family.num_units].abs().max()) > 0, f"no gradient reaches {family.name}"
        kinds.add(family.kind)
    # Attention (heads or inner width), GroupNorm groups of resnets and streams (whose skips are concatenated in the
    # up path) and both time-embedding widths.
    assert kinds >= {"attention_inner", "resnet_hidden", "stream", "time_hidden", "time_embedding"}
    assert any(f.kind == "stream" and any(".resnets." in s.module and s.module.startswith("up_blocks") and s.dim == "in"
                                          for s in f.slices) for f in units)


GATE_GRADIENT_BATCH = 16  # the budget's graph over the units is a fixed cost; activations grow with the batch
GATE_GRADIENT_CASES = {  # architecture, budget options, step (early: soft gates; late: some gates near 0)
    "tiny_projection_early": ("tiny_1ch_16px", dict(), 2),
    "tiny_projection_late": ("tiny_1ch_16px", dict(), 9),
    "multi_head_projection": ("multi_head", dict(), 5),
    "scale_shift_lagrangian_prior": ("scale_shift", dict(budget="lagrangian", prior_weight=0.1), 0),
    "per_layer_global": ("multi_head", dict(scope="global"), 5),
}


class SavedActivations:
    """Bytes of the tensors autograd holds for the backward pass once the forward pass is over: storages still alive
    (a graph that was built and dropped, as the GroupNorm hook's discarded full-width output, holds nothing), each
    counted once, the model's parameters excluded."""

    def __init__(self, model):
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.saved = []

    def __enter__(self):
        def pack(t):
            self.saved.append(weakref.ref(t))
            return t

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def bytes(self) -> int:
        storages = {}
        for ref in self.saved:
            t = ref()
            if t is not None and t.untyped_storage().data_ptr() not in self.parameters:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())


def _logit_gradient_and_saved_bytes(arch, options, step, gate_gradient):
    """The logits' gradient of one training step and the bytes autograd saved for the backward pass."""
    model = build(arch).train()
    units = find_units(model)
    flow = make_flow(model, units, LearnedMaskConfig(gate_gradient=gate_gradient, **options))
    flow.initialize(random_scores(units))
    if options.get("budget") == "lagrangian":
        with torch.no_grad():
            flow.lambda1.fill_(0.5)
            flow.lambda2.fill_(0.2)
    flow.begin_step(step)
    with SavedActivations(model) as saved:
        terms = flow.apply()
        loss = task_loss(model, seed=step, batch=GATE_GRADIENT_BATCH)(model) + terms
    held = saved.bytes()
    loss.backward()
    flow.collect_gradient()
    # The same mask values as constants: the progressive process's pruning-stage step.
    model.zero_grad(set_to_none=True)
    flow.masks.values = flow.masks.values.detach()
    with SavedActivations(model) as constant:
        task_loss(model, seed=step, batch=GATE_GRADIENT_BATCH)(model)
    return flow.logits.grad.detach().double(), held, constant.bytes()


@pytest.mark.parametrize("case", sorted(GATE_GRADIENT_CASES))
def test_gate_gradient_from_the_parameters_equals_autograd(case):
    """The logits' gradient formed from the weights' gradients (the default for sigmoid gates) is autograd's, through
    the projection or the Lagrangian, and autograd then keeps about a plain step's activations, not 1.5x."""
    arch, options, step = GATE_GRADIENT_CASES[case]
    want, saved_autograd, _ = _logit_gradient_and_saved_bytes(arch, options, step, "autograd")
    got, saved_parameters, saved_constant = _logit_gradient_and_saved_bytes(arch, options, step, "parameters")
    scale = float(want.abs().max())
    assert scale > 0
    assert float((got - want).abs().max()) <= 1e-4 * scale, (got - want).abs().max()
    model = build(arch).train()
    with SavedActivations(model) as plain:
        task_loss(model, seed=step, batch=GATE_GRADIENT_BATCH)(model)
    sizes = (saved_parameters, saved_constant, plain.bytes(), saved_autograd)
    # What the progressive process's step holds with the same mask values, and much less than autograd's way.
    assert saved_parameters <= 1.05 * saved_constant and 1.2 * saved_parameters < saved_autograd, sizes
    # Against a plain step: the same while no gate is exactly 0; gates at 0 route a GroupNorm through its kept
    # channels, which holds their copy as the default process's hard phase does (about 1.2x on this tiny model).
    zeros = bool((_flow_values(arch, options, step) == 0).any())
    assert saved_parameters <= (1.25 if zeros else 1.05) * plain.bytes(), sizes


def _flow_values(arch, options, step):
    model = build(arch)
    units = find_units(model)
    flow = make_flow(model, units, LearnedMaskConfig(**options))
    flow.initialize(random_scores(units))
    flow.begin_step(step)
    flow.apply()
    return flow.masks.values.detach()


def test_gate_gradient_parameters_refused_for_other_gates():
    with pytest.raises(ValueError, match="autograd"):
        LearnedMaskConfig(parametrization="hard_concrete", gate_gradient="parameters")


# ---------------------------------------------------------------------- state
RESUME_CASES = {
    "sigmoid_projection": dict(),
    "hard_concrete_lagrangian": dict(parametrization="hard_concrete", budget="lagrangian"),
    "hard_concrete_projection_prior": dict(parametrization="hard_concrete", prior_weight=0.1),
}


def _train(flow, model, steps, first=0):
    trace = []
    for step in range(first, first + steps):
        flow.begin_step(step)
        terms = flow.apply()
        (task_loss(model, seed=step)(model) + terms).backward()
        flow.update()
        trace.append(torch.cat([flow.logits.detach(), flow.lambda1.detach(), flow.lambda2.detach(),
                                flow.masks.values.detach()]).clone())
    return trace


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_state_round_trip_gives_identical_steps(tiny, tmp_path, case):
    base, units = tiny
    config = LearnedMaskConfig(**RESUME_CASES[case])
    model = copy.deepcopy(base).requires_grad_(False)  # the weights stay fixed: the masks alone move
    flow = make_flow(model, units, config)
    flow.initialize(random_scores(units))
    straight = _train(flow, model, 6)
    flow.masks.detach()

    flow = make_flow(model, units, config)
    flow.initialize(random_scores(units))
    _train(flow, model, 3)
    flow.save(str(tmp_path))
    flow.masks.detach()
    resumed = make_flow(model, units, config)
    resumed.load(str(tmp_path))
    after = _train(resumed, model, 3, first=3)
    resumed.masks.detach()
    for i, (a, b) in enumerate(zip(straight[3:], after)):
        assert torch.equal(a, b), f"step {3 + i} differs after resuming"
    assert not torch.equal(straight[3], straight[5])  # the steps really move the masks
    tensors = load_file(str(tmp_path / "learned_masks.safetensors"))
    assert any(k.startswith("optimizer/0/exp_avg") for k in tensors) and "generator" in tensors


def test_state_refuses_another_configuration(tiny, tmp_path):
    model, units = tiny
    flow = make_flow(model, units)
    flow.initialize(None)
    flow.save(str(tmp_path))
    other = make_flow(model, units, LearnedMaskConfig(init_spread=1.0))
    with pytest.raises(ValueError, match="another configuration"):
        other.load(str(tmp_path))


# ---------------------------------------------------------------------- two processes
WORLD = 2
DIST_STEPS = 3


def _run_ranks(rank: int, world: int, reduce: bool):
    torch.manual_seed(0)
    model = build(ARCH).requires_grad_(False)
    units = find_units(model)
    flow = make_flow(model, units, LearnedMaskConfig(parametrization="hard_concrete", init_mean=1.0))
    flow.initialize(random_scores(units))
    out = {}
    for step in range(DIST_STEPS):
        flow.begin_step(step)
        terms = flow.apply()
        (task_loss(model, seed=100 * step + rank)(model) + terms).backward()  # each process its own data
        if reduce:
            flow.all_reduce_gradients()
        flow.update()
        out[f"logits/{step}"] = flow.logits.detach().clone()
        out[f"values/{step}"] = flow.masks.values.detach().clone()
    flow.masks.detach()
    return out


def _both_ways(rank: int, world: int) -> dict:
    results = {f"reduced/{k}": v for k, v in _run_ranks(rank, world, True).items()}
    results.update({f"local/{k}": v for k, v in _run_ranks(rank, world, False).items()})
    return results


def test_two_processes_keep_identical_masks(tmp_path):
    ranks = gloo.finish(gloo.start(_both_ways, WORLD, tmp_path), WORLD, tmp_path)
    for step in range(DIST_STEPS):
        for what in ("logits", "values"):
            key = f"reduced/{what}/{step}"
            assert torch.equal(ranks[0][key], ranks[1][key]), f"the processes hold different {what} at step {step}"
    # The check can fail: without the all-reduce, each process's own data moves its masks apart.
    assert not torch.equal(ranks[0][f"local/logits/{DIST_STEPS - 1}"], ranks[1][f"local/logits/{DIST_STEPS - 1}"])


# ---------------------------------------------------------------------- start and checks
def test_initial_logits_follow_the_ranks(tiny):
    _, units = tiny
    scores = random_scores(units, levels=4)
    logits = initial_logits(scores, units, "family", mean=5.0, spread=2.0)
    start = 0
    for family in units:
        part, score = logits[start : start + family.num_units], scores[family.name]
        start += family.num_units
        assert float(part.min()) >= 3.0 - 1e-6 and float(part.max()) <= 7.0 + 1e-6
        order = torch.argsort(score)
        assert bool((part[order][1:] >= part[order][:-1] - 1e-6).all())  # monotone in the score
        for value in score.unique():  # equal scores, equal logits
            assert part[score == value].unique().numel() == 1
    # One ranking over all units: the lowest tied group sits at its mean rank, (count - 1) / 2 of n - 1.
    flat = torch.cat([scores[f.name] for f in units])
    global_logits = initial_logits(scores, units, "global", mean=5.0, spread=2.0)
    lowest = flat == flat.min()
    count = int(lowest.sum())
    assert global_logits[lowest].unique().numel() == 1
    assert float(global_logits[lowest][0]) == pytest.approx(3.0 + 4.0 * (count - 1) / 2 / (len(flat) - 1), abs=1e-5)
    assert torch.equal(initial_logits(None, units), torch.full((units.num_units,), 5.0))
    with pytest.raises(ValueError, match="missing"):
        initial_logits({}, units)


BAD_CONFIGS = {
    "parametrization": (dict(parametrization="gumbel"), "parametrization"),
    "budget": (dict(budget="penalty"), "budget"),
    "scope": (dict(scope="kind"), "scope"),
    "mask_lr": (dict(mask_lr=-1.0), "mask_lr"),
    "stretch": (dict(gamma=0.1), "stretch"),
    "temperature": (dict(temperature_end=2.0), "temperature_end"),
    "prior": (dict(prior_weight=-1.0), "prior_weight"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_configs_are_refused(case):
    kwargs, message = BAD_CONFIGS[case]
    with pytest.raises(ValueError, match=message):
        LearnedMaskConfig(**kwargs)


def test_bad_budgets_are_refused(tiny):
    model, units = tiny
    with pytest.raises(ValueError, match="stock layout cannot prune"):
        make_flow(model, units, target_sparsity=0.3)  # off the stock grid of eighths
    with pytest.raises(ValueError, match="selection='global'"):
        MaskBudget(soft_steps=10, target_sparsity=0.5, target_macs=0.5)
    with pytest.raises(ValueError, match="soft_steps"):
        MaskBudget(soft_steps=0, target_sparsity=0.5)
    with pytest.raises(ValueError, match="MaskBudget"):
        LearnedMasks(UnitMasks(model, units))


def test_gates_stay_float32_under_autocast_and_scaled_steps_unscale(tiny):
    """Gates and budget terms in float32 inside a bfloat16 autocast region; an fp16 loss scale is divided out (the
    step equals the unscaled one), and a step whose unscaled gradients are not finite is skipped, as the loss scaler
    skips the weights' step."""
    base, units = tiny
    config = LearnedMaskConfig()
    logits = []
    for scale in (None, 1024.0):
        model = copy.deepcopy(base).requires_grad_(False)
        flow = make_flow(model, units, config)
        flow.initialize(random_scores(units))
        flow.begin_step(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terms = flow.apply()
            loss = task_loss(model, seed=0)(model) + terms
        assert flow.masks.values.dtype == torch.float32 and terms.dtype == torch.float32
        (loss * (scale or 1.0)).backward()
        assert flow.update(grad_scale=scale)
        logits.append(flow.logits.detach().clone())
    assert torch.equal(logits[0], logits[1])  # 1024 is a power of two: unscaling is exact
    assert not torch.equal(logits[1], initial_logits(random_scores(units), units))  # the step moved the logits
    flow.begin_step(2)
    flow.apply()
    flow.logits.grad = torch.full_like(flow.logits, float("inf"))
    assert not flow.update(grad_scale=1024.0)
    assert torch.equal(flow.logits.detach(), logits[1])
    flow.masks.detach()
