"""Data-parallel scoring: two gloo processes, each on half of the global batch, score as one process.

Two CPU workers are spawned once for the module. Each builds the same float64 tiny model and the same
global :class:`DDPMLoss`, takes its half with ``split(2, rank)``, puts the same soft masks on, scores
every data-driven criterion and runs a short :class:`GradientFlowPruner`; the parent computes the
same in a single process on the whole batch and compares.

Tolerance: the models are float64. :class:`DDPMLoss` takes the MSE in float32, but the global batch
(4 images) and the halves (2) are powers of two, so the float32 loss gradient of a half is exactly
twice the corresponding slice of the full-batch one and averaging over the two processes undoes the
factor exactly. What remains is float64 rounding: weight gradients summed over 2 + 2 samples and
then across processes instead of over 4 samples at once (relative ~1e-16 per entry), grown by
cancellation in the sums that make a unit score and, for the finite-difference HVP, by the
difference quotient. The observed differences are below 1e-10 (printed with ``-s``); ``rtol=1e-6``
leaves a wide margin and is still far below the gap between the full batch and one half of it
(checked, so that the comparison can fail). A unit score can cancel to almost 0, so the absolute
tolerance is ``1e-9`` times the family's largest score. The two ranks must agree bit for bit: after
the all-reduce they hold the same gradients.
"""

import time

import pytest
import torch
from diffusers import DDPMScheduler
from scipy.stats import spearmanr

from diffusers_gfprune.criteria import get_criterion
from diffusers_gfprune.masks import UnitMasks
from diffusers_gfprune.objective import make_loss
from diffusers_gfprune.pruner import GradientFlowPruner, PrunerConfig
from diffusers_gfprune.units import find_units

from . import gloo
from .architectures import build

WORLD_SIZE = 2
GLOBAL_BATCH = 4
ARCH = "tiny_1ch_16px"
RTOL = 1e-6
ATOL_FRACTION = 1e-9  # of the family's largest |score|
TIMEOUT_S = 300  # the whole two-process run; gloo collectives time out sooner (below)

CRITERIA = {
    "gradient_flow_exact": ("gradient_flow", dict(hvp="exact")),
    "gradient_flow_finite_difference": ("gradient_flow", dict(hvp="finite_difference")),
    "gradient_flow_preserve": ("gradient_flow", dict(form="preserve")),
    "gradient_flow_loss_change": ("gradient_flow", dict(form="loss_change")),
    "gradient_flow_mask_flow": ("gradient_flow", dict(form="mask_flow")),
    "taylor": ("taylor", {}),
    "diff_pruning": ("diff_pruning", dict(num_timesteps=4)),
    # Losses on this batch: 1.08, 0.94, 0.92, 0.92 at t = 0, 333, 666, 999; thr=0.9 stops at t=333,
    # a decision the processes must take alike (on the all-reduced loss).
    "diff_pruning_early_stop": ("diff_pruning", dict(num_timesteps=4, thr=0.9)),
}
PRUNER_CRITERIA = ("gradient_flow", "taylor")
PRUNER_CONFIG = dict(target_sparsity=0.5, soft_steps=4, pruning_steps=6, rescore_every=2)
MAX_RELATIVE = {}  # case -> max relative difference, printed at the end of the module


