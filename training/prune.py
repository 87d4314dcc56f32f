#!/usr/bin/env python
"""Prune a UNet2DModel DDPM with gradient flow, fine-tune it, and save (and push) the slim pipeline.

With no arguments it prunes the project's shipped digits teacher to about half its MACs, offline:

    accelerate launch training/prune.py

The real thing, on a GPU:

    accelerate launch --mixed_precision bf16 training/prune.py --pretrained_model_name_or_path google/ddpm-cifar10-32 \\
        --dataset_name cifar10 --image_column img --target_macs 0.5 --output_dir ddpm-cifar10-gfp50 \\
        --max_train_steps 100000 --train_batch_size 128 --push_to_hub --hub_model_id user/ddpm-cifar10-gfp50
"""

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from typing import Optional

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import DDIMScheduler, UNet2DModel
from tqdm.auto import tqdm

from diffusers_gfprune import data, evaluation, export, training
from diffusers_gfprune.counting import count_parameters, model_counts
from diffusers_gfprune.criteria import CRITERIA, GRADIENT_FLOW_FORMS, config_dict, get_criterion
from diffusers_gfprune.hub import public_name, scrub_local_paths
from diffusers_gfprune.learned_masks import BUDGETS, PARAMETRIZATIONS, SCOPES, LearnedMaskConfig
from diffusers_gfprune.distillation import SCHEDULES as DISTILL_SCHEDULES
from diffusers_gfprune.distillation import DistillationConfig, Distiller, FeatureMap, resolve_feature_layers
from diffusers_gfprune.modeling_pruned_unet import PrunedUNet2DModel
from diffusers_gfprune.plotting import plot_pruning_run
from diffusers_gfprune.repair import inputs_from_losses, repair_removed_units
from diffusers_gfprune.pruner import PROCESSES, REACTIVATION_RULES, SOFT_COMMITS, GradientFlowPruner, PrunerConfig
from diffusers_gfprune.sampling import comparison_grid
from diffusers_gfprune.step_log import PeakMemory, StepLog
from diffusers_gfprune.selection import check_macs_target
from diffusers_gfprune.teacher import load_kind, load_teacher, resolve_teacher
from diffusers_gfprune.pipeline_kinds import LatentCacheConfig
from diffusers_gfprune.units import find_units

logger = get_logger(__name__)

