"""Training data for the scripts: the built-in ``digits``, a Hub data set, or a local image folder.

The three sources share one option, as in diffusers' ``train_unconditional.py``:

* ``dataset_name="digits"`` selects the built-in data set: scikit-learn's ``load_digits()``
  (1797 grayscale 8x8 images of the digits 0..9, pixel values 0..16). It ships inside
  scikit-learn, so it works offline. This name shadows a Hub data set or a local directory
  called exactly ``digits``; pass such a directory as ``./digits`` instead (Hub data sets are
  normally named ``owner/name`` and are not affected).
* ``dataset_name="photos"`` selects the built-in colour data set: 32x32 crops of seven real
  photographs shipped with scikit-image (offline); see :mod:`diffusers_gfprune.photos`. Its
  splits are ``"train"`` and ``"test"`` (crops of held-out regions of every photograph).
* any other ``dataset_name`` goes to ``datasets.load_dataset(dataset_name, dataset_config_name,
  cache_dir=..., split=...)``: a Hub data set, or a local directory/file in a format that
  ``load_dataset`` reads (for instance a folder of parquet files).
* ``train_data_dir`` loads a local folder of images with ``datasets.load_dataset("imagefolder",
  data_dir=train_data_dir)``; its image column is always ``"image"`` (and ``"label"`` when the
  images sit in one sub-folder per class).

Every item of the returned data set is a dict ``{"images": FloatTensor (C, R, R) in [-1, 1]}``,
plus ``"labels"`` (a ``torch.long`` scalar) when labels are known: always for the digits, and
for the other sources when ``label_column`` is set.

Channels follow the model: the native channel count of the data is decided from its FIRST image
(modes ``1``/``L``/``LA``/``I``/``F``/``I;16`` -> 1 channel, ``RGB``/``RGBA``/``P``/``CMYK``/
``YCbCr`` -> 3 channels). It must equal the model's ``in_channels``; every image is then
converted to the model's mode (``"L"`` or ``"RGB"``), so a stray image of another mode later in
the data does not break a batch.

Call :func:`validate_data_source` first: it finds configuration mistakes (no source, two
sources, an empty folder, a missing column, a bad resolution, a channel mismatch for the
digits) before a script spends time loading or pruning a model.
"""

from __future__ import annotations

import functools
import numbers
import os
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import photos

BUILTIN_DATASETS = ("digits", "photos")

DIGITS_NUM_IMAGES = 1797
"""Number of images in scikit-learn's ``load_digits()``."""

DIGITS_NUM_TEST = 297
"""The digits' test split is the LAST ``DIGITS_NUM_TEST`` images (indices 1500..1796)."""

DIGITS_SPLITS = ("train", "test", "all")

DIGITS_MAX_VALUE = 16
"""Pixel values of the digits run from 0 to 16."""

MIN_RESOLUTION = 8

# Native PIL modes, by the number of channels they stand for.
ONE_CHANNEL_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")
THREE_CHANNEL_MODES = ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr")
MODEL_MODES = {1: "L", 3: "RGB"}

