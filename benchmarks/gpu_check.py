#!/usr/bin/env python
"""One command that runs what users run on a GPU, prints a table and exits non-zero on any failure.

    python benchmarks/gpu_check.py --output_json gpu_check.json     # one CUDA GPU; ends within 10 minutes
    python benchmarks/gpu_check.py --device cpu --quick             # the CI version on a CPU (about 40 s)
    python benchmarks/gpu_check.py --list                           # the rows and their commands; nothing runs

No network: the teachers are the shipped ``teachers/ddpm-photos`` (``teachers/ddpm-digits`` in the quick mode) and
random-weight UNets shaped like google/ddpm-cifar10-32 and google/ddpm-church-256, saved as local DDPMPipeline
folders (safetensors) in a temporary folder; the data are the built-in ``photos`` (32 px) and, for the 256-px
shape, a folder of PNGs made from them. The launches import this checkout's ``diffusers_gfprune`` (it is put first on
their PYTHONPATH), installed or not.

What a row is
-------------
Every pruning row is ``accelerate launch [--mixed_precision P] [--dynamo_backend inductor] training/prune.py ...``
in a subprocess, the README's GPU command shape (``--target_macs 0.5``, the per-device ``--train_batch_size``, EMA,
checkpoints), for a few steps: soft phase, hard phase, export, fine-tuning, with checkpoints inside the pruning stage
(the 256-px rows write only the last one: about 1.4 GB each).
The launcher is the real one, so the accelerate state, autocast, the GradScaler and ``torch.compile`` are what users
get. A row passes when the run exits 0 and its ``pruning_summary.json`` says the precision and process count asked
for, a finite final loss, fewer parameters than the teacher, and the saved UNet holds only finite weights. It shows
the peak GPU memory of each phase (``peak_memory_bytes`` of the summary: the pruning-stage training step, scoring,
the fine-tune step; "n/a" where the summary has none) and each against the fine-tune step. A compiled row also counts
the frames that hit dynamo's recompile limit (which then run eagerly): the run works either way, but that number says
how much of it ran compiled.

A resume row copies the checkpoints of its base row up to one inside the pruning stage into a fresh folder and
resumes with ``--resume_from_checkpoint latest`` (as ``tests/test_prune_script.py`` does): the pruner, the EMA, the
optimizer (and the GradScaler under fp16) are loaded, the export happens after the resume, and the result is compared
with the uninterrupted base run. The final masks must be equal (the re-scoring after the resume sees the same
weights); the weights must be bit-equal on a CPU and within ``--resume_atol`` on CUDA, whose kernels are not
bit-deterministic (exactness itself is tested on the CPU by ``tests/test_prune_script.py``).

The throughput row times the dense CIFAR-10-shaped UNet against it exported at 50% of its MACs in both layouts
(``benchmarks/speed.py``'s export and timing, interleaved rounds), in float32 and bfloat16 at batch 64 and 128: the
MAC-ratio table of ``docs/speed.md`` on the GPU. It fails only on an error; the speed-ups are measurements.

The matrix (default mode) and why
---------------------------------
Precision x process x criterion x layout x compile x resume x shape is several hundred runs; each row below adds a path
that no other row covers, and every value of every axis appears at least once.

* Shipped photos teacher (32 px, batch 64, 8 steps: soft 2, hard to 4, export, fine-tune; a checkpoint every 2):
  cheap, so it carries the criteria. fp32 magnitude (progressive, stock; the base of a resume); bf16
  gradient_flow ``loss_change`` (the default form); fp16 gradient_flow ``increase`` (the paper's reading; per-layer);
  fp16 gradient_flow ``mask_flow`` (learns from the GradScaler-scaled training gradients); bf16 taylor (per-layer);
  fp16 one-shot diff_pruning; fp32 one-shot random (per-layer); bf16 one-shot magnitude with the evaluation at the
  end (SSIM, FID in the photos classifier's features) switched on; bf16 magnitude under ``--dynamo_backend
  inductor``; the fp32 resume.
* CIFAR-10 shape (35.7M parameters, 32 px, random weights; the README's own command): bf16 gradient_flow
  ``loss_change`` at batch 128 with the default scoring (4 x 128 images, chunks of 32); fp16 magnitude per-layer at
  batch 128 (the base of the fp16 resume, which restores the GradScaler); fp32 one-shot taylor at batch 64; bf16
  magnitude at batch 128 under ``inductor``; the fp16 resume. 6 steps (soft 2, hard to 3, export after step 4).
* church-256 shape (113.7M parameters, 256 px, random weights): batch 4 and 4 steps (soft 1, hard to 2, export after
  step 3), one row per precision (fp32
  magnitude; bf16 gradient_flow ``loss_change`` with 1 x 4 scoring images in chunks of 2, the double backward being
  the memory peak; fp16 one-shot diff_pruning over 10 timesteps, per-layer). Compile and resume at 256 px add nothing
  that the smaller shapes do not test, and cost minutes. These rows run one at a time (GPU memory).
* Two GPUs (only where two are visible; otherwise SKIPPED, the gloo path being tested on the CPU by
  ``tests/test_prune_script.py``): the CIFAR-10 bf16 gradient_flow row with ``--multi_gpu --num_processes 2`` (NCCL
  collectives of the scores) and its resume from a checkpoint inside the pruning stage (the DDP wrapper).

The throughput runs first, alone on the GPU. Then rows run ``--jobs`` at a time (3 on CUDA; their seconds are wall
times under that sharing, not step costs), the longest first (the compiled runs: compiling and recompiling after the
export take minutes; then the 256-px rows, one at a time), the two-GPU rows alone at the end. The whole check
ends within ``--time_budget`` seconds (570 on CUDA, preparation included): a launch still running then is ended (FAIL)
and rows not started are NOT RUN, which fails the check too: it did not test what it lists. How long the matrix takes
on an H100 has not been measured; ``--only`` and ``--jobs`` trim it.

The quick mode (``--device cpu --quick``) runs the same code on the digits teacher: fp32 progressive magnitude
(stock, a checkpoint every step), bf16 one-shot gradient_flow ``loss_change`` (per-layer), the resume of the first
(bit-exact) and the throughput of the digits shape at batch 4 and 8; ``tests/test_gpu_check.py`` runs it.

Exit status: 0 when every row passed (or was SKIPPED), 1 when a row failed or was not run, 2 when the default (GPU)
mode finds no CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, REPO)
PRUNE_SCRIPT = os.path.join(REPO, "training", "prune.py")
TEACHERS = os.path.join(REPO, "teachers")

# google/ddpm-cifar10-32 and google/ddpm-church-256 as published on the Hub (unet/config.json, scheduler_config.json);
# the keys a current diffusers adds take their defaults, which are what those repos load with.
CIFAR10_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=[128, 256, 256, 256],
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=None, act_fn="silu", center_input_sample=False, downsample_padding=0, flip_sin_to_cos=False,
    freq_shift=1, mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32, time_embedding_type="positional",
)
CHURCH256_UNET = dict(
    CIFAR10_UNET, sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512],
    down_block_types=["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
)
DDPM_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                      clip_sample=True, trained_betas=None)
SCHEDULER_VARIANCE = {"cifar10": "fixed_large", "church256": "fixed_small"}

PASS, FAIL, SKIPPED, NOT_RUN = "PASS", "FAIL", "SKIPPED", "NOT RUN"
MIB = 2 ** 20
PHASES = ("pruning_stage", "scoring", "finetune")


# ------------------------------------------------------------------------------------- what runs
@dataclass(frozen=True)
class Teacher:
    """A teacher and its data: prune.py's flags for them, and how to make them if they are not shipped."""

    name: str
    label: str
    path: Optional[str] = None  # a shipped teacher; None: a random-weight UNet made from ``config``
    config: Optional[dict] = None
    data_args: Sequence[str] = ()
    image_folder: Optional[int] = None  # make a folder of PNGs at this resolution (--train_data_dir)


