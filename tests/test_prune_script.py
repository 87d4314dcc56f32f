"""training/prune.py end to end on a tiny teacher: bad input, resume, and a two-process launch.

The script runs in-process (``main(argv)``) except where the launcher itself is under test. The teacher
(``tiny_teacher`` in conftest.py) is a 2-step digits DDPM with block_out_channels (16, 32) and 8 GroupNorm
groups, so a whole prune run (12 steps at batch 4) takes seconds on a CPU.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO_ROOT, load_script

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)

PRUNE_SCRIPT = os.path.join(REPO_ROOT, "training", "prune.py")

# 12 steps: soft phase 0..3, hard phase 4..6, export after step 6, fine-tuning 7..12; a checkpoint every 2 steps.
# 20 training images at a global batch of 4 give 5 steps per epoch, so the run (and every resume) crosses epochs.
# A linear LR schedule with warm-up: its length must not depend on the process count (split_batches).
RUN_ARGS = [
    "--max_train_steps", "12", "--soft_steps", "3", "--pruning_steps", "6", "--rescore_every", "1",
    "--lr_scheduler", "linear", "--lr_warmup_steps", "3", "--logging_steps", "5",
    "--checkpointing_steps", "2", "--target_sparsity", "0.5", "--max_train_samples", "20",
    "--num_inference_steps", "2", "--num_validation_images", "2", "--validation_steps", "100", "--report_to", "none",
]
GLOBAL_BATCH = 4
FINAL_STEP = 12
EXPORT_AFTER = 6
PIPELINE_FILES = ("model_index.json", "unet", "scheduler")
MESSAGES = {}  # bad-input case -> the error message, printed at the end of the module (pytest -s)
RESULTS = {}  # resume / two-process numbers, printed at the end of the module




@pytest.fixture(scope="module")
def prune():
    return load_script("prune")


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if MESSAGES:
        print("\nbad input -> message:")
        for case, message in MESSAGES.items():
            print(f"  {case}: {message}")
    for key, value in RESULTS.items():
        print(f"{key}: {value}")


def run_args(teacher, output_dir, batch=GLOBAL_BATCH, *extra):
    return ["--pretrained_model_name_or_path", teacher, "--output_dir", str(output_dir),
            "--train_batch_size", str(batch), *RUN_ARGS, *extra]


def weights(folder):
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} tensors differ (max |diff| {max_abs_diff(a, b):.3g}), e.g. {different[:3]}"


# ---------------------------------------------------------------------- bad input
class Case:
    """What a bad-input case may set up: files under ``tmp``, the environment (``monkeypatch``)."""

    def __init__(self, tmp, teacher, monkeypatch):
        self.tmp, self.teacher, self.monkeypatch = tmp, teacher, monkeypatch
        self.output_dir = tmp / "out"


def _config_folder(case, class_name, **config):
    folder = case.tmp / f"not_a_unet_{class_name}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42.1", **config}))
    return ["--pretrained_model_name_or_path", str(folder)]


def _autoencoder(case):
    from diffusers import AutoencoderKL

    folder = case.tmp / "vae"
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2, sample_size=16).save_pretrained(
        folder, safe_serialization=True
    )
    return ["--pretrained_model_name_or_path", str(folder)]


def _pipeline_without_unet(case):
    folder = case.tmp / "no_unet_pipeline"
    shutil.copytree(case.teacher, folder, ignore=shutil.ignore_patterns("unet", "checkpoint-*"))
    return ["--pretrained_model_name_or_path", str(folder)]


def _images(case, name, mode, count=4):
    import numpy as np
    from PIL import Image

    folder = case.tmp / name
    folder.mkdir()
    rng = np.random.default_rng(0)
    channels = {"L": (), "RGB": (3,)}[mode]
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (16, 16, *channels), dtype=np.uint8), mode).save(folder / f"{i}.png")
    return folder


def _parquet(case):
    import datasets
    import numpy as np
    from PIL import Image

    folder = case.tmp / "parquet_data"
    folder.mkdir()
    images = [Image.fromarray(np.full((16, 16), 16 * i, dtype=np.uint8), "L") for i in range(4)]
    dataset = datasets.Dataset.from_dict({"picture": images, "label": [0, 1, 2, 3]}).cast_column("picture", datasets.Image())
    dataset.to_parquet(str(folder / "train.parquet"))
    return folder


def _existing_output(case):
    case.output_dir.mkdir()
    (case.output_dir / "notes.txt").write_text("an earlier run")
    (case.output_dir / "checkpoint-3").mkdir()  # not resumed without --resume_from_checkpoint
    return []


def _no_token(case):
    import huggingface_hub.constants as constants
    from huggingface_hub import get_token

    home = case.tmp / "hf_home_empty"
    home.mkdir()
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        case.monkeypatch.delenv(var, raising=False)
    case.monkeypatch.setenv("HF_HOME", str(home))
    case.monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    case.monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    assert get_token() is None, "the test environment still has a Hub token"
    return ["--push_to_hub", "--hub_model_id", "user/tiny-gfp"]


# (case, set-up returning extra arguments, the message it must raise). The arguments come after the valid defaults
# (tiny teacher, digits, a fresh --output_dir), so each case has one thing wrong.
BAD_INPUT_CASES = [
    ("missing_teacher_folder",
     lambda c: ["--pretrained_model_name_or_path", str(c.tmp / "no_such_teacher")],
     r"The teacher folder '.*no_such_teacher' does not exist"),
    ("teacher_has_ncsnpp_skip_blocks",
     lambda c: _config_folder(c, "UNet2DModel", sample_size=16, in_channels=1, out_channels=1, block_out_channels=[32, 64],
                              time_embedding_type="fourier", down_block_types=["SkipDownBlock2D", "AttnSkipDownBlock2D"],
                              up_block_types=["AttnSkipUpBlock2D", "SkipUpBlock2D"]),
     r"skip blocks .*NCSN\+\+.*does not prune: .*GroupNorms from the width"),
    ("teacher_is_class_conditional",
     lambda c: _config_folder(c, "UNet2DModel", sample_size=16, in_channels=1, out_channels=1, block_out_channels=[16, 32],
                              norm_num_groups=8, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                              up_block_types=["AttnUpBlock2D", "UpBlock2D"], num_class_embeds=10),
     r"class-conditional .*DDPMPipeline, which passes no class labels"),
    ("fourier_teacher_in_the_stock_layout",
     lambda c: _config_folder(c, "UNet2DModel", sample_size=16, in_channels=1, out_channels=1, block_out_channels=[16, 32],
                              norm_num_groups=8, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                              up_block_types=["AttnUpBlock2D", "UpBlock2D"], time_embedding_type="fourier")
     + ["--layout", "stock"],
     r"time_embedding_type='fourier'. Use layout='per-layer'"),
    ("macs_target_below_the_floors",
     lambda c: ["--layout", "per-layer", "--target_macs", "0.001"],
     r"--target_macs 0.001 cannot be reached in the per-layer layout.*--min_keep_fraction"),
    ("dataset_name_and_train_data_dir",
     lambda c: ["--dataset_name", "digits", "--train_data_dir", str(_images(c, "both_sources", "L"))],
     r"--dataset_name digits --train_data_dir .*both_sources.*give only one"),
    ("teacher_is_a_conditional_unet",
     lambda c: _config_folder(c, "UNet2DConditionModel", in_channels=4, sample_size=8, cross_attention_dim=8),
     r"is a UNet2DConditionModel, not a UNet2DModel"),
    ("teacher_is_an_autoencoder", _autoencoder, r"is a AutoencoderKL, not a UNet2DModel"),
    ("teacher_pipeline_without_unet", _pipeline_without_unet, r"holds a pipeline without a 'unet' component"),
    ("teacher_folder_without_model",
     lambda c: (c.tmp / "empty_teacher").mkdir() or ["--pretrained_model_name_or_path", str(c.tmp / "empty_teacher")],
     r"holds neither a pipeline \(model_index.json\) nor a model \(config.json\)"),
    ("no_data_source", lambda c: ["--dataset_name", ""], r"--dataset_name was given an empty value \(''\)"),
    ("image_column_missing_imagefolder",
     lambda c: ["--dataset_name", "", "--train_data_dir", str(_images(c, "gray", "L")), "--image_column", "nope"],
     r"image_column='nope' is not a column of the image folder"),
    ("image_column_missing_parquet",
     lambda c: ["--dataset_name", str(_parquet(c)), "--image_column", "nope"],
     r"has no column image_column='nope'. Available columns: \['picture', 'label'\]"),
    ("rgb_images_for_a_1_channel_teacher",
     lambda c: ["--dataset_name", "", "--train_data_dir", str(_images(c, "rgb", "RGB"))],
     r"has 3-channel \(color\) images .*PIL mode 'RGB'.*but the model takes in_channels=1"),
    ("sparsity_above_1", lambda c: ["--target_sparsity", "1.2"], r"Sparsity must be a number in \[0, 1\) .*got 1.2"),
    ("sparsity_negative", lambda c: ["--target_sparsity", "-0.1"], r"Sparsity must be a number in \[0, 1\)"),
    ("macs_target_zero", lambda c: ["--target_macs", "0"], r"--target_macs is a fraction of the dense MACs in \(0, 1\]"),
    ("stock_layout_cannot_meet_target",
     lambda c: ["--layout", "stock", "--target_sparsity", "0.3"],
     r"The stock layout cannot prune 0.3 .*multiples of 1/8.*0.25, 0.375.*per-layer"),
    ("pruning_longer_than_training",
     lambda c: ["--pruning_steps", "50", "--max_train_steps", "20"],
     r"--pruning_steps 50\) must end before --max_train_steps 20"),
    ("pruning_as_long_as_training",  # no step would be left after the export: the run could never export
     lambda c: ["--soft_steps", "5", "--pruning_steps", "20", "--max_train_steps", "20"],
     r"--pruning_steps 20\) must end before --max_train_steps 20"),
    ("soft_phase_not_shorter_than_pruning",
     lambda c: ["--soft_steps", "10", "--pruning_steps", "10", "--max_train_steps", "20"],
     r"Need 0 < soft_steps < pruning_steps"),
    ("existing_output_folder", _existing_output, r"exists and is not empty.*--overwrite_output_dir"),
    ("missing_checkpoint", lambda c: ["--resume_from_checkpoint", "checkpoint-99"],
     r"--resume_from_checkpoint 'checkpoint-99' is not a checkpoint folder"),
    ("push_without_repo_id", lambda c: ["--push_to_hub"], r"--push_to_hub needs --hub_model_id"),
    ("push_without_token", _no_token, r"--push_to_hub needs a Hub token"),
    ("unknown_criterion", lambda c: ["--criterion", "magic"], r"Unknown criterion 'magic'; choose one of \["),
    ("zero_batch_size", lambda c: ["--train_batch_size", "0"], r"--train_batch_size must be >= 1, got 0"),
    ("round_to_zero", lambda c: ["--round_to", "0"], r"--round_to is a channel multiple >= 1 .*got 0"),
    ("stock_target_with_widths_off_round_to",  # 0.25 keeps 12 of the 16 channels: not a multiple of 8
     lambda c: ["--layout", "stock", "--target_sparsity", "0.25", "--round_to", "8"],
     r"cannot prune 0.25 .*not multiples of round_to=8.*sparsities with round_to=8: 0, 0.5;"),
]


def _snapshot(folder):
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name, setup, match", BAD_INPUT_CASES, ids=[c[0] for c in BAD_INPUT_CASES])
def test_bad_input(name, setup, match, prune, tiny_teacher, tmp_path, monkeypatch):
    """A clear message, raised by the checks before any heavy work, and nothing written to the output folder."""

    def heavy_work(*args, **kwargs):
        raise AssertionError("the script went past its checks (loaded the teacher or set up accelerate)")

    case = Case(tmp_path, tiny_teacher["pipeline"], monkeypatch)
    valid = ["--pretrained_model_name_or_path", case.teacher, "--output_dir", str(case.output_dir),
             "--cache_dir", str(tmp_path / "cache"), "--report_to", "none"]
    argv = valid + setup(case)
    before = _snapshot(case.output_dir)
    monkeypatch.setattr(prune, "load_teacher", heavy_work)
    monkeypatch.setattr(prune.training, "create_accelerator", heavy_work)
    with pytest.raises(ValueError, match=match) as error:
        prune.main(argv)
    MESSAGES[name] = str(error.value)
    assert _snapshot(case.output_dir) == before, "the output folder was written to"


def test_bad_input_cases_are_valid_without_their_fault(prune, tiny_teacher, tmp_path, monkeypatch):
    """The valid defaults the cases start from pass every check (so each case fails for its own reason)."""

    class PastTheChecks(Exception):
        pass

    def past_the_checks(*args, **kwargs):
        raise PastTheChecks

    monkeypatch.setattr(prune.training, "create_accelerator", past_the_checks)
    with pytest.raises(PastTheChecks):
        prune.main(["--pretrained_model_name_or_path", tiny_teacher["pipeline"], "--output_dir", str(tmp_path / "out"),
                    "--cache_dir", str(tmp_path / "cache"), "--report_to", "none"])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- an uninterrupted run, and resumes
@pytest.fixture(scope="module")
def reference(prune, tiny_teacher, tmp_path_factory):
    """One uninterrupted run: (output folder, wall seconds)."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    start = time.perf_counter()
    prune.main(run_args(tiny_teacher["pipeline"], output_dir))
    wall = time.perf_counter() - start
    RESULTS["wall time of the tiny end-to-end run (in-process, 12 steps, batch 4)"] = f"{wall:.1f} s"
    return output_dir, wall


