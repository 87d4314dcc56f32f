"""benchmarks/criteria.py --quick on a tiny teacher: every criterion runs and the report is complete (not who wins)."""

import json
import math
import os

import pytest
import torch

from .conftest import load_script

CRITERIA = ("gradient_flow:loss_change", "gradient_flow@one-shot", "magnitude@one-shot", "random")


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
        "# Benchmarks\n\nHand-written analysis that must survive.\n\n" + bench.begin_mark("criteria") + "\nstale table\n"
        + bench.end_mark("criteria")
        + "\n\nMore hand-written text.\n"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = bench.main(["--quick", "--teacher", tiny_teacher["pipeline"], "--output_dir", str(root / "out"),
                              "--docs_dir", str(docs), "--seeds", "0", "1", "--criteria", *CRITERIA])
    finally:
        torch.set_num_threads(threads)
    return {"results": results, "docs": docs, "out": root / "out"}


def test_every_criterion_ran_and_was_measured(quick):
    saved = json.loads((quick["docs"] / "benchmarks_criteria.json").read_text())
    assert saved == json.loads((quick["out"] / "criteria_results.json").read_text())
    assert saved["criteria"] == list(CRITERIA)
    assert sorted((r["criterion"], r["seed"]) for r in saved["runs"]) == sorted((c, s) for c in CRITERIA for s in (0, 1))
    teacher = saved["teacher"]
    for run in saved["runs"]:
        assert math.isfinite(run["fid"]) and run["fid"] >= 0
        assert 0 < run["ssim_vs_teacher"] <= 1
        assert 0 <= run["recognized_fraction"] <= 1
        assert 0 < run["params"] < teacher["params"] and 0 < run["macs"] < teacher["macs"]
        assert run["wall_seconds"] > 0 and run["pruning_stage_seconds"] > 0
        assert [s for s, _ in run["fid_curve"]] == [2, 4]  # every validation step of the quick budget
        # Progressive runs export at step 2, one-shot runs at step 0 (before any training).
        assert run["criterion_config"] is not None
        one_shot = run["criterion"].endswith("@one-shot")
        assert run["fid_after_recovery"] is not None  # 2 steps after the export: step 4, or step 2 for one-shot runs
        if one_shot:
            assert run["fid_at_export"] is None
        assert len(run["loss_curve"]) == saved["config"]["max_train_steps"]
        if run["criterion"] == "gradient_flow:loss_change":
            assert run["criterion_config"]["form"] == "loss_change"
        if run["criterion"] == "random":  # prune.py gives the random criterion the run's seed
            assert run["criterion_config"] == {"seed": run["seed"]}
        assert os.path.isfile(os.path.join(run["run_dir"], "unet", "diffusion_pytorch_model.safetensors"))
        assert not [n for n in os.listdir(run["run_dir"]) if n.startswith("checkpoint-")]
    for criterion in CRITERIA:
        entry = saved["summary"][criterion]
        assert entry["num_seeds"] == 2 and math.isfinite(entry["fid_mean"]) and entry["fid_std"] is not None
    assert math.isfinite(saved["teacher"]["fid"]) and math.isfinite(saved["real_floor"]["fid"])
    # The candidate (first variant) against every other, paired by seed.
    assert [c["other"] for c in saved["comparisons"]] == list(CRITERIA[1:])
    for row in saved["comparisons"]:
        assert row["seeds"] == [0, 1] and row["fid"]["n"] == 2 and row["fid"]["low"] <= row["fid"]["mean"] <= row["fid"]["high"]


def test_report_has_the_table_plots_and_command(quick):
    text = (quick["docs"] / "benchmarks.md").read_text()
    bench = load_benchmark()
    assert "Hand-written analysis that must survive." in text and "More hand-written text." in text
    assert "stale table" not in text and text.count(bench.begin_mark("criteria")) == 1 and text.count(bench.end_mark("criteria")) == 1
    assert "Command: `python benchmarks/criteria.py --quick" in text
    assert "NOT Inception" in text and "Wall time of the whole benchmark" in text
    for criterion in CRITERIA:
        assert f"\n| {criterion} |" in text
    assert "| teacher (dense) |" in text and "Paired differences" in text
    for name in ("benchmarks_criteria_curves.png", "benchmarks_criteria_grid.png"):
        path = quick["docs"] / "images" / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(images/{name})" in text
    assert not [n for n in os.listdir(quick["docs"] / "images") if ".tmp" in n]