# ---------------------------------------------------------------------- shared by parent and workers
def global_loss(seed: int = 0):
    """The same global mini-batch in every process (float64 images and noise)."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(GLOBAL_BATCH, 1, 16, 16, generator=g) * 2 - 1).double()
    loss = make_loss(images, scheduler, g)
    loss.noise = loss.noise.double()
    return loss


def soft_masks(model, units) -> UnitMasks:
    """All units at 0.7, and one unit at 0 in every family with at least 4 units."""
    masks = UnitMasks(model, units).attach()
    for family in units:
        values = torch.full((family.num_units,), 0.7)
        if family.num_units >= 4:
            values[1 + family.num_units // 2] = 0.0
        masks.set_family(family.name, values)
    return masks


def part(loss, rank: int, world: int):
    return loss if world == 1 else loss.split(world, rank)


def compute(rank: int = 0, world: int = 1):
    """Every score of this test, as flat ``{key: tensor}``, on this process's part of the batch."""
    out = {}
    model = build(ARCH).double()
    units = find_units(model)
    masks = soft_masks(model, units)
    loss = part(global_loss(), rank, world)
    for case, (name, kwargs) in CRITERIA.items():
        scores = get_criterion(name, **kwargs).score(model, units, [loss], masks=masks)
        out.update({f"{case}/{k}": v for k, v in scores.items()})
    for name in PRUNER_CRITERIA:
        model = build(ARCH).double()
        units = find_units(model)
        pruner = GradientFlowPruner(model, units, PrunerConfig(**PRUNER_CONFIG), name)
        for step in range(pruner.config.pruning_steps + 1):
            pruner.step(step, lambda: [part(global_loss(seed=1000 + step), rank, world)])
        out.update({f"pruner_{name}/mask/{k}": v for k, v in pruner.final_masks().items()})
        out.update({f"pruner_{name}/score/{k}": v for k, v in pruner.scores.items()})
    return {k: v.detach().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------- fixtures
class _threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """(rank 0, rank 1, single process on the whole batch, single process on half of it)."""
    directory = tmp_path_factory.mktemp("distributed")
    start = time.perf_counter()
    context = gloo.start(compute, WORLD_SIZE, directory)
    try:
        with _threads(1):  # the workers import meanwhile
            single = compute()
            model = build(ARCH).double()
            units = find_units(model)
            masks = soft_masks(model, units)
            half = {
                case: get_criterion(name, **kwargs).score(model, units, [global_loss().split(WORLD_SIZE, 0)], masks=masks)
                for case, (name, kwargs) in CRITERIA.items()
            }
    finally:
        ranks = gloo.finish(context, WORLD_SIZE, directory, TIMEOUT_S)
    print(f"\n{WORLD_SIZE}-process run + single-process reference: {time.perf_counter() - start:.1f} s")
    return ranks, single, half


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if MAX_RELATIVE:
        print("\nmax relative difference, 2 processes vs 1 process (full batch):")
        for case, value in MAX_RELATIVE.items():
            print(f"  {case:34s} {value:.2e}")


# ---------------------------------------------------------------------- tests
def _keys(results, prefix):
    ranks, single, _ = results
    keys = sorted(k for k in single if k.startswith(prefix + "/"))
    assert keys and all(sorted(k for k in r if k.startswith(prefix + "/")) == keys for r in ranks)
    return keys


def test_ranks_agree_exactly(results):
    ranks, single, _ = results
    assert set(ranks[0]) == set(ranks[1]) == set(single)
    for key in single:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"rank 0 and rank 1 differ on {key}"


@pytest.mark.parametrize("case", sorted(CRITERIA))
def test_two_processes_score_like_one(results, case):
    ranks, single, half = results
    worst = 0.0
    flat_dist, flat_single = [], []
    for key in _keys(results, case):
        got, want = ranks[0][key], single[key]
        assert got.dtype == want.dtype == torch.float64 and got.shape == want.shape
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL_FRACTION * scale, msg=lambda m: f"{key}: {m}")
        worst = max(worst, float(((got - want).abs() / want.abs().clamp_min(ATOL_FRACTION * scale)).max()))
        flat_dist.append(got)
        flat_single.append(want)
    MAX_RELATIVE[case] = worst
    flat_dist, flat_single = torch.cat(flat_dist), torch.cat(flat_single)
    assert spearmanr(flat_dist, flat_single).statistic == pytest.approx(1.0, abs=1e-12)
    # The comparison can fail: half of the batch alone scores measurably differently.
    flat_half = torch.cat([half[case][k.split("/", 1)[1]] for k in _keys(results, case)])
    gap = float(((flat_half - flat_single).abs() / flat_single.abs().max()).max())
    assert gap > 1e3 * max(worst, RTOL), f"half batch vs full batch differ by only {gap:.1e}"


def test_diff_pruning_early_stop_is_exercised(results):
    _, single, _ = results
    keys = _keys(results, "diff_pruning")
    stopped = torch.cat([single[k.replace("diff_pruning/", "diff_pruning_early_stop/", 1)] for k in keys])
    full = torch.cat([single[k] for k in keys])
    assert not torch.allclose(stopped, full, rtol=1e-3)


@pytest.mark.parametrize("name", PRUNER_CRITERIA)
def test_pruner_final_masks_match_one_process(results, name):
    ranks, single, _ = results
    mask_keys = _keys(results, f"pruner_{name}/mask")
    for key in mask_keys:
        assert torch.equal(ranks[0][key], single[key]), f"final masks differ on {key}"
    removed = sum(int((single[k] == 0).sum()) for k in mask_keys)
    assert removed > 0
    worst = 0.0
    for key in _keys(results, f"pruner_{name}/score"):
        got, want = ranks[0][key], single[key]
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL_FRACTION * scale, msg=lambda m: f"{key}: {m}")
        worst = max(worst, float(((got - want).abs() / want.abs().clamp_min(ATOL_FRACTION * scale)).max()))
    MAX_RELATIVE[f"pruner {name} (smoothed scores)"] = worst