# Used when datasets' own list of image extensions cannot be imported.
_FALLBACK_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class DataConfig:
    """Where the training images come from and how they are prepared.

    Give exactly one source: ``dataset_name`` (``"digits"``, a Hub data set ``owner/name``, or a
    local path that ``datasets.load_dataset`` reads) or ``train_data_dir`` (a folder of images).
    The fields mirror the arguments of diffusers' ``train_unconditional.py``.
    """

    dataset_name: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "The data set to train on: 'digits' for the built-in scikit-learn digits (1797 "
                "grayscale 8x8 images, 1 channel, works offline), or the name of a Hub data set "
                "('owner/name'), or a local path that datasets.load_dataset reads (e.g. a folder "
                "of parquet files). 'digits' shadows a Hub data set or local folder of exactly "
                "that name; write a local folder as './digits'. Use train_data_dir instead for a "
                "plain folder of image files."
            )
        },
    )
    dataset_config_name: Optional[str] = field(
        default=None,
        metadata={"help": "The configuration of the Hub data set, if it has several. Leave unset for 'digits'."},
    )
    train_data_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "A local folder of images, loaded with datasets' 'imagefolder' builder (sub-folders "
                "per class give a 'label' column). Ignored unless dataset_name is unset; giving "
                "both is an error."
            )
        },
    )
    image_column: str = field(
        default="image",
        metadata={"help": "The column of the data set that holds the images. Always 'image' for train_data_dir; unused for 'digits'."},
    )
    label_column: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "An integer (or ClassLabel) column to return as 'labels' with each image. Optional; "
                "the digits always return their labels (leave this unset or 'label' for them)."
            )
        },
    )
    resolution: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Side length of the square training images, at least 8; use the model's "
                "config.sample_size. Images are resized (shorter side) to it, then cropped; the "
                "8x8 digits are upscaled to it (bilinear)."
            )
        },
    )
    center_crop: bool = field(
        default=False,
        metadata={"help": "Crop the center of each resized image; otherwise crop at a random position."},
    )
    random_flip: bool = field(
        default=False,
        metadata={"help": "Flip each image horizontally with probability 0.5 (the digits too, if set)."},
    )
    cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where datasets stores downloaded and prepared data sets (default: the Hugging Face cache)."},
    )
    max_train_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Keep only the first N examples of the loaded split (for quick runs and debugging)."},
    )


# --------------------------------------------------------------------------------------------
# The built-in digits
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)  # exact: the values are the integers 0..16
    labels = digits.target.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def digits_split_indices(split: str = "train") -> np.ndarray:
    """Indices into ``load_digits()`` of one split of the digits.

    The split is fixed, with no random numbers involved, so it is the same on every machine
    and with every numpy version: ``"test"`` is the last ``DIGITS_NUM_TEST`` = 297 images
    (indices 1500..1796, 27 to 33 of each digit), ``"train"`` the first 1500, ``"all"`` all 1797.

    Parameters
    ----------
    split : str
        ``"train"``, ``"test"`` or ``"all"``.

    Returns
    -------
    numpy.ndarray
        Sorted ``int64`` indices.
    """
    num_train = DIGITS_NUM_IMAGES - DIGITS_NUM_TEST
    if split == "train":
        return np.arange(num_train, dtype=np.int64)
    if split == "test":
        return np.arange(num_train, DIGITS_NUM_IMAGES, dtype=np.int64)
    if split == "all":
        return np.arange(DIGITS_NUM_IMAGES, dtype=np.int64)
    raise ValueError(
        f"The built-in 'digits' data set has no split {split!r}; use one of {DIGITS_SPLITS} "
        f"('test' is the last {DIGITS_NUM_TEST} images, 'train' the other {num_train})."
    )