def test_uninterrupted_run(reference):
    from diffusers import DDPMPipeline, UNet2DModel

    output_dir, _ = reference
    names = set(os.listdir(output_dir))
    assert set(PIPELINE_FILES) | {"pruning_summary.json", "pruning_masks.safetensors"} <= names
    assert {f"checkpoint-{s}" for s in range(2, FINAL_STEP + 1, 2)} <= names
    assert ".pipeline-staging" not in names
    # The pruner's state is in the checkpoints of the pruning stage; the final masks in those after the export.
    for step in range(2, FINAL_STEP + 1, 2):
        checkpoint = output_dir / f"checkpoint-{step}"
        assert (checkpoint / "pruner").is_dir() == (step <= EXPORT_AFTER), step
        assert json.loads((checkpoint / "training_state.json").read_text())["stage"] == (
            "pruning" if step <= EXPORT_AFTER else "finetune")
        has_masks = any(k.startswith("masks/") for k in load_file(str(checkpoint / "training_state.safetensors")))
        assert has_masks == (step > EXPORT_AFTER), step

    summary = json.loads((output_dir / "pruning_summary.json").read_text())
    assert summary["num_processes"] == 1 and summary["global_batch_size"] == GLOBAL_BATCH
    assert summary["pruned"]["params"] < summary["dense"]["params"] / 2
    masks = load_file(str(output_dir / "pruning_masks.safetensors"))
    for name, mask in masks.items():  # stock layout: every family keeps exactly half of its units
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and int(mask.sum()) * 2 == mask.numel(), name

    pipeline = DDPMPipeline.from_pretrained(output_dir)
    assert type(pipeline.unet) is UNet2DModel and pipeline.unet.config.block_out_channels == [8, 16]
    images = pipeline(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 16, 16, 1)


