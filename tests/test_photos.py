"""The built-in 'photos' data set: deterministic crops, disjoint splits, shapes, range, wiring into data.py."""

import numpy as np
import pytest
import torch

from diffusers_gfprune import data, photos


@pytest.fixture(scope="module")
def train():
    return photos.photo_crops("train")


@pytest.fixture(scope="module")
def test():
    return photos.photo_crops("test")


def test_photographs_are_colour_photographs_that_ship_offline():
    assert len(photos.PHOTOGRAPHS) == 7
    for index, photograph in enumerate(photos.PHOTOGRAPHS):
        array = photos.load_photograph(index)
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
        # Real colour: the channels differ (a grey image would have R == G == B).
        assert np.abs(array[..., 0].astype(int) - array[..., 2]).mean() > 3, photograph.name
        assert photograph.licence and photograph.source


def test_shapes_counts_and_labels(train, test):
    for crops, split in ((train, "train"), (test, "test")):
        n = photos.NUM_CROPS[split] * len(photos.PHOTOGRAPHS)
        assert crops.images.shape == (n, 3, 32, 32) and crops.images.dtype == np.uint8
        assert crops.labels.min() == 0 and crops.labels.max() == photos.NUM_CLASSES - 1
        # Every photograph x scale bin class is present in both splits.
        assert np.all(np.bincount(crops.labels, minlength=photos.NUM_CLASSES) > 0)
        sides = crops.boxes[:, 2]
        assert sides.min() >= photos.MIN_SIDE and sides.max() <= photos.MAX_SIDE
        assert np.array_equal(crops.scale_bin, photos.scale_bin(sides))


def test_crops_are_deterministic_and_depend_on_the_seed(test):
    photos.photo_crops.cache_clear()
    again = photos.photo_crops("test")
    assert again is not test and np.array_equal(again.images, test.images) and np.array_equal(again.boxes, test.boxes)
    other = photos.photo_crops("test", seed=1)
    assert not np.array_equal(other.boxes, test.boxes)


def test_splits_share_no_pixel(train, test):
    for index, photograph in enumerate(photos.PHOTOGRAPHS):
        shape = photos.load_photograph(index).shape[:2]
        masks = {}
        for crops, split in ((train, "train"), (test, "test")):
            mask = np.zeros(shape, dtype=bool)
            for top, left, side, _ in crops.boxes[crops.photo == index]:
                assert top >= 0 and left >= 0 and top + side <= shape[0] and left + side <= shape[1]
                mask[top:top + side, left:left + side] = True
            masks[split] = mask
        assert masks["train"].any() and masks["test"].any()
        assert not (masks["train"] & masks["test"]).any(), photograph.name


def test_crop_is_the_resized_region(test):
    """A crop is exactly its box of the photograph, resized (and flipped when marked)."""
    from PIL import Image

    for i in (0, 300, 1791):
        top, left, side, flipped = test.boxes[i]
        region = photos.load_photograph(int(test.photo[i]))[top:top + side, left:left + side]
        expected = np.asarray(Image.fromarray(region).resize((32, 32), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
        if flipped:
            expected = expected[:, :, ::-1]
        assert np.array_equal(test.images[i], expected)


def test_dataset_through_data_module_range_and_shapes():
    config = data.DataConfig(dataset_name="photos", resolution=32)
    assert data.validate_data_source(config, 3) == "photos"
    dataset = data.load_train_dataset(config, 3, split="test")
    assert isinstance(dataset, photos.PhotosDataset) and len(dataset) == 1792
    item = dataset[5]
    assert item["images"].shape == (3, 32, 32) and item["images"].dtype == torch.float32
    assert item["labels"].dtype == torch.long
    batch = next(iter(data.make_dataloader(dataset, 64, seed=0)))
    assert batch["images"].min() >= -1.0 and batch["images"].max() <= 1.0
    assert batch["images"].min() < -0.9 and batch["images"].max() > 0.9  # uses the whole range
    small = data.load_train_dataset(data.DataConfig(dataset_name="photos", resolution=16, max_train_samples=10), 3)
    assert len(small) == 10 and small[0]["images"].shape == (3, 16, 16)
    assert len(set(int(small[i]["labels"]) // photos.NUM_SCALE_BINS for i in range(10))) > 3  # spread over photos


@pytest.mark.parametrize(
    "kwargs, in_channels, split, match",
    [
        ({}, 1, "train", "in_channels=1"),
        ({}, 3, "validation", "no split 'validation'"),
        ({"dataset_config_name": "x"}, 3, "train", "no configurations"),
        ({"label_column": "photo"}, 3, "train", "label_column"),
    ],
)
def test_bad_photos_configuration_is_reported(kwargs, in_channels, split, match):
    config = data.DataConfig(dataset_name="photos", resolution=32, **kwargs)
    with pytest.raises(ValueError, match=match):
        data.validate_data_source(config, in_channels, split=split)
