"""benchmarks/criteria.py --quick on a tiny teacher: every criterion runs and the report is complete (not who wins)."""

import json
import math
import os

import pytest
import torch

from .conftest import load_script

CRITERIA = ("gradient_flow", "diff_pruning", "taylor", "magnitude", "random")


def load_benchmark():
    return load_script("criteria", "benchmarks")


@pytest.fixture(scope="module")
def quick(tiny_teacher, tmp_path_factory):
    """One --quick benchmark (one seed, to stay fast) into a docs folder that already has hand-written text."""
    root = tmp_path_factory.mktemp("criteria_benchmark")
    docs = root / "docs"
    docs.mkdir()
    bench = load_benchmark()
    (docs / "benchmarks.md").write_text(
        "# Benchmarks\n\nHand-written analysis that must survive.\n\n" + bench.BEGIN_MARK + "\nstale table\n" + bench.END_MARK
        + "\n\nMore hand-written text.\n"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = bench.main(["--quick", "--teacher", tiny_teacher["pipeline"], "--output_dir", str(root / "out"),
                              "--docs_dir", str(docs), "--seeds", "0"])
    finally:
        torch.set_num_threads(threads)
    return {"results": results, "docs": docs, "out": root / "out"}


def test_every_criterion_ran_and_was_measured(quick):
    saved = json.loads((quick["docs"] / "benchmarks_criteria.json").read_text())
    assert saved == json.loads((quick["out"] / "criteria_results.json").read_text())
    assert saved["criteria"] == list(CRITERIA)
    assert sorted((r["criterion"], r["seed"]) for r in saved["runs"]) == sorted((c, 0) for c in CRITERIA)
    teacher = saved["teacher"]
    for run in saved["runs"]:
        assert math.isfinite(run["fid_digits_classifier"]) and run["fid_digits_classifier"] >= 0
        assert 0 < run["ssim_vs_teacher"] <= 1
        assert 0 <= run["recognized_fraction"] <= 1
        assert 0 < run["params"] < teacher["params"] and 0 < run["macs"] < teacher["macs"]
        assert run["wall_seconds"] > 0 and run["pruning_stage_seconds"] > 0
        assert run["fid_at_export"] is not None and math.isfinite(run["fid_at_export"])
        assert [s for s, _ in run["fid_curve"]] == [2, 4]  # every validation step of the quick budget (export at 2)
        assert len(run["loss_curve"]) == saved["config"]["max_train_steps"]
        if run["criterion"] == "random":  # prune.py gives the random criterion the run's seed
            assert run["criterion_config"] == {"seed": run["seed"]}
        assert os.path.isfile(os.path.join(run["run_dir"], "unet", "diffusion_pytorch_model.safetensors"))
        assert not [n for n in os.listdir(run["run_dir"]) if n.startswith("checkpoint-")]
    # One seed: means without a spread.
    for criterion in CRITERIA:
        entry = saved["summary"][criterion]
        assert entry["num_seeds"] == 1 and entry["fid_digits_classifier_std"] is None
        assert math.isfinite(entry["fid_digits_classifier_mean"])
    assert math.isfinite(saved["teacher"]["fid_digits_classifier"]) and math.isfinite(saved["real_floor"]["fid_digits_classifier"])


def test_report_has_the_table_plots_and_command(quick):
    text = (quick["docs"] / "benchmarks.md").read_text()
    bench = load_benchmark()
    assert "Hand-written analysis that must survive." in text and "More hand-written text." in text
    assert "stale table" not in text and text.count(bench.BEGIN_MARK) == 1 and text.count(bench.END_MARK) == 1
    assert "Command: `python benchmarks/criteria.py --quick" in text
    assert "NOT Inception" in text and "Wall time of the whole benchmark" in text
    for criterion in CRITERIA:
        assert f"\n| {criterion} |" in text
    assert "| teacher (dense) |" in text
    for name in ("benchmarks_criteria_curves.png", "benchmarks_criteria_grid.png"):
        path = quick["docs"] / "images" / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(images/{name})" in text
    assert not [n for n in os.listdir(quick["docs"] / "images") if ".tmp" in n]


def test_summary_reports_mean_and_spread_over_seeds():
    bench = load_benchmark()
    keys = dict.fromkeys(bench.SUMMARY_KEYS, 1.0)
    runs = [{**keys, "criterion": "gradient_flow", "seed": s, "fid_digits_classifier": f} for s, f in ((0, 10.0), (1, 14.0))]
    runs += [{**keys, "criterion": "magnitude", "seed": s, "fid_digits_classifier": f} for s, f in ((0, 30.0), (1, 31.0))]
    summary = bench.summarize(runs, ["gradient_flow", "magnitude"])
    assert summary["gradient_flow"]["fid_digits_classifier_mean"] == pytest.approx(12.0)
    assert summary["gradient_flow"]["fid_digits_classifier_std"] == pytest.approx(math.sqrt(8.0))  # sample std
    assert summary["magnitude"]["num_seeds"] == 2
    lines = bench._observations(summary, ["gradient_flow", "magnitude"])
    assert lines[0].startswith("Ranking by mean final FID") and "lower FID for gradient_flow" in lines[1]


@pytest.mark.parametrize("argv, match", [
    (["--criteria", "gradient_flow", "nonsense"], "Unknown criteria"),
    (["--seeds", "0", "0"], "must not repeat"),
    (["--num_grid_images", "100"], "num_grid_images"),
    (["--pruning_steps", "10"], "pruning_steps"),
])
def test_bad_input_fails_before_any_run(argv, match, tiny_teacher, tmp_path):
    with pytest.raises(ValueError, match=match):
        load_benchmark().main(["--quick", "--teacher", tiny_teacher["pipeline"], "--output_dir", str(tmp_path / "out"),
                               "--docs_dir", str(tmp_path / "docs"), *argv])
    assert not (tmp_path / "out" / "runs").exists() and not (tmp_path / "docs").exists()


def test_diagnostics_on_a_tiny_teacher(tiny_teacher, tmp_path):
    diagnostics = load_script("criteria_diagnostics", "benchmarks")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = diagnostics.main(["--teacher", tiny_teacher["pipeline"], "--criteria", "gradient_flow", "magnitude",
                                    "--num_batches", "2", "--batch_size", "2", "--num_eval_batches", "1",
                                    "--output", str(tmp_path / "diagnostics.json")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "diagnostics.json").read_text())["criteria"].keys() == {"gradient_flow", "magnitude"}
    magnitude = results["criteria"]["magnitude"]
    # Magnitude needs no data: every mini-batch gives the same scores and the same selection.
    assert magnitude["score_rank_correlation_between_batches"] == pytest.approx(1.0)
    assert magnitude["pruned_set_overlap_between_batches"] == 1.0
    for entry in results["criteria"].values():
        assert math.isfinite(entry["one_shot_loss"]) and entry["one_shot_gradient_norm_sq"] > 0
        assert -1 <= entry["score_rank_correlation_between_batches"] <= 1
    assert 0 <= results["pruned_set_overlap_between_criteria"]["gradient_flow/magnitude"] <= 1
    with pytest.raises(ValueError, match="num_batches"):
        diagnostics.main(["--teacher", tiny_teacher["pipeline"], "--num_batches", "1"])
