"""The speed benchmark's quick mode: its JSON, tables and plot (never its timings)."""

import json
import os

import pytest
import torch

from diffusers_gfprune.counting import count_mac_breakdown

from .conftest import load_script as load_benchmark_script


def load_script():
    return load_benchmark_script("speed", "benchmarks")


def meta_macs(model_class: str, config: dict, sample_size: int) -> int:
    from diffusers import UNet2DModel

    from diffusers_gfprune.modeling_pruned_unet import PrunedUNet2DModel

    cls = {"UNet2DModel": UNet2DModel, "PrunedUNet2DModel": PrunedUNet2DModel}[model_class]
    with torch.device("meta"):
        model = cls.from_config(config)
    return count_mac_breakdown(model, sample_size).total


def positive_spread(s: dict) -> None:
    assert s["values"] and all(v > 0 for v in s["values"])
    assert s["min"] <= s["q25"] <= s["median"] <= s["q75"] <= s["max"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    script = load_script()
    results = script.main(["--quick", "--output_dir", str(out),
                           "--experiments", "throughput", "rounding", "channels_last", "sdpa", "overhead"])
    with open(out / "speed.json") as f:
        saved = json.load(f)
    return script, results, saved, out


def test_outputs_written(quick):
    _, results, saved, out = quick
    assert (out / "speed.png").stat().st_size > 1000
    assert saved["quick"] is True
    machine = saved["machine"]
    for key in ("cpu", "torch", "torch_threads", "logical_cpus", "device"):
        assert machine[key] not in (None, "")
    assert machine["torch"] == torch.__version__
    assert machine["torch_threads"] == 1  # the CPU default
    for header in ("### Throughput", "### Width rounding", "### channels_last", "### sdpa", "### Cost of pruning"):
        assert header in saved["markdown"]


def test_mac_ratios_are_what_counting_gives(quick):
    _, _, saved, _ = quick
    assert {m["name"] for m in saved["models"]} == {"digits", "cifar10", "church256"}
    for model in saved["models"]:
        size = model["config"]["sample_size"]
        assert meta_macs("UNet2DModel", model["config"], size) == model["dense_macs"]
        layouts = {p["layout"] for p in model["pruned"]}
        assert layouts == {"stock", "per-layer"}
        for p in model["pruned"]:
            macs = meta_macs(p["model_class"], p["config"], size)
            assert macs == p["macs"]
            assert p["mac_ratio"] == pytest.approx(model["dense_macs"] / macs)
            assert macs < model["dense_macs"]
            # The targeted reduction is met approximately (stock: nearest grid point).
            assert abs(macs / model["dense_macs"] - (1 - p["target_mac_reduction"])) < 0.15
            expected_class = "UNet2DModel" if p["layout"] == "stock" else "PrunedUNet2DModel"
            assert p["model_class"] == expected_class


def test_throughput_rows(quick):
    script, _, saved, _ = quick
    archs = script.architectures(quick=True)
    pruned = {(m["name"], p["key"]): p for m in saved["models"] for p in m["pruned"]}
    seen = set()
    for row in saved["throughput"]:
        p = pruned[(row["model"], row["key"])]
        assert row["mac_ratio"] == pytest.approx(p["mac_ratio"])
        positive_spread(row["speedup"])
        positive_spread(row["dense_step_s"])
        positive_spread(row["pruned_step_s"])
        assert row["fraction_of_ideal"] == pytest.approx(row["speedup"]["median"] / row["mac_ratio"])
        # Each per-round ratio is dense / pruned of the same round.
        for ratio, d, q in zip(row["speedup"]["values"], row["dense_step_s"]["values"], row["pruned_step_s"]["values"]):
            assert ratio == pytest.approx(d / q)
        assert row["pruned_images_per_s"] > 0 and row["dense_images_per_s"] > 0
        seen.add((row["model"], row["batch_size"], row["key"]))
    expected = {(name, b, key) for (name, key) in pruned for b in archs[name].batch_sizes}
    assert seen == expected


def test_tuning_experiments(quick):
    _, _, saved, _ = quick
    rounding = saved["rounding"]
    assert {r["round_to"] for r in rounding["rows"]} >= {1, 8}
    for r in rounding["rows"]:
        positive_spread(r["speedup"])
        assert r["mac_ratio"] > 1
    for name in ("channels_last", "sdpa"):
        e = saved[name]
        choices = {r["choice"] for r in e["rows"]}
        assert choices == set(e["choices"]) and len(choices) >= 2
        for r in e["rows"]:
            positive_spread(r["step_s"])
            positive_spread(r["gain_over_" + e["choices"][0]])
            if r["model_key"] != "dense":
                assert r["fraction_of_ideal"] == pytest.approx(r["speedup"]["median"] / r["mac_ratio"])


def test_overhead(quick):
    _, _, saved, _ = quick
    (o,) = saved["overhead"]
    s = o["schedule"]
    n, m, k = s["soft_steps"], s["pruning_steps"], s["rescore_every"]
    assert (n, m, k) == (100, 200, 10)  # T = 1000 with prune.py's ratios
    last_soft = ((n - 1) // k) * k
    assert s["soft_rescorings"] == last_soft // k + 1
    assert s["hard_rescorings"] == sum(1 for t in range(n + 1, m + 1) if t % k == 0 or t == n + 1)
    median = {name: v["median"] for name, v in o["seconds"].items()}
    for value in median.values():
        assert value > 0
    average = median["stage_step_no_rescoring"] + (
        s["soft_rescorings"] * median["rescoring_soft"] + s["hard_rescorings"] * median["rescoring_hard"]) / (m + 1)
    assert o["average_stage_step_s"] == pytest.approx(average)
    assert o["average_stage_step_over_finetune"] == pytest.approx(average / median["finetune_dense"])
    memory = o["peak_memory_bytes"]
    assert o["peak_memory_over_finetune_dense"]["finetune_dense"] == pytest.approx(1.0)
    assert all(v > 0 for v in memory.values())
    # The slim model holds fewer parameters: its fine-tune step needs less memory (not a timing).
    assert memory["finetune_slim"] < memory["finetune_dense"]
    # A scoring keeps a second-order graph: more memory than a plain step.
    assert memory["rescoring_soft"] > memory["finetune_dense"]


def test_bad_arguments():
    script = load_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--batch_sizes", "cifar10=a,b"])
    with pytest.raises(SystemExit):
        script.parse_args(["--reductions", "1.5"])


def test_committed_results_record_no_machine_paths():
    """The committed summaries and benchmark JSON name files relative to the repository, not a machine's folders."""
    import glob
    import re

    from .conftest import REPO_ROOT

    files = glob.glob(os.path.join(REPO_ROOT, "docs", "speed*.json")) + [
        os.path.join(REPO_ROOT, "teachers", "ddpm-digits", "training_summary.json")]
    local = re.compile(r"(?<![\w.])/(tmp|work|home|root|Users|var)/")
    offenders = {os.path.relpath(f, REPO_ROOT): local.findall(open(f, encoding="utf-8").read()) for f in files}
    assert all(not v for v in offenders.values()), offenders
    assert not os.path.exists(os.path.join(REPO_ROOT, "docs", "speed_earlier"))


def test_portable_paths():
    from diffusers_gfprune.training import REPO_ROOT as ROOT
    from diffusers_gfprune.training import portable_argv, portable_path

    assert portable_path(os.path.join(ROOT, "docs", "speed.json")) == os.path.join("docs", "speed.json")
    assert portable_path("/tmp/run/out") == "out"
    assert portable_path(os.path.expanduser("~/data/images")) == "images"
    assert portable_path("google/ddpm-cifar10-32") == "google/ddpm-cifar10-32"
    assert portable_argv(["x.py", "--output_dir", "/tmp/a/b", "--train_data_dir=/home/me/imgs"]) == [
        "x.py", "--output_dir", "b", "--train_data_dir=imgs"]
