"""Plots of a pruning run, saved as PNG next to the model and embedded in its card."""

from __future__ import annotations

import os
from typing import Optional, Sequence


def plot_pruning_run(
    history: Sequence[dict],
    path: str,
    soft_steps: int,
    pruning_steps: int,
    title: Optional[str] = None,
) -> str:
    """Training loss, sparsity and mask value per step, with the phase boundaries marked.

    Parameters
    ----------
    history : sequence of dict
        One entry per optimizer step with ``step``, ``loss``, ``sparsity`` and optionally ``mask_value``
        (the value the soft phase multiplies pruned units by; absent after the export).
    path : str
        Where to write the PNG (written to a temporary name, then renamed).
    soft_steps, pruning_steps : int
        N (end of the soft phase) and M (export) of the schedule.
    title : str, optional
        Figure title.

    Returns
    -------
    str
        ``path``.
    """
    if not history:
        raise ValueError("The run has no recorded steps to plot.")
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax_loss, ax_sched) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    ax_loss.plot(steps, [h["loss"] for h in history], lw=0.6, color="tab:gray", alpha=0.5, label="loss per step")
    window = max(1, len(history) // 50)
    if window > 1:
        import numpy as np

        losses = np.asarray([h["loss"] for h in history], dtype=float)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax_loss.plot(steps[window - 1:], smooth, color="tab:blue", label=f"mean of {window} steps")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("DDPM loss")
    ax_loss.legend(loc="upper right", fontsize=8)

    ax_sched.plot(steps, [h["sparsity"] for h in history], color="tab:red", label="sparsity $s_t$ (units pruned)")
    masked = [(h["step"], h["mask_value"]) for h in history if h.get("mask_value") is not None]
    if masked:
        ax_sched.plot(*zip(*masked), color="tab:green", label="mask value $p_t$ of pruned units")
    ax_sched.set_ylim(-0.02, 1.02)
    ax_sched.set_xlabel("optimizer step")
    ax_sched.set_ylabel("fraction")
    ax_sched.legend(loc="center right", fontsize=8)
    for ax in (ax_loss, ax_sched):
        ax.axvline(soft_steps, color="k", ls=":", lw=0.8)
        ax.axvline(pruning_steps, color="k", ls="--", lw=0.8)
    ax_sched.annotate("soft | hard", (soft_steps, 1.0), ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax_sched.annotate("export", (pruning_steps, 1.0), ha="left", va="bottom", fontsize=7, xytext=(2, 2), textcoords="offset points")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str, dpi: int = 110) -> str:
    """Write a matplotlib figure as PNG atomically (temporary name, then rename) and close it.

    A reader of ``path`` (a card being rendered, an interrupted run) never sees a half-written file.
    """
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.png"
    try:
        fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    os.replace(tmp, path)
    return path
