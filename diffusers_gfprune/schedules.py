"""Schedules of the progressive soft phase, as pure functions of progress ``x`` in [0, 1].

``sparsity(x)`` rises from 0 to the target, ``mask_value(x)`` falls from 1 to 0. Both hit their
endpoints exactly. ``exponential`` front-loads the change; ``sharpness`` sets how much.
"""

from __future__ import annotations

import math

SCHEDULES = ("linear", "cosine", "exponential")


def _check(kind: str, x: float) -> float:
    if kind not in SCHEDULES:
        raise ValueError(f"Unknown schedule {kind!r}; choose one of {SCHEDULES}.")
    return min(1.0, max(0.0, float(x)))


def ramp(x: float, kind: str = "linear", sharpness: float = 5.0) -> float:
    """A monotone map of [0, 1] onto [0, 1] with ramp(0) = 0 and ramp(1) = 1 exactly."""
    x = _check(kind, x)
    if x in (0.0, 1.0):
        return x
    if kind == "linear":
        return x
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * x))
    if sharpness <= 0:
        raise ValueError("The exponential schedule needs sharpness > 0.")
    return (1.0 - math.exp(-sharpness * x)) / (1.0 - math.exp(-sharpness))


def sparsity(x: float, target: float, kind: str = "linear", sharpness: float = 5.0) -> float:
    """Sparsity ``s_t`` at progress ``x``: 0 at x = 0, ``target`` at x = 1."""
    return target * ramp(x, kind, sharpness)


def mask_value(x: float, kind: str = "linear", sharpness: float = 5.0) -> float:
    """Soft mask value ``p_t`` of the selected units at progress ``x``: 1 at x = 0, 0 at x = 1."""
    return 1.0 - ramp(x, kind, sharpness)
