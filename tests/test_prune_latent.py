"""training/prune.py on a latent teacher and on pixel pipelines of other classes: the teacher's pipeline kind, end to end.

The shipped LDM teacher (teachers/ldm-photos: a VQModel, a UNet2DModel on 16x16x3 latents, a DDIM scheduler) is
pruned in both layouts, resumed, pushed to the fake Hub and loaded by a fresh interpreter without this package; a
DDIM-pipeline teacher comes back as a DDIMPipeline; a pipeline class the project does not prune is refused before
any work.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO_ROOT, load_script
from .test_latent_teacher import CHILD, TEACHER

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)

# 8 steps: soft phase 0..2, hard 3..4, export after step 4, fine-tuning to 8; checkpoints every 2 steps.
RUN = [
    "--dataset_name", "photos", "--max_train_samples", "32", "--train_batch_size", "4",
    "--max_train_steps", "8", "--soft_steps", "2", "--pruning_steps", "4", "--rescore_every", "1",
    "--checkpointing_steps", "2", "--validation_steps", "100", "--num_inference_steps", "2", "--num_validation_images", "2",
    "--num_eval_images", "0", "--report_to", "none", "--target_macs", "0.5", "--score_batch_size", "4",
    "--score_batches", "1",
]

PIXEL_RUN = RUN[2:]  # the same run, on the data set each test names




@pytest.fixture(scope="module")
def prune():
    return load_script("prune")


@pytest.fixture(scope="module")
def latent_runs(prune, tmp_path_factory):
    """Both layouts pruned from the LDM teacher (the per-layer one with a data-driven criterion, so the scoring
    mini-batches go through the autoencoder too): {layout: output folder}."""
    root = tmp_path_factory.mktemp("latent")
    runs = {}
    for layout, extra in (("stock", ["--latent_cache_mb", "16"]), ("per-layer", ["--criterion", "taylor"])):
        runs[layout] = root / layout
        prune.main(["--pretrained_model_name_or_path", TEACHER, "--output_dir", str(runs[layout]), "--layout", layout,
                    *RUN, *extra])
    return runs


def test_latent_outputs_load_as_ldm_pipelines_without_the_package(latent_runs, tmp_path):
    """Stock: plain LDMPipeline / DiffusionPipeline with no flag; per-layer: the remote-code variant; the teacher's
    autoencoder and scheduler come back untouched."""
    runs = latent_runs
    for layout, folder in runs.items():
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == ("LDMPipeline" if layout == "stock" else ["pipeline_gfprune_ldm", "GFPruneLDMPipeline"])
        assert load_file(str(folder / "vqvae" / "diffusion_pytorch_model.safetensors")).keys() == \
            load_file(os.path.join(TEACHER, "vqvae", "diffusion_pytorch_model.safetensors")).keys()
        for name, tensor in load_file(str(folder / "vqvae" / "diffusion_pytorch_model.safetensors")).items():
            assert torch.equal(tensor, load_file(os.path.join(TEACHER, "vqvae", "diffusion_pytorch_model.safetensors"))[name])
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        teacher_scheduler = json.loads(open(os.path.join(TEACHER, "scheduler", "scheduler_config.json")).read())
        assert {k: v for k, v in scheduler.items() if not k.startswith("_")} == \
            {k: v for k, v in teacher_scheduler.items() if not k.startswith("_")}
        card = (folder / "README.md").read_text()
        assert ("LDMPipeline.from_pretrained" if layout == "stock" else "trust_remote_code=True") in card
        assert "DDPMPipeline" not in card
        summary = json.loads((folder / "pruning_summary.json").read_text())
        assert summary["pruned"]["macs"] < 0.6 * summary["dense"]["macs"]

    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", CHILD, str(runs["stock"]), str(runs["per-layer"]), str(out)],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not result["package_imported"] and result["refused_without_flag"] is not None
    for loader in ("LDMPipeline", "DiffusionPipeline"):
        assert (result[f"stock/{loader}"]["pipeline"], result[f"stock/{loader}"]["unet"]) == ("LDMPipeline", "UNet2DModel")
        assert result[f"per_layer/{loader}"]["pipeline"] == "GFPruneLDMPipeline"
        for key in ("stock", "per_layer"):
            images = torch.tensor(result[f"{key}/{loader}"]["images"])
            assert images.shape == (2, 32, 32, 3) and bool(torch.isfinite(images).all())


def test_latent_resume_matches_uninterrupted_run(prune, latent_runs, tmp_path):
    """Interrupted in the pruning stage (checkpoint-2) and resumed: the same final UNet, bit for bit."""
    reference = latent_runs["per-layer"]
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    shutil.copytree(reference / "checkpoint-2", output_dir / "checkpoint-2")
    prune.main(["--pretrained_model_name_or_path", TEACHER, "--output_dir", str(output_dir), "--layout", "per-layer",
                *RUN, "--criterion", "taylor", "--resume_from_checkpoint", "latest"])
    got = load_file(str(output_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    want = load_file(str(reference / "unet" / "diffusion_pytorch_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_ddim_teacher_comes_back_as_a_ddim_pipeline(prune, tiny_teacher, tmp_path):
    from diffusers import DDIMPipeline, DDIMScheduler, DiffusionPipeline

    teacher = tmp_path / "ddim-teacher"
    shutil.copytree(tiny_teacher["pipeline"], teacher, ignore=shutil.ignore_patterns("checkpoint-*"))
    index = json.loads((teacher / "model_index.json").read_text())
    index.update(_class_name="DDIMPipeline", scheduler=["diffusers", "DDIMScheduler"])
    (teacher / "model_index.json").write_text(json.dumps(index))
    scheduler = json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())
    scheduler["_class_name"] = "DDIMScheduler"
    (teacher / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    output_dir = tmp_path / "out"
    prune.main(["--pretrained_model_name_or_path", str(teacher), "--output_dir", str(output_dir), "--dataset_name", "digits",
                *PIXEL_RUN])
    loaded = DiffusionPipeline.from_pretrained(output_dir)
    assert type(loaded) is DDIMPipeline and type(loaded.scheduler) is DDIMScheduler
    assert "DDIMPipeline.from_pretrained" in (output_dir / "README.md").read_text()


@pytest.mark.parametrize("class_name", ["ScoreSdeVePipeline", "StableDiffusionPipeline"])
def test_unsupported_pipeline_kind_is_refused_before_any_work(prune, tiny_teacher, tmp_path, class_name):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher["pipeline"], teacher, ignore=shutil.ignore_patterns("checkpoint-*"))
    index = json.loads((teacher / "model_index.json").read_text())
    index["_class_name"] = class_name
    (teacher / "model_index.json").write_text(json.dumps(index))
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"{class_name}.*LDMPipeline"):
        prune.main(["--pretrained_model_name_or_path", str(teacher), "--output_dir", str(output_dir), "--dataset_name",
                    "digits", *PIXEL_RUN])
    assert not output_dir.exists()


def test_latent_output_pushes_to_the_hub(prune, fake_hub, tmp_path):
    """The LDM teacher by Hub id, the LDM output pushed and loaded back by id as an LDMPipeline."""
    from diffusers import DiffusionPipeline, LDMPipeline

    fake_hub.seed_repo("user/ldm-photos", TEACHER)
    output_dir = tmp_path / "out"
    prune.main(["--pretrained_model_name_or_path", "user/ldm-photos", "--output_dir", str(output_dir), *RUN,
                "--push_to_hub", "--hub_model_id", "user/ldm-photos-gfp50", "--hub_token", fake_hub.token])
    pushed = fake_hub.list_files("user/ldm-photos-gfp50")
    assert {"model_index.json", "README.md", "vqvae/config.json", "unet/config.json"} <= set(pushed)
    loaded = DiffusionPipeline.from_pretrained("user/ldm-photos-gfp50")
    assert type(loaded) is LDMPipeline
    assert json.loads(fake_hub.read_file("user/ldm-photos-gfp50", "pruning_summary.json"))["teacher"] == "user/ldm-photos"
