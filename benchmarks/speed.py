#!/usr/bin/env python
"""Wall-clock speed of pruned DDPM UNets against their dense models, and what pruning costs.

Three measurements, all in one process, with warm-up and repeats, models interleaved round by
round (the order reverses every round) so that drifts of a shared machine hit all of them alike:

1. **Throughput.** For each architecture (google/ddpm-cifar10-32, a 256-px church/celebahq DDPM,
   the digits teacher) the dense model and models exported at 30%, 50% and 70% fewer MACs in both
   layouts (``stock``: a plain ``UNet2DModel``; ``per-layer``: widths from a global ranking), at
   several batch sizes: seconds per sampling step (one UNet forward), images/s of a full sampling
   run, the pruned/dense speed-up next to the MAC ratio, and the fraction of that ideal reached.
   Weights are random (speed does not depend on them); the per-layer widths come from random
   scores through the library's global selection.
2. **What closes the gap** (on one architecture and batch, ``--tune_model``/``--tune_batch_size``):
   width rounding to multiples of 8/16/32 channels, ``channels_last``, the attention kernel
   (SDPA backends, or diffusers' non-SDPA processor) and, with ``--experiments ... compile``,
   ``torch.compile`` (compile time reported, capped by ``--compile_timeout``).
3. **Cost of the method.** One gradient-flow scoring (exact Hessian-vector products, and finite
   differences), a pruning-stage training step, a learned-mask step (``--process flow``'s soft phase:
   gates, budget terms and the logits' own step), a one-shot Taylor scoring, and a plain fine-tune
   step (AdamW, gradient clipping and EMA, as in ``training/prune.py``) of the dense and of the
   slim model; the average pruning-stage step over the default schedule of ``training/prune.py``
   (re-scoring every K = N / 10 steps, N = 0.1 T; hard-phase re-scorings score twice, the second
   time with the pruned units restored), peak memory of each, and whole-run estimates against
   plain fine-tuning and one-shot pruning. With ``--direct_overhead digits`` the average is also
   measured directly over the whole pruning stage, step by step against plain fine-tune steps.

Results go to a JSON file and a plot of speed-up against MAC ratio (with the ideal line); the
tables are printed as Markdown.

Examples
--------
    python benchmarks/speed.py                               # the full CPU run (docs/speed.md)
    python benchmarks/speed.py --quick --output_dir /tmp/s  # tiny models, seconds (CI)
    python benchmarks/speed.py --experiments compile --models cifar10 --output_json docs/speed_compile.json --no_plot
    python benchmarks/speed.py --experiments overhead --models digits --overhead_models digits \
        --direct_overhead digits --output_json docs/speed_direct.json --no_plot
    python benchmarks/speed.py --device cuda --dtypes float32 bfloat16 --output_dir docs/cuda
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from diffusers_gfprune import training  # noqa: E402
from diffusers_gfprune.counting import count_mac_breakdown, count_parameters  # noqa: E402
from diffusers_gfprune.criteria import get_criterion  # noqa: E402
from diffusers_gfprune.evaluation import time_interleaved  # noqa: E402
from diffusers_gfprune.export import export_model, prepare_stock, sparsity_for_macs  # noqa: E402
from diffusers_gfprune.learned_masks import LearnedMaskConfig, LearnedMasks, MaskBudget  # noqa: E402
from diffusers_gfprune.masks import UnitMasks  # noqa: E402
from diffusers_gfprune.pruner import GradientFlowPruner, PrunerConfig  # noqa: E402
from diffusers_gfprune.selection import keep_floors, masks_from_pruned, select  # noqa: E402
from diffusers_gfprune.units import find_units  # noqa: E402
from tests.architectures import CELEBAHQ_LIKE, CIFAR10  # noqa: E402

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
EXPERIMENTS = ("throughput", "rounding", "channels_last", "sdpa", "compile", "overhead")
# The rest (rounding, channels_last, sdpa, compile) are separate runs: together they would take
# the default run far past a quarter of an hour on a 2-core CPU.
DEFAULT_EXPERIMENTS = ("throughput", "overhead")

# The real Hub layouts, defined once for the tests and this benchmark: google/ddpm-cifar10-32 (35.7M
# parameters) and google/ddpm-church-256 / ddpm-celebahq-256 (113.7M; six levels, attention at 16x16).
CHURCH256 = dict(CELEBAHQ_LIKE, sample_size=256)
# training/train_ddpm.py defaults: the shipped digits teacher when its folder is absent.
DIGITS = dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=16, attention_head_dim=None,
)
DIGITS_TEACHER = os.path.join(REPO, "teachers", "ddpm-digits")


@dataclass
class Architecture:
    """One architecture to benchmark and its defaults on a CPU."""

    name: str
    label: str
    config: dict
    batch_sizes: Sequence[int]
    overhead_batch_size: int  # train_batch_size of the overhead measurement
    total_steps: int  # T of the schedule the overhead is averaged over
    trace_size: Optional[int] = None  # find_units traces at this size (same coupling, faster)
    repeats: Optional[int] = None  # fewer timed rounds where one round is slow (256 px)


def digits_config() -> dict:
    path = os.path.join(DIGITS_TEACHER, "unet", "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    return dict(DIGITS)


def architectures(quick: bool) -> Dict[str, Architecture]:
    """The benchmarked architectures; ``quick`` shrinks them so that a run takes seconds."""
    if quick:
        small = dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=8, sample_size=16)
        return {
            "digits": Architecture("digits", "digits teacher (quick: as is)", digits_config(), (1, 8), 8, 1000),
            "cifar10": Architecture("cifar10", "ddpm-cifar10-32 layout (quick: narrow, 16 px)", dict(CIFAR10, **small), (2,), 4, 1000),
            "church256": Architecture("church256", "ddpm-church-256 layout (quick: narrow, 64 px)",
                                      dict(CHURCH256, block_out_channels=(16, 16, 32, 32, 64, 64), norm_num_groups=8,
                                           sample_size=64), (1,), 2, 1000),
        }
    return {
        "digits": Architecture("digits", "digits teacher (1.1M params, 16 px)", digits_config(), (1, 64, 256), 64, 1000),
        "cifar10": Architecture("cifar10", "google/ddpm-cifar10-32 (35.7M params, 32 px)", CIFAR10, (1, 16, 64), 4, 100000),
        "church256": Architecture("church256", "google/ddpm-church-256 / celebahq-256 (113.7M params, 256 px)", CHURCH256,
                                  (1,), 1, 100000, trace_size=32, repeats=2),
    }


# ------------------------------------------------------------------------------------- models
def build_dense(config: dict, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**config).eval()


def mac_count(model, sample_size: int):
    """MACs per image of ``model``'s architecture, counted on the meta device (shapes only)."""
    with torch.device("meta"):
        twin = type(model).from_config(model.config)
    return count_mac_breakdown(twin, sample_size)