def digits_arrays(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The raw digits of one split, for modules that need them without the diffusion transforms.

    Parameters
    ----------
    split : str
        ``"train"``, ``"test"`` or ``"all"``; see :func:`digits_split_indices`.

    Returns
    -------
    images : numpy.ndarray
        ``uint8`` array of shape (N, 8, 8) with values 0..16 (a fresh, writable copy).
    labels : numpy.ndarray
        ``int64`` array of shape (N,) with the digits 0..9.
    """
    index = digits_split_indices(split)
    images, labels = _load_digits()
    return images[index].copy(), labels[index].copy()


class DigitsDataset(Dataset):
    """The built-in digits as 1-channel images in [-1, 1], upscaled lazily per item.

    Items are ``{"images": FloatTensor (1, R, R), "labels": LongTensor ()}``. Values 0..16 map
    linearly to [-1, 1]; the 8x8 image is upscaled to ``resolution`` with bilinear
    interpolation (antialiased, ``align_corners=False``), so ``resolution=8`` gives the digits
    unchanged. ``random_flip`` draws from torch's global random generator, as torchvision's
    ``RandomHorizontalFlip`` does.
    """

    num_channels = 1
    native_mode = "L"

    def __init__(self, split: str = "train", resolution: int = 16, random_flip: bool = False,
                 max_samples: Optional[int] = None):
        images, labels = digits_arrays(split)
        if max_samples is not None:
            images, labels = images[:max_samples], labels[:max_samples]
        self.split = split
        self.resolution = int(resolution)
        self.random_flip = bool(random_flip)
        self._images = torch.from_numpy(images)
        self._labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict:
        image = self._images[index].to(torch.float32) * (2.0 / DIGITS_MAX_VALUE) - 1.0
        image = image[None, None]
        if self.resolution != image.shape[-1]:
            size = (self.resolution, self.resolution)
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
        image = image[0].clamp_(-1.0, 1.0)
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"images": image, "labels": self._labels[index].clone()}


# --------------------------------------------------------------------------------------------
# Hub data sets and image folders
# --------------------------------------------------------------------------------------------


def native_channels(mode: str) -> int:
    """The channel count that a PIL image mode stands for: 1 (grayscale) or 3 (color).

    Raises
    ------
    ValueError
        For a mode that is neither, naming it and the fix.
    """
    if mode in ONE_CHANNEL_MODES:
        return 1
    if mode in THREE_CHANNEL_MODES:
        return 3
    raise ValueError(
        f"Cannot tell whether images of PIL mode {mode!r} are grayscale or color. Convert the "
        f"images to 'L' (grayscale) or 'RGB' (color) first; known modes: "
        f"{ONE_CHANNEL_MODES} (1 channel) and {THREE_CHANNEL_MODES} (3 channels)."
    )


def convert_image(image, mode: str):
    """Convert a PIL image to ``mode`` (``"L"`` or ``"RGB"``).

    16-bit grayscale (``I;16*``) is scaled from 0..65535 to 0..255 first; PIL's own conversion
    would clip it to 255. Other modes use ``PIL.Image.convert`` (which clips ``I`` and ``F``
    values to 0..255 and drops alpha).
    """
    from PIL import Image

    if image.mode == mode:
        return image
    if image.mode.startswith("I;16"):
        array = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.round(array / 257.0).clip(0, 255).astype(np.uint8), mode="L")
        if mode == "L":
            return image
    return image.convert(mode)


class _ImageTransform:
    """The batch transform given to ``datasets.Dataset.with_transform`` (picklable for workers)."""

    def __init__(self, image_column: str, label_column: Optional[str], mode: str, resolution: int,
                 center_crop: bool, random_flip: bool):
        from torchvision import transforms

        self.image_column = image_column
        self.label_column = label_column
        self.mode = mode
        steps = [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
        ]
        if random_flip:
            steps.append(transforms.RandomHorizontalFlip())
        steps += [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
        self.augment = transforms.Compose(steps)

    def __call__(self, batch: dict) -> dict:
        out = {"images": [self.augment(convert_image(image, self.mode)) for image in batch[self.image_column]]}
        if self.label_column is not None:
            out["labels"] = [torch.tensor(int(label), dtype=torch.long) for label in batch[self.label_column]]
        return out


class ImageDataset(Dataset):
    """A ``datasets.Dataset`` of images, transformed lazily into ``{"images", ["labels"]}`` items.

    Attributes
    ----------
    hf_dataset : datasets.Dataset
        The underlying data set, with the transform attached (``with_transform``).
    num_channels : int
        The model's (and the data's) channel count, 1 or 3.
    native_mode : str
        The PIL mode of the first image, which decided the data's channel count.
    """

    def __init__(self, hf_dataset, num_channels: int, native_mode: str):
        self.hf_dataset = hf_dataset
        self.num_channels = num_channels
        self.native_mode = native_mode

    def __len__(self) -> int:
        return len(self.hf_dataset)

    def __getitem__(self, index: int) -> dict:
        return self.hf_dataset[int(index)]

    def __getitems__(self, indices) -> list:
        # One Arrow read and one transform call per batch (DataLoader uses this when present).
        return self.hf_dataset.__getitems__([int(i) for i in indices])


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _is_digits(config: DataConfig) -> bool:
    return config.dataset_name == "digits"


def _check_in_channels(in_channels) -> int:
    if isinstance(in_channels, bool) or not isinstance(in_channels, numbers.Integral) or in_channels not in MODEL_MODES:
        raise ValueError(
            f"The model takes in_channels={in_channels!r}, but training data can only be fed to "
            f"models with 1 (grayscale) or 3 (RGB) input channels. Use a teacher UNet2DModel with "
            f"in_channels 1 or 3."
        )
    return int(in_channels)


def _channel_mismatch(data_channels: int, in_channels: int, what: str, mode: Optional[str]) -> ValueError:
    kind = {1: "grayscale", 3: "color"}
    decided = f" (decided from its first image, PIL mode {mode!r})" if mode else ""
    other = (
        "a grayscale data set such as the built-in dataset_name='digits'"
        if in_channels == 1
        else "a color (RGB) data set"
    )
    return ValueError(
        f"{what} has {data_channels}-channel ({kind[data_channels]}) images{decided}, but the model "
        f"takes in_channels={in_channels}. Use a teacher model with in_channels={data_channels}, "
        f"or {other}."
    )


def resolve_source(dataset_name: Optional[str], train_data_dir: Optional[str], default: Optional[str]) -> Optional[str]:
    """The ``dataset_name`` a script should use, given what the user typed and the script's default.

    The rule: the built-in default data set applies only when the user gives no source at all.
    ``--train_data_dir`` alone means that folder; ``--dataset_name`` alone means that data set;
    both together are refused (by :func:`validate_data_source`), naming both values. An empty
    ``--dataset_name ''`` or ``--train_data_dir ''`` is refused here rather than read as "unset"
    (``--dataset_name ''`` next to a ``--train_data_dir``, the way the default used to be unset, still
    means that folder).

    Parameters
    ----------
    dataset_name, train_data_dir : str or None
        What the user passed (None when the flag was not given).
    default : str or None
        The script's default data set (e.g. ``"digits"``), or None for no default.
    """
    if dataset_name is not None and not dataset_name.strip() and train_data_dir:
        dataset_name = None
    for flag, value in (("--dataset_name", dataset_name), ("--train_data_dir", train_data_dir)):
        if value is not None and not str(value).strip():
            raise ValueError(
                f"{flag} was given an empty value ({value!r}). Pass a data set name or folder, or leave the flag out "
                + (f"to use the default data set {default!r}." if default else "and give the other source.")
            )
    if dataset_name is None and train_data_dir is None:
        return default
    return dataset_name


def _source_kind(config: DataConfig) -> str:
    """Check that exactly one source is given; return "digits", "hub" or "imagefolder"."""
    has_name = bool(config.dataset_name)
    has_dir = config.train_data_dir is not None and str(config.train_data_dir) != ""
    if not has_name and not has_dir:
        raise ValueError(
            "No training data given. Set dataset_name (the built-in 'digits', which works offline, "
            "or a Hub data set 'owner/name') or train_data_dir (a local folder of images)."
        )
    if has_name and has_dir:
        raise ValueError(
            f"Both dataset_name={config.dataset_name!r} and train_data_dir={str(config.train_data_dir)!r} "
            f"are set (--dataset_name {config.dataset_name} --train_data_dir {config.train_data_dir}); give only one of "
            "them: --train_data_dir for a folder of images, --dataset_name for a Hub or built-in data set."
        )
    if has_name:
        if config.dataset_name == photos.DATASET_NAME:
            return "photos"
        return "digits" if _is_digits(config) else "hub"
    return "imagefolder"


def _image_extensions() -> tuple[str, ...]:
    try:
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

        return tuple(ext.lower() for ext in ImageFolder.EXTENSIONS)
    except Exception:  # pragma: no cover - depends on the datasets version
        return _FALLBACK_IMAGE_EXTENSIONS


def _check_train_data_dir(path: Union[str, os.PathLike]) -> None:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(
            f"train_data_dir {path!r} does not exist. Point train_data_dir at a folder of images, "
            f"or use dataset_name (e.g. the built-in 'digits')."
        )
    if not os.path.isdir(path):
        raise ValueError(f"train_data_dir {path!r} is a file, not a folder. Point it at the folder that holds the images.")
    extensions = _image_extensions()
    for _, _, files in os.walk(path):
        if any(os.path.splitext(name)[1].lower() in extensions for name in files):
            return
    raise ValueError(
        f"train_data_dir {path!r} holds no image files (searched its sub-folders too, for e.g. "
        f".png, .jpg, .jpeg). Put the training images there, or point train_data_dir at the folder "
        f"that has them."
    )


def _check_static(config: DataConfig, in_channels: int, split: str) -> str:
    """All checks that need no data set loaded; returns the source kind."""
    _check_in_channels(in_channels)
    kind = _source_kind(config)
    resolution = config.resolution
    if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral):
        raise ValueError(
            f"resolution must be an integer (the side of the square images, e.g. the model's "
            f"config.sample_size), got {resolution!r}."
        )
    if resolution < MIN_RESOLUTION:
        raise ValueError(
            f"resolution={resolution} is too small; use at least {MIN_RESOLUTION}, normally the "
            f"model's config.sample_size."
        )
    max_samples = config.max_train_samples
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, numbers.Integral) or max_samples < 1
    ):
        raise ValueError(f"max_train_samples must be a positive integer or None (all examples), got {max_samples!r}.")
    if kind == "digits":
        digits_split_indices(split)  # raises for an unknown split
        if config.dataset_config_name:
            raise ValueError(
                f"The built-in 'digits' data set has no configurations, but dataset_config_name="
                f"{config.dataset_config_name!r} is set; unset it."
            )
        if config.label_column not in (None, "label", "labels"):
            raise ValueError(
                f"The built-in 'digits' always return their labels; label_column="
                f"{config.label_column!r} does not apply to them. Leave label_column unset."
            )
        if in_channels != DigitsDataset.num_channels:
            raise _channel_mismatch(DigitsDataset.num_channels, in_channels, "The built-in 'digits' data set", None)
    elif kind == "photos":
        _check_photos(config, in_channels, split)
    elif kind == "imagefolder":
        _check_train_data_dir(config.train_data_dir)
        if config.image_column != "image":
            raise ValueError(
                f"image_column={config.image_column!r} is not a column of the image folder "
                f"{os.fspath(config.train_data_dir)!r}; its images are always in column 'image' "
                f"(available columns: 'image', plus 'label' for one sub-folder per class and any "
                f"metadata columns). Set image_column='image'."
            )
    return kind


def _check_photos(config: DataConfig, in_channels: int, split: str) -> None:
    """The built-in photos: a known split, no configuration or label column, a 3-channel model."""
    photos.check_split(split)
    if config.dataset_config_name:
        raise ValueError(
            f"The built-in 'photos' data set has no configurations, but dataset_config_name="
            f"{config.dataset_config_name!r} is set; unset it."
        )
    if config.label_column not in (None, "label", "labels"):
        raise ValueError(
            f"The built-in 'photos' always return their labels (photograph x scale bin); label_column="
            f"{config.label_column!r} does not apply to them. Leave label_column unset."
        )
    if in_channels != photos.PhotosDataset.num_channels:
        raise _channel_mismatch(photos.PhotosDataset.num_channels, in_channels, "The built-in 'photos' data set", None)


def _describe(config: DataConfig, kind: str) -> str:
    if kind == "imagefolder":
        return f"The image folder {os.fspath(config.train_data_dir)!r}"
    name = repr(config.dataset_name)
    if config.dataset_config_name:
        name += f" (config {config.dataset_config_name!r})"
    return f"The data set {name}"


def _check_columns(features, config: DataConfig, what: str) -> None:
    import datasets

    available = list(features)
    if config.image_column not in features:
        raise ValueError(
            f"{what} has no column image_column={config.image_column!r}. Available columns: "
            f"{available}. Set image_column to the one that holds the images."
        )
    if not isinstance(features[config.image_column], datasets.Image):
        raise ValueError(
            f"Column {config.image_column!r} of {what[0].lower() + what[1:]} holds "
            f"{features[config.image_column]!r}, not images. Set image_column to a column of type "
            f"datasets.Image() (available columns: {available}), or cast it with "
            f"dataset.cast_column({config.image_column!r}, datasets.Image())."
        )
    if config.label_column is not None:
        if config.label_column not in features:
            raise ValueError(
                f"{what} has no column label_column={config.label_column!r}. Available columns: "
                f"{available}. Set label_column to one of them, or leave it unset (no labels)."
            )
        feature = features[config.label_column]
        is_int = isinstance(feature, datasets.ClassLabel) or (
            isinstance(feature, datasets.Value) and str(feature.dtype).startswith(("int", "uint"))
        )
        if not is_int:
            raise ValueError(
                f"Column {config.label_column!r} of {what[0].lower() + what[1:]} holds {feature!r}; "
                f"labels must be integers (an int or ClassLabel column). Choose another label_column "
                f"or leave it unset."
            )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _load_hf(config: DataConfig, kind: str, split: str):
    import datasets

    try:
        if kind == "imagefolder":
            return datasets.load_dataset(
                "imagefolder", data_dir=os.fspath(config.train_data_dir), cache_dir=config.cache_dir, split=split
            )
        return datasets.load_dataset(
            config.dataset_name, config.dataset_config_name, cache_dir=config.cache_dir, split=split
        )
    except datasets.exceptions.DatasetNotFoundError as err:
        raise ValueError(
            f"Data set {config.dataset_name!r} was not found: {err} Check the name ('owner/name' on the "
            f"Hub, or an existing local path), use train_data_dir for a folder of images, or the "
            f"built-in dataset_name='digits'."
        ) from err
    except Exception as err:
        err.add_note(
            f"diffusers_gfprune.data: loading split {split!r} of "
            f"{_describe(config, kind)[4:]} failed. Check the split and configuration names; offline, "
            f"a Hub data set must already be in the cache (set HF_HUB_OFFLINE=1), or use "
            f"train_data_dir, or the built-in dataset_name='digits'."
        )
        raise


def _builder_features(config: DataConfig):
    """The Hub data set's features from its metadata, without preparing it; None if unknown."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(
            config.dataset_name, config.dataset_config_name, cache_dir=config.cache_dir
        )
    except datasets.exceptions.DatasetNotFoundError as err:
        raise ValueError(
            f"Data set {config.dataset_name!r} was not found: {err} Check the name ('owner/name' on the "
            f"Hub, or an existing local path), use train_data_dir for a folder of images, or the "
            f"built-in dataset_name='digits'."
        ) from err
    return builder.info.features


