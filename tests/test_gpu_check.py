"""benchmarks/gpu_check.py: its CPU version end to end (table, JSON, exit codes), its GPU matrix through prune.py's
own checks and accelerate's launcher parser, and the checks that decide a row's status.

The script runs in a subprocess, as users run it. Its timings are never checked.
"""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from .conftest import REPO_ROOT, load_script

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check", "benchmarks")


def run_script(*argv, env=None, timeout=300):
    environ = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, SCRIPT, *argv], cwd=REPO_ROOT, env=environ, capture_output=True, text=True,
                          timeout=timeout)


def table_rows(stdout: str) -> dict:
    """The printed table: check name -> (status, seconds, numbers)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| ") else []
        if len(cells) == 4 and cells[0] != "check":
            rows[cells[0]] = (cells[1], float(cells[2]), cells[3])
    return rows


# ---------------------------------------------------------------------- the CPU version, end to end
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_check") / "quick.json"
    result = run_script("--device", "cpu", "--quick", "--output_json", str(path))
    report = json.loads(path.read_text()) if path.exists() else None
    return result, report


def test_quick_mode_passes_with_a_row_per_check(quick, gpu_check):
    result, report = quick
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    names = [row.name for row in gpu_check.matrix(quick=True)]
    printed = table_rows(result.stdout)
    assert list(printed) == names
    assert [r["name"] for r in report["rows"]] == names
    for r in report["rows"]:
        assert printed[r["name"]][0] == r["status"]
        expected = "SKIPPED" if r["row"]["num_processes"] > 1 else "PASS"
        assert r["status"] == expected, (r["name"], r["reason"], r["log_tail"][-2000:])
    assert report["passed"] is True and report["mode"] == "quick" and report["device"] == "cpu"
    assert report["counts"] == {"PASS": len(names) - 1, "FAIL": 0, "SKIPPED": 1, "NOT RUN": 0}
    assert report["machine"]["torch"] == torch.__version__


def test_quick_mode_numbers(quick):
    _, report = quick
    rows = {r["name"]: r for r in report["rows"]}
    prune_rows = [r for r in rows.values() if r["row"]["kind"] == "prune" and r["status"] == "PASS"]
    assert {r["row"]["precision"] for r in prune_rows} == {"no", "bf16"}
    assert {r["row"]["process"] for r in prune_rows} == {"progressive", "one-shot"}
    for r in prune_rows:
        n = r["numbers"]
        assert math.isfinite(n["final_loss"]) and n["params_pruned"] < n["params_dense"]
        assert 0 < n["achieved_macs"] < 1
        assert n["peak_memory_mib"] == {"pruning_stage": None, "scoring": None, "finetune": None}  # no CUDA
        assert "n/a/n/a/n/a" in r["summary"]

    resume = next(r for r in rows.values() if r["row"]["kind"] == "resume")
    assert resume["numbers"]["stage"] == "pruning" and resume["numbers"]["masks_equal"] is True
    assert resume["numbers"]["max_abs_diff"] == {"unet": 0.0, "checkpoint-4/unet_ema": 0.0}  # bit-exact on a CPU

    skipped = next(r for r in rows.values() if r["status"] == "SKIPPED")
    assert re.search(r"needs 2 CUDA GPUs, 0 visible", skipped["reason"])

    throughput = next(r for r in rows.values() if r["row"]["kind"] == "throughput")["numbers"]["rows"]
    assert {(t["key"], t["batch_size"]) for t in throughput} == {(k, b) for k in ("stock-50", "per-layer-50") for b in (4, 8)}
    for t in throughput:
        assert t["mac_ratio"] > 1.5 and t["speedup"]["median"] > 0 and t["dtype"] == "float32"


def test_a_failing_row_fails_the_check(tmp_path):
    """An option prune.py refuses makes its row FAIL with prune.py's message, the resume of it NOT RUN, and the exit
    status non-zero."""
    path = tmp_path / "bad.json"
    result = run_script("--device", "cpu", "--quick", "--only", "digits/no/resume",
                        "--prune_args", "--criterion no_such_criterion", "--output_json", str(path))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    printed = table_rows(result.stdout)
    assert list(printed) == ["digits/no/progressive/magnitude/stock", "digits/no/resume"]
    assert printed["digits/no/progressive/magnitude/stock"][0] == "FAIL"
    assert "no_such_criterion" in printed["digits/no/progressive/magnitude/stock"][2]
    assert printed["digits/no/resume"][0] == "NOT RUN"
    report = json.loads(path.read_text())
    assert report["passed"] is False and report["counts"]["FAIL"] == 1 and report["counts"]["NOT RUN"] == 1
    assert "no_such_criterion" in report["rows"][0]["log_tail"]


def test_default_mode_without_a_gpu_says_so():
    result = run_script(env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert result.returncode == 2
    assert "No CUDA GPU found" in result.stderr and "--device cpu --quick" in result.stderr
    assert "| check |" not in result.stdout


@pytest.mark.parametrize("argv, match", [
    (["--device", "cpu"], r"the full matrix needs a GPU"),
    (["--quick"], r"--quick is the CPU version"),
    (["--device", "cpu", "--quick", "--jobs", "0"], r"--jobs must be >= 1"),
])
def test_bad_invocations_are_refused(argv, match, gpu_check, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(argv)
    assert exit_info.value.code == 2 and re.search(match, capsys.readouterr().err)


# ---------------------------------------------------------------------- the GPU matrix, without a GPU
@pytest.mark.parametrize("axis, values", [
    ("precision", {"no", "bf16", "fp16"}),
    ("process", {"progressive", "one-shot"}),
    ("layout", {"stock", "per-layer"}),
    ("criterion", {"magnitude", "gradient_flow", "taylor", "diff_pruning", "random"}),
    ("form", {None, "loss_change", "increase"}),
    ("teacher", {"photos", "cifar10", "church256"}),
    ("dynamo", {False, True}),
    ("num_processes", {1, 2}),
])
def test_the_gpu_matrix_covers_every_value(axis, values, gpu_check):
    prune_rows = [r for r in gpu_check.matrix(quick=False) if r.kind == "prune"]
    assert values <= {getattr(r, axis) for r in prune_rows}


def test_every_precision_runs_on_every_shape(gpu_check):
    prune_rows = [r for r in gpu_check.matrix(quick=False) if r.kind == "prune" and r.num_processes == 1]
    for teacher in ("photos", "cifar10", "church256"):
        assert {r.precision for r in prune_rows if r.teacher == teacher} == {"no", "bf16", "fp16"}, teacher


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "gpu"])
def test_resumes_start_inside_the_pruning_stage(quick, gpu_check):
    """Each resume loads a pruner (a checkpoint before the export) and its run fine-tunes after the export."""
    rows = {r.name: r for r in gpu_check.matrix(quick)}
    resumes = [r for r in rows.values() if r.kind == "resume"]
    assert resumes
    for r in resumes:
        base = rows[r.base]
        assert base.kind == "prune" and base.process == "progressive" and base.num_processes == r.num_processes
        assert r.resume_from % base.checkpointing == 0 and base.soft <= r.resume_from <= base.pruning, r.name
        assert base.steps > base.pruning + 1, r.name  # the export is followed by fine-tune steps


def test_throughput_rows(gpu_check):
    specs = {r.throughput["model"]: r.throughput for r in gpu_check.matrix(quick=False) if r.kind == "throughput"}
    assert set(specs["cifar10"]["batches"]) == {64, 128} and {"float32", "bfloat16"} <= set(specs["cifar10"]["dtypes"])


def _config_only_pipeline(folder, unet_config, variance):
    """A DDPMPipeline folder holding configs and no weights: enough for prune.py's checks, which read configs only."""
    from diffusers import DDPMScheduler, UNet2DModel

    with torch.device("meta"):
        UNet2DModel(**unet_config).save_config(folder / "unet")
    DDPMScheduler(variance_type=variance).save_config(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    return str(folder)


def _images(folder, count=4):
    import numpy as np
    from PIL import Image

    folder.mkdir()
    for i in range(count):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return str(folder)


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "gpu"])
def test_every_command_passes_the_launcher_and_prune_checks(quick, gpu_check, tmp_path):
    """Every launch line parses with accelerate's own launcher parser, and every prune.py command passes prune.py's
    checks (``validate``: flags, criterion options, layout, MACs target, phase lengths, data), so a flag renamed in
    prune.py fails here, not on the GPU."""
    from accelerate.commands.launch import launch_command_parser

    prune = load_script("prune")
    rows = gpu_check.matrix(quick)
    by_name = {r.name: r for r in rows}
    flags = {}
    for name, teacher in gpu_check.teachers(quick).items():
        path = teacher.path or _config_only_pipeline(tmp_path / name, teacher.config, gpu_check.SCHEDULER_VARIANCE[name])
        images = _images(tmp_path / f"{name}_images") if teacher.image_folder else None
        flags[name] = gpu_check.teacher_flags(teacher, path, images)
    checked = 0
    for row in rows:
        if row.kind == "throughput":
            continue
        source = gpu_check.prune_row(row, by_name)
        launch = gpu_check.launch_args(source, "cpu" if quick else "cuda")
        launched = launch_command_parser().parse_args(launch[1:] + [gpu_check.PRUNE_SCRIPT])
        assert launched.mixed_precision == source.precision and launched.num_processes == source.num_processes
        assert launched.dynamo_backend == ("inductor" if source.dynamo else "no")
        output_dir = tmp_path / "runs" / str(checked)
        extra = ["--resume_from_checkpoint", "latest"] if row.kind == "resume" else []
        args = prune.parse_args(gpu_check.script_args(source, flags[source.teacher], str(output_dir), extra))
        assert (args.criterion, args.process, args.layout, args.train_batch_size) == (
            source.criterion, source.process, source.layout, source.batch)
        if row.kind == "prune":  # a resume needs the checkpoints of a finished base run
            prune.validate(args)
            assert not output_dir.exists()
        checked += 1
    assert checked == sum(r.kind != "throughput" for r in rows)