@dataclass(frozen=True)
class Row:
    """One check. ``kind``: 'prune' (a launch of training/prune.py), 'resume' (of ``base``), 'throughput'."""

    name: str
    kind: str
    teacher: str = ""
    precision: str = "no"
    process: str = "progressive"
    criterion: str = "magnitude"
    form: Optional[str] = None
    layout: str = "stock"
    batch: int = 4
    steps: int = 6
    soft: int = 2
    pruning: int = 4
    checkpointing: int = 2
    dynamo: bool = False
    num_processes: int = 1
    extra: Sequence[str] = ()
    base: Optional[str] = None  # resume: the row whose checkpoints it resumes from
    resume_from: Optional[int] = None  # resume: the checkpoint step (inside the pruning stage)
    heavy: bool = False  # at most one heavy row at a time (GPU memory)
    exclusive: bool = False  # runs alone
    throughput: Optional[dict] = None  # throughput: model, dtypes, batches, ...


@dataclass
class Result:
    name: str
    status: str
    seconds: float = 0.0
    summary: str = ""
    reason: str = ""
    numbers: dict = field(default_factory=dict)
    command: str = ""
    log_tail: str = ""


def teachers(quick: bool) -> Dict[str, Teacher]:
    if quick:
        return {"digits": Teacher("digits", "shipped digits teacher", os.path.join(TEACHERS, "ddpm-digits"),
                                  data_args=("--dataset_name", "digits", "--max_train_samples", "32"))}
    return {
        "photos": Teacher("photos", "shipped photos teacher", os.path.join(TEACHERS, "ddpm-photos"),
                          data_args=("--dataset_name", "photos")),
        "cifar10": Teacher("cifar10", "google/ddpm-cifar10-32 shape, random weights", config=CIFAR10_UNET,
                           data_args=("--dataset_name", "photos")),
        # The built-in photos at 256 px would cut all 14336 crops at that size in every process (30 s, 2.8 GB):
        # a folder of 64 photos-derived PNGs instead.
        "church256": Teacher("church256", "google/ddpm-church-256 shape, random weights", config=CHURCH256_UNET,
                             image_folder=256),
    }


def _gf(form):
    return ("gradient_flow", form)


