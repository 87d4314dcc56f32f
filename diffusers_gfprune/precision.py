"""Numerical precision around mixed-precision training.

``accelerate`` trains in fp16/bf16 by wrapping the prepared model's ``forward`` in autocast (the weights stay
float32). Two things must not run that way:

* the pruning criteria: their gradients, Hessian-vector products and finite differences of gradients are
  small differences of large numbers; in fp16 without loss scaling the gradients underflow, and a finite
  difference at a 1e-3 relative step is rounding noise in either half format. :func:`full_precision` runs the
  model in float32 inside its context, whatever autocast state or wrapper is around it;
* the final comparison with the teacher, which the teacher takes in float32: :func:`plain_copy` gives a copy of a
  prepared model without accelerate's autocast wrapper, so pruned and dense are sampled alike.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from typing import Optional

import torch
from torch import nn

AUTOCAST_DEVICE_TYPES = ("cuda", "cpu", "xpu", "mps")


def _strip_autocast_wrapper(model: nn.Module) -> Optional[object]:
    """Remove accelerate's autocast ``forward`` from ``model``'s instance dict; return what was removed."""
    original = model.__dict__.get("_original_forward")
    if original is None or "forward" not in model.__dict__:
        return None
    return model.__dict__.pop("forward")


@contextmanager
def full_precision(model: nn.Module):
    """Run ``model`` in float32 inside the context: autocast off, accelerate's autocast wrapper bypassed.

    Gradients then have the float32 range of the weights themselves, so no loss scaling is needed.
    """
    removed = _strip_autocast_wrapper(model)
    try:
        with ExitStack() as stack:
            for device_type in AUTOCAST_DEVICE_TYPES:
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            yield model
    finally:
        if removed is not None:
            model.__dict__["forward"] = removed


def plain_copy(model: nn.Module, ema=None) -> nn.Module:
    """A copy of ``model`` (with the EMA weights when ``ema`` is given) that runs in the weights' own precision.

    The copy keeps the model's forward hooks (the live unit masks during the pruning stage) but not accelerate's
    autocast wrapper, so sampling it is comparable with sampling the float32 teacher.
    """
    copied = copy.deepcopy(model)
    _strip_autocast_wrapper(copied)
    copied.__dict__.pop("_original_forward", None)
    if ema is not None:
        ema.copy_to(copied.parameters())
    return copied


def unscaled(grad: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    """A gradient taken of a loss multiplied by ``scale`` (fp16 loss scaling), divided back; ``None`` = no scaling."""
    return grad if scale is None or scale == 1.0 else grad / scale
