#!/usr/bin/env python
"""The learned-mask decision rule of docs/benchmarks.md, applied to finished benchmarks of ``benchmarks/criteria.py``.

Two steps, each a subcommand:

``equal-time``: the equal-wall-time arms of one setting, from its finished runs. For each flow arm, Δ = ceil(mean over
seeds of (the flow run's training seconds - the default run's) / the default run's seconds per fine-tuning step),
training seconds being ``pruning_stage_seconds + finetune_seconds`` (validation and evaluation excluded). Prints the
variants to add to the benchmark (the default with ``T + Δ`` steps, N and M fixed), or says that a flow arm costs less
than 1% more and needs none.

    python benchmarks/flow_rule.py equal-time --output_dir outputs/flow-photos50

``rule``: each flow arm against the default at equal steps and at equal wall time, paired by seed, per setting (one
finished benchmark per setting, ``docs/benchmarks_<name>.json``): *beats* = better on FID or SSIM to the teacher with
a 95% interval excluding zero and not worse (an interval excluding zero) on the other, in both comparisons; *not
worse* = no comparison worse on either metric. Flow becomes the default if an arm beats the default in a deciding
setting (``--deciding``) and is not worse in any setting. Also listed: the loss jump at the hardening and the
undecided fraction of every flow run. Writes the table between the ``flow-rule`` markers of docs/benchmarks.md.

    python benchmarks/flow_rule.py rule --benchmarks flow-photos50 flow-digits30 --deciding flow-photos50
"""

import argparse
import glob
import json
import math
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from diffusers_gfprune.statistics import paired_difference  # noqa: E402

DEFAULT = "magnitude"
EQUAL_TIME_SHARE = 0.01  # below this share of T, a flow arm counts as costing the default's time


def _criteria_script():
    from benchmarks.criteria_rule import _criteria_script as load  # the markers and the merge into benchmarks.md

    return load()


def finished_runs(output_dir: str) -> list:
    """The ``benchmark_run.json`` records of every finished run of a benchmark folder."""
    records = []
    for path in sorted(glob.glob(os.path.join(output_dir, "runs", "*", "benchmark_run.json"))):
        with open(path, encoding="utf-8") as f:
            records.append(json.load(f))
    return records


def training_seconds(summary: dict) -> float:
    return summary["pruning_stage_seconds"] + summary["finetune_seconds"]


def is_flow(variant: str) -> bool:
    return "@flow" in variant


def equal_time_arms(records: list, default: str = DEFAULT) -> list:
    """For every flow arm with finished seeds paired with the default: Δ and the equal-time variant (or None)."""
    by = {}
    for r in records:
        by.setdefault(r["criterion"], {})[r["seed"]] = r["summary"]
    if default not in by:
        raise ValueError(f"No finished runs of the default {default!r}; run it first.")
    out = []
    for arm in sorted(v for v in by if is_flow(v) and "+" not in v):
        seeds = sorted(set(by[arm]) & set(by[default]))
        if not seeds:
            continue
        base = by[default][seeds[0]]
        steps, pruner = base["max_train_steps"], base["pruner"]
        finetune_steps = steps - pruner["pruning_steps"] - 1  # export after step M
        extra = [training_seconds(by[arm][s]) - training_seconds(by[default][s]) for s in seeds]
        step_seconds = sum(by[default][s]["finetune_seconds"] / finetune_steps for s in seeds) / len(seeds)
        delta = math.ceil(sum(extra) / len(extra) / step_seconds)
        variant = None
        if delta >= EQUAL_TIME_SHARE * steps:
            variant = f"{default}+max_train_steps={steps + delta}+soft_steps={pruner['soft_steps']}+pruning_steps={pruner['pruning_steps']}"
        out.append({"arm": arm, "seeds": seeds, "extra_seconds": extra, "finetune_step_seconds": step_seconds,
                    "delta_steps": delta, "max_train_steps": steps, "variant": variant})
    return out