def matrix(quick: bool) -> List[Row]:
    """The rows, in the order they start (the throughput alone, then the long runs first); see the module docstring."""
    if quick:
        digits = dict(teacher="digits", batch=4, steps=4, soft=1, pruning=2, checkpointing=1)
        return [
            Row("digits/no/progressive/magnitude/stock", "prune", **digits),
            Row("digits/bf16/one-shot/gradient_flow:loss_change/per-layer", "prune", precision="bf16", process="one-shot",
                criterion="gradient_flow", form="loss_change", layout="per-layer", extra=("--score_batches", "1"),
                **dict(digits, steps=2)),
            Row("digits/no/resume", "resume", base="digits/no/progressive/magnitude/stock", resume_from=2),
            Row("digits/2gpu/progressive/magnitude/stock", "prune", num_processes=2, exclusive=True, **digits),
            Row("throughput/digits", "throughput", exclusive=True,  # alone: timed beside a launch it measures the launch
                throughput=dict(model="digits", dtypes=("float32",), batches=(4, 8), num_steps=2, warmup=1, repeats=3)),
        ]
    photos = dict(teacher="photos", batch=64, steps=8, soft=2, pruning=4, checkpointing=2)
    cifar = dict(teacher="cifar10", batch=128, steps=6, soft=2, pruning=3, checkpointing=3)
    church = dict(teacher="church256", batch=4, steps=4, soft=1, pruning=2, checkpointing=1000, heavy=True)
    rows = [
        # First and alone: the GPU is otherwise idle while it times, and it cannot be ended at the time budget.
        Row("throughput/cifar10", "throughput", exclusive=True,
            throughput=dict(model="cifar10", dtypes=("float32", "bfloat16"), batches=(64, 128), num_steps=5, warmup=1,
                            repeats=5)),
        # Compiling (and recompiling after the export) takes minutes: the compiled runs start first.
        Row("cifar10/bf16/progressive/magnitude/stock/inductor", "prune", precision="bf16", dynamo=True, **cifar),
        Row("photos/bf16/progressive/magnitude/stock/inductor", "prune", precision="bf16", dynamo=True, **photos),
        Row("church256/bf16/progressive/gradient_flow:loss_change/stock", "prune", precision="bf16",
            criterion="gradient_flow", form="loss_change",
            extra=("--score_batches", "1", "--score_batch_size", "4", "--score_chunk_size", "2"), **church),
        Row("church256/fp16/one-shot/diff_pruning/per-layer", "prune", precision="fp16", process="one-shot",
            criterion="diff_pruning", layout="per-layer", extra=("--score_batches", "1", "--diff_pruning_timesteps", "10"),
            **church),
        Row("church256/no/progressive/magnitude/stock", "prune", **church),
        Row("cifar10/bf16/progressive/gradient_flow:loss_change/stock", "prune", precision="bf16",
            criterion="gradient_flow", form="loss_change", **cifar),
        Row("cifar10/fp16/progressive/magnitude/per-layer", "prune", precision="fp16", layout="per-layer", **cifar),
        Row("cifar10/no/one-shot/taylor/stock", "prune", process="one-shot", criterion="taylor",
            extra=("--score_batches", "2"), **dict(cifar, batch=64)),
        Row("cifar10/fp16/resume", "resume", base="cifar10/fp16/progressive/magnitude/per-layer", resume_from=3),
        Row("photos/no/progressive/magnitude/stock", "prune", **photos),
        Row("photos/bf16/progressive/gradient_flow:loss_change/stock", "prune", precision="bf16",
            criterion="gradient_flow", form="loss_change", **photos),
        Row("photos/fp16/progressive/gradient_flow:increase/per-layer", "prune", precision="fp16",
            criterion="gradient_flow", form="increase", layout="per-layer", **photos),
        Row("photos/fp16/progressive/gradient_flow:mask_flow/stock", "prune", precision="fp16",
            criterion="gradient_flow", form="mask_flow", **photos),
        Row("photos/bf16/progressive/taylor/per-layer", "prune", precision="bf16", criterion="taylor", layout="per-layer",
            **photos),
        Row("photos/fp16/one-shot/diff_pruning/stock", "prune", precision="fp16", process="one-shot",
            criterion="diff_pruning", **photos),
        Row("photos/no/one-shot/random/per-layer", "prune", process="one-shot", criterion="random", layout="per-layer",
            **photos),
        Row("photos/bf16/one-shot/magnitude/stock/eval", "prune", precision="bf16", process="one-shot",
            extra=("--num_eval_images", "16"), **photos),
        Row("photos/no/resume", "resume", base="photos/no/progressive/magnitude/stock", resume_from=4),
        Row("cifar10/2gpu/bf16/progressive/gradient_flow:loss_change/stock", "prune", precision="bf16",
            criterion="gradient_flow", form="loss_change", num_processes=2, exclusive=True, **dict(cifar, batch=64)),
        Row("cifar10/2gpu/bf16/resume", "resume", base="cifar10/2gpu/bf16/progressive/gradient_flow:loss_change/stock",
            resume_from=3, num_processes=2, exclusive=True),
    ]
    return rows