# ---------------------------------------------------------------------- what decides a row's status
def _finished_run(folder, **changes):
    (folder / "unet").mkdir(parents=True)
    weights = {"w": torch.ones(3)}
    if changes.pop("nan_weights", False):
        weights["w"][1] = float("nan")
    save_file(weights, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    summary = {"mixed_precision": "bf16", "num_processes": 1, "final_loss": 0.1, "achieved_macs": 0.5,
               "dense": {"params": 100}, "pruned": {"params": 50},
               "peak_memory_bytes": {"pruning_stage": 3 * 2 ** 20, "scoring": 6 * 2 ** 20, "finetune": 2 * 2 ** 20}}
    summary.update(changes)
    if summary.pop("no_summary", False):
        return str(folder)
    (folder / "pruning_summary.json").write_text(json.dumps(summary))
    return str(folder)


@pytest.mark.parametrize("changes, match", [
    ({"no_summary": True}, r"no pruning_summary.json"),
    ({"mixed_precision": "no"}, r"mixed precision 'no' in the summary, 'bf16' asked for"),
    ({"num_processes": 2}, r"2 processes in the summary, 1 asked for"),
    ({"final_loss": float("nan")}, r"final loss nan"),
    ({"final_loss": None}, r"final loss None"),
    ({"pruned": {"params": 100}}, r"pruned model has 100 parameters, the teacher 100"),
    ({"nan_weights": True}, r"1 saved UNet tensors hold inf/NaN"),
])
def test_a_run_that_did_not_do_what_was_asked_fails(changes, match, gpu_check, tmp_path):
    row = gpu_check.Row("r", "prune", precision="bf16")
    with pytest.raises(gpu_check.CheckFailed, match=match):
        gpu_check.check_run(row, _finished_run(tmp_path, **changes))


@pytest.mark.parametrize("peaks, shown", [
    ({"pruning_stage": 3 * 2 ** 20, "scoring": 6 * 2 ** 20, "finetune": 2 * 2 ** 20}, "3/6/2 (vs ft 1.50x/3.00x)"),
    ({"pruning_stage": None, "scoring": 6 * 2 ** 20, "finetune": 2 * 2 ** 20}, "n/a/6/2 (vs ft n/a/3.00x)"),
    ({"pruning_stage": None, "scoring": None, "finetune": None}, "n/a/n/a/n/a (vs ft n/a/n/a)"),
    (None, "n/a/n/a/n/a (vs ft n/a/n/a)"),  # a prune.py that does not write the key
])
def test_peak_memory_against_the_finetune_step(peaks, shown, gpu_check, tmp_path):
    changes = {"peak_memory_bytes": peaks} if peaks is not None else {}
    folder = _finished_run(tmp_path, **changes)
    if peaks is None:
        summary = json.loads((tmp_path / "pruning_summary.json").read_text())
        del summary["peak_memory_bytes"]
        (tmp_path / "pruning_summary.json").write_text(json.dumps(summary))
    numbers = gpu_check.check_run(gpu_check.Row("r", "prune", precision="bf16"), folder)
    assert numbers["peak_memory_reported"] is (peaks is not None)
    assert gpu_check.describe_run(numbers).endswith("peak MiB stage/score/ft " + shown)


def _resumable(folder, mask, weight, steps=4):
    folder.mkdir()
    save_file({"family": torch.tensor(mask, dtype=torch.float32)}, str(folder / "pruning_masks.safetensors"))
    for sub in ("unet", f"checkpoint-{steps}/unet_ema"):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "config.json").write_text(json.dumps({"block_out_channels": [8, 16]}))
        save_file({"w": torch.full((2,), weight)}, str(folder / sub / "diffusion_pytorch_model.safetensors"))
    return str(folder)


