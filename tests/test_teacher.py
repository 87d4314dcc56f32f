"""The shipped digits teacher (teachers/ddpm-digits) is a real digit model, loadable with plain diffusers."""

import json
import os

import torch

from diffusers_gfprune.evaluation import digits_accuracy, paired_samples

from .conftest import REPO_ROOT

TEACHER = os.path.join(REPO_ROOT, "teachers", "ddpm-digits")
NUM_IMAGES = 64


def test_teacher_folder_is_safe_and_complete():
    files = sorted(os.path.relpath(os.path.join(root, name), TEACHER) for root, _, names in os.walk(TEACHER) for name in names)
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json", "samples.png", "training_summary.json"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], files
    assert not [f for f in files if f.startswith("checkpoint-")], "training checkpoints shipped"
    summary = json.load(open(os.path.join(TEACHER, "training_summary.json")))
    assert "train_ddpm.py" in summary["command"] and "--dataset_name digits" in summary["command"]


def test_teacher_samples_are_recognized_digits():
    """Its samples are recognized by the shipped digits classifier far above what noise gets, and cover the digits."""
    from diffusers import DDPMPipeline

    pipeline = DDPMPipeline.from_pretrained(TEACHER)  # plain diffusers, no flags
    unet = pipeline.unet.eval()
    assert unet.config.in_channels == 1 and unet.config.sample_size == 16
    images, _ = paired_samples(unet, unet, pipeline.scheduler, NUM_IMAGES, num_inference_steps=50, seed=123)
    seen = digits_accuracy(images)
    # What an untrained model gives: its samples are close to Gaussian noise clipped to [0, 1].
    noise = digits_accuracy(torch.randn(NUM_IMAGES, 1, 16, 16, generator=torch.Generator().manual_seed(0)).add(1).div(2).clamp(0, 1))
    print(f"\nteacher: recognized {seen['recognized_fraction']:.3f}, labels {seen['label_counts']}, "
          f"entropy {seen['label_entropy_bits']:.2f} bits; noise: recognized {noise['recognized_fraction']:.3f}")
    assert noise["recognized_fraction"] <= 0.1
    assert seen["recognized_fraction"] >= 0.7, seen
    assert sum(count > 0 for count in seen["label_counts"]) >= 8, seen["label_counts"]  # not one digit over and over
    assert seen["label_entropy_bits"] >= 2.8, seen  # uniform over 10 digits: 3.32 bits


def test_clip_sample_is_saved_with_the_scheduler_and_reaches_the_samplers(tmp_path):
    """--no-clip_sample is written into the teacher's scheduler config, which every DDIM sampler of the project
    (evaluation, prune.py, the benchmarks) builds from, so it changes what the samples are."""
    from diffusers import DDIMScheduler, DDPMPipeline

    from .conftest import TINY_TEACHER_ARGS, load_script

    train = load_script("train_ddpm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for flag, expected in (("--clip_sample", True), ("--no-clip_sample", False)):
            out = tmp_path / flag.strip("-")
            train.main(["--dataset_name", "digits", "--output_dir", str(out), *TINY_TEACHER_ARGS, flag])
            scheduler = DDPMPipeline.from_pretrained(str(out)).scheduler
            assert scheduler.config.clip_sample is expected
            assert DDIMScheduler.from_config(scheduler.config).config.clip_sample is expected
    finally:
        torch.set_num_threads(threads)
    # The same untrained model from the same noise: clipping changes the samples.
    pipelines = [DDPMPipeline.from_pretrained(str(tmp_path / name)) for name in ("clip_sample", "no-clip_sample")]
    unet = pipelines[0].unet.eval()
    a, _ = paired_samples(unet, unet, pipelines[0].scheduler, 4, num_inference_steps=5, seed=0)
    b, _ = paired_samples(unet, unet, pipelines[1].scheduler, 4, num_inference_steps=5, seed=0)
    assert not torch.allclose(a, b)


def test_teacher_fid_script_records_the_sampler_it_used(tiny_teacher, tmp_path):
    """benchmarks/teacher_fid.py: forcing DDIM's clipping off is recorded, and the three rows are measured."""
    from .conftest import load_script

    out = tmp_path / "fid.json"
    result = load_script("teacher_fid", "benchmarks").main([
        "--teacher", tiny_teacher["pipeline"], "--dataset_name", "digits", "--num_images", "8",
        "--num_inference_steps", "2", "--clip_sample", "off", "--output_json", str(out)])
    assert "clip_sample False" in result["sampler"] and json.load(open(out))["sampler"] == result["sampler"]
    assert set(result["rows"]) == {"teacher", "real training (floor)"}
    assert all(row["fid"] >= 0 and row["num_images"] == 8 for row in result["rows"].values())
