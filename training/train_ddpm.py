#!/usr/bin/env python
"""Train a dense UNet2DModel DDPM with accelerate and save a DDPMPipeline folder (or, on the latents of a frozen
VQModel, an LDMPipeline folder).

The same data options as prune.py, including the built-in 'digits' (offline). The project's digits
teacher was made with this script; see docs/teacher.md for the exact command.

    accelerate launch training/train_ddpm.py --dataset_name digits --output_dir ddpm-digits

The colour teacher trains on the built-in 'photos' (32x32 crops of real photographs, offline):

    accelerate launch training/train_ddpm.py --dataset_name photos --output_dir ddpm-photos \
        --block_out_channels 32 64 128 --attention_levels 1

Latent diffusion: with ``--vqvae_model_name_or_path`` (a VQModel folder, e.g. from train_vqmodel.py) every batch
is encoded by the frozen autoencoder (``vqvae.encode(x).latents * scaling_factor``, the scaling LDMPipeline undoes
when it decodes), the UNet is trained on the latents, and the output is a standard LDMPipeline folder (vqvae,
unet, a DDIMScheduler as LDMPipeline uses, model_index.json):

    python training/train_vqmodel.py --output_dir vq-photos
    accelerate launch training/train_ddpm.py --dataset_name photos --vqvae_model_name_or_path vq-photos \
        --output_dir ldm-photos --block_out_channels 64 128 --attention_levels 1
"""

import argparse
import collections
import json
import logging
import math
import os
import sys
import time

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from diffusers_gfprune import data, training
from diffusers_gfprune.pipeline_kinds import LatentCacheConfig, LatentKind, PixelKind, public_source_name
from diffusers_gfprune.sampling import make_grid

logger = get_logger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_data_arguments(parser)
    training.add_training_arguments(parser, {"output_dir": "ddpm-digits", "max_train_steps": 6000, "learning_rate": 2e-4})
    training.add_hub_arguments(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--model_config", type=str, default=None, help="A UNet2DModel config.json to train; overrides the options below.")
    model.add_argument("--sample_size", type=int, default=None, help="Image side length of the model (default: 32 for photos, else 16).")
    model.add_argument("--in_channels", type=int, default=None, help="Image channels (default: 1 for digits, else 3).")
    model.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 64], help="Channels per level.")
    model.add_argument("--layers_per_block", type=int, default=1, help="ResNet blocks per level.")
    model.add_argument("--attention_levels", type=int, nargs="*", default=[1], help="Levels with self-attention.")
    model.add_argument("--norm_num_groups", type=int, default=16, help="GroupNorm groups.")
    model.add_argument("--num_train_timesteps", type=int, default=1000, help="Diffusion steps of the scheduler.")
    model.add_argument("--beta_schedule", type=str, default="linear", help="Beta schedule of the DDPMScheduler.")
    model.add_argument("--clip_sample", action=argparse.BooleanOptionalAction, default=None,
                       help="The saved scheduler clips its x0 prediction to [-1, 1] while sampling (diffusers' default; the "
                            "default here for pixels, off for latents, which are not bounded by 1). "
                            "--no-clip_sample for an under-trained model: with clipping, DDIM's few large early steps pull "
                            "every sample of such a model to the data's mean colour (docs/teacher.md). Training is unchanged.")
    latent = parser.add_argument_group("latent diffusion")
    latent.add_argument("--vqvae_model_name_or_path", type=str, default=None,
                        help="A VQModel (folder or Hub id, safetensors; or an LDMPipeline folder, whose vqvae is used): train "
                             "on its latents and save an LDMPipeline. --sample_size and --in_channels then default to the "
                             "latents' size and channels, and --resolution to the images' size.")
    latent.add_argument("--latent_cache_mb", type=float, default=0.0,
                        help=LatentCacheConfig.__dataclass_fields__["max_megabytes"].metadata["help"]
                        + " Encodes the data set once instead of every batch (both flips with --random_flip).")
    return training.resolve_data_arguments(parser.parse_args(argv))


def load_vqvae(path: str, cache_dir=None, token=None):
    """The frozen VQModel of ``path``: a VQModel folder or Hub id, or a pipeline folder with a ``vqvae`` subfolder."""
    from diffusers import VQModel

    subfolder = "vqvae" if os.path.isfile(os.path.join(path, "model_index.json")) else None
    if os.path.isdir(path):
        config = os.path.join(path, subfolder or "", "config.json")
        if not os.path.isfile(config):
            raise ValueError(f"--vqvae_model_name_or_path {path!r} holds no VQModel (no {os.path.relpath(config, path)}).")
        with open(config, encoding="utf-8") as f:
            name = json.load(f).get("_class_name")
        if name != "VQModel":
            raise ValueError(f"--vqvae_model_name_or_path {path!r} holds a {name}, not a VQModel (LDMPipeline's autoencoder).")
    vqvae = VQModel.from_pretrained(path, subfolder=subfolder, cache_dir=cache_dir, token=token, use_safetensors=True)
    vqvae.register_to_config(_name_or_path=public_source_name(path))  # the saved LDMPipeline names no local path
    return vqvae.eval().requires_grad_(False)


