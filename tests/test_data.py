"""Tests for diffusers_gfprune.data (CPU, offline, a few seconds).

Expected values come from the inputs (scikit-learn's digits, the pixels written to the PNGs),
not from the code under test. The Hub code path is exercised with local folders of parquet
files passed as ``dataset_name``, which ``datasets.load_dataset`` reads without the network.
"""

import dataclasses

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from diffusers_gfprune import data
from diffusers_gfprune.data import (
    BUILTIN_DATASETS,
    DataConfig,
    digits_arrays,
    digits_split_indices,
    load_train_dataset,
    make_dataloader,
    validate_data_source,
)


@pytest.fixture(scope="module")
def sk_digits():
    digits = load_digits()
    return digits.images, digits.target


@pytest.fixture
def cfg(tmp_path):
    """A DataConfig factory that keeps the datasets cache inside tmp_path."""

    def make(**kwargs):
        kwargs.setdefault("cache_dir", str(tmp_path / "hf_cache"))
        return DataConfig(**kwargs)

    return make


def to_unit(pixels):
    """8-bit pixel values -> [-1, 1], as ToTensor + Normalize([0.5], [0.5]) define it."""
    return torch.as_tensor(np.asarray(pixels, dtype=np.float64) / 255.0 * 2.0 - 1.0, dtype=torch.float32)


def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array), mode=mode).save(path)


def constant(h, w, value, channels=None):
    shape = (h, w) if channels is None else (h, w, channels)
    return np.broadcast_to(np.asarray(value, dtype=np.uint8), shape).copy()


# ------------------------------------------------------------------------------------------
# The built-in digits
# ------------------------------------------------------------------------------------------


def test_digits_is_builtin():
    assert BUILTIN_DATASETS == ("digits", "photos")


def test_digits_splits_are_disjoint_and_cover_everything(sk_digits):
    images, labels = sk_digits
    train, test = digits_split_indices("train"), digits_split_indices("test")
    assert len(set(train.tolist()) & set(test.tolist())) == 0
    assert sorted(train.tolist() + test.tolist()) == list(range(1797))
    assert len(test) == 297 and test.tolist() == list(range(1500, 1797))  # the documented split

    for split, index in (("train", train), ("test", test), ("all", np.arange(1797))):
        split_images, split_labels = digits_arrays(split)
        assert split_images.shape == (len(index), 8, 8) and split_images.dtype == np.uint8
        np.testing.assert_array_equal(split_images, images[index])
        np.testing.assert_array_equal(split_labels, labels[index])

    # The test split holds every digit, so a classifier can be evaluated on held-out digits.
    assert set(digits_arrays("test")[1].tolist()) == set(range(10))


def test_digits_arrays_are_copies():
    images, _ = digits_arrays("train")
    images[:] = 0
    assert digits_arrays("train")[0].max() == 16


def test_digits_dataset_shapes_range_labels(cfg, sk_digits):
    images, labels = sk_digits
    for split, count in (("train", 1500), ("test", 297)):
        dataset = load_train_dataset(cfg(dataset_name="digits", resolution=16), in_channels=1, split=split)
        assert len(dataset) == count
        item = dataset[3]
        assert item["images"].shape == (1, 16, 16) and item["images"].dtype == torch.float32
        assert item["labels"].dtype == torch.long
        assert item["labels"].item() == labels[digits_split_indices(split)[3]]
    stacked = torch.stack([dataset[i]["images"] for i in range(len(dataset))])
    assert stacked.min() >= -1.0 and stacked.max() <= 1.0
    assert stacked.min() == -1.0 and stacked.max() > 0.9  # the range is used, not squeezed


def test_digits_values_at_native_resolution(cfg, sk_digits):
    """At resolution 8 nothing is resampled: the values are the digits mapped 0..16 -> -1..1."""
    images, _ = sk_digits
    dataset = load_train_dataset(cfg(dataset_name="digits", resolution=8), in_channels=1, split="test")
    for i in (0, 100, 296):
        expected = torch.as_tensor(images[1500 + i] / 8.0 - 1.0, dtype=torch.float32)
        torch.testing.assert_close(dataset[i]["images"][0], expected)


