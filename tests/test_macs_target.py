"""A MACs target is met in both layouts: the per-layer selection counts MACs itself, the stock grid is exact.

The MACs of a selection (``UnitMacs``) must equal what ``count_macs`` measures on the exported model, and the
exported model must land on the target: per-layer at most the target and within 2% of the dense MACs below it,
stock at the nearest point of its grid. A target below what the per-layer floors allow is refused before work.
"""

import copy

import pytest
import torch

from diffusers_gfprune.counting import count_macs
from diffusers_gfprune.export import export_model, prepare_stock, sparsity_for_macs
from diffusers_gfprune.selection import check_macs_target, masks_from_pruned, select
from diffusers_gfprune.units import find_units

from .architectures import build

ARCHS = ("tiny_1ch_16px", "norm_groups_8")
RESULTS = {}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\nMACs target -> exported fraction of the dense MACs:")
    for key, value in RESULTS.items():
        print(f"  {key}: {value}")


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("layout", ["stock", "per-layer"])
@pytest.mark.parametrize("arch", ARCHS)
def test_macs_target_is_met(arch, layout, target):
    dense = build(arch)
    units = find_units(dense)
    dense_macs = count_macs(dense)
    sparsity, grid_fraction = sparsity_for_macs(dense, units, target)
    g = torch.Generator().manual_seed(0)
    scores = {f.name: torch.rand(f.num_units, generator=g) for f in units}
    model = copy.deepcopy(dense)
    if layout == "stock":
        prepare_stock(model, units, sparsity, refine_steps=0)
        pruned = select(scores, units, sparsity, "local")
    else:
        pruned = select(scores, units, sparsity, "global", target_macs=target, final_sparsity=sparsity)
        assert units.unit_macs().macs(pruned) == pytest.approx(count_macs(export_model(model, units, masks_from_pruned(pruned), layout)), rel=1e-9)
    exported = export_model(model, units, masks_from_pruned(pruned), layout)
    achieved = count_macs(exported) / dense_macs
    RESULTS[(arch, layout, target)] = f"{achieved:.4f}"
    if layout == "per-layer":
        assert target - 0.02 <= achieved <= target, achieved
    else:
        assert achieved == pytest.approx(grid_fraction, abs=2e-3)
        assert abs(achieved - target) <= 0.08, achieved  # the nearest point of the stock grid


def test_the_selection_follows_the_schedule_to_the_target():
    dense = build("tiny_1ch_16px")
    units = find_units(dense)
    sparsity, _ = sparsity_for_macs(dense, units, 0.5)
    scores = {f.name: torch.rand(f.num_units, generator=torch.Generator().manual_seed(1)) for f in units}
    fractions = [units.unit_macs().fraction(select(scores, units, s * sparsity, "global", target_macs=0.5,
                                                   final_sparsity=sparsity)) for s in (0.0, 0.25, 0.5, 1.0)]
    assert fractions[0] == 1.0
    assert all(a > b for a, b in zip(fractions, fractions[1:])), fractions
    assert fractions[-1] <= 0.5


def test_unreachable_macs_target_is_refused():
    dense = build("tiny_1ch_16px")
    units = find_units(dense)
    floor = check_macs_target(units, 0.5, min_keep_fraction=0.1)
    assert 0 < floor < 0.5
    with pytest.raises(ValueError, match=r"--target_macs 0.001 cannot be reached .*smallest model has .* --min_keep_fraction"):
        check_macs_target(units, 0.001, min_keep_fraction=0.1)
    with pytest.raises(ValueError, match="Cannot reach"):
        select({f.name: torch.zeros(f.num_units) for f in units}, units, 0.5, "global", target_macs=0.001, final_sparsity=0.5)
