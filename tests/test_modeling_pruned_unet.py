"""PrunedUNet2DModel: per-layer widths in the config, and pipelines that load as remote code without this package."""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from safetensors.torch import load_file, save_file

from diffusers_gfprune import modeling_pruned_unet
from diffusers_gfprune.modeling_pruned_unet import PrunedUNet2DModel, save_pruned_pipeline

DENSE = dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
    norm_num_groups=8, attention_head_dim=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)
RESNET = "down_blocks.0.resnets.0"
ATTN = "down_blocks.1.attentions.0"  # dense: 8 heads of 8 channels on 64 channels
PRUNED_WIDTHS = {
    # the resnet's inner width 32 -> 16 (GroupNorm 8 -> 4 groups)
    f"{RESNET}.conv1": {"in_channels": 32, "out_channels": 16},
    f"{RESNET}.norm2": {"num_groups": 4, "num_channels": 16},
    f"{RESNET}.time_emb_proj": {"in_features": 128, "out_features": 16},
    f"{RESNET}.conv2": {"in_channels": 16, "out_channels": 32},
    # the attention's inner width 64 -> 32, as 2 heads of 16 (so the softmax scale changes too)
    ATTN: {"heads": 2, "dim_head": 16},
    f"{ATTN}.to_q": {"in_features": 64, "out_features": 32},
    f"{ATTN}.to_k": {"in_features": 64, "out_features": 32},
    f"{ATTN}.to_v": {"in_features": 64, "out_features": 32},
    f"{ATTN}.to_out.0": {"in_features": 32, "out_features": 64},
}
TOLERANCE = 1e-5


def make_unet(seed: int = 0) -> PrunedUNet2DModel:
    torch.manual_seed(seed)
    unet = PrunedUNet2DModel(**DENSE, pruned_widths=PRUNED_WIDTHS).eval()
    with torch.no_grad():  # random GroupNorm affines and biases so that every weight matters
        for p in unet.parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.5)
    return unet


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 16, 16, generator=g), torch.tensor([3, 17])


def run_unet(unet, sample, timestep):
    with torch.no_grad():
        return unet(sample, timestep).sample


def sample_images(pipe) -> np.ndarray:
    return pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np").images


def make_pipeline() -> DDPMPipeline:
    pipe = DDPMPipeline(unet=make_unet(), scheduler=DDPMScheduler(num_train_timesteps=50))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_signature_repeats_unet2dmodel():
    dense = list(inspect.signature(UNet2DModel.__init__).parameters.values())
    pruned = list(inspect.signature(PrunedUNet2DModel.__init__).parameters.values())
    assert [(p.name, p.default) for p in pruned[:-1]] == [(p.name, p.default) for p in dense]
    assert pruned[-1].name == "pruned_widths" and pruned[-1].default is None


def test_pruned_shapes_and_forward():
    unet = make_unet()
    params = dict(unet.named_parameters())
    assert params[f"{RESNET}.conv1.weight"].shape == (16, 32, 3, 3)
    assert params[f"{RESNET}.conv1.bias"].shape == (16,)
    assert params[f"{RESNET}.norm2.weight"].shape == (16,)
    assert unet.get_submodule(f"{RESNET}.norm2").num_groups == 4
    assert params[f"{RESNET}.time_emb_proj.weight"].shape == (16, 128)
    assert params[f"{RESNET}.conv2.weight"].shape == (32, 16, 3, 3)
    for proj in ("to_q", "to_k", "to_v"):
        assert params[f"{ATTN}.{proj}.weight"].shape == (32, 64)
    assert params[f"{ATTN}.to_out.0.weight"].shape == (64, 32)
    attn = unet.get_submodule(ATTN)
    assert (attn.heads, attn.inner_dim, attn.scale) == (2, 32, 16**-0.5)
    # settings other than the size are kept
    conv1 = unet.get_submodule(f"{RESNET}.conv1")
    assert (conv1.kernel_size, conv1.padding, conv1.stride) == ((3, 3), (1, 1), (1, 1))
    assert unet.get_submodule(f"{RESNET}.norm2").eps == DENSE.get("norm_eps", 1e-5)
    # untouched layers keep their dense shapes
    dense = UNet2DModel(**DENSE)
    dense_params = dict(dense.named_parameters())
    changed = {f"{name}.{p}" for name in PRUNED_WIDTHS for p in ("weight", "bias")}
    assert all(p.shape == dense_params[n].shape for n, p in params.items() if n not in changed)
    assert unet.num_parameters() < dense.num_parameters()

    sample, timestep = inputs()
    out = run_unet(unet, sample, timestep)
    assert out.shape == sample.shape and torch.isfinite(out).all()
    # the explicit-softmax processor reads `attn.scale` / `attn.heads`; SDPA derives them from the shapes
    assert isinstance(attn.processor, AttnProcessor2_0)
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    torch.testing.assert_close(run_unet(unet, sample, timestep), out, atol=TOLERANCE, rtol=0)


