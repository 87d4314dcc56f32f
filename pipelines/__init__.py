"""The pipeline variant that per-layer pruned repos publish as code.

Importing it from here also imports ``PrunedUNet2DModel``, so that
``GFPruneDDPMPipeline.from_pretrained(folder)`` finds the unet class without remote code.
"""

from diffusers_gfprune.modeling_pruned_unet import PrunedUNet2DModel  # noqa: F401
from .pipeline_gfprune_ddpm import GFPruneDDPMPipeline  # noqa: F401