def test_digits_upscaled_bilinear(cfg, sk_digits):
    """Upscaling matches PIL's bilinear resize of the same 8x8 float image (an independent reference)."""
    images, _ = sk_digits
    for resolution in (20, 32):
        dataset = load_train_dataset(cfg(dataset_name="digits", resolution=resolution), in_channels=1)
        for i in (0, 7):
            big = dataset[i]["images"][0]
            assert big.shape == (resolution, resolution)
            small = Image.fromarray((images[i] / 8.0 - 1.0).astype(np.float32), mode="F")
            expected = np.asarray(small.resize((resolution, resolution), Image.BILINEAR))
            np.testing.assert_allclose(big.numpy(), expected, atol=1e-5)


def test_digits_deterministic(cfg):
    first = load_train_dataset(cfg(dataset_name="digits", resolution=16), in_channels=1)
    second = load_train_dataset(cfg(dataset_name="digits", resolution=16), in_channels=1)
    for i in (0, 500, 1499):
        torch.testing.assert_close(first[i]["images"], second[i]["images"], rtol=0, atol=0)
        assert first[i]["labels"] == second[i]["labels"]
        torch.testing.assert_close(first[i]["images"], first[i]["images"], rtol=0, atol=0)


def test_digits_max_train_samples_and_flip(cfg):
    plain = load_train_dataset(cfg(dataset_name="digits", resolution=8), in_channels=1)
    flipping = load_train_dataset(
        cfg(dataset_name="digits", resolution=8, random_flip=True, max_train_samples=10), in_channels=1
    )
    assert len(flipping) == 10
    original = plain[2]["images"]
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        image = flipping[2]["images"]
        if torch.equal(image, original):
            seen.add("original")
        else:
            torch.testing.assert_close(image, original.flip(-1), rtol=0, atol=0)
            seen.add("flipped")
    assert seen == {"original", "flipped"}


def test_digits_need_a_one_channel_model(cfg):
    config = cfg(dataset_name="digits", resolution=16)
    for call in (validate_data_source, load_train_dataset):
        with pytest.raises(ValueError, match=r"1-channel.*in_channels=3.*in_channels=1"):
            call(config, 3)


def test_digits_bad_split_and_config_name(cfg):
    with pytest.raises(ValueError, match="no split 'validation'.*'train', 'test', 'all'"):
        validate_data_source(cfg(dataset_name="digits", resolution=16), 1, split="validation")
    with pytest.raises(ValueError, match="no configurations.*unset"):
        validate_data_source(cfg(dataset_name="digits", dataset_config_name="x", resolution=16), 1)


# ------------------------------------------------------------------------------------------
# Local image folders
# ------------------------------------------------------------------------------------------


def test_imagefolder_rgb_first_decides_three_channels(cfg, tmp_path):
    folder = tmp_path / "mixed"
    save(folder / "a0.png", constant(8, 8, (255, 0, 128), channels=3))
    save(folder / "a1.png", constant(16, 16, (10, 20, 30), channels=3))  # downscaled to 8x8
    save(folder / "b_gray.png", constant(8, 8, 200))  # an 'L' image after the RGB ones
    config = cfg(train_data_dir=str(folder), resolution=8, center_crop=True)

    assert validate_data_source(config, 3) == "imagefolder"
    dataset = load_train_dataset(config, in_channels=3)
    assert len(dataset) == 3
    items = {}
    for i in range(3):
        image = dataset[i]["images"]
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        assert "labels" not in dataset[i]
        items[tuple(image[:, 0, 0].tolist())] = image
    for pixel in ((255, 0, 128), (10, 20, 30), (200, 200, 200)):  # the gray image became RGB
        key = tuple(to_unit(pixel).tolist())
        match = [image for k, image in items.items() if np.allclose(k, key, atol=1e-6)]
        assert len(match) == 1
        torch.testing.assert_close(match[0], to_unit(pixel)[:, None, None].expand(3, 8, 8))

    # The folder is RGB (its first image decides), so a 1-channel model is refused.
    with pytest.raises(ValueError, match=r"3-channel.*mode 'RGB'.*in_channels=1.*in_channels=3"):
        load_train_dataset(config, in_channels=1)