def validate_data_source(config: DataConfig, in_channels: int, split: str = "train") -> str:
    """Check the data configuration before any heavy work; raise a ``ValueError`` that says the fix.

    Checks, in order: the model's ``in_channels`` is 1 or 3; exactly one of ``dataset_name`` and
    ``train_data_dir`` is given; ``resolution`` is an integer >= 8; ``max_train_samples`` is
    None or positive. Then, per source:

    * digits: the split exists, no ``dataset_config_name``, and the model has 1 input channel.
    * image folder: the folder exists and holds at least one image file; ``image_column`` is
      ``"image"``. With a ``label_column`` the folder is loaded (cheap) to check the column.
    * Hub data set: ``image_column`` (and ``label_column``) are columns of the right type. The
      columns come from ``datasets.load_dataset_builder(...).info.features`` (metadata only)
      when the data set declares them; otherwise the split is loaded (cached by ``datasets``,
      so :func:`load_train_dataset` reuses it).

    The channel rule for image data sets is checked by :func:`load_train_dataset`, which decodes
    the first image.

    Parameters
    ----------
    config : DataConfig
        The data options.
    in_channels : int
        The model's ``config.in_channels``.
    split : str
        The split that will be loaded.

    Returns
    -------
    str
        The kind of source: ``"digits"``, ``"hub"`` or ``"imagefolder"``.
    """
    kind = _check_static(config, in_channels, split)
    if kind == "hub":
        features = _builder_features(config)
        if features is None:
            features = _load_hf(config, kind, split).features
        _check_columns(features, config, _describe(config, kind))
    elif kind == "imagefolder" and config.label_column is not None:
        _check_columns(_load_hf(config, kind, split).features, config, _describe(config, kind))
    return kind


