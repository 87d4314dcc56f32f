"""The built-in ``photos`` data set: 32x32 colour crops of the real photographs shipped with scikit-image.

scikit-image's wheel ships a few colour photographs inside the package (``skimage/data``), so this
data set works offline. Seven of them are used, each with a licence that allows it
(:data:`PHOTOGRAPHS` lists their sources and licences; docs/teacher.md repeats the table). The
Middlebury stereo pair (``motorcycle_left/right``) is left out: scikit-image states no licence for
it. The synthetic images (``color``, ``logo``, ``chessboard``, ``phantom``, ``horse``) are not
photographs.

Crops
-----
Every photograph is cut in two along its longer side: the first 70% is the *training region*,
the last 30% the *held-out region*. Training crops lie entirely inside the training region,
held-out crops entirely inside the held-out region, so the two splits share no pixel. A crop is a
square of side ``s`` drawn log-uniformly in [32, 128] pixels at a uniform random position inside
its region, resized to ``resolution`` (antialiased bicubic, PIL) and flipped horizontally with
probability 0.5. Everything is drawn from ``numpy.random.default_rng([seed, photo, split])``, so the
crops are the same on every machine for a given seed.

Labels
------
Each crop is labelled with the photograph it comes from and the *scale bin* of its side: bin 0
for s in [32, 51), 1 for [51, 81), 2 for [81, 128] (a third of the log range each, so about a
third of the crops). ``label = photo * NUM_SCALE_BINS + scale_bin`` (21 classes); the photos
classifier learns them (:mod:`diffusers_gfprune.photos_classifier`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

DATASET_NAME = "photos"


@dataclass(frozen=True)
class Photograph:
    """One photograph of the data set: the file in ``skimage/data``, where it comes from, its licence."""

    name: str
    filename: str
    source: str
    licence: str


PHOTOGRAPHS = (
    Photograph("astronaut", "astronaut.png", "NASA Great Images database (Eileen Collins)",
               "no known copyright restrictions, public domain"),
    Photograph("chelsea", "chelsea.png", "Stefan van der Walt (Chelsea the cat)", "CC0"),
    Photograph("coffee", "coffee.png", "Rachel Michetti, courtesy of Pikolo Espresso Bar", "CC0"),
    Photograph("hubble_deep_field", "hubble_deep_field.jpg", "NASA / HubbleSite (Hubble eXtreme Deep Field)",
               "public domain (NASA media guidelines)"),
    Photograph("ihc", "ihc.png", "Center for Microscopy And Molecular Imaging (immunohistochemistry)",
               "no known copyright restrictions"),
    Photograph("retina", "retina.jpg", "Mikael Haggstrom, Wikimedia Commons (fundus photograph)", "CC0 1.0"),
    Photograph("rocket", "rocket.jpg", "SpaceX (DSCOVR launch on Falcon 9)", "public domain"),
)

SPLITS = ("train", "test")
"""``"train"``: crops of the training regions; ``"test"``: crops of the held-out regions."""

NUM_CROPS = {"train": 2048, "test": 256}
"""Crops per photograph and split (14,336 training and 1,792 held-out crops in all)."""

HELD_OUT_FRACTION = 0.3
"""The last 30% of every photograph along its longer side is held out."""

MIN_SIDE, MAX_SIDE = 32, 128
"""Crop sides (in pixels of the photograph) are drawn log-uniformly in this range."""

SCALE_BIN_EDGES = (51, 81)
"""Lower edges of scale bins 1 and 2 (32 * 4 ** (1/3) and 32 * 4 ** (2/3), rounded); bin 2 ends at 128."""

NUM_SCALE_BINS = len(SCALE_BIN_EDGES) + 1
NUM_CLASSES = len(PHOTOGRAPHS) * NUM_SCALE_BINS
DEFAULT_RESOLUTION = 32


def _data_dir() -> str:
    try:
        import skimage
    except ImportError as err:  # pragma: no cover - scikit-image is a dependency
        raise ImportError(
            "The built-in 'photos' data set reads the photographs shipped with scikit-image; install it "
            "with `pip install scikit-image==0.26.0`."
        ) from err
    return os.path.join(os.path.dirname(skimage.__file__), "data")


@functools.lru_cache(maxsize=None)
def load_photograph(index: int) -> np.ndarray:
    """Photograph ``index`` of :data:`PHOTOGRAPHS` as a read-only ``uint8`` array (H, W, 3), read offline."""
    from PIL import Image

    path = os.path.join(_data_dir(), PHOTOGRAPHS[index].filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"The photograph {PHOTOGRAPHS[index].filename!r} is not in scikit-image's data folder; the "
            f"'photos' data set needs the files of the scikit-image wheel. Reinstall it with "
            f"`pip install --force-reinstall scikit-image==0.26.0`."
        )
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB")).copy()
    array.flags.writeable = False
    return array


def split_region(shape: tuple[int, int], split: str) -> tuple[int, int, int, int]:
    """The region ``(top, left, height, width)`` of a photograph of ``shape`` (H, W) that ``split`` crops from.

    The cut runs across the longer side: the training region is its first
    ``1 - HELD_OUT_FRACTION``, the held-out (``"test"``) region the rest.
    """
    check_split(split)
    height, width = shape
    along_width = width >= height
    length = width if along_width else height
    cut = int(round(length * (1.0 - HELD_OUT_FRACTION)))
    start, size = (0, cut) if split == "train" else (cut, length - cut)
    if along_width:
        return 0, start, height, size
    return start, 0, size, width


def scale_bin(side) -> np.ndarray:
    """The scale bin (0, 1 or 2) of crop sides ``side`` (pixels of the photograph)."""
    return np.searchsorted(np.asarray(SCALE_BIN_EDGES), np.asarray(side), side="right")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(
            f"The built-in 'photos' data set has no split {split!r}; use 'train' (crops of the first "
            f"{1 - HELD_OUT_FRACTION:.0%} of every photograph) or 'test' (crops of the held-out last "
            f"{HELD_OUT_FRACTION:.0%})."
        )


@dataclass(frozen=True)
class Crops:
    """The crops of one split: ``images`` uint8 (N, 3, R, R), ``photo`` and ``scale_bin`` int64 (N,),
    and where each came from (``boxes`` int64 (N, 4): top, left, side, flipped)."""

    images: np.ndarray
    photo: np.ndarray
    scale_bin: np.ndarray
    boxes: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        """``photo * NUM_SCALE_BINS + scale_bin``, the classes of the photos classifier."""
        return self.photo * NUM_SCALE_BINS + self.scale_bin


@functools.lru_cache(maxsize=4)
def photo_crops(split: str = "train", resolution: int = DEFAULT_RESOLUTION, seed: int = 0) -> Crops:
    """All crops of one split, made deterministically from ``seed`` (cached; the arrays are read-only).

    Parameters
    ----------
    split : str
        ``"train"`` or ``"test"`` (the held-out regions).
    resolution : int
        Side of the returned crops (the model's ``sample_size``), at least 8.
    seed : int
        Seed of the crop positions, sizes and flips.

    Returns
    -------
    Crops
    """
    from PIL import Image

    check_split(split)
    resolution = int(resolution)
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 for the 'photos' data set, got {resolution}.")
    images, photos, boxes = [], [], []
    for index in range(len(PHOTOGRAPHS)):
        photo = load_photograph(index)
        top, left, height, width = split_region(photo.shape[:2], split)
        rng = np.random.default_rng([int(seed), index, SPLITS.index(split)])
        count = NUM_CROPS[split]
        max_side = min(MAX_SIDE, height, width)
        sides = np.exp(rng.uniform(np.log(MIN_SIDE), np.log(max_side), size=count))
        sides = np.clip(np.round(sides).astype(np.int64), MIN_SIDE, max_side)
        ys = top + (rng.random(count) * (height - sides + 1)).astype(np.int64)
        xs = left + (rng.random(count) * (width - sides + 1)).astype(np.int64)
        flips = rng.random(count) < 0.5
        for y, x, side, flip in zip(ys, xs, sides, flips):
            crop = Image.fromarray(photo[y:y + side, x:x + side])
            crop = np.asarray(crop.resize((resolution, resolution), Image.Resampling.BICUBIC))
            if flip:
                crop = crop[:, ::-1]
            images.append(crop.transpose(2, 0, 1))
        photos.append(np.full(count, index, dtype=np.int64))
        boxes.append(np.stack([ys, xs, sides, flips.astype(np.int64)], axis=1))
    photo_index = np.concatenate(photos)
    box_array = np.concatenate(boxes).astype(np.int64)
    crops = Crops(
        images=np.ascontiguousarray(np.stack(images)),
        photo=photo_index,
        scale_bin=scale_bin(box_array[:, 2]).astype(np.int64),
        boxes=box_array,
    )
    for array in (crops.images, crops.photo, crops.scale_bin, crops.boxes):
        array.flags.writeable = False
    return crops


def photo_tensors(split: str = "test", resolution: int = DEFAULT_RESOLUTION, seed: int = 0) -> torch.Tensor:
    """The crops of one split as a float tensor (N, 3, R, R) in [-1, 1]."""
    images = torch.from_numpy(np.array(photo_crops(split, resolution, seed).images))
    return images.to(torch.float32) / 127.5 - 1.0


class PhotosDataset(Dataset):
    """The built-in photos as 3-channel images in [-1, 1].

    Items are ``{"images": FloatTensor (3, R, R), "labels": LongTensor ()}`` with the label
    ``photo * NUM_SCALE_BINS + scale_bin``. ``random_flip`` flips again with probability 0.5,
    drawing from torch's global generator (the crops are already flipped at random).
    """

    num_channels = 3
    native_mode = "RGB"

    def __init__(self, split: str = "train", resolution: int = DEFAULT_RESOLUTION, random_flip: bool = False,
                 max_samples: Optional[int] = None, seed: int = 0):
        crops = photo_crops(split, resolution, seed)
        images, labels = crops.images, crops.labels
        if max_samples is not None:
            # An even spread over the photographs, not the first photograph's crops only.
            keep = np.linspace(0, len(labels) - 1, num=min(int(max_samples), len(labels))).round().astype(np.int64)
            images, labels = images[keep], labels[keep]
        self.split = split
        self.resolution = int(resolution)
        self.random_flip = bool(random_flip)
        self._images = torch.from_numpy(np.array(images))
        self._labels = torch.from_numpy(np.array(labels))

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict:
        image = self._images[index].to(torch.float32) / 127.5 - 1.0
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"images": image, "labels": self._labels[index].clone()}
