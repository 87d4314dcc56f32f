"""A state as two files: its tensors as safetensors and the rest as JSON (never a pickle), for checkpoints."""

from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import torch


def save_state(directory: str, name: str, tensors: Dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``<name>.safetensors`` and ``<name>.json`` into ``directory`` (created if needed)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, os.path.join(directory, f"{name}.safetensors"))
    with open(os.path.join(directory, f"{name}.json"), "w") as f:
        json.dump(meta, f, indent=2)


def load_state(directory: str, name: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` written by :func:`save_state`."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(directory, f"{name}.safetensors"))
    with open(os.path.join(directory, f"{name}.json")) as f:
        return tensors, json.load(f)
