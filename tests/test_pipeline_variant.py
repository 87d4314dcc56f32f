"""GFPruneDDPMPipeline: the published per-layer pipeline, shipped as code with its pruning_info.

Fresh processes block both ``diffusers_gfprune`` and the local ``pipelines`` package, so everything they load comes
from the saved folder (or the fake Hub) and diffusers alone.
"""

import ast
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file

from diffusers_gfprune.modeling_pruned_unet import PrunedUNet2DModel, save_pruned_pipeline
from diffusers_gfprune.publish import save_gfprune_pipeline
from pipelines.pipeline_gfprune_ddpm import GFPruneDDPMPipeline

from .test_modeling_pruned_unet import inputs, make_unet

TOLERANCE = 1e-5
STEPS = 2

CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):  # both are installed (editable) in the test venv: hide them
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("diffusers_gfprune", "pipelines"):
                raise ImportError(f"{name} is blocked in this process")

    sys.meta_path.insert(0, Block())

    import torch
    from diffusers import DDPMPipeline, DiffusionPipeline
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    ref_path, out_path, sources = sys.argv[1], sys.argv[2], sys.argv[3:]
    ref = load_file(ref_path)
    loaders = (DiffusionPipeline, DDPMPipeline)
    result = {source: {} for source in sources}
    for source in sources:  # refusals first, while no code from any source has run yet
        for loader in loaders:
            try:
                loader.from_pretrained(source)
                refused = None
            except Exception as e:
                dynamic = sorted(m for m in sys.modules if m.startswith("diffusers_modules"))
                refused = [type(e).__name__, str(e), dynamic]
            result[source][loader.__name__] = {"refused": refused}
    for source in sources:
        for loader in loaders:
            pipe = loader.from_pretrained(source, trust_remote_code=True)
            pipe.set_progress_bar_config(disable=True)
            with torch.no_grad():
                out = pipe.unet(ref["sample"], ref["timestep"]).sample
            images = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=%d,
                          output_type="np").images
            result[source][loader.__name__].update({
                "pipeline": [type(pipe).__module__, type(pipe).__name__],
                "is_ddpm_pipeline": isinstance(pipe, DDPMPipeline),
                "unet": [type(pipe.unet).__module__, type(pipe.unet).__name__],
                "pruning_info": pipe.pruning_info,
                "unet_max_abs_diff": float((out - ref["out"]).abs().max()),
                "images_max_abs_diff": float(abs(images - ref["images"].numpy()).max()),
            })
    result["package_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers_gfprune", "pipelines"))
    with open(out_path, "w") as f:
        json.dump(result, f)
    """
    % STEPS
)


def pruning_info_for(unet):
    pruned = sum(p.numel() for p in unet.parameters())
    return {
        "base_model": "google/ddpm-cifar10-32",
        "criterion": "gradient-flow",
        "sparsity": 0.3,
        "layout": "per-layer",
        "params": {"dense": 2 * pruned, "pruned": pruned},
        "macs": {"dense": 6.1e9, "pruned": 3.4e9},
        "extra": {"steps": [1, 2], "note": None, "finetuned": True},
    }


def sample_images(pipe):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(batch_size=1, generator=generator, num_inference_steps=STEPS, output_type="np").images


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A pipeline saved with save_gfprune_pipeline, and reference outputs of the in-memory one."""
    tmp = tmp_path_factory.mktemp("gfprune")
    unet = make_unet()
    info = pruning_info_for(unet)
    folder = tmp / "pipeline"
    pipe = save_gfprune_pipeline(unet, DDPMScheduler(num_train_timesteps=50), info, folder)
    sample, timestep = inputs()
    with torch.no_grad():
        out = unet(sample, timestep).sample
    images = sample_images(pipe)
    ref = tmp / "ref.safetensors"
    save_file({"sample": sample, "timestep": timestep, "out": out, "images": torch.from_numpy(images)}, ref)
    return {"folder": folder, "ref": ref, "info": info, "sample": sample, "timestep": timestep, "out": out,
            "images": images}


def run_child(sources, ref, tmp_path, env):
    """Load every source in one fresh interpreter (starting one costs seconds), both loaders each."""
    out_path = tmp_path / "child.json"
    child_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    child_env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    args = [sys.executable, "-c", CHILD, str(ref), str(out_path), *map(str, sources)]
    result = subprocess.run(args, cwd=tmp_path, env=child_env, capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise AssertionError(f"child failed:\n{result.stderr[-4000:]}")
    return json.loads(out_path.read_text())


def test_folder_layout(saved):
    folder = saved["folder"]
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == [
        "model_index.json",
        "pipeline_gfprune_ddpm.py",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/modeling_pruned_unet.py",
    ]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_gfprune_ddpm", "GFPruneDDPMPipeline"]
    assert index["unet"] == ["modeling_pruned_unet", "PrunedUNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["pruning_info"] == saved["info"]
    # the shipped code is the code of this checkout, and imports neither local package
    import pipelines.pipeline_gfprune_ddpm as local_pipeline
    from diffusers_gfprune import modeling_pruned_unet as local_unet

    for shipped, local in ((folder / "pipeline_gfprune_ddpm.py", local_pipeline),
                           (folder / "unet" / "modeling_pruned_unet.py", local_unet)):
        assert shipped.read_bytes() == open(local.__file__, "rb").read()
        tree = ast.parse(shipped.read_text())
        imported = {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))  # no relative import
        assert {m.split(".")[0] for m in imported} <= {"torch", "diffusers"} | set(sys.stdlib_module_names), imported
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".pipeline.")]  # no temp folder left


