"""Device, dtype and precision placement: the bugs a GPU run meets that a CPU-only run cannot see, caught on the CPU.

Users prune on GPUs, in bf16 or fp16, often on several. Three stand-ins make the same classes of bug visible here:

* the ``meta`` device: a model moved there after the pruner was made is a model that ``accelerate.prepare`` moved to
  a GPU. Any tensor the pruner left on the host then meets a tensor on another device and the operation fails, and
  nothing on ``meta`` can be read back, so a forward pass or a collective that waits for the device fails too;
* a second dtype (float64, bfloat16) and accelerate's own autocast wrapper (the same code path as
  ``Accelerator(mixed_precision=...).prepare``);
* collectives recorded instead of run: every tensor handed to ``all_reduce`` must live on the model's device (NCCL
  refuses host tensors; gloo, which the multi-process tests use, accepts them and so hides the bug).
"""

import os
import traceback
from datetime import timedelta
from types import MethodType

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from diffusers import DDPMScheduler

from diffusers_gfprune import distributed, training
from diffusers_gfprune.criteria import get_criterion
from diffusers_gfprune.masks import UnitMasks
from diffusers_gfprune.objective import DDPMLoss, make_loss, stratified_timesteps
from diffusers_gfprune.precision import full_precision, plain_copy
from diffusers_gfprune.pruner import GradientFlowPruner, PrunerConfig
from diffusers_gfprune.units import find_units

from .architectures import build, random_inputs

# Families of every kind: attention (single and multi-head), GroupNorm groups, skip concatenations, scale_shift.
ARCHS = ("tiny_1ch_16px", "multi_head", "norm_groups_8", "scale_shift")
HARD = PrunerConfig(target_sparsity=0.5, soft_steps=2, pruning_steps=8, rescore_every=2)


def hard_phase_pruner(model, criterion="magnitude", config=HARD):
    """A pruner in its hard phase: binary masks with half the units of every family at 0."""
    pruner = GradientFlowPruner(model, find_units(model), config, criterion)
    for step in range(config.soft_steps + 2):
        pruner.step(step)
    assert pruner.phase() == "hard" and pruner.masks.is_binary() and pruner.masks.sparsity() > 0.3
    return pruner


def output(model, dtype=None, device=None):
    sample, timesteps = random_inputs(model)
    return model(sample.to(device or sample.device, dtype or sample.dtype), timesteps.to(device or sample.device)).sample


def wrap_like_accelerate(model, dtype=torch.bfloat16):
    """What ``Accelerator(mixed_precision=...).prepare(model)`` does to ``model.forward`` (accelerate 1.x)."""
    from accelerate.utils import convert_outputs_to_fp32

    model._original_forward = model.forward
    autocast = torch.autocast(device_type="cpu", dtype=dtype)
    model.forward = MethodType(convert_outputs_to_fp32(autocast(model.forward.__func__)), model)
    return model


# ---------------------------------------------------------------------- the masks follow the model
@pytest.mark.parametrize("arch", ARCHS)
def test_masks_follow_the_model_to_another_device(arch):
    """The pruner is built on the host, then the model moves (as accelerate.prepare moves it): the hooks move the
    masks on first use, and the hard phase's GroupNorm grouping needs no read-back from the device."""
    model = build(arch)
    pruner = hard_phase_pruner(model)
    model.to("meta")
    out = output(model, device="meta")
    assert out.device.type == "meta" and out.shape == random_inputs(model)[0].shape
    assert pruner.masks.values.device.type == "meta"
    assert not pruner.is_rescoring_step(5)  # a re-scoring brings scores to the host, which meta cannot
    pruner.step(5)  # the pruner writes its next masks to the device they are on now
    assert pruner.masks.values.device.type == "meta"


@pytest.mark.parametrize("arch", ARCHS)
def test_masks_follow_a_dtype_change(arch):
    """The model is cast after the masks were made: the masked model computes in the new dtype, the same function."""
    model = build(arch)
    hard_phase_pruner(model)
    with torch.no_grad():
        reference = output(model).double()
        model.double()
        cast = output(model, dtype=torch.float64)
    assert cast.dtype == torch.float64
    assert torch.allclose(cast, reference, rtol=1e-3, atol=1e-4), float((cast - reference).abs().max())


