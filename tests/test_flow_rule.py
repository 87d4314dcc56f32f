"""benchmarks/flow_rule.py: the equal-wall-time steps from paired runs, and the learned-mask decision rule."""

import importlib.util
import os

import pytest

from .conftest import REPO_ROOT


def load_rule():
    spec = importlib.util.spec_from_file_location("_flow_rule", os.path.join(REPO_ROOT, "benchmarks", "flow_rule.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(variant, seed, pruning, finetune, steps=300):
    summary = {"pruning_stage_seconds": pruning, "finetune_seconds": finetune, "max_train_steps": steps,
               "pruner": {"soft_steps": 30, "pruning_steps": 60}}
    return {"criterion": variant, "seed": seed, "summary": summary}


def test_equal_time_steps_come_from_the_paired_runs():
    rule = load_rule()
    # The default: 239 fine-tuning steps at 0.5 s; the flow arm costs 10 s more per seed -> 20 steps, the cheap arm 1 s.
    records = [record("magnitude", s, 20.0, 119.5) for s in (0, 1)]
    records += [record("magnitude@flow", s, 30.0, 119.5) for s in (0, 1)]
    records += [record("taylor@flow", s, 21.0, 119.5) for s in (0, 1)]
    arms = {a["arm"]: a for a in rule.equal_time_arms(records)}
    assert arms["magnitude@flow"]["delta_steps"] == 20
    assert arms["magnitude@flow"]["variant"] == "magnitude+max_train_steps=320+soft_steps=30+pruning_steps=60"
    assert arms["taylor@flow"]["delta_steps"] == 2 and arms["taylor@flow"]["variant"] is None  # under 1% of T


def _d(mean, low, high):
    return {"mean": mean, "low": low, "high": high, "n": 3, "excludes_zero": low > 0 or high < 0}


@pytest.mark.parametrize("fid, ssim, expected", [
    (_d(-2, -3, -1), _d(0.0, -0.01, 0.01), "beats"),       # FID better, SSIM not separated
    (_d(-2, -3, -1), _d(-0.02, -0.03, -0.01), "worse"),    # better on one, worse on the other
    (_d(0.1, -1, 1), _d(0.0, -0.01, 0.01), "not worse"),
    (_d(0.1, -1, 1), _d(0.02, 0.01, 0.03), "beats"),       # SSIM better (higher)
    (_d(2, 1, 3), _d(0.0, -0.01, 0.01), "worse"),          # FID worse (higher)
])
def test_outcome(fid, ssim, expected):
    assert load_rule().outcome({"fid": fid, "ssim_vs_teacher": ssim}) == expected