# ------------------------------------------------------------------------------------- inputs
def make_random_pipeline(config: dict, variance_type: str, folder: str, seed: int = 0) -> str:
    """A DDPMPipeline with a random-weight UNet of ``config``, saved as safetensors."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**config)
    scheduler = DDPMScheduler(**DDPM_SCHEDULER, variance_type=variance_type)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    return folder


def make_image_folder(folder: str, resolution: int, count: int = 64) -> str:
    """``count`` of the built-in photos' training crops (32 px) upscaled to ``resolution``, as PNG files."""
    import numpy as np
    from PIL import Image

    from diffusers_gfprune import photos

    os.makedirs(folder, exist_ok=True)
    images = photos.photo_crops("train", 32).images[:count]
    for i, image in enumerate(images):
        array = np.ascontiguousarray(np.transpose(np.asarray(image), (1, 2, 0)))
        image = Image.fromarray(array).resize((resolution, resolution), Image.Resampling.BICUBIC)
        image.save(os.path.join(folder, f"{i:03d}.png"))
    return folder


def teacher_flags(teacher: Teacher, path: str, image_dir: Optional[str] = None) -> List[str]:
    """prune.py's teacher and data flags: ``path`` the pipeline folder, ``image_dir`` the made image folder (if any)."""
    flags = ["--pretrained_model_name_or_path", path, *teacher.data_args]
    return flags + (["--train_data_dir", image_dir] if teacher.image_folder else [])


def prepare_teachers(needed: Sequence[str], quick: bool, work_dir: str) -> Dict[str, List[str]]:
    """prune.py's teacher and data flags per teacher name, making the random pipelines and image folders."""
    flags = {}
    for name in needed:
        teacher = teachers(quick)[name]
        path = teacher.path
        if path is None:
            path = make_random_pipeline(teacher.config, SCHEDULER_VARIANCE[name], os.path.join(work_dir, "teachers", name))
        image_dir = None
        if teacher.image_folder:
            image_dir = make_image_folder(os.path.join(work_dir, "data", name), teacher.image_folder)
        flags[name] = teacher_flags(teacher, path, image_dir)
    return flags


# ------------------------------------------------------------------------------------- commands
def _accelerate() -> List[str]:
    script = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prune_row(row: Row, rows: Dict[str, Row]) -> Row:
    """The prune row a resume row repeats (its own when it is one)."""
    return rows[row.base] if row.kind == "resume" else row


def launch_args(row: Row, device: str) -> List[str]:
    args = ["launch", "--num_machines", "1", "--num_processes", str(row.num_processes),
            "--mixed_precision", row.precision, "--dynamo_backend", "inductor" if row.dynamo else "no"]
    if row.num_processes > 1:
        args += ["--multi_gpu", "--main_process_port", str(_free_port())]
    elif device == "cpu":
        args += ["--cpu"]
    return args


def script_args(row: Row, flags: List[str], output_dir: str, extra: Sequence[str]) -> List[str]:
    args = [*flags, "--output_dir", output_dir, "--target_macs", "0.5", "--layout", row.layout,
            "--criterion", row.criterion, "--process", row.process,
            "--train_batch_size", str(row.batch), "--max_train_steps", str(row.steps),
            "--checkpointing_steps", str(row.checkpointing),
            "--num_validation_images", "1", "--num_inference_steps", "2", "--validation_steps", "100000",
            "--num_eval_images", "0", "--report_to", "none"]
    if row.form:
        args += ["--gradient_flow_form", row.form]
    if row.process == "progressive":
        args += ["--soft_steps", str(row.soft), "--pruning_steps", str(row.pruning), "--rescore_every", "1"]
    return args + list(row.extra) + list(extra)


def child_env(device: str, home: str, threads: int, gpus: Optional[str]) -> Dict[str, str]:
    """The launch's environment: no launcher state of this shell, no accelerate config or token, offline."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "MASTER_", "WORLD_", "RANK", "LOCAL_RANK", "OMPI_", "PMI_"))}
    env.update(HF_HOME=home, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    # This checkout's package, whether or not it is installed (and not another installed version of it).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    return env


def run_command(command: List[str], env: Dict[str, str], log_path: str, timeout: float) -> tuple:
    """(exit code or None on timeout, seconds, output); the whole process group is ended on a timeout."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            code = None
    with open(log_path, errors="replace") as f:
        output = f.read()
    return code, time.perf_counter() - start, output


