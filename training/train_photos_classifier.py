#!/usr/bin/env python
"""Train the small photos classifier used by the evaluation, and save it as safetensors + config.json.

Trains :class:`diffusers_gfprune.photos_classifier.PhotosClassifier` on the training crops of the
built-in ``photos`` (14,336 crops of the first 70% of seven photographs) to predict the labels the
data set defines: which photograph and which scale bin a crop comes from (21 classes). Augmentation:
random shifts of up to ``--max_shift`` pixels (reflection-padded) and horizontal flips. The accuracy
is measured on the held-out crops (1,792 crops of the last 30% of every photograph, no pixel shared
with the training crops). After training, the penultimate features are rescaled (exactly, without
changing the logits) to a root-mean-square of 1 on the training crops, the scale FID and KID are made
for.

The weights are saved to ``--output_dir`` (default: the package's assets folder, where
``load_photos_classifier()`` finds them) with the exact command, the accuracies and the training time
in ``config.json``.

    python training/train_photos_classifier.py --seed 0 --epochs 6
"""

import argparse
import json
import os
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusers_gfprune import photos
from diffusers_gfprune.photos_classifier import ASSETS_DIR, CONFIG_NAME, WEIGHTS_NAME, PhotosClassifier

RESOLUTION = 32


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=str, default=ASSETS_DIR,
                        help="Where to write model.safetensors and config.json (default: the package's assets folder).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initialisation, shuffling and augmentation.")
    parser.add_argument("--epochs", type=int, default=6, help="Passes over the training crops.")
    parser.add_argument("--batch_size", type=int, default=128, help="Crops per batch.")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="Peak AdamW learning rate (one-cycle).")
    parser.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay.")
    parser.add_argument("--max_shift", type=int, default=2, help="Largest random shift, in pixels, per axis.")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    return parser.parse_args(argv)


def load_split(split: str):
    crops = photos.photo_crops(split, RESOLUTION)
    return photos.photo_tensors(split, RESOLUTION), torch.from_numpy(crops.labels.copy())


def augment(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each crop by up to ``max_shift`` pixels per axis (reflection padding) and flip half of them."""
    n, _, h, w = images.shape
    if max_shift > 0:
        padded = F.pad(images, (max_shift,) * 4, mode="reflect")
        offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
        images = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


@torch.no_grad()
def normalize_features(model: PhotosClassifier, images: torch.Tensor) -> float:
    """Rescale the penultimate features to RMS 1 on ``images``; an exact reparametrisation (ReLU is
    positively homogeneous), so the logits are unchanged. Returns the factor."""
    model.eval()
    features = torch.cat([model.features(images[i:i + 1024]) for i in range(0, len(images), 1024)])
    scale = 1.0 / float(features.pow(2).mean().sqrt())
    model.fc.weight.mul_(scale)
    model.fc.bias.mul_(scale)
    model.head.weight.div_(scale)
    return scale


@torch.no_grad()
def predictions(model: PhotosClassifier, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i:i + 1024]).argmax(1) for i in range(0, len(images), 1024)])


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    train_x, train_y = load_split("train")
    test_x, test_y = load_split("test")
    model = PhotosClassifier(resolution=RESOLUTION)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    steps_per_epoch = (len(train_y) + args.batch_size - 1) // args.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.learning_rate, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
    )

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        total, count = 0.0, 0
        for i in tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
            index = order[i:i + args.batch_size]
            loss = F.cross_entropy(model(augment(train_x[index], args.max_shift, generator)), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(index)
            count += len(index)
        test_acc = float((predictions(model, test_x) == test_y).float().mean())
        print(f"epoch {epoch + 1:3d}/{args.epochs}: loss {total / count:.4f}, held-out accuracy {test_acc:.4f}", flush=True)
    train_seconds = time.perf_counter() - start

    feature_scale = normalize_features(model, train_x)
    test_pred, train_pred = predictions(model, test_x), predictions(model, train_x)
    test_accuracy = float((test_pred == test_y).float().mean())
    train_accuracy = float((train_pred == train_y).float().mean())
    # The two halves of the label separately: which photograph, which scale bin.
    bins = photos.NUM_SCALE_BINS
    photo_accuracy = float((test_pred // bins == test_y // bins).float().mean())
    scale_accuracy = float((test_pred % bins == test_y % bins).float().mean())

    command_args = [] if os.path.abspath(args.output_dir) == os.path.abspath(ASSETS_DIR) else ["--output_dir", args.output_dir]
    command_args += ["--seed", str(args.seed), "--epochs", str(args.epochs)]
    defaults = parse_args([])
    for name in ("batch_size", "learning_rate", "weight_decay", "max_shift"):
        if getattr(args, name) != getattr(defaults, name):
            command_args += [f"--{name}", str(getattr(args, name))]
    command = "python training/train_photos_classifier.py " + " ".join(shlex.quote(a) for a in command_args)

    from safetensors.torch import save_file

    os.makedirs(args.output_dir, exist_ok=True)
    model.eval()
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    weights_path = os.path.join(args.output_dir, WEIGHTS_NAME)
    save_file(state, weights_path, metadata={"format": "pt"})
    os.chmod(weights_path, 0o644)  # safetensors writes through a private temporary file
    config = dict(model.config)
    config["training"] = {
        "command": command,
        "data": "built-in photos, train split (14,336 crops of the first 70% of seven photographs), resolution 32",
        "labels": "photograph x scale bin (21 classes), as diffusers_gfprune.photos defines them",
        "augmentation": f"random shifts up to {args.max_shift} px (reflection padding), horizontal flips",
        "seed": args.seed,
        "epochs": args.epochs,
        "train_accuracy": round(train_accuracy, 4),
        "test_accuracy": round(test_accuracy, 4),
        "test_photograph_accuracy": round(photo_accuracy, 4),
        "test_scale_bin_accuracy": round(scale_accuracy, 4),
        "test_split": "1,792 held-out crops (last 30% of every photograph, no pixel shared with the training crops)",
        "feature_scale": feature_scale,
        "feature_normalization": "penultimate features rescaled to RMS 1 on the (unaugmented) train split",
        "train_seconds": round(train_seconds, 1),
        "torch_version": torch.__version__,
    }
    tmp = os.path.join(args.output_dir, CONFIG_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(args.output_dir, CONFIG_NAME))

    print(f"train accuracy {train_accuracy:.4f}, HELD-OUT accuracy {test_accuracy:.4f} "
          f"(photograph {photo_accuracy:.4f}, scale bin {scale_accuracy:.4f}; 1,792 held-out crops)")
    print(f"trained in {train_seconds:.1f} s; saved to {args.output_dir}")
    print(f"command: {command}")
    return config


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
