"""Pipeline kinds: the registry read from model_index.json, refusals before any weights, the teacher's class kept,
and the latent cache equal to encoding batch by batch."""

import json
import os

import pytest
import torch
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline, LDMPipeline,
                       PNDMPipeline, PNDMScheduler, UNet2DModel, VQModel)

from diffusers_gfprune import pipeline_kinds
from diffusers_gfprune.pipeline_kinds import LatentCacheConfig, LatentKind, PixelKind, kind_for_index
from diffusers_gfprune.teacher import load_kind, load_teacher, resolve_teacher


def index(cls, scheduler="DDPMScheduler", **components):
    out = {"_class_name": cls, "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", scheduler]}
    out.update(components)
    return out


VQ = {"vqvae": ["diffusers", "VQModel"]}

# model_index.json -> (kind, pipeline class it publishes as, scheduler class)
KIND_TABLE = [
    (None, "pixel", "DDPMPipeline", "DDPMScheduler"),  # a bare UNet2DModel
    (index("DDPMPipeline"), "pixel", "DDPMPipeline", "DDPMScheduler"),
    (index("DDIMPipeline", "DDIMScheduler"), "pixel", "DDIMPipeline", "DDIMScheduler"),
    (index("PNDMPipeline", "PNDMScheduler"), "pixel", "PNDMPipeline", "PNDMScheduler"),
    (index("LDMPipeline", "DDIMScheduler", **VQ), "latent", "LDMPipeline", "DDIMScheduler"),
    (index(["pipeline_gfprune_ddpm", "GFPruneDDPMPipeline"]), "pixel", "DDPMPipeline", "DDPMScheduler"),
    (index(["pipeline_gfprune_ldm", "GFPruneLDMPipeline"], "DDIMScheduler", **VQ), "latent", "LDMPipeline", "DDIMScheduler"),
]


@pytest.mark.parametrize("model_index, name, pipeline_class, scheduler_class", KIND_TABLE)
def test_kind_table(model_index, name, pipeline_class, scheduler_class):
    kind = kind_for_index(model_index, "somewhere")
    assert (kind.name, kind.pipeline_class, kind.scheduler_class) == (name, pipeline_class, scheduler_class)
    assert isinstance(kind, pipeline_kinds.KINDS[name])


REFUSED = [
    (index("StableDiffusionPipeline"), "StableDiffusionPipeline"),
    (index("ScoreSdeVePipeline", "ScoreSdeVeScheduler"), "ScoreSdeVePipeline"),
    (index(["my_code", "MyPipeline"]), "MyPipeline"),
    ({"_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"]}, "lacks its ['vqvae']"),
    (index("LDMPipeline", vqvae=["diffusers", "AutoencoderKL"]), "AutoencoderKL"),
    ({"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"]}, "no 'unet'"),
]


@pytest.mark.parametrize("model_index, named", REFUSED)
def test_refused_pipelines_name_the_class_and_the_supported_ones(model_index, named):
    with pytest.raises(ValueError) as error:
        kind_for_index(model_index, "teacher-folder")
    message = str(error.value)
    assert named in message and "teacher-folder" in message
    if "Pipeline" in named:  # an unknown class: the message lists what is supported
        for supported in ("DDPMPipeline", "DDIMPipeline", "PNDMPipeline", "LDMPipeline"):
            assert supported in message


def test_refusal_comes_from_the_config_read(tmp_path):
    """A refused folder holds no weights at all: resolve_teacher must refuse it from model_index.json alone."""
    folder = tmp_path / "sd"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(index("StableDiffusionPipeline")))
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="StableDiffusionPipeline.*LDMPipeline"):
        resolve_teacher(str(folder))


def test_a_third_kind_is_one_registry_entry():
    class EchoKind(PixelKind):
        name = "echo-test"
        pipeline_classes = ("EchoTestPipeline",)
        variant = ("", "")

    try:
        pipeline_kinds.register_kind(EchoKind)
        kind = kind_for_index(index("EchoTestPipeline"), "x")
        assert type(kind) is EchoKind and "EchoTestPipeline (echo-test)" in pipeline_kinds.supported_pipeline_classes()
        with pytest.raises(ValueError, match="already belongs"):
            pipeline_kinds.register_kind(type("Clash", (PixelKind,), {"name": "clash", "pipeline_classes": ("DDPMPipeline",)}))
    finally:
        pipeline_kinds.KINDS.pop("echo-test", None)
        pipeline_kinds.PIPELINE_CLASSES.pop("EchoTestPipeline", None)


def tiny_unet(channels=3, size=8):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


# The teacher's own scheduler, with a setting that a round trip through DDPMScheduler would lose.
PIXEL_TEACHERS = [
    (DDIMPipeline, DDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=False, clip_sample=False)),
    (PNDMPipeline, PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False)),
    (DDPMPipeline, DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_large")),
]


