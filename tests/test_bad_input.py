"""Bad input to the foundation gets a clear error that names the problem and the fix."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusers_gfprune.export import check_sparsity, export_model, prepare_stock, stock_keep_ratio, stock_sparsities
from diffusers_gfprune.masks import UnitMasks
from diffusers_gfprune.units import find_units

from .architectures import build


@pytest.fixture(scope="module")
def tiny():
    model = build("tiny_1ch_16px")
    return model, find_units(model)


def test_not_a_unet2dmodel():
    with pytest.raises(TypeError, match="Expected a diffusers UNet2DModel, got Linear"):
        find_units(torch.nn.Linear(3, 3))
    conditional = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(TypeError, match="UNet2DModel"):
        find_units(conditional)


def test_masks_that_do_not_match_the_units(tiny):
    model, units = tiny
    masks = UnitMasks(model, units)
    state = masks.state_dict()
    name = units.names[0]
    with pytest.raises(ValueError, match="does not match the units"):
        masks.load_state_dict({k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match=f"Family '{name}' has"):
        masks.load_state_dict({**state, name: torch.ones(state[name].numel() + 1)})
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        masks.load_state_dict({**state, name: torch.full_like(state[name], 2.0)})
    other = build("no_attention")
    with pytest.raises(ValueError, match="do not match the units"):
        export_model(model, units, UnitMasks(other, find_units(other)).state_dict(), "per-layer")
    with pytest.raises(ValueError, match="not binary"):
        export_model(model, units, {k: torch.full_like(v, 0.5) for k, v in state.items()}, "per-layer")
    with pytest.raises(ValueError, match="would lose every unit"):
        export_model(model, units, {**state, name: torch.zeros_like(state[name])}, "per-layer")


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "half"])
def test_sparsity_outside_range(sparsity):
    with pytest.raises(ValueError, match=r"Sparsity must be a number in \[0, 1\)"):
        check_sparsity(sparsity)


def test_stock_request_that_cannot_be_met(tiny):
    model, units = tiny
    # The tiny model has 8 GroupNorm groups per level: the stock layout moves in steps of 1/8.
    assert stock_sparsities(units)[:3] == [0.0, 0.125, 0.25]
    with pytest.raises(ValueError, match=r"cannot prune 0.3 .*multiples of 1/8.*0.25, 0.375.*per-layer"):
        stock_keep_ratio(units, 0.3)
    # Masks with different ratios per family cannot be a stock config.
    masks = UnitMasks(model, units).state_dict()
    first, second = units.names[2], units.names[3]
    masks[first][:2] = 0
    masks[second][:4] = 0
    with pytest.raises(ValueError, match="same keep ratio in every unit family"):
        export_model(model, units, masks, "stock")


def test_stock_export_needs_the_time_reembedding(tiny):
    model, units = tiny
    masks = {f.name: torch.ones(f.num_units) for f in units}
    for f in units:
        masks[f.name][: f.num_units // 2] = 0
    with pytest.raises(ValueError, match="prepare_stock"):
        export_model(model, units, masks, "stock")


def test_unknown_layout(tiny):
    model, units = tiny
    with pytest.raises(ValueError, match="Unknown layout 'slim'"):
        export_model(model, units, UnitMasks(model, units), "slim")


def test_time_reembedding_is_reported(tiny):
    import copy

    model, units = tiny
    model = copy.deepcopy(model)
    report = prepare_stock(model, units, 0.5)
    assert (report.old_num_channels, report.new_num_channels) == (32, 16)
    assert model.time_proj.num_channels == 16 and model.time_embedding.linear_1.in_features == 16
    assert 0 <= report.embedding_relative_error < 1