@pytest.mark.parametrize("k", [2, 6, 8], ids=["soft_phase", "hard_phase_before_export", "after_export"])
def test_resume_matches_uninterrupted_run(k, prune, reference, tiny_teacher, tmp_path, capsys):
    """Interrupted after checkpoint-k (later checkpoints and the final files never written), then resumed."""
    reference_dir, _ = reference
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    for step in range(2, k + 1, 2):
        shutil.copytree(reference_dir / f"checkpoint-{step}", output_dir / f"checkpoint-{step}")
    kept = {p: p.stat().st_mtime_ns for p in output_dir.rglob("*") if p.is_file()}
    capsys.readouterr()

    prune.main(run_args(tiny_teacher["pipeline"], output_dir, GLOBAL_BATCH, "--resume_from_checkpoint", "latest"))

    out = capsys.readouterr().out
    assert re.search(rf"Resuming from .*checkpoint-{k} \(({'pruning' if k <= EXPORT_AFTER else 'finetune'}) stage\)", out), out
    assert ("Exported at step" in out) == (k <= EXPORT_AFTER)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items()), "a checkpoint from before the interruption was rewritten"
    for sub in ("unet", f"checkpoint-{FINAL_STEP}/unet", f"checkpoint-{FINAL_STEP}/unet_ema"):
        assert json.loads((output_dir / sub / "config.json").read_text()) == json.loads((reference_dir / sub / "config.json").read_text())
        got, want = weights(output_dir / sub), weights(reference_dir / sub)
        RESULTS[f"resume from checkpoint-{k}, {sub}: max |diff|"] = max_abs_diff(got, want)
        assert_same(got, want, f"{sub} after resuming from checkpoint-{k}")
    assert_same(load_file(str(output_dir / "pruning_masks.safetensors")),
                load_file(str(reference_dir / "pruning_masks.safetensors")), "final masks")


