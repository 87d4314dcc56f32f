"""Which units to prune, given one score per unit (higher = keep).

``local``: the same fraction of every family (what the stock layout needs).
``global``: one ranking across all families, with a floor so that no family is emptied (the
per-layer layout). Ties are broken by unit order, so selection is deterministic.
"""

from __future__ import annotations

import math
from typing import Dict

import torch

from .units import UnitSet

SELECTIONS = ("local", "global")


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    # Stable sort: equal scores are pruned in unit order, so results do not depend on the backend.
    order = torch.sort(scores.double().cpu(), stable=True).indices
    return order[:count]


def prune_counts_local(units: UnitSet, sparsity: float) -> Dict[str, int]:
    """Units to prune per family for local selection (rounded to the nearest unit)."""
    return {f.name: min(f.num_units - 1, int(math.floor(sparsity * f.num_units + 0.5))) for f in units}


def select_local(scores: Dict[str, torch.Tensor], units: UnitSet, sparsity: float) -> Dict[str, torch.Tensor]:
    """Boolean "pruned" flags: the lowest-scoring ``sparsity`` fraction of each family."""
    counts = prune_counts_local(units, sparsity)
    pruned = {}
    for family in units:
        flags = torch.zeros(family.num_units, dtype=torch.bool)
        flags[_lowest(scores[family.name], counts[family.name])] = True
        pruned[family.name] = flags
    return pruned


def select_global(
    scores: Dict[str, torch.Tensor], units: UnitSet, sparsity: float, min_keep_fraction: float = 0.1
) -> Dict[str, torch.Tensor]:
    """Boolean "pruned" flags: the lowest-scoring ``sparsity`` fraction of all units.

    Every family keeps at least ``max(1, ceil(min_keep_fraction * num_units))`` units. Scores of
    different families are compared as they are, so a criterion used globally should produce
    comparable numbers across layers (all criteria here are sums over the unit's parameters).
    """
    total = units.num_units
    target = int(math.floor(sparsity * total + 0.5))
    floors = {f.name: max(1, math.ceil(min_keep_fraction * f.num_units)) for f in units}
    capacity = sum(f.num_units - floors[f.name] for f in units)
    if target > capacity:
        raise ValueError(
            f"Cannot prune {target} of {total} units globally while keeping at least "
            f"{min_keep_fraction:.0%} of every family (at most {capacity} can go). Lower the sparsity "
            "or the floor (min_keep_fraction)."
        )
    names, values, positions = [], [], []
    for family in units:
        names.extend([family.name] * family.num_units)
        values.append(scores[family.name].double().cpu())
        positions.extend(range(family.num_units))
    order = torch.sort(torch.cat(values), stable=True).indices.tolist()
    pruned = {f.name: torch.zeros(f.num_units, dtype=torch.bool) for f in units}
    left = {f.name: f.num_units - floors[f.name] for f in units}
    count = 0
    for i in order:
        if count == target:
            break
        name = names[i]
        if left[name] > 0:
            pruned[name][positions[i]] = True
            left[name] -= 1
            count += 1
    return pruned


def select(scores, units: UnitSet, sparsity: float, selection: str = "local", min_keep_fraction: float = 0.1):
    if selection == "local":
        return select_local(scores, units, sparsity)
    if selection == "global":
        return select_global(scores, units, sparsity, min_keep_fraction)
    raise ValueError(f"Unknown selection {selection!r}; choose one of {SELECTIONS}.")


def masks_from_pruned(pruned: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Binary mask values (1 = keep) from pruned flags."""
    return {name: (~flags).float() for name, flags in pruned.items()}
