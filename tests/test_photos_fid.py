"""The photos' feature space: the shipped photos classifier, its registration with torch-fidelity, and the
FID protocol of the built-in data sets by name (a third feature space is a registration, not a copy)."""

import json
import os

import pytest
import torch

from diffusers_gfprune import evaluation as ev
from diffusers_gfprune import photos
from diffusers_gfprune.photos_classifier import (
    ASSETS_DIR,
    CONFIG_NAME,
    PhotosClassifier,
    load_photos_classifier,
    to_photos_classifier_input,
)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fidelity_cache")


@pytest.fixture(scope="module")
def held_out():
    return ev.builtin_reference("photos", "test", 32)


def test_shipped_classifier_beats_chance_on_held_out_regions_as_recorded(held_out):
    """The held-out accuracy recorded in config.json is what the shipped weights give (and beats chance)."""
    model = load_photos_classifier()
    with open(os.path.join(ASSETS_DIR, CONFIG_NAME), encoding="utf-8") as f:
        recorded = json.load(f)["training"]["test_accuracy"]
    crops = photos.photo_crops("test")
    with torch.no_grad():
        predicted = model(to_photos_classifier_input(held_out.images)).argmax(1)
    accuracy = float((predicted == torch.from_numpy(crops.labels.copy())).float().mean())
    assert accuracy == pytest.approx(recorded, abs=1e-3)
    assert accuracy > 3 / photos.NUM_CLASSES  # chance is 1/21


def test_feature_spaces_are_registered_by_name():
    assert set(ev.FEATURE_EXTRACTORS) >= {"inception-v3-compat", "digits-classifier", "photos-classifier"}
    assert ev.BUILTIN_FEATURE_EXTRACTORS == {"digits": "digits-classifier", "photos": "photos-classifier"}
    assert ev.METRIC_DISPLAY_NAMES["fid_photos_classifier"] == "FID (photos classifier features)"
    assert "Inception" not in ev.METRIC_DISPLAY_NAMES["fid_photos_classifier"]
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert ev.register_with_torch_fidelity("photos-classifier") == "photos-classifier"
    assert "photos-classifier" in FEATURE_EXTRACTORS_REGISTRY
    ev.register_with_torch_fidelity("photos-classifier")  # idempotent


def test_builtin_reference_of_photos(held_out):
    assert held_out.images.shape == (1792, 3, 32, 32) and held_out.images.dtype == torch.uint8
    assert held_out.name == "photos-test-r32-n1792"
    small = ev.builtin_reference("photos", "train", 32, max_samples=64)
    assert len(small) == 64
    with pytest.raises(ValueError, match="not a built-in data set"):
        ev.builtin_reference("cifar10")


def test_photos_fid_separates_real_crops_from_noise_and_from_other_data(held_out, cache_root):
    train = ev.builtin_reference("photos", "train", 32, max_samples=256)
    real = ev.compute_fid_kid(train.images, held_out, feature_extractor="photos-classifier", cache_root=cache_root)
    assert set(real) >= {"fid_photos_classifier", "kid_photos_classifier_mean"} and "fid_inception" not in real
    g = torch.Generator().manual_seed(0)
    noise = ev.compute_fid_kid(torch.rand(256, 3, 32, 32, generator=g), held_out, feature_extractor="photos-classifier",
                               cache_root=cache_root)
    gray = ev.digits_reference("test", 32).images.expand(-1, 3, -1, -1)  # grayscale digits, not photographs
    digits = ev.builtin_fid_kid(gray[:256], held_out, "photos")
    assert real["fid_photos_classifier"] * 5 < noise["fid_photos_classifier"]
    assert real["fid_photos_classifier"] * 5 < digits["fid_photos_classifier"]


def test_a_third_classifier_space_is_one_registration(cache_root):
    """Any classifier with features(), head and resolution becomes a torch-fidelity feature space by registration."""
    torch.manual_seed(0)
    tiny = PhotosClassifier(channels=(4, 4, 4), feature_dim=8, num_classes=2, resolution=16).eval()
    spec = ev.FeatureExtractor(
        "test-tiny-classifier", "tiny_classifier", "tiny classifier features", "features", channels=3,
        load=lambda path: tiny, to_input=to_photos_classifier_input,
        default_weights=lambda: os.path.join(ASSETS_DIR, "model.safetensors"),
    )
    ev.register_classifier_feature_extractor(spec)
    with pytest.raises(ValueError, match="already registered"):
        ev.register_classifier_feature_extractor(ev.FeatureExtractor("test-tiny-classifier", "other", "x", "features",
                                                                     load=lambda path: tiny))
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(40, 3, 16, 16, generator=g), torch.rand(40, 3, 16, 16, generator=g)
    out = ev.compute_fid_kid(a, b, feature_extractor="test-tiny-classifier", cache_root=cache_root)
    assert out["feature_extractor"] == "test-tiny-classifier" and out["fid_tiny_classifier"] >= 0
    assert ev.METRIC_DISPLAY_NAMES["fid_tiny_classifier"] == "FID (tiny classifier features)"


def test_photos_classifier_refuses_grayscale():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        to_photos_classifier_input(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