DEFAULT_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "teachers", "ddpm-digits")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=os.path.normpath(DEFAULT_TEACHER),
                        help="The teacher: a Hub id or a local folder with a DDPMPipeline or a UNet2DModel (default: the shipped digits teacher).")
    parser.add_argument("--revision", type=str, default=None, help="Revision (branch, tag, commit) of the teacher on the Hub.")
    training.add_data_arguments(parser)
    training.add_training_arguments(parser, {"output_dir": "ddpm-digits-gfp50", "max_train_steps": 1000, "train_batch_size": 64,
                                             "learning_rate": 2e-4, "lr_warmup_steps": 0, "checkpointing_steps": 250,
                                             "validation_steps": 250})
    training.add_hub_arguments(parser)
    p = parser.add_argument_group("pruning")
    p.add_argument("--criterion", type=str, default="magnitude",
                   help=f"Pruning criterion: one of {sorted(CRITERIA)}. The default, magnitude, won the written decision rule "
                        "over both shipped teachers; every gradient-flow form ranked below it (docs/benchmarks.md). "
                        "--criterion gradient_flow runs the paper's criterion (form: --gradient_flow_form).")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target_sparsity", type=float, default=None, help="Fraction of units to remove, in [0, 1).")
    target.add_argument("--target_macs", type=float, default=None,
                        help="Instead of a sparsity: reach this fraction of the dense MACs (default 0.5 when neither is given).")
    p.add_argument("--layout", type=str, default="stock", choices=export.LAYOUTS,
                   help="'stock': a plain UNet2DModel, loads anywhere; 'per-layer': widths chosen by a global ranking (loads with trust_remote_code=True).")
    p.add_argument("--soft_steps", type=int, default=None, help="N: steps of the progressive soft phase (default 0.1 x max_train_steps).")
    p.add_argument("--pruning_steps", type=int, default=None, help="M: end of the pruning stage, where the model is exported (default 0.2 x max_train_steps).")
    p.add_argument("--rescore_every", type=int, default=None, help="K: re-score every K steps (default N / 10).")
    p.add_argument("--sparsity_schedule", type=str, default="linear", help="s_t: linear, cosine or exponential.")
    p.add_argument("--mask_schedule", type=str, default="linear", help="p_t: linear, cosine or exponential.")
    p.add_argument("--gradient_flow_form", type=str, default="loss_change", choices=GRADIENT_FLOW_FORMS,
                   help="gradient_flow: which member of the family ranks the units (see docs/benchmarks.md): 'loss_change' (the "
                        "most reliable and least damaging form), 'increase' (the paper's reading), 'preserve' or 'mask_flow'.")
    p.add_argument("--process", type=str, default="progressive", choices=PROCESSES,
                   help="'progressive': soft phase, hard phase, export at M (the paper); 'one-shot': prune the dense teacher "
                        "at step 0, export, fine-tune; 'flow': the soft phase's masks are trainable gates that descend the "
                        "training loss under the MACs schedule, started from the criterion's ranks (--flow_* options; "
                        "docs/benchmarks.md, learned masks).")
    flow_fields = LearnedMaskConfig.__dataclass_fields__
    p.add_argument("--flow_parametrization", type=str, default="sigmoid", choices=PARAMETRIZATIONS,
                   help=flow_fields["parametrization"].metadata["help"])
    p.add_argument("--flow_budget", type=str, default="projection", choices=BUDGETS, help=flow_fields["budget"].metadata["help"])
    p.add_argument("--flow_scope", type=str, default=None, choices=SCOPES, help=flow_fields["scope"].metadata["help"])
    p.add_argument("--flow_learning_rate", type=float, default=None, help=flow_fields["mask_lr"].metadata["help"])
    p.add_argument("--flow_prior_weight", type=float, default=0.0, help=flow_fields["prior_weight"].metadata["help"])
    p.add_argument("--score_ema", type=float, default=0.5, help="Smoothing of scores between re-scorings.")
    p.add_argument("--score_batches", type=int, default=4,
                   help="Mini-batches per re-scoring (4 x 64 images: split-half rank correlation 0.86 for gradient_flow's loss_change).")
    p.add_argument("--score_batch_size", type=int, default=None, help="Images per scoring mini-batch (default: train_batch_size).")
    p.add_argument("--score_timesteps", type=str, default="stratified", choices=["stratified", "uniform"],
                   help="Timesteps of the scoring mini-batches: one per stratum of [0, T) (stratified) or uniform draws.")
    p.add_argument("--score_chunk_size", type=int, default=32,
                   help="The criteria differentiate at most this many images per process at a time and sum the pieces (the "
                        "scores do not change): a double backward holds several times a training step's activations, so "
                        "this bounds the scoring memory independently of --score_batch_size. Lower it if scoring runs out of memory.")
    p.add_argument("--score_resample", action="store_true",
                   help="Draw new scoring images and noise at every re-scoring (default: the same draw, fixed by --seed).")
    p.add_argument("--hvp", type=str, default="exact", choices=["exact", "finite_difference"], help="gradient_flow: how H v is computed.")
    p.add_argument("--soft_commit", type=str, default="monotone", choices=SOFT_COMMITS,
                   help="Soft phase: keep selected units selected ('monotone') or select anew at every re-scoring ('reselect').")
    p.add_argument("--reactivation", type=str, default="on", choices=["on", "off"], help="Hard phase: pruned units can come back.")
    p.add_argument("--reactivation_rule", type=str, default="fair", choices=REACTIVATION_RULES,
                   help="Hard phase: score pruned and kept units with every mask at 1 ('fair') or kept units in the masked model ('mixed').")
    p.add_argument("--diff_pruning_timesteps", type=int, default=None,
                   help="diff_pruning: timesteps scanned from low to high noise (default: the criterion's own, 100).")
    p.add_argument("--reactivation_fraction", type=float, default=0.05,
                   help="Hard phase: at most this fraction of a family's pruned units swap back in per re-scoring.")
    p.add_argument("--repair_at_removal", type=str, default="off", choices=["on", "off"],
                   help="--process one-shot: fold the removed attention heads' and resnet GroupNorm groups' mean contribution "
                        "into their consumer's bias (to_out[0], conv2), measured on the scoring mini-batches with every mask "
                        "at 1 (FLAP-style bias compensation; diffusers_gfprune/repair.py). The progressive and flow processes "
                        "remove units continuously, so there is nothing left to fold at their export.")
    p.add_argument("--min_keep_fraction", type=float, default=0.1, help="per-layer: every family keeps at least this fraction.")
    p.add_argument("--round_to", type=int, default=1,
                   help="Keep every width a multiple of this many channels (8, 16 or 32 run faster; see docs/speed.md). "
                        "stock: --target_macs picks the nearest sparsity whose widths are all multiples; per-layer: "
                        "the selection rounds each family. 1 = no rounding.")
    d = parser.add_argument_group("distillation from the dense teacher (pruning stage and fine-tuning; see docs/benchmarks.md)")
    d.add_argument("--distill_weight", type=float, default=0.0,
                   help="Weight of the output-level term ||student(x_t, t) - teacher(x_t, t)||^2 added to the DDPM loss; 0 = off.")
    d.add_argument("--distill_feature_weight", type=float, default=0.0,
                   help="Weight of the feature-level term (relative squared error at the outputs of --distill_features); 0 = off.")
    d.add_argument("--distill_features", type=str, nargs="+", default=[],
                   help="Blocks whose outputs are distilled: down_blocks.<i>, mid_block, up_blocks.<i>, or all.")
    d.add_argument("--distill_schedule", type=str, default="constant", choices=DISTILL_SCHEDULES,
                   help="The weights over the run: constant, or decaying from 1x at step 0 to 0 at the last step.")
    parser.add_argument("--logging_steps", type=int, default=10,
                        help="Read the loss back from the device every N steps (progress bar, trackers, the curves); in "
                             "between, nothing in the training step waits for the GPU.")
    e = parser.add_argument_group("evaluation (at the end of the run; the numbers go into the card)")
    e.add_argument("--latent_cache_mb", type=float, default=0.0,
                   help=LatentCacheConfig.__dataclass_fields__["max_megabytes"].metadata["help"])
    e.add_argument("--num_eval_images", type=int, default=300,
                   help="Image pairs (teacher, pruned) sampled from the same noise for SSIM and FID/KID; 0 skips the evaluation.")
    e.add_argument("--eval_fid", type=str, default="auto", choices=evaluation.FID_CHOICES,
                   help="FID/KID features: 'auto' = the shipped classifier of a built-in data set (digits, photos), Inception-v3 otherwise "
                        "(listed as not computed when its weights are unavailable).")
    e.add_argument("--validation_fid_images", type=int, default=0,
                   help="At every validation step, also the FID (the shipped classifier's features) of this many samples; built-in data sets only.")
    e.add_argument("--inception_weights", type=str, default=None,
                   help="Path of torch-fidelity's Inception-v3 weights file, for Inception FID offline.")
    return training.resolve_data_arguments(parser.parse_args(argv))


# What each criterion ranks by, for the card.
CRITERION_NOTES = {
    "increase": "the paper's reading: units whose removal most increases the gradient norm go first",
    "preserve": "units whose removal changes the gradient norm least go first",
    "loss_change": "units whose removal the second-order expansion of the loss predicts to raise it least go first",
    "mask_flow": "units whose masks carry the least of the gradient flow over the training steps go first",
    "taylor": "units with the smallest first-order loss change |theta . g| go first",
    "diff_pruning": "Taylor scores over the low-noise timesteps (Diff-Pruning)",
    "magnitude": "units with the smallest weight norm go first",
    "random": "units chosen at random",
}