def load_train_dataset(config: DataConfig, in_channels: int, split: str = "train") -> Dataset:
    """The training images as a ``torch.utils.data.Dataset`` of ``{"images", ["labels"]}`` dicts.

    ``images`` is a float tensor (C, R, R) in [-1, 1] with C = ``in_channels`` and
    R = ``config.resolution``; ``labels`` is a ``torch.long`` scalar (always for the digits,
    with ``label_column`` for the other sources).

    * digits: see :class:`DigitsDataset`; ``split`` is ``"train"`` (first 1500 images),
      ``"test"`` (last 297) or ``"all"``. ``center_crop`` does not apply (square images).
    * Hub data set / image folder: the split is loaded with ``datasets.load_dataset`` and
      transformed lazily (``with_transform``) as in diffusers' ``train_unconditional.py``:
      convert to the model's mode, ``Resize(R)`` (bilinear, shorter side), ``CenterCrop(R)``
      or ``RandomCrop(R)``, optionally ``RandomHorizontalFlip()``, ``ToTensor()``,
      ``Normalize([0.5], [0.5])``.

    Random crops and flips draw from torch's global random generator (seeded per worker by
    :func:`make_dataloader` when ``num_workers > 0``; seed it yourself, e.g. with
    ``accelerate.utils.set_seed``, when loading in the main process).

    Parameters
    ----------
    config : DataConfig
        The data options.
    in_channels : int
        The model's ``config.in_channels`` (1 or 3).
    split : str
        The split to load.

    Returns
    -------
    torch.utils.data.Dataset
        A :class:`DigitsDataset` or an :class:`ImageDataset`.

    Raises
    ------
    ValueError
        For any problem :func:`validate_data_source` reports, an empty split, or when the data's
        channel count (decided by its first image) differs from ``in_channels``.
    """
    kind = _check_static(config, in_channels, split)
    if kind == "digits":
        return DigitsDataset(split, config.resolution, config.random_flip, config.max_train_samples)
    if kind == "photos":
        return photos.PhotosDataset(split, config.resolution, config.random_flip, config.max_train_samples)

    what = _describe(config, kind)
    dataset = _load_hf(config, kind, split)
    _check_columns(dataset.features, config, what)
    if config.max_train_samples is not None and config.max_train_samples < len(dataset):
        dataset = dataset.select(range(config.max_train_samples))
    if len(dataset) == 0:
        raise ValueError(f"{what} has no examples in split {split!r}. Choose a split that has images.")
    native_mode = dataset[0][config.image_column].mode
    data_channels = native_channels(native_mode)
    if data_channels != in_channels:
        raise _channel_mismatch(data_channels, in_channels, what, native_mode)
    transform = _ImageTransform(
        config.image_column,
        config.label_column,
        MODEL_MODES[in_channels],
        int(config.resolution),
        config.center_crop,
        config.random_flip,
    )
    return ImageDataset(dataset.with_transform(transform), in_channels, native_mode)


