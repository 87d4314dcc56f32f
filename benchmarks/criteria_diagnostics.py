#!/usr/bin/env python
"""What each criterion sees on the dense teacher, before any training: score reliability and one-shot damage.

On the teacher prepared as prune.py prepares it (stock layout: the time sinusoid narrowed once), for every
criterion variant:

* reliability: the units are scored on two independent draws of ``n`` scoring samples (images, noise,
  stratified timesteps, in mini-batches of ``--batch_size``) and the split-half Spearman rank correlation of
  the unit scores is taken within each unit family, weighted by its units; for ``n`` in ``--sample_counts``.
  A criterion whose scores do not replicate between two draws ranks units by sampling noise.
* one-shot damage: the units selected from scores on ``--one_shot_samples`` samples are hard-masked at the
  target sparsity, and the DDPM loss and ``G = ||grad L||^2`` are measured on held-out images against the
  unmasked teacher (no training in between).

    python benchmarks/criteria_diagnostics.py --output docs/benchmarks_criteria_diagnostics.json \\
        --plot docs/images/benchmarks_reliability.png

Variants are ``criterion`` or ``criterion:form`` (gradient flow), with ``:same`` for g and H g from the same
images (the estimator before disjoint halves).
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VARIANTS = ["gradient_flow:increase", "gradient_flow:increase:same", "gradient_flow:preserve",
                    "gradient_flow:loss_change", "gradient_flow:mask_flow", "taylor", "diff_pruning", "magnitude", "random"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=str, default=os.path.relpath(os.path.join(REPO_ROOT, "teachers", "ddpm-digits")),
                        help="The dense teacher (a DDPMPipeline folder).")
    parser.add_argument("--dataset_name", type=str, default="digits", help="Its built-in data set (digits or photos).")
    parser.add_argument("--variants", type=str, nargs="+", default=DEFAULT_VARIANTS, help="Criterion variants to look at.")
    parser.add_argument("--target_macs", type=float, default=0.5, help="Fraction of the dense MACs (stock layout).")
    parser.add_argument("--sample_counts", type=int, nargs="+", default=[64, 256, 1024, 4096],
                        help="Scoring samples per half for the reliability curve.")
    parser.add_argument("--max_samples", type=str, nargs="*", default=["diff_pruning=256"],
                        help="Cap on the sample count of costly variants, as variant=N (diff_pruning scans ~50 timesteps per image).")
    parser.add_argument("--one_shot_samples", type=int, default=1024, help="Scoring samples for the one-shot selection.")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per scoring mini-batch.")
    parser.add_argument("--eval_samples", type=int, default=512, help="Held-out images for the loss and G.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the scoring and evaluation draws.")
    parser.add_argument("--output", type=str, default=None, help="Write the numbers as JSON here.")
    parser.add_argument("--plot", type=str, default=None, help="Write the reliability plot (PNG) here.")
    args = parser.parse_args(argv)
    for v in args.variants:
        parse_variant(v)
    if min(args.sample_counts) < args.batch_size or any(n % args.batch_size for n in args.sample_counts):
        raise ValueError(f"--sample_counts must be multiples of --batch_size {args.batch_size}, got {args.sample_counts}.")
    return args


def parse_variant(text: str):
    """``"gradient_flow:preserve:same"`` -> ("gradient_flow", {"form": "preserve", "disjoint": False})."""
    from diffusers_gfprune.criteria import CRITERIA, GRADIENT_FLOW_FORMS

    name, *rest = text.split(":")
    if name not in CRITERIA:
        raise ValueError(f"Unknown criterion {name!r} in variant {text!r}; choose from {sorted(CRITERIA)}.")
    options = {}
    for part in rest:
        if name == "gradient_flow" and part in GRADIENT_FLOW_FORMS:
            options["form"] = part
        elif name == "gradient_flow" and part == "same":
            options["disjoint"] = False
        else:
            raise ValueError(f"Cannot read {part!r} in variant {text!r} (gradient_flow takes a form and ':same').")
    return name, options


def weighted_spearman(s1: dict, s2: dict, weights: dict) -> float:
    from scipy.stats import spearmanr

    values = []
    for k in s1:
        if weights[k] > 2 and float(s1[k].std()) > 0 and float(s2[k].std()) > 0:
            values.append((spearmanr(s1[k].numpy(), s2[k].numpy()).statistic, weights[k]))
    return float(sum(v * w for v, w in values) / sum(w for _, w in values)) if values else float("nan")


def loss_and_gradient_norm(model, losses) -> tuple:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) for p in params]
    total = 0.0
    for loss_fn in losses:
        loss = loss_fn(model)
        total += float(loss.detach()) / len(losses)
        for acc, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                acc.add_(g, alpha=1.0 / len(losses))
    return total, float(sum((g.double() ** 2).sum() for g in grads))


def one_shot(model, masks, units, pruned: dict, eval_losses) -> tuple:
    """Loss and G with the ``pruned`` units hard-masked (the masks are restored to 1 afterwards)."""
    for family in units:
        values = torch.ones(family.num_units)
        values[pruned[family.name]] = 0.0
        masks.set_family(family.name, values)
    try:
        return loss_and_gradient_norm(model, eval_losses)
    finally:
        masks.fill_(1.0)


def main(argv=None):
    args = parse_args(argv)
    from diffusers_gfprune import data, export, training
    from diffusers_gfprune.criteria import get_criterion
    from diffusers_gfprune.masks import UnitMasks
    from diffusers_gfprune.selection import select
    from diffusers_gfprune.teacher import load_teacher, resolve_teacher
    from diffusers_gfprune.units import find_units

    started = time.time()
    teacher, scheduler = load_teacher(resolve_teacher(args.teacher))
    units = find_units(teacher)
    sparsity, _ = export.sparsity_for_macs(teacher, units, args.target_macs)
    student, units, _ = export.dense_student(teacher, units, "stock", sparsity, scheduler.config.num_train_timesteps)
    masks = UnitMasks(student, units).attach()
    config = data.DataConfig(dataset_name=args.dataset_name, resolution=teacher.config.sample_size)
    train = data.load_train_dataset(config, teacher.config.in_channels, "train")
    held_out = data.load_train_dataset(config, teacher.config.in_channels, "test")
    weights = {f.name: f.num_units for f in units}
    caps = {k: int(v) for k, v in (item.split("=") for item in args.max_samples)}

    def draw(samples: int, key: int):
        # Distinct keys give independent draws of images, noise and stratified timesteps.
        return training.scoring_losses(train, key, args.seed, args.batch_size, samples // args.batch_size, scheduler,
                                       resample=True)

    eval_losses = training.scoring_losses(held_out, -7, args.seed, args.batch_size, max(1, args.eval_samples // args.batch_size),
                                          scheduler, resample=True)
    dense_loss, dense_g = loss_and_gradient_norm(student, eval_losses)
    results = {"teacher": args.teacher, "dataset": args.dataset_name, "target_macs": args.target_macs,
               "unit_sparsity": sparsity, "num_units": units.num_units, "batch_size": args.batch_size,
               "dense": {"loss": dense_loss, "gradient_norm_sq": dense_g}, "variants": {}}
    for variant in tqdm(args.variants, desc="variants"):
        name, options = parse_variant(variant)
        if name == "random":
            options["seed"] = args.seed
        criterion = get_criterion(name, **options)
        cap = caps.get(variant, caps.get(name))
        record = {"reliability": {}, "seconds_per_64_samples": None}
        for i, n in enumerate(sorted(args.sample_counts)):
            if cap is not None and n > cap:
                continue
            tick = time.time()
            first = criterion.score(student, units, draw(n, 2 * i + 1), masks=masks)
            second = criterion.score(student, units, draw(n, 2 * i + 2), masks=masks)
            record["seconds_per_64_samples"] = (time.time() - tick) / (2 * n / 64)
            record["reliability"][n] = weighted_spearman(first, second, weights)
        n_shot = min(args.one_shot_samples, cap) if cap else args.one_shot_samples
        scores = criterion.score(student, units, draw(n_shot, 1000), masks=masks)
        loss, g = one_shot(student, masks, units, select(scores, units, sparsity, "local"), eval_losses)
        record.update({"one_shot_samples": n_shot, "one_shot_loss": loss, "one_shot_loss_ratio": loss / dense_loss,
                       "one_shot_gradient_norm_sq": g, "one_shot_gradient_norm_ratio": g / dense_g})
        results["variants"][variant] = record
        tqdm.write(f"{variant}: {record['reliability']} one-shot loss x{loss / dense_loss:.2f}")
    results["seconds"] = time.time() - started
    results["command"] = "python benchmarks/criteria_diagnostics.py" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    if args.output:
        training.write_json(results, args.output)
    if args.plot:
        plot(results, args.plot)
    print(markdown(results))
    return results


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusers_gfprune.plotting import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for variant, record in results["variants"].items():
        points = sorted((int(n), r) for n, r in record["reliability"].items())
        if points and not variant.startswith(("magnitude", "random")):
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=variant)
    ax.axhline(0.8, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("scoring samples per half (stratified timesteps)")
    ax.set_ylabel("split-half Spearman of unit scores")
    ax.set_title(f"Score reliability on the {results['dataset']} teacher")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def markdown(results: dict) -> str:
    counts = sorted({int(n) for r in results["variants"].values() for n in r["reliability"]})
    head = " | ".join(f"n = {n}" for n in counts)
    lines = [
        f"Dense teacher ({results['dataset']}, time sinusoid narrowed for the stock layout): held-out loss "
        f"{results['dense']['loss']:.4f}, G = ||grad L||^2 {results['dense']['gradient_norm_sq']:.3g}; "
        f"{results['num_units']} units, unit sparsity {results['unit_sparsity']:.4g}.",
        "",
        f"| variant | split-half Spearman: {head} | one-shot loss (x dense) | one-shot G (x dense) | s per 64 samples |",
        "|---|" + "---|" * (len(counts) + 3),
    ]
    for variant, r in results["variants"].items():
        cells = " | ".join(f"{r['reliability'][n]:.2f}" if n in r["reliability"] else
                           (f"{r['reliability'][str(n)]:.2f}" if str(n) in r["reliability"] else "") for n in counts)
        seconds = f"{r['seconds_per_64_samples']:.2f}" if r["seconds_per_64_samples"] is not None else ""
        lines.append(f"| {variant} | {cells} | {r['one_shot_loss']:.4f} ({r['one_shot_loss_ratio']:.1f}x) | "
                     f"{r['one_shot_gradient_norm_sq']:.3g} ({r['one_shot_gradient_norm_ratio']:.1f}x) | {seconds} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
