"""UNet2DModel's configuration space in the pinned diffusers, one small configuration per option.

Every entry changes one thing (or a few that only make sense together) from ``BASE``, a 2-level,
16-pixel UNet with attention, so that each option is seen on its own. ``test_config_space.py``
runs each through ``find_units`` and both export layouts and prints the table.
"""

BASE = dict(
    sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_num_groups=4,
)


def _blocks(down, up):
    return {"down_block_types": down, "up_block_types": up}


CONFIGS = {
    "base (DownBlock2D, AttnDownBlock2D)": {},
    "DownBlock2D/UpBlock2D only": _blocks(("DownBlock2D", "DownBlock2D"), ("UpBlock2D", "UpBlock2D")),
    "ResnetDownsampleBlock2D/ResnetUpsampleBlock2D": _blocks(
        ("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"), ("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D")),
    "AttnDownBlock2D/AttnUpBlock2D everywhere": _blocks(
        ("AttnDownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "AttnUpBlock2D")),
    "SkipDownBlock2D/SkipUpBlock2D, fourier (NCSN++)": dict(
        _blocks(("SkipDownBlock2D", "AttnSkipDownBlock2D"), ("AttnSkipUpBlock2D", "SkipUpBlock2D")),
        time_embedding_type="fourier", flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=2 ** -0.5,
        block_out_channels=(32, 64), norm_num_groups=8),
    "SkipDownBlock2D/SkipUpBlock2D, positional": _blocks(
        ("SkipDownBlock2D", "SkipDownBlock2D"), ("SkipUpBlock2D", "SkipUpBlock2D")),
    "CrossAttnDownBlock2D/CrossAttnUpBlock2D": _blocks(
        ("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D")),
    "SimpleCrossAttnDownBlock2D/SimpleCrossAttnUpBlock2D": _blocks(
        ("SimpleCrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "SimpleCrossAttnUpBlock2D")),
    "DownEncoderBlock2D/UpDecoderBlock2D": _blocks(
        ("DownEncoderBlock2D", "DownEncoderBlock2D"), ("UpDecoderBlock2D", "UpDecoderBlock2D")),
    "AttnDownEncoderBlock2D/AttnUpDecoderBlock2D": _blocks(
        ("AttnDownEncoderBlock2D", "DownBlock2D"), ("UpBlock2D", "AttnUpDecoderBlock2D")),
    "KDownBlock2D/KUpBlock2D": _blocks(("KDownBlock2D", "KDownBlock2D"), ("KUpBlock2D", "KUpBlock2D")),
    "no mid block": {"mid_block_type": None},
    "time_embedding_type fourier": {"time_embedding_type": "fourier"},
    "time_embedding_type learned": {"time_embedding_type": "learned", "num_train_timesteps": 1000},
    "resnet_time_scale_shift scale_shift": {"resnet_time_scale_shift": "scale_shift"},
    # DownBlock2D and UpBlock2D ignore down/upsample_type; the attention blocks honour it.
    "downsample_type resnet": dict(_blocks(("AttnDownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D")),
                                   downsample_type="resnet"),
    "upsample_type resnet": dict(_blocks(("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "AttnUpBlock2D")),
                                 upsample_type="resnet"),
    "down/upsample_type resnet": dict(_blocks(("AttnDownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "AttnUpBlock2D")),
                                      downsample_type="resnet", upsample_type="resnet"),
    "downsample_padding 0": {"downsample_padding": 0},
    "attention_head_dim 8 (multi-head)": {"attention_head_dim": 8},
    "attn_norm_num_groups 2": {"attn_norm_num_groups": 2},
    "add_attention False": {"add_attention": False},
    "out_channels 1 != in_channels 3": {"out_channels": 1},
    "num_class_embeds 10": {"num_class_embeds": 10},
    "class_embed_type timestep": {"class_embed_type": "timestep"},
    "class_embed_type identity": {"class_embed_type": "identity"},
    "time_embedding_dim 48": {"time_embedding_dim": 48},
    "layers_per_block 2": {"layers_per_block": 2},
    "layers_per_block 3": {"layers_per_block": 3},
    "norm_num_groups 2": {"norm_num_groups": 2},
    "norm_num_groups 8": {"norm_num_groups": 8},
    "center_input_sample, gelu": {"center_input_sample": True, "act_fn": "gelu"},
    "3 levels, 1 channel": dict(in_channels=1, out_channels=1, block_out_channels=(16, 32, 32),
                                **_blocks(("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                          ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))),
}


def config(name: str) -> dict:
    return dict(BASE, **CONFIGS[name])