def test_explicit_move_keeps_mask_gradients():
    """``pruner.to(device)`` keeps a mask vector that takes gradients a leaf that takes gradients (mask_flow)."""
    model = build("tiny_1ch_16px")
    pruner = hard_phase_pruner(model)
    pruner.masks.values.requires_grad_(True)
    pruner.to(torch.device("cpu"))
    model.double()
    pruner.masks.to("meta")
    assert pruner.masks.values.is_leaf and pruner.masks.values.requires_grad


@pytest.mark.parametrize("arch", ARCHS)
def test_group_norm_hook_keeps_the_layers_dtype(arch):
    """CUDA autocast runs group_norm in float32 on half inputs; the mask-aware GroupNorm must return what the layer
    returned (float32), normalize over the kept channels as the export does, and zero the removed ones."""
    model = build(arch)
    masks = hard_phase_pruner(model).masks
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.GroupNorm) or name not in masks._gather_host:
            continue
        mask = masks.channel_mask(name)
        if bool((mask != 0).all()):
            continue
        x = torch.randn(2, module.num_channels, 4, 4, generator=torch.Generator().manual_seed(checked)).half()
        layer_output = F.group_norm(x.float(), module.num_groups, module.weight, module.bias, module.eps)  # fp32, as autocast
        with torch.no_grad():
            result = masks._group_norm_hook(name)(module, (x,), layer_output)
        assert result.dtype == torch.float32, name
        dead = mask == 0
        assert bool((result[:, dead] == 0).all()), name
        keep, groups = masks._group_norm_plan(name, module)
        expected = F.group_norm(x.float()[:, keep], groups, module.weight[keep], module.bias[keep], module.eps)
        assert torch.allclose(result[:, keep], expected * mask[keep].view(1, -1, 1, 1), atol=1e-5), name
        checked += 1
    assert checked, "no GroupNorm with a removed unit: the case was not exercised"


# ---------------------------------------------------------------------- collectives on the device
class Recorder:
    """Stands in for ``torch.distributed.all_reduce`` in a 2-process group: records each tensor's device."""

    def __init__(self):
        self.devices = []

    def __call__(self, tensor, op=None, **kwargs):
        self.devices.append(tensor.device)


@pytest.fixture
def recorded_collectives(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "gloo")
    monkeypatch.setattr(dist, "all_reduce", recorder)
    return recorder


def meta_loss(model, batch=4):
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    sample, _ = random_inputs(model, batch=batch)
    loss = make_loss(sample, scheduler, torch.Generator().manual_seed(0))
    return DDPMLoss(loss.images.to("meta"), loss.noise.to("meta"), loss.timesteps.to("meta"), scheduler, "epsilon")


# diff_pruning is not in the table: where to stop is decided on the all-reduced loss, which must come to the host
# (on meta it cannot); its reductions use the same function and stay on the device (tests/test_distributed.py runs
# it with two processes).
COLLECTIVE_CASES = {
    "gradient_flow:loss_change": ("gradient_flow", dict(form="loss_change")),
    "gradient_flow:increase": ("gradient_flow", dict(form="increase")),
    "gradient_flow:preserve_finite_difference": ("gradient_flow", dict(form="preserve", hvp="finite_difference")),
    "gradient_flow:mask_flow": ("gradient_flow", dict(form="mask_flow")),
    "taylor": ("taylor", {}),
}


@pytest.mark.parametrize("case", COLLECTIVE_CASES)
def test_collectives_get_device_tensors(case, recorded_collectives):
    """Every tensor a criterion averages across processes is on the model's device, and so are its scores."""
    name, options = COLLECTIVE_CASES[case]
    model = build("tiny_1ch_16px")
    units = find_units(model)
    masks = UnitMasks(model, units).attach()
    model.to("meta")
    masks.to("meta")
    scores = get_criterion(name, **options).score(model, units, [meta_loss(model)], masks=masks)
    assert recorded_collectives.devices, "no collective was called: the case does not exercise the reduction"
    assert {d.type for d in recorded_collectives.devices} == {"meta"}
    assert {v.device.type for v in scores.values()} == {"meta"}


def test_observed_mask_gradients_are_reduced_on_the_device(recorded_collectives):
    model = build("tiny_1ch_16px")
    pruner = GradientFlowPruner(model, find_units(model), HARD, get_criterion("gradient_flow", form="mask_flow"))
    model.to("meta")
    pruner.to("meta")
    pruner.masks.values.requires_grad_(True)
    pruner.masks.values.grad = torch.ones_like(pruner.masks.values)
    pruner.observe_training_step()
    assert [d.type for d in recorded_collectives.devices] == ["meta"]


