"""The pipeline variants that per-layer pruned repos publish as code: one per pipeline kind.

Importing them from here also imports ``PrunedUNet2DModel``, so that ``GFPruneDDPMPipeline.from_pretrained(folder)``
and ``GFPruneLDMPipeline.from_pretrained(folder)`` find the unet class without remote code.
"""

from diffusers_gfprune.modeling_pruned_unet import PrunedUNet2DModel  # noqa: F401
from .pipeline_gfprune_ddpm import GFPruneDDPMPipeline  # noqa: F401
from .pipeline_gfprune_ldm import GFPruneLDMPipeline  # noqa: F401