@pytest.mark.parametrize("mask, weight, atol, match", [
    ([1, 0, 1], 1.0, 0.0, None),
    ([1, 0, 1], 1.001, 1e-2, None),
    ([1, 0, 1], 1.001, 0.0, r"unet: max \|diff\| 0.001 to the uninterrupted run \(tolerance 0\)"),
    ([0, 1, 1], 1.0, 1e-2, r"final masks differ from the uninterrupted run \(2 units\)"),
])
def test_a_resume_must_end_where_the_uninterrupted_run_ended(mask, weight, atol, match, gpu_check, tmp_path):
    base = _resumable(tmp_path / "base", [1, 0, 1], 1.0)
    resumed = _resumable(tmp_path / "resumed", mask, weight)
    if match is None:
        numbers = gpu_check.compare_resumed(resumed, base, 4, atol)
        assert numbers["masks_equal"] and numbers["max_abs_diff"]["unet"] == pytest.approx(weight - 1.0, abs=1e-6)
    else:
        with pytest.raises(gpu_check.CheckFailed, match=match):
            gpu_check.compare_resumed(resumed, base, 4, atol)


@pytest.mark.parametrize("output, expected", [
    ("Traceback (most recent call last):\n  File \"prune.py\", line 1\nValueError: Unknown criterion 'x'\n"
     "Traceback (most recent call last):\nsubprocess.CalledProcessError: Command '[...]' returned non-zero exit status 1.",
     "ValueError: Unknown criterion 'x'"),
    ("[rank1]: Traceback (most recent call last):\n[rank1]: RuntimeError: NCCL error\n"
     "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: training/prune.py FAILED",
     "RuntimeError: NCCL error"),
    ("usage: prune.py [-h]\nprune.py: error: unrecognized arguments: --no_such_flag",
     "prune.py: error: unrecognized arguments: --no_such_flag"),
    ("Killed", "Killed"),
    ("", "(no output)"),
])
def test_the_reason_is_the_scripts_own_error(output, expected, gpu_check):
    assert gpu_check.error_line(output) == expected


def test_memory_summary_takes_the_largest_peak_ratio(gpu_check):
    def result(name, status, scoring, stage):
        return gpu_check.Result(name, status, numbers={"peak_memory_vs_finetune": {"scoring": scoring, "pruning_stage": stage}})

    results = [result("a", "PASS", 2.0, None), result("b", "PASS", 3.5, 1.2), result("c", "FAIL", 9.0, 9.0),
               gpu_check.Result("d", "SKIPPED")]
    assert gpu_check.memory_summary(results) == {"scoring": {"ratio": 3.5, "row": "b"},
                                                 "pruning_stage": {"ratio": 1.2, "row": "b"}}
    assert gpu_check.memory_summary(results[3:]) == {"scoring": None, "pruning_stage": None}