def build_model(args) -> UNet2DModel:
    if args.model_config:
        with open(args.model_config) as f:
            return UNet2DModel.from_config(json.load(f))
    levels = len(args.block_out_channels)
    down = tuple("AttnDownBlock2D" if i in args.attention_levels else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if levels - 1 - i in args.attention_levels else "UpBlock2D" for i in range(levels))
    return UNet2DModel(
        sample_size=args.sample_size,
        in_channels=args.in_channels,
        out_channels=args.in_channels,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=args.norm_num_groups,
        attention_head_dim=None,
    )


def make_kind(args, noise_scheduler):
    """The pipeline kind being trained, with its frozen autoencoder and the scheduler the output pipeline gets."""
    if args.vqvae is None:
        kind = PixelKind("DDPMPipeline", "DDPMScheduler")
        kind.scheduler = noise_scheduler
        return kind
    kind = LatentKind("LDMPipeline", "DDIMScheduler", {"vqvae": dict(args.vqvae.config)})
    kind.components["vqvae"] = args.vqvae
    kind.scheduler = DDIMScheduler.from_config(noise_scheduler.config)  # what LDMPipeline samples with
    return kind


def resolve_shapes(args):
    """Model and data shapes: the latents' for the UNet with an autoencoder, the images' for the data."""
    image_size = 32 if args.dataset_name == "photos" else 16
    if args.vqvae is None:
        args.in_channels = args.in_channels or (1 if args.dataset_name == "digits" else 3)
        args.sample_size = args.sample_size or image_size
        return args.in_channels, args.resolution or args.sample_size
    config = args.vqvae.config
    factor = 2 ** (len(config.block_out_channels) - 1)
    resolution = args.resolution or (args.sample_size * factor if args.sample_size else image_size)
    if resolution % factor:
        raise ValueError(f"The autoencoder downsamples by {factor}, which does not divide the image resolution {resolution}.")
    if args.sample_size is not None and args.sample_size * factor != resolution:
        raise ValueError(f"--sample_size {args.sample_size} latents decode to {args.sample_size * factor} px, but the "
                         f"images are {resolution} px (--resolution); give one of them.")
    if args.in_channels is not None and args.in_channels != config.latent_channels:
        raise ValueError(f"--in_channels {args.in_channels} differs from the autoencoder's latent_channels "
                         f"{config.latent_channels}; leave it out with --vqvae_model_name_or_path.")
    args.in_channels, args.sample_size = config.latent_channels, resolution // factor
    return config.in_channels, resolution


