"""Parameter and MAC counting for diffusers ``UNet2DModel`` DDPMs.

MACs (multiply-accumulates) are measured with :class:`torch.utils.flop_counter.FlopCounterMode`
over one forward pass and reported per image, with the attention matrix products
(``Q @ K^T`` and ``softmax(.) @ V``) kept as a separate figure: published DDPM figures (e.g.
6.1G MACs for google/ddpm-cifar10-32) come from hook-based counters that only see ``nn.Conv2d``
and ``nn.Linear`` and so leave those products out.

Only dense products are counted (convolutions, linear layers, matrix products); bias adds,
normalisation, activations and softmax are not, as is usual for MAC figures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["MacCount", "count_parameters", "count_macs", "count_mac_breakdown", "model_counts", "format_count"]


@dataclass(frozen=True)
class MacCount:
    """MACs of one forward pass for a single image.

    Attributes
    ----------
    total : int
        All counted MACs, attention matrix products included.
    attention_matmuls : int
        MACs of the attention matrix products ``Q @ K^T`` and ``attn @ V`` only (not the
        q/k/v/out projections, which are ordinary linear layers and stay in
        :attr:`without_attention`).
    """

    total: int
    attention_matmuls: int

    @property
    def without_attention(self) -> int:
        """MACs without the attention matrix products (convolutions and linear layers only)."""
        return self.total - self.attention_matmuls


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Count the parameters of a model.

    Parameters
    ----------
    model : torch.nn.Module
        Model to count.
    trainable_only : bool, default False
        Count only parameters with ``requires_grad=True``.

    Returns
    -------
    int
        Number of scalar parameters. Parameters shared between modules are counted once
        (``Module.parameters`` deduplicates them).
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(
    model: nn.Module,
    sample_size: int | tuple[int, int] | None = None,
    batch_size: int = 1,
    include_attention: bool = True,
) -> int:
    """Count the MACs of one forward pass of a ``UNet2DModel``, per image.

    Parameters
    ----------
    model : torch.nn.Module
        A diffusers ``UNet2DModel``, or any module called as ``model(sample, timestep)`` with a
        ``config`` holding ``in_channels`` (and ``sample_size`` unless given here).
    sample_size : int or tuple of int, optional
        Input resolution, ``H`` (square) or ``(H, W)``. Defaults to ``model.config.sample_size``.
    batch_size : int, default 1
        Batch size of the measured forward pass; the result is divided by it.
    include_attention : bool, default True
        Include the attention matrix products ``Q @ K^T`` and ``attn @ V``. Set to False to
        compare with figures from hook-based counters (torch-pruning, thop), which omit them.

    Returns
    -------
    int
        MACs per image.

    See Also
    --------
    count_mac_breakdown : both figures from a single forward pass.
    """
    macs = count_mac_breakdown(model, sample_size=sample_size, batch_size=batch_size)
    return macs.total if include_attention else macs.without_attention


def count_mac_breakdown(
    model: nn.Module,
    sample_size: int | tuple[int, int] | None = None,
    batch_size: int = 1,
) -> MacCount:
    """Count the MACs of one forward pass per image, with and without attention products.

    The forward pass runs under ``torch.no_grad`` with the model in eval mode, on the model's
    device and dtype; the train/eval flag of every submodule is restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        A diffusers ``UNet2DModel``, or any module called as ``model(sample, timestep)`` with a
        ``config`` holding ``in_channels`` (and ``sample_size`` unless given here).
    sample_size : int or tuple of int, optional
        Input resolution, ``H`` (square) or ``(H, W)``. Defaults to ``model.config.sample_size``.
    batch_size : int, default 1
        Batch size of the measured forward pass; the counts are divided by it.

    Returns
    -------
    MacCount
        ``total``, ``attention_matmuls`` and ``without_attention`` MACs per image.

    Raises
    ------
    RuntimeError
        If an attention module ran but none of its matrix products were counted, e.g. because
        it dispatched to a fused attention kernel that has no FLOP formula, or if the model's
        attention modules cannot be found in the counter's per-module counts.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config = model.config
    height, width = _resolution(config.sample_size if sample_size is None else sample_size)
    device, dtype = _device_and_dtype(model)

    sample = torch.zeros(batch_size, config.in_channels, height, width, device=device, dtype=dtype)
    # Zeros, not randn: FLOPs depend on shapes only and this leaves the global RNG untouched.
    timestep = torch.zeros(batch_size, dtype=torch.long, device=device)
    kwargs: dict[str, Any] = {}
    if getattr(config, "num_class_embeds", None) is not None:
        # Class-conditional UNets refuse to run without labels; their value does not matter.
        kwargs["class_labels"] = torch.zeros(batch_size, dtype=torch.long, device=device)

    counter = FlopCounterMode(display=False, custom_mapping=_missing_sdpa_formulas())
    training_flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(sample, timestep, **kwargs)
    finally:
        # Restore per submodule, not model.train(flag): a submodule may have been frozen in eval.
        for module, flag in training_flags.items():
            module.training = flag

    flop_counts = counter.get_flop_counts()
    total_flops = counter.get_total_flops()
    attention_flops = _attention_matmul_flops(model, flop_counts)
    # FLOPs -> MACs (every counted op is 2 FLOPs per MAC) and per image; all counted ops scale
    # linearly with the batch, so the divisions are exact.
    return MacCount(
        total=total_flops // (2 * batch_size),
        attention_matmuls=attention_flops // (2 * batch_size),
    )



