"""Repair at removal: the removed channels' mean goes into the consumer's bias, nothing else changes, the export
stays exact, the one-shot damage of a trained model goes down, and bad input is refused before any forward pass."""

import copy
import os

import pytest
import torch

from diffusers_gfprune.export import export_model, prepare_stock
from diffusers_gfprune.masks import UnitMasks
from diffusers_gfprune.repair import REPAIRABLE_KINDS, inputs_from_losses, repair_removed_units
from diffusers_gfprune.units import find_units

from . import gloo
from .architectures import build, random_inputs
from .conftest import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")
STOCK_SPARSITY = 0.5
EXPORT_TOLERANCE = 1e-5  # relative (norm of the difference over the norm of the output)
DIGITS_TEACHER = os.path.join(REPO_ROOT, "teachers", "ddpm-digits")


def calibration(model, batches=3, batch=4):
    return [random_inputs(model, batch=batch, seed=10 + i) for i in range(batches)]


def keep_only(units, kind, fraction=0.5, seed=0):
    """Remove ``fraction`` of the units (at least one) of the first family of ``kind``, keep everything else: the
    consumer's other inputs are then those of the dense model, so a linear consumer's mean is kept exactly."""
    g = torch.Generator().manual_seed(seed)
    first = next(f.name for f in units if f.kind == kind)
    keep = {}
    for f in units:
        mask = torch.ones(f.num_units)
        if f.name == first:
            gone = torch.randperm(f.num_units, generator=g)[: max(1, int(fraction * f.num_units))]
            mask[gone] = 0
        keep[f.name] = mask
    return keep


def output_mean(model, masks, module_name, inputs, keep=None):
    """Mean of a module's output over the inputs (channels last), with the masks at ``keep`` (None: all at 1)."""
    module = dict(model.named_modules())[module_name]
    total, count = 0, 0

    def hook(_, args, out):
        nonlocal total, count
        x = out.detach().double()
        x = x.movedim(1, -1) if x.dim() == 4 else x
        flat = x.reshape(-1, x.shape[-1])
        total, count = total + flat.sum(0), count + flat.shape[0]

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            if keep is None:
                with masks.all_kept():
                    for x, t in inputs:
                        model(x, t)
            else:
                masks.set_all(torch.cat([keep[f.name] for f in masks.units]))
                for x, t in inputs:
                    model(x, t)
    finally:
        handle.remove()
    return total / count


def circular_conv2(model):
    """Every resnet's conv2 pads circularly: each tap then reads every position once, so the kernel-sum fold keeps
    the output mean exactly (with zero padding only away from the border)."""
    for name, module in model.named_modules():
        if name.endswith(".conv2"):
            module.padding_mode = "circular"
    return model


@pytest.mark.parametrize("arch, kind, consumer_suffix, padding, exact", [
    ("multi_head", "attention_inner", "to_out.0", "zeros", True),  # linear: the mean is kept exactly
    # One head: the units are inner channels, and removing q/k channels changes the remaining channels' attention.
    ("tiny_1ch_16px", "attention_inner", "to_out.0", "zeros", False),
    ("tiny_1ch_16px", "resnet_hidden", "conv2", "zeros", False),  # convolution: closer, not exact (padded border)
    ("tiny_1ch_16px", "resnet_hidden", "conv2", "circular", True),  # no border: the kernel-sum fold is exact
    ("multi_head", "resnet_hidden", "conv2", "circular", True),
])
def test_the_consumers_mean_output_is_kept(arch, kind, consumer_suffix, padding, exact):
    model = build(arch)
    if padding == "circular":
        circular_conv2(model)
    units = find_units(model)
    masks = UnitMasks(model, units).attach()
    inputs = calibration(model)
    keep = keep_only(units, kind)
    consumers = sorted({s.module for f in units if f.kind == kind and bool((keep[f.name] == 0).any())
                        for s in f.slices if s.dim == "in" and s.module.endswith(consumer_suffix)})
    assert consumers
    dense = {c: output_mean(model, masks, c, inputs) for c in consumers}
    cut = {c: output_mean(model, masks, c, inputs, keep) for c in consumers}
    report = repair_removed_units(model, units, masks, keep, inputs)
    assert set(consumers) <= set(report.channels) and report.num_images == 12
    for c in consumers:
        repaired = output_mean(model, masks, c, inputs, keep)
        before, after = float((cut[c] - dense[c]).abs().max()), float((repaired - dense[c]).abs().max())
        assert before > 1e-3, f"{c}: removing the units did not move the mean; the test would not see a repair"
        if exact:
            assert after <= 1e-5 * max(1.0, float(dense[c].abs().max())), (c, before, after)
        else:
            assert after < 0.5 * before, (c, before, after)