def random_scores(units, seed: int) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f.name: torch.rand(f.num_units, generator=generator) for f in units}


@dataclass
class Pruned:
    """An exported model and what it is."""

    key: str
    layout: str
    reduction: float  # the targeted MAC reduction
    round_to: int
    sparsity: float  # fraction of units removed
    model: nn.Module
    macs: int
    macs_without_attention: int
    params: int
    mac_ratio: float  # dense MACs / pruned MACs: the ideal speed-up
    config: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "key": self.key, "layout": self.layout, "target_mac_reduction": self.reduction, "round_to": self.round_to,
            "sparsity": self.sparsity, "macs": self.macs, "macs_without_attention": self.macs_without_attention,
            "params": self.params, "mac_ratio": self.mac_ratio, "model_class": type(self.model).__name__,
            "config": self.config,
        }


def _json_config(model) -> dict:
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}, default=list))


def export_stock(dense, units, reduction: float, round_to: int, dense_macs: int, sample_size: int, seed: int) -> Pruned:
    """The stock model nearest to ``1 - reduction`` of the dense MACs (widths multiples of ``round_to``)."""
    sparsity, _ = sparsity_for_macs(dense, units, 1 - reduction, round_to=round_to)
    prepared = copy.deepcopy(dense)
    # Least squares only: speed does not depend on how well the time path is refit.
    prepare_stock(prepared, units, sparsity, refine_steps=0)
    pruned_flags = select(random_scores(units, seed), units, sparsity, "local")
    model = export_model(prepared, units, masks_from_pruned(pruned_flags), "stock").eval()
    del prepared
    macs = mac_count(model, sample_size)
    return Pruned(f"stock-{round(100 * reduction)}" + (f"-r{round_to}" if round_to > 1 else ""), "stock", reduction,
                  round_to, sparsity, model, macs.total, macs.without_attention, count_parameters(model),
                  dense_macs / macs.total, _json_config(model))


def export_per_layer(dense, units, reduction: float, round_to: int, dense_macs: int, sample_size: int, seed: int,
                     tolerance: float = 0.01, max_evals: int = 8) -> Pruned:
    """A per-layer model (global selection of random scores) with MACs near ``1 - reduction`` of dense.

    Bisection on the global sparsity (the MAC fraction falls as it grows), starting from the stock
    sparsity for the same target; only the closest model so far is kept in memory.
    """
    scores = random_scores(units, seed)
    target = 1 - reduction
    lo, hi = 0.0, 1 - sum(keep_floors(units).values()) / units.num_units - 1e-6
    s = min(sparsity_for_macs(dense, units, target)[0], hi)
    best = None
    for _ in range(max_evals):
        flags = select(scores, units, s, "global", round_to=round_to)
        model = export_model(dense, units, masks_from_pruned(flags), "per-layer").eval()
        macs = mac_count(model, sample_size)
        fraction = macs.total / dense_macs
        if best is None or abs(fraction - target) < abs(best[0] - target):
            best = (fraction, s, model, macs)
        del model
        if abs(fraction - target) < tolerance:
            break
        lo, hi = (s, hi) if fraction > target else (lo, s)  # too many MACs left: prune more
        s = (lo + hi) / 2
    fraction, best, model, macs = best
    return Pruned(f"per-layer-{round(100 * reduction)}" + (f"-r{round_to}" if round_to > 1 else ""), "per-layer",
                  reduction, round_to, best, model, macs.total, macs.without_attention, count_parameters(model),
                  dense_macs / macs.total, _json_config(model))


class Variant(nn.Module):
    """A UNet called as ``measure_throughput`` calls it, with a memory format and attention kernel."""

    def __init__(self, unet, channels_last: bool = False, sdpa_backend=None):
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.channels_last = channels_last
        self.sdpa_backend = sdpa_backend
        if channels_last:
            unet.to(memory_format=torch.channels_last)

    def forward(self, sample, timestep):
        from torch.nn.attention import sdpa_kernel

        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        with sdpa_kernel(self.sdpa_backend) if self.sdpa_backend is not None else nullcontext():
            return self.unet(sample, timestep)


