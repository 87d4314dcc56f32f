"""Export, save, and load in a fresh process that never imports this package, for both layouts."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

from diffusers_gfprune.export import export_model, prepare_stock
from diffusers_gfprune.masks import UnitMasks
from diffusers_gfprune.modeling_pruned_unet import PrunedUNet2DModel, save_pruned_pipeline
from diffusers_gfprune.selection import masks_from_pruned, select
from diffusers_gfprune.units import find_units

from .architectures import build, random_inputs

CHILD = Path(__file__).with_name("load_in_fresh_process.py")


def load_in_fresh_process(source, ref_path, tmp_path, trust_remote_code=False, env=None):
    out_path = tmp_path / "child.json"
    child_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    child_env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    child_env.update(env or {})
    args = [sys.executable, str(CHILD), str(source), str(ref_path), str(out_path)]
    if trust_remote_code:
        args.append("--trust-remote-code")
    result = subprocess.run(args, cwd=tmp_path, env=child_env, capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise AssertionError(f"child failed:\n{result.stderr[-4000:]}")
    return json.loads(out_path.read_text())


@pytest.mark.parametrize("layout", ["stock", "per-layer"])
def test_export_save_and_reload_in_fresh_process(layout, tmp_path):
    model = build("tiny_1ch_16px")
    units = find_units(model)
    if layout == "stock":
        prepare_stock(model, units, 0.5)
    masks = UnitMasks(model, units)
    scores = {f.name: torch.rand(f.num_units, generator=torch.Generator().manual_seed(1)) for f in units}
    masks.load_state_dict(masks_from_pruned(select(scores, units, 0.5, "local" if layout == "stock" else "global")))
    pruned = export_model(model, units, masks, layout)
    folder = tmp_path / "pipeline"
    save_pruned_pipeline(DDPMPipeline(unet=pruned, scheduler=DDPMScheduler(num_train_timesteps=1000)), folder)

    model_index = json.loads((folder / "model_index.json").read_text())
    expected = ["diffusers", "UNet2DModel"] if layout == "stock" else ["modeling_pruned_unet", "PrunedUNet2DModel"]
    assert model_index["unet"] == expected
    assert sorted(p.name for p in (folder / "unet").iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")) == []
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()

    sample, timestep = random_inputs(pruned, batch=2, seed=3)
    with torch.no_grad():
        out = pruned(sample, timestep).sample
    save_file({"sample": sample, "timestep": timestep, "out": out}, tmp_path / "ref.safetensors")
    result = load_in_fresh_process(folder, tmp_path / "ref.safetensors", tmp_path, trust_remote_code=layout == "per-layer")
    assert not result["package_imported"]
    assert result["class"] == expected[1]
    assert result["num_parameters"] == sum(p.numel() for p in pruned.parameters())
    assert result["max_abs_diff"] <= 1e-5 * max(1.0, result["ref_max"])
    assert result["image_shape"] == [1, 16, 16, 1] and result["image_finite"]

    # In a process with the package: the layouts load directly too.
    cls = UNet2DModel if layout == "stock" else PrunedUNet2DModel
    again = cls.from_pretrained(folder, subfolder="unet")
    with torch.no_grad():
        torch.testing.assert_close(again(sample, timestep).sample, out, rtol=0, atol=0)


def test_stock_folder_loads_without_any_flag(tmp_path):
    """A stock folder is a plain DDPMPipeline: no trust_remote_code, no code files."""
    model = build("tiny_1ch_16px")
    units = find_units(model)
    prepare_stock(model, units, 0.25)
    masks = UnitMasks(model, units)
    masks.load_state_dict(masks_from_pruned(select({f.name: torch.arange(f.num_units).float() for f in units}, units, 0.25)))
    pruned = export_model(model, units, masks, "stock")
    folder = tmp_path / "stock"
    save_pruned_pipeline(DDPMPipeline(unet=pruned, scheduler=DDPMScheduler()), folder)
    assert not list(folder.rglob("*.py"))
    assert json.loads((folder / "unet" / "config.json").read_text())["_class_name"] == "UNet2DModel"
    assert type(DDPMPipeline.from_pretrained(folder).unet) is UNet2DModel
