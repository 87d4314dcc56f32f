#!/usr/bin/env python
"""Train the small digits classifier used by the evaluation, and save it as safetensors + config.json.

Trains :class:`diffusers_gfprune.digits_classifier.DigitsClassifier` on the TRAIN split of the
built-in digits (first 1500 images) at resolution 16, with small random shifts (up to
``--max_shift`` pixels, background-padded) as augmentation, and reports the accuracy on the
held-out TEST split (last 297 images). The images go through the same uint8 round trip and
conversion as generated images do at evaluation time (``to_classifier_input``). After training, the
penultimate features are rescaled (exactly, without changing the logits) to a root-mean-square of 1
on the training images, the scale FID and KID are made for.

With ``--outlier_weight > 0`` (the default) every batch also holds as many "junk" images (uniform
noise, Gaussian noise, smoothed noise blobs, flat gray or black images) whose target is the uniform
distribution over the ten digits (outlier exposure, Hendrycks et al. 2019), so that the classifier
is NOT confident on images that are not digits; ``digits_accuracy`` relies on that confidence to
count recognized digits. Junk of other kinds (e.g. sparse salt noise) can still be recognized now
and then: the "recognized" fraction is a sanity check, not a proof.

The weights are saved to ``--output_dir`` (default: the package's assets folder, where
``load_digits_classifier()`` finds them), together with the exact command, the test accuracy and
the training time in ``config.json``.

    python training/train_digits_classifier.py --seed 0 --epochs 30
"""

import argparse
import json
import os
import shlex
import sys
import time

import torch
import torch.nn.functional as F

from diffusers_gfprune.data import DigitsDataset
from diffusers_gfprune.digits_classifier import (
    ASSETS_DIR,
    CONFIG_NAME,
    WEIGHTS_NAME,
    DigitsClassifier,
    to_classifier_input,
)

RESOLUTION = 16


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=str, default=ASSETS_DIR,
                        help="Where to write model.safetensors and config.json (default: the package's assets folder).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initialisation, shuffling and augmentation.")
    parser.add_argument("--epochs", type=int, default=30, help="Passes over the 1500 training images.")
    parser.add_argument("--batch_size", type=int, default=64, help="Digits per batch.")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="Peak AdamW learning rate (cosine decay).")
    parser.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay.")
    parser.add_argument("--max_shift", type=int, default=2, help="Largest random shift, in pixels, per axis.")
    parser.add_argument("--outlier_weight", type=float, default=0.5,
                        help="Weight of the outlier-exposure loss on junk images (0 disables it).")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    return parser.parse_args(argv)


