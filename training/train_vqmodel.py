#!/usr/bin/env python
"""Train a small diffusers ``VQModel`` (the autoencoder of a latent-diffusion ``LDMPipeline``) with accelerate.

The same data options as the other scripts; the default is the built-in colour data set ``photos`` (32x32
crops of real photographs, offline). The shipped latent teacher's autoencoder was made with this script; see
docs/teacher.md for the exact command.

    python training/train_vqmodel.py --output_dir vq-photos

The model is saved with ``save_pretrained`` (``config.json`` + safetensors) at the root of ``--output_dir``,
with ``reconstruction.json`` (PSNR and SSIM of the held-out images' reconstructions, through the quantizer as
``LDMPipeline`` decodes, and without it) and ``reconstructions.png``. ``train_ddpm.py
--vqvae_model_name_or_path <output_dir>`` then trains a latent UNet on its latents and saves an ``LDMPipeline``.

How it trains (choices of this script, each a flag):

* The loss is the L1 reconstruction error plus diffusers' own vector-quantizer loss (codebook and commitment).
* For the first ``--quantize_after`` steps the decoder reads the encoder's output directly (no quantizer), so
  that the latent space takes shape before the codebook is fitted to it; then the codebook is set to encoder
  outputs of random training images, and codes that no image used for ``--restart_dead_codes_every`` steps are
  moved onto random encoder outputs (a small codebook left at diffusers' tiny uniform initialization collapses
  onto a few codes).
* At the end, ``scaling_factor`` is set to 1 / (standard deviation of the encoder's output over the training
  images): ``LDMPipeline`` divides the UNet's latents by it before decoding, so the latent UNet is trained on
  unit-variance latents (the rescaling of the latent-diffusion paper).
"""

import argparse
import json
import logging
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import VQModel
from tqdm.auto import tqdm

from diffusers_gfprune import data, training

logger = get_logger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_data_arguments(parser, default_dataset="photos")
    training.add_training_arguments(parser, {"output_dir": "vq-photos", "max_train_steps": 3000, "train_batch_size": 64,
                                             "learning_rate": 1e-3, "lr_warmup_steps": 100, "checkpointing_steps": 500,
                                             "validation_steps": 500})
    parser.set_defaults(use_ema=False)
    model = parser.add_argument_group("model")
    model.add_argument("--sample_size", type=int, default=None, help="Image side length (default: 32 for photos, else 16).")
    model.add_argument("--in_channels", type=int, default=None, help="Image channels (default: 1 for digits, else 3).")
    model.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64],
                       help="Channels per level of the encoder and decoder; every level after the first halves the "
                            "resolution, so 2 levels turn 32x32 images into 16x16 latents, 3 levels into 8x8.")
    model.add_argument("--layers_per_block", type=int, default=1, help="ResNet blocks per level.")
    model.add_argument("--latent_channels", type=int, default=3, help="Channels of the latents (what the latent UNet sees).")
    model.add_argument("--num_vq_embeddings", type=int, default=1024, help="Codebook size.")
    model.add_argument("--norm_num_groups", type=int, default=16, help="GroupNorm groups (must divide every level's channels).")
    model.add_argument("--mid_block_add_attention", action=argparse.BooleanOptionalAction, default=False,
                       help="Self-attention in the middle block of the encoder and decoder.")
    vq = parser.add_argument_group("vector quantization")
    vq.add_argument("--quantize_after", type=int, default=300,
                    help="Steps of plain autoencoder training (the decoder reads the encoder's output) before the codebook "
                         "is initialized from encoder outputs and quantization starts.")
    vq.add_argument("--restart_dead_codes_every", type=int, default=200,
                    help="Every N steps, codes no training image used in those N steps move onto random encoder outputs; 0 = never.")
    vq.add_argument("--vq_loss_weight", type=float, default=1.0, help="Weight of the quantizer's loss next to the L1 reconstruction loss.")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--num_eval_images", type=int, default=1792,
                    help="Held-out images whose reconstructions are measured (PSNR, SSIM) at the end (the 'test' split).")
    args = training.resolve_data_arguments(parser.parse_args(argv))
    if args.in_channels is None:
        args.in_channels = 1 if args.dataset_name == "digits" else 3
    if args.sample_size is None:
        args.sample_size = 32 if args.dataset_name == "photos" else 16
    return args