def card_hyperparameters(args) -> dict:
    """The run's settings the card lists: only those that acted (no scoring draws for a data-free criterion, no
    gradient-flow estimator for another criterion, no soft/hard-phase rules for a one-shot run)."""
    keys = ["train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps",
            "max_train_steps", "use_ema", "ema_max_decay", "seed", "mixed_precision"]
    if CRITERIA[args.criterion].needs_data:
        keys += ["score_batches", "score_batch_size", "score_timesteps", "score_resample"]
    if args.criterion == "gradient_flow":
        keys += ["hvp", "gradient_flow_form"]
    keys += ["process"]
    if args.process == "one-shot":
        keys += ["repair_at_removal"]
    if args.process == "progressive":
        keys += ["score_ema", "soft_commit", "reactivation", "reactivation_rule"]
    if args.process == "flow":
        keys += ["flow_parametrization", "flow_budget", "flow_learning_rate", "reactivation", "reactivation_rule"]
    return {k: getattr(args, k) for k in keys}


def pruning_config(args) -> PrunerConfig:
    if args.process == "one-shot":
        if args.max_train_steps < 1:
            raise ValueError("--process one-shot fine-tunes after pruning at step 0: --max_train_steps must be >= 1.")
        return PrunerConfig(target_sparsity=args.target_sparsity, process="one-shot",
                            selection="local" if args.layout == "stock" else "global", min_keep_fraction=args.min_keep_fraction,
                            round_to=args.round_to, target_macs=args.target_macs if args.layout == "per-layer" else None)
    soft = args.soft_steps if args.soft_steps is not None else max(1, round(0.1 * args.max_train_steps))
    pruning = args.pruning_steps if args.pruning_steps is not None else max(soft + 1, round(0.2 * args.max_train_steps))
    if pruning >= args.max_train_steps:
        # The model is exported after step M (global_step > pruning_steps), so M < max_train_steps.
        raise ValueError(
            f"The pruning stage (--pruning_steps {pruning}) must end before --max_train_steps {args.max_train_steps} "
            "(the slim model is exported after step pruning_steps and fine-tuned for the remaining steps); "
            "lower the phase lengths or train longer."
        )
    return PrunerConfig(
        target_sparsity=args.target_sparsity,
        process=args.process,
        soft_steps=soft,
        pruning_steps=pruning,
        rescore_every=args.rescore_every if args.rescore_every is not None else max(1, soft // 10),
        sparsity_schedule=args.sparsity_schedule,
        mask_schedule=args.mask_schedule,
        selection="local" if args.layout == "stock" else "global",
        min_keep_fraction=args.min_keep_fraction,
        score_ema=args.score_ema,
        soft_commit=args.soft_commit,
        reactivation=args.reactivation == "on",
        reactivation_rule=args.reactivation_rule,
        reactivation_fraction=args.reactivation_fraction,
        round_to=args.round_to,
        target_macs=args.target_macs if args.layout == "per-layer" else None,
    )


def flow_config(args) -> Optional[LearnedMaskConfig]:
    """The learned masks' settings (``--process flow``), seeded from the run's --seed; None for other processes."""
    if args.process != "flow":
        return None
    # Feature distillation reads the mask values in the loss itself (it masks the teacher's features), a path the
    # weights' gradients do not see: the gates' gradient then comes from autograd.
    gate_gradient = "autograd" if args.distill_feature_weight > 0 else "auto"
    return LearnedMaskConfig(parametrization=args.flow_parametrization, budget=args.flow_budget, scope=args.flow_scope,
                             mask_lr=args.flow_learning_rate, prior_weight=args.flow_prior_weight, seed=args.seed,
                             gate_gradient=gate_gradient)


def distillation_config(args) -> DistillationConfig:
    return DistillationConfig(output_weight=args.distill_weight, feature_weight=args.distill_feature_weight,
                              feature_layers=tuple(args.distill_features), schedule=args.distill_schedule)


def criterion_options(args) -> dict:
    """The criterion's config from the flags: ``random`` draws from the run's --seed, so that seeds differ."""
    if args.criterion == "gradient_flow":
        return {"hvp": args.hvp, "form": args.gradient_flow_form}
    if args.criterion == "random":
        return {"seed": args.seed}
    if args.criterion == "diff_pruning" and args.diff_pruning_timesteps is not None:
        return {"num_timesteps": args.diff_pruning_timesteps}
    return {}


def validate(args):
    """Every check that can fail, before any heavy work and before anything is written."""
    training.check_training_arguments(args)
    training.check_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint)
    training.check_hub_arguments(args)
    criterion = get_criterion(args.criterion, **criterion_options(args))
    distill = distillation_config(args)
    if args.target_sparsity is not None:
        export.check_sparsity(args.target_sparsity)
    if args.target_macs is not None and not 0 < args.target_macs <= 1:
        raise ValueError(f"--target_macs is a fraction of the dense MACs in (0, 1], got {args.target_macs}.")
    if args.score_batches < 1:
        raise ValueError("--score_batches must be >= 1.")
    if args.score_chunk_size < 1:
        raise ValueError(f"--score_chunk_size is a number of images >= 1, got {args.score_chunk_size}.")
    if args.logging_steps < 1:
        raise ValueError(f"--logging_steps must be >= 1, got {args.logging_steps}.")
    score_batch = args.score_batch_size or args.train_batch_size
    if args.criterion == "gradient_flow" and args.gradient_flow_form in ("increase", "preserve") and score_batch < 2:
        raise ValueError(f"--gradient_flow_form {args.gradient_flow_form} takes g and H g from different images of each scoring "
                         f"mini-batch: --score_batch_size must be >= 2 (got {score_batch}).")
    if args.round_to < 1:
        raise ValueError(f"--round_to is a channel multiple >= 1 (e.g. 8 or 32; 1 = no rounding), got {args.round_to}.")
    if args.num_eval_images == 1 or args.num_eval_images < 0:
        raise ValueError(f"--num_eval_images must be 0 (no evaluation) or at least 2, got {args.num_eval_images}.")
    builtin_fid = evaluation.BUILTIN_FEATURE_EXTRACTORS
    for name, extractor in builtin_fid.items():
        if args.eval_fid == extractor and args.dataset_name != name:
            raise ValueError(
                f"--eval_fid {extractor} measures the built-in {name} only (--dataset_name {name}); "
                "use --eval_fid auto or inception-v3-compat for other data."
            )
    if args.validation_fid_images and (args.dataset_name not in builtin_fid or args.validation_fid_images < 4):
        raise ValueError(
            "--validation_fid_images computes the FID in a shipped classifier's features during training: it needs "
            f"a built-in data set (--dataset_name {' or '.join(builtin_fid)}) and at least 4 images (got "
            f"{args.validation_fid_images} on {args.dataset_name!r}); for other data, evaluate checkpoints with "
            "training/evaluate.py."
        )
    if args.inception_weights is not None and not os.path.isfile(args.inception_weights):
        raise ValueError(f"--inception_weights {args.inception_weights!r} is not a file.")
    source = resolve_teacher(args.pretrained_model_name_or_path, args.revision, args.cache_dir, args.hub_token)
    export.check_layout(source.unet_config, args.layout)  # block types, time embedding and layout, before any work
    in_channels, _, image_size = source.kind.image_shape(source.unet_config)  # the images' (a latent UNet's are smaller)
    resolution = args.resolution or image_size
    data_config = data.DataConfig(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, train_data_dir=args.train_data_dir,
        image_column=args.image_column, resolution=resolution, center_crop=args.center_crop, random_flip=args.random_flip,
        cache_dir=args.cache_dir, max_train_samples=args.max_train_samples,
    )
    data.validate_data_source(data_config, in_channels)
    if args.target_sparsity is None and args.target_macs is None:
        args.target_macs = 0.5
    # The units, the MACs target and the stock grid need only the teacher's config (a model on the meta device).
    units = find_units(_meta_model(source.unet_config))
    if distill.feature_layers:
        resolve_feature_layers(_meta_model(source.unet_config), distill.feature_layers)
    if args.target_sparsity is None:
        round_to = args.round_to if args.layout == "stock" else 1
        args.target_sparsity, _ = export.sparsity_for_macs(_meta_model(source.unet_config), units, args.target_macs, round_to)
    if args.layout == "stock":
        export.stock_keep_ratio(units, args.target_sparsity, args.round_to)  # a clear error if the layout cannot meet it
    elif args.target_macs is not None:  # per-layer: the selection meets the MACs target itself; refuse what floors forbid
        check_macs_target(units, args.target_macs, args.min_keep_fraction)
    pruning_config(args)  # phase lengths
    if args.repair_at_removal == "on" and args.process != "one-shot":
        raise ValueError("--repair_at_removal on folds what a one-shot removal takes away; with --process "
                         f"{args.process} the masks reach 0 gradually before the export and nothing is left to fold. Use "
                         "--process one-shot or drop the flag.")
    flow = flow_config(args)
    if flow is None and any(getattr(args, k) != v for k, v in FLOW_DEFAULTS.items()):
        raise ValueError("The --flow_* options set the learned masks of --process flow; add --process flow or drop them.")
    if flow is not None and getattr(criterion, "uses_trajectory", False):
        raise ValueError(f"--criterion {args.criterion} with --gradient_flow_form {args.gradient_flow_form} learns from the "
                         "masks' gradients over the training steps, which --process flow uses to train the masks; choose "
                         "another form (loss_change) or criterion (magnitude), or another process.")
    training.resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)  # a missing checkpoint folder
    # Image data sets reveal their channel count only when loaded (their first image); the data set is kept for main.
    dataset = data.load_train_dataset(data_config, in_channels)
    return source, data_config, criterion, dataset


