"""Which units to prune, given one score per unit (higher = keep).

``local``: the same fraction of every family (what the stock layout needs).
``global``: one ranking across all families, with a floor so that no family is emptied (the
per-layer layout). Ties are broken by unit order, so selection is deterministic.

Width rounding (``round_to``): vector units and oneDNN/cuDNN kernels run fastest on channel counts
that are multiples of 8, 16 or 32, so a selection can round the kept width of every family to a
multiple of ``round_to`` channels (:func:`round_widths`). Rounding is in channels, at the
granularity of the family's units (GroupNorm groups, heads): the kept width becomes a multiple of
``lcm(round_to, unit_size)``, at least one such multiple, and never more than the dense width.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

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


def keep_floors(units: UnitSet, min_keep_fraction: float = 0.1) -> Dict[str, int]:
    """Units every family keeps under global selection: ``max(1, ceil(min_keep_fraction * num_units))``."""
    return {f.name: max(1, math.ceil(min_keep_fraction * f.num_units)) for f in units}


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
    floors = keep_floors(units, min_keep_fraction)
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


def _global_order(scores, units: UnitSet, min_keep_fraction: float):
    """Units in the order global selection prunes them (lowest score first), floors respected: (family, position)."""
    floors = keep_floors(units, min_keep_fraction)
    names, values, positions = [], [], []
    for family in units:
        names.extend([family.name] * family.num_units)
        values.append(scores[family.name].double().cpu())
        positions.extend(range(family.num_units))
    left = {f.name: f.num_units - floors[f.name] for f in units}
    order = []
    for i in torch.sort(torch.cat(values), stable=True).indices.tolist():
        if left[names[i]] > 0:
            order.append((names[i], positions[i]))
            left[names[i]] -= 1
    return order


def min_macs_fraction(unit_macs, units: UnitSet, min_keep_fraction: float = 0.1) -> float:
    """The smallest fraction of the dense MACs global selection can reach: every family at its floor."""
    scores = {f.name: torch.zeros(f.num_units) for f in units}
    pruned = {f.name: torch.zeros(f.num_units, dtype=torch.bool) for f in units}
    for name, position in _global_order(scores, units, min_keep_fraction):
        pruned[name][position] = True
    return unit_macs.fraction(pruned)


def select_global_macs(
    scores: Dict[str, torch.Tensor], units: UnitSet, macs_fraction: float, unit_macs, min_keep_fraction: float = 0.1
) -> Dict[str, torch.Tensor]:
    """Boolean "pruned" flags: the lowest-scoring units of all families, as few as bring the MACs to ``macs_fraction``.

    The ranking and the floors are those of :func:`select_global`; instead of a unit count, units are pruned
    in that order until the model's MACs (``unit_macs``, a :class:`~diffusers_gfprune.unit_macs.UnitMacs`)
    are at most ``macs_fraction`` of the dense MACs. The MACs fall with every pruned unit, so the shortest
    such prefix of the ranking is found by bisection.
    """
    if not 0 < macs_fraction <= 1:
        raise ValueError(f"A MACs target is a fraction of the dense MACs in (0, 1], got {macs_fraction!r}.")
    order = _global_order(scores, units, min_keep_fraction)
    index = [unit_macs.offsets[name] + position for name, position in order]

    def macs_after(k: int) -> float:
        flat = torch.zeros(unit_macs.num_units, dtype=torch.float64)
        flat[index[:k]] = 1.0
        return unit_macs.macs_of_flat(flat)

    budget = macs_fraction * unit_macs.dense
    if macs_after(len(order)) > budget * (1 + 1e-12):
        reachable = macs_after(len(order)) / unit_macs.dense
        raise ValueError(
            f"Cannot reach {macs_fraction:.4g} of the dense MACs with global selection while every family keeps "
            f"{min_keep_fraction:.0%} of its units: the floors alone leave {reachable:.4g}. Raise the MACs target "
            "or lower min_keep_fraction."
        )
    lo, hi = 0, len(order)  # macs_after(hi) <= budget
    while lo < hi:
        mid = (lo + hi) // 2
        if macs_after(mid) <= budget * (1 + 1e-12):
            hi = mid
        else:
            lo = mid + 1
    pruned = {f.name: torch.zeros(f.num_units, dtype=torch.bool) for f in units}
    for name, position in order[:lo]:
        pruned[name][position] = True
    return pruned


def check_macs_target(units: UnitSet, target_macs: float, min_keep_fraction: float = 0.1) -> float:
    """Refuse, before any work, a MACs target that global selection cannot reach; return the floor's fraction."""
    floor = min_macs_fraction(units.unit_macs(), units, min_keep_fraction)
    if target_macs < floor:
        raise ValueError(
            f"--target_macs {target_macs:.4g} cannot be reached in the per-layer layout: with every family keeping "
            f"{min_keep_fraction:.0%} of its units (--min_keep_fraction), the smallest model has {floor:.4g} of the "
            "dense MACs. Give a target of at least that, or lower --min_keep_fraction."
        )
    return floor


