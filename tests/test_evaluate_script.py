"""training/evaluate.py: a pruned pipeline against its teacher, on a tiny teacher (seconds)."""

import json
import os
import shutil

import pytest
import torch

from .conftest import load_script
from .test_hub_e2e import TINY_PRUNE

EVAL = ["--num_eval_images", "8", "--num_inference_steps", "2", "--throughput_batch_size", "2", "--throughput_repeats", "3",
        "--num_grid_images", "4"]


def _prune_args(eval_images: str):
    args = list(TINY_PRUNE)
    args[args.index("--num_eval_images") + 1] = eval_images
    return args


@pytest.fixture(scope="module")
def pruned(tiny_teacher, tmp_path_factory):
    """Tiny pruned pipelines: "stock" (evaluated by prune.py itself with the arguments of EVAL) and "per-layer"."""
    root = tmp_path_factory.mktemp("pruned")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for layout, eval_images in (("stock", "8"), ("per-layer", "0")):
            load_script("prune").main([
                "--pretrained_model_name_or_path", tiny_teacher["pipeline"], "--dataset_name", "digits", "--layout", layout,
                "--output_dir", str(root / layout), *_prune_args(eval_images),
            ])
    finally:
        torch.set_num_threads(threads)
    return {"stock": str(root / "stock"), "per-layer": str(root / "per-layer"), "teacher": tiny_teacher["pipeline"]}


def evaluate(argv):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_script("evaluate").main(argv)
    finally:
        torch.set_num_threads(threads)


def test_stock_pipeline_matches_the_prune_scripts_own_evaluation(pruned, tmp_path):
    out = tmp_path / "eval"
    results = evaluate(["--pretrained_model_name_or_path", pruned["stock"], "--teacher_model_name_or_path", pruned["teacher"],
                        "--output_dir", str(out), *EVAL])
    assert sorted(os.listdir(out)) == ["eval_results.json", "eval_results.md", "eval_teacher_vs_pruned.png"]
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["metrics"] == pytest.approx(results["metrics"])
    metrics = saved["metrics"]
    assert {"ssim_vs_teacher", "fid_digits_classifier", "fid_digits_classifier_teacher", "fid_digits_classifier_real"} <= set(metrics)
    assert 0 < metrics["ssim_vs_teacher"] <= 1

    # The same function, arguments and models as the end of prune.py: the same numbers.
    with open(os.path.join(pruned["stock"], "pruning_summary.json")) as f:
        summary = json.load(f)
    theirs = {m["key"]: m["value"] for m in summary["evaluation"]["metrics"]}
    assert set(theirs) == set(metrics)
    for key in theirs:
        assert metrics[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), key

    # Sizes from the counter, and the timing with its spread.
    assert saved["counts"]["pruned"]["params"] == summary["pruned"]["params"] < saved["counts"]["teacher"]["params"]
    assert saved["counts"]["pruned"]["macs"] == summary["pruned"]["macs"]
    assert saved["counts"]["teacher"]["macs"] == summary["dense"]["macs"]
    throughput = saved["throughput"]
    assert len(throughput["ratios"]) == 3 and throughput["ratio_min"] <= throughput["ratio"] <= throughput["ratio_max"]

    table = (out / "eval_results.md").read_text()
    assert "| SSIM to the teacher (same noise) |" in table and "| parameters |" in table and "Speed-up" in table
    assert "NOT Inception" in table and "Command: `python training/evaluate.py" in table


def test_per_layer_pipeline_loads_without_remote_code(pruned, tmp_path):
    # The teacher is read from pruning_summary.json; the output goes into the pruned folder's copy.
    folder = tmp_path / "per-layer"
    shutil.copytree(pruned["per-layer"], folder)
    results = evaluate(["--pretrained_model_name_or_path", str(folder), "--throughput_repeats", "0",
                        *[a for a in EVAL if a not in ("--throughput_repeats", "3")]])
    assert results["teacher"] == pruned["teacher"]
    assert results["throughput"] is None
    assert (folder / "eval_results.json").is_file() and (folder / "eval_results.md").is_file()
    summary = json.loads((folder / "pruning_summary.json").read_text())
    assert results["counts"]["pruned"]["params"] == summary["pruned"]["params"]