def error_line(output: str) -> str:
    """The script's own error: the last exception line of its traceback (or argparse's 'error:' line), not the
    launcher's report that its child failed; else the last line."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line.strip()) for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b|^\S+: error:", line)]
    launcher = ("subprocess.CalledProcessError", "torch.distributed.elastic", "ChildFailedError")
    own = [line for line in errors if not line.startswith(launcher)]
    picked = own or errors or lines or ["(no output)"]
    return picked[-1][:300]


# ------------------------------------------------------------------------------------- what a run must show
class CheckFailed(Exception):
    pass


def _weights(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def check_run(row: Row, output_dir: str) -> dict:
    """The numbers of a finished run; raises CheckFailed when the run did not do what was asked."""
    import torch

    path = os.path.join(output_dir, "pruning_summary.json")
    if not os.path.isfile(path):
        raise CheckFailed("exit 0 but no pruning_summary.json")
    with open(path) as f:
        summary = json.load(f)
    if summary.get("mixed_precision") != row.precision:
        raise CheckFailed(f"mixed precision {summary.get('mixed_precision')!r} in the summary, {row.precision!r} asked for")
    if summary.get("num_processes") != row.num_processes:
        raise CheckFailed(f"{summary.get('num_processes')} processes in the summary, {row.num_processes} asked for")
    loss = summary.get("final_loss")
    if loss is None or not math.isfinite(loss):
        raise CheckFailed(f"final loss {loss}")
    dense, pruned = summary["dense"]["params"], summary["pruned"]["params"]
    if not pruned < dense:
        raise CheckFailed(f"pruned model has {pruned} parameters, the teacher {dense}")
    bad = [k for k, v in _weights(os.path.join(output_dir, "unet")).items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckFailed(f"{len(bad)} saved UNet tensors hold inf/NaN, e.g. {bad[0]}")
    peaks = summary.get("peak_memory_bytes")
    memory = {p: (peaks.get(p) if isinstance(peaks, dict) else None) for p in PHASES}
    finetune = memory["finetune"]
    return {
        "final_loss": loss, "params_dense": dense, "params_pruned": pruned, "achieved_macs": summary.get("achieved_macs"),
        "peak_memory_mib": {p: (None if v is None else v / MIB) for p, v in memory.items()},
        "peak_memory_vs_finetune": {p: (memory[p] / finetune if memory[p] is not None and finetune else None)
                                    for p in ("pruning_stage", "scoring")},
        "peak_memory_reported": isinstance(peaks, dict),
        "pruning_stage_seconds": summary.get("pruning_stage_seconds"), "finetune_seconds": summary.get("finetune_seconds"),
        "run_wall_seconds": summary.get("wall_seconds"), "scoring_precision": summary.get("scoring_precision"),
        "evaluation": bool(summary.get("evaluation")),
    }


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def _mib(v) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def _ratio(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def describe_run(n: dict) -> str:
    mem, vs = n["peak_memory_mib"], n["peak_memory_vs_finetune"]
    return (f"loss {n['final_loss']:.4g}; params {_params(n['params_dense'])}->{_params(n['params_pruned'])}; "
            f"MACs {n['achieved_macs']:.2f}; peak MiB stage/score/ft {_mib(mem['pruning_stage'])}/{_mib(mem['scoring'])}/"
            f"{_mib(mem['finetune'])} (vs ft {_ratio(vs['pruning_stage'])}/{_ratio(vs['scoring'])})"
            + ("; evaluated" if n["evaluation"] else ""))


def compare_resumed(output_dir: str, base_dir: str, steps: int, atol: float) -> dict:
    """The resumed run against the uninterrupted one: masks equal, weights within ``atol`` (0: bit-equal)."""
    from safetensors.torch import load_file

    masks, base_masks = (load_file(os.path.join(d, "pruning_masks.safetensors")) for d in (output_dir, base_dir))
    if masks.keys() != base_masks.keys() or any(not (masks[k] == base_masks[k]).all() for k in masks):
        differ = sum(int((masks[k] != base_masks[k]).sum()) for k in masks
                     if k in base_masks and masks[k].shape == base_masks[k].shape)
        raise CheckFailed(f"final masks differ from the uninterrupted run ({differ} units)")
    diffs = {}
    for sub in ("unet", f"checkpoint-{steps}/unet_ema"):
        with open(os.path.join(output_dir, sub, "config.json")) as f, open(os.path.join(base_dir, sub, "config.json")) as g:
            if json.load(f) != json.load(g):
                raise CheckFailed(f"{sub}: config differs from the uninterrupted run")
        a, b = _weights(os.path.join(output_dir, sub)), _weights(os.path.join(base_dir, sub))
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            raise CheckFailed(f"{sub}: tensors differ in names or shapes from the uninterrupted run")
        diffs[sub] = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        if not diffs[sub] <= atol:
            raise CheckFailed(f"{sub}: max |diff| {diffs[sub]:.3g} to the uninterrupted run (tolerance {atol:g})")
    return {"masks_equal": True, "max_abs_diff": diffs}


# ------------------------------------------------------------------------------------- throughput
def run_throughput(spec: dict, device: str, seed: int = 0) -> List[dict]:
    """Dense vs exported at 50% of the MACs (stock and per-layer), interleaved, per dtype and batch."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import speed
    from diffusers_gfprune.units import find_units

    from diffusers.utils import logging as diffusers_logging

    if device == "cpu":
        torch.set_num_threads(1)  # as benchmarks/speed.py on a CPU: robust on a shared machine
    diffusers_logging.set_verbosity_error()  # the dtype casts' advice to use torch_dtype in from_pretrained
    os.environ.setdefault("TQDM_DISABLE", "1")  # speed.py's per-batch progress bars
    config = speed.digits_config() if spec["model"] == "digits" else dict(CIFAR10_UNET)
    arch = speed.Architecture(spec["model"], spec["model"], config, tuple(spec["batches"]), 1, 1000)
    dense = speed.build_dense(config, seed).to(device)
    units = find_units(dense)
    size = config["sample_size"]
    dense_macs = speed.mac_count(dense, size).total
    variants = [speed.export_stock(dense, units, 0.5, 1, dense_macs, size, seed),
                speed.export_per_layer(dense, units, 0.5, 1, dense_macs, size, seed)]
    timing = SimpleNamespace(batch_sizes={}, num_steps=spec["num_steps"], warmup=spec["warmup"], repeats=spec["repeats"],
                             repeats_given=True, sampling_steps=1000)
    rows = []
    for dtype in spec["dtypes"]:
        rows += speed.run_throughput(arch, dense, variants, timing, getattr(torch, dtype), torch.device(device))
    del dense, variants
    if device == "cuda":  # the launches after it get the whole GPU, not what this process's allocator keeps
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return rows