def test_fresh_process_loads_shipped_code(saved, fake_hub, tmp_path):
    """(a) DiffusionPipeline / DDPMPipeline.from_pretrained(trust_remote_code=True) without the package, from the
    folder and from a Hub repository (the root-level pipeline file is downloaded too); (b) refused without it."""
    fake_hub.seed_repo("user/gfprune", saved["folder"])
    sources = [str(saved["folder"]), "user/gfprune"]
    result = run_child(sources, saved["ref"], tmp_path, fake_hub.subprocess_env())
    assert result.pop("package_imported") == []
    assert sorted(result) == sorted(sources)
    for source in sources:
        for loader in ("DiffusionPipeline", "DDPMPipeline"):
            r = result[source][loader]
            # (b) refused by diffusers itself, before any code of any source ran
            name, message, dynamic_modules = r["refused"]
            assert name == "ValueError", (source, loader, message)
            assert "trust_remote_code=True" in message and "pipeline_gfprune_ddpm.py" in message
            assert not any(m.endswith((".pipeline_gfprune_ddpm", ".modeling_pruned_unet")) for m in dynamic_modules)
            # (a) the shipped classes, whichever entry point
            assert r["pipeline"][1] == "GFPruneDDPMPipeline" and r["is_ddpm_pipeline"]
            assert r["pipeline"][0].startswith("diffusers_modules.")
            assert r["pipeline"][0].endswith(".pipeline_gfprune_ddpm")
            assert r["unet"][1] == "PrunedUNet2DModel"
            assert r["unet"][0].startswith("diffusers_modules.") and r["unet"][0].endswith(".modeling_pruned_unet")
            assert r["pruning_info"] == saved["info"]
            assert r["unet_max_abs_diff"] <= TOLERANCE and r["images_max_abs_diff"] <= TOLERANCE, (source, loader)


def test_local_class_loads_without_remote_code(saved):
    """(c) With the package: the locally imported class loads the folder and runs none of its code."""
    before = set(sys.modules)
    pipe = GFPruneDDPMPipeline.from_pretrained(saved["folder"])
    assert not [m for m in set(sys.modules) - before if m.startswith("diffusers_modules")]
    assert type(pipe) is GFPruneDDPMPipeline and type(pipe.unet) is PrunedUNet2DModel
    assert pipe.pruning_info == saved["info"] and pipe.name_or_path == str(saved["folder"])
    assert not pipe.unet.training
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(saved["sample"], saved["timestep"]).sample, saved["out"],
                                   atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(sample_images(pipe), saved["images"], atol=TOLERANCE, rtol=0)
    # `pruning_info` is a copy: editing it changes nothing
    pipe.pruning_info["sparsity"] = 0.9
    assert pipe.pruning_info == saved["info"]


def test_resave_round_trip(saved, tmp_path):
    """A loaded pipeline saves again to the same model_index.json and code."""
    pipe = GFPruneDDPMPipeline.from_pretrained(saved["folder"])
    again = tmp_path / "again"
    save_pruned_pipeline(pipe, again)
    for name in ("pipeline_gfprune_ddpm.py", "unet/modeling_pruned_unet.py"):
        assert (again / name).read_bytes() == (saved["folder"] / name).read_bytes(), name
    for name in ("model_index.json", "unet/config.json"):
        config = json.loads((again / name).read_text())
        config.pop("_name_or_path")  # diffusers records where a loaded pipeline / model came from
        assert config == json.loads((saved["folder"] / name).read_text()), name


def test_local_class_loads_from_hub(saved, fake_hub):
    """(c) from a Hub repository."""
    fake_hub.seed_repo("user/gfprune", saved["folder"])
    pipe = GFPruneDDPMPipeline.from_pretrained("user/gfprune")
    assert type(pipe) is GFPruneDDPMPipeline and type(pipe.unet) is PrunedUNet2DModel
    assert pipe.pruning_info == saved["info"]
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(saved["sample"], saved["timestep"]).sample, saved["out"],
                                   atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"sparsity": (0.1, 0.2)}, "tuple"),
        ({"sparsity": torch.tensor(0.5)}, "Tensor"),
        ({"sparsity": np.float32(0.5)}, "float32"),
        ({"sparsity": math.nan}, "finite"),
        ({"extra": {1: "a"}}, "not a str"),
    ],
)
def test_pruning_info_must_be_json_data(bad, match):
    unet = make_unet()
    with pytest.raises(ValueError, match=match):
        GFPruneDDPMPipeline(unet=unet, scheduler=DDPMScheduler(), pruning_info={**pruning_info_for(unet), **bad})
    with pytest.raises(ValueError, match="must be a dict"):
        GFPruneDDPMPipeline(unet=unet, scheduler=DDPMScheduler(), pruning_info=[1])
    assert GFPruneDDPMPipeline(unet=unet, scheduler=DDPMScheduler()).pruning_info == {}


def test_save_checks_pruning_info(tmp_path):
    unet = make_unet()
    info = pruning_info_for(unet)
    cases = [
        ({k: v for k, v in info.items() if k != "macs"}, "lacks \\['macs'\\]"),
        ({**info, "params": {"dense": 1}}, "numeric 'dense' and 'pruned'"),
        ({**info, "params": {"dense": 1, "pruned": 1}}, "parameters"),
        ({**info, "layout": 1}, "must be a str"),
        ({**info, "extra": {"tensor": torch.zeros(1)}}, "JSON data"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            save_gfprune_pipeline(unet, DDPMScheduler(), bad, tmp_path / "pipeline")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp folder left