def default_num_workers(dataset: Dataset) -> int:
    """Worker processes for :func:`make_dataloader` when none are given.

    The built-in data sets are tensors in memory: 0 (workers would only add start-up time). Hub data sets and image
    folders decode and resize every image: up to 8 workers, the machine's cores shared among the training processes
    on it (``LOCAL_WORLD_SIZE``), so the GPU does not wait for the host.
    """
    if not isinstance(dataset, ImageDataset):
        return 0
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(8, (os.cpu_count() or 1) // local_processes - 1))


def make_dataloader(dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0, num_workers: Optional[int] = None,
                    drop_last: bool = True) -> DataLoader:
    """A ``DataLoader`` whose order is reproducible: it draws from a ``torch.Generator`` seeded with ``seed``.

    The generator sets the shuffle order and, with ``num_workers > 0``, the seed of every worker
    (so random crops and flips repeat too). With ``num_workers=0`` the transforms use torch's
    global generator; seed it as well for fully repeatable batches.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        For example the result of :func:`load_train_dataset`.
    batch_size : int
        Examples per batch.
    shuffle : bool
        Reshuffle every epoch.
    seed : int
        Seed of the loader's generator.
    num_workers : int, optional
        Worker processes (0 loads in the main process); ``None``: :func:`default_num_workers`.
    drop_last : bool
        Drop the last, incomplete batch (keeps batch shapes fixed).

    Returns
    -------
    torch.utils.data.DataLoader
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if drop_last and len(dataset) < batch_size:
        raise ValueError(
            f"batch_size={batch_size} is larger than the data set ({len(dataset)} examples), so with "
            f"drop_last=True there would be no batch at all. Lower batch_size to at most "
            f"{len(dataset)}, use drop_last=False, or use more data (max_train_samples)."
        )
    if num_workers is None:
        num_workers = default_num_workers(dataset)
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
    )  # no persistent workers: each epoch's workers are seeded from the generator, so a resumed epoch repeats its crops