def describe_throughput(rows: List[dict]) -> Dict[tuple, str]:
    """One line per (dtype, batch): dense ms/step, then each model's speed-up against its MAC ratio."""
    lines = {}
    for r in rows:
        key = (r["dtype"], r["batch_size"])
        head = lines.get(key, f"dense {1000 * r['dense_step_s']['median']:.2f} ms/step")
        lines[key] = (head + f", {r['key']} {r['speedup']['median']:.2f}x of {r['mac_ratio']:.2f}x "
                      f"({r['fraction_of_ideal']:.2f} of ideal)")
    return lines


# ------------------------------------------------------------------------------------- running
class Runner:
    """Runs the rows (``jobs`` at a time, heavy ones one at a time, exclusive ones alone) within a time budget."""

    def __init__(self, rows: List[Row], args, work_dir: str, teacher_flags: Dict[str, List[str]], deadline: float):
        self.deadline = deadline  # time.monotonic() at which every row must have ended
        self.rows = {r.name: r for r in rows}
        self.order = [r.name for r in rows]
        self.args = args
        self.work_dir = work_dir
        self.teacher_flags = teacher_flags
        self.results: Dict[str, Result] = {}
        self.gpus = args.gpu_count
        self.threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs)) if args.device == "cuda" else 1
        self.home = os.path.join(work_dir, "hf_home")
        os.makedirs(self.home, exist_ok=True)
        os.makedirs(os.path.join(work_dir, "logs"), exist_ok=True)

    def output_dir(self, name: str) -> str:
        return os.path.join(self.work_dir, "runs", re.sub(r"[^\w.-]+", "_", name))

    def skip_reason(self, row: Row) -> Optional[str]:
        if row.num_processes > 1 and self.gpus < row.num_processes:
            where = "tests/test_prune_script.py runs the 2-process path with gloo on the CPU"
            return f"needs {row.num_processes} CUDA GPUs, {self.gpus} visible ({where})"
        return None

    # -- one row
    def run_row(self, name: str, slot: int) -> Result:
        row = self.rows[name]
        timeout = min(self.args.row_timeout, self.deadline - time.monotonic())
        if row.kind == "throughput":
            return self._throughput(row)
        source = prune_row(row, self.rows)
        output_dir = self.output_dir(name)
        if row.kind == "resume":
            base_dir = self.output_dir(row.base)
            os.makedirs(output_dir)
            checkpoints = [f"checkpoint-{s}" for s in range(source.checkpointing, row.resume_from + 1, source.checkpointing)]
            for c in checkpoints:
                if not os.path.isdir(os.path.join(base_dir, c)):
                    return Result(name, FAIL, reason=f"the base run wrote no {c}")
                shutil.copytree(os.path.join(base_dir, c), os.path.join(output_dir, c))
        extra = list(self.args.prune_args) + (["--resume_from_checkpoint", "latest"] if row.kind == "resume" else [])
        launch = launch_args(source, self.args.device)
        flags = self.teacher_flags[source.teacher]
        command = _accelerate() + launch + [PRUNE_SCRIPT] + script_args(source, flags, output_dir, extra)
        gpus = None
        if self.args.device == "cuda" and self.gpus > 1:
            gpus = ",".join(str(i) for i in range(row.num_processes)) if row.num_processes > 1 else str(slot % self.gpus)
        env = child_env(self.args.device, self.home, self.threads, gpus)
        log_path = os.path.join(self.work_dir, "logs", os.path.basename(output_dir) + ".log")
        code, seconds, output = run_command(command, env, log_path, timeout)
        result = Result(name, FAIL, seconds, command=shlex.join(command))
        if code != 0:
            result.reason = (f"ended after {timeout:.0f} s (--row_timeout or the end of --time_budget)" if code is None else
                             f"exit code {code}: {error_line(output)}")
            result.log_tail = output[-4000:]
            return result
        try:
            if row.kind == "resume":
                stage = re.search(rf"Resuming from \S*checkpoint-{row.resume_from} \((\w+) stage\)", output)
                if not stage:
                    raise CheckFailed(f"no 'Resuming from ...checkpoint-{row.resume_from}' in the output")
                atol = 0.0 if self.args.device == "cpu" else self.args.resume_atol
                result.numbers = compare_resumed(output_dir, self.output_dir(row.base), source.steps, atol)
                result.numbers.update(stage=stage.group(1), **{"run": check_run(source, output_dir)})
                diffs = result.numbers["max_abs_diff"]
                result.summary = (f"from checkpoint-{row.resume_from} ({stage.group(1)} stage); masks equal; max abs diff "
                                  + ", ".join(f"{k.split('/')[-1]} {v:.2g}" for k, v in diffs.items()))
            else:
                result.numbers = check_run(row, output_dir)
                result.summary = describe_run(result.numbers)
                if row.dynamo:  # works either way; how much of it ran compiled is a number to read
                    hits = len(re.findall(r"hit config\.recompile_limit", output))
                    result.numbers["dynamo_recompile_limit_hits"] = hits
                    result.summary += f"; {hits} compiled frames hit dynamo's recompile limit (run eagerly after it)"
        except CheckFailed as e:
            result.reason = str(e)
            result.log_tail = output[-4000:]
            return result
        result.status = PASS
        return result

    def _throughput(self, row: Row) -> Result:
        start = time.perf_counter()
        try:
            rows = run_throughput(row.throughput, self.args.device)
        except Exception as e:  # noqa: BLE001 -- any error is this row's failure, shown in the table
            import traceback

            return Result(row.name, FAIL, time.perf_counter() - start, reason=f"{type(e).__name__}: {e}"[:300],
                          log_tail=traceback.format_exc()[-4000:])
        seconds = time.perf_counter() - start
        lines = describe_throughput(rows)
        summary = "; ".join(f"{dtype} batch {batch}: {text}" for (dtype, batch), text in lines.items())
        return Result(row.name, PASS, seconds, summary=summary, numbers={"rows": rows})

    # -- scheduling
    def run(self) -> List[Result]:
        pending = []
        for name in self.order:
            reason = self.skip_reason(self.rows[name])
            if reason:
                self.results[name] = Result(name, SKIPPED, reason=reason)
            else:
                pending.append(name)
        running = {}  # future -> (name, slot)
        with ThreadPoolExecutor(max_workers=max(1, self.args.jobs)) as pool:
            while pending or running:
                started = True
                while started:
                    started = False
                    for name in list(pending):
                        row = self.rows[name]
                        if row.base is not None and row.base not in self.results:
                            continue  # its base still runs (or waits)
                        if row.base is not None and self.results[row.base].status != PASS:
                            pending.remove(name)
                            status = SKIPPED if self.results[row.base].status == SKIPPED else NOT_RUN
                            self.results[name] = Result(name, status, reason=f"its base run {row.base} did not pass")
                            continue
                        if self.deadline - time.monotonic() < self.args.min_row_seconds:
                            pending.remove(name)
                            spent = f"the time budget of {self.args.time_budget:.0f} s was spent"
                            self.results[name] = Result(name, NOT_RUN, reason=spent)
                            continue
                        busy = [self.rows[n] for n, _ in running.values()]
                        if len(busy) >= self.args.jobs or any(r.exclusive for r in busy):
                            break
                        if row.exclusive and busy or row.heavy and any(r.heavy for r in busy):
                            continue
                        slot = min(set(range(self.args.jobs)) - {s for _, s in running.values()})
                        running[pool.submit(self.run_row, name, slot)] = (name, slot)
                        pending.remove(name)
                        self._print_start(name)
                        started = True
                        break
                if not running:
                    continue
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    name, _ = running.pop(future)
                    try:
                        result = future.result()
                    except Exception as e:  # noqa: BLE001 -- an error of the check itself fails its row
                        result = Result(name, FAIL, reason=f"{type(e).__name__}: {e}"[:300])
                    self.results[name] = result
                    reason = f": {result.reason}" if result.reason else ""
                    print(f"  {result.status:7s} {name} ({result.seconds:.0f} s){reason}", flush=True)
        return [self.results[name] for name in self.order]

    @staticmethod
    def _print_start(name: str):
        print(f"  start   {name}", flush=True)


