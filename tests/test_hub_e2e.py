"""The user journey through a Hub: pull the teacher by id, prune, push, and load as a stranger would."""

import json
import os

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from .conftest import load_script
from .test_roundtrip import load_in_fresh_process

TINY_PRUNE = [
    "--max_train_steps", "8", "--soft_steps", "2", "--pruning_steps", "4", "--rescore_every", "1",
    "--train_batch_size", "8", "--score_batch_size", "4", "--score_batches", "1", "--checkpointing_steps", "3",
    "--validation_steps", "100", "--num_inference_steps", "2", "--num_validation_images", "4",
    "--num_eval_images", "8", "--report_to", "none", "--target_sparsity", "0.5",
]


@pytest.mark.parametrize("layout", ["stock", "per-layer"])
def test_prune_from_hub_and_push(layout, fake_hub, tiny_teacher, tmp_path):
    fake_hub.seed_repo("user/tiny-teacher", tiny_teacher["pipeline"])
    repo_id = f"user/tiny-gfp-{layout}"
    output_dir = tmp_path / "out"
    load_script("prune").main([
        "--pretrained_model_name_or_path", "user/tiny-teacher", "--dataset_name", "digits", "--layout", layout,
        "--output_dir", str(output_dir), "--push_to_hub", "--hub_model_id", repo_id, "--hub_token", fake_hub.token,
        *TINY_PRUNE,
    ])
    # The teacher came from the Hub by id.
    assert any("/user/tiny-teacher/resolve/" in path for path in fake_hub.request_paths("GET"))

    # Only the finished folder was pushed: no checkpoints, no logs; with the token.
    pushed = fake_hub.list_files(repo_id)
    assert "model_index.json" in pushed and "README.md" in pushed and "teacher_vs_pruned.png" in pushed
    # (.gitattributes is the Hub's own, made with the repo)
    assert not [p for p in pushed if p.startswith(("checkpoint-", "logs/")) or "/." in p or (p.startswith(".") and p != ".gitattributes")]
    assert any(os.path.isdir(output_dir / p) for p in os.listdir(output_dir) if p.startswith("checkpoint-"))
    assert fake_hub.token in " ".join(h for h in fake_hub.authorization_headers() if h)

    # The token is written nowhere in the output folder.
    for root, _, files in os.walk(output_dir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert fake_hub.token.encode() not in f.read(), f"token found in {name}"

    # The card parses and carries base_model and model-index.
    card = ModelCard.load(repo_id)
    assert card.data.base_model == "user/tiny-teacher"
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.eval_results and {r.metric_type for r in card.data.eval_results} >= {"ssim_vs_teacher"}
    snippet_flag = "trust_remote_code=True" in card.text
    assert snippet_flag == (layout == "per-layer")

    # A stranger loads it by repo id in a fresh process without this package.
    from diffusers import UNet2DModel

    from diffusers_gfprune.modeling_pruned_unet import PrunedUNet2DModel

    cls = UNet2DModel if layout == "stock" else PrunedUNet2DModel
    unet = cls.from_pretrained(output_dir, subfolder="unet").eval()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 1, 16, 16, generator=generator)
    timestep = torch.tensor([10, 900])
    with torch.no_grad():
        out = unet(sample, timestep).sample
    save_file({"sample": sample, "timestep": timestep, "out": out}, tmp_path / "ref.safetensors")
    env = {**fake_hub.subprocess_env(), "HF_HUB_OFFLINE": "0"}
    result = load_in_fresh_process(repo_id, tmp_path / "ref.safetensors", tmp_path, trust_remote_code=layout == "per-layer", env=env)
    assert not result["package_imported"]
    assert result["class"] == cls.__name__
    assert result["max_abs_diff"] <= 1e-5 * max(1.0, result["ref_max"])
    summary = json.loads((output_dir / "pruning_summary.json").read_text())
    assert result["num_parameters"] == summary["pruned"]["params"] < summary["dense"]["params"]


def test_pushed_folder_carries_no_local_path(fake_hub, tiny_teacher, tmp_path, monkeypatch):
    """A run from a local teacher on a local image folder: nothing pushed names the run's folders or the home folder."""
    import getpass
    import shutil

    import numpy as np
    from PIL import Image

    local = tmp_path / "machine_local_place"
    teacher = local / "my-teacher"
    shutil.copytree(tiny_teacher["pipeline"], teacher, ignore=shutil.ignore_patterns("checkpoint-*"))
    images = local / "my-images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(images / f"{i}.png")
    # Inception weights are not cached under this torch home: the card lists Inception FID as not computed, and
    # the reason names the cache folder, which must not be published.
    monkeypatch.setenv("TORCH_HOME", str(local / "torch_home"))
    monkeypatch.setenv("DIFFUSERS_GFPRUNE_OFFLINE", "1")
    output_dir = local / "out"
    repo_id = "user/tiny-gfp-local"
    load_script("prune").main([
        "--pretrained_model_name_or_path", str(teacher), "--train_data_dir", str(images), "--layout", "per-layer",
        "--output_dir", str(output_dir), "--cache_dir", str(local / "cache"), "--push_to_hub", "--hub_model_id", repo_id,
        "--hub_token", fake_hub.token, *TINY_PRUNE,
    ])
    pushed = fake_hub.list_files(repo_id)
    assert "README.md" in pushed and "pruning_summary.json" in pushed
    forbidden = {str(local), str(tmp_path), os.path.expanduser("~"), str(teacher), str(images)}
    user = getpass.getuser()
    found = {}
    for path in pushed:
        content = fake_hub.read_file(repo_id, path)
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError:
            text = content.decode("latin-1")
        hits = [f for f in forbidden if f in text] + ([f"/{user}/"] if f"/{user}/" in text else [])
        if hits:
            found[path] = hits
    assert not found, f"machine-local paths published: {found}"
    card = fake_hub.read_file(repo_id, "README.md").decode()
    # The card names the teacher and the data by their folders' base names, and says why Inception FID is missing.
    assert "`my-teacher`" in card and "`my-images`" in card
    not_computed = card.split("Not computed:", 1)[1].split("\n\n", 1)[0]
    assert "Inception" in not_computed and ".../" in not_computed, not_computed
    summary = json.loads(fake_hub.read_file(repo_id, "pruning_summary.json"))
    assert summary["teacher"] == "my-teacher"