@pytest.mark.parametrize("arch, layout", [
    ("multi_head", "stock"),
    ("tiny_1ch_16px", "stock"),
    ("tiny_1ch_16px", "per-layer"),
    ("scale_shift", "per-layer"),
])
def test_only_the_consumers_biases_change_and_the_export_stays_exact(arch, layout):
    model = build(arch)
    units = find_units(model)
    if layout == "stock":
        prepare_stock(model, units, STOCK_SPARSITY, refine_steps=0)
    masks = UnitMasks(model, units).attach()
    keep = {f.name: (torch.arange(f.num_units) % 2).float() for f in units}  # half of every family
    before = copy.deepcopy(model.state_dict())
    report = repair_removed_units(model, units, masks, keep, calibration(model))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{name}.bias" for name in report.channels} and changed
    # Every family of another kind with removed units is left alone and counted by its kind.
    expected = {}
    for f in units:
        if f.kind not in REPAIRABLE_KINDS:
            expected[f.kind] = expected.get(f.kind, 0) + 1
    assert report.skipped == expected and expected.get("stream", 0) > 0
    sample, t = random_inputs(model, batch=2, seed=99)
    masks.set_all(torch.cat([keep[f.name] for f in units]))
    with torch.no_grad():
        reference = model(sample, t).sample
    masks.detach()
    with torch.no_grad():
        out = export_model(model, units, keep, layout)(sample, t).sample
    assert float((out - reference).norm() / reference.norm()) < EXPORT_TOLERANCE
    # The EMA gets the same change.
    other = build(arch)
    if layout == "stock":
        prepare_stock(other, units, STOCK_SPARSITY, refine_steps=0)
    report.apply_to(other)
    for name in report.channels:
        assert torch.allclose(dict(other.named_modules())[name].bias, dict(model.named_modules())[name].bias)


def test_one_shot_damage_of_the_digits_teacher_goes_down():
    """The shipped (trained) digits teacher, one-shot magnitude pruning to 50% of its MACs: the DDPM loss on held-out
    test digits, other images than the calibration's, is lower with the repair than without."""
    from diffusers import DDPMScheduler, UNet2DModel

    from diffusers_gfprune import training
    from diffusers_gfprune.data import DigitsDataset
    from diffusers_gfprune.export import sparsity_for_macs
    from diffusers_gfprune.objective import DDPMLoss, stratified_timesteps
    from diffusers_gfprune.pruner import GradientFlowPruner, PrunerConfig

    model = UNet2DModel.from_pretrained(DIGITS_TEACHER, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(DIGITS_TEACHER, subfolder="scheduler")
    units = find_units(model)
    sparsity, _ = sparsity_for_macs(model, units, 0.5)
    pruner = GradientFlowPruner(model, units, PrunerConfig(target_sparsity=sparsity, process="one-shot"), "magnitude")
    pruner.step(0)
    keep = pruner.final_masks()
    calibration_losses = training.scoring_losses(DigitsDataset("train"), 0, 0, 32, 2, scheduler)
    test = DigitsDataset("test")
    g = torch.Generator().manual_seed(1234)
    images = torch.stack([test[int(i)]["images"] for i in torch.randperm(len(test), generator=g)[:64]])
    held_out = DDPMLoss(images, torch.randn(images.shape, generator=g), stratified_timesteps(64, 1000, g), scheduler)
    with torch.no_grad():
        with pruner.masks.all_kept():
            dense = float(held_out(model))
        removed = float(held_out(model))
        repair_removed_units(model, units, pruner.masks, keep, inputs_from_losses(calibration_losses))
        repaired = float(held_out(model))
    print(f"\ndigits teacher, one-shot magnitude to 50% MACs, held-out DDPM loss: dense {dense:.4f}, "
          f"removed {removed:.4f}, repaired {repaired:.4f}")
    assert dense < removed, "the removal did no damage; the test would not see a repair"
    assert repaired < removed, (dense, removed, repaired)


@pytest.mark.parametrize("case, match", [
    ("missing_family", "miss"),
    ("unknown_family", "do not have"),
    ("wrong_shape", "got a mask of shape"),
    ("not_binary", "not binary"),
    ("no_inputs", "calibration inputs"),
    ("not_a_pair", "not a pair"),
    ("wrong_channels", "the model takes"),
])
def test_bad_input_is_refused_before_any_forward_pass(case, match):
    model = build("tiny_1ch_16px")
    units = find_units(model)
    masks = UnitMasks(model, units).attach()
    keep = {f.name: torch.ones(f.num_units) for f in units}
    inputs = calibration(model, batches=1)
    first = units.names[0]
    if case == "missing_family":
        keep.pop(first)
    elif case == "unknown_family":
        keep["not.a.layer"] = torch.ones(2)
    elif case == "wrong_shape":
        keep[first] = torch.ones(units[first].num_units + 1)
    elif case == "not_binary":
        keep[first] = torch.full((units[first].num_units,), 0.5)
    elif case == "no_inputs":
        inputs = []
    elif case == "not_a_pair":
        inputs = [inputs[0][0]]
    else:
        inputs = [(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))]
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=match):
        repair_removed_units(model, units, masks, keep, inputs)
    handle.remove()
    assert not calls