# ------------------------------------------------------------------------------------- timing
def spread(values: Sequence[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    q25, median, q75 = np.quantile(a, [0.25, 0.5, 0.75])
    return {"median": float(median), "q25": float(q25), "q75": float(q75), "min": float(a.min()), "max": float(a.max()),
            "values": [float(v) for v in a]}


def speedup(dense: Sequence[float], pruned: Sequence[float]) -> dict:
    """Per-round ratios dense / pruned latency (> 1: faster), as ``compare_throughput`` reports them."""
    out = spread([d / p for d, p in zip(dense, pruned)])
    out["ratio_of_medians"] = float(np.median(dense) / np.median(pruned))
    return out


# ------------------------------------------------------------------------------------- experiments
def run_throughput(arch: Architecture, dense, variants: List[Pruned], args, dtype, device) -> List[dict]:
    rows = []
    models = {"dense": dense.to(dtype)}
    models.update({p.key: p.model.to(dtype) for p in variants})
    for batch_size in batch_sizes_for(arch, args):
        repeats = arch.repeats if (arch.repeats and not args.repeats_given) else args.repeats
        latencies = time_interleaved(models, batch_size, args.num_steps, args.warmup, repeats, device,
                                     f"{arch.name} {dtype_name(dtype)} batch {batch_size}")
        for p in variants:
            ratio = speedup(latencies["dense"], latencies[p.key])
            rows.append({
                "model": arch.name, "dtype": dtype_name(dtype), "batch_size": batch_size, "key": p.key, "layout": p.layout,
                "target_mac_reduction": p.reduction, "round_to": p.round_to, "mac_ratio": p.mac_ratio,
                "macs_fraction": 1 / p.mac_ratio, "speedup": ratio, "fraction_of_ideal": ratio["median"] / p.mac_ratio,
                "dense_step_s": spread(latencies["dense"]), "pruned_step_s": spread(latencies[p.key]),
                "dense_images_per_s": batch_size / (args.sampling_steps * float(np.median(latencies["dense"]))),
                "pruned_images_per_s": batch_size / (args.sampling_steps * float(np.median(latencies[p.key]))),
            })
        del latencies
        gc.collect()
    if dtype != torch.float32:
        for model in models.values():
            model.to(torch.float32)
    return rows


def run_rounding(arch, dense, units, dense_macs, args, device) -> dict:
    """Width rounding at the tune reduction: stock grid and per-layer widths at multiples of N."""
    reduction = args.tune_reduction
    models, info = {"dense": dense}, {}
    seen = set()
    for layout in args.layouts:
        for n in args.round_to_sweep:
            p = (export_stock if layout == "stock" else export_per_layer)(
                dense, units, reduction, n, dense_macs, arch.config["sample_size"], args.seed)
            signature = json.dumps(p.config, sort_keys=True)
            if signature in seen:  # e.g. a stock grid point that is already a multiple of 32
                continue
            seen.add(signature)
            key = f"{layout}-round{n}"
            models[key], info[key] = p.model, p
    latencies = time_interleaved(models, args.tune_batch_size, args.num_steps, args.warmup, args.tune_repeats, device,
                                 f"rounding {arch.name}")
    rows = []
    for key, p in info.items():
        ratio = speedup(latencies["dense"], latencies[key])
        row = {"key": key, "layout": p.layout, "round_to": p.round_to, "mac_ratio": p.mac_ratio, "macs": p.macs,
               "speedup": ratio, "fraction_of_ideal": ratio["median"] / p.mac_ratio,
               "pruned_step_s": spread(latencies[key]), "widths": width_summary(p.model)}
        base = f"{p.layout}-round{args.round_to_sweep[0]}"
        if key != base and base in info:
            # Pruned against pruned, round by round: seconds per MAC of the unrounded model over
            # those of the rounded one (> 1: rounding made each MAC cheaper), free of the dense timing.
            row["time_per_mac_gain"] = spread([(b / info[base].macs) / (r / p.macs)
                                               for b, r in zip(latencies[base], latencies[key])])
        rows.append(row)
    return {"model": arch.name, "batch_size": args.tune_batch_size, "target_mac_reduction": reduction,
            "dense_step_s": spread(latencies["dense"]), "rows": rows}


def width_summary(model) -> dict:
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    return {"conv_out_channels": widths, "multiple_of_8": sum(w % 8 == 0 for w in widths) / len(widths),
            "multiple_of_16": sum(w % 16 == 0 for w in widths) / len(widths)}


def tune_models(dense, variants: List[Pruned], args) -> Dict[str, nn.Module]:
    chosen = {"dense": dense}
    for p in variants:
        if abs(p.reduction - args.tune_reduction) < 1e-9:
            chosen[p.key] = p.model
    return chosen


def run_channels_last(arch, base: Dict[str, nn.Module], mac_ratios: Dict[str, float], args, device) -> dict:
    models = {}
    for key, model in base.items():
        models[f"{key}|nchw"] = Variant(model)
        models[f"{key}|channels_last"] = Variant(copy.deepcopy(model), channels_last=True)
    latencies = time_interleaved(models, args.tune_batch_size, args.num_steps, args.warmup, args.tune_repeats, device,
                                 f"channels_last {arch.name}")
    return variant_table(arch, base, mac_ratios, latencies, ("nchw", "channels_last"), args)


def sdpa_choices(device):
    """SDPA backends to compare. On a CPU, torch's automatic choice for float32 is the flash kernel
    (``_scaled_dot_product_flash_attention_for_cpu``), so only math is added there."""
    from torch.nn.attention import SDPBackend

    choices = {"sdpa-auto": None, "sdpa-math": SDPBackend.MATH}
    if torch.device(device).type == "cuda":
        choices.update({"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION})
    return choices


def run_sdpa(arch, base: Dict[str, nn.Module], mac_ratios, args, device) -> dict:
    from diffusers.models.attention_processor import AttnProcessor

    # The attention kernel is a small share of the time: dense and the stock model suffice.
    base = {k: v for k, v in base.items() if k == "dense" or k.startswith("stock")}
    models, unavailable = {}, {}
    for key, model in base.items():
        for choice, backend in sdpa_choices(device).items():
            variant = Variant(model, sdpa_backend=backend)
            try:  # a backend that cannot run these shapes on this device is reported, not timed
                with torch.no_grad():
                    p = next(model.parameters())
                    x = torch.randn(1, model.config.in_channels, model.config.sample_size, model.config.sample_size,
                                    device=p.device, dtype=p.dtype)
                    variant(x, torch.tensor(1, device=p.device))
            except RuntimeError as error:
                unavailable[choice] = str(error).splitlines()[0][:200]
                continue
            models[f"{key}|{choice}"] = variant
        classic = copy.deepcopy(model)
        for module in classic.modules():
            if hasattr(module, "set_processor"):
                module.set_processor(AttnProcessor())
        models[f"{key}|no-sdpa"] = Variant(classic)
    latencies = time_interleaved(models, args.tune_batch_size, args.num_steps, args.warmup, args.tune_repeats, device,
                                 f"sdpa {arch.name}")
    names = [c for c in sdpa_choices(device) if c not in unavailable] + ["no-sdpa"]
    out = variant_table(arch, base, mac_ratios, latencies, tuple(names), args)
    out["unavailable"] = unavailable
    return out


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def run_compile(arch, base: Dict[str, nn.Module], mac_ratios, args, device) -> dict:
    """``torch.compile`` (inductor) of each model; compile time = the first call, capped."""
    # Compiling takes minutes per model on a CPU: dense and the stock model show the effect.
    base = {k: v for k, v in base.items() if k == "dense" or k.startswith("stock")}
    models, compile_s, failed = {}, {}, {}
    # Every compiled variant shares Variant.forward; keep all of them in dynamo's cache.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    p0 = next(iter(base.values()))
    size = p0.config.sample_size
    for key, model in base.items():
        models[f"{key}|eager"] = Variant(model)
        for mode, options in (("compile", None), ("compile-freezing", {"freezing": True})):
            compiled = torch.compile(Variant(copy.deepcopy(model)), options=options)
            x = torch.randn(args.tune_batch_size, model.config.in_channels, size, size, device=device)
            previous = signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(int(args.compile_timeout))
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    compiled(x, torch.tensor(999, device=device))
                compile_s[f"{key}|{mode}"] = time.perf_counter() - start
                models[f"{key}|{mode}"] = compiled
            except Exception as error:  # noqa: BLE001 - any compiler failure is a result to report
                if isinstance(error, _Timeout) or time.perf_counter() - start >= args.compile_timeout - 1:
                    # dynamo wraps the alarm's exception in its own error types
                    failed[f"{key}|{mode}"] = f"compile took longer than {args.compile_timeout:.0f} s"
                else:
                    failed[f"{key}|{mode}"] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
    latencies = time_interleaved(models, args.tune_batch_size, args.num_steps, args.warmup, args.tune_repeats, device,
                                 f"compile {arch.name}")
    modes = ("eager", "compile", "compile-freezing")
    out = variant_table(arch, base, mac_ratios, latencies, modes, args)
    out["compile_seconds"] = compile_s
    out["failed"] = failed
    return out


def variant_table(arch, base, mac_ratios, latencies, choices, args) -> dict:
    """Per choice: each model's latency, its speed-up over dense with the same choice, and over the
    first choice of the same model (what the choice itself buys)."""
    rows = []
    first = choices[0]
    for choice in choices:
        dense_key = f"dense|{choice}"
        for key in base:
            name = f"{key}|{choice}"
            if name not in latencies or dense_key not in latencies:
                continue
            row = {"model_key": key, "choice": choice, "step_s": spread(latencies[name]),
                   "gain_over_" + first: speedup(latencies[f"{key}|{first}"], latencies[name])}
            if key != "dense":
                ratio = speedup(latencies[dense_key], latencies[name])
                row.update({"mac_ratio": mac_ratios[key], "speedup": ratio,
                            "fraction_of_ideal": ratio["median"] / mac_ratios[key],
                            "speedup_vs_dense_" + first: speedup(latencies[f"dense|{first}"], latencies[name])})
            rows.append(row)
    return {"model": arch.name, "batch_size": args.tune_batch_size, "target_mac_reduction": args.tune_reduction,
            "choices": list(choices), "rows": rows}


# ------------------------------------------------------------------------------------- overhead
def _training_args(arch: Architecture, batch_size: int):
    parser = argparse.ArgumentParser()
    training.add_training_arguments(parser, {"train_batch_size": batch_size, "max_train_steps": arch.total_steps})
    return parser.parse_args([])


class _Trainer:
    """One optimizer step as ``training/prune.py`` makes it: DDPM loss, backward, clipping, AdamW, EMA."""

    def __init__(self, model, args):
        self.model = model.train()
        self.optimizer = training.create_optimizer(model, args)
        self.ema = training.create_ema(model, args)
        self.max_grad_norm = args.max_grad_norm

    def step(self, loss_fn, after_backward=None):
        loss = loss_fn(self.model)
        loss.backward()
        if after_backward is not None:  # prune.py's place for the masks' step: before the weights' gradients are clipped
            after_backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.model.parameters())

    def tracked(self):
        return [self.model, self.optimizer] + list(self.ema.shadow_params)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


class PeakMemory:
    """Peak bytes of live tensor storage on the CPU while a function runs.

    Every storage that exists at the start (the ``tracked`` tensors: parameters, optimizer and EMA
    states) or that any aten operation returns while it runs (activations, gradients, temporaries,
    including those of backward passes) is counted once, from its creation until it is freed (a
    weak reference tells). The CPU has no allocator statistics like ``torch.cuda.max_memory_allocated``;
    this is the same quantity, counted by a dispatch mode.
    """

    def __init__(self, tracked):
        from torch.utils._python_dispatch import TorchDispatchMode

        owner = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    owner._add(t)
                return out

        self.mode = _Mode()
        self.live: Dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self._finalizers = []
        for t in tracked:
            self._add(t)
        self.static = self.current  # what the step starts with: parameters, optimizer and EMA states

    def _add(self, t) -> None:
        import weakref

        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        self._finalizers.append(weakref.finalize(storage, self._free, key))

    def _free(self, key) -> None:
        self.current -= self.live.pop(key, 0)

    def run(self, fn) -> int:
        with self.mode:
            fn()
        for f in self._finalizers:
            f.detach()
        return self.peak


def _tensors(objects) -> List[torch.Tensor]:
    out = []
    for obj in objects:
        if isinstance(obj, nn.Module):
            out += list(obj.parameters()) + list(obj.buffers())
            out += [p.grad for p in obj.parameters() if p.grad is not None]
        elif isinstance(obj, torch.optim.Optimizer):
            out += [v for state in obj.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        elif isinstance(obj, torch.Tensor):
            out.append(obj)
    return out


def peak_memory(fn, tracked, device):
    """Peak bytes held by tensors while ``fn`` runs (parameters, gradients, optimizer and EMA states
    and everything ``fn`` allocates), and the bytes held when it starts. CUDA: the caching
    allocator's figures; CPU: :class:`PeakMemory`."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        static = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated()), float(static)
    tracker = PeakMemory(_tensors(tracked))
    return float(tracker.run(fn)), float(tracker.static)


def run_overhead(arch: Architecture, dense, units, args, device) -> dict:
    """Cost of the pruning stage against plain fine-tuning and one-shot pruning, in wall-clock time."""
    from diffusers import DDPMScheduler

    from diffusers_gfprune.objective import make_loss

    batch = args.overhead_batch_size or arch.overhead_batch_size
    targs = _training_args(arch, batch)
    size = arch.config["sample_size"]
    channels = arch.config["in_channels"]
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    generator = torch.Generator().manual_seed(args.seed)
    dataset = [{"images": torch.rand(channels, size, size, generator=generator) * 2 - 1} for _ in range(4 * batch)]

    def train_loss(step):
        images = torch.stack([dataset[(step * batch + i) % len(dataset)]["images"] for i in range(batch)]).to(device)
        return make_loss(images, scheduler, torch.Generator().manual_seed(step))

    def scoring(step):
        return lambda: training.scoring_losses(dataset, step, args.seed, batch, args.score_batches, scheduler, device=device)

    # prune.py's default: the stock layout at half the dense MACs, local selection.
    sparsity, _ = sparsity_for_macs(dense, units, args.overhead_macs, round_to=1)
    config = PrunerConfig.from_total_steps(arch.total_steps, target_sparsity=sparsity, selection="local")
    student = copy.deepcopy(dense).to(device)
    prepare_stock(student, units, sparsity, refine_steps=0)
    plain = _Trainer(copy.deepcopy(dense).to(device), targs)
    staged = _Trainer(student, targs)
    pruner = GradientFlowPruner(student, units, config, get_criterion("gradient_flow", hvp="exact"))
    soft_step, hard_step = 0, config.soft_steps + 1
    # A soft-phase step without re-scoring (masks are written, nothing is scored).
    quiet_step = next((s for s in range(1, config.soft_steps) if not pruner.is_rescoring_step(s)), config.pruning_steps + 1)
    # Through the soft phase to its last re-scoring (which selects the full target), then into the
    # hard phase: binary masks at the target, ready to export.
    for step in (soft_step, pruner.last_soft_rescoring(), hard_step):
        pruner.step(step, scoring(step))
    slim = _Trainer(export_model(student, units, pruner.final_masks(), "stock").to(device), targs)
    fd = get_criterion("gradient_flow", hvp="finite_difference")
    taylor = get_criterion("taylor")

    def stage_step():
        pruner.step(quiet_step, scoring(quiet_step))
        staged.step(train_loss(quiet_step))

    # The learned-mask process's soft-phase step (--process flow): gates from the logits before the forward pass,
    # the budget terms in the loss, the logits' own Adam step after it; started from magnitude scores.
    flow_student = copy.deepcopy(dense).to(device)
    prepare_stock(flow_student, units, sparsity, refine_steps=0)
    flowing = _Trainer(flow_student, targs)
    flow = LearnedMasks(UnitMasks(flow_student, units).attach(), LearnedMaskConfig(), MaskBudget.from_pruner_config(config))
    flow.initialize(get_criterion("magnitude").score(flow_student, units, [], masks=flow.masks))

    def flow_step():
        flow.begin_step(quiet_step)
        flowing.step(lambda model: flow.apply() + train_loss(quiet_step)(model), after_backward=flow.update)

    phases = {
        "finetune_dense": lambda: plain.step(train_loss(1)),
        "stage_step_no_rescoring": stage_step,
        "learned_mask_step": flow_step,
        "rescoring_soft": lambda: pruner.step(soft_step, scoring(soft_step)),
        "rescoring_hard": lambda: pruner.step(hard_step, scoring(hard_step)),
        "scoring_gf_finite_difference": lambda: fd.score(student, units, scoring(soft_step)()),
        "scoring_taylor_oneshot": lambda: taylor.score(student, units, scoring(soft_step)()),
        "finetune_slim": lambda: slim.step(train_loss(2)),
    }
    times = {k: [] for k in phases}
    names = list(phases)
    with tqdm(total=(1 + args.overhead_repeats) * len(names), desc=f"overhead {arch.name}", leave=False) as bar:
        for r in range(1 + args.overhead_repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                if r == 0 and name == "rescoring_hard":  # its first-call costs are those of rescoring_soft
                    bar.update()
                    continue
                seconds = _timed(phases[name], device)
                if r >= 1:
                    times[name].append(seconds)
                bar.update()
    median = {k: float(np.median(v)) for k, v in times.items()}

    # The schedule of prune.py: which of the M + 1 pruning-stage steps re-score, and in which phase.
    stage_steps = config.pruning_steps + 1
    n_soft = sum(1 for s in range(stage_steps) if pruner.phase(s) == "soft" and pruner.is_rescoring_step(s))
    n_hard = sum(1 for s in range(stage_steps) if pruner.phase(s) == "hard" and pruner.is_rescoring_step(s))
    base = median["stage_step_no_rescoring"]
    average_stage = base + (n_soft * median["rescoring_soft"] + n_hard * median["rescoring_hard"]) / stage_steps
    t_total, ft, sl = arch.total_steps, median["finetune_dense"], median["finetune_slim"]
    gf_run = stage_steps * average_stage + (t_total - stage_steps) * sl
    oneshot_run = median["scoring_taylor_oneshot"] + t_total * sl

    memory, static = {}, {}
    trackers = {
        "finetune_dense": plain.tracked(),
        "stage_step_no_rescoring": staged.tracked(),
        "learned_mask_step": flowing.tracked() + [flow.logits, flow.optimizer],
        "rescoring_soft": staged.tracked(),
        "scoring_gf_finite_difference": staged.tracked(),
        "scoring_taylor_oneshot": staged.tracked(),
        "finetune_slim": slim.tracked(),
    }
    for name in tqdm(trackers, desc=f"peak memory {arch.name}", leave=False):
        memory[name], static[name] = peak_memory(phases[name], trackers[name], device)

    out = {
        "model": arch.name, "batch_size": batch, "score_batches": args.score_batches, "score_batch_size": batch,
        "target_sparsity": sparsity, "slim_mac_ratio": mac_count(dense, size).total / mac_count(slim.model, size).total,
        "schedule": {"max_train_steps": t_total, "soft_steps": config.soft_steps, "pruning_steps": config.pruning_steps,
                     "rescore_every": config.rescore_every, "stage_steps": stage_steps,
                     "soft_rescorings": n_soft, "hard_rescorings": n_hard},
        "seconds": {k: spread(v) for k, v in times.items()},
        "ratios_to_finetune_dense": {k: v / ft for k, v in median.items()},
        "average_stage_step_s": average_stage,
        "average_stage_step_over_finetune": average_stage / ft,
        "one_scoring_over_finetune": median["rescoring_soft"] / ft,
        "learned_mask_step_over_stage_step": median["learned_mask_step"] / base,
        "run_estimates_s": {"plain_finetune_dense": t_total * ft, "gradient_flow": gf_run, "oneshot_taylor": oneshot_run},
        "run_ratios": {"gradient_flow_over_plain_finetune": gf_run / (t_total * ft),
                       "gradient_flow_over_oneshot": gf_run / oneshot_run},
        "peak_memory_bytes": memory,
        # Held before the step (weights, optimizer and EMA states) vs added by it (activations,
        # gradients, second-order graphs): the added part grows with the batch, the held part does not.
        "static_memory_bytes": static,
        "added_memory_bytes": {k: memory[k] - static[k] for k in memory},
        "peak_memory_over_finetune_dense": {k: v / memory["finetune_dense"] for k, v in memory.items()},
    }
    if arch.name in args.direct_overhead:
        out["direct"] = direct_stage_average(arch, dense, units, config, targs, scoring, train_loss, device)
        out["direct"]["stage_over_finetune"] = out["direct"]["stage_mean_s"] / out["direct"]["finetune_mean_s"]
    return out


def direct_stage_average(arch, dense, units, config, targs, scoring, train_loss, device) -> dict:
    """The whole pruning stage of the default schedule, step by step, each step next to a plain
    fine-tune step of the dense model: the measured average, not an estimate."""
    student = copy.deepcopy(dense).to(device)
    prepare_stock(student, units, config.target_sparsity, refine_steps=0)
    staged = _Trainer(student, targs)
    plain = _Trainer(copy.deepcopy(dense).to(device), targs)
    pruner = GradientFlowPruner(student, units, config, get_criterion("gradient_flow", hvp="exact"))
    stage, finetune = [], []
    for step in tqdm(range(config.pruning_steps + 1), desc=f"direct stage {arch.name}", leave=False):
        def stage_step():
            pruner.step(step, scoring(step))
            staged.step(train_loss(step))

        if step % 2 == 0:
            stage.append(_timed(stage_step, device))
            finetune.append(_timed(lambda: plain.step(train_loss(step)), device))
        else:
            finetune.append(_timed(lambda: plain.step(train_loss(step)), device))
            stage.append(_timed(stage_step, device))
    return {"steps": len(stage), "rescorings": pruner.num_rescorings, "stage_mean_s": float(np.mean(stage)),
            "finetune_mean_s": float(np.mean(finetune)), "stage_total_s": float(np.sum(stage)),
            "finetune_total_s": float(np.sum(finetune))}


# ------------------------------------------------------------------------------------- reporting
def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def batch_sizes_for(arch: Architecture, args) -> Sequence[int]:
    return args.batch_sizes.get(arch.name, arch.batch_sizes)


def machine_info(device) -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import diffusers

    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "mkldnn": torch.backends.mkldnn.is_available(), "platform": platform.platform(), "device": str(device)}
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = list(os.getloadavg())
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def fmt_ratio(r: dict) -> str:
    return f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]"


def fmt_ms(s: dict) -> str:
    return f"{1000 * s['median']:.1f}"


def print_tables(results: dict) -> str:
    lines = []
    add = lines.append
    m = results["machine"]
    threads = f"{m['torch_threads']} thread" + ("s" if m["torch_threads"] != 1 else "")
    add(f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} ({threads}), "
        f"diffusers {m['diffusers']}, device {m['device']}.")
    for model in results.get("models", []):
        add("")
        add(f"### {model['label']}")
        add("")
        add(f"Dense: {model['dense_params'] / 1e6:.2f}M params, {model['dense_macs'] / 1e9:.3f}G MACs per image.")
        if not model["pruned"]:
            continue
        add("")
        add("| layout | MAC cut target | sparsity | params | GMACs | MAC ratio (ideal) |")
        add("|---|---|---|---|---|---|")
        for p in model["pruned"]:
            add(f"| {p['layout']} | {100 * p['target_mac_reduction']:.0f}% | {p['sparsity']:.3f} | {p['params'] / 1e6:.2f}M | "
                f"{p['macs'] / 1e9:.3f} | {p['mac_ratio']:.2f}x |")
    rows = results.get("throughput", [])
    if rows:
        add("")
        add("### Throughput: pruned vs dense, interleaved in one process")
        add("")
        add("| model | dtype | batch | layout | MAC cut | MAC ratio | dense ms/step | pruned ms/step | speed-up median [min-max] "
            "| of ideal | dense img/s | pruned img/s |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            add(f"| {r['model']} | {r['dtype']} | {r['batch_size']} | {r['layout']} | {100 * r['target_mac_reduction']:.0f}% | "
                f"{r['mac_ratio']:.2f}x | {fmt_ms(r['dense_step_s'])} | {fmt_ms(r['pruned_step_s'])} | {fmt_ratio(r['speedup'])} | "
                f"{r['fraction_of_ideal']:.2f} | {r['dense_images_per_s']:.4g} | {r['pruned_images_per_s']:.4g} |")
    if "rounding" in results:
        e = results["rounding"]
        add("")
        add(f"### Width rounding ({e['model']}, batch {e['batch_size']}, {100 * e['target_mac_reduction']:.0f}% MAC cut; "
            f"dense {fmt_ms(e['dense_step_s'])} ms/step)")
        add("")
        add("| variant | round_to | convs at multiples of 8 / 16 | MAC ratio | pruned ms/step | speed-up | of ideal "
            "| time per MAC, unrounded / rounded |")
        add("|---|---|---|---|---|---|---|---|")
        for r in e["rows"]:
            w = r["widths"]
            gain = fmt_ratio(r["time_per_mac_gain"]) if "time_per_mac_gain" in r else "-"
            add(f"| {r['layout']} | {r['round_to']} | {w['multiple_of_8']:.0%} / {w['multiple_of_16']:.0%} | {r['mac_ratio']:.2f}x | "
                f"{fmt_ms(r['pruned_step_s'])} | {fmt_ratio(r['speedup'])} | {r['fraction_of_ideal']:.2f} | {gain} |")
    for name in ("channels_last", "sdpa", "compile"):
        if name not in results:
            continue
        e = results[name]
        first = e["choices"][0]
        add("")
        add(f"### {name} ({e['model']}, batch {e['batch_size']}, {100 * e['target_mac_reduction']:.0f}% MAC cut)")
        add("")
        add(f"| model | choice | ms/step | gain over {first} (same model) | speed-up vs dense (same choice) | of ideal |")
        add("|---|---|---|---|---|---|")
        for r in e["rows"]:
            vs = fmt_ratio(r["speedup"]) if "speedup" in r else "-"
            ideal = f"{r['fraction_of_ideal']:.2f}" if "fraction_of_ideal" in r else "-"
            add(f"| {r['model_key']} | {r['choice']} | {fmt_ms(r['step_s'])} | {fmt_ratio(r['gain_over_' + first])} | {vs} | {ideal} |")
        if e.get("compile_seconds"):
            add("")
            add("Compile time (first call): " + ", ".join(f"{k}: {v:.0f} s" for k, v in e["compile_seconds"].items()))
        for k, v in {**e.get("failed", {}), **e.get("unavailable", {})}.items():
            add(f"- {k}: {v}")
    for o in results.get("overhead", []):
        s = o["schedule"]
        add("")
        add(f"### Cost of pruning ({o['model']}, batch {o['batch_size']}, {o['score_batches']} scoring mini-batches; "
            f"T = {s['max_train_steps']}, N = {s['soft_steps']}, M = {s['pruning_steps']}, K = {s['rescore_every']})")
        add("")
        add("| step | seconds median [min-max] | / dense fine-tune step | peak memory (MiB) | / dense fine-tune "
            "| held before / added (MiB) |")
        add("|---|---|---|---|---|---|")
        for k, v in o["seconds"].items():
            mem = o["peak_memory_bytes"].get(k)
            mem_s = f"{mem / 2**20:.0f}" if mem is not None else "(as rescoring_soft)"
            mem_r = f"{o['peak_memory_over_finetune_dense'][k]:.2f}" if mem is not None else "-"
            split = (f"{o['static_memory_bytes'][k] / 2**20:.0f} / {o['added_memory_bytes'][k] / 2**20:.0f}"
                     if mem is not None and "static_memory_bytes" in o else "-")
            add(f"| {k} | {v['median']:.3f} [{v['min']:.3f}-{v['max']:.3f}] | {o['ratios_to_finetune_dense'][k]:.2f} | {mem_s} "
                f"| {mem_r} | {split} |")
        add("")
        add(f"Re-scorings in the pruning stage: {s['soft_rescorings']} soft + {s['hard_rescorings']} hard over {s['stage_steps']} steps. "
            f"Average pruning-stage step = {o['average_stage_step_over_finetune']:.2f} x a dense fine-tune step "
            f"(one scoring = {o['one_scoring_over_finetune']:.2f} x).")
        e, r = o["run_estimates_s"], o["run_ratios"]
        add(f"Whole run of T steps: plain fine-tune {e['plain_finetune_dense'] / 3600:.2f} h, gradient flow {e['gradient_flow'] / 3600:.2f} h "
            f"({r['gradient_flow_over_plain_finetune']:.2f} x plain), one-shot Taylor + slim fine-tune {e['oneshot_taylor'] / 3600:.2f} h "
            f"(gradient flow = {r['gradient_flow_over_oneshot']:.2f} x one-shot).")
        if "learned_mask_step_over_stage_step" in o:
            add(f"A learned-mask step (--process flow, soft phase) = {o['learned_mask_step_over_stage_step']:.2f} x a "
                f"pruning-stage step without re-scoring, {o['ratios_to_finetune_dense']['learned_mask_step']:.2f} x a dense "
                f"fine-tune step; peak memory {o['peak_memory_over_finetune_dense']['learned_mask_step']:.2f} x.")
        if "direct" in o:
            d = o["direct"]
            add(f"Measured directly over all {d['steps']} pruning-stage steps ({d['rescorings']} re-scorings), each next to a dense "
                f"fine-tune step: {d['stage_mean_s']:.3f} s vs {d['finetune_mean_s']:.3f} s per step = {d['stage_over_finetune']:.2f} x.")
    if results.get("stage_seconds"):
        add("")
        add("Run time by stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["stage_seconds"].items())
            + (f"; load average at start {results['machine']['load_average_start'][0]:.1f}"
               if results["machine"].get("load_average_start") else "") + ".")
    text = "\n".join(lines)
    print(text)
    return text


def plot(results: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusers_gfprune.plotting import save_figure

    rows = results.get("throughput", [])
    if not rows:
        return ""
    fig, ax = plt.subplots(figsize=(7, 5.5))
    markers = {"digits": "s", "cifar10": "o", "church256": "^"}
    colors = {"stock": "tab:blue", "per-layer": "tab:orange"}
    top = max(max(r["mac_ratio"] for r in rows), max(r["speedup"]["max"] for r in rows)) * 1.08
    ax.plot([1, top], [1, top], "k-", lw=1, label="ideal (speed-up = MAC ratio)")
    ax.plot([1, top], [1, 0.9 * top], "k--", lw=0.8, label="0.9 x MAC ratio")
    seen = set()
    batches = sorted({r["batch_size"] for r in rows})
    for r in rows:
        size = 30 + 60 * batches.index(r["batch_size"]) / max(1, len(batches) - 1)
        label = f"{r['model']} {r['layout']}"
        s = r["speedup"]
        ax.errorbar(r["mac_ratio"], s["median"], yerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]],
                    fmt="none", ecolor=colors.get(r["layout"], "gray"), alpha=0.5, lw=0.8)
        ax.scatter(r["mac_ratio"], s["median"], s=size, marker=markers.get(r["model"], "x"),
                   color=colors.get(r["layout"], "gray"), edgecolors="k", linewidths=0.4,
                   label=None if label in seen else label, alpha=0.85)
        seen.add(label)
    ax.set_xlabel("MAC ratio dense / pruned (ideal speed-up)")
    ax.set_ylabel("measured speed-up (median of interleaved rounds)")
    m = results["machine"]
    threads = f"{m['torch_threads']} thread" + ("s" if m["torch_threads"] != 1 else "")
    ax.set_title(f"Speed-up vs MAC ratio, {m['device']} ({threads}); marker size = batch {batches}",
                 fontsize=9)
    ax.set_xlim(1, top)
    ax.set_ylim(min(1, min(r["speedup"]["min"] for r in rows)) * 0.95, top)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


# ------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny versions of the models and few repeats: seconds (CI).")
    parser.add_argument("--models", nargs="+", default=["cifar10", "church256", "digits"],
                        choices=["cifar10", "church256", "digits"], help="Architectures to benchmark.")
    parser.add_argument("--experiments", nargs="+", default=list(DEFAULT_EXPERIMENTS), choices=EXPERIMENTS,
                        help="What to measure (default: throughput overhead; the tuning runs rounding, channels_last, "
                             "sdpa and compile are asked for by name).")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"],
                        help="Throughput dtypes (the other experiments run in float32).")
    parser.add_argument("--reductions", type=float, nargs="+", default=[0.3, 0.5, 0.7],
                        help="Targeted MAC reductions (0.5 = half the dense MACs).")
    parser.add_argument("--layouts", nargs="+", default=["stock", "per-layer"], choices=["stock", "per-layer"])
    parser.add_argument("--round_to", type=int, default=1, help="Widths of the exported models at multiples of this.")
    parser.add_argument("--batch_sizes", nargs="*", default=[], metavar="MODEL=B1,B2",
                        help="Batch sizes per model, e.g. cifar10=1,16,64 (defaults: digits 1,64,256; cifar10 1,16,64; church256 1).")
    parser.add_argument("--num_steps", type=int, default=1, help="Forward passes per timed repeat.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds before timing.")
    parser.add_argument("--repeats", type=int, default=None, help="Timed rounds (default 4; 2 for the 256-px model).")
    parser.add_argument("--tune_repeats", type=int, default=None, help="Timed rounds of the rounding/channels_last/sdpa/compile runs (default 3).")
    parser.add_argument("--sampling_steps", type=int, default=1000, help="Steps of the sampling run the images/s refer to.")
    parser.add_argument("--tune_model", type=str, default="cifar10", help="Architecture of the rounding/channels_last/sdpa/compile runs.")
    parser.add_argument("--tune_batch_size", type=int, default=None, help="Batch of those runs (default 64).")
    parser.add_argument("--tune_reduction", type=float, default=0.5, help="MAC reduction of those runs.")
    parser.add_argument("--round_to_sweep", type=int, nargs="+", default=[1, 8, 16, 32], help="Channel multiples compared.")
    parser.add_argument("--compile_timeout", type=float, default=900, help="Seconds one torch.compile may take.")
    parser.add_argument("--overhead_models", nargs="+", default=["digits", "cifar10"], help="Architectures of the cost measurement.")
    parser.add_argument("--overhead_repeats", type=int, default=2, help="Timed rounds of the cost measurement.")
    parser.add_argument("--overhead_batch_size", type=int, default=None,
                        help="train_batch_size of the cost measurement (default: digits 64 as prune.py; cifar10 4 and "
                             "church256 1, what a 2-core CPU does in minutes).")
    parser.add_argument("--overhead_macs", type=float, default=0.5, help="MAC fraction of the pruning target (prune.py's default).")
    parser.add_argument("--score_batches", type=int, default=4, help="Mini-batches per scoring (prune.py's --score_batches).")
    parser.add_argument("--direct_overhead", nargs="*", default=[],
                        help="Architectures whose whole pruning stage is also timed step by step, next to plain fine-tune "
                             "steps (slow: M + 1 steps of each; e.g. digits, about 5 minutes on 2 CPU cores).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: 1 on a CPU, robust on a shared machine; torch's choice on CUDA).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=str, default=os.path.join(REPO, "docs"), help="Where the JSON and the plot go.")
    parser.add_argument("--output_json", type=str, default=None, help="Default: <output_dir>/speed.json.")
    parser.add_argument("--plot", type=str, default=None, help="Default: <output_dir>/speed.png.")
    parser.add_argument("--no_plot", action="store_true", help="Write no plot.")
    args = parser.parse_args(argv)
    args.repeats_given = args.repeats is not None
    if args.repeats is None:
        args.repeats = 2 if args.quick else 4
    if args.tune_repeats is None:
        args.tune_repeats = 2 if args.quick else 3
    if args.threads is None and args.device == "cpu":
        # One thread: on a shared CPU, a second OpenMP thread waits for a core at every parallel
        # region, which swamps the timings; one thread measures the model, not the neighbours.
        args.threads = 1
    if args.quick:
        if args.reductions == [0.3, 0.5, 0.7]:
            args.reductions = [0.5]
        if args.overhead_models == ["digits", "cifar10"]:
            args.overhead_models = ["digits"]
        args.warmup = min(args.warmup, 1)
        args.overhead_repeats = min(args.overhead_repeats, 1)
        args.round_to_sweep = [n for n in args.round_to_sweep if n <= 8] or [1]
        args.direct_overhead = []
    if args.tune_batch_size is None:
        args.tune_batch_size = 4 if args.quick else 64
    sizes = {}
    for item in args.batch_sizes:
        name, _, values = item.partition("=")
        try:
            sizes[name] = tuple(int(v) for v in values.split(",") if v)
        except ValueError:
            parser.error(f"--batch_sizes takes MODEL=B1,B2,..., got {item!r}")
        if not sizes[name] or min(sizes[name]) < 1:
            parser.error(f"--batch_sizes {item!r}: batch sizes must be positive integers")
    args.batch_sizes = sizes
    for value in args.reductions + [args.tune_reduction]:
        if not 0 < value < 1:
            parser.error(f"MAC reductions lie in (0, 1), got {value}")
    if args.round_to < 1 or min(args.round_to_sweep) < 1:
        parser.error("Channel multiples must be >= 1.")
    args.output_json = args.output_json or os.path.join(args.output_dir, "speed.json")
    args.plot = None if args.no_plot else (args.plot or os.path.join(args.output_dir, "speed.png"))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device.")
    dtypes = [getattr(torch, d) for d in args.dtypes]
    archs = architectures(args.quick)
    started = time.time()
    results = {"machine": machine_info(device), "args": {k: (training.portable_path(v) if isinstance(v, str) else v) for k, v in vars(args).items()}, "quick": args.quick,
               "models": [], "throughput": [], "overhead": [], "stage_seconds": {}}

    def staged(key, fn, *a):
        start = time.time()
        out = fn(*a)
        results["stage_seconds"][key] = results["stage_seconds"].get(key, 0.0) + time.time() - start
        return out

    wanted = set(args.models) | ({args.tune_model} if set(args.experiments) & {"rounding", "channels_last", "sdpa", "compile"} else set())
    if "overhead" in args.experiments:
        wanted |= set(args.overhead_models)
    for name in [n for n in ("cifar10", "church256", "digits") if n in wanted]:
        arch = archs[name]
        dense = build_dense(arch.config, args.seed).to(device)
        units = staged(f"{name}/find_units", find_units, dense, arch.trace_size)
        size = arch.config["sample_size"]
        dense_count = mac_count(dense, size)
        variants: List[Pruned] = []
        needs_variants = (name in args.models and "throughput" in args.experiments) or (
            name == args.tune_model and set(args.experiments) & {"channels_last", "sdpa", "compile"})
        if needs_variants:
            throughput = name in args.models and "throughput" in args.experiments
            reductions = args.reductions if throughput else [args.tune_reduction]
            if name == args.tune_model and args.tune_reduction not in reductions:
                reductions = list(reductions) + [args.tune_reduction]
            for reduction in tqdm(reductions, desc=f"export {name}", leave=False):
                for layout in args.layouts:
                    export = export_stock if layout == "stock" else export_per_layer
                    variants.append(staged(f"{name}/export", export, dense, units, reduction, args.round_to,
                                           dense_count.total, size, args.seed))
        if name in args.models:
            results["models"].append({"name": name, "label": arch.label, "config": _json_config(dense),
                                      "dense_params": count_parameters(dense), "dense_macs": dense_count.total,
                                      "dense_macs_without_attention": dense_count.without_attention,
                                      "pruned": [p.summary() for p in variants if p.reduction in args.reductions]})
            if "throughput" in args.experiments:
                listed = [p for p in variants if p.reduction in args.reductions]
                for dtype in dtypes:
                    results["throughput"] += staged(f"{name}/throughput", run_throughput, arch, dense, listed, args, dtype, device)
        if name == args.tune_model:
            base = tune_models(dense, variants, args)
            ratios = {p.key: p.mac_ratio for p in variants}
            if "rounding" in args.experiments:
                results["rounding"] = staged("rounding", run_rounding, arch, dense, units, dense_count.total, args, device)
            if "channels_last" in args.experiments:
                results["channels_last"] = staged("channels_last", run_channels_last, arch, base, ratios, args, device)
            if "sdpa" in args.experiments:
                results["sdpa"] = staged("sdpa", run_sdpa, arch, base, ratios, args, device)
            if "compile" in args.experiments:
                results["compile"] = staged("compile", run_compile, arch, base, ratios, args, device)
        if "overhead" in args.experiments and name in args.overhead_models:
            results["overhead"].append(staged(f"{name}/overhead", run_overhead, arch, dense, units, args, device))
        del dense, variants
        gc.collect()
    results["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["wall_seconds"] = time.time() - started
    results["markdown"] = print_tables(results)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
    training.write_json(results, args.output_json, indent=1)
    if args.plot and results["throughput"]:
        plot(results, args.plot)
    print(f"\nWrote {args.output_json}" + (f" and {args.plot}" if args.plot and results["throughput"] else "")
          + f" in {results['wall_seconds']:.0f} s.")
    return results


if __name__ == "__main__":
    main()