FLOW_DEFAULTS = {"flow_parametrization": "sigmoid", "flow_budget": "projection", "flow_scope": None,
                 "flow_learning_rate": None, "flow_prior_weight": 0.0}


def _jsonable(config):
    return None if config is None else json.loads(json.dumps(dataclasses.asdict(config)))


def _load_slim(cls, checkpoint: str):
    """The exported model of a checkpoint, built from its config as the export builds it.

    ``from_pretrained`` alone would record the checkpoint folder as ``_name_or_path`` in the config, which
    then ends up in the saved pipeline (a local path, and a config that differs from an uninterrupted run's).
    """
    loaded = cls.from_pretrained(checkpoint, subfolder="unet")
    model = cls(**{k: v for k, v in loaded.config.items() if not k.startswith("_")})
    model.load_state_dict(loaded.state_dict(), strict=True)
    return model


def _meta_model(config: dict):
    """The teacher's architecture, without weights (on the meta device)."""
    cls = PrunedUNet2DModel if config.get("_class_name") == "PrunedUNet2DModel" else UNet2DModel
    with torch.device("meta"):
        return cls.from_config(config)


def main(argv=None):
    args = parse_args(argv)
    source, data_config, criterion, dataset = validate(args)
    started = time.time()
    accelerator = training.create_accelerator(args)  # cheap; refuses a launch that did not give the processes asked for

    teacher, noise_scheduler = load_teacher(source, args.cache_dir, args.hub_token)
    kind = load_kind(source, args.cache_dir, args.hub_token, device=accelerator.device)
    teacher.eval().requires_grad_(False)
    units = find_units(teacher)
    config = pruning_config(args)
    in_channels = teacher.config.in_channels
    sample_size = kind.sample_shape(teacher)[-1]

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)

    student, units, reembedding = export.dense_student(teacher, units, args.layout, args.target_sparsity,
                                                       noise_scheduler.config.num_train_timesteps)
    if reembedding is not None:
        logger.info("Time re-embedding: relative change of the time embedding %.4f", reembedding.embedding_relative_error)

    resume = training.resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    stage = "pruning"
    if resume:
        _, meta = training.load_extra_state(resume)
        stage = meta["stage"]
    pruner = None
    if stage == "pruning":
        pruner = GradientFlowPruner(student, units, config, criterion, flow=flow_config(args))
    else:
        slim_cls = UNet2DModel if args.layout == "stock" else PrunedUNet2DModel
        student = _load_slim(slim_cls, resume).train()

    image_dataset = dataset  # real images for the Inception FID reference
    dataset, to_model_input = kind.training_data(dataset, LatentCacheConfig(args.latent_cache_mb), accelerator.device)
    global_batch = args.train_batch_size * accelerator.num_processes
    dataloader = data.make_dataloader(dataset, global_batch, seed=args.seed, num_workers=args.dataloader_num_workers)
    shuffle_generator = dataloader.generator
    noise = training.GlobalBatchNoise(args.seed, accelerator.num_processes, accelerator.process_index)

    # "masks": the final binary masks (1 = keep) once the pruning stage is over; saved in every later checkpoint.
    # "history": per-step loss/sparsity/lr for the curves plot, kept in checkpoints so a resumed run plots the whole run.
    # "seconds": wall time spent in each stage (summed over resumed runs).
    state = {"stage": stage, "masks": None, "history": [], "seconds": {"pruning": 0.0, "finetune": 0.0}, "removal": None}
    ema = training.create_ema(student, args) if args.use_ema else None
    optimizer = training.create_optimizer(student, args)
    lr_scheduler = training.create_lr_scheduler(optimizer, args, accelerator.num_processes, accelerator.split_batches)

    def unwrapped(model):
        """The model itself: no DDP wrapper, no torch.compile wrapper (accelerate keeps the latter by default)."""
        return accelerator.unwrap_model(model, keep_torch_compile=False)

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for m in models:
                unwrapped(m).save_pretrained(os.path.join(output_dir, "unet"))
                weights.pop()
            if ema is not None:
                ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
            if pruner is not None and state["stage"] == "pruning":
                pruner.save(os.path.join(output_dir, "pruner"))
            tensors = {f"noise/{k}": v for k, v in noise.state_dict().items()}
            tensors.update({f"masks/{k}": v for k, v in (state["masks"] or {}).items()})
            training.save_extra_state(output_dir, tensors, {"stage": state["stage"], "history": state["history"],
                                                            "seconds": state["seconds"], "removal": state["removal"]})

    def load_hook(models, input_dir):
        for _ in range(len(models)):
            m = unwrapped(models.pop())
            m.load_state_dict(type(m).from_pretrained(input_dir, subfolder="unet").state_dict())
        if ema is not None:
            training.load_ema(ema, os.path.join(input_dir, "unet_ema"), type(unwrapped(student)))
        if pruner is not None and state["stage"] == "pruning":
            pruner.load(os.path.join(input_dir, "pruner"))
        tensors, meta = training.load_extra_state(input_dir)
        state["history"] = list(meta.get("history", []))
        state["seconds"] = dict(meta.get("seconds", state["seconds"]))
        state["removal"] = meta.get("removal")
        noise.load_state_dict({k[len("noise/"):]: v for k, v in tensors.items() if k.startswith("noise/")})
        masks = {k[len("masks/"):]: v for k, v in tensors.items() if k.startswith("masks/")}
        state["masks"] = masks or None

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    with training.compile_deferred(accelerator, defer=stage == "pruning"):  # --dynamo_backend acts on the slim model
        student, optimizer, dataloader, lr_scheduler = accelerator.prepare(student, optimizer, dataloader, lr_scheduler)
    if pruner is not None:
        pruner.to(accelerator.device)  # the masks were made on the host, before accelerate moved the model
    if ema is not None:
        ema.to(accelerator.device)
    teacher.to(accelerator.device)
    distill = distillation_config(args)
    # The teacher is loaded from its source in every run (resumed ones too) and never checkpointed; the term has no state.
    distiller = Distiller(teacher, distill, args.max_train_steps, accelerator.autocast) if distill.enabled else None
    if accelerator.is_main_process:
        tracked = {k: v for k, v in vars(args).items() if k != "hub_token" and isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("prune", config=tracked)

    global_step = 0
    if resume:
        accelerator.print(f"Resuming from {resume} ({stage} stage)")
        accelerator.load_state(resume)
        global_step = training.checkpoint_step(resume)

    feature_map = _feature_map(distiller, teacher, units, pruner, state)
    fixed_noise = torch.randn((args.num_validation_images, in_channels, sample_size, sample_size), generator=torch.Generator().manual_seed(args.seed))
    ddim = DDIMScheduler.from_config(kind.scheduler.config)
    teacher_images = kind.sample(teacher, ddim, fixed_noise, args.num_inference_steps) if accelerator.is_main_process else None
    dense_stats = model_counts(teacher, sample_size)

    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    progress = tqdm(total=args.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="prune")
    score_batch = args.score_batch_size or args.train_batch_size
    if criterion.needs_data and accelerator.mixed_precision != "no":
        logger.info("Mixed precision %s: the criterion scores in float32 (gradients and Hessian-vector products "
                    "would underflow or drown in rounding in half precision).", accelerator.mixed_precision)

    def scoring(step):
        """The criterion's mini-batches at ``step`` (drawn only when a re-scoring needs them)."""
        return lambda: training.scoring_losses(
            dataset, step, args.seed, score_batch, args.score_batches, noise_scheduler, args.prediction_type,
            accelerator.num_processes, accelerator.process_index, accelerator.device,
            stratified=args.score_timesteps == "stratified", resample=args.score_resample, chunk_size=args.score_chunk_size,
            encode=to_model_input,
        )

    def export_now(student, ema, repair=None):
        """End of the pruning stage: physically remove the masked units; the dense student is released."""
        state["masks"] = {k: v.detach().cpu().contiguous() for k, v in pruner.final_masks().items()}
        slim = _export_and_rebuild(accelerator, unwrapped(student), ema, pruner, units, args, global_step, repair)
        state["stage"] = "finetune"
        pruner.masks.detach()
        if distiller is None and accelerator.device.type != "cpu":
            teacher.to("cpu")  # needed again only for the final evaluation; its samples for the grids are taken
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return slim

    log = StepLog(accelerator.gather, accelerator.num_processes, args.logging_steps)
    memory = PeakMemory(accelerator.device)
    info = None
    loss_value = float("nan")
    pruning_seconds = 0.0
    if state["stage"] == "pruning" and config.process == "one-shot":
        # One shot: the dense teacher is scored once, the target is pruned at once and exported before any training.
        tick = time.time()
        with memory.phase("scoring"):
            pruner.step(0, scoring(0))
        # The one-shot damage: the DDPM loss of the first scoring mini-batch before and after the removal.
        state["removal"] = {"loss_dense": pruner.probe_loss(scoring(0), pruner.masks.all_kept),
                            "loss_removed": pruner.probe_loss(scoring(0))}
        repair = None
        if args.repair_at_removal == "on":
            repair = repair_removed_units(unwrapped(student), units, pruner.masks, pruner.final_masks(),
                                          inputs_from_losses(scoring(0)()))
            state["removal"].update(loss_repaired=pruner.probe_loss(scoring(0)), repair=repair.as_dict())
        pruning_seconds += time.time() - tick
        student, optimizer, lr_scheduler, ema = export_now(student, ema, repair)
        pruner = None
        state["seconds"]["pruning"] += time.time() - tick
        accelerator.print(f"Pruned in one shot and exported at step 0: {count_parameters(unwrapped(student)):,} parameters")
        feature_map = _feature_map(distiller, teacher, units, pruner, state)
    micro_step = 0
    fid_reference = None
    if args.validation_fid_images:
        fid_reference = evaluation.builtin_reference(args.dataset_name, "test", sample_size)
        fid_key = "fid_" + evaluation.FEATURE_EXTRACTORS[evaluation.BUILTIN_FEATURE_EXTRACTORS[args.dataset_name]].key
    tick_step = time.time()
    while global_step < args.max_train_steps:
        epoch, skip = divmod(global_step, steps_per_epoch)
        for batch in training.epoch_batches(dataloader, shuffle_generator, args.seed, epoch, skip * args.gradient_accumulation_steps, accelerator):
            with accelerator.accumulate(student):
                if micro_step % args.gradient_accumulation_steps == 0:
                    info = None
                micro_step += 1
                if state["stage"] == "pruning" and info is None:
                    tick = time.time()
                    with memory.phase("scoring"):
                        info = pruner.step(global_step, scoring(global_step))
                    pruning_seconds += time.time() - tick
                    if not pruner.learning_masks:
                        pruner.masks.values.requires_grad_(pruner.wants_mask_gradients)
                with memory.phase("pruning_stage" if state["stage"] == "pruning" else "finetune"):
                    # --process flow: this step's gates go into the masks before every forward pass
                    energy = pruner.mask_energy() if state["stage"] == "pruning" else None
                    ddpm = noise.loss(to_model_input(batch["images"]), noise_scheduler, args.prediction_type)
                    if distiller is None:
                        loss = objective = ddpm(student)
                        parts = {}
                    else:
                        objective, parts = distiller(ddpm, student, global_step, feature_map)
                        loss = parts["ddpm"]  # logged as "loss": the DDPM loss, comparable with runs without distillation
                    accelerator.backward(objective if energy is None else objective + energy)
                    if (state["stage"] == "pruning" and accelerator.sync_gradients
                            and (pruner.wants_mask_gradients or pruner.learning_masks)):
                        # fp16 gradients are scaled; reading the scale waits for the device, so only when needed
                        scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else None
                        if pruner.wants_mask_gradients:
                            pruner.observe_training_step(grad_scale=scale)  # mask_flow learns from the training steps
                        pruner.update_masks(grad_scale=scale)  # --process flow: the masks descend the same loss
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(student.parameters(), args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(student.parameters())
            global_step += 1
            now = time.time()
            state["seconds"][state["stage"]] += now - tick_step
            tick_step = now
            phase = info["phase"] if info else "finetune"
            sparsity = info["sparsity"] if info else args.target_sparsity
            progress.update(1)
            # The loss stays on the device until the log is read back (no wait for the GPU in the step).
            log.add({"step": global_step, "phase": phase, "sparsity": sparsity, "lr": lr_scheduler.get_last_lr()[0],
                     "mask_value": info["mask_value"] if info else None,
                     **{f"flow_{k}": v for k, v in ((info or {}).get("flow") or {}).items()},
                     **({"hardening": info["hardening"]} if info and "hardening" in info else {})},
                    {"loss": loss, **{f"distill_{k}": v for k, v in parts.items() if k != "ddpm"}})

            exporting = state["stage"] == "pruning" and global_step > config.pruning_steps
            checkpointing = global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps
            validating = global_step % args.validation_steps == 0 or global_step == args.max_train_steps
            if log.due(global_step) or exporting or checkpointing or validating:
                for row in log.flush():
                    loss_value = row["loss"]
                    accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=row["step"])
                    state["history"].append(row)
                progress.set_postfix(phase=phase, sparsity=f"{sparsity:.2f}", loss=f"{loss_value:.4f}")

            if exporting:
                # End of the pruning stage: physically remove the masked units.
                student, optimizer, lr_scheduler, ema = export_now(student, ema)
                pruner = None
                feature_map = _feature_map(distiller, teacher, units, pruner, state)
                accelerator.print(f"Exported at step {global_step}: {count_parameters(unwrapped(student)):,} parameters")
            if checkpointing:
                if accelerator.is_main_process:
                    training.make_room_for_checkpoint(args.output_dir, args.checkpoints_total_limit)
                accelerator.wait_for_everyone()
                accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{global_step}"))
            if accelerator.is_main_process and validating:
                unet = training.ema_model(unwrapped(student), ema)
                with pruner.evaluating() if pruner is not None else contextlib.nullcontext():
                    images = kind.sample(unet, ddim, fixed_noise, args.num_inference_steps)
                grid = comparison_grid([teacher_images, images], ["teacher", f"pruned ({phase})"], scale=4)
                os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
                grid.save(os.path.join(args.output_dir, "samples", f"step-{global_step:06d}.png"))
                training.log_images(accelerator, "teacher_vs_pruned", grid, global_step)
                if fid_reference is not None:
                    with pruner.evaluating() if pruner is not None else contextlib.nullcontext():
                        fid = evaluation.validation_fid(unet, ddim, args.validation_fid_images, args.num_inference_steps,
                                                        args.seed, fid_reference, dataset_name=args.dataset_name, kind=kind)
                    state["history"][-1][fid_key] = fid
                    accelerator.log({fid_key: fid}, step=global_step)
                tick_step = time.time()  # validation is not training time
            if global_step >= args.max_train_steps:
                break
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if state["stage"] != "finetune":
            raise RuntimeError("The run ended before the pruning stage did; nothing to export.")
        unet = training.ema_model(unwrapped(student), ema).eval()  # float32, as the teacher: no autocast wrapper
        teacher.to(accelerator.device)
        images = kind.sample(unet, ddim, fixed_noise, args.num_inference_steps)
        comparison_grid([teacher_images, images], ["teacher", "pruned"], scale=4).save(os.path.join(args.output_dir, "teacher_vs_pruned.png"))
        plot_pruning_run(state["history"], os.path.join(args.output_dir, "pruning_curves.png"), config.soft_steps, config.pruning_steps,
                         title=f"{args.criterion}, {args.layout} layout, unit sparsity {args.target_sparsity:.3g}")
        comparison = _evaluate(args, teacher, unet, kind, image_dataset, data_config)
        pruned_stats = model_counts(unet, sample_size)
        summary = {
            "teacher": public_name(source.path, not os.path.isdir(source.path)),
            "criterion": args.criterion,
            "criterion_config": config_dict(criterion),
            "layout": args.layout,
            "target_sparsity": args.target_sparsity,
            "target_macs": args.target_macs,
            "achieved_macs": pruned_stats["macs"] / dense_stats["macs"],
            "unit_sparsity": (None if state["masks"] is None else  # the units removed, whatever the target was
                              1 - sum(float(m.sum()) for m in state["masks"].values()) / sum(m.numel() for m in state["masks"].values())),
            "pruner": {k: getattr(config, k) for k in config.__dataclass_fields__},
            "learned_masks": _jsonable(flow_config(args)),
            "hardening": next((row["hardening"] for row in state["history"] if "hardening" in row), None),
            "removal": state["removal"],
            "time_reembedding_error": reembedding.embedding_relative_error if reembedding else None,
            "dense": dense_stats,
            "pruned": pruned_stats,
            "final_loss": loss_value,
            "max_train_steps": args.max_train_steps,
            "num_processes": accelerator.num_processes,
            "global_batch_size": args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
            "pruning_criterion_seconds": pruning_seconds,
            "mixed_precision": accelerator.mixed_precision,
            "scoring_precision": "float32" if criterion.needs_data else None,
            "peak_memory_bytes": memory.as_dict(("pruning_stage", "scoring", "finetune")),
            "pruning_stage_seconds": state["seconds"]["pruning"],
            "finetune_seconds": state["seconds"]["finetune"],
            "evaluation": scrub_local_paths(comparison.as_dict(), _local_paths(args, source)) if comparison else None,
            "distillation": {"output_weight": distill.output_weight, "feature_weight": distill.feature_weight,
                             "feature_layers": list(distiller.blocks if distiller else ()), "schedule": distill.schedule,
                             "description": distill.describe()},
        }
        pruning_info = None
        if args.layout == "per-layer":  # published as the pipeline variant, which records what was pruned
            pruning_info = {
                "base_model": source.path if not os.path.isdir(source.path) else os.path.basename(os.path.normpath(source.path)),
                "criterion": args.criterion, "layout": args.layout,
                "sparsity": float(summary["unit_sparsity"] if summary["unit_sparsity"] is not None else args.target_sparsity),
                "target_macs": args.target_macs, "achieved_macs": summary["achieved_macs"],
                "params": {"dense": summary["dense"]["params"], "pruned": pruned_stats["params"]},
                "macs": {"dense": summary["dense"]["macs"], "pruned": pruned_stats["macs"]},
                "metrics": {m.key: m.value for m in comparison.metrics} if comparison else {},
            }
        training.save_pipeline_into(kind.build_pipeline(unet, noise_scheduler, pruning_info), args.output_dir)
        _save_masks(state["masks"], units, args, os.path.join(args.output_dir, "pruning_masks.safetensors"))
        summary["wall_seconds"] = time.time() - started
        training.write_json(summary, os.path.join(args.output_dir, "pruning_summary.json"))
        training.write_json({"teacher": os.path.abspath(source.path) if os.path.isdir(source.path) else source.path},
                            os.path.join(args.output_dir, training.LOCAL_PATHS_FILE))  # for evaluate.py; never pushed
        training.write_json(state["history"], os.path.join(args.output_dir, "pruning_history.json"))
        shown = {k: summary[k] for k in ("dense", "pruned", "final_loss", "wall_seconds")}
        if comparison:
            shown["metrics"] = {m.key: round(m.value, 4) for m in comparison.metrics}
            shown["not_computed"] = [name for name, _ in comparison.not_computed]
        accelerator.print(json.dumps(shown, indent=2))
        write_model_card(args, source, data_config, config, summary, comparison, kind)
        if args.push_to_hub:
            from diffusers_gfprune.hub import push_folder

            push_folder(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo)
    accelerator.end_training()


def _evaluate(args, teacher, unet, kind, dataset, data_config):
    """SSIM to the teacher and FID/KID of both (see evaluation.evaluate_against_teacher); None if switched off."""
    if args.num_eval_images == 0:
        return None
    digits = data_config.dataset_name == "digits"
    reference = None
    if data_config.dataset_name not in evaluation.BUILTIN_FEATURE_EXTRACTORS and args.eval_fid != "none":
        reference = evaluation.real_images(dataset, args.num_eval_images, args.seed)
    logger.info("Evaluating %d image pairs (teacher, pruned) ...", args.num_eval_images)
    return evaluation.evaluate_against_teacher(
        teacher, unet, kind.scheduler, args.num_eval_images, num_inference_steps=args.num_inference_steps, seed=args.seed,
        fid=args.eval_fid, digits=digits, reference_images=reference,
        dataset_name=args.dataset_name or os.path.basename(os.path.normpath(args.train_data_dir or "images")),
        inception_weights=args.inception_weights, pipeline_kind=kind,
    )


def write_model_card(args, source, data_config, config, summary, comparison=None, kind=None):
    """README.md of the output folder, from model_card_template.md."""
    from diffusers_gfprune.hub import CardInfo, make_model_card

    on_hub = not os.path.isdir(source.path)
    dataset_on_hub = bool(args.dataset_name) and "/" in args.dataset_name and not os.path.exists(args.dataset_name)
    dataset = public_name(args.dataset_name or args.train_data_dir, dataset_on_hub)
    achieved = f"; reached {summary['achieved_macs']:.1%} of the dense MACs"
    target = (f"{args.target_macs:.0%} of the dense MACs{achieved}" if args.target_macs is not None
              else f"unit sparsity {args.target_sparsity:.4g}{achieved}")
    hyper = card_hyperparameters(args)
    hyper["distillation"] = distillation_config(args).describe()
    info = CardInfo(
        repo_name=os.path.basename(os.path.normpath(args.hub_model_id or args.output_dir)),
        repo_id=args.hub_model_id or public_name(args.output_dir, False),
        base_model=public_name(source.path, on_hub),
        base_model_on_hub=on_hub,
        dataset=dataset,
        dataset_on_hub=dataset_on_hub,
        criterion=args.criterion if args.criterion != "gradient_flow" else f"gradient_flow ({args.gradient_flow_form})",
        criterion_note=CRITERION_NOTES.get(args.gradient_flow_form if args.criterion == "gradient_flow" else args.criterion),
        process=args.process,
        layout=args.layout,
        target_description=target,
        sparsity=summary["unit_sparsity"] if summary.get("unit_sparsity") is not None else args.target_sparsity,
        params_dense=summary["dense"]["params"], params_pruned=summary["pruned"]["params"],
        macs_dense=summary["dense"]["macs"], macs_pruned=summary["pruned"]["macs"],
        macs_dense_noattn=summary["dense"]["macs_without_attention"], macs_pruned_noattn=summary["pruned"]["macs_without_attention"],
        resolution=kind.sample_shape(source.unet_config)[-1] if kind else data_config.resolution,
        pipeline_class=kind.pipeline_class if kind else "DDPMPipeline",
        soft_steps=config.soft_steps, pruning_steps=config.pruning_steps, rescore_every=config.rescore_every,
        sparsity_schedule=config.sparsity_schedule, mask_schedule=config.mask_schedule,
        max_train_steps=args.max_train_steps,
        hyperparameters=hyper,
        metrics=list(comparison.metrics) if comparison else [],
        not_computed=list(comparison.not_computed) if comparison else [("all quality metrics", "switched off (--num_eval_images 0)")],
        extra_images=[("pruning_curves.png", "Loss, sparsity s_t and mask value p_t per step; dotted: end of the soft phase, dashed: export")],
        time_reembedding_error=summary["time_reembedding_error"],
        grid_sampler=f"DDIM, {args.num_inference_steps} steps, eta 0",
        local_paths=_local_paths(args, source),
    )
    path = os.path.join(args.output_dir, "README.md")
    make_model_card(info).save(f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def _local_paths(args, source):
    """The run's machine-local folders, which published files name by base name only."""
    paths = [args.train_data_dir, args.output_dir, args.cache_dir, args.inception_weights]
    paths += [p for p in (source.path, args.dataset_name) if p and os.path.exists(p)]
    return [p for p in paths if p]


def _feature_map(distiller, teacher, units, pruner, state):
    """How the teacher's block outputs map onto the student's in the current stage (None without feature distillation)."""
    if distiller is None or not distiller.blocks:
        return None
    if state["stage"] == "pruning":
        return FeatureMap.for_masked(teacher, units, pruner.masks, distiller.blocks)
    if state["masks"] is None:
        raise ValueError("Feature distillation after the export needs the final masks, which this checkpoint does not hold "
                         "(written before they were kept); resume without --distill_features or from a newer checkpoint.")
    return FeatureMap.for_exported(teacher, units, state["masks"], distiller.blocks)


def _save_masks(masks, units, args, path):
    """The final binary unit masks of the dense teacher (1 = kept), one tensor per unit family."""
    from safetensors.torch import save_file

    if masks is None:  # resumed from a checkpoint written before the masks were kept in checkpoints
        logger.warning("The final masks are not known in this run; %s is not written.", path)
        return
    metadata = {"layout": args.layout, "target_sparsity": repr(args.target_sparsity), "criterion": args.criterion,
                "families": json.dumps([f.name for f in units]), "format": "1 = unit kept, 0 = unit pruned"}
    save_file({k: masks[k].float().contiguous() for k in masks}, path, metadata=metadata)


def _export_and_rebuild(accelerator, dense, ema, pruner, units, args, global_step, repair=None):
    """Export the masked dense student (``dense``: unwrapped) and its EMA, and continue with a fresh optimizer.
    ``repair``: the bias changes already made on ``dense`` (repair at removal), made on the EMA too."""
    masks = pruner.final_masks()
    slim = export.export_model(dense, units, masks, args.layout).train()
    new_ema = None
    if ema is not None:
        dense_ema = training.ema_model(dense, ema)
        if repair is not None:
            repair.apply_to(dense_ema)
        slim_ema = export.export_model(dense_ema, units, masks, args.layout)
        new_ema = training.create_ema(slim, args)
        new_ema.shadow_params = [p.detach().clone() for p in slim_ema.parameters()]
        new_ema.optimization_step = ema.optimization_step
        new_ema.to(accelerator.device)
        del dense_ema, slim_ema
    optimizer = training.create_optimizer(slim, args)
    lr_scheduler = training.create_lr_scheduler(optimizer, args, accelerator.num_processes, accelerator.split_batches)
    with warnings.catch_warnings():  # fast-forwarding a fresh schedule to the current step, before any optimizer step
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        for _ in range(global_step * training.scheduler_steps_per_update(accelerator.num_processes, accelerator.split_batches)):
            lr_scheduler.step()
    training.forget_prepared(accelerator)
    training.reset_compiler(accelerator)
    slim, optimizer, lr_scheduler = accelerator.prepare(slim, optimizer, lr_scheduler)
    return slim, optimizer, lr_scheduler, new_ema


if __name__ == "__main__":
    main()