def test_imagefolder_gray_first_decides_one_channel(cfg, tmp_path):
    folder = tmp_path / "gray_first"
    save(folder / "a_gray.png", constant(8, 8, 64))
    save(folder / "b_rgb.png", constant(8, 8, (90, 90, 90), channels=3))
    dataset = load_train_dataset(cfg(train_data_dir=str(folder), resolution=8), in_channels=1)
    values = sorted(dataset[i]["images"][0, 0, 0].item() for i in range(2))
    assert all(dataset[i]["images"].shape == (1, 8, 8) for i in range(2))
    np.testing.assert_allclose(values, to_unit([64, 90]).tolist(), atol=1e-6)
    with pytest.raises(ValueError, match=r"1-channel.*in_channels=3"):
        load_train_dataset(cfg(train_data_dir=str(folder), resolution=8), in_channels=3)


def test_imagefolder_gray_pngs_for_one_channel_model(cfg, tmp_path):
    folder = tmp_path / "gray"
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(12, 12), dtype=np.uint8) for _ in range(4)]
    for i, array in enumerate(arrays):
        save(folder / f"{i}.png", array)
    dataset = load_train_dataset(cfg(train_data_dir=str(folder), resolution=12, center_crop=True), in_channels=1)
    assert dataset.num_channels == 1 and dataset.native_mode == "L"
    got = sorted((dataset[i]["images"] for i in range(4)), key=lambda t: t.sum().item())
    want = sorted((to_unit(a)[None] for a in arrays), key=lambda t: t.sum().item())
    for image, expected in zip(got, want):
        assert image.shape == (1, 12, 12)
        torch.testing.assert_close(image, expected)


def test_imagefolder_sixteen_bit_is_scaled_not_clipped(cfg, tmp_path):
    folder = tmp_path / "sixteen"
    array = np.full((8, 8), 100 * 257, dtype=np.uint16)  # 100 on the 8-bit scale
    save(folder / "x.png", array)
    dataset = load_train_dataset(cfg(train_data_dir=str(folder), resolution=8), in_channels=1)
    assert dataset.native_mode.startswith("I")
    torch.testing.assert_close(dataset[0]["images"], to_unit(np.full((1, 8, 8), 100)))


def test_imagefolder_rgb_folder_on_one_channel_model_is_refused(cfg, tmp_path):
    folder = tmp_path / "rgb"
    for i in range(2):
        save(folder / f"{i}.png", constant(8, 8, (i, 50, 100), channels=3))
    with pytest.raises(ValueError) as info:
        load_train_dataset(cfg(train_data_dir=str(folder), resolution=8), in_channels=1)
    message = str(info.value)
    assert "3-channel" in message and "in_channels=1" in message
    assert "teacher" in message and "in_channels=3" in message and "digits" in message


def test_imagefolder_center_and_random_crop(cfg, tmp_path):
    folder = tmp_path / "wide"
    wide = np.zeros((8, 24), dtype=np.uint8)
    wide[:, 8:16] = 255
    wide[:, 16:] = 128
    wide[:, 16:] += np.arange(8, dtype=np.uint8)  # every window of 8 columns is distinct
    save(folder / "wide.png", wide)
    full = to_unit(wide)

    centered = load_train_dataset(cfg(train_data_dir=str(folder), resolution=8, center_crop=True), in_channels=1)
    torch.testing.assert_close(centered[0]["images"][0], full[:, 8:16])

    randomly = load_train_dataset(cfg(train_data_dir=str(folder), resolution=8), in_channels=1)
    torch.manual_seed(0)
    offsets = set()
    for _ in range(25):
        crop = randomly[0]["images"][0]
        found = [x for x in range(17) if torch.allclose(crop, full[:, x:x + 8], atol=1e-6)]
        assert len(found) == 1  # a real window of the image
        offsets.add(found[0])
    assert len(offsets) > 3