def test_save_pretrained_round_trip(tmp_path):
    unet = make_unet()
    unet.save_pretrained(tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["_class_name"] == "PrunedUNet2DModel" and config["pruned_widths"] == PRUNED_WIDTHS
    loaded = PrunedUNet2DModel.from_pretrained(tmp_path / "unet").eval()
    assert loaded.config.pruned_widths == PRUNED_WIDTHS
    state, loaded_state = unet.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    sample, timestep = inputs()
    torch.testing.assert_close(run_unet(loaded, sample, timestep), run_unet(unet, sample, timestep), atol=0, rtol=0)


CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockPackage(importlib.abc.MetaPathFinder):  # the venv has the package installed (editable): hide it
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "diffusers_gfprune":
                raise ImportError(f"{name} is blocked in this process")

    sys.meta_path.insert(0, BlockPackage())
    try:
        import diffusers_gfprune  # noqa: F401
        raise SystemExit("diffusers_gfprune is importable in the child process")
    except ImportError:
        pass

    import numpy as np
    import torch
    from diffusers import DDPMPipeline
    from safetensors.torch import load_file

    folder, ref_path, out_path = sys.argv[1:4]
    result = {}
    try:
        DDPMPipeline.from_pretrained(folder)
        result["without_trust"] = "loaded"
    except ValueError as e:
        result["without_trust"] = str(e)

    pipe = DDPMPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    ref = load_file(ref_path)
    with torch.no_grad():
        out = unet(ref["sample"], ref["timestep"]).sample
    images = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                  output_type="np").images
    result.update(
        cls=type(unet).__name__,
        module=type(unet).__module__,
        pruned_widths=unet.config.pruned_widths,
        shapes={k: list(v.shape) for k, v in unet.state_dict().items()},
        out_diff=float((out - ref["out"]).abs().max()),
        images_diff=float(np.abs(images - ref["images"].numpy()).max()),
        package_imported=any(m.split(".")[0] == "diffusers_gfprune" for m in sys.modules),
    )
    with open(out_path, "w") as f:
        json.dump(result, f)
    """
)


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    """A pipeline saved with save_pruned_pipeline, its reference outputs, and the temporary root."""
    root = tmp_path_factory.mktemp("remote")
    pipe = make_pipeline()
    folder = root / "pipeline"
    save_pruned_pipeline(pipe, folder)
    sample, timestep = inputs()
    ref = {"sample": sample, "timestep": timestep, "out": run_unet(pipe.unet, sample, timestep)}
    ref["images"] = torch.from_numpy(sample_images(pipe))
    save_file(ref, root / "ref.safetensors")
    return folder, pipe, root


def test_saved_layout(saved_pipeline):
    folder, pipe, root = saved_pipeline
    model_index = json.loads((folder / "model_index.json").read_text())
    assert model_index["_class_name"] == "DDPMPipeline"
    assert model_index["unet"] == ["modeling_pruned_unet", "PrunedUNet2DModel"]
    assert model_index["scheduler"] == ["diffusers", "DDPMScheduler"]
    source = inspect.getsourcefile(modeling_pruned_unet)
    assert (folder / "unet" / "modeling_pruned_unet.py").read_bytes() == open(source, "rb").read()
    assert sorted(os.listdir(folder / "unet")) == [
        "config.json", "diffusion_pytorch_model.safetensors", "modeling_pruned_unet.py"
    ]
    assert not [name for name in os.listdir(root) if name.startswith(".")]  # no temporary folder left behind
    # the copied modeling file never imports this package
    code = (folder / "unet" / "modeling_pruned_unet.py").read_text()
    assert "diffusers_gfprune" not in "".join(l for l in code.splitlines() if l.lstrip().startswith(("import", "from")))


def test_remote_code_load_in_fresh_process(saved_pipeline):
    folder, pipe, root = saved_pipeline
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(root / "hf_modules"))
    out_path = root / "child.json"
    subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(root / "ref.safetensors"), str(out_path)],
        cwd=root, env=env, check=True, timeout=300,
    )
    result = json.loads(out_path.read_text())
    # (b) diffusers' own refusal without trust_remote_code
    assert "trust_remote_code=True" in result["without_trust"]
    assert "modeling_pruned_unet.py" in result["without_trust"]
    # (a) with it: the pruned class from the copied file, pruned shapes, same outputs
    assert not result["package_imported"]
    assert result["cls"] == "PrunedUNet2DModel" and result["module"].startswith("diffusers_modules.")
    assert result["pruned_widths"] == PRUNED_WIDTHS
    assert result["shapes"] == {k: list(v.shape) for k, v in pipe.unet.state_dict().items()}
    assert result["out_diff"] <= TOLERANCE
    assert result["images_diff"] <= TOLERANCE


def test_load_with_package(saved_pipeline):
    folder, pipe, root = saved_pipeline
    unet = PrunedUNet2DModel.from_pretrained(folder, subfolder="unet").eval()
    assert type(unet) is PrunedUNet2DModel
    sample, timestep = inputs()
    torch.testing.assert_close(run_unet(unet, sample, timestep), run_unet(pipe.unet, sample, timestep), atol=0, rtol=0)
    loaded = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"))
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(sample_images(loaded), sample_images(pipe), atol=TOLERANCE, rtol=0)


def test_save_replaces_and_cleans_up(tmp_path, monkeypatch):
    pipe = make_pipeline()
    folder = tmp_path / "pipeline"
    save_pruned_pipeline(pipe, folder)
    (folder / "stale.txt").write_text("from an earlier save")
    save_pruned_pipeline(pipe, folder)  # replaces the folder as a whole
    assert not (folder / "stale.txt").exists() and (folder / "unet" / "modeling_pruned_unet.py").exists()
    assert os.listdir(tmp_path) == ["pipeline"]

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipe, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned_pipeline(pipe, folder)
    assert os.listdir(tmp_path) == ["pipeline"]  # the previous save is untouched, nothing half-written
    assert (folder / "model_index.json").exists()


@pytest.mark.parametrize(
    "widths, match",
    [
        ({"down_blocks.0.resnets.7.conv1": {"in_channels": 32, "out_channels": 16}}, "is not a submodule"),
        ({"": {"in_channels": 1}}, "is not a submodule"),
        ({"conv_act": {"num_features": 8}}, r"'conv_act' is a SiLU, which cannot be resized\. Supported types"),
        ({"down_blocks.0": {"in_channels": 8}}, "'down_blocks.0' is a DownBlock2D, which cannot be resized"),
        ({f"{RESNET}.conv1": {"out_channels": 16}}, r"needs positive integers for the keys \['in_channels'"),
        ({f"{RESNET}.conv1": {"in_channels": 32, "out_channels": 16, "groups": 1}}, "needs positive integers"),
        ({f"{RESNET}.conv1": {"in_channels": 32, "out_channels": 0}}, "needs positive integers"),
        ({ATTN: {"heads": 2, "dim_head": 16}}, f"attention '{ATTN}' has heads \\* dim_head = 32"),
    ],
)
def test_bad_pruned_widths_raise(widths, match):
    with pytest.raises(ValueError, match=match):
        PrunedUNet2DModel(**DENSE, pruned_widths=widths)


def test_plain_save_pretrained_loads_with_package(tmp_path):
    # Without the remote-code layout, model_index.json names `diffusers_gfprune.modeling_pruned_unet`, which
    # diffusers 0.42 resolves from sys.modules (this process imported it); a process without it cannot load this.
    pipe = make_pipeline()
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["unet"] == [
        "diffusers_gfprune.modeling_pruned_unet", "PrunedUNet2DModel"
    ]
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.unet) is PrunedUNet2DModel
    sample, timestep = inputs()
    torch.testing.assert_close(run_unet(loaded.unet, sample, timestep), run_unet(pipe.unet, sample, timestep))
