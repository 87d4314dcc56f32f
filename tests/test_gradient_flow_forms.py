"""The gradient-flow forms predict what they claim; the estimator's draws; one-shot pruning exports its step-0 selection."""

import os

import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import spearmanr

from diffusers_gfprune import training
from diffusers_gfprune.criteria import GradientFlow, _grad, _params, get_criterion
from diffusers_gfprune.masks import UnitMasks
from diffusers_gfprune.objective import stratified_timesteps
from diffusers_gfprune.pruner import GradientFlowPruner, PrunerConfig
from diffusers_gfprune.units import find_units

from .architectures import build
from .conftest import load_script
from .test_method import SCHEDULER, _zero_unit, tiny_loss


@pytest.fixture(scope="module")
def tiny64():
    torch.manual_seed(0)
    model = build("tiny_1ch_16px").to(torch.float64)
    return model, find_units(model), tiny_loss(model, dtype=torch.float64)


def sampled_units(units, per_family=2, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return [(f, int(u)) for f in units for u in torch.randperm(f.num_units, generator=generator)[:per_family]]


def gradient_norm2(model, loss):
    return float(sum((g ** 2).sum() for g in _grad(loss(model), _params(model))))


def test_preserve_predicts_the_size_of_the_change_of_gradient_norm(tiny64):
    """|I_u| ranks units by how much removing them changes G = ||g||^2 (the quantity 'preserve' keeps)."""
    model, units, loss = tiny64
    scores = get_criterion("gradient_flow", form="preserve", disjoint=False).score(model, units, [loss])
    base = gradient_norm2(model, loss)
    predicted, measured = [], []
    for family, unit in sampled_units(units):
        restore = _zero_unit(model, family, unit)
        measured.append(abs(gradient_norm2(model, loss) - base))
        restore()
        predicted.append(2 * float(scores[family.name][unit]))
    rho = spearmanr(predicted, measured).statistic
    print(f"\npreserve: |Delta G| predicted vs measured over {len(predicted)} units: Spearman {rho:.3f}")
    assert rho >= 0.8


def test_loss_change_estimates_each_units_second_order_loss_change():
    """The random-sign estimate follows -theta_u.g + 1/2 theta_u.H theta_u computed unit by unit (one Hessian-vector
    product per unit): with all the units' cross terms, a unit-blind estimate (H theta over the whole theta) does not."""
    torch.manual_seed(0)
    model = build("tiny_1ch_16px")
    units = find_units(model)
    loss = tiny_loss(model)
    criterion = get_criterion("gradient_flow", form="loss_change")
    estimate = criterion.score(model, units, [loss] * 48)  # 48 sign draws on one batch: the cross terms average out
    reducer = criterion.reducer(model, units)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = _params(model)
    h_theta, g = criterion.hessian_vector_product(model, [loss], [p.detach() for p in params])
    blind = reducer(criterion._named(model, [p.detach() * (0.5 * h - d) for p, h, d in zip(params, h_theta, g)]))
    exact, estimated, unit_blind = [], [], []
    for family, unit in sampled_units(units, per_family=1):
        one = {f.name: torch.zeros(f.num_units, dtype=torch.float64) for f in units}
        one[family.name][unit] = 1.0
        spread = reducer.expand(model, one)
        step = [p.detach() * spread[n] if n in spread else torch.zeros_like(p) for n, p in zip(names, params)]
        hv, g = criterion.hessian_vector_product(model, [loss], step)
        exact.append(float(-sum((s * x).sum() for s, x in zip(step, g)) + 0.5 * sum((s * x).sum() for s, x in zip(step, hv))))
        estimated.append(float(estimate[family.name][unit]))
        unit_blind.append(float(blind[family.name][unit]))
    rho, rho_blind = spearmanr(estimated, exact).statistic, spearmanr(unit_blind, exact).statistic
    print(f"\nloss_change over {len(exact)} units: estimate vs exact second order Spearman {rho:.3f} (unit-blind: {rho_blind:.3f})")
    assert rho >= 0.6 and rho > rho_blind + 0.3


def test_expand_is_the_adjoint_of_the_unit_sums(tiny64):
    """<expand(values), x> summed == <values, reduce(x)>: every parameter element counts for exactly its units."""
    model, units, _ = tiny64
    reducer = GradientFlow().reducer(model, units)
    generator = torch.Generator().manual_seed(0)
    values = {f.name: torch.randn(f.num_units, generator=generator, dtype=torch.float64) for f in units}
    x = {n: torch.randn(p.shape, generator=generator, dtype=torch.float64) for n, p in model.named_parameters()}
    spread = reducer.expand(model, values)
    left = sum(float((spread[n] * x[n]).sum()) for n in spread)
    sums = reducer(x)
    right = sum(float((values[k] * sums[k]).sum()) for k in values)
    assert left == pytest.approx(right, rel=1e-10)


def test_mask_flow_predicts_the_loss_decrease_of_a_gradient_step_on_the_mask(tiny64):
    """(dL/dm_u)^2 is the rate at which a gradient-flow step on unit u's mask lowers the loss."""
    model, units, loss = tiny64
    masks = UnitMasks(model, units).attach()
    try:
        masks.fill_(0.8)  # inside (0, 1), so a step either way stays a valid mask
        scores = get_criterion("gradient_flow", form="mask_flow").score(model, units, [loss], masks=masks)
        grad = GradientFlow.mask_gradient(model, masks, loss)
        base = float(loss(model).detach())
        step = 1e-3  # a small step down the gradient of one mask: the loss falls by about step * |dL/dm_u|
        predicted, measured = [], []
        for family, unit in sampled_units(units, per_family=3):
            index = masks.offsets[family.name] + unit
            with torch.no_grad():
                masks.values[index] -= step * float(torch.sign(grad[index]))
            measured.append((base - float(loss(model).detach())) / step)
            with torch.no_grad():
                masks.values[index] = 0.8
            predicted.append(float(scores[family.name][unit]))
        rho = spearmanr(predicted, measured).statistic
        print(f"\nmask_flow: (dL/dm)^2 vs measured loss decrease of a mask step over {len(predicted)} units: Spearman {rho:.3f}")
        assert rho >= 0.95
    finally:
        masks.detach()


def test_mask_flow_averages_the_observed_training_steps():
    """With observations, the scores are the mean squared mask gradient of the observed steps (no extra pass)."""
    model = build("tiny_1ch_16px").to(torch.float64)
    units = find_units(model)
    masks = UnitMasks(model, units).attach()
    criterion = get_criterion("gradient_flow", form="mask_flow")
    losses = [tiny_loss(model, seed=s, dtype=torch.float64) for s in range(3)]
    grads = [GradientFlow.mask_gradient(model, masks, l) for l in losses]
    for g in grads:
        criterion.observe(g)
    scores = criterion.score(model, units, [], masks=masks)  # no scoring batches needed
    expected = torch.stack(grads).pow(2).mean(0)
    flat = torch.cat([scores[name] for name in units.names])
    assert torch.allclose(flat, expected)
    # Consumed: the next scoring falls back on its mini-batches.
    again = criterion.score(model, units, losses[:1], masks=masks)
    assert torch.allclose(torch.cat([again[n] for n in units.names]), grads[0] ** 2)


def test_g_and_hg_come_from_disjoint_images(monkeypatch):
    model = build("tiny_1ch_16px")
    units = find_units(model)
    loss = tiny_loss(model, batch=8)
    seen = {}
    criterion = get_criterion("gradient_flow", form="increase")
    gradient, hvp = criterion.gradient, criterion.hessian_vector_product

    def spy(kind, fn):
        def wrapped(model, losses, *rest):
            seen[kind] = torch.cat([l.images for l in losses])
            return fn(model, losses, *rest)
        return wrapped

    monkeypatch.setattr(criterion, "gradient", spy("g", gradient))
    monkeypatch.setattr(criterion, "hessian_vector_product", spy("hv", hvp))
    criterion.score(model, units, [loss])
    rows = lambda t: {tuple(r.flatten().tolist()) for r in t}  # noqa: E731
    assert rows(seen["g"]).isdisjoint(rows(seen["hv"]))
    assert rows(seen["g"]) | rows(seen["hv"]) == rows(loss.images)
    with pytest.raises(ValueError, match="at least 2 images"):
        criterion.score(model, units, [tiny_loss(model, batch=1)])


@pytest.mark.parametrize("batch", [1, 7, 64, 333, 1000])
def test_stratified_timesteps_cover_every_stratum(batch):
    timesteps = stratified_timesteps(batch, 1000, torch.Generator().manual_seed(batch))
    assert timesteps.min() >= 0 and timesteps.max() < 1000
    bounds = [i * 1000 // batch for i in range(batch + 1)]
    # Exactly one timestep in each of the batch's strata [floor(i T / B), floor((i + 1) T / B)).
    assert all(bounds[i] <= int(t) < bounds[i + 1] for i, t in enumerate(timesteps))


def test_scoring_draws_are_fixed_unless_resampled():
    from diffusers_gfprune.data import DigitsDataset

    dataset = DigitsDataset("train", 16)
    draw = lambda step, resample: training.scoring_losses(dataset, step, 0, 8, 2, SCHEDULER, resample=resample)  # noqa: E731
    a, b = draw(0, False), draw(10, False)
    assert all(torch.equal(x.noise, y.noise) and torch.equal(x.timesteps, y.timesteps) for x, y in zip(a, b))
    c = draw(10, True)
    assert not torch.equal(a[0].noise, c[0].noise)
    assert not torch.equal(a[0].noise, a[1].noise)  # the mini-batches of one draw are independent


def test_one_shot_pruner_selects_once_at_step_zero():
    model = build("tiny_1ch_16px")
    units = find_units(model)
    pruner = GradientFlowPruner(model, units, PrunerConfig(target_sparsity=0.5, process="one-shot"), "magnitude")
    info = pruner.step(0)
    assert info["rescored"] and pruner.current_sparsity() == pytest.approx(
        sum(f.num_units // 2 for f in units) / units.num_units, abs=0.01)
    assert pruner.phase(1) == "done" and pruner.masks.is_binary()


def test_one_shot_run_exports_exactly_the_selection_made_at_step_zero(tiny_teacher, tmp_path):
    """prune.py --process one-shot: the saved masks are what the criterion selects on the dense student at step 0."""
    from diffusers_gfprune import data, export
    from diffusers_gfprune.selection import select
    from diffusers_gfprune.teacher import load_teacher, resolve_teacher

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_script("prune").main([
            "--pretrained_model_name_or_path", tiny_teacher["pipeline"], "--output_dir", str(out), "--process", "one-shot",
            "--criterion", "taylor", "--target_sparsity", "0.5", "--max_train_steps", "3", "--train_batch_size", "4",
            "--score_batches", "2", "--max_train_samples", "20", "--num_eval_images", "0", "--num_inference_steps", "2",
            "--num_validation_images", "2", "--validation_steps", "100", "--checkpointing_steps", "100", "--report_to", "none",
        ])
        saved = load_file(os.path.join(out, "pruning_masks.safetensors"))
        summary = __import__("json").loads((out / "pruning_summary.json").read_text())
        # The same selection, computed independently from the same teacher, student and scoring draw.
        teacher, scheduler = load_teacher(resolve_teacher(tiny_teacher["pipeline"]))
        student, units, _ = export.dense_student(teacher, find_units(teacher), "stock", 0.5, scheduler.config.num_train_timesteps)
        UnitMasks(student, units).attach()
        dataset = data.load_train_dataset(data.DataConfig(dataset_name="digits", resolution=16, max_train_samples=20), 1)
        losses = training.scoring_losses(dataset, 0, 0, 4, 2, scheduler)
        pruned = select(get_criterion("taylor").score(student, units, losses), units, 0.5, "local")
    finally:
        torch.set_num_threads(threads)
    assert summary["pruner"]["process"] == "one-shot" and summary["pruner"]["pruning_steps"] == 0
    for name in units.names:
        assert torch.equal(saved[name].bool(), ~pruned[name]), name
    assert [h["phase"] for h in __import__("json").loads((out / "pruning_history.json").read_text())] == ["finetune"] * 3