def test_bare_unet_teacher_per_layer_layout(prune, tiny_teacher, tmp_path):
    """A folder holding only a UNet2DModel (no scheduler) as the teacher, pruned to the per-layer layout."""
    from diffusers_gfprune.modeling_pruned_unet import PrunedUNet2DModel

    output_dir = tmp_path / "run"
    prune.main(["--pretrained_model_name_or_path", tiny_teacher["unet"], "--output_dir", str(output_dir),
                "--train_batch_size", "4", "--max_train_steps", "4", "--soft_steps", "1", "--pruning_steps", "2",
                "--rescore_every", "1", "--checkpointing_steps", "100", "--layout", "per-layer", "--target_sparsity", "0.3",
                "--num_inference_steps", "2", "--num_validation_images", "2", "--validation_steps", "100", "--report_to", "none"])
    summary = json.loads((output_dir / "pruning_summary.json").read_text())
    # A local teacher is named by its folder's base name (published files carry no machine path).
    assert summary["teacher"] == os.path.basename(os.path.normpath(tiny_teacher["unet"])) and summary["layout"] == "per-layer"
    masks = load_file(str(output_dir / "pruning_masks.safetensors"))
    pruned = sum(int((m == 0).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(pruned / total - 0.3) < 0.01
    unet = PrunedUNet2DModel.from_pretrained(output_dir, subfolder="unet")
    assert summary["pruned"]["params"] < summary["dense"]["params"]
    with torch.no_grad():
        assert unet(torch.randn(1, 1, 16, 16), 10).sample.shape == (1, 1, 16, 16)


@pytest.mark.parametrize("layout", ["per-layer", "stock"])
def test_macs_target_is_met_and_stated(layout, prune, tiny_teacher, tmp_path):
    """--target_macs 0.5: the exported model has the MACs asked for (per-layer: at most 0.5, within 0.02; stock: the
    nearest point of its grid), and the summary, pruning_info and the card state the fraction reached."""
    from diffusers_gfprune.counting import count_macs
    from diffusers_gfprune.export import sparsity_for_macs
    from diffusers_gfprune.units import find_units

    output_dir = tmp_path / "run"
    prune.main(["--pretrained_model_name_or_path", tiny_teacher["pipeline"], "--output_dir", str(output_dir),
                "--train_batch_size", "4", "--max_train_steps", "4", "--soft_steps", "1", "--pruning_steps", "2",
                "--rescore_every", "1", "--checkpointing_steps", "100", "--layout", layout, "--target_macs", "0.5",
                "--num_eval_images", "0", "--num_inference_steps", "2", "--num_validation_images", "2",
                "--validation_steps", "100", "--report_to", "none", "--max_train_samples", "20"])
    summary = json.loads((output_dir / "pruning_summary.json").read_text())
    achieved = summary["pruned"]["macs"] / summary["dense"]["macs"]
    assert summary["achieved_macs"] == pytest.approx(achieved)
    if layout == "per-layer":
        assert 0.48 <= achieved <= 0.5, achieved
        pruning_info = json.loads((output_dir / "model_index.json").read_text())["pruning_info"]
        assert pruning_info["target_macs"] == 0.5 and pruning_info["achieved_macs"] == pytest.approx(achieved)
    else:
        from diffusers import UNet2DModel

        teacher = UNet2DModel.from_pretrained(tiny_teacher["pipeline"], subfolder="unet")
        _, grid = sparsity_for_macs(teacher, find_units(teacher), 0.5)
        assert achieved == pytest.approx(grid, abs=2e-3)
    card = (output_dir / "README.md").read_text()
    assert f"reached {achieved:.1%} of the dense MACs" in card
    RESULTS[f"--target_macs 0.5, {layout}: MACs reached"] = f"{achieved:.4f}"


@pytest.mark.parametrize("layout, target", [("per-layer", ["--target_sparsity", "0.3"]), ("stock", ["--target_macs", "0.5"])])
def test_round_to_gives_widths_in_multiples(layout, target, prune, tiny_teacher, tmp_path):
    """--round_to 8: every kept width of the exported model is a multiple of 8 channels (or the dense width)."""
    from diffusers import UNet2DModel

    from diffusers_gfprune.units import find_units

    output_dir = tmp_path / "run"
    prune.main(["--pretrained_model_name_or_path", tiny_teacher["pipeline"], "--output_dir", str(output_dir),
                "--train_batch_size", "4", "--max_train_steps", "4", "--soft_steps", "1", "--pruning_steps", "2",
                "--rescore_every", "1", "--checkpointing_steps", "100", "--layout", layout, *target, "--round_to", "8",
                "--num_eval_images", "0", "--num_validation_images", "2", "--validation_steps", "100", "--report_to", "none"])
    summary = json.loads((output_dir / "pruning_summary.json").read_text())
    assert summary["pruner"]["round_to"] == 8
    units = {f.name: f for f in find_units(UNet2DModel.from_pretrained(tiny_teacher["pipeline"], subfolder="unet"))}
    masks = load_file(str(output_dir / "pruning_masks.safetensors"))
    widths = {name: int(m.sum()) * units[name].unit_size for name, m in masks.items()}
    assert any(w < units[n].num_channels for n, w in widths.items()), "nothing was pruned"
    off = {n: w for n, w in widths.items() if w % 8 and w != units[n].num_channels}
    assert not off, f"widths not multiples of 8: {off}"


@pytest.mark.parametrize("criterion, extra, expected", [
    ("random", ["--seed", "7"], {"seed": 7}),  # each seed draws other units, not seed 0's every time
    ("diff_pruning", ["--diff_pruning_timesteps", "3"], {"num_timesteps": 3, "thr": 0.05}),
    ("gradient_flow", ["--hvp", "finite_difference"], {"hvp": "finite_difference"}),
])
def test_criterion_options_come_from_the_flags(criterion, extra, expected, prune, tiny_teacher, tmp_path):
    args = prune.parse_args(["--pretrained_model_name_or_path", tiny_teacher["pipeline"], "--output_dir",
                             str(tmp_path / "run"), "--criterion", criterion, *extra])
    _, _, built, _ = prune.validate(args)
    config = prune.config_dict(built)
    assert {k: config[k] for k in expected} == expected


# ---------------------------------------------------------------------- accelerate launch, two processes
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launch_args, script_args, tmp_path, extra_env=None, timeout=420):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [accelerate] if os.path.exists(accelerate) else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "MASTER_", "WORLD_", "RANK", "LOCAL_RANK", "OMPI_", "PMI_"))}
    home = tmp_path / "hf_home"  # no accelerate default config, no token
    home.mkdir(exist_ok=True)
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **(extra_env or {}))
    command += ["launch", *launch_args, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port()), PRUNE_SCRIPT, *script_args]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return result, time.perf_counter() - start