def check_arguments(args) -> None:
    """Everything that can be wrong with the arguments, before any heavy work."""
    training.check_training_arguments(args)
    training.check_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint)
    if args.use_ema:
        raise ValueError("train_vqmodel.py keeps no EMA of the autoencoder (codebook restarts move codes); drop --use_ema.")
    bad = [c for c in args.block_out_channels if c % args.norm_num_groups]
    if bad:
        raise ValueError(f"--norm_num_groups {args.norm_num_groups} must divide every --block_out_channels entry ({bad} do not).")
    factor = 2 ** (len(args.block_out_channels) - 1)
    if args.sample_size % factor:
        raise ValueError(f"{len(args.block_out_channels)} levels downsample by {factor}, which does not divide --sample_size {args.sample_size}.")
    if args.num_vq_embeddings < 2 or args.latent_channels < 1:
        raise ValueError("--num_vq_embeddings must be >= 2 and --latent_channels >= 1.")
    if args.quantize_after < 0 or args.quantize_after >= args.max_train_steps:
        raise ValueError(f"--quantize_after must be in [0, --max_train_steps) = [0, {args.max_train_steps}), got {args.quantize_after}.")
    if args.restart_dead_codes_every < 0 or args.num_eval_images < 2:
        raise ValueError("--restart_dead_codes_every must be >= 0 and --num_eval_images >= 2.")


def build_model(args) -> VQModel:
    levels = len(args.block_out_channels)
    return VQModel(
        in_channels=args.in_channels,
        out_channels=args.in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        latent_channels=args.latent_channels,
        sample_size=args.sample_size,
        num_vq_embeddings=args.num_vq_embeddings,
        norm_num_groups=args.norm_num_groups,
        mid_block_add_attention=args.mid_block_add_attention,
        scaling_factor=1.0,  # set from the data at the end
    )


def reconstruct(model: VQModel, images: torch.Tensor, quantize: bool = True):
    """(reconstruction, quantizer loss, code indices) of images in [-1, 1]; ``quantize=False`` skips the quantizer."""
    h = model.encode(images).latents
    if quantize:
        quant, vq_loss, (_, _, indices) = model.quantize(h)
    else:
        # Zero times the codebook keeps every parameter in the graph (distributed training needs no unused parameter).
        quant, vq_loss, indices = h, 0.0 * model.quantize.embedding.weight.sum(), None
    # decode(force_not_quantize=True) is the decoder alone: post_quant_conv, then the decoder.
    return model.decode(quant, force_not_quantize=True).sample, vq_loss, indices


class Reconstruction(torch.nn.Module):
    """The training forward pass as a module, so that accelerate's wrapper (DDP) sees every call."""

    def __init__(self, vqvae: VQModel):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, images: torch.Tensor, quantize: bool = True):
        return reconstruct(self.vqvae, images, quantize)


@torch.no_grad()
def encoder_outputs(model: VQModel, dataset, count: int, generator: torch.Generator, device) -> torch.Tensor:
    """Encoder outputs (pre-quantization latent vectors, one per latent pixel) of ``count`` random images."""
    index = torch.randint(len(dataset), (count,), generator=generator)
    images = torch.stack([dataset[int(i)]["images"] for i in index]).to(device)
    h = model.encode(images).latents
    return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])


@torch.no_grad()
def reset_codes(model: VQModel, codes: torch.Tensor, vectors: torch.Tensor, generator: torch.Generator) -> int:
    """Move the codebook entries ``codes`` (indices) onto random rows of ``vectors``; returns how many moved."""
    if codes.numel() == 0:
        return 0
    pick = torch.randint(vectors.shape[0], (codes.numel(),), generator=generator)
    model.quantize.embedding.weight.data[codes.to(model.quantize.embedding.weight.device)] = vectors[pick.to(vectors.device)].to(
        model.quantize.embedding.weight.dtype)
    return int(codes.numel())


@torch.no_grad()
def latent_std(model: VQModel, dataset, batch_size: int, device, max_images: int = 4096) -> float:
    """Standard deviation of the encoder's output (all channels and positions) over up to ``max_images`` images
    spread evenly over the data set (the built-in photos are ordered by photograph)."""
    pick = torch.linspace(0, len(dataset) - 1, min(len(dataset), max_images)).round().long().tolist()
    total, total_sq, n = 0.0, 0.0, 0
    for start in range(0, len(pick), batch_size):
        images = torch.stack([dataset[i]["images"] for i in pick[start:start + batch_size]]).to(device)
        h = model.encode(images).latents.double()
        total += float(h.sum())
        total_sq += float((h * h).sum())
        n += h.numel()
    mean = total / n
    return math.sqrt(max(total_sq / n - mean * mean, 1e-12))