def as_evaluated(images_m11: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 -> classifier input: the exact path generated images take at evaluation."""
    uint8 = ((images_m11 + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return to_classifier_input(uint8, RESOLUTION)


def load_split(split: str):
    dataset = DigitsDataset(split=split, resolution=RESOLUTION)
    images = torch.stack([dataset[i]["images"] for i in range(len(dataset))])
    labels = torch.stack([dataset[i]["labels"] for i in range(len(dataset))])
    return as_evaluated(images), labels


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels per axis, filling with the background (-1)."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def junk_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """Images that are not digits, in the classifier's input range [-1, 1].

    Four kinds, equally likely: uniform noise, Gaussian noise (clipped), smoothed noise blobs, and
    flat images of one random gray level (a third of them exactly black, the digits' background),
    the output of a collapsed model.
    """
    shape = (n, 1, RESOLUTION, RESOLUTION)
    kind = torch.randint(0, 4, (n, 1, 1, 1), generator=generator)
    uniform = torch.rand(shape, generator=generator)
    gauss = (0.5 + 0.3 * torch.randn(shape, generator=generator)).clamp(0, 1)
    coarse = torch.rand(n, 1, 4, 4, generator=generator)
    blobs = F.interpolate(coarse, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    level = torch.rand(n, 1, 1, 1, generator=generator) * (torch.rand(n, 1, 1, 1, generator=generator) > 1 / 3)
    flat = level.expand(shape)
    x = torch.where(kind == 0, uniform, torch.where(kind == 1, gauss, torch.where(kind == 2, blobs, flat)))
    return as_evaluated(x * 2.0 - 1.0)


@torch.no_grad()
def normalize_features(model: DigitsClassifier, images: torch.Tensor) -> float:
    """Rescale the penultimate features to a root-mean-square of 1 on ``images``; logits are unchanged.

    ReLU commutes with a positive factor, so multiplying the feature layer by ``s`` and dividing the
    head's weights by ``s`` is an exact reparametrisation. It puts the features on the scale KID's
    polynomial kernel ``(x.y / d + 1) ** 3`` is made for (Inception's pool features are O(1) too)
    and makes FID values of a few units meaningful. Returns ``s``.
    """
    model.eval()
    features = model.features(images)
    scale = 1.0 / float(features.pow(2).mean().sqrt())
    model.fc.weight.mul_(scale)
    model.fc.bias.mul_(scale)
    model.head.weight.div_(scale)
    return scale


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    train_x, train_y = load_split("train")
    test_x, test_y = load_split("test")
    model = DigitsClassifier(resolution=RESOLUTION)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    steps_per_epoch = (len(train_y) + args.batch_size - 1) // args.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.learning_rate, total_steps=args.epochs * steps_per_epoch, pct_start=0.1
    )

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        total, count = 0.0, 0
        for i in range(0, len(order), args.batch_size):
            index = order[i:i + args.batch_size]
            x = random_shift(train_x[index], args.max_shift, generator)
            loss = F.cross_entropy(model(x), train_y[index])
            if args.outlier_weight > 0:
                junk_logits = model(junk_images(len(index), generator))
                # Cross-entropy to the uniform distribution over the classes.
                loss = loss + args.outlier_weight * (-F.log_softmax(junk_logits, dim=1).mean(dim=1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss) * len(index)
            count += len(index)
        if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1:3d}/{args.epochs}: loss {total / count:.4f}, "
                  f"test accuracy {accuracy(model, test_x, test_y):.4f}", flush=True)
    train_seconds = time.perf_counter() - start

    feature_scale = normalize_features(model, train_x)
    test_accuracy = accuracy(model, test_x, test_y)
    train_accuracy = accuracy(model, train_x, train_y)
    with torch.no_grad():
        noise_conf = F.softmax(model(junk_images(1000, torch.Generator().manual_seed(12345))), 1).max(1).values
    command_args = [] if os.path.abspath(args.output_dir) == os.path.abspath(ASSETS_DIR) else ["--output_dir", args.output_dir]
    command_args += ["--seed", str(args.seed), "--epochs", str(args.epochs)]
    defaults = parse_args([])
    for name in ("batch_size", "learning_rate", "weight_decay", "max_shift", "outlier_weight"):
        if getattr(args, name) != getattr(defaults, name):
            command_args += [f"--{name}", str(getattr(args, name))]
    command = "python training/train_digits_classifier.py " + " ".join(shlex.quote(a) for a in command_args)

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
        "data": "built-in digits (scikit-learn load_digits), train split = first 1500 images, resolution 16",
        "augmentation": f"random shifts up to {args.max_shift} px; outlier exposure weight {args.outlier_weight}",
        "seed": args.seed,
        "epochs": args.epochs,
        "train_accuracy": round(train_accuracy, 4),
        "test_accuracy": round(test_accuracy, 4),
        "test_split": "last 297 images (indices 1500..1796)",
        "junk_mean_max_probability": round(float(noise_conf.mean()), 4),
        "feature_scale": feature_scale,
        "feature_normalization": "penultimate features rescaled to RMS 1 on the (unaugmented) train split",
        "train_seconds": round(train_seconds, 1),
        "torch_version": torch.__version__,
    }
    with open(os.path.join(args.output_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")

    print(f"train accuracy {train_accuracy:.4f}, TEST accuracy {test_accuracy:.4f} (297 held-out digits)")
    print(f"mean max-probability on junk images: {float(noise_conf.mean()):.3f}")
    print(f"trained in {train_seconds:.1f} s; saved to {args.output_dir}")
    print(f"command: {command}")
    return config


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