def _pick(runs: list, variant: str, key: str) -> dict:
    return {r["seed"]: r[key] for r in runs if r["criterion"] == variant}


def compare(runs: list, a: str, b: str) -> dict:
    """``a`` minus ``b``, paired by seed, on the final FID and the SSIM to the teacher."""
    out = {}
    for key in ("fid", "ssim_vs_teacher"):
        x, y = _pick(runs, a, key), _pick(runs, b, key)
        seeds = sorted(set(x) & set(y))
        out[key] = paired_difference([x[s] for s in seeds], [y[s] for s in seeds]).as_dict() if seeds else None
    return out


def outcome(c: dict) -> str:
    """'better', 'worse' or 'not separated' per metric, and the comparison's verdict: beats / not worse / worse."""
    marks = []
    for key, lower in (("fid", True), ("ssim_vs_teacher", False)):
        d = c[key]
        if d is None or d["n"] < 2 or not d["excludes_zero"]:
            marks.append("not separated")
        else:
            marks.append("better" if (d["mean"] < 0) == lower else "worse")
    if "worse" in marks:
        return "worse"
    return "beats" if "better" in marks else "not worse"


def hardening_of(run_dir: str):
    path = os.path.join(run_dir, "pruning_summary.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("hardening")


def apply_rule(benchmarks: dict, deciding: list, default: str = DEFAULT) -> dict:
    """``benchmarks``: setting name -> the JSON of one benchmark. Returns the per-setting verdicts and the decision."""
    settings = {}
    arms = sorted({v for b in benchmarks.values() for v in b["criteria"] if is_flow(v) and "+" not in v})
    for name, b in benchmarks.items():
        runs = b["runs"]
        records = []
        for r in runs:
            with open(os.path.join(r["run_dir"], "benchmark_run.json"), encoding="utf-8") as f:
                records.append(json.load(f))
        timed_variants = {a["arm"]: a["variant"] for a in equal_time_arms(records, default)}
        rows = {}
        for arm in arms:
            if arm not in b["criteria"]:
                continue
            equal_time = timed_variants.get(arm)
            steps = compare(runs, arm, default)
            if equal_time is not None and equal_time not in b["criteria"] and outcome(steps) == "worse":
                equal_time = None  # worse at equal steps already: more steps for the default cannot change the verdict
            if equal_time is not None and equal_time not in b["criteria"]:
                raise ValueError(f"{name}: {arm} costs {equal_time.split('+')[1]} at equal wall time, but that arm was not "
                                 f"run; add {equal_time} to the benchmark (python benchmarks/flow_rule.py equal-time).")
            timed = compare(runs, arm, equal_time) if equal_time else None
            verdicts = [outcome(steps)] + ([outcome(timed)] if timed else [])
            verdict = "worse" if "worse" in verdicts else ("beats" if all(v == "beats" for v in verdicts) else "not worse")
            jumps = [hardening_of(r["run_dir"]) for r in runs if r["criterion"] == arm]
            rows[arm] = {"equal_steps": steps, "equal_time": timed, "equal_time_variant": equal_time, "verdict": verdict,
                         "hardening": [j for j in jumps if j is not None]}
        settings[name] = rows
    decision = {}
    for arm in arms:
        measured = [n for n in settings if arm in settings[n]]
        beats = [n for n in deciding if settings.get(n, {}).get(arm, {}).get("verdict") == "beats"]
        worse = [n for n in measured if settings[n][arm]["verdict"] == "worse"]
        decision[arm] = {"beats_in": beats, "worse_in": worse, "qualifies": bool(beats) and not worse}
    winners = [a for a in arms if decision[a]["qualifies"]]
    return {"settings": settings, "decision": decision, "winners": winners, "deciding": deciding}


def _interval(d, digits):
    if d is None:
        return "n/a"
    if d["n"] < 2:
        return f"{d['mean']:+.{digits}f} (one seed)"
    mark = " *" if d["excludes_zero"] else ""
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]{mark}"