@torch.no_grad()
def reconstruction_quality(model: VQModel, images: torch.Tensor, batch_size: int, device) -> dict:
    """PSNR (dB, images in [0, 1]) and SSIM of the reconstructions of ``images`` ([-1, 1]), with and without the
    quantizer, and how many codes the images use."""
    from diffusers_gfprune.evaluation import ssim_vs_teacher

    out = {}
    for name, quantize in (("quantized", True), ("unquantized", False)):
        recon, used = [], set()
        for chunk in images.split(batch_size):
            r, _, indices = reconstruct(model, chunk.to(device), quantize)
            recon.append(r.float().cpu())
            if indices is not None:
                used.update(indices.reshape(-1).tolist())
        recon = ((torch.cat(recon) + 1) / 2).clamp(0, 1)
        real = ((images + 1) / 2).clamp(0, 1)
        mse = ((recon.double() - real.double()) ** 2).flatten(1).mean(1)
        psnr = (10 * torch.log10(1.0 / mse.clamp_min(1e-12))).mean()
        out[name] = {"psnr_db": float(psnr), "ssim": ssim_vs_teacher(real, recon), "mse": float(mse.mean())}
        if quantize:
            out[name]["codes_used"] = len(used)
        out[name]["images"] = recon
    return out


def main(argv=None):
    args = parse_args(argv)
    check_arguments(args)
    data_config = data.DataConfig(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, train_data_dir=args.train_data_dir,
        image_column=args.image_column, resolution=args.resolution or args.sample_size, center_crop=args.center_crop,
        random_flip=args.random_flip, cache_dir=args.cache_dir, max_train_samples=args.max_train_samples,
    )
    data.validate_data_source(data_config, args.in_channels)
    accelerator = training.create_accelerator(args, split_batches=True)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)

    model = Reconstruction(build_model(args))
    optimizer = training.create_optimizer(model, args)
    dataset = data.load_train_dataset(data_config, args.in_channels)
    global_batch = args.train_batch_size * accelerator.num_processes
    dataloader = data.make_dataloader(dataset, global_batch, seed=args.seed, num_workers=args.dataloader_num_workers or 0)
    shuffle_generator = dataloader.generator
    lr_scheduler = training.create_lr_scheduler(optimizer, args, accelerator.num_processes)
    code_generator = torch.Generator().manual_seed(args.seed + 7)
    # Codes used since the last restart (a count per code), and the training wall time carried across resumes.
    state = {"usage": torch.zeros(args.num_vq_embeddings, dtype=torch.long), "wall_before": 0.0, "started": time.time(),
             "restarted_codes": 0}

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for m in models:
                accelerator.unwrap_model(m).vqvae.save_pretrained(os.path.join(output_dir, "vqvae"))
                weights.pop()
            meta = {"stage": "train", "wall_seconds": state["wall_before"] + time.time() - state["started"],
                    "restarted_codes": state["restarted_codes"]}
            training.save_extra_state(output_dir, {"usage": state["usage"], "code_generator": code_generator.get_state()}, meta)

    def load_hook(models, input_dir):
        for _ in range(len(models)):
            m = models.pop()
            accelerator.unwrap_model(m).vqvae.load_state_dict(VQModel.from_pretrained(input_dir, subfolder="vqvae").state_dict())
        tensors, meta = training.load_extra_state(input_dir)
        state["usage"] = tensors["usage"]
        code_generator.set_state(tensors["code_generator"])
        state["wall_before"] = float(meta.get("wall_seconds", 0.0))
        state["restarted_codes"] = int(meta.get("restarted_codes", 0))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    global_step = 0
    resume = training.resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume:
        accelerator.print(f"Resuming from {resume}")
        accelerator.load_state(resume)
        global_step = training.checkpoint_step(resume)

    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    progress = tqdm(total=args.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="train vq")
    started, first_step = time.time(), global_step
    history = []
    while global_step < args.max_train_steps:
        epoch, skip = divmod(global_step, steps_per_epoch)
        for batch in training.epoch_batches(dataloader, shuffle_generator, args.seed, epoch, skip * args.gradient_accumulation_steps, accelerator):
            unwrapped = accelerator.unwrap_model(model).vqvae
            quantize = global_step >= args.quantize_after
            if quantize and global_step == args.quantize_after:
                # The codebook starts on the latent space the plain autoencoder has learned.
                vectors = encoder_outputs(unwrapped, dataset, 256, code_generator, accelerator.device)
                reset_codes(unwrapped, torch.arange(args.num_vq_embeddings), vectors, code_generator)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    images = batch["images"]
                    recon, vq_loss, indices = model(images, quantize)
                    l1 = F.l1_loss(recon.float(), images.float())
                    loss = l1 + args.vq_loss_weight * vq_loss.float()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if indices is not None:
                state["usage"] += torch.bincount(indices.reshape(-1).cpu(), minlength=args.num_vq_embeddings)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if (quantize and args.restart_dead_codes_every and
                    (global_step - args.quantize_after) % args.restart_dead_codes_every == 0):
                dead = torch.nonzero(state["usage"] == 0).reshape(-1)
                if dead.numel():
                    vectors = encoder_outputs(unwrapped, dataset, 256, code_generator, accelerator.device)
                    state["restarted_codes"] += reset_codes(unwrapped, dead, vectors, code_generator)
                state["usage"].zero_()
            logs = {"loss": loss.detach().item(), "l1": l1.detach().item(), "vq_loss": float(vq_loss.detach()),
                    "lr": lr_scheduler.get_last_lr()[0]}
            history.append({"step": global_step, **{k: logs[k] for k in ("l1", "vq_loss")}})
            progress.update(1)
            progress.set_postfix(l1=f"{logs['l1']:.4f}", vq=f"{logs['vq_loss']:.4f}")
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                if accelerator.is_main_process:
                    training.make_room_for_checkpoint(args.output_dir, args.checkpoints_total_limit)
                accelerator.wait_for_everyone()
                accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{global_step}"))
            if global_step >= args.max_train_steps:
                break
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from diffusers_gfprune.sampling import comparison_grid

        vq = accelerator.unwrap_model(model).vqvae.eval()
        train_seconds = state["wall_before"] + time.time() - state["started"]
        std = latent_std(vq, dataset, 256, accelerator.device)
        vq.register_to_config(scaling_factor=1.0 / std)
        vq.save_pretrained(args.output_dir, safe_serialization=True)
        held_out = data.load_train_dataset(data_config, args.in_channels, split="test")
        count = min(args.num_eval_images, len(held_out))
        # An even spread over the held-out set (for photos: over every photograph).
        pick = torch.linspace(0, len(held_out) - 1, count).round().long()
        images = torch.stack([held_out[int(i)]["images"] for i in pick])
        quality = reconstruction_quality(vq, images, 256, accelerator.device)
        shown = torch.linspace(0, count - 1, 16).round().long()
        grid = comparison_grid([((images[shown] + 1) / 2).clamp(0, 1), quality["quantized"]["images"][shown]],
                               ["held-out", "reconstructed"], scale=3)
        grid.save(os.path.join(args.output_dir, "reconstructions.png"))
        summary = {
            "reconstruction": {name: {k: v for k, v in q.items() if k != "images"} for name, q in quality.items()},
            "held_out_images": count,
            "data": args.dataset_name or os.path.basename(os.path.normpath(args.train_data_dir)),
            "latent_shape": [args.latent_channels] + [args.sample_size // 2 ** (len(args.block_out_channels) - 1)] * 2,
            "scaling_factor": 1.0 / std,
            "latent_std_before_scaling": std,
            "codebook_size": args.num_vq_embeddings,
            "restarted_codes": state["restarted_codes"],
            "steps": global_step,
            "steps_this_invocation": global_step - first_step,
            "wall_seconds_this_invocation": time.time() - started,
            "wall_seconds_total": train_seconds,
            "num_parameters": sum(p.numel() for p in vq.parameters()),
            "final_l1": history[-1]["l1"] if history else None,
            "command": " ".join(training.portable_argv(sys.argv)),
        }
        training.write_json(summary, os.path.join(args.output_dir, "training_summary.json"))
        accelerator.print(json.dumps(summary["reconstruction"], indent=2))
    accelerator.end_training()


if __name__ == "__main__":
    main()