def test_paired_comparisons_and_verdicts():
    bench = load_benchmark()
    keys = dict.fromkeys(bench.SUMMARY_KEYS, 1.0)
    runs = [{**keys, "criterion": "a", "seed": s, "fid": f, "ssim_vs_teacher": q} for s, f, q in ((0, 10.0, 0.9), (1, 14.0, 0.8), (2, 12.0, 0.85))]
    runs += [{**keys, "criterion": "b", "seed": s, "fid": f, "ssim_vs_teacher": q} for s, f, q in ((0, 30.0, 0.9), (1, 33.0, 0.8), (2, 32.0, 0.85))]
    summary = bench.summarize(runs, ["a", "b"])
    assert summary["a"]["fid_mean"] == pytest.approx(12.0) and summary["a"]["fid_std"] == pytest.approx(2.0)  # sample std
    comparisons = bench.paired_comparisons(runs, ["a", "b"])
    assert comparisons[0]["fid"]["mean"] == pytest.approx(-19.666, abs=1e-3) and comparisons[0]["fid"]["excludes_zero"]
    assert not comparisons[0]["ssim_vs_teacher"]["excludes_zero"]  # identical SSIM: no difference
    lines = bench._observations(summary, ["a", "b"], comparisons)
    assert lines[0].startswith("Ranking by mean final FID") and "a vs b: FID better, SSIM not separated" in lines[2]


@pytest.mark.parametrize("text, flags", [
    ("gradient_flow", ["--criterion", "gradient_flow", "--process", "progressive"]),
    ("gradient_flow:mask_flow@one-shot", ["--criterion", "gradient_flow", "--process", "one-shot", "--gradient_flow_form", "mask_flow"]),
    ("taylor@one-shot", ["--criterion", "taylor", "--process", "one-shot"]),
    ("gradient_flow+reactivation=off+soft_steps=15",
     ["--criterion", "gradient_flow", "--process", "progressive", "--reactivation", "off", "--soft_steps", "15"]),
    ("magnitude@one-shot+target_macs=0.3", ["--criterion", "magnitude", "--process", "one-shot", "--target_macs", "0.3"]),
])
def test_variants_become_prune_flags(text, flags):
    assert load_benchmark().parse_variant(text)["flags"] == flags


def test_a_variants_options_override_the_budget():
    """An equal-wall-time arm trains longer than the budget: its +max_train_steps must reach prune.py, not the budget's."""
    bench = load_benchmark()
    args = bench.parse_args(["--prune_args", "--score_batches 4"])
    parsed = lambda variant: bench.load_prune().parse_args(bench.run_argv(args, variant, 0, "out"))
    longer = parsed("magnitude+max_train_steps=330+soft_steps=30+pruning_steps=60+score_batches=2")
    assert (longer.max_train_steps, longer.soft_steps, longer.pruning_steps, longer.score_batches) == (330, 30, 60, 2)
    plain = parsed("magnitude@flow")
    assert (plain.max_train_steps, plain.process, plain.score_batches) == (args.max_train_steps, "flow", 4)