def test_imagefolder_random_flip(cfg, tmp_path):
    folder = tmp_path / "asym"
    array = np.zeros((8, 8), dtype=np.uint8)
    array[:, 4:] = 255
    array[0, 4:] = 60
    save(folder / "asym.png", array)
    original = to_unit(array)[None]

    plain = load_train_dataset(cfg(train_data_dir=str(folder), resolution=8), in_channels=1)
    flipping = load_train_dataset(cfg(train_data_dir=str(folder), resolution=8, random_flip=True), in_channels=1)
    torch.manual_seed(0)
    for _ in range(10):
        torch.testing.assert_close(plain[0]["images"], original)
    seen = set()
    for _ in range(40):
        image = flipping[0]["images"]
        if torch.allclose(image, original, atol=1e-6):
            seen.add("original")
        else:
            torch.testing.assert_close(image, original.flip(-1))
            seen.add("flipped")
    assert seen == {"original", "flipped"}


def test_imagefolder_labels_and_max_train_samples(cfg, tmp_path):
    folder = tmp_path / "classes"
    for name, value in (("cat", 10), ("dog", 240)):
        for i in range(3):
            save(folder / name / f"{i}.png", constant(8, 8, value))
    config = cfg(train_data_dir=str(folder), resolution=8, label_column="label")
    assert validate_data_source(config, 1) == "imagefolder"
    dataset = load_train_dataset(config, in_channels=1)
    assert len(dataset) == 6
    for i in range(6):
        item = dataset[i]
        # ClassLabel names are sorted: cat -> 0, dog -> 1.
        expected_label = 0 if item["images"][0, 0, 0] < 0 else 1
        assert item["labels"].dtype == torch.long and item["labels"].item() == expected_label

    small = load_train_dataset(cfg(train_data_dir=str(folder), resolution=8, max_train_samples=2), in_channels=1)
    assert len(small) == 2

    with pytest.raises(ValueError, match=r"no column label_column='class'.*\['image', 'label'\]"):
        validate_data_source(cfg(train_data_dir=str(folder), resolution=8, label_column="class"), 1)


def test_imagefolder_missing_image_column(cfg, tmp_path):
    folder = tmp_path / "imgs"
    save(folder / "0.png", constant(8, 8, 1))
    config = cfg(train_data_dir=str(folder), resolution=8, image_column="img")
    for call in (validate_data_source, load_train_dataset):
        with pytest.raises(ValueError, match=r"image_column='img'.*available columns: 'image'.*image_column='image'"):
            call(config, 1)


# ------------------------------------------------------------------------------------------
# Configuration errors
# ------------------------------------------------------------------------------------------


def test_no_source(cfg):
    with pytest.raises(ValueError) as info:
        validate_data_source(cfg(resolution=16), 1)
    message = str(info.value)
    assert "dataset_name" in message and "train_data_dir" in message and "'digits'" in message
    with pytest.raises(ValueError, match="No training data"):
        load_train_dataset(cfg(dataset_name="", resolution=16), 1)


def test_both_sources(cfg, tmp_path):
    with pytest.raises(ValueError, match="Both dataset_name='digits' and train_data_dir=.*only one"):
        validate_data_source(cfg(dataset_name="digits", train_data_dir=str(tmp_path), resolution=16), 1)


