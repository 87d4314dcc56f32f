"""training/prune.py with distillation from the teacher: flags refused before work, resume in every phase, two
processes, mixed precision, and what the run records (summary, history, card)."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO_ROOT, load_script

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)

# The schedule of tests/test_prune_script.py: soft phase 0..3, hard phase 4..6, export after step 6, fine-tuning to 12.
RUN_ARGS = [
    "--max_train_steps", "12", "--soft_steps", "3", "--pruning_steps", "6", "--rescore_every", "1",
    "--checkpointing_steps", "2", "--target_sparsity", "0.5", "--max_train_samples", "20", "--num_eval_images", "0",
    "--num_inference_steps", "2", "--num_validation_images", "2", "--validation_steps", "100", "--report_to", "none",
]
DISTILL = ["--distill_weight", "1.0", "--distill_feature_weight", "0.5", "--distill_features", "all",
           "--distill_schedule", "cosine_decay"]
GLOBAL_BATCH = 4
FINAL_STEP = 12
EXPORT_AFTER = 6




@pytest.fixture(scope="module")
def prune():
    return load_script("prune")


def run_args(teacher, output_dir, batch=GLOBAL_BATCH, *extra):
    return ["--pretrained_model_name_or_path", teacher, "--output_dir", str(output_dir),
            "--train_batch_size", str(batch), *RUN_ARGS, *DISTILL, *extra]


def weights(folder):
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--distill_weight", "-0.5"], r"output_weight must be a finite number >= 0"),
        (["--distill_feature_weight", "0.1", "--distill_features", "time_embedding"],
         r"supported at block outputs only.*'time_embedding'"),
        (["--distill_feature_weight", "0.1", "--distill_features", "up_blocks.7"], r"'up_blocks.7' is not a block of this model"),
        (["--distill_feature_weight", "0.1"], r"needs the blocks to match"),
    ],
    ids=["negative_weight", "unsupported_layer", "block_not_in_model", "feature_weight_without_layers"],
)
def test_bad_distillation_flags_are_refused_before_work(extra, match, prune, tiny_teacher, tmp_path, monkeypatch):
    def heavy_work(*args, **kwargs):
        raise AssertionError("the script went past its checks")

    monkeypatch.setattr(prune, "load_teacher", heavy_work)
    monkeypatch.setattr(prune.training, "create_accelerator", heavy_work)
    with pytest.raises(ValueError, match=match):
        prune.main(["--pretrained_model_name_or_path", tiny_teacher["pipeline"], "--output_dir", str(tmp_path / "out"),
                    "--report_to", "none", *extra])
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def reference(prune, tiny_teacher, tmp_path_factory):
    """One uninterrupted run with distillation (output and every block, EMA on)."""
    output_dir = tmp_path_factory.mktemp("distill_reference") / "run"
    prune.main(run_args(tiny_teacher["pipeline"], output_dir))
    return output_dir


def test_run_records_distillation(reference, prune, tiny_teacher, tmp_path):
    summary = json.loads((reference / "pruning_summary.json").read_text())
    assert summary["distillation"]["output_weight"] == 1.0 and summary["distillation"]["feature_weight"] == 0.5
    assert summary["distillation"]["feature_layers"] == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    history = json.loads((reference / "pruning_history.json").read_text())
    assert len(history) == FINAL_STEP
    for entry in history:  # both terms in every phase, before and after the export
        assert math.isfinite(entry["distill_output"]) and entry["distill_output"] > 0, entry
        assert math.isfinite(entry["distill_feature"]) and entry["distill_feature"] >= 0, entry
    assert {h["phase"] for h in history} == {"soft", "hard", "finetune"}
    card = (reference / "README.md").read_text()
    assert "`distillation`: from the dense teacher" in card and "cosine_decay schedule" in card

    # The logged "loss" is the DDPM loss: at step 1 (same weights, same batch) it is that of a run without distillation.
    plain = tmp_path / "plain"
    prune.main(["--pretrained_model_name_or_path", tiny_teacher["pipeline"], "--output_dir", str(plain),
                "--train_batch_size", str(GLOBAL_BATCH), *RUN_ARGS, "--max_train_steps", "8"])
    plain_history = json.loads((plain / "pruning_history.json").read_text())
    assert plain_history[0]["loss"] == history[0]["loss"] and "distill_output" not in plain_history[0]
    assert "`distillation`: none" in (plain / "README.md").read_text()
    assert plain_history[1]["loss"] != history[1]["loss"]  # the first update differed


@pytest.mark.parametrize("k", [2, 6, 8], ids=["soft_phase", "hard_phase_before_export", "after_export"])
def test_resume_with_distillation_matches_uninterrupted_run(k, prune, reference, tiny_teacher, tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    for step in range(2, k + 1, 2):
        shutil.copytree(reference / f"checkpoint-{step}", output_dir / f"checkpoint-{step}")
    assert not any("teacher" in p.name for p in output_dir.rglob("*")), "the teacher is not checkpointed"
    prune.main(run_args(tiny_teacher["pipeline"], output_dir, GLOBAL_BATCH, "--resume_from_checkpoint", "latest"))
    for sub in ("unet", f"checkpoint-{FINAL_STEP}/unet", f"checkpoint-{FINAL_STEP}/unet_ema"):
        assert_same(weights(output_dir / sub), weights(reference / sub), f"{sub} after resuming from checkpoint-{k}")
    history = json.loads((output_dir / "pruning_history.json").read_text())
    assert history == json.loads((reference / "pruning_history.json").read_text())


def test_mixed_precision_bf16_runs(prune, tiny_teacher, tmp_path):
    """bf16 autocast on the CPU (the teacher's forward pass under the same autocast as the student's)."""
    from accelerate.state import AcceleratorState

    output_dir = tmp_path / "bf16"
    AcceleratorState._reset_state(reset_partial_state=True)  # this process's earlier runs set up full precision
    try:
        prune.main(run_args(tiny_teacher["pipeline"], output_dir, GLOBAL_BATCH, "--mixed_precision", "bf16",
                            "--checkpointing_steps", "100"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    history = json.loads((output_dir / "pruning_history.json").read_text())
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["distill_output"]) for h in history)


def test_two_processes_match_one(reference, tiny_teacher, tmp_path):
    """2 CPU processes at half the per-device batch compute what 1 process computes (up to float sums)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    output_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MASTER_", "WORLD_", "RANK", "LOCAL_RANK", "OMPI_", "PMI_"))}
    home = tmp_path / "hf_home"
    home.mkdir()
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", ACCELERATE_USE_CPU="1",
               PYTHONPATH=REPO_ROOT)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [accelerate] if os.path.exists(accelerate) else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    command += ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               os.path.join(REPO_ROOT, "training", "prune.py"),
               *run_args(tiny_teacher["pipeline"], output_dir, GLOBAL_BATCH // 2)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert_same(load_file(str(output_dir / "pruning_masks.safetensors")),
                load_file(str(reference / "pruning_masks.safetensors")), "final masks, 2 processes vs 1")
    got, want = weights(output_dir / "unet"), weights(reference / "unet")
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= 1e-4


@pytest.mark.parametrize("criterion", ["diff_pruning", "taylor", "magnitude", "random"])
def test_every_criterion_runs_with_distillation(criterion, prune, tiny_teacher, tmp_path):
    """gradient_flow runs above; the others, on a short schedule (the term does not depend on the criterion)."""
    output_dir = tmp_path / criterion
    prune.main(run_args(tiny_teacher["pipeline"], output_dir, GLOBAL_BATCH, "--criterion", criterion, "--max_train_steps", "4",
                        "--soft_steps", "1", "--pruning_steps", "2", "--checkpointing_steps", "100",
                        "--diff_pruning_timesteps", "4"))
    history = json.loads((output_dir / "pruning_history.json").read_text())
    assert len(history) == 4 and all(h["distill_output"] > 0 and h["distill_feature"] >= 0 for h in history)
    assert {h["phase"] for h in history} == {"soft", "hard", "finetune"}