def main(argv=None):
    args = parse_args(argv)
    # Everything that can be wrong with the arguments is reported before any heavy work.
    training.check_training_arguments(args)
    training.check_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint)
    training.check_hub_arguments(args)
    cache = LatentCacheConfig(max_megabytes=args.latent_cache_mb)
    if args.latent_cache_mb and not args.vqvae_model_name_or_path:
        raise ValueError("--latent_cache_mb caches an autoencoder's latents: it needs --vqvae_model_name_or_path.")
    args.vqvae = load_vqvae(args.vqvae_model_name_or_path, args.cache_dir, args.hub_token) if args.vqvae_model_name_or_path else None
    if args.clip_sample is None:
        args.clip_sample = args.vqvae is None  # latents are not bounded by 1
    image_channels, resolution = resolve_shapes(args)
    data_config = data.DataConfig(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, train_data_dir=args.train_data_dir,
        image_column=args.image_column, resolution=resolution, center_crop=args.center_crop,
        random_flip=args.random_flip, cache_dir=args.cache_dir, max_train_samples=args.max_train_samples,
    )
    data.validate_data_source(data_config, image_channels)

    accelerator = training.create_accelerator(args, split_batches=True)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)

    model = build_model(args)
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
        prediction_type=args.prediction_type or "epsilon", clip_sample=args.clip_sample,
    )
    kind = make_kind(args, noise_scheduler).to(accelerator.device)
    ema = training.create_ema(model, args) if args.use_ema else None
    optimizer = training.create_optimizer(model, args)
    dataset = data.load_train_dataset(data_config, image_channels)
    dataset, to_model_input = kind.training_data(dataset, cache, accelerator.device)
    global_batch = args.train_batch_size * accelerator.num_processes
    dataloader = data.make_dataloader(dataset, global_batch, seed=args.seed, num_workers=args.dataloader_num_workers)
    shuffle_generator = dataloader.generator
    lr_scheduler = training.create_lr_scheduler(optimizer, args, accelerator.num_processes)
    noise = training.GlobalBatchNoise(args.seed, accelerator.num_processes, accelerator.process_index)

    # Training wall time, carried across resumes in the checkpoints (sampling grids included).
    wall = {"before": 0.0, "started": time.time()}

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for m in models:
                accelerator.unwrap_model(m).save_pretrained(os.path.join(output_dir, "unet"))
                weights.pop()
            if ema is not None:
                ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
            meta = {"stage": "train", "wall_seconds": wall["before"] + time.time() - wall["started"]}
            training.save_extra_state(output_dir, {f"noise/{k}": v for k, v in noise.state_dict().items()}, meta)

    def load_hook(models, input_dir):
        for _ in range(len(models)):
            m = models.pop()
            loaded = UNet2DModel.from_pretrained(input_dir, subfolder="unet")
            accelerator.unwrap_model(m).load_state_dict(loaded.state_dict())
        if ema is not None:
            training.load_ema(ema, os.path.join(input_dir, "unet_ema"), UNet2DModel)
        tensors, meta = training.load_extra_state(input_dir)
        noise.load_state_dict({k[len("noise/"):]: v for k, v in tensors.items() if k.startswith("noise/")})
        wall["before"] = float(meta.get("wall_seconds", 0.0))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    if accelerator.is_main_process:
        accelerator.init_trackers("train_ddpm", config={k: v for k, v in vars(args).items()
                                                        if k != "hub_token" and isinstance(v, (int, float, str, bool))})

    global_step = 0
    resume = training.resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume:
        accelerator.print(f"Resuming from {resume}")
        accelerator.load_state(resume)
        global_step = training.checkpoint_step(resume)
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    progress = tqdm(total=args.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="train")
    fixed_noise = torch.randn(
        (args.num_validation_images, args.in_channels, args.sample_size, args.sample_size), generator=torch.Generator().manual_seed(args.seed)
    )
    loss_value = float("nan")
    recent_losses = collections.deque(maxlen=100)
    started = time.time()
    first_step = global_step
    while global_step < args.max_train_steps:
        epoch, skip = divmod(global_step, steps_per_epoch)
        for batch in training.epoch_batches(dataloader, shuffle_generator, args.seed, epoch, skip * args.gradient_accumulation_steps, accelerator):
            with accelerator.accumulate(model):
                loss = noise.loss(to_model_input(batch["images"]), noise_scheduler, args.prediction_type)(model)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(model.parameters())
            global_step += 1
            loss_value = accelerator.gather(loss.detach()).mean().item()
            recent_losses.append(loss_value)
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.1e}")
            logs = {"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                if accelerator.is_main_process:
                    training.make_room_for_checkpoint(args.output_dir, args.checkpoints_total_limit)
                accelerator.wait_for_everyone()
                accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{global_step}"))
            if accelerator.is_main_process and (global_step % args.validation_steps == 0 or global_step == args.max_train_steps):
                unet = training.ema_model(accelerator.unwrap_model(model), ema)
                images = kind.sample(unet, DDIMScheduler.from_config(noise_scheduler.config), fixed_noise, args.num_inference_steps)
                grid = make_grid(images, scale=4)
                os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
                grid.save(os.path.join(args.output_dir, "samples", f"step-{global_step:06d}.png"))
                training.log_images(accelerator, "samples", grid, global_step)
            if global_step >= args.max_train_steps:
                break
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = training.ema_model(accelerator.unwrap_model(model), ema)
        # A DDPMPipeline with the training scheduler, or an LDMPipeline (vqvae, unet, DDIMScheduler).
        training.save_pipeline_into(kind.build_pipeline(unet), args.output_dir)
        images = kind.sample(unet, DDIMScheduler.from_config(noise_scheduler.config), fixed_noise, args.num_inference_steps)
        make_grid(images, scale=4).save(os.path.join(args.output_dir, "samples.png"))
        # A resume that only saves (no step left) has no loss of its own: None, not 0 or NaN.
        summary = {
            "final_loss": loss_value if recent_losses else None,
            "mean_loss_last_100_steps": sum(recent_losses) / len(recent_losses) if recent_losses else None,
            "steps": global_step,
            "steps_this_invocation": global_step - first_step,
            "wall_seconds_this_invocation": time.time() - started,
            "wall_seconds_total": wall["before"] + time.time() - wall["started"],
            "num_parameters": sum(p.numel() for p in unet.parameters()),
            "latent_cache": type(dataset).__name__ == "LatentDataset",
            "command": " ".join(training.portable_argv(sys.argv)),
        }
        path = os.path.join(args.output_dir, "training_summary.json")
        with open(f"{path}.tmp", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(f"{path}.tmp", path)
        if args.push_to_hub:
            from diffusers_gfprune.hub import push_folder

            push_folder(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo)
    accelerator.end_training()


if __name__ == "__main__":
    main()