def test_a_host_tensor_is_moved_to_the_nccl_device(monkeypatch):
    """The safety net: under NCCL a stray host tensor is reduced on the current CUDA device, not handed to NCCL."""
    seen = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert distributed.communication_device(torch.zeros(1)) == torch.device("cuda", 0)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "gloo")
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: seen.append(t.device))
    distributed.all_reduce_mean([torch.ones(2)])
    assert seen == [torch.device("cpu")]


# ---------------------------------------------------------------------- precision
def test_scoring_runs_in_float32_under_mixed_precision():
    """Scores are the float32 scores whether the model carries accelerate's bf16 wrapper or runs inside autocast."""
    torch.manual_seed(0)
    model = build("tiny_1ch_16px")
    units = find_units(model)
    loss = make_loss(random_inputs(model, batch=4)[0], DDPMScheduler(num_train_timesteps=1000), torch.Generator().manual_seed(1))

    def scores(m):
        pruner = GradientFlowPruner(m, units, HARD, get_criterion("taylor"))
        return pruner._score([loss])

    reference = scores(model)
    wrapped = wrap_like_accelerate(build("tiny_1ch_16px"))
    half = {k: v for k, v in get_criterion("taylor").score(wrapped, units, [loss]).items()}
    assert any(not torch.allclose(half[k].double(), reference[k], rtol=1e-4) for k in reference), \
        "bf16 autocast did not change the scores: the test cannot tell float32 scoring from half-precision scoring"
    got = scores(wrapped)
    assert all(torch.equal(got[k], reference[k]) for k in reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = scores(build("tiny_1ch_16px"))
    assert all(torch.equal(inside[k], reference[k]) for k in reference)
    assert "forward" in wrapped.__dict__, "the wrapper must be back after scoring"


def test_evaluation_copy_runs_like_the_float32_teacher():
    """The model the card compares with the teacher is sampled without accelerate's autocast wrapper."""
    model = build("tiny_1ch_16px")
    with torch.no_grad():
        reference = output(model)
        wrapped = wrap_like_accelerate(build("tiny_1ch_16px"))
        assert not torch.equal(output(wrapped), reference)
        for copy in (training.ema_model(wrapped, None), plain_copy(wrapped)):
            assert torch.equal(output(copy), reference)
    assert "forward" in wrapped.__dict__  # the training model keeps its wrapper


def test_full_precision_restores_the_wrapper_after_an_error():
    wrapped = wrap_like_accelerate(build("tiny_1ch_16px"))
    forward = wrapped.__dict__["forward"]
    with pytest.raises(RuntimeError, match="inside"):
        with full_precision(wrapped):
            assert "forward" not in wrapped.__dict__
            raise RuntimeError("inside")
    assert wrapped.__dict__["forward"] is forward


def test_fp16_loss_scale_is_undone_and_overflowed_steps_are_skipped():
    model = build("tiny_1ch_16px").double()
    criterion = get_criterion("gradient_flow", form="mask_flow")
    pruner = GradientFlowPruner(model, find_units(model), HARD, criterion)
    values = pruner.masks.values
    grad = torch.linspace(-1, 1, values.numel(), dtype=torch.float64)
    values.grad = (grad * 1024).float()
    pruner.observe_training_step(grad_scale=1024.0)
    assert criterion.observation_state()["num_observed"] == 1
    assert torch.allclose(criterion.observation_state()["observed"], grad.float().double() ** 2)
    values.grad = torch.full_like(values, float("inf"))
    pruner.observe_training_step(grad_scale=65536.0)
    assert criterion.observation_state()["num_observed"] == 1


# ---------------------------------------------------------------------- scoring batches
@pytest.mark.parametrize("batch", [1, 999, 1000, 1024, 8 * 128 * 4])
def test_stratified_timesteps_cover_any_global_batch(batch):
    """A global scoring batch larger than T (batch 128 on 8 GPUs, 4 mini-batches) takes each timestep evenly often."""
    t = stratified_timesteps(batch, 1000, torch.Generator().manual_seed(0))
    assert t.shape == (batch,) and int(t.min()) >= 0 and int(t.max()) < 1000
    counts = torch.bincount(t, minlength=1000)
    assert int(counts.max()) - int(counts.min()) <= 1 if batch >= 1000 else int(counts.max()) == 1


CHUNK_CASES = {
    "gradient_flow:loss_change": ("gradient_flow", dict(form="loss_change")),
    "gradient_flow:increase": ("gradient_flow", dict(form="increase")),
    "gradient_flow:preserve_finite_difference": ("gradient_flow", dict(form="preserve", hvp="finite_difference")),
    "gradient_flow:mask_flow": ("gradient_flow", dict(form="mask_flow")),
    "taylor": ("taylor", {}),
    "diff_pruning": ("diff_pruning", dict(num_timesteps=3)),
}


@pytest.mark.parametrize("case", CHUNK_CASES)
def test_chunked_scoring_gives_the_same_scores(case):
    """Differentiating a scoring mini-batch 2 images at a time changes the memory, not the scores (float64)."""
    name, options = CHUNK_CASES[case]
    model = build("tiny_1ch_16px").double()
    units = find_units(model)
    masks = UnitMasks(model, units).attach()
    masks.fill_(0.9)
    base = make_loss(random_inputs(model, batch=8)[0].double(), DDPMScheduler(num_train_timesteps=1000),
                     torch.Generator().manual_seed(2))
    base.noise = base.noise.double()
    whole = get_criterion(name, **options).score(model, units, [base], masks=masks)
    pieces = DDPMLoss(base.images, base.noise, base.timesteps, base.scheduler, base.prediction_type, chunk_size=2)
    assert len(pieces.chunks()) == 4
    chunked = get_criterion(name, **options).score(model, units, [pieces], masks=masks)
    for k in whole:
        assert torch.allclose(chunked[k], whole[k], rtol=1e-8, atol=1e-10 * float(whole[k].abs().max())), (case, k)


# ---------------------------------------------------------------------- training noise
def test_training_noise_is_drawn_per_image_on_the_device_and_splits_like_one_process():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    images = torch.zeros(4, 1, 8, 8, dtype=torch.float64)
    one = training.GlobalBatchNoise(seed=3)
    two = [training.GlobalBatchNoise(seed=3, num_processes=2, process_index=i) for i in range(2)]
    for _ in range(3):  # successive steps
        whole = one.loss(images, scheduler)
        halves = [n.loss(images[:2], scheduler) for n in two]
        assert torch.equal(torch.cat([h.noise for h in halves]), whole.noise)
        assert torch.equal(torch.cat([h.timesteps for h in halves]), whole.timesteps)
    assert whole.noise.dtype == torch.float64 and whole.timesteps.device == images.device
    resumed = training.GlobalBatchNoise(seed=3)
    resumed.load_state_dict(one.state_dict())
    assert torch.equal(resumed.loss(images, scheduler).noise, one.loss(images, scheduler).noise)
    with pytest.raises(ValueError, match="older format"):
        resumed.load_state_dict({"generator": torch.zeros(8, dtype=torch.uint8)})


# ---------------------------------------------------------------------- every process selects the same units
def _agreement_worker(rank, world, init_file, results):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        same = {"a": torch.tensor([True, False, True]), "b": torch.tensor([0.0, 1.0])}
        distributed.check_rank_agreement(same, "the units")
        differ = {"a": torch.tensor([True, False, rank == 0]), "b": torch.tensor([0.0, 1.0])}
        try:
            distributed.check_rank_agreement(differ, "the units selected at step 7")
            results.put((rank, "no error"))
        except RuntimeError as error:
            results.put((rank, str(error)))
    except Exception:
        results.put((rank, "crash: " + traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ranks_that_select_different_units_are_stopped(tmp_path):
    """Two gloo processes: equal selections pass; a selection that differs in one family stops both, naming it."""
    context = mp.get_context("spawn")
    results = context.Queue()
    init_file = tmp_path / "init"
    processes = [context.Process(target=_agreement_worker, args=(r, 2, str(init_file), results)) for r in range(2)]
    for p in processes:
        p.start()
    got = dict(results.get(timeout=120) for _ in processes)
    for p in processes:
        p.join(timeout=60)
    for rank in (0, 1):
        assert "disagree on the units selected at step 7" in got[rank] and "['a']" in got[rank], got[rank]