def macs_budget(target_macs: float, sparsity: float, final_sparsity: float) -> float:
    """The MACs fraction a selection at ``sparsity`` aims for when the run ends at ``target_macs``.

    The pruner's sparsity schedule runs from 0 to ``final_sparsity``; the MACs budget follows it
    linearly from 1 (nothing pruned) to ``target_macs``.
    """
    if final_sparsity <= 0:
        return 1.0
    return 1.0 - (1.0 - target_macs) * min(1.0, sparsity / final_sparsity)


def check_round_to(round_to: int) -> None:
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be an integer >= 1 (a channel multiple, e.g. 8 or 32), got {round_to!r}.")


def rounded_width(num_channels: int, unit_size: int, kept_channels: int, round_to: int) -> int:
    """The kept width of one family after rounding to a multiple of ``round_to`` channels.

    Parameters
    ----------
    num_channels : int
        Dense width of the family.
    unit_size : int
        Channels per unit (a GroupNorm group, a head, or 1).
    kept_channels : int
        Width kept by the selection, a multiple of ``unit_size``.
    round_to : int
        Channel multiple.

    Returns
    -------
    int
        The allowed width nearest to ``kept_channels`` (ties: the wider one). Allowed widths are
        the multiples of ``lcm(round_to, unit_size)`` from one multiple up to ``num_channels``,
        and ``num_channels`` itself; a family narrower than one multiple keeps its dense width.
    """
    check_round_to(round_to)
    step = math.lcm(round_to, unit_size)
    allowed = list(range(step, num_channels + 1, step))
    if num_channels not in allowed:
        allowed.append(num_channels)
    return min(allowed, key=lambda w: (abs(w - kept_channels), -w))


def round_widths(
    pruned: Dict[str, torch.Tensor], units: UnitSet, round_to: int, scores: Optional[Dict[str, torch.Tensor]] = None
) -> Dict[str, torch.Tensor]:
    """Adjust "pruned" flags so that every family keeps a multiple of ``round_to`` channels.

    A family that must grow gets back its highest-scoring pruned units; one that must shrink loses
    its lowest-scoring kept units (without scores: unit order). See :func:`rounded_width` for the
    allowed widths. ``round_to=1`` returns the flags unchanged.

    Parameters
    ----------
    pruned : dict of str to torch.Tensor
        Boolean flags per family (True = pruned), as returned by :func:`select`.
    units : UnitSet
    round_to : int
        Channel multiple (e.g. 8, 16 or 32).
    scores : dict of str to torch.Tensor, optional
        Unit scores (higher = keep) that decide which units move.

    Returns
    -------
    dict of str to torch.Tensor
        New flags; the input is not modified.
    """
    check_round_to(round_to)
    out = {}
    for family in units:
        flags = pruned[family.name].clone()
        if round_to > 1:
            kept = family.num_units - int(flags.sum())
            width = rounded_width(family.num_channels, family.unit_size, kept * family.unit_size, round_to)
            target = width // family.unit_size
            score = scores[family.name].double().cpu() if scores is not None else torch.zeros(family.num_units, dtype=torch.float64)
            if target > kept:
                candidates = flags.nonzero().squeeze(1)
                # Highest scores come back first; ties in unit order.
                back = candidates[_lowest(-score[candidates], target - kept)]
                flags[back] = False
            elif target < kept:
                candidates = (~flags).nonzero().squeeze(1)
                flags[candidates[_lowest(score[candidates], kept - target)]] = True
        out[family.name] = flags
    return out


def select(
    scores, units: UnitSet, sparsity: float, selection: str = "local", min_keep_fraction: float = 0.1, round_to: int = 1,
    target_macs: Optional[float] = None, final_sparsity: Optional[float] = None,
):
    """Boolean "pruned" flags per family: :func:`select_local` or :func:`select_global`, then
    :func:`round_widths` when ``round_to > 1``.

    With ``target_macs`` (global selection only), the selection meets a MACs budget instead of a unit count:
    :func:`select_global_macs` at :func:`macs_budget` ``(target_macs, sparsity, final_sparsity)``, so that the
    selection at ``sparsity == final_sparsity`` keeps ``target_macs`` of the dense MACs. The MACs come from
    ``units.unit_macs`` (set by :func:`diffusers_gfprune.units.find_units`).

    With ``selection="local"`` and the stock layout, rounding family by family would break the
    common keep ratio; pick a stock sparsity whose widths are already multiples instead
    (:func:`diffusers_gfprune.export.stock_sparsities` with ``round_to``), for which rounding is a
    no-op.
    """
    check_round_to(round_to)
    if target_macs is not None and selection != "global":
        raise ValueError("A MACs target in the selection needs selection='global'; local selection keeps one ratio.")
    if selection == "local":
        pruned = select_local(scores, units, sparsity)
    elif selection == "global" and target_macs is not None:
        budget = macs_budget(target_macs, sparsity, final_sparsity if final_sparsity is not None else sparsity)
        pruned = select_global_macs(scores, units, budget, units.unit_macs(), min_keep_fraction)
    elif selection == "global":
        pruned = select_global(scores, units, sparsity, min_keep_fraction)
    else:
        raise ValueError(f"Unknown selection {selection!r}; choose one of {SELECTIONS}.")
    return round_widths(pruned, units, round_to, scores) if round_to > 1 else pruned


def masks_from_pruned(pruned: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Binary mask values (1 = keep) from pruned flags."""
    return {name: (~flags).float() for name, flags in pruned.items()}