# ---------------------------------------------------------------------- data-parallel calibration
DP_WORLD = 2
DP_ARCH = "multi_head"


def dp_setup():
    """The model, units, masks, selection and four calibration batches, alike in every process."""
    model = build(DP_ARCH)
    units = find_units(model)
    masks = UnitMasks(model, units).attach()
    keep = {f.name: (torch.arange(f.num_units) % 2).float() for f in units}
    return model, units, masks, keep, calibration(model, batches=4, batch=2)


def dp_deltas(batches):
    model, units, masks, keep, inputs = dp_setup()
    report = repair_removed_units(model, units, masks, keep, [inputs[i] for i in batches])
    return report


def _dp_rank(rank: int, world: int) -> dict:
    report = dp_deltas(range(rank, 4, world))  # this process's slice of the calibration batches
    return {**report.bias_deltas, "num_images": torch.tensor(report.num_images)}


def test_data_parallel_processes_fold_the_global_means(tmp_path):
    """Two gloo processes, each calibrating on half of the batches, fold what one process folds on all of them."""
    context = gloo.start(_dp_rank, DP_WORLD, tmp_path)
    try:
        whole, half = dp_deltas(range(4)), dp_deltas(range(0, 4, DP_WORLD))
    finally:
        ranks = gloo.finish(context, DP_WORLD, tmp_path)
    assert all(int(r.pop("num_images")) == whole.num_images == 8 for r in ranks)
    assert all(set(r) == set(whole.bias_deltas) for r in ranks) and whole.bias_deltas
    for name, expected in whole.bias_deltas.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # the processes agree bit for bit
        assert torch.allclose(ranks[0][name], expected, rtol=1e-5, atol=1e-7), name
    # One process's half alone folds something else: the comparison can fail.
    assert any(not torch.allclose(half.bias_deltas[n], e, rtol=1e-3, atol=1e-5) for n, e in whole.bias_deltas.items())


# ---------------------------------------------------------------------- through training/prune.py
def test_one_shot_run_repairs_and_reports_the_damage(tiny_teacher, tmp_path):
    import json

    from .conftest import load_script
    from .test_prune_script import GLOBAL_BATCH, run_args

    prune = load_script("prune")
    summaries = {}
    for repair in ("off", "on"):
        output_dir = tmp_path / repair
        prune.main(run_args(tiny_teacher["pipeline"], output_dir, GLOBAL_BATCH, "--process", "one-shot",
                            "--repair_at_removal", repair))
        summaries[repair] = json.loads((output_dir / "pruning_summary.json").read_text())
    off, on = summaries["off"]["removal"], summaries["on"]["removal"]
    assert off["loss_dense"] == on["loss_dense"] and off["loss_removed"] == on["loss_removed"]  # paired
    assert "loss_repaired" not in off and on["loss_repaired"] != on["loss_removed"]
    assert on["repair"]["consumers"] > 0 and on["repair"]["num_images"] > 0


def test_repair_refused_outside_one_shot(tiny_teacher, tmp_path):
    from .conftest import load_script
    from .test_prune_script import GLOBAL_BATCH, run_args

    output_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="one-shot"):
        load_script("prune").main(run_args(tiny_teacher["pipeline"], output_dir, GLOBAL_BATCH, "--repair_at_removal", "on"))
    assert not output_dir.exists()
