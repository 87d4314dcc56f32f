"""Repair at removal: the removed channels' mean goes into the consumer's bias, nothing else changes, the export
stays exact, and bad input is refused before any forward pass."""

import copy

import pytest
import torch

from diffusers_gfprune.export import export_model, prepare_stock
from diffusers_gfprune.masks import UnitMasks
from diffusers_gfprune.repair import repair_removed_units
from diffusers_gfprune.units import find_units

from .architectures import build, random_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
STOCK_SPARSITY = 0.5
EXPORT_TOLERANCE = 1e-4


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


@pytest.mark.parametrize("arch, kind, consumer_suffix, exact", [
    ("multi_head", "attention_inner", "to_out.0", True),  # linear: the mean is kept exactly
    # One head: the units are inner channels, and removing q/k channels changes the remaining channels' attention.
    ("tiny_1ch_16px", "attention_inner", "to_out.0", False),
    ("tiny_1ch_16px", "resnet_hidden", "conv2", False),  # convolution: closer, not exact (padded border)
])
def test_the_consumers_mean_output_is_kept(arch, kind, consumer_suffix, exact):
    model = build(arch)
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


@pytest.mark.parametrize("arch", ["multi_head", "tiny_1ch_16px"])
def test_only_the_consumers_biases_change_and_the_export_stays_exact(arch):
    model = build(arch)
    units = find_units(model)
    prepare_stock(model, units, STOCK_SPARSITY, refine_steps=0)
    masks = UnitMasks(model, units).attach()
    keep = {f.name: (torch.arange(f.num_units) % 2).float() for f in units}  # half of every family
    before = copy.deepcopy(model.state_dict())
    report = repair_removed_units(model, units, masks, keep, calibration(model))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{name}.bias" for name in report.channels} and changed
    assert report.skipped.get("stream", 0) > 0  # streams are left alone, and counted
    sample, t = random_inputs(model, batch=2, seed=99)
    masks.set_all(torch.cat([keep[f.name] for f in units]))
    with torch.no_grad():
        reference = model(sample, t).sample
    masks.detach()
    with torch.no_grad():
        out = export_model(model, units, keep, "stock")(sample, t).sample
    assert float((out - reference).norm() / reference.norm()) < EXPORT_TOLERANCE
    # The EMA gets the same change.
    other = build(arch)
    prepare_stock(other, units, STOCK_SPARSITY, refine_steps=0)
    report.apply_to(other)
    for name in report.channels:
        assert torch.allclose(dict(other.named_modules())[name].bias, dict(model.named_modules())[name].bias)


@pytest.mark.parametrize("case, match", [
    ("missing_family", "miss"),
    ("wrong_shape", "got a mask of shape"),
    ("no_inputs", "calibration inputs"),
])
def test_bad_input_is_refused_before_any_forward_pass(case, match):
    model = build("tiny_1ch_16px")
    units = find_units(model)
    masks = UnitMasks(model, units).attach()
    keep = {f.name: torch.ones(f.num_units) for f in units}
    inputs = calibration(model, batches=1)
    if case == "missing_family":
        keep.pop(units.names[0])
    elif case == "wrong_shape":
        keep[units.names[0]] = torch.ones(units[units.names[0]].num_units + 1)
    else:
        inputs = []
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=match):
        repair_removed_units(model, units, masks, keep, inputs)
    handle.remove()
    assert not calls


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