def test_missing_and_empty_folder(cfg, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        validate_data_source(cfg(train_data_dir=str(tmp_path / "nowhere"), resolution=16), 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        validate_data_source(cfg(train_data_dir=str(empty), resolution=16), 1)
    (empty / "sub").mkdir()
    (empty / "sub" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="holds no image files"):
        load_train_dataset(cfg(train_data_dir=str(empty), resolution=16), 1)
    # An image in a sub-folder is found.
    save(empty / "sub" / "x.png", constant(8, 8, 0))
    assert validate_data_source(cfg(train_data_dir=str(empty), resolution=8), 1) == "imagefolder"


@pytest.mark.parametrize("resolution", [None, 4, 7, 16.0, "16", True])
def test_bad_resolution(cfg, resolution):
    with pytest.raises(ValueError, match="resolution"):
        validate_data_source(cfg(dataset_name="digits", resolution=resolution), 1)


@pytest.mark.parametrize("in_channels", [2, 4, 0])
def test_bad_in_channels(cfg, in_channels):
    with pytest.raises(ValueError, match=rf"in_channels={in_channels}.*1 \(grayscale\) or 3 \(RGB\)"):
        validate_data_source(cfg(dataset_name="digits", resolution=16), in_channels)


def test_bad_max_train_samples(cfg):
    with pytest.raises(ValueError, match="max_train_samples must be a positive integer"):
        validate_data_source(cfg(dataset_name="digits", resolution=16, max_train_samples=0), 1)


def test_data_config_fields_have_help():
    fields = {f.name: f for f in dataclasses.fields(DataConfig)}
    assert set(fields) == {
        "dataset_name", "dataset_config_name", "train_data_dir", "image_column", "label_column",
        "resolution", "center_crop", "random_flip", "cache_dir", "max_train_samples",
    }
    assert all(f.metadata.get("help") for f in fields.values())
    defaults = DataConfig()
    assert defaults.image_column == "image" and defaults.label_column is None
    assert defaults.center_crop is False and defaults.random_flip is False
    assert "shadow" in fields["dataset_name"].metadata["help"]


# ------------------------------------------------------------------------------------------
# The Hub code path, with local parquet folders given as dataset_name
# ------------------------------------------------------------------------------------------


def make_parquet_dataset(folder, rgb_values, with_readme=False):
    images = [Image.fromarray(constant(8, 8, value, channels=3)) for value in rgb_values]
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.Value("int64"), "caption": datasets.Value("string")}
    )
    table = datasets.Dataset.from_dict(
        {"img": images, "label": list(range(len(images))), "caption": ["x"] * len(images)}, features=features
    )
    (folder / "data").mkdir(parents=True)
    table.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    if with_readme:  # declares the features, as Hub data sets usually do
        (folder / "README.md").write_text(
            "---\ndataset_info:\n  features:\n  - name: img\n    dtype: image\n"
            "  - name: label\n    dtype: int64\n  - name: caption\n    dtype: string\n---\n"
        )
    return str(folder)


def test_hub_path_loads(cfg, tmp_path):
    values = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (7, 77, 177)]
    name = make_parquet_dataset(tmp_path / "hub", values)
    config = cfg(dataset_name=name, image_column="img", label_column="label", resolution=8, center_crop=True)
    assert validate_data_source(config, 3) == "hub"
    dataset = load_train_dataset(config, in_channels=3)
    assert len(dataset) == 4
    for i, value in enumerate(values):
        item = dataset[i]
        assert item["images"].shape == (3, 8, 8)
        torch.testing.assert_close(item["images"], to_unit(value)[:, None, None].expand(3, 8, 8))
        assert item["labels"].item() == i

    batch = next(iter(make_dataloader(dataset, batch_size=2, shuffle=False)))
    assert batch["images"].shape == (2, 3, 8, 8)
    assert batch["labels"].tolist() == [0, 1]

    with pytest.raises(ValueError, match=r"3-channel.*in_channels=1"):
        load_train_dataset(config, in_channels=1)


def test_hub_path_missing_image_column_after_loading(cfg, tmp_path):
    name = make_parquet_dataset(tmp_path / "hub", [(1, 2, 3)])
    config = cfg(dataset_name=name, resolution=8)  # image_column defaults to 'image'
    for call in (validate_data_source, load_train_dataset):
        with pytest.raises(ValueError, match=r"no column image_column='image'.*\['img', 'label', 'caption'\]"):
            call(config, 3)
    with pytest.raises(ValueError, match=r"'caption'.*not images"):
        validate_data_source(cfg(dataset_name=name, image_column="caption", resolution=8), 3)
    with pytest.raises(ValueError, match=r"'caption'.*labels must be integers"):
        validate_data_source(cfg(dataset_name=name, image_column="img", label_column="caption", resolution=8), 3)


def test_hub_path_columns_checked_from_metadata_without_loading(cfg, tmp_path, monkeypatch):
    name = make_parquet_dataset(tmp_path / "hub", [(1, 2, 3)], with_readme=True)

    def no_loading(*args, **kwargs):
        raise AssertionError("validate_data_source loaded the data set although its metadata has the features")

    monkeypatch.setattr(datasets, "load_dataset", no_loading)
    with pytest.raises(ValueError, match=r"no column image_column='image'.*\['img', 'label', 'caption'\]"):
        validate_data_source(cfg(dataset_name=name, resolution=8), 3)
    assert validate_data_source(cfg(dataset_name=name, image_column="img", resolution=8), 3) == "hub"


