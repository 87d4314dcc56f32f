#!/usr/bin/env python
"""The decision rule of docs/benchmarks.md, applied to finished criteria benchmarks (one per teacher).

For each benchmark (``docs/benchmarks_<name>.json``, written by ``benchmarks/criteria.py --name <name>``), the
variants measured in every benchmark are ranked by mean final FID (lower is better) and by mean SSIM to the
teacher (higher is better); a variant's score is the mean of its two ranks, averaged over the benchmarks. The
lowest score wins; ties go to the cheaper variant (less time spent by the criterion and the pruning stage). The
candidate (each benchmark's first variant) is then listed against every other common variant with its paired
95% intervals per benchmark, as won / lost / not separated.

    python benchmarks/criteria_rule.py --benchmarks criteria criteria-photos

writes the table between the ``criteria-rule`` markers of docs/benchmarks.md and prints the winner.
"""

import argparse
import importlib.util
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _criteria_script():
    """benchmarks/criteria.py (its report helpers: the markers and the merge into benchmarks.md)."""
    name = "_gfprune_benchmarks_criteria"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "benchmarks", "criteria.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _rank(values: dict, higher_is_better: bool) -> dict:
    """Competition ranks (1 = best; equal values share the better rank)."""
    ordered = sorted(values.values(), reverse=higher_is_better)
    return {k: 1 + ordered.index(v) for k, v in values.items()}


def _truth(value) -> bool:
    # Older JSON files stored numpy booleans as the strings "True" / "False".
    return value is True or value == "True"


def apply_rule(benchmarks: dict) -> dict:
    """``benchmarks``: name -> the JSON of one criteria benchmark. Returns ranks, scores, the winner, comparisons."""
    if len(benchmarks) < 1:
        raise ValueError("Give at least one benchmark.")
    names = list(benchmarks)
    common = [v for v in benchmarks[names[0]]["criteria"] if all(v in b["summary"] for b in benchmarks.values())]
    if len(common) < 2:
        raise ValueError(f"The benchmarks {names} share fewer than two variants ({common}); the rule compares shared ones.")
    ranks, cost = {}, {v: 0.0 for v in common}
    for name, b in benchmarks.items():
        s = b["summary"]
        ranks[name] = {
            "fid": _rank({v: s[v]["fid_mean"] for v in common}, higher_is_better=False),
            "ssim": _rank({v: s[v]["ssim_vs_teacher_mean"] for v in common}, higher_is_better=True),
        }
        for v in common:
            cost[v] += s[v].get("pruning_stage_seconds_mean") or 0.0
    score = {v: sum((ranks[n]["fid"][v] + ranks[n]["ssim"][v]) / 2 for n in names) / len(names) for v in common}
    order = sorted(common, key=lambda v: (score[v], cost[v]))
    comparisons = {}
    for name, b in benchmarks.items():
        for c in b["comparisons"]:
            if c["other"] in common and c["candidate"] in common:
                comparisons.setdefault(c["other"], {})[name] = c
    return {"benchmarks": names, "variants": common, "ranks": ranks, "score": score, "order": order, "winner": order[0],
            "candidate": benchmarks[names[0]]["criteria"][0], "comparisons": comparisons}


def _verdict(d: dict, lower_is_better: bool) -> str:
    if not _truth(d["excludes_zero"]):
        return "not separated"
    better = d["mean"] < 0 if lower_is_better else d["mean"] > 0
    return "won" if better else "lost"


def report(result: dict, benchmarks: dict, command: str) -> str:
    names = result["benchmarks"]
    head = "| variant | " + " | ".join(f"{n}: FID rank | {n}: SSIM rank" for n in names) + " | score |"
    lines = [
        f"Command: `{command}`",
        "",
        "The rule over the variants measured on every teacher (" + ", ".join(f"`{n}`" for n in names) + "): ranks "
        "among these variants by mean final FID and by mean SSIM to the teacher, the score is the mean of the two "
        "ranks averaged over the teachers; lowest score first (ties: the cheaper variant).",
        "",
        head,
        "|" + "---|" * (2 + 2 * len(names)),
    ]
    for v in result["order"]:
        cells = " | ".join(f"{result['ranks'][n]['fid'][v]} | {result['ranks'][n]['ssim'][v]}" for n in names)
        lines.append(f"| {v} | {cells} | {result['score'][v]:.2f} |")
    lines += ["", f"**Winner by the rule: `{result['winner']}`.**", ""]
    candidate = result["candidate"]
    lines += [f"The candidate `{candidate}` against every other shared variant (paired 95% intervals; won / lost / "
              "not separated):", "",
              "| other variant | " + " | ".join(f"{n}: Δ FID | {n}: Δ SSIM" for n in names) + " |",
              "|" + "---|" * (1 + 2 * len(names))]
    for v in result["variants"]:
        if v == candidate or v not in result["comparisons"]:
            continue
        cells = []
        for n in names:
            c = result["comparisons"][v].get(n)
            if c is None:
                cells += ["n/a", "n/a"]
                continue
            f, q = c["fid"], c["ssim_vs_teacher"]
            cells += [f"{f['mean']:+.2f} [{f['low']:+.2f}, {f['high']:+.2f}] {_verdict(f, True)}",
                      f"{q['mean']:+.3f} [{q['low']:+.3f}, {q['high']:+.3f}] {_verdict(q, False)}"]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_benchmarks(names, docs_dir: str) -> dict:
    """name -> the JSON of a finished benchmark (``docs/benchmarks_<name>.json``)."""
    benchmarks = {}
    for name in names:
        path = os.path.join(docs_dir, f"benchmarks_{name}.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: run `python benchmarks/criteria.py --name {name} ...` first.")
        with open(path, encoding="utf-8") as f:
            benchmarks[name] = json.load(f)
    return benchmarks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmarks", nargs="+", required=True,
                        help="Names of finished criteria benchmarks (docs/benchmarks_<name>.json), one per teacher.")
    parser.add_argument("--docs_dir", type=str, default=os.path.relpath(os.path.join(REPO_ROOT, "docs")),
                        help="Where the JSON files and benchmarks.md are.")
    args = parser.parse_args(argv)
    benchmarks = load_benchmarks(args.benchmarks, args.docs_dir)
    result = apply_rule(benchmarks)
    command = "python benchmarks/criteria_rule.py " + " ".join(sys.argv[1:] if argv is None else argv)
    criteria = _criteria_script()
    script = "benchmarks/criteria_rule.py"
    text = "\n".join([criteria.begin_mark("criteria-rule", script), "", report(result, benchmarks, command), "",
                      criteria.end_mark("criteria-rule")])
    criteria.merge_into(os.path.join(args.docs_dir, "benchmarks.md"), text, "criteria-rule", script)
    print(f"winner by the rule: {result['winner']}")
    return result


if __name__ == "__main__":
    main()