TWO_PROCESSES = ["--multi_gpu", "--num_processes", "2"]


@pytest.fixture(scope="module")
def two_process_run(tiny_teacher, tmp_path_factory):
    """One uninterrupted 2-process run (gloo on the CPU) at half the per-device batch: (result, output folder)."""
    tmp_path = tmp_path_factory.mktemp("two_processes")
    output_dir = tmp_path / "run"
    result, wall = _launch(TWO_PROCESSES, run_args(tiny_teacher["pipeline"], output_dir, GLOBAL_BATCH // 2), tmp_path,
                           extra_env={"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    RESULTS["two-process accelerate launch, wall time"] = f"{wall:.1f} s"
    return result, output_dir


def test_two_processes_match_one(reference, two_process_run):
    """2 CPU processes at half the per-device batch: one save, the final masks of the 1-process run, the same LR at
    every step (the schedule counts optimizer updates, whatever the process count)."""
    reference_dir, _ = reference
    result, output_dir = two_process_run
    lrs = lambda folder: [row["lr"] for row in json.loads((folder / "pruning_history.json").read_text())]
    assert len(lrs(output_dir)) == FINAL_STEP and lrs(output_dir) == lrs(reference_dir)
    assert lrs(reference_dir)[2] > lrs(reference_dir)[1] > lrs(reference_dir)[0] and lrs(reference_dir)[-1] < lrs(reference_dir)[3]

    summary = json.loads((output_dir / "pruning_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["global_batch_size"] == GLOBAL_BATCH
    final = output_dir / f"checkpoint-{FINAL_STEP}"
    assert (final / "random_states_0.pkl").exists() and (final / "random_states_1.pkl").exists()
    # Saved once: one pipeline, at the root, completely moved out of its staging folder.
    assert sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("model_index.json")) == ["model_index.json"]
    assert not (output_dir / ".pipeline-staging").exists()
    assert result.stdout.count("Exported at step") == 1
    assert set(os.listdir(output_dir)) == set(os.listdir(reference_dir))

    assert_same(load_file(str(output_dir / "pruning_masks.safetensors")),
                load_file(str(reference_dir / "pruning_masks.safetensors")), "final masks, 2 processes vs 1")
    # Weights: the same computation up to the order of float sums (all-reduce), so close but not bit-equal.
    diff = max_abs_diff(weights(output_dir / "unet"), weights(reference_dir / "unet"))
    RESULTS["two processes vs one, final unet: max |diff|"] = diff
    assert diff <= 1e-4


@pytest.mark.parametrize(
    "launch_args, extra_env, match",
    [
        (["--cpu", "--num_processes", "2"], {}, r"`accelerate launch --cpu --num_processes N` \(N > 1\) starts a single process"),
        (["--multi_gpu", "--num_processes", "2"], {"CUDA_VISIBLE_DEVICES": ""},
         r"The launcher started 2 processes \(WORLD_SIZE=2\), but accelerate set up a single-process run"),
    ],
    ids=["cpu_flag_starts_one_process", "multi_gpu_without_gpus"],
)
def test_launch_that_does_not_give_two_processes_is_refused(launch_args, extra_env, match, tiny_teacher, tmp_path):
    """Refused with the fix in the message, before the teacher is loaded and with nothing written."""
    output_dir = tmp_path / "run"
    result, _ = _launch(launch_args, run_args(tiny_teacher["pipeline"], output_dir, GLOBAL_BATCH // 2), tmp_path, extra_env)
    assert result.returncode != 0
    assert re.search(match, result.stderr), result.stderr[-6000:]
    MESSAGES[f"launch: {' '.join(launch_args)}"] = re.search(r"RuntimeError: (.*)", result.stderr).group(1)
    assert not output_dir.exists()


@pytest.mark.parametrize("argv, listed, absent", [
    ([], {"score_ema", "soft_commit", "reactivation"}, {"score_batches", "hvp", "gradient_flow_form"}),
    (["--criterion", "random", "--process", "one-shot"], {"process"}, {"score_batches", "score_ema", "reactivation", "hvp"}),
    (["--criterion", "taylor"], {"score_batches", "score_timesteps", "reactivation"}, {"hvp", "gradient_flow_form"}),
    (["--criterion", "gradient_flow", "--gradient_flow_form", "increase"],
     {"score_batches", "hvp", "gradient_flow_form", "reactivation_rule"}, set()),
])
def test_card_lists_only_the_settings_that_acted(argv, listed, absent):
    """The card's hyperparameters: a magnitude run shows no gradient-flow estimator, a one-shot run no soft/hard rules."""
    prune = load_script("prune")
    hyper = prune.card_hyperparameters(prune.parse_args(argv))
    assert listed <= set(hyper) and not (absent & set(hyper)), hyper
    if "gradient_flow_form" in hyper:
        assert hyper["gradient_flow_form"] == "increase"


@pytest.mark.parametrize("k", [2, 8], ids=["pruning_stage", "after_export"])
def test_two_process_resume_matches_uninterrupted_run(k, two_process_run, tiny_teacher, tmp_path):
    """A 2-process run resumed with 2 processes: loads through the DDP wrapper (EMA, pruner, slim model) and ends
    where the uninterrupted 2-process run ended, bit for bit."""
    _, run_dir = two_process_run
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    for step in range(2, k + 1, 2):
        shutil.copytree(run_dir / f"checkpoint-{step}", output_dir / f"checkpoint-{step}")
    result, _ = _launch(TWO_PROCESSES, run_args(tiny_teacher["pipeline"], output_dir, GLOBAL_BATCH // 2,
                                                "--resume_from_checkpoint", "latest"), tmp_path,
                        extra_env={"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert f"checkpoint-{k}" in result.stdout
    for sub in ("unet", f"checkpoint-{FINAL_STEP}/unet_ema"):
        assert_same(weights(output_dir / sub), weights(run_dir / sub), f"{sub}, 2 processes resumed from checkpoint-{k}")


def test_compiled_model_prunes_exports_and_resumes(prune, reference, tiny_teacher, tmp_path, monkeypatch):
    """``accelerate launch --dynamo_backend ...`` wraps the model in torch.compile's module: the export, the
    checkpoints and a resume see through the wrapper. The 'eager' backend traces with dynamo but skips the C++ build."""
    from accelerate.state import AcceleratorState

    reference_dir, _ = reference
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")
    compiled = []  # the widths of every model accelerate compiles
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(list(model.config.block_out_channels))
                        or compile_(model, **kw))
    AcceleratorState._reset_state(reset_partial_state=True)  # the state of earlier in-process runs has no dynamo
    try:
        output_dir = tmp_path / "run"
        prune.main(run_args(tiny_teacher["pipeline"], output_dir))
        assert AcceleratorState().dynamo_plugin.backend.value == "EAGER"
        # Only the slim model is compiled: the masked dense model's hooks would break dynamo's graph in every block.
        assert compiled == [[8, 16]], compiled
        assert_same(load_file(str(output_dir / "pruning_masks.safetensors")),
                    load_file(str(reference_dir / "pruning_masks.safetensors")), "final masks with torch.compile")
        shutil.rmtree(output_dir / f"checkpoint-{FINAL_STEP}")
        prune.main(run_args(tiny_teacher["pipeline"], output_dir, GLOBAL_BATCH, "--resume_from_checkpoint", "latest"))
        assert (output_dir / f"checkpoint-{FINAL_STEP}").is_dir()
        summary = json.loads((output_dir / "pruning_summary.json").read_text())
        assert summary["pruned"]["params"] < summary["dense"]["params"] / 2
    finally:
        monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")
        AcceleratorState._reset_state(reset_partial_state=True)