def model_counts(model: nn.Module, sample_size: int | tuple[int, int] | None = None) -> dict[str, int]:
    """Parameters and MACs per image of one forward pass (one sampling step), as reports list them.

    Parameters
    ----------
    model : torch.nn.Module
        As for :func:`count_mac_breakdown`.
    sample_size : int or tuple of int, optional
        Default: ``model.config.sample_size``.

    Returns
    -------
    dict
        ``params``, ``macs`` (attention matrix products included) and ``macs_without_attention``
        (what hook-based counters report).
    """
    macs = count_mac_breakdown(model, sample_size)
    return {"params": count_parameters(model), "macs": macs.total, "macs_without_attention": macs.without_attention}


def format_count(value: float, precision: int = 1) -> str:
    """Format a count with a metric suffix for humans.

    Parameters
    ----------
    value : float
        The number to format, e.g. a parameter or MAC count.
    precision : int, default 1
        Digits after the decimal point when a suffix is used.

    Returns
    -------
    str
        E.g. ``format_count(35_746_307) == "35.7M"``, ``format_count(6.1e9) == "6.1G"``,
        ``format_count(512) == "512"``.
    """
    sign = "-" if value < 0 else ""
    magnitude = abs(value)
    if round(magnitude, precision) < 1000:
        if float(magnitude).is_integer():
            return f"{sign}{int(magnitude)}"
        return f"{sign}{magnitude:.{precision}f}"
    for suffix in ("K", "M", "G", "T", "P"):
        magnitude /= 1000
        # Check after rounding so that 999_960 becomes "1.0M", not "1000.0K".
        if round(magnitude, precision) < 1000 or suffix == "P":
            return f"{sign}{magnitude:.{precision}f}{suffix}"
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# Internals


def _resolution(sample_size: int | Iterable[int]) -> tuple[int, int]:
    if isinstance(sample_size, int):
        return sample_size, sample_size
    height, width = sample_size
    return int(height), int(width)


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    # The first *floating* parameter: the input must match the weights, not e.g. an int buffer.
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.get_default_dtype())
    return device, dtype


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``softmax(Q K^T) V``, as torch's own formula for the CUDA SDPA kernels."""
    batch_heads = math.prod(query_shape[:-2])
    q_len, qk_dim = query_shape[-2:]
    kv_len, v_dim = key_shape[-2], value_shape[-1]
    return 2 * batch_heads * q_len * kv_len * (qk_dim + v_dim)


def _missing_sdpa_formulas() -> dict[Any, Any]:
    """FLOP formulas for fused SDPA kernels that torch's counter does not know.

    On the CPU, ``F.scaled_dot_product_attention`` dispatches to
    ``aten._scaled_dot_product_flash_attention_for_cpu``, which has no formula in torch 2.14,
    so the attention products would silently count as zero. Supplying one through
    ``custom_mapping`` (local to the counter, unlike ``register_flop_formula``) keeps the
    model's real kernel instead of forcing the math backend. Torch's own formula wins once
    it has one.
    """
    from torch.utils.flop_counter import flop_registry

    formulas = {}
    names = (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    for name in names:
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_registry:
            formulas[op] = _sdpa_flops
    return formulas


def _attention_op_packets() -> set[Any]:
    """Ops that implement the attention products inside an attention module.

    Fused SDPA kernels (any backend), ``bmm`` (SDPA math backend, ``AttnProcessor2_0`` on
    fallbacks) and ``baddbmm`` (diffusers' classic ``AttnProcessor``). The q/k/v/out
    projections are ``nn.Linear`` on 2-D weights, so they run as ``mm``/``addmm`` and are
    never confused with these.
    """
    names = (
        "bmm",
        "baddbmm",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    return {op for op in (getattr(torch.ops.aten, name, None) for name in names) if op is not None}


def _attention_module_types() -> tuple[type, ...]:
    from diffusers.models.attention_processor import Attention

    types: tuple[type, ...] = (Attention,)
    try:  # newer diffusers attention classes share this mixin instead of subclassing Attention
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:
        return types
    return types + (AttentionModuleMixin,)


def _attention_matmul_flops(model: nn.Module, flop_counts: dict[str, dict[Any, int]]) -> int:
    """Sum the attention-product FLOPs recorded inside the model's attention modules."""
    attention_types = _attention_module_types()
    attention_ops = _attention_op_packets()
    # FlopCounterMode's ModuleTracker names modules "<root class name>.<qualified name>".
    root = type(model).__name__
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, attention_types):
            continue
        per_op = flop_counts.get(f"{root}.{name}" if name else root)
        if per_op is None:  # never ran (or the tracker's naming changed: caught below)
            continue
        flops = sum(count for op, count in per_op.items() if op in attention_ops)
        if flops == 0:
            raise RuntimeError(
                f"Attention module {name!r} ran but no attention matmul FLOPs were counted; its "
                f"kernel has no FLOP formula (ops seen: {sorted(map(str, per_op))}). Count under "
                "torch.nn.attention.sdpa_kernel(SDPBackend.MATH) or add a formula."
            )
        total += flops
    if total == 0 and any(isinstance(m, attention_types) for m in model.modules()):
        raise RuntimeError(
            "The model has attention modules but none were found in the FLOP counter's per-module "
            "counts; torch's module naming may have changed."
        )
    return total
