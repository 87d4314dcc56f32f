#!/usr/bin/env python
"""What each criterion sees on the dense teacher, before any training: score stability and one-shot damage.

A companion of ``benchmarks/criteria.py`` that explains its results. On the teacher prepared as prune.py
prepares it (stock layout: the time sinusoid narrowed once), for every criterion:

* stability: the criterion scores the units on several independent mini-batches (as one re-scoring does);
  the Spearman rank correlation of the unit scores between two mini-batches (mean over pairs, within each
  unit family, weighted by its units), the same between the means of two halves of the mini-batches (is
  there a signal that averaging recovers?), and the overlap of the units each mini-batch would prune;
* one-shot damage: the units selected from the scores averaged over the mini-batches are hard-masked at the
  target sparsity, and the DDPM loss and the squared gradient norm ``G = ||grad L||^2`` (the quantity the
  gradient-flow criterion protects) are measured on held-out test digits, against the unmasked teacher;
* for gradient flow, the same one-shot measurement with its scores used the other way round (prune the
  highest ``theta.Hg``) and by magnitude (prune the lowest ``|theta.Hg|``);
* agreement: the overlap of the pruned sets of every pair of criteria.

    python benchmarks/criteria_diagnostics.py --output docs/benchmarks_criteria_diagnostics.json
"""

import argparse
import itertools
import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusers_gfprune.criteria import CRITERIA

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_CRITERIA = tuple(CRITERIA)  # the registry's order: gradient_flow first, then the baselines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=str, default=os.path.relpath(os.path.join(REPO_ROOT, "teachers", "ddpm-digits")),
                        help="The dense digits teacher (a DDPMPipeline folder).")
    parser.add_argument("--criteria", type=str, nargs="+", default=list(ALL_CRITERIA), help="Criteria to look at.")
    parser.add_argument("--target_macs", type=float, default=0.5, help="Fraction of the dense MACs (stock layout).")
    parser.add_argument("--num_batches", type=int, default=4, help="Independent scoring mini-batches.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per scoring mini-batch.")
    parser.add_argument("--num_eval_batches", type=int, default=4, help="Held-out mini-batches (of 64) for the loss and G.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the scoring and evaluation draws.")
    parser.add_argument("--diff_pruning_timesteps", type=int, default=None,
                        help="Timesteps the diff_pruning criterion scans (default: its own, 100).")
    parser.add_argument("--output", type=str, default=None, help="Write the numbers as JSON here.")
    args = parser.parse_args(argv)
    unknown = [c for c in args.criteria if c not in ALL_CRITERIA]
    if unknown:
        raise ValueError(f"Unknown criteria {unknown}; choose from {list(ALL_CRITERIA)}.")
    if args.num_batches < 2 or args.batch_size < 1 or args.num_eval_batches < 1:
        raise ValueError("--num_batches must be >= 2 (stability compares pairs), --batch_size and --num_eval_batches >= 1.")
    return args


def prepared_student(teacher, scheduler, target_macs: float):
    """The dense model as prune.py starts pruning it (stock layout), its units and the unit sparsity."""
    from diffusers_gfprune import export
    from diffusers_gfprune.units import find_units

    units = find_units(teacher)
    sparsity, _ = export.sparsity_for_macs(teacher, units, target_macs)
    student, units, _ = export.dense_student(teacher, units, "stock", sparsity, scheduler.config.num_train_timesteps)
    return student, units, sparsity


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 2:
        return float("nan")
    ra = torch.argsort(torch.argsort(a.double())).double()
    rb = torch.argsort(torch.argsort(b.double())).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def overlap(a: dict, b: dict) -> float:
    """|A and B| / |A| for two selections of the same size (flags per family)."""
    both = sum(int((a[k] & b[k]).sum()) for k in a)
    size = sum(int(a[k].sum()) for k in a)
    return both / size if size else float("nan")


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


def loss_and_gradient_norm(model, eval_losses) -> tuple:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) for p in params]
    total = 0.0
    for loss_fn in eval_losses:
        loss = loss_fn(model)
        total += float(loss.detach()) / len(eval_losses)
        for acc, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                acc.add_(g, alpha=1.0 / len(eval_losses))
    return total, float(sum((g.double() ** 2).sum() for g in grads))