@pytest.mark.parametrize("pipeline_cls, scheduler", PIXEL_TEACHERS, ids=lambda x: type(x).__name__ if not isinstance(x, type) else x.__name__)
def test_pixel_teacher_comes_back_as_its_own_class(tmp_path, pipeline_cls, scheduler):
    teacher = tmp_path / "teacher"
    pipeline_cls(unet=tiny_unet(), scheduler=scheduler).save_pretrained(teacher)
    source = resolve_teacher(str(teacher))
    unet, noise_scheduler = load_teacher(source)
    kind = load_kind(source)
    assert type(kind) is PixelKind and kind.pipeline_class == pipeline_cls.__name__
    assert type(kind.scheduler) is type(scheduler) and type(noise_scheduler) is DDPMScheduler
    # Built from the training scheduler (a DDPMScheduler), the output still has the teacher's own scheduler config.
    out = tmp_path / "out"
    kind.build_pipeline(unet, noise_scheduler).save_pretrained(out)
    loaded = DiffusionPipeline.from_pretrained(out)
    assert type(loaded) is pipeline_cls and type(loaded.scheduler) is type(scheduler)
    assert {k: v for k, v in loaded.scheduler.config.items() if not k.startswith("_")} == \
        {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    assert type(pipeline_cls.from_pretrained(out)) is pipeline_cls
    # The per-layer layout publishes the kind's variant, which records pruning_info.
    info = {"base_model": "t", "criterion": "magnitude", "sparsity": 0.5, "layout": "per-layer",
            "params": {"dense": 1, "pruned": sum(p.numel() for p in unet.parameters())}, "macs": {"dense": 2, "pruned": 1}}
    variant = kind.build_pipeline(unet, pruning_info=info)
    assert type(variant).__name__ == "GFPruneDDPMPipeline" and variant.pruning_info == info
    assert type(variant.scheduler) is type(scheduler)


def test_scheduler_settings_survive_the_build(tmp_path):
    """The table test above compares configs loosely; this pins the one setting a DDPMScheduler round trip loses."""
    teacher = tmp_path / "teacher"
    DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(set_alpha_to_one=False)).save_pretrained(teacher)
    source = resolve_teacher(str(teacher))
    unet, noise_scheduler = load_teacher(source)
    built = load_kind(source).build_pipeline(unet, noise_scheduler)
    assert built.scheduler.config.set_alpha_to_one is False


def tiny_vqvae():
    torch.manual_seed(1)
    vqvae = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                    latent_channels=3, norm_num_groups=4, num_vq_embeddings=32, scaling_factor=0.7).eval()
    # Codes spread like latents (diffusers starts them near 0, where every latent quantizes by direction alone,
    # so a wrong scale would go unseen).
    vqvae.quantize.embedding.weight.data.normal_(generator=torch.Generator().manual_seed(2))
    return vqvae


def latent_kind(vqvae):
    kind = LatentKind("LDMPipeline", "DDIMScheduler", {"vqvae": dict(vqvae.config)})
    kind.components["vqvae"] = vqvae.requires_grad_(False)
    kind.scheduler = DDIMScheduler()
    return kind


class FlipData(torch.utils.data.Dataset):
    """Fixed images with a random flip drawn from torch's global generator, as the built-in data sets draw it."""

    def __init__(self, n=12, random_flip=True):
        self.images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
        self.random_flip = random_flip

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"images": image, "labels": torch.tensor(i)}


@pytest.mark.parametrize("random_flip", [True, False])
def test_latent_cache_gives_the_batches_encoding_gives(random_flip):
    kind = latent_kind(tiny_vqvae())
    data = FlipData(random_flip=random_flip)
    cached, identity = kind.training_data(data, LatentCacheConfig(max_megabytes=1, batch_size=5))
    assert type(cached).__name__ == "LatentDataset" and identity(torch.ones(1)).item() == 1
    assert cached.nbytes == len(data) * 3 * 8 * 8 * 4 * (2 if random_flip else 1)
    assert data.random_flip is random_flip  # restored after encoding
    torch.manual_seed(5)
    from_cache = torch.stack([cached[i]["images"] for i in range(len(data))])
    torch.manual_seed(5)
    encoded = kind.encode(torch.stack([data[i]["images"] for i in range(len(data))]))
    torch.testing.assert_close(from_cache, encoded, atol=1e-5, rtol=1e-5)


def test_latent_cache_bound_and_refusals():
    kind = latent_kind(tiny_vqvae())
    data = FlipData(random_flip=True)
    same, encode = kind.training_data(data, LatentCacheConfig(max_megabytes=1e-4))  # 100 bytes: does not fit
    assert same is data and encode == kind.encode
    same, encode = kind.training_data(data, None)
    assert same is data and encode == kind.encode

    class RandomCrops(FlipData):  # changes between reads and does not say why: not cacheable
        def __getitem__(self, i):
            return {"images": self.images[i] + torch.rand(())}

    crops = RandomCrops()
    del crops.random_flip
    state = torch.random.get_rng_state()
    same, _ = kind.training_data(crops, LatentCacheConfig(max_megabytes=1))
    assert same is crops and torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ValueError, match=">= 0"):
        LatentCacheConfig(max_megabytes=-1)


