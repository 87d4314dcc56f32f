"""The shipped latent teacher (teachers/ldm-photos): a standard LDMPipeline, its latent scaling as LDMPipeline
decodes, loadable without this package (stock and per-layer), and measurable by the evaluation."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from diffusers_gfprune import evaluation
from diffusers_gfprune.pipeline_kinds import LatentKind
from diffusers_gfprune.teacher import load_kind, load_teacher, resolve_teacher

from .conftest import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)

TEACHER = os.path.join(REPO_ROOT, "teachers", "ldm-photos")




@pytest.fixture(scope="module")
def teacher():
    source = resolve_teacher(TEACHER)
    unet, _ = load_teacher(source)
    return source, unet.eval(), load_kind(source)


def test_folder_is_a_small_safe_ldm_pipeline():
    files = sorted(os.path.relpath(os.path.join(root, name), TEACHER) for root, _, names in os.walk(TEACHER) for name in names)
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vqvae/config.json",
            "vqvae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json", "samples.png",
            "training_summary.json", "vqvae_training_summary.json"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) or f.startswith("checkpoint-")]
    size = sum(os.path.getsize(os.path.join(TEACHER, f)) for f in files)
    assert size < 8 * 2**20, f"{size / 2**20:.1f} MiB"
    index = json.load(open(os.path.join(TEACHER, "model_index.json")))
    assert index["_class_name"] == "LDMPipeline" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    for name in ("training_summary.json", "vqvae_training_summary.json"):
        text = open(os.path.join(TEACHER, name)).read()
        for private in ("/tmp", "/work", "/home", "/root", "~"):
            assert private not in text, (name, private)
    unet_summary = json.load(open(os.path.join(TEACHER, "training_summary.json")))
    assert "train_ddpm.py" in unet_summary["command"] and "--vqvae_model_name_or_path" in unet_summary["command"]
    vq_summary = json.load(open(os.path.join(TEACHER, "vqvae_training_summary.json")))
    assert vq_summary["command"].startswith("training/train_vqmodel.py")
    assert vq_summary["reconstruction"]["quantized"]["psnr_db"] > 25  # measured 33.0 dB on the held-out crops


def test_kind_and_shapes_from_the_configs_alone():
    source = resolve_teacher(TEACHER)  # no weights read
    kind = source.kind
    assert isinstance(kind, LatentKind) and kind.pipeline_class == "LDMPipeline" and not kind.components
    assert kind.sample_shape(source.unet_config) == (3, 16, 16)
    assert kind.image_shape(source.unet_config) == (3, 32, 32)
    assert kind.notes == []  # the shipped autoencoder records its scaling_factor


class _ToLatents:
    """A one-step stand-in for the scheduler, whose step returns given latents: LDMPipeline then decodes exactly them."""

    init_noise_sigma = 1.0
    timesteps = torch.tensor([0])

    def __init__(self, latents):
        self.latents = latents

    def set_timesteps(self, steps):
        pass

    def scale_model_input(self, sample, t):
        return sample

    def step(self, noise_prediction, t, latents, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(prev_sample=self.latents)


def test_encoding_is_the_scaling_ldmpipeline_decodes(teacher):
    """encode -> LDMPipeline's own decoding gives the autoencoder's reconstruction; a wrong scale would not."""
    from diffusers import LDMPipeline

    _, unet, kind = teacher
    vqvae = kind.components["vqvae"]
    images = evaluation.builtin_reference("photos", "test", 32, max_samples=6).images.float() / 127.5 - 1
    latents = kind.encode(images)
    assert latents.shape == (6, 3, 16, 16)
    assert 0.5 < float(latents.std()) < 2  # the scaling_factor makes the UNet's latents about unit variance
    with torch.no_grad():
        reconstruction = vqvae(images).sample  # VQModel.forward: encode, quantize, decode
    expected = ((reconstruction / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    pipe = LDMPipeline(vqvae=vqvae, unet=unet, scheduler=_ToLatents(latents))
    pipe.set_progress_bar_config(disable=True)
    decoded = pipe(batch_size=6, num_inference_steps=1, output_type="np").images
    np.testing.assert_allclose(decoded, expected, atol=1e-4)
    ours = ((kind.decode(latents) / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    # The test can tell: latents off by the scaling factor decode to something else.
    pipe.scheduler = _ToLatents(latents / kind.scaling_factor)
    wrong = pipe(batch_size=6, num_inference_steps=1, output_type="np").images
    assert np.abs(wrong - expected).max() > 0.05


def test_evaluation_of_the_teacher_against_itself(teacher):
    _, unet, kind = teacher
    comparison = evaluation.evaluate_against_teacher(unet, unet, kind.scheduler, 8, num_inference_steps=4, seed=3,
                                                     dataset_name="photos", progress=False, pipeline_kind=kind)
    metrics = {m.key: m.value for m in comparison.metrics}
    assert metrics["ssim_vs_teacher"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["fid_photos_classifier"] == pytest.approx(metrics["fid_photos_classifier_teacher"])
    assert comparison.teacher_images.dtype == torch.uint8 and comparison.teacher_images.shape == (8, 3, 32, 32)
    ssim_row = next(m for m in comparison.metrics if m.key == "ssim_vs_teacher")
    assert "latent space, decoded" in ssim_row.how


def test_teacher_samples_are_closer_to_the_photos_than_noise_is(teacher):
    """48 decoded samples against the held-out crops, in the photos classifier's features."""
    _, unet, kind = teacher
    samples, _ = evaluation.paired_samples(unet, unet, kind.scheduler, 48, num_inference_steps=20, seed=7, kind=kind)
    assert samples.shape == (48, 3, 32, 32)
    reference = evaluation.builtin_reference("photos", "test", 32)
    noise = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(0)).add(1).div(2).clamp(0, 1)
    teacher_fid = evaluation.builtin_fid_kid(samples, reference, "photos")["fid_photos_classifier"]
    noise_fid = evaluation.builtin_fid_kid(noise, reference, "photos")["fid_photos_classifier"]
    print(f"\nFID (photos classifier features), 48 images: latent teacher {teacher_fid:.2f}, noise {noise_fid:.2f}")
    assert teacher_fid < 0.8 * noise_fid


CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):  # both are installed in the test venv: hide them
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("diffusers_gfprune", "pipelines"):
                raise ImportError(f"{name} is blocked in this process")

    sys.meta_path.insert(0, Block())

    import torch
    from diffusers import DiffusionPipeline, LDMPipeline

    torch.set_num_threads(1)
    stock, per_layer, out_path = sys.argv[1:4]
    result = {}
    try:
        LDMPipeline.from_pretrained(per_layer)
        result["refused_without_flag"] = None
    except Exception as e:
        result["refused_without_flag"] = type(e).__name__
    for name, source, kwargs in (("stock", stock, {}), ("per_layer", per_layer, {"trust_remote_code": True})):
        for loader in (LDMPipeline, DiffusionPipeline):
            pipe = loader.from_pretrained(source, **kwargs)
            pipe.set_progress_bar_config(disable=True)
            images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np").images
            result[f"{name}/{loader.__name__}"] = {
                "pipeline": type(pipe).__name__, "unet": type(pipe.unet).__name__, "vqvae": type(pipe.vqvae).__name__,
                "params": sum(p.numel() for p in pipe.unet.parameters()), "images": images.tolist(),
                "pruning_info": dict(pipe.config.get("pruning_info") or {}),
            }
    result["package_imported"] = any(m.split(".")[0] in ("diffusers_gfprune", "pipelines") for m in sys.modules)
    json.dump(result, open(out_path, "w"))
    """
)


def narrowed_unet(unet):
    """A per-layer UNet: the first ResNet's hidden width halved (whole GroupNorm groups), the teacher's weights sliced."""
    from diffusers_gfprune.modeling_pruned_unet import PrunedUNet2DModel

    block = "down_blocks.0.resnets.0"
    width = unet.get_submodule(f"{block}.conv1").out_channels // 2
    groups = unet.get_submodule(f"{block}.norm2").num_groups // 2
    widths = {f"{block}.conv1": {"in_channels": unet.get_submodule(f"{block}.conv1").in_channels, "out_channels": width},
              f"{block}.time_emb_proj": {"in_features": unet.get_submodule(f"{block}.time_emb_proj").in_features,
                                         "out_features": width},
              f"{block}.norm2": {"num_groups": groups, "num_channels": width},
              f"{block}.conv2": {"in_channels": width, "out_channels": unet.get_submodule(f"{block}.conv2").out_channels}}
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    pruned = PrunedUNet2DModel(**config, pruned_widths=widths)
    state = {}
    for name, tensor in unet.state_dict().items():
        target = pruned.state_dict()[name]
        state[name] = tensor[tuple(slice(0, n) for n in target.shape)].clone()
    pruned.load_state_dict(state)
    return pruned.eval()


def test_stock_and_per_layer_outputs_load_without_the_package(teacher, tmp_path):
    """The teacher with plain LDMPipeline / DiffusionPipeline; the per-layer variant with trust_remote_code only."""
    from diffusers import LDMPipeline

    _, unet, kind = teacher
    pruned = narrowed_unet(unet)
    info = {"base_model": "ldm-photos", "criterion": "magnitude", "sparsity": 0.01, "layout": "per-layer",
            "params": {"dense": sum(p.numel() for p in unet.parameters()), "pruned": sum(p.numel() for p in pruned.parameters())},
            "macs": {"dense": 2, "pruned": 1}}
    pipeline = kind.build_pipeline(pruned, pruning_info=info)
    assert type(pipeline).__name__ == "GFPruneLDMPipeline" and pipeline.vqvae is kind.components["vqvae"]
    folder = tmp_path / "per-layer"
    from diffusers_gfprune.modeling_pruned_unet import save_pruned_pipeline

    save_pruned_pipeline(pipeline, folder)
    assert (folder / "pipeline_gfprune_ldm.py").is_file() and (folder / "unet" / "modeling_pruned_unet.py").is_file()
    assert REPO_ROOT not in (folder / "vqvae" / "config.json").read_text()  # the teacher's folder by base name only
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np").images
    teacher_pipe = LDMPipeline.from_pretrained(TEACHER)
    teacher_pipe.set_progress_bar_config(disable=True)
    teacher_images = teacher_pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                                  output_type="np").images

    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", CHILD, TEACHER, str(folder), str(out)], capture_output=True, text=True,
                         env=env, cwd=str(tmp_path), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["refused_without_flag"] is not None and not result["package_imported"]
    for loader in ("LDMPipeline", "DiffusionPipeline"):
        stock = result[f"stock/{loader}"]
        assert (stock["pipeline"], stock["unet"], stock["vqvae"]) == ("LDMPipeline", "UNet2DModel", "VQModel")
        np.testing.assert_allclose(np.array(stock["images"]), teacher_images, atol=1e-5)
        variant = result[f"per_layer/{loader}"]
        assert (variant["pipeline"], variant["unet"]) == ("GFPruneLDMPipeline", "PrunedUNet2DModel")
        assert variant["params"] == info["params"]["pruned"] < info["params"]["dense"]
        assert variant["pruning_info"] == info
        np.testing.assert_allclose(np.array(variant["images"]), expected, atol=1e-5)
    assert np.abs(expected - teacher_images).max() > 1e-3  # the narrowed UNet is another model


def test_variant_loads_in_process_without_remote_code(teacher, tmp_path):
    """With this package imported, GFPruneLDMPipeline.from_pretrained runs no code from the folder."""
    from pipelines.pipeline_gfprune_ldm import GFPruneLDMPipeline

    _, unet, kind = teacher
    pruned = narrowed_unet(unet)
    info = {"base_model": "x", "criterion": "random", "sparsity": 0.1, "layout": "per-layer",
            "params": {"dense": 1, "pruned": sum(p.numel() for p in pruned.parameters())}, "macs": {"dense": 2, "pruned": 1}}
    from diffusers_gfprune.publish import save_gfprune_pipeline

    save_gfprune_pipeline(pruned, kind.scheduler, info, tmp_path / "v", vqvae=kind.components["vqvae"])
    loaded = GFPruneLDMPipeline.from_pretrained(tmp_path / "v")
    assert type(loaded) is GFPruneLDMPipeline and loaded.pruning_info == info
    assert type(loaded.unet).__module__ == "diffusers_gfprune.modeling_pruned_unet"
    assert not [m for m in sys.modules if m.startswith("diffusers_modules.local.v")]


def test_train_ddpm_latent_path_saves_an_ldm_pipeline_and_resumes(tmp_path):
    """train_ddpm.py on the shipped autoencoder's latents: an LDMPipeline folder, and a resumed run ends where an
    uninterrupted one does (from cached latents; no --random_flip: its draws from torch's global generator do not
    resume exactly, on pixels either, because the loader fetches a batch ahead of the saved random state)."""
    from diffusers import LDMPipeline
    from safetensors.torch import load_file

    from .conftest import load_script

    train_ddpm = load_script("train_ddpm")
    common = ["--dataset_name", "photos", "--vqvae_model_name_or_path", TEACHER, "--block_out_channels", "8", "16",
              "--norm_num_groups", "4", "--attention_levels", "1", "--train_batch_size", "4", "--max_train_samples", "16",
              "--latent_cache_mb", "1", "--checkpointing_steps", "2", "--validation_steps", "100",
              "--num_inference_steps", "2", "--num_validation_images", "2", "--report_to", "none", "--lr_warmup_steps", "0"]
    train_ddpm.main(common + ["--output_dir", str(tmp_path / "full"), "--max_train_steps", "4"])
    train_ddpm.main(common + ["--output_dir", str(tmp_path / "part"), "--max_train_steps", "2"])
    train_ddpm.main(common + ["--output_dir", str(tmp_path / "part"), "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    full = load_file(str(tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors"))
    resumed = load_file(str(tmp_path / "part" / "unet" / "diffusion_pytorch_model.safetensors"))
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=0)
    pipe = LDMPipeline.from_pretrained(tmp_path / "full")
    assert pipe.unet.config.sample_size == 16 and pipe.unet.config.in_channels == 3
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.clip_sample is False
    assert json.loads((tmp_path / "full" / "training_summary.json").read_text())["latent_cache"] is True
    assert REPO_ROOT not in (tmp_path / "full" / "vqvae" / "config.json").read_text()


def test_train_vqmodel_saves_a_measured_autoencoder_and_resumes(tmp_path):
    """A few steps of train_vqmodel.py: a safetensors VQModel with its scaling factor from the data, its held-out
    reconstruction quality, and a resumed run that ends where an uninterrupted one does."""
    from diffusers import VQModel
    from safetensors.torch import load_file

    from .conftest import load_script

    train_vqmodel = load_script("train_vqmodel")
    common = ["--block_out_channels", "16", "32", "--num_vq_embeddings", "16", "--train_batch_size", "4",
              "--max_train_samples", "32", "--quantize_after", "2", "--restart_dead_codes_every", "2",
              "--checkpointing_steps", "3", "--num_eval_images", "8", "--report_to", "none", "--lr_warmup_steps", "0"]
    train_vqmodel.main(common + ["--output_dir", str(tmp_path / "full"), "--max_train_steps", "6"])
    train_vqmodel.main(common + ["--output_dir", str(tmp_path / "part"), "--max_train_steps", "3"])
    train_vqmodel.main(common + ["--output_dir", str(tmp_path / "part"), "--max_train_steps", "6", "--resume_from_checkpoint", "latest"])
    full = load_file(str(tmp_path / "full" / "diffusion_pytorch_model.safetensors"))
    resumed = load_file(str(tmp_path / "part" / "diffusion_pytorch_model.safetensors"))
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=0)
    vqvae = VQModel.from_pretrained(tmp_path / "full")
    summary = json.loads((tmp_path / "full" / "training_summary.json").read_text())
    assert vqvae.config.scaling_factor == pytest.approx(summary["scaling_factor"]) and summary["scaling_factor"] != 1.0
    assert summary["latent_shape"] == [3, 16, 16] and summary["held_out_images"] == 8
    quantized = summary["reconstruction"]["quantized"]
    assert 0 < quantized["psnr_db"] < 60 and -1 <= quantized["ssim"] <= 1 and 1 <= quantized["codes_used"] <= 16
    assert (tmp_path / "full" / "reconstructions.png").is_file()
    with pytest.raises(ValueError, match="norm_num_groups"):
        train_vqmodel.main(common + ["--output_dir", str(tmp_path / "bad"), "--block_out_channels", "24", "32"])