@pytest.mark.parametrize("argv, match", [
    (["--criteria", "gradient_flow", "nonsense"], "Unknown criterion"),
    (["--criteria", "taylor:preserve"], "only gradient_flow takes a form"),
    (["--criteria", "taylor@twice"], "process after '@'"),
    (["--criteria", "magnitude+reactivation"], r"\+name=value"),
    (["--criteria", "magnitude+process=one-shot"], "criterion\\[:form\\]\\[@process\\]"),
    (["--criteria", "magnitude", "magnitude+sparsity_schedule=wobbly"], "sparsity_schedule"),
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
        results = diagnostics.main(["--teacher", tiny_teacher["pipeline"], "--variants", "gradient_flow:loss_change", "magnitude",
                                    "--sample_counts", "4", "8", "--batch_size", "4", "--one_shot_samples", "4",
                                    "--eval_samples", "4", "--output", str(tmp_path / "diagnostics.json"),
                                    "--plot", str(tmp_path / "reliability.png")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "diagnostics.json").read_text())["variants"].keys() == {"gradient_flow:loss_change", "magnitude"}
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Magnitude needs no data: both halves give the same scores.
    assert results["variants"]["magnitude"]["reliability"] == {4: pytest.approx(1.0), 8: pytest.approx(1.0)}
    for entry in results["variants"].values():
        assert math.isfinite(entry["one_shot_loss"]) and entry["one_shot_gradient_norm_sq"] > 0
        assert all(-1 <= r <= 1 for r in entry["reliability"].values())
    with pytest.raises(ValueError, match="multiples of --batch_size"):
        diagnostics.main(["--teacher", tiny_teacher["pipeline"], "--sample_counts", "6", "--batch_size", "4"])
    with pytest.raises(ValueError, match="Unknown criterion"):
        diagnostics.main(["--teacher", tiny_teacher["pipeline"], "--variants", "l1"])


def _benchmark_json(criteria, fid, ssim, candidate_deltas):
    """A criteria benchmark's JSON as the rule reads it: summary means and the candidate's paired comparisons."""
    summary = {v: {"fid_mean": f, "ssim_vs_teacher_mean": q, "pruning_stage_seconds_mean": 1.0}
               for v, f, q in zip(criteria, fid, ssim)}
    comparisons = [{"candidate": criteria[0], "other": v,
                    "fid": {"mean": d[0], "low": d[0] - 1, "high": d[0] + 1, "excludes_zero": abs(d[0]) > 1},
                    "ssim_vs_teacher": {"mean": d[1], "low": d[1] - 0.01, "high": d[1] + 0.01, "excludes_zero": "False"}}
                   for v, d in zip(criteria[1:], candidate_deltas)]
    return {"criteria": list(criteria), "summary": summary, "comparisons": comparisons}


@pytest.mark.parametrize("first, second, winner", [
    # a wins both metrics on both teachers
    (([1.0, 2.0, 3.0], [0.9, 0.8, 0.7]), ([1.0, 2.0, 3.0], [0.9, 0.8, 0.7]), "a"),
    # b best on both metrics of the second teacher, a on FID of the first only: b (1.25) beats a (1.75)
    (([1.0, 2.0, 3.0], [0.8, 0.9, 0.7]), ([2.0, 1.0, 3.0], [0.8, 0.9, 0.7]), "b"),
    # equal scores: the cheaper variant (here: the same cost, so the first in the order of ties)
    (([1.0, 2.0, 3.0], [0.8, 0.9, 0.7]), ([2.0, 1.0, 3.0], [0.9, 0.8, 0.7]), "a"),
])
def test_decision_rule_ranks_shared_variants_over_teachers(first, second, winner, tmp_path):
    rule = load_script("criteria_rule", "benchmarks")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "benchmarks.md").write_text("# Benchmarks\n\nkept\n")
    # "x" is measured on the first teacher only: it takes no part in the rule.
    (docs / "benchmarks_one.json").write_text(json.dumps(_benchmark_json(("a", "b", "c", "x"), first[0] + [0.1], first[1] + [1.0],
                                                                        [(2.0, 0.0), (-3.0, 0.0), (0.0, 0.0)])))
    (docs / "benchmarks_two.json").write_text(json.dumps(_benchmark_json(("a", "b", "c"), *second, [(0.5, 0.0), (0.5, 0.0)])))
    result = rule.main(["--benchmarks", "one", "two", "--docs_dir", str(docs)])
    assert result["winner"] == winner and result["variants"] == ["a", "b", "c"]
    text = (docs / "benchmarks.md").read_text()
    assert "kept" in text and f"**Winner by the rule: `{winner}`.**" in text
    assert "| b | +2.00 [+1.00, +3.00] lost" in text and "| c | -3.00 [-4.00, -2.00] won" in text
    rule.main(["--benchmarks", "one", "two", "--docs_dir", str(docs)])  # a second run replaces its section
    assert (docs / "benchmarks.md").read_text().count("Winner by the rule") == 1


def test_decision_rule_needs_the_benchmarks_it_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="criteria.py --name missing"):
        load_script("criteria_rule", "benchmarks").main(["--benchmarks", "missing", "--docs_dir", str(tmp_path)])
