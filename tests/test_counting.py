"""Tests for diffusers_gfprune.counting (CPU, a few seconds).

Expected MACs are derived independently: by hand from layer shapes / model configs, or with
forward hooks on ``nn.Conv2d`` / ``nn.Linear``, never from the counter under test.
"""

from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusers_gfprune import counting
from diffusers_gfprune.counting import (
    MacCount,
    count_mac_breakdown,
    count_macs,
    count_parameters,
    format_count,
)

# google/ddpm-cifar10-32, as in its config.json (built locally with random weights).
CIFAR10_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    freq_shift=1,
    flip_sin_to_cos=False,
    norm_eps=1e-6,
    downsample_padding=0,
    norm_num_groups=32,
    act_fn="silu",
    center_input_sample=False,
    time_embedding_type="positional",
    resnet_time_scale_shift="default",
    add_attention=True,
)


def tiny_unet(attention_head_dim=8, sample_size=16) -> UNet2DModel:
    """A two-level UNet whose only attention layer is the mid block's."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        attention_head_dim=attention_head_dim,
        norm_num_groups=8,
        add_attention=True,
    )


class SingleConv(nn.Module):
    """One Conv2d behind the ``model(sample, timestep)`` / ``model.config`` interface of a UNet."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, sample_size):
        super().__init__()
        self.config = SimpleNamespace(in_channels=in_channels, sample_size=sample_size)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)

    def forward(self, sample, timestep):
        return self.conv(sample)