def _remote_code_copy(pruned, tmp_path):
    """The stock pipeline with its UNet declared as a class that only the folder's own code defines."""
    folder = tmp_path / "remote"
    shutil.copytree(pruned["stock"], folder)
    (folder / "unet" / "custom_unet.py").write_text(
        "from diffusers import UNet2DModel\n\n\nclass CustomUNet(UNet2DModel):\n    pass\n"
    )
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["_class_name"] = "CustomUNet"
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["custom_unet", "CustomUNet"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_remote_code_unet_needs_the_flag(pruned, tmp_path):
    folder = _remote_code_copy(pruned, tmp_path)
    with pytest.raises(ValueError, match="--trust_remote_code"):
        evaluate(["--pretrained_model_name_or_path", str(folder), "--teacher_model_name_or_path", pruned["teacher"],
                  "--output_dir", str(tmp_path / "out"), *EVAL])
    assert not (tmp_path / "out").exists()


def test_remote_code_unet_loads_with_the_flag(pruned, tmp_path, monkeypatch):
    import sys

    # diffusers copies remote code into its modules cache: keep it inside this test's folder.
    for name, module in list(sys.modules.items()):
        if module is not None and name.startswith("diffusers") and "HF_MODULES_CACHE" in vars(module):
            monkeypatch.setattr(module, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = _remote_code_copy(pruned, tmp_path)
    results = evaluate(["--pretrained_model_name_or_path", str(folder), "--teacher_model_name_or_path", pruned["teacher"],
                        "--trust_remote_code", "--output_dir", str(tmp_path / "out"), "--num_eval_images", "4",
                        "--num_inference_steps", "2", "--throughput_repeats", "0", "--num_grid_images", "0"])
    with open(os.path.join(pruned["stock"], "pruning_summary.json")) as f:
        assert results["counts"]["pruned"]["params"] == json.load(f)["pruned"]["params"]


@pytest.mark.parametrize("case", ["one_image", "no_teacher", "digits_fid_on_folder", "wrong_teacher", "missing_weights",
                                  "hub_id_without_output_dir", "missing_pruned"])
def test_bad_input_fails_before_heavy_work(case, pruned, tiny_teacher, tmp_path):
    base = ["--pretrained_model_name_or_path", pruned["stock"], "--teacher_model_name_or_path", pruned["teacher"],
            "--output_dir", str(tmp_path / "out")]
    match = {
        "one_image": "num_eval_images", "no_teacher": "teacher_model_name_or_path", "digits_fid_on_folder": "digits only",
        "wrong_teacher": "not its teacher", "missing_weights": "inception_weights", "hub_id_without_output_dir": "output_dir",
        "missing_pruned": "does not exist",
    }[case]
    if case == "one_image":
        argv = base + ["--num_eval_images", "1"]
    elif case == "no_teacher":
        argv = ["--pretrained_model_name_or_path", tiny_teacher["unet"], "--output_dir", str(tmp_path / "out")]
    elif case == "digits_fid_on_folder":
        argv = base + ["--train_data_dir", str(tmp_path), "--eval_fid", "digits-classifier"]
    elif case == "wrong_teacher":
        other = tmp_path / "other"
        shutil.copytree(tiny_teacher["pipeline"], other)
        config = json.loads((other / "unet" / "config.json").read_text())
        config["sample_size"] = 32
        (other / "unet" / "config.json").write_text(json.dumps(config))
        argv = base[:2] + ["--teacher_model_name_or_path", str(other), "--output_dir", str(tmp_path / "out")]
    elif case == "missing_weights":
        argv = base + ["--inception_weights", str(tmp_path / "missing.pth")]
    elif case == "hub_id_without_output_dir":
        argv = ["--pretrained_model_name_or_path", "user/some-pruned-model", "--teacher_model_name_or_path", pruned["teacher"]]
    else:
        argv = ["--pretrained_model_name_or_path", str(tmp_path / "nothing-here"), "--teacher_model_name_or_path",
                pruned["teacher"], "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=match):
        evaluate(argv)
    assert not (tmp_path / "out").exists()
