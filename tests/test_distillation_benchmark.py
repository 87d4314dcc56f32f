"""benchmarks/distillation.py --quick on a tiny teacher: the paired runs, the verdict and the report (not who wins)."""

import json
import math

import pytest
import torch

from .conftest import load_script


@pytest.fixture(scope="module")
def quick(tiny_teacher, tmp_path_factory):
    """One --quick benchmark (one criterion, two arms, two seeds) into a docs folder with hand-written text."""
    root = tmp_path_factory.mktemp("distillation_benchmark")
    docs = root / "docs"
    docs.mkdir()
    bench = load_script("distillation", "benchmarks")
    (docs / "benchmarks.md").write_text("# Benchmarks\n\nHand-written analysis that must survive.\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["--quick", "--teacher", tiny_teacher["pipeline"], "--output_dir", str(root / "out"), "--docs_dir", str(docs),
                "--criteria", "gradient_flow", "--arms", "output+features", "--validation_fid"]
        results = bench.main(argv)
        again = bench.main(argv + ["--reuse_runs"])  # every run reused: the same numbers, the section replaced in place
    finally:
        torch.set_num_threads(threads)
    return {"results": results, "again": again, "docs": docs, "bench": bench}


def test_runs_are_paired_and_measured(quick):
    saved = json.loads((quick["docs"] / "benchmarks_distillation.json").read_text())
    assert saved["arms"] == ["off", "output+features"]
    assert sorted((r["arm"], r["seed"]) for r in saved["runs"]) == [("off", 0), ("off", 1), ("output+features", 0),
                                                                    ("output+features", 1)]
    for run in saved["runs"]:
        assert math.isfinite(run["fid_digits_classifier"]) and 0 < run["ssim_vs_teacher"] <= 1
        assert run["training_seconds"] > 0
        on = run["arm"] != "off"
        assert (run["distillation"]["output_weight"] > 0) == on and (run["distillation"]["feature_weight"] > 0) == on
        assert all((v is not None) == on for v in run["distill_output_curve"])
    entry = saved["comparison"]["gradient_flow"]["output+features"]
    for key in ("fid_digits_classifier", "ssim_vs_teacher"):
        d = entry[key]["paired_difference"]
        values = entry[key]["values"]
        base = saved["comparison"]["gradient_flow"]["off"][key]["values"]
        assert d["n"] == 2 and d["low"] <= d["mean"] <= d["high"]
        assert d["mean"] == pytest.approx(sum(a - b for a, b in zip(values, base)) / 2)
    timing = saved["step_timing"]["stages"]
    assert set(timing) == {"pruning_stage", "finetune"}
    for stage in timing.values():
        assert stage["ratio_to_plain_step"]["off"] == 1.0 and stage["ratio_to_plain_step"]["output+features"] > 0
    assert quick["again"]["runs"] == quick["results"]["runs"]


def test_report_section_is_appended_and_replaced(quick):
    bench = quick["bench"]
    text = (quick["docs"] / "benchmarks.md").read_text()
    assert text.startswith("# Benchmarks\n\nHand-written analysis that must survive.\n")
    assert text.count(bench.BEGIN_MARK) == 1 and text.count(bench.END_MARK) == 1  # the second run replaced it
    assert "| gradient_flow | output+features |" in text and "Default chosen:" in text
    for name in ("benchmarks_distillation_curves.png", "benchmarks_distillation_grid.png"):
        assert (quick["docs"] / "images" / name).stat().st_size > 1000
        assert f"](images/{name})" in text  # relative to the docs folder
