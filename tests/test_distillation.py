"""diffusers_gfprune.distillation: the term, the channel mapping of block features, and bad configs."""

import copy
import math

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_gfprune.distillation import (
    DistillationConfig,
    Distiller,
    FeatureMap,
    block_output_producer,
    capture_outputs,
    resolve_feature_layers,
)
from diffusers_gfprune.export import export_model
from diffusers_gfprune.masks import UnitMasks
from diffusers_gfprune.objective import make_loss
from diffusers_gfprune.units import find_units

from .architectures import build

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)

ALL_LAYERS = ("all",)




@pytest.fixture(scope="module")
def tiny():
    model = build("tiny_1ch_16px")
    return model, find_units(model)


def ddpm_loss(model, seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((batch, model.config.in_channels, 16, 16), generator=g) * 2 - 1
    return make_loss(images, DDPMScheduler(num_train_timesteps=1000), g)


def test_block_producers_are_the_layers_writing_the_block_outputs(tiny):
    model, _ = tiny
    producers = {b: block_output_producer(model, b) for b in resolve_feature_layers(model, ALL_LAYERS)}
    assert producers == {
        "down_blocks.0": "down_blocks.0.downsamplers.0.conv",
        "down_blocks.1": "down_blocks.1.resnets.1.conv2",  # the attention after it adds into the same channels
        "mid_block": "mid_block.resnets.1.conv2",
        "up_blocks.0": "up_blocks.0.upsamplers.0.conv",
        "up_blocks.1": "up_blocks.1.resnets.2.conv2",
    }


def test_term_is_zero_for_the_same_network_with_all_masks_one(tiny):
    model, units = tiny
    student = copy.deepcopy(model).train()
    masks = UnitMasks(student, units).attach()
    config = DistillationConfig(output_weight=1.0, feature_weight=1.0, feature_layers=ALL_LAYERS)
    distiller = Distiller(copy.deepcopy(model), config, max_train_steps=10)
    feature_map = FeatureMap.for_masked(model, units, masks, distiller.blocks)
    loss = ddpm_loss(model)
    total, parts = distiller(loss, student, step=0, feature_map=feature_map)
    assert float(parts["output"]) == 0.0 and float(parts["feature"]) == 0.0
    assert torch.equal(total, parts["ddpm"]) and torch.equal(parts["ddpm"], loss(student))
    # The teacher takes no gradient and stays in eval mode; the student gets gradients from the whole loss.
    total.backward()
    assert not distiller.teacher.training and all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_term_is_positive_and_weighted_when_the_student_differs(tiny):
    model, units = tiny
    student = build("tiny_1ch_16px", seed=1).train()
    masks = UnitMasks(student, units).attach()
    loss = ddpm_loss(model)
    values = {}
    for weight in (1.0, 3.0):
        distiller = Distiller(model, DistillationConfig(output_weight=weight, feature_weight=weight, feature_layers=ALL_LAYERS), 10)
        total, parts = distiller(loss, student, 0, FeatureMap.for_masked(model, units, masks, distiller.blocks))
        assert parts["output"] > 0 and parts["feature"] > 0
        values[weight] = (float(total.detach()), float(parts["ddpm"]), float(parts["output"] + parts["feature"]))
    extra = {w: total - ddpm for w, (total, ddpm, _) in values.items()}
    assert math.isclose(extra[3.0], 3 * extra[1.0], rel_tol=1e-5)
    assert math.isclose(extra[1.0], values[1.0][2], rel_tol=1e-5)


def _channel_family(units, module):
    return next(f for f in units for s in f.slices if s.module == module and s.dim == "out")


def test_feature_map_picks_the_kept_channels_hand_built(tiny):
    """Remove units 0 and 2 of the stream family that down_blocks.0 writes: 32 channels in 8 GroupNorm groups of 4,
    so channels 0-3 and 8-11 go; the exported student's down_blocks.0 output is the teacher's at the other 24."""
    model, units = tiny
    family = _channel_family(units, "down_blocks.0.downsamplers.0.conv")
    assert (family.num_channels, family.unit_size) == (32, 4)
    masks = {f.name: torch.ones(f.num_units) for f in units}
    masks[family.name][torch.tensor([0, 2])] = 0
    feature_map = FeatureMap.for_exported(model, units, masks, ["down_blocks.0"])
    expected = [4, 5, 6, 7] + list(range(12, 32))
    assert feature_map.kept_channels("down_blocks.0", 32).tolist() == expected
    teacher_feature = torch.arange(2 * 32 * 2 * 2, dtype=torch.float32).view(2, 32, 2, 2)
    assert torch.equal(feature_map.target("down_blocks.0", teacher_feature), teacher_feature[:, expected])
    # The pruning stage's target of the same masks: the teacher's channels times their mask values.
    live = UnitMasks(model, units)
    live.load_state_dict(masks)
    masked = FeatureMap.for_masked(model, units, live, ["down_blocks.0"]).target("down_blocks.0", teacher_feature)
    keep = torch.zeros(32)
    keep[expected] = 1
    assert torch.equal(masked, teacher_feature * keep.view(1, -1, 1, 1))


@pytest.mark.parametrize("layout", ["per-layer", "stock"])
def test_feature_map_matches_the_exported_model_at_every_block(layout):
    """Binary masks: the slim model's block outputs are the masked dense model's at the mapped channels, and the
    feature term has the same value before and after the export (no jump at the export)."""
    model = build("tiny_1ch_16px", seed=2)
    units = find_units(model)
    g = torch.Generator().manual_seed(0)
    masks = {}
    for f in units:  # stock: the same count per family; per-layer: any
        keep = f.num_units // 2 if layout == "stock" else int(torch.randint(1, f.num_units, (1,), generator=g))
        values = torch.zeros(f.num_units)
        values[torch.randperm(f.num_units, generator=g)[:keep]] = 1
        masks[f.name] = values
    if layout == "stock":
        from diffusers_gfprune.export import prepare_stock

        prepare_stock(model, units, 0.5, refine_steps=0)
    live = UnitMasks(model, units)
    live.load_state_dict(masks)
    slim = export_model(model, units, masks, layout).eval()
    blocks = resolve_feature_layers(model, ALL_LAYERS)
    loss = ddpm_loss(model)
    with torch.no_grad(), capture_outputs(model, blocks) as dense, live.applied():
        model(loss.noisy(), loss.timesteps)
    with torch.no_grad(), capture_outputs(slim, blocks) as small:
        slim(loss.noisy(), loss.timesteps)
    exported = FeatureMap.for_exported(model, units, masks, blocks)
    for block in blocks:
        kept = exported.kept_channels(block, dense[block].shape[1])
        assert small[block].shape[1] == kept.numel() < dense[block].shape[1]
        torch.testing.assert_close(small[block], dense[block][:, kept], rtol=1e-4, atol=1e-5)
    teacher = build("tiny_1ch_16px", seed=3)  # any teacher with the dense widths
    config = DistillationConfig(feature_weight=1.0, feature_layers=ALL_LAYERS)
    before = Distiller(teacher, config, 10)(loss, _Masked(model, live), 0, FeatureMap.for_masked(teacher, units, live, blocks))[1]
    after = Distiller(teacher, config, 10)(loss, slim, 0, exported)[1]
    torch.testing.assert_close(before["feature"], after["feature"], rtol=1e-4, atol=1e-6)


class _Masked(torch.nn.Module):
    """The dense model with its masks applied for every call."""

    def __init__(self, model, masks):
        super().__init__()
        self.module, self.masks = model, masks

    def forward(self, *args):
        with self.masks.applied():
            return self.module(*args)


def test_schedules():
    for schedule, expected in (("constant", [1, 1, 1]), ("linear_decay", [1, 0.5, 0]), ("cosine_decay", [1, 0.5, 0])):
        config = DistillationConfig(output_weight=1.0, schedule=schedule)
        assert [config.factor(s, 11) for s in (0, 5, 10)] == pytest.approx(expected), schedule


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"output_weight": -1.0}, r"output_weight must be a finite number >= 0"),
        ({"feature_weight": float("nan"), "feature_layers": ("mid_block",)}, r"feature_weight must be a finite number >= 0"),
        ({"output_weight": 1.0, "schedule": "step"}, r"Unknown distillation schedule 'step'"),
        ({"feature_weight": 0.1}, r"needs the blocks to match"),
        ({"output_weight": 1.0, "feature_layers": ("mid_block",)}, r"feature weight of 0"),
        ({"feature_weight": 0.1, "feature_layers": ("conv_in",)}, r"supported at block outputs only.*'conv_in'"),
    ],
    ids=["negative_weight", "nan_feature_weight", "unknown_schedule", "feature_weight_without_layers",
         "layers_without_weight", "unsupported_layer"],
)
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationConfig(**kwargs)


def test_block_that_the_model_does_not_have_is_refused(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"'down_blocks.5' is not a block of this model"):
        resolve_feature_layers(model, ["down_blocks.5"])
    with pytest.raises(ValueError, match=r"every weight at 0"):
        Distiller(model, DistillationConfig(), 10)