def main(argv=None):
    args = parse_args(argv)
    from diffusers_gfprune import training
    from diffusers_gfprune.criteria import get_criterion
    from diffusers_gfprune.data import DigitsDataset
    from diffusers_gfprune.masks import UnitMasks
    from diffusers_gfprune.objective import make_loss
    from diffusers_gfprune.selection import select
    from diffusers_gfprune.teacher import load_teacher, resolve_teacher

    started = time.time()
    teacher, scheduler = load_teacher(resolve_teacher(args.teacher))
    student, units, sparsity = prepared_student(teacher, scheduler, args.target_macs)
    masks = UnitMasks(student, units).attach()
    size = teacher.config.sample_size
    train = DigitsDataset("train", size)
    test = DigitsDataset("test", size)
    generator = torch.Generator().manual_seed(args.seed + 99)
    eval_losses = []
    for _ in range(args.num_eval_batches):
        index = torch.randint(len(test), (64,), generator=generator)
        eval_losses.append(make_loss(torch.stack([test[int(i)]["images"] for i in index]), scheduler, generator))

    dense_loss, dense_g = loss_and_gradient_norm(student, eval_losses)
    results = {"teacher": args.teacher, "target_macs": args.target_macs, "unit_sparsity": sparsity,
               "num_units": units.num_units, "dense": {"loss": dense_loss, "gradient_norm_sq": dense_g}, "criteria": {}}
    selections = {}
    for name in tqdm(args.criteria, desc="criteria"):
        options = {"random": {"seed": args.seed}}
        if args.diff_pruning_timesteps is not None:
            options["diff_pruning"] = {"num_timesteps": args.diff_pruning_timesteps}
        criterion = get_criterion(name, **options.get(name, {}))
        tick = time.time()
        per_batch = []
        for b in range(args.num_batches):
            # The same draws prune.py's re-scoring at "step" b would use, so the batches are independent.
            losses = training.scoring_losses(train, b, args.seed, args.batch_size, 1, scheduler)
            per_batch.append(criterion.score(student, units, losses))
        seconds = (time.time() - tick) / args.num_batches
        weights = {f.name: f.num_units for f in units}
        rho = []
        for s1, s2 in itertools.combinations(per_batch, 2):
            values = [(spearman(s1[k], s2[k]), weights[k]) for k in s1 if weights[k] > 1]
            rho.append(sum(v * w for v, w in values) / sum(w for _, w in values))
        picks = [select(s, units, sparsity, "local") for s in per_batch]
        agree = [overlap(a, b) for a, b in itertools.combinations(picks, 2)]
        half = len(per_batch) // 2
        halves = [{k: torch.stack([s[k] for s in part]).mean(0) for k in per_batch[0]}
                  for part in (per_batch[:half], per_batch[half:2 * half])]
        split_half = [(spearman(halves[0][k], halves[1][k]), weights[k]) for k in halves[0] if weights[k] > 1]
        mean_scores = {k: torch.stack([s[k] for s in per_batch]).mean(0) for k in per_batch[0]}
        pruned = select(mean_scores, units, sparsity, "local")
        selections[name] = pruned
        loss, g = one_shot(student, masks, units, pruned, eval_losses)
        if name == "gradient_flow":
            # The same scores used the other way round: does the sign convention (prune the lowest theta.Hg,
            # i.e. the units whose removal raises ||g||^2 most) or the magnitude carry the damage?
            variants = {}
            for label, scores in (("prune highest theta.Hg (reversed)", {k: -v for k, v in mean_scores.items()}),
                                  ("prune lowest |theta.Hg|", {k: v.abs() for k, v in mean_scores.items()})):
                v_loss, v_g = one_shot(student, masks, units, select(scores, units, sparsity, "local"), eval_losses)
                variants[label] = {"one_shot_loss": v_loss, "one_shot_loss_ratio": v_loss / dense_loss,
                                   "one_shot_gradient_norm_sq": v_g, "one_shot_gradient_norm_ratio": v_g / dense_g}
            results["gradient_flow_variants"] = variants
        results["criteria"][name] = {
            "score_rank_correlation_between_batches": float(np.mean(rho)),
            "score_rank_correlation_split_half_means": sum(v * w for v, w in split_half) / sum(w for _, w in split_half),
            "pruned_set_overlap_between_batches": float(np.mean(agree)),
            "one_shot_loss": loss, "one_shot_loss_ratio": loss / dense_loss,
            "one_shot_gradient_norm_sq": g, "one_shot_gradient_norm_ratio": g / dense_g,
            "seconds_per_scoring": seconds,
        }
    results["pruned_set_overlap_between_criteria"] = {
        f"{a}/{b}": overlap(selections[a], selections[b]) for a, b in itertools.combinations(args.criteria, 2)}
    results["seconds"] = time.time() - started
    results["command"] = "python benchmarks/criteria_diagnostics.py" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    text = markdown(results)
    if args.output:
        training.write_json(results, args.output)
    print(text)
    return results


def markdown(results: dict) -> str:
    lines = [
        f"Dense teacher (time sinusoid narrowed for the stock layout): loss {results['dense']['loss']:.4f}, "
        f"G = ||grad L||^2 {results['dense']['gradient_norm_sq']:.3g}; {results['num_units']} units, "
        f"unit sparsity {results['unit_sparsity']:.4g}.",
        "",
        "| criterion | rank correlation of scores between mini-batches | same, between means of two halves of the "
        "mini-batches | pruned-set overlap between mini-batches | one-shot loss (x dense) | one-shot G (x dense) | "
        "seconds per scoring |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["criteria"].items():
        lines.append(
            f"| {name} | {r['score_rank_correlation_between_batches']:.3f} | "
            f"{r['score_rank_correlation_split_half_means']:.3f} | {r['pruned_set_overlap_between_batches']:.3f} | "
            f"{r['one_shot_loss']:.4f} ({r['one_shot_loss_ratio']:.1f}x) | {r['one_shot_gradient_norm_sq']:.3g} "
            f"({r['one_shot_gradient_norm_ratio']:.1f}x) | {r['seconds_per_scoring']:.1f} |"
        )
    for label, r in results.get("gradient_flow_variants", {}).items():
        lines.append(f"| gradient_flow scores, {label} | | | | {r['one_shot_loss']:.4f} ({r['one_shot_loss_ratio']:.1f}x) | "
                     f"{r['one_shot_gradient_norm_sq']:.3g} ({r['one_shot_gradient_norm_ratio']:.1f}x) | |")
    lines += ["", "Overlap of the pruned sets: " + ", ".join(
        f"{k} {v:.2f}" for k, v in results["pruned_set_overlap_between_criteria"].items()) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
