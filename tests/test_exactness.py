"""The exported model computes what the hard-masked dense model computes, for every layout."""

import copy

import pytest
import torch

from diffusers_gfprune.export import export_model, prepare_stock
from diffusers_gfprune.masks import UnitMasks
from diffusers_gfprune.selection import masks_from_pruned, select
from diffusers_gfprune.units import find_units

from .architectures import ARCHITECTURES, build, random_inputs

SPARSITIES = (0.25, 0.5, 0.75)
LAYOUTS = ("stock", "per-layer")
TOLERANCE = 1e-4
RESULTS = {}  # (arch, layout, sparsity) -> relative error, printed at the end of the module


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def dense(request):
    model = build(request.param)
    return request.param, model, find_units(model)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_exported_equals_masked(dense, layout):
    name, model, units = dense
    model = copy.deepcopy(model)
    sample, timestep = random_inputs(model, batch=2, seed=1)
    for i, sparsity in enumerate(SPARSITIES):
        dense_model = copy.deepcopy(model)
        if layout == "stock":
            prepare_stock(dense_model, units, sparsity)
        masks = UnitMasks(dense_model, units)
        generator = torch.Generator().manual_seed(100 + i)
        scores = {f.name: torch.rand(f.num_units, generator=generator) for f in units}
        selection = "local" if layout == "stock" else "global"
        masks.load_state_dict(masks_from_pruned(select(scores, units, sparsity, selection)))
        with torch.no_grad(), masks.applied():
            reference = dense_model(sample, timestep).sample
        pruned = export_model(dense_model, units, masks, layout)
        with torch.no_grad():
            out = pruned(sample, timestep).sample
        error = relative_error(out, reference)
        RESULTS[(name, layout, sparsity)] = error
        assert out.shape == reference.shape
        assert error < TOLERANCE, f"{name} {layout} sparsity {sparsity}: relative error {error:.2e}"
        # The pruned model is really smaller, and the masks really removed something.
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in dense_model.parameters())
        with torch.no_grad():
            unmasked = dense_model(sample, timestep).sample
        assert relative_error(unmasked, reference) > 1e-3


def test_masks_are_removable_and_round_trip():
    model = build("tiny_1ch_16px")
    units = find_units(model)
    sample, timestep = random_inputs(model)
    with torch.no_grad():
        before = model(sample, timestep).sample
    masks = UnitMasks(model, units)
    generator = torch.Generator().manual_seed(0)
    values = {f.name: torch.rand(f.num_units, generator=generator) for f in units}
    masks.load_state_dict(values)
    with torch.no_grad(), masks.applied():
        soft = model(sample, timestep).sample
    with torch.no_grad():
        after = model(sample, timestep).sample
    assert torch.equal(before, after)
    assert relative_error(soft, before) > 1e-3
    state = masks.state_dict()
    assert set(state) == set(units.names)
    other = UnitMasks(model, units)
    other.load_state_dict(state)
    assert torch.equal(other.values, masks.values)


def test_soft_masks_are_differentiable():
    model = build("tiny_1ch_16px")
    units = find_units(model)
    masks = UnitMasks(model, units)
    masks.values.fill_(0.5)
    masks.values.requires_grad_(True)
    sample, timestep = random_inputs(model)
    with masks.applied():
        model(sample, timestep).sample.square().mean().backward()
    assert masks.values.grad is not None and masks.values.grad.abs().sum() > 0


def teardown_module(module):
    if RESULTS:
        print("\nexactness: architecture x layout x sparsity -> relative error")
        for (name, layout, sparsity), error in sorted(RESULTS.items()):
            print(f"  {name:20s} {layout:9s} {sparsity:.2f}  {error:.2e}")
