"""``training/prune.py --process flow``: the learned masks through the whole script.

The library half (budget, hardening, gradients through every family, state) is tested in
``tests/test_learned_masks.py``; here: the run hardens exactly at the target and logs the jump, a run resumed in the
soft phase (or right before the hardening) equals the uninterrupted one bit for bit, two processes keep the masks of
one, the per-layer layout meets a MACs target, and the flags are refused where they cannot act.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from .conftest import load_script
from .test_prune_script import (
    EXPORT_AFTER,
    FINAL_STEP,
    GLOBAL_BATCH,
    TWO_PROCESSES,
    _launch,
    assert_same,
    max_abs_diff,
    run_args,
    weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SOFT_STEPS = 3  # RUN_ARGS: soft phase 0..3, the hardening at step 4, export after step 6
FLOW = ["--process", "flow", "--rescore_every", "2"]  # soft-phase reports every 2 steps: steps without one too


@pytest.fixture(scope="module")
def prune():
    return load_script("prune")


@pytest.fixture(scope="module")
def flow_run(prune, tiny_teacher, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("flow") / "run"
    prune.main(run_args(tiny_teacher["pipeline"], output_dir, GLOBAL_BATCH, *FLOW))
    return output_dir


def test_flow_run_hardens_at_the_target_and_exports(flow_run):
    from diffusers import DDPMPipeline

    summary = json.loads((flow_run / "pruning_summary.json").read_text())
    assert summary["pruner"]["process"] == "flow" and summary["learned_masks"]["parametrization"] == "sigmoid"
    hardening = summary["hardening"]
    assert hardening["step"] == SOFT_STEPS + 1
    assert all(isinstance(hardening[k], float) for k in ("loss_gates", "loss_hard", "loss_jump", "undecided"))
    assert hardening["loss_jump"] == pytest.approx(hardening["loss_hard"] - hardening["loss_gates"])
    history = json.loads((flow_run / "pruning_history.json").read_text())
    soft = [row for row in history if row["phase"] == "soft"]
    assert soft and all(0 <= row["flow_undecided"] <= 1 and row["flow_target"] <= 1 for row in soft if "flow_target" in row)
    targets = [row["flow_target"] for row in soft if "flow_target" in row]
    assert targets == sorted(targets, reverse=True) and len(targets) >= 2  # the budget tightens over the soft phase
    # Stock layout: every family keeps exactly its share, binary.
    for name, mask in load_file(str(flow_run / "pruning_masks.safetensors")).items():
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and int(mask.sum()) * 2 == mask.numel(), name
    # The learned masks' state is in the soft phase's checkpoints only.
    assert (flow_run / "checkpoint-2" / "pruner" / "learned_masks.safetensors").is_file()
    assert not (flow_run / f"checkpoint-{EXPORT_AFTER}" / "pruner" / "learned_masks.safetensors").exists()
    pipeline = DDPMPipeline.from_pretrained(flow_run)
    images = pipeline(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 16, 16, 1)


@pytest.mark.parametrize("k", [2, 4, 6], ids=["soft_phase", "before_hardening", "hard_phase"])
def test_flow_resume_matches_uninterrupted_run(k, prune, flow_run, tiny_teacher, tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    for step in range(2, k + 1, 2):
        shutil.copytree(flow_run / f"checkpoint-{step}", output_dir / f"checkpoint-{step}")
    prune.main(run_args(tiny_teacher["pipeline"], output_dir, GLOBAL_BATCH, *FLOW, "--resume_from_checkpoint", "latest"))
    for sub in ("unet", f"checkpoint-{FINAL_STEP}/unet"):
        assert_same(weights(output_dir / sub), weights(flow_run / sub), f"{sub} after resuming from checkpoint-{k}")
    assert_same(load_file(str(output_dir / "pruning_masks.safetensors")),
                load_file(str(flow_run / "pruning_masks.safetensors")), "final masks")
    hardening = lambda folder: json.loads((folder / "pruning_summary.json").read_text())["hardening"]
    assert hardening(output_dir) == hardening(flow_run)


def test_flow_two_processes_keep_the_masks_of_one(flow_run, tiny_teacher, tmp_path):
    """2 gloo processes at half the per-device batch: the logits' gradients are all-reduced, so the learned logits are
    those of one process (up to the order of float sums) and the hardened masks identical (every process checks that
    all processes kept the same units at the hardening, or stops)."""
    output_dir = tmp_path / "run"
    result, _ = _launch(TWO_PROCESSES, run_args(tiny_teacher["pipeline"], output_dir, GLOBAL_BATCH // 2, *FLOW), tmp_path,
                        extra_env={"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    logits = lambda folder: {"logits": load_file(str(folder / "checkpoint-2" / "pruner" / "learned_masks.safetensors"))["logits"]}
    diff = max_abs_diff(logits(output_dir), logits(flow_run))
    # Adam's first steps move every logit by about its learning rate (10 / 3 here) whatever the gradient's size, so
    # float-order differences in near-zero gradients show up at 1e-3; half-batch gradients without the all-reduce
    # would differ by the learning rate.
    assert diff <= 1e-2, diff
    assert_same(load_file(str(output_dir / "pruning_masks.safetensors")),
                load_file(str(flow_run / "pruning_masks.safetensors")), "final masks, 2 processes vs 1")


def test_flow_per_layer_meets_a_macs_target(prune, tiny_teacher, tmp_path):
    output_dir = tmp_path / "run"
    args = run_args(tiny_teacher["pipeline"], output_dir, GLOBAL_BATCH, *FLOW, "--layout", "per-layer")
    args[args.index("--target_sparsity"): args.index("--target_sparsity") + 2] = ["--target_macs", "0.5"]
    prune.main(args)
    summary = json.loads((output_dir / "pruning_summary.json").read_text())
    assert summary["achieved_macs"] <= 0.5 and summary["achieved_macs"] > 0.4
    assert summary["learned_masks"]["scope"] is None and summary["hardening"]["step"] == SOFT_STEPS + 1


@pytest.mark.parametrize("extra, match", [
    (["--flow_parametrization", "hard_concrete"], "add --process flow"),
    (["--flow_budget", "lagrangian"], "add --process flow"),
    (["--process", "flow", "--criterion", "gradient_flow", "--gradient_flow_form", "mask_flow"], "masks' gradients"),
], ids=["parametrization_without_flow", "budget_without_flow", "mask_flow_criterion"])
def test_flow_flags_refused_where_they_cannot_act(extra, match, prune, tiny_teacher, tmp_path):
    output_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        prune.main(run_args(tiny_teacher["pipeline"], output_dir, GLOBAL_BATCH, *extra))
    assert not output_dir.exists()