def test_pixel_kind_is_the_identity_and_samples_like_sample_images():
    from diffusers_gfprune.sampling import sample_images

    kind = PixelKind()
    unet = tiny_unet()
    x = torch.randn(2, 3, 8, 8)
    assert kind.encode(x) is x and kind.training_data("data")[0] == "data"
    assert kind.sample_shape(unet) == kind.image_shape(unet) == (3, 8, 8)
    noise = kind.initial_noise(unet, 2, seed=4)
    torch.testing.assert_close(kind.sample(unet, DDIMScheduler(), noise, 3), sample_images(unet, DDIMScheduler(), noise, 3))


def test_latent_kind_samples_decode_through_the_autoencoder():
    vqvae = tiny_vqvae()
    kind = latent_kind(vqvae)
    unet = tiny_unet(size=8)
    assert kind.sample_shape(unet) == (3, 8, 8) and kind.image_shape(unet) == (3, 16, 16)
    noise = kind.initial_noise(unet, 2, seed=0)
    images = kind.sample(unet, DDIMScheduler(), noise, 3)
    assert images.shape == (2, 3, 16, 16) and 0 <= float(images.min()) and float(images.max()) <= 1
    # LDMPipeline itself, from the same noise (its randn_tensor on the CPU draws what torch.randn draws).
    pipe = LDMPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    ours = kind.sample(unet, DDIMScheduler(), torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(9)), 3)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(9), num_inference_steps=3, output_type="np").images
    torch.testing.assert_close(ours.permute(0, 2, 3, 1), torch.from_numpy(theirs), atol=1e-5, rtol=0)
    built = kind.build_pipeline(unet)
    assert type(built) is LDMPipeline and built.vqvae is vqvae


def test_unloaded_latent_kind_says_what_to_do():
    kind = LatentKind(component_configs={"vqvae": {"block_out_channels": [8, 16], "out_channels": 3}})
    assert kind.image_shape({"in_channels": 3, "sample_size": 8}) == (3, 16, 16)  # from configs alone
    assert kind.notes and "scaling_factor" in kind.notes[0]  # the config has none: diffusers' default applies
    with pytest.raises(RuntimeError, match="load_components"):
        kind.encode(torch.zeros(1, 3, 16, 16))


# (layout, teacher's pipeline class) -> what the card's snippet calls, and whether it says the autoencoder is untouched
CARD_TABLE = [
    ("stock", "DDPMPipeline", "DDPMPipeline.from_pretrained(\"u/r\")", False),
    ("stock", "DDIMPipeline", "DDIMPipeline.from_pretrained(\"u/r\")", False),
    ("stock", "LDMPipeline", "LDMPipeline.from_pretrained(\"u/r\")", True),
    ("per-layer", "LDMPipeline", "DiffusionPipeline.from_pretrained(\"u/r\", trust_remote_code=True)", True),
    ("per-layer", "PNDMPipeline", "DiffusionPipeline.from_pretrained(\"u/r\", trust_remote_code=True)", False),
]


@pytest.mark.parametrize("layout, pipeline_class, call, mentions_vqvae", CARD_TABLE)
def test_card_snippet_names_the_teachers_class(layout, pipeline_class, call, mentions_vqvae):
    from diffusers_gfprune.hub import loading_note, loading_snippet

    snippet = loading_snippet(layout, "u/r", pipeline_class)
    assert call in snippet
    if layout == "stock":
        assert snippet.startswith(f"from diffusers import {pipeline_class}\n")
    assert ("`vqvae`" in loading_note(layout, pipeline_class)) is mentions_vqvae


def test_kind_of_a_loaded_pipeline():
    """A pipeline loaded some other way (remote code, a user's own object) gives its kind with its own components."""
    from diffusers_gfprune.pipeline_kinds import kind_for_pipeline

    vqvae, unet = tiny_vqvae(), tiny_unet()
    ldm = LDMPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler())
    kind = kind_for_pipeline(ldm)
    assert type(kind) is LatentKind and kind.components["vqvae"] is vqvae and kind.scheduler is ldm.scheduler
    assert kind.image_shape(unet) == (3, 16, 16)

    class Variant(DDIMPipeline):  # e.g. a remote-code subclass
        pass

    kind = kind_for_pipeline(Variant(unet=unet, scheduler=DDIMScheduler()))
    assert type(kind) is PixelKind and kind.pipeline_class == "DDIMPipeline" and kind.scheduler_class == "DDIMScheduler"

    class Other(DiffusionPipeline):
        def __init__(self, unet, scheduler):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

    with pytest.raises(ValueError, match="Other.*LDMPipeline"):
        kind_for_pipeline(Other(unet=unet, scheduler=DDPMScheduler()))
