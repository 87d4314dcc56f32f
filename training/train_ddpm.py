#!/usr/bin/env python
"""Train a dense UNet2DModel DDPM with accelerate and save a DDPMPipeline folder.

The same data options as prune.py, including the built-in 'digits' (offline). The project's digits
teacher was made with this script; see docs/teacher.md for the exact command.

    accelerate launch training/train_ddpm.py --dataset_name digits --output_dir ddpm-digits

The colour teacher trains on the built-in 'photos' (32x32 crops of real photographs, offline):

    accelerate launch training/train_ddpm.py --dataset_name photos --output_dir ddpm-photos \
        --block_out_channels 32 64 128 --attention_levels 1
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
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from diffusers_gfprune import data, training
from diffusers_gfprune.sampling import make_grid, sample_images

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
    model.add_argument("--clip_sample", action=argparse.BooleanOptionalAction, default=True,
                       help="The saved scheduler clips its x0 prediction to [-1, 1] while sampling (diffusers' default). "
                            "--no-clip_sample for an under-trained model: with clipping, DDIM's few large early steps pull "
                            "every sample of such a model to the data's mean colour (docs/teacher.md). Training is unchanged.")
    return training.resolve_data_arguments(parser.parse_args(argv))


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


def main(argv=None):
    args = parse_args(argv)
    if args.in_channels is None:
        args.in_channels = 1 if args.dataset_name == "digits" else 3
    if args.sample_size is None:
        args.sample_size = 32 if args.dataset_name == "photos" else 16
    # Everything that can be wrong with the arguments is reported before any heavy work.
    training.check_training_arguments(args)
    training.check_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint)
    training.check_hub_arguments(args)
    data_config = data.DataConfig(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, train_data_dir=args.train_data_dir,
        image_column=args.image_column, resolution=args.resolution or args.sample_size, center_crop=args.center_crop,
        random_flip=args.random_flip, cache_dir=args.cache_dir, max_train_samples=args.max_train_samples,
    )
    data.validate_data_source(data_config, args.in_channels)

    accelerator = training.create_accelerator(args, split_batches=True)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)

    model = build_model(args)
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
        prediction_type=args.prediction_type or "epsilon", clip_sample=args.clip_sample,
    )
    ema = training.create_ema(model, args) if args.use_ema else None
    optimizer = training.create_optimizer(model, args)
    dataset = data.load_train_dataset(data_config, args.in_channels)
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
        noise.load_state_dict({"generator": tensors["noise/generator"]})
        wall["before"] = float(meta.get("wall_seconds", 0.0))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    if accelerator.is_main_process:
        accelerator.init_trackers("train_ddpm", config={k: v for k, v in vars(args).items() if k != "hub_token" and not isinstance(v, list)})

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
                loss = noise.loss(batch["images"], noise_scheduler, args.prediction_type)(model)
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
                images = sample_images(unet, DDIMScheduler.from_config(noise_scheduler.config), fixed_noise, args.num_inference_steps)
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
        pipeline = DDPMPipeline(unet=unet, scheduler=noise_scheduler)
        training.save_pipeline_into(pipeline, args.output_dir)
        images = sample_images(unet, DDIMScheduler.from_config(noise_scheduler.config), fixed_noise, args.num_inference_steps)
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
