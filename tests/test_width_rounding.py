"""Width rounding: kept widths are multiples of ``round_to`` and export stays exact."""

import copy
import math

import pytest
import torch
from torch import nn

from diffusers_gfprune.export import export_model, prepare_stock, sparsity_for_macs, stock_config, stock_keep_ratio, stock_sparsities
from diffusers_gfprune.masks import UnitMasks
from diffusers_gfprune.selection import masks_from_pruned, round_widths, rounded_width, select
from diffusers_gfprune.units import find_units

from .architectures import build, random_inputs

TOLERANCE = 1e-4


_BUILT = {}


def built(name):
    """The architecture and its units, traced once per module (the tests never modify the model)."""
    if name not in _BUILT:
        model = build(name)
        _BUILT[name] = (model, find_units(model))
    return _BUILT[name]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def random_scores(units, seed):
    generator = torch.Generator().manual_seed(seed)
    return {f.name: torch.rand(f.num_units, generator=generator) for f in units}


def kept_widths(pruned, units):
    return {f.name: (f.num_units - int(pruned[f.name].sum())) * f.unit_size for f in units}


@pytest.mark.parametrize(
    "num_channels, unit_size, kept, round_to, expected",
    [
        (128, 1, 61, 8, 64),     # nearest multiple
        (128, 1, 60, 8, 64),     # tie: the wider one
        (128, 1, 3, 8, 8),       # never below one multiple
        (128, 1, 127, 32, 128),  # never above the dense width
        (128, 4, 44, 6, 48),     # GroupNorm groups of 4: multiples of lcm(6, 4) = 12
        (20, 1, 13, 32, 20),     # narrower than one multiple: dense width
        (100, 1, 99, 32, 100),   # the dense width is allowed even when it is not a multiple
        (128, 4, 44, 1, 44),     # round_to=1: unchanged
    ],
)
def test_rounded_width(num_channels, unit_size, kept, round_to, expected):
    assert rounded_width(num_channels, unit_size, kept, round_to) == expected


@pytest.mark.parametrize("round_to", [0, -8, 2.5, True])
def test_bad_round_to(round_to):
    model, units = built("tiny_1ch_16px")
    with pytest.raises(ValueError, match="round_to"):
        select(random_scores(units, 0), units, 0.5, "global", round_to=round_to)


@pytest.mark.parametrize("name", ["cifar10", "multi_head", "norm_groups_8", "scale_shift"])
@pytest.mark.parametrize("round_to", [8, 16])
def test_per_layer_rounded_export_is_exact(name, round_to):
    model, units = built(name)
    sample, timestep = random_inputs(model, batch=2, seed=1)
    scores = random_scores(units, 7)
    unrounded = select(scores, units, 0.5, "global")
    pruned = select(scores, units, 0.5, "global", round_to=round_to)
    widths = kept_widths(pruned, units)
    before = kept_widths(unrounded, units)
    for family in units:
        step = math.lcm(round_to, family.unit_size)
        width = widths[family.name]
        assert width == family.num_channels or (width % step == 0 and width >= step), (family.name, width)
        assert width <= family.num_channels
        # Rounding moves a width to a nearest allowed one: by at most half a step, unless it was
        # below one step (raised to it) or above the last multiple (the dense width).
        assert abs(width - before[family.name]) <= step / 2 or width in (step, family.num_channels)
    assert any(w != before[n] for n, w in widths.items()), "rounding changed nothing: the test does not test it"

    masks = UnitMasks(model, units)
    masks.load_state_dict(masks_from_pruned(pruned))
    with torch.no_grad(), masks.applied():
        reference = model(sample, timestep).sample
    exported = export_model(model, units, masks, "per-layer")
    with torch.no_grad():
        out = exported(sample, timestep).sample
    assert relative_error(out, reference) < TOLERANCE
    # Every layer of the exported model has widths that are multiples (image channels aside).
    image_channels = {model.config.in_channels, model.config.out_channels}
    for layer_name, module in exported.named_modules():
        if isinstance(module, nn.Conv2d):
            sizes = [module.in_channels if layer_name != "conv_in" else None,
                     module.out_channels if layer_name != "conv_out" else None]
        elif isinstance(module, nn.Linear):
            sizes = [module.in_features, module.out_features]
        else:
            continue
        for size in sizes:
            if size is not None and size not in image_channels:
                assert size % round_to == 0, (layer_name, size)


def test_rounding_uses_scores():
    model, units = built("cifar10")
    scores = random_scores(units, 3)
    pruned = select(scores, units, 0.5, "global")
    rounded = round_widths(pruned, units, 16, scores)
    for family in units:
        came_back = pruned[family.name] & ~rounded[family.name]
        went = ~pruned[family.name] & rounded[family.name]
        assert not (came_back.any() and went.any())
        s = scores[family.name]
        if came_back.any():  # the best of the pruned units came back
            still_pruned = rounded[family.name]
            if still_pruned.any():
                assert s[came_back].min() >= s[still_pruned].max()
        if went.any():  # the worst of the kept units went
            kept = ~rounded[family.name]
            assert s[went].max() <= s[kept].min()


def test_round_to_one_is_identity():
    model, units = built("cifar10")
    scores = random_scores(units, 5)
    plain = select(scores, units, 0.4, "global")
    same = select(scores, units, 0.4, "global", round_to=1)
    assert all(torch.equal(plain[k], same[k]) for k in plain)


@pytest.mark.parametrize("round_to", [8, 32])
def test_stock_grid_with_rounding(round_to):
    model, units = built("cifar10")
    grid = stock_sparsities(units, round_to)
    assert 0.0 in grid and len(grid) < len(stock_sparsities(units))
    for sparsity in grid[1:]:
        config = stock_config(model, stock_keep_ratio(units, sparsity))
        assert all(c % round_to == 0 for c in config["block_out_channels"])
    sparsity, fraction = sparsity_for_macs(model, units, 0.5, round_to=round_to)
    assert sparsity in grid and 0 < fraction < 1
    dense = copy.deepcopy(model)
    prepare_stock(dense, units, sparsity)
    masks = UnitMasks(dense, units)
    masks.load_state_dict(masks_from_pruned(select(random_scores(units, 1), units, sparsity, "local", round_to=round_to)))
    exported = export_model(dense, units, masks, "stock")
    assert all(c % round_to == 0 for c in exported.config.block_out_channels)
    sample, timestep = random_inputs(model, batch=2, seed=2)
    with torch.no_grad(), masks.applied():
        reference = dense(sample, timestep).sample
    with torch.no_grad():
        out = exported(sample, timestep).sample
    assert relative_error(out, reference) < TOLERANCE
