"""diffusers-gfprune: structured gradient-flow pruning for diffusers ``UNet2DModel`` DDPMs.

Importing the package is cheap: the public names below load their modules (and torch, diffusers)
on first use.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "find_units": "units",
    "UnitSet": "units",
    "UnitFamily": "units",
    "UnitMasks": "masks",
    "select": "selection",
    "export_model": "export",
    "prepare_stock": "export",
    "reembed_time": "export",
    "stock_sparsities": "export",
    "PrunedUNet2DModel": "modeling_pruned_unet",
    "count_parameters": "counting",
    "count_macs": "counting",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