# ------------------------------------------------------------------------------------------
# The data loader
# ------------------------------------------------------------------------------------------


def test_make_dataloader_is_seeded(cfg):
    dataset = load_train_dataset(cfg(dataset_name="digits", resolution=8), in_channels=1)

    def first_labels(seed):
        loader = make_dataloader(dataset, batch_size=32, seed=seed)
        batches = iter(loader)
        return torch.cat([next(batches)["labels"] for _ in range(3)]).tolist()

    assert first_labels(1) == first_labels(1)
    assert first_labels(1) != first_labels(2)

    loader = make_dataloader(dataset, batch_size=32, seed=1)
    assert len(loader) == 1500 // 32
    batch = next(iter(loader))
    assert batch["images"].shape == (32, 1, 8, 8) and batch["labels"].shape == (32,)

    ordered = next(iter(make_dataloader(dataset, batch_size=5, shuffle=False)))
    assert ordered["labels"].tolist() == digits_arrays("train")[1][:5].tolist()


def test_make_dataloader_refuses_batches_larger_than_the_data(cfg):
    dataset = load_train_dataset(cfg(dataset_name="digits", resolution=8, max_train_samples=10), in_channels=1)
    with pytest.raises(ValueError, match="no batch at all.*at most 10"):
        make_dataloader(dataset, batch_size=16)
    assert len(make_dataloader(dataset, batch_size=16, drop_last=False)) == 1
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        make_dataloader(dataset, batch_size=0)


def test_module_exposes_digits_constants():
    assert data.DIGITS_NUM_IMAGES == 1797 and data.DIGITS_NUM_TEST == 297


# ------------------------------------------------------------------------------------------
# What the scripts' flags resolve to: the built-in default applies only when no source is given
# ------------------------------------------------------------------------------------------

# (flags the user typed, expected dataset_name after resolution or None, expected error or None)
SOURCE_FLAG_CASES = {
    "nothing: the default": ([], "digits", None),
    "train_data_dir alone": (["--train_data_dir", "{folder}"], None, None),
    "dataset_name digits": (["--dataset_name", "digits"], "digits", None),
    "dataset_name a parquet folder": (["--dataset_name", "{parquet}"], "{parquet}", None),
    "both given": (["--dataset_name", "digits", "--train_data_dir", "{folder}"], "digits",
                   r"--dataset_name digits --train_data_dir .*images.*give only one"),
    "empty dataset_name": (["--dataset_name", ""], None, r"--dataset_name was given an empty value"),
    "empty train_data_dir": (["--train_data_dir", ""], None, r"--train_data_dir was given an empty value"),
    "empty dataset_name next to train_data_dir": (["--dataset_name", "", "--train_data_dir", "{folder}"], None, None),
}


@pytest.mark.parametrize("script", ["prune", "train_ddpm", "evaluate"])
@pytest.mark.parametrize("case", sorted(SOURCE_FLAG_CASES))
def test_source_flags_of_every_script(script, case, tmp_path):
    from .conftest import load_script

    folder = tmp_path / "images"
    save(folder / "a.png", constant(8, 8, 10))
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    datasets.Dataset.from_dict({"image": [Image.fromarray(constant(8, 8, 10))]}).to_parquet(str(parquet / "train.parquet"))
    flags, expected, error = SOURCE_FLAG_CASES[case]
    fill = {"folder": str(folder), "parquet": str(parquet)}
    argv = [f.format(**fill) for f in flags]
    if script == "evaluate":
        argv = ["--pretrained_model_name_or_path", str(tmp_path / "pruned")] + argv
    module = load_script(script)
    if error is not None and "empty" in case:
        with pytest.raises(ValueError, match=error):
            module.parse_args(argv)
        return
    args = module.parse_args(argv)
    assert args.dataset_name == (expected.format(**fill) if expected else None)
    config = DataConfig(dataset_name=args.dataset_name, train_data_dir=args.train_data_dir, resolution=8,
                        cache_dir=str(tmp_path / "hf_cache"))
    if error is not None:
        with pytest.raises(ValueError, match=error):
            validate_data_source(config, 1)
    else:
        validate_data_source(config, 1)