# ------------------------------------------------------------------------------------- report
def table(results: List[Result]) -> str:
    """Markdown: one row per check."""
    lines = ["| check | status | seconds | numbers |", "|---|---|---:|---|"]
    for r in results:
        text = r.summary if r.status == PASS else (r.reason or r.summary)
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {text.replace('|', '/')} |")
    return "\n".join(lines)


def memory_summary(results: List[Result]) -> dict:
    """The largest peak of the scoring and of the pruning-stage step against the fine-tune step, over the runs."""
    out = {}
    for phase in ("scoring", "pruning_stage"):
        ratios = [(r.numbers["peak_memory_vs_finetune"][phase], r.name) for r in results
                  if r.status == PASS and r.numbers.get("peak_memory_vs_finetune", {}).get(phase) is not None]
        out[phase] = dict(zip(("ratio", "row"), max(ratios))) if ratios else None
    return out


def machine(device: str) -> dict:
    import diffusers
    import torch

    info = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "platform": platform.platform(), "logical_cpus": os.cpu_count()}
    try:
        import accelerate

        info["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    if device == "cuda":
        info.update(cuda=torch.version.cuda, gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    return info


# ------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda (default: the GPU check) or cpu (with --quick: the CI version).")
    parser.add_argument("--quick", action="store_true", help="The tiny matrix on the digits teacher (about a minute on a CPU).")
    parser.add_argument("--output_json", type=str, default=None, help="Write the results (rows, numbers, machine) here.")
    parser.add_argument("--only", type=str, default=None,
                        help="Run only the rows whose name matches this regular expression (and the runs they resume).")
    parser.add_argument("--list", action="store_true", help="Print the rows and their commands; run nothing.")
    parser.add_argument("--jobs", type=int, default=None, help="Rows run at the same time (default: 3 on CUDA, 2 on a CPU).")
    parser.add_argument("--time_budget", type=float, default=None,
                        help="Seconds the whole check may take, preparation included (default 570 on CUDA, 600 on a CPU): "
                             "a row still running then is ended (FAIL), rows not started are NOT RUN.")
    parser.add_argument("--min_row_seconds", type=float, default=30,
                        help="No row starts with less than this left of --time_budget.")
    parser.add_argument("--row_timeout", type=float, default=420, help="Seconds one launch may take before it is ended (FAIL).")
    parser.add_argument("--resume_atol", type=float, default=1e-2,
                        help="CUDA: the largest |diff| of a resumed run's weights to the uninterrupted run's (kernels are not "
                             "bit-deterministic); on a CPU they must be equal.")
    parser.add_argument("--prune_args", type=str, default="",
                        help="Extra flags appended to every prune.py command (one string, shell-quoted), "
                             "e.g. '--logging_steps 1'.")
    parser.add_argument("--work_dir", type=str, default=None,
                        help="Where the teachers, runs and logs go (default: a temporary folder, removed unless "
                             "--keep_outputs or a row failed).")
    parser.add_argument("--keep_outputs", action="store_true", help="Keep the work folder.")
    args = parser.parse_args(argv)
    args.prune_args = shlex.split(args.prune_args)
    if args.jobs is None:
        args.jobs = 3 if args.device == "cuda" else 2
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.time_budget is None:
        args.time_budget = 570.0 if args.device == "cuda" else 600.0
    if args.device == "cuda" and args.quick:
        parser.error("--quick is the CPU version (--device cpu --quick); on a GPU run the default matrix.")
    if args.device == "cpu" and not args.quick and not args.list and not args.only:
        parser.error("the full matrix needs a GPU (the 256-px runs take hours on a CPU); on a CPU use --device cpu --quick "
                     "(or pick rows with --only, with smaller batches through --prune_args).")
    return args


def select_rows(rows: List[Row], pattern: Optional[str]) -> List[Row]:
    if not pattern:
        return rows
    by_name = {r.name: r for r in rows}
    chosen = {r.name for r in rows if re.search(pattern, r.name)}
    chosen |= {by_name[n].base for n in list(chosen) if by_name[n].base}
    if not chosen:
        raise SystemExit(f"--only {pattern!r} matches no row; --list shows them.")
    return [r for r in rows if r.name in chosen]


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = select_rows(matrix(args.quick), args.only)
    if args.list:
        by_name = {r.name: r for r in rows}
        for row in rows:
            if row.kind == "throughput":
                print(f"{row.name}: in this process, {row.throughput}")
                continue
            source = prune_row(row, by_name)
            extra = args.prune_args + (["--resume_from_checkpoint", "latest"] if row.kind == "resume" else [])
            flags = teacher_flags(teachers(args.quick)[source.teacher], f"<{source.teacher}>", f"<{source.teacher} images>")
            print(f"{row.name}:\n  accelerate {shlex.join(launch_args(source, args.device))} training/prune.py "
                  f"{shlex.join(script_args(source, flags, '<out>', extra))}")
        return 0

    import torch

    args.gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda" and args.gpu_count == 0:
        print("No CUDA GPU found (torch.cuda.is_available() is False): this check runs on a GPU. On a machine without "
              "one, run its CPU version: python benchmarks/gpu_check.py --device cpu --quick", file=sys.stderr)
        return 2

    started = time.time()
    deadline = time.monotonic() + args.time_budget
    owns_work_dir = args.work_dir is None
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work_dir, exist_ok=True)
    print(f"gpu_check: {len(rows)} rows on {args.device} ({args.gpu_count} GPU(s)), {args.jobs} at a time; "
          f"work folder {work_dir}", flush=True)
    needed = sorted({prune_row(r, {x.name: x for x in rows}).teacher for r in rows if r.kind != "throughput"})
    flags = prepare_teachers(needed, args.quick, work_dir)
    results = Runner(rows, args, work_dir, flags, deadline).run()
    by_name = {r.name: r for r in rows}
    wall = time.time() - started

    text = table(results)
    print("\n" + text)
    failed = [r for r in results if r.status in (FAIL, NOT_RUN)]
    for r in failed:
        if r.log_tail:
            print(f"\n--- {r.name}: last lines of its output ---\n" + "\n".join(r.log_tail.splitlines()[-25:]))
    memory = memory_summary(results)
    for phase, worst in memory.items():
        shown = f"up to {worst['ratio']:.2f}x ({worst['row']})" if worst else "n/a (no CUDA peaks in the summaries)"
        print(f"peak memory of the {phase.replace('_', '-')} phase against the fine-tune step: {shown}")
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIPPED, NOT_RUN)}
    print(f"\n{', '.join(f'{v} {k}' for k, v in counts.items() if v)} in {wall:.0f} s"
          + (f"; failed: {', '.join(r.name for r in failed)}" if failed else ""))
    if args.output_json:
        report = {"passed": not failed, "mode": "quick" if args.quick else "full", "device": args.device,
                  "machine": machine(args.device), "jobs": args.jobs, "wall_seconds": wall, "counts": counts,
                  "peak_memory_vs_finetune": memory,
                  "rows": [dict(asdict(r), row=asdict(by_name[r.name])) for r in results], "table": text,
                  "command": "python benchmarks/gpu_check.py " + shlex.join(sys.argv[1:] if argv is None else argv)}
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    if owns_work_dir and not args.keep_outputs and not failed:
        shutil.rmtree(work_dir, ignore_errors=True)
    elif failed:
        print(f"Logs and outputs kept in {work_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