def unet_attention_matmul_macs(config) -> int:
    """Per-image MACs of Q@K^T and attn@V for a UNet2DModel, from its config alone.

    Each self-attention layer over N = H*W tokens with inner dim C costs N*N*C for Q@K^T and
    N*N*C for attn@V, whatever the number of heads.
    """
    size, channels, n_levels = config.sample_size, config.block_out_channels, len(config.block_out_channels)

    def layer_macs(resolution, inner_dim):
        tokens = resolution * resolution
        return 2 * tokens * tokens * inner_dim

    macs = 0
    for level, block in enumerate(config.down_block_types):  # level i runs at size / 2**i
        if block.startswith("Attn"):
            macs += config.layers_per_block * layer_macs(size // 2**level, channels[level])
    for level, block in enumerate(config.up_block_types):  # reversed: level 0 is the bottom
        if block.startswith("Attn"):
            resolution = size // 2 ** (n_levels - 1 - level)
            macs += (config.layers_per_block + 1) * layer_macs(resolution, channels[::-1][level])
    if config.add_attention:  # the mid block attends once at the bottom resolution
        macs += layer_macs(size // 2 ** (n_levels - 1), channels[-1])
    return macs


def conv_linear_macs_via_hooks(model: nn.Module, sample_size: int, **forward_kwargs) -> int:
    """Per-image MACs of every Conv2d and Linear (bias adds excluded), measured with forward
    hooks, independently of FlopCounterMode."""
    macs = 0

    def hook(module, inputs, output):
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            macs += output.numel() * (module.in_channels // module.groups) * kernel
        else:
            macs += output.numel() * module.in_features

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with torch.no_grad():
            sample = torch.zeros(1, model.config.in_channels, sample_size, sample_size)
            model(sample, torch.zeros(1, dtype=torch.long), **forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return macs


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # These forwards are tiny: on a small shared CPU, intra-op threads only add contention
    # (measured 10x slower with 2 threads while another process was busy). Counts don't depend
    # on it.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def cifar10_unet():
    torch.manual_seed(0)
    return UNet2DModel(**CIFAR10_CONFIG)


@pytest.fixture(scope="module")
def cifar10_macs(cifar10_unet):
    return count_mac_breakdown(cifar10_unet)


# ---------------------------------------------------------------- google/ddpm-cifar10-32 ---


def test_cifar10_parameter_count(cifar10_unet):
    # Published figure: 35.7M parameters (exactly 35,746,307).
    assert count_parameters(cifar10_unet) == 35_746_307
    assert format_count(count_parameters(cifar10_unet)) == "35.7M"


def test_cifar10_macs_match_published_figure(cifar10_macs):
    # The published 6.1G comes from a hook-based counter, i.e. without the attention matmuls.
    assert format_count(cifar10_macs.without_attention) == "6.1G"
    assert format_count(cifar10_macs.total) == "6.2G"


def test_cifar10_conv_and_linear_macs_match_hook_count(cifar10_unet, cifar10_macs):
    assert cifar10_macs.without_attention == conv_linear_macs_via_hooks(cifar10_unet, 32)


def test_cifar10_attention_macs_match_hand_arithmetic(cifar10_unet, cifar10_macs):
    # 5 layers at 16x16 and 1 at 4x4, all with 256 channels.
    assert cifar10_macs.attention_matmuls == unet_attention_matmul_macs(cifar10_unet.config)


# ------------------------------------------------------------------------ hand arithmetic ---


@pytest.mark.parametrize(
    "in_channels, out_channels, kernel_size, stride, padding, sample_size",
    [
        (3, 16, 3, 1, 1, 32),
        (8, 5, 3, 2, 0, 17),
        (4, 6, 1, 1, 0, (12, 20)),
    ],
)
def test_single_conv_macs(in_channels, out_channels, kernel_size, stride, padding, sample_size):
    model = SingleConv(in_channels, out_channels, kernel_size, stride, padding, sample_size)
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    out_h = (height + 2 * padding - kernel_size) // stride + 1
    out_w = (width + 2 * padding - kernel_size) // stride + 1
    expected = out_channels * in_channels * kernel_size * kernel_size * out_h * out_w

    macs = count_mac_breakdown(model)

    assert macs == MacCount(total=expected, attention_matmuls=0)
    assert count_macs(model) == count_macs(model, include_attention=False) == expected


def test_sample_size_argument_overrides_config():
    model = SingleConv(3, 8, 3, 1, 1, sample_size=8)
    assert count_macs(model, sample_size=16) == 8 * 3 * 3 * 3 * 16 * 16
    assert count_macs(model, sample_size=(4, 6)) == 8 * 3 * 3 * 3 * 4 * 6


@pytest.mark.parametrize("attention_head_dim", [None, 8], ids=["1-head", "8-heads"])
def test_attention_matmul_macs_match_hand_arithmetic(attention_head_dim):
    model = tiny_unet(attention_head_dim=attention_head_dim)
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attentions) == 1  # fixture sanity: only the mid-block attention
    tokens = (model.config.sample_size // 2) ** 2  # mid block runs after one downsample
    inner_dim = attentions[0].inner_dim
    assert inner_dim == model.config.block_out_channels[-1]

    macs = count_mac_breakdown(model)

    assert macs.attention_matmuls == 2 * tokens * tokens * inner_dim
    assert macs.without_attention == conv_linear_macs_via_hooks(model, model.config.sample_size)


def test_attention_counted_for_every_kernel_and_processor():
    """The default CPU SDPA kernel (no native FLOP formula in torch 2.14), the SDPA math
    backend (bmm) and diffusers' classic AttnProcessor (baddbmm + bmm) agree."""
    model = tiny_unet()
    default = count_mac_breakdown(model)
    with sdpa_kernel(SDPBackend.MATH):
        math_backend = count_mac_breakdown(model)
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    classic = count_mac_breakdown(model)

    assert default.attention_matmuls > 0
    assert default == math_backend == classic


def test_uncounted_attention_kernel_raises(monkeypatch):
    from torch.utils.flop_counter import flop_registry

    # Without any formula for the CPU SDPA kernel (neither ours nor, in a later torch, a native
    # one: removed for this test) its products count as zero: that must not pass silently.
    monkeypatch.setattr(counting, "_missing_sdpa_formulas", dict)
    monkeypatch.delitem(flop_registry, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, raising=False)
    with pytest.raises(RuntimeError, match="no attention matmul FLOPs"):
        count_mac_breakdown(tiny_unet())


# ------------------------------------------------------------------ figures and batching ---


def test_include_attention_differs_by_attention_matmuls():
    model = tiny_unet()
    macs = count_mac_breakdown(model)
    with_attention = count_macs(model)
    without_attention = count_macs(model, include_attention=False)

    assert macs.attention_matmuls > 0
    assert with_attention == macs.total
    assert without_attention == macs.without_attention
    assert with_attention - without_attention == macs.attention_matmuls


@pytest.mark.parametrize(
    "make_model", [tiny_unet, lambda: SingleConv(3, 4, 3, 1, 1, 8)], ids=["unet", "conv"]
)
def test_count_is_per_image(make_model):
    model = make_model()
    assert count_mac_breakdown(model, batch_size=3) == count_mac_breakdown(model, batch_size=1)
    assert count_macs(model, batch_size=3) == count_macs(model, batch_size=1)


# ------------------------------------------------------------------------- side effects ---


@pytest.mark.parametrize("training", [True, False])
def test_training_flags_restored(training):
    model = tiny_unet()
    model.train(training)
    model.mid_block.train(not training)  # a submodule in the other mode must keep it
    before = {name: m.training for name, m in model.named_modules()}

    count_mac_breakdown(model)

    assert {name: m.training for name, m in model.named_modules()} == before


def test_no_gradients_left_behind():
    model = tiny_unet()
    count_mac_breakdown(model)
    assert all(p.grad is None for p in model.parameters())


def test_follows_model_dtype():
    model = tiny_unet()
    expected = count_mac_breakdown(model)
    # A float32 input into float64 weights would raise, so this also checks the input dtype.
    assert count_mac_breakdown(model.to(torch.float64)) == expected


def test_class_conditional_unet_gets_labels():
    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        num_class_embeds=10,
    )
    # The class embedding is a lookup, not a matmul, so it adds no MACs.
    labels = torch.zeros(1, dtype=torch.long)
    expected = conv_linear_macs_via_hooks(model, 8, class_labels=labels)
    assert count_macs(model, include_attention=False) == expected


def test_rejects_bad_batch_size():
    with pytest.raises(ValueError):
        count_macs(SingleConv(3, 4, 3, 1, 1, 8), batch_size=0)


def test_count_parameters_trainable_only():
    model = SingleConv(3, 4, 3, 1, 1, 8)
    model.conv.bias.requires_grad_(False)
    assert count_parameters(model) == 4 * 3 * 3 * 3 + 4
    assert count_parameters(model, trainable_only=True) == 4 * 3 * 3 * 3


# -------------------------------------------------------------------------- format_count ---


@pytest.mark.parametrize(
    "value, text",
    [
        (35_746_307, "35.7M"),
        (6.1e9, "6.1G"),
        (6_221_856_768, "6.2G"),
        (167_903_232, "167.9M"),
        (1_500, "1.5K"),
        (0, "0"),
        (999, "999"),
        (12.34, "12.3"),
        (999_960, "1.0M"),  # rounds up into the next unit, not "1000.0K"
        (2.5e12, "2.5T"),
        (-2_500_000, "-2.5M"),
    ],
)
def test_format_count(value, text):
    assert format_count(value) == text


def test_format_count_precision():
    assert format_count(35_746_307, precision=2) == "35.75M"
    assert format_count(35_746_307, precision=0) == "36M"