def report(result: dict, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "Each flow arm minus the default (`magnitude`, progressive), paired by seed; 95% intervals, * = excludes "
             "zero (FID: lower is better; SSIM to the teacher: higher is better). Equal time: the default trained for "
             "the flow arm's extra wall time in more fine-tuning steps.", "",
             "| setting | flow arm | Δ FID, equal steps | Δ SSIM, equal steps | equal-time arm | Δ FID, equal time | "
             "Δ SSIM, equal time | verdict | loss jump at hardening (mean) | undecided at N (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in result["settings"].items():
        for arm, r in rows.items():
            t = r["equal_time"]
            jumps = [h["loss_jump"] for h in r["hardening"] if h.get("loss_jump") is not None]
            undecided = [h["undecided"] for h in r["hardening"]]
            timed = (r["equal_time_variant"].split("+", 1)[1].replace("+", ", ") if r["equal_time_variant"] else
                     "not run (worse at equal steps)" if r["verdict"] == "worse" else "none (under 1% of T)")
            cells = [name, arm, _interval(r["equal_steps"]["fid"], 2), _interval(r["equal_steps"]["ssim_vs_teacher"], 3), timed,
                     _interval(t["fid"], 2) if t else "n/a", _interval(t["ssim_vs_teacher"], 3) if t else "n/a", r["verdict"],
                     f"{sum(jumps) / len(jumps):+.4f}" if jumps else "n/a",
                     f"{sum(undecided) / len(undecided):.3f}" if undecided else "n/a"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [""]
    for arm, d in result["decision"].items():
        lines.append(f"- `{arm}`: beats the default in {', '.join(d['beats_in']) or 'no deciding setting'}; worse in "
                     f"{', '.join(d['worse_in']) or 'no setting'}.")
    verdict = (f"**Flow qualifies to become the default: {', '.join(result['winners'])}.**" if result["winners"]
               else "**No flow arm qualifies: the default stays `magnitude`, progressive.**")
    lines += ["", verdict]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("equal-time", help="The equal-wall-time arms of a setting's finished runs.")
    e.add_argument("--output_dir", required=True, help="The benchmark's --output_dir.")
    e.add_argument("--default", default=DEFAULT, help="The default's variant name.")
    r = sub.add_parser("rule", help="Apply the decision rule and write it into docs/benchmarks.md.")
    r.add_argument("--benchmarks", nargs="+", required=True, help="Finished benchmarks (docs/benchmarks_<name>.json), one per setting.")
    r.add_argument("--deciding", nargs="+", required=True, help="The settings in which a flow arm must beat the default.")
    r.add_argument("--docs_dir", default=os.path.relpath(os.path.join(REPO_ROOT, "docs")), help="Where the JSON files and benchmarks.md are.")
    args = parser.parse_args(argv)
    if args.command == "equal-time":
        arms = equal_time_arms(finished_runs(args.output_dir), args.default)
        for a in arms:
            print(json.dumps(a))
        print(" ".join(a["variant"] for a in arms if a["variant"]))
        return arms
    unknown = [n for n in args.deciding if n not in args.benchmarks]
    if unknown:
        raise ValueError(f"--deciding {unknown} are not among --benchmarks {args.benchmarks}.")
    from benchmarks.criteria_rule import load_benchmarks

    result = apply_rule(load_benchmarks(args.benchmarks, args.docs_dir), args.deciding)
    command = "python benchmarks/flow_rule.py " + " ".join(sys.argv[1:] if argv is None else argv)
    criteria = _criteria_script()
    script = "benchmarks/flow_rule.py"
    text = "\n".join([criteria.begin_mark("flow-rule", script), "", report(result, command), "", criteria.end_mark("flow-rule")])
    criteria.merge_into(os.path.join(args.docs_dir, "benchmarks.md"), text, "flow-rule", script)
    print(result["winners"] or "no flow arm qualifies")
    return result


if __name__ == "__main__":
    main()
