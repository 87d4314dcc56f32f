#!/usr/bin/env python
"""FID of a shipped teacher next to real images, in its built-in data set's offline feature space.

Every row uses the same number of images against the same reference (all held-out images of the
data set, seed 0), in the shipped classifier's features of that data set (NOT Inception):

* ``teacher``: DDIM samples of the teacher (eta 0, noise seeded with ``--seed``);
* ``real held-out``: as many held-out crops made with another crop seed (photos only; other crops of
  the same held-out regions, not the reference's images);
* ``real training``: as many training images (the floor: what a perfect model of the training data
  gets at this sample count);
* a latent teacher (``LDMPipeline``) also gets ``real training through the autoencoder``: the same training
  images encoded and decoded by its autoencoder as the pipeline decodes (the floor of any UNet on its latents).

The teacher's pipeline kind comes from its ``model_index.json`` (:mod:`diffusers_gfprune.pipeline_kinds`): a
latent teacher is sampled in its latent space from seeded latent noise and decoded.

Writes a JSON file and a sample grid (teacher samples above real training images).

    python benchmarks/teacher_fid.py --teacher teachers/ddpm-photos --dataset_name photos \\
        --num_images 256 --num_inference_steps 50 --output_json docs/teacher_photos_fid.json \\
        --grid docs/images/teacher_photos_vs_real.png
    python benchmarks/teacher_fid.py --teacher teachers/ldm-photos --dataset_name photos \\
        --num_images 256 --num_inference_steps 50 --output_json docs/teacher_ldm_photos_fid.json \\
        --grid docs/images/teacher_ldm_photos_vs_real.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from diffusers import DDIMScheduler  # noqa: E402

from diffusers_gfprune import evaluation  # noqa: E402
from diffusers_gfprune.sampling import comparison_grid  # noqa: E402
from diffusers_gfprune.teacher import load_kind, load_teacher, resolve_teacher  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=str, required=True,
                        help="A local pipeline folder (DDPMPipeline, DDIMPipeline, PNDMPipeline or LDMPipeline).")
    parser.add_argument("--dataset_name", type=str, required=True, choices=sorted(evaluation.BUILTIN_FEATURE_EXTRACTORS))
    parser.add_argument("--num_images", type=int, default=256, help="Images per row.")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps (eta 0).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the teacher's initial noise.")
    parser.add_argument("--clip_sample", type=str, default="config", choices=["config", "on", "off"],
                        help="DDIM's x0 clipping: as the teacher's scheduler config says, or forced on / off (to choose the "
                             "config's value by FID; train_ddpm.py --no-clip_sample).")
    parser.add_argument("--output_json", type=str, default=None)
    parser.add_argument("--grid", type=str, default=None, help="PNG of 16 teacher samples above 16 real training images.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.num_images < 4:
        raise ValueError(f"--num_images must be at least 4 (KID subsets of 2), got {args.num_images}.")
    source = resolve_teacher(args.teacher)
    unet, _ = load_teacher(source)
    unet.eval()
    kind = load_kind(source)
    size = kind.image_shape(unet)[-1]  # of the images (a latent teacher's UNet works on smaller latents)
    name = args.dataset_name
    reference = evaluation.builtin_reference(name, "test", size)
    key = "fid_" + evaluation.FEATURE_EXTRACTORS[evaluation.BUILTIN_FEATURE_EXTRACTORS[name]].key

    started = time.time()
    noise = kind.initial_noise(unet, args.num_images, args.seed)
    clip = {"config": {}, "on": {"clip_sample": True}, "off": {"clip_sample": False}}[args.clip_sample]
    ddim = DDIMScheduler.from_config(kind.scheduler.config, **clip)
    from tqdm.auto import tqdm

    samples = torch.cat([kind.sample(unet, ddim, chunk, args.num_inference_steps) for chunk in tqdm(noise.split(64), desc="teacher samples")])
    sampling_seconds = time.time() - started

    train = evaluation.builtin_reference(name, "train", size, max_samples=args.num_images)
    rows = {"teacher": samples, "real training (floor)": train.images}
    if kind.frozen_components:  # the autoencoder's own floor: real images through encode and the pipeline's decoding
        real = train.images.float() / 127.5 - 1
        decoded = torch.cat([kind.decode(kind.encode(chunk)) for chunk in real.split(256)])
        rows["real training through the autoencoder"] = (decoded.float() / 2 + 0.5).clamp(0, 1)
    if name == "photos":
        from diffusers_gfprune.photos import PhotosDataset

        other = PhotosDataset("test", size, max_samples=args.num_images, seed=1)
        rows["real held-out (other crops)"] = torch.stack([other[i]["images"] for i in range(len(other))]).add(1).div(2)
    results = {}
    for row, images in rows.items():
        scores = evaluation.builtin_fid_kid(images, reference, name)
        results[row] = {"fid": scores[key], "kid_mean": scores[key.replace("fid_", "kid_") + "_mean"], "num_images": len(images)}
        print(f"{row:32s} FID {scores[key]:8.3f}   KID {results[row]['kid_mean']:.4f}   ({len(images)} images)")
    out = {
        "teacher": os.path.relpath(args.teacher) if not os.path.isabs(args.teacher) else os.path.basename(args.teacher),
        "dataset_name": name,
        "metric": evaluation.METRIC_DISPLAY_NAMES[key],
        "reference": f"{reference.name} (all held-out images)",
        "num_images": args.num_images,
        "pipeline": f"{kind.pipeline_class} ({kind.name})",
        "sampler": f"{kind.describe_sampler(args.num_inference_steps)}, clip_sample {ddim.config.clip_sample}, seed {args.seed}",
        "sampling_seconds": round(sampling_seconds, 1),
        "rows": results,
    }
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json + ".tmp", "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
        os.replace(args.output_json + ".tmp", args.output_json)
    if args.grid:
        real = train.images[torch.linspace(0, len(train) - 1, 16).round().long()].float() / 255.0
        comparison_grid([samples[:16], real], ["teacher", "real crops"], scale=4).save(args.grid)
    return out


if __name__ == "__main__":
    main()
