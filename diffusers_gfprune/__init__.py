"""diffusers-gfprune: structured gradient-flow pruning for diffusers ``UNet2DModel`` DDPMs."""

__version__ = "0.1.0"
