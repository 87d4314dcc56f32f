"""Small and real UNet2DModel architectures the tests run over (random weights, built locally)."""

import torch
from diffusers import UNet2DModel

CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, freq_shift=1, flip_sin_to_cos=False, norm_eps=1e-6, downsample_padding=0,
    norm_num_groups=32, act_fn="silu", center_input_sample=False, time_embedding_type="positional",
    resnet_time_scale_shift="default", add_attention=True,
)

# google/ddpm-celebahq-256's layout (6 levels, attention at level 4) at a small sample size.
CELEBAHQ_LIKE = dict(
    CIFAR10, sample_size=32, block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
)

TINY = dict(
    sample_size=16, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_num_groups=8,
)

ARCHITECTURES = {
    "cifar10": CIFAR10,
    "celebahq_like": CELEBAHQ_LIKE,
    "multi_head": dict(TINY, in_channels=3, out_channels=3, block_out_channels=(32, 64), attention_head_dim=8),
    "no_attention": dict(TINY, add_attention=False, down_block_types=("DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D")),
    "scale_shift": dict(TINY, resnet_time_scale_shift="scale_shift", flip_sin_to_cos=True, freq_shift=0),
    "norm_groups_8": dict(TINY, block_out_channels=(32, 64, 64), norm_num_groups=8,
                          down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "tiny_1ch_16px": TINY,
    "layers_per_block_1": dict(TINY, layers_per_block=1, block_out_channels=(16, 32, 32), norm_num_groups=4,
                               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}


def build(name: str, seed: int = 0) -> UNet2DModel:
    """The architecture with random weights, GroupNorm affines randomized so that they matter."""
    torch.manual_seed(seed)
    model = UNet2DModel(**ARCHITECTURES[name]).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    return model


def random_inputs(model: UNet2DModel, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = model.config.sample_size
    sample = torch.randn(batch, model.config.in_channels, size, size, generator=g)
    timestep = torch.randint(0, 1000, (batch,), generator=g)
    return sample, timestep
