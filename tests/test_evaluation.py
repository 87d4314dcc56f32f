"""Evaluation: FID/KID in digits-classifier features, Inception offline, SSIM, digit recognition, throughput.

Real digits of the held-out test split serve as the image set; no test downloads anything.
"""

import os
import subprocess
import sys
import time

import pytest
import torch

from diffusers_gfprune import evaluation as ev
from diffusers_gfprune.data import digits_arrays
from diffusers_gfprune.digits_classifier import ASSETS_DIR, CONFIG_NAME, WEIGHTS_NAME, load_digits_classifier

NOISE_LEVELS = (0.05, 0.15, 0.4)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One thread: the machine is shared, and the timings compare like with like."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def reference():
    return ev.digits_reference("test", resolution=16)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fidelity_cache")


def noisy(images_uint8, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = images_uint8.float() / 255.0
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def fid_results(reference, cache_root):
    """FID/KID of the test digits against themselves and against noisier copies (subsets of 100 for KID)."""
    results = {0.0: ev.compute_fid_kid(reference.images, reference, cache_root=cache_root, kid_subset_size=100)}
    for sigma in NOISE_LEVELS:
        results[sigma] = ev.compute_fid_kid(
            noisy(reference.images, sigma), reference, cache_root=cache_root, kid_subset_size=100
        )
    return results


# --------------------------------------------------------------------------------------------
# The shipped classifier
# --------------------------------------------------------------------------------------------


def test_shipped_classifier_is_small_safetensors_with_config():
    weights = os.path.join(ASSETS_DIR, WEIGHTS_NAME)
    assert os.path.getsize(weights) < 1_000_000
    assert os.path.isfile(os.path.join(ASSETS_DIR, CONFIG_NAME))
    model = load_digits_classifier()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.zeros(3, 1, 16, 16)
    assert model(x).shape == (3, 10) and model.features(x).shape == (3, 64)


def test_classifier_heldout_accuracy_and_recognition(reference):
    _, labels = digits_arrays("test")
    stats = ev.digits_accuracy(reference.images, labels=labels)
    assert stats["accuracy"] > 0.9
    assert stats["recognized_fraction"] > 0.9
    assert stats["num_images"] == 297 and sum(stats["label_counts"]) == 297
    assert abs(sum(stats["label_distribution"]) - 1.0) < 1e-9
    assert stats["label_entropy_bits"] > 3.0  # the test split is nearly balanced


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "black"])
def test_noise_is_not_recognized(kind):
    g = torch.Generator().manual_seed(1)
    shape = (300, 1, 16, 16)
    images = {
        "uniform": torch.rand(shape, generator=g),
        "gaussian": (0.5 + 0.5 * torch.randn(shape, generator=g)).clamp(0, 1),
        "black": torch.zeros(shape),
    }[kind]
    stats = ev.digits_accuracy(images)
    assert stats["recognized_fraction"] < 0.1
    assert stats["mean_confidence"] < 0.5


def test_classifier_input_errors_teach():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ev.digits_accuracy(torch.full((2, 1, 16, 16), -1.0))
    with pytest.raises(FileNotFoundError, match="train_digits_classifier.py"):
        load_digits_classifier("/nonexistent/folder")


# --------------------------------------------------------------------------------------------
# FID / KID in digits-classifier features
# --------------------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero(fid_results):
    assert abs(fid_results[0.0]["fid_digits_classifier"]) < 1e-3


def test_fid_grows_monotonically_with_noise(fid_results):
    fids = [fid_results[s]["fid_digits_classifier"] for s in (0.0,) + NOISE_LEVELS]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_kid_of_a_set_with_itself_is_near_zero(fid_results):
    same, far = fid_results[0.0], fid_results[NOISE_LEVELS[-1]]
    # The unbiased estimate scatters around 0 (slightly below, see compute_fid_kid): within its spread,
    # and tiny next to the KID of clearly different images.
    assert abs(same["kid_digits_classifier_mean"]) <= 2 * same["kid_digits_classifier_std"]
    assert abs(same["kid_digits_classifier_mean"]) < 0.1 * far["kid_digits_classifier_mean"]
    kids = [fid_results[s]["kid_digits_classifier_mean"] for s in NOISE_LEVELS]
    assert all(a < b for a, b in zip(kids, kids[1:])), kids


def test_results_are_named_after_the_digits_feature_space(fid_results):
    result = fid_results[0.0]
    assert result["feature_extractor"] == "digits-classifier"
    assert not any("inception" in key for key in result)
    assert ev.METRIC_DISPLAY_NAMES["fid_digits_classifier"] == "FID (digits classifier features)"
    assert "Inception" not in ev.METRIC_DISPLAY_NAMES["kid_digits_classifier_mean"]


def test_reference_statistics_are_cached(fid_results, reference, cache_root):
    name = fid_results[0.0]["reference_cache_name"]
    assert name.startswith("digits-test-r16-n297-") and "digits-classifier" in name
    cached = [f for f in os.listdir(cache_root) if f.startswith(name)]
    assert any("stat-fid" in f for f in cached) and any("features" in f for f in cached)
    again = ev.compute_fid_kid(noisy(reference.images, 0.15), reference, cache_root=cache_root, kid_subset_size=100)
    assert again["fid_digits_classifier"] == pytest.approx(fid_results[0.15]["fid_digits_classifier"], rel=1e-9)


def test_registration_is_idempotent_and_lazy():
    code = (
        "import sys, diffusers_gfprune.evaluation\n"
        "assert 'torch_fidelity' not in sys.modules, 'evaluation imported torch_fidelity at import time'\n"
        "import torch_fidelity.registry as r\n"
        "assert 'digits-classifier' not in r.FEATURE_EXTRACTORS_REGISTRY\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert ev.register_digits_feature_extractor() == "digits-classifier"
    cls = FEATURE_EXTRACTORS_REGISTRY["digits-classifier"]
    assert ev.register_digits_feature_extractor() == "digits-classifier"
    assert FEATURE_EXTRACTORS_REGISTRY["digits-classifier"] is cls


def test_fid_input_errors_teach(reference):
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        ev.compute_fid_kid(reference.images.float() / 127.5 - 1.0, reference)
    with pytest.raises(ValueError, match="feature_extractor must be one of"):
        ev.compute_fid_kid(reference.images, reference, feature_extractor="inception")
    with pytest.raises(ValueError, match="kid_subset_size"):
        ev.compute_fid_kid(reference.images[:10], reference, kid_subset_size=50)


# --------------------------------------------------------------------------------------------
# Inception, offline
# --------------------------------------------------------------------------------------------


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for var in ("DIFFUSERS_GFPRUNE_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert not os.path.exists(ev.inception_weights_cache_path())


def test_inception_offline_without_weights_raises_clear_error(empty_torch_home, reference, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ev.InceptionWeightsUnavailableError) as info:
        ev.compute_fid_kid(reference.images, reference, feature_extractor="inception-v3-compat")
    message = str(info.value)
    assert "Inception FID/KID cannot be computed here" in message
    assert "inception_weights=" in message and "HF_HUB_OFFLINE=1" in message
    assert time.perf_counter() - start < 30  # no network wait


def test_inception_unreachable_download_raises_clear_error(empty_torch_home, reference, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    # A closed local port: refused at once, and nothing is downloaded even where a network exists.
    monkeypatch.setattr(inception, "URL_INCEPTION_V3", "http://127.0.0.1:9/weights-inception-2015-12-05-6726825d.pth")
    with pytest.raises(ev.InceptionWeightsUnavailableError, match="cannot be downloaded"):
        ev.compute_fid_kid(reference.images, reference, feature_extractor="inception-v3-compat", network_timeout=2)


def test_inception_weights_path_must_exist(reference, tmp_path):
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        ev.compute_fid_kid(reference.images, reference, feature_extractor="inception-v3-compat",
                           inception_weights=tmp_path / "missing.pth")


# --------------------------------------------------------------------------------------------
# SSIM and paired sampling
# --------------------------------------------------------------------------------------------


def test_ssim_identical_is_one_and_different_is_less(reference):
    images = reference.images[:32].float() / 255.0
    assert abs(ev.ssim_vs_teacher(images, images.clone()) - 1.0) < 1e-6
    mean, per_image = ev.ssim_vs_teacher(images, noisy(reference.images[:32], 0.1), per_image=True)
    assert mean < 1.0 and per_image.shape == (32,) and bool((per_image < 1.0).all())
    with pytest.raises(ValueError, match="same shape"):
        ev.ssim_vs_teacher(images, images[:4])


def tiny_unet(channels, seed):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=channels,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()


def test_paired_samples_share_noise():
    from diffusers import DDPMScheduler

    teacher, other = tiny_unet((16, 32), 0), tiny_unet((16, 32), 1)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    a, b = ev.paired_samples(teacher, teacher, scheduler, num_images=4, num_inference_steps=4, batch_size=3)
    assert a.shape == (4, 1, 16, 16) and 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert ev.ssim_vs_teacher(a, b) == pytest.approx(1.0, abs=1e-6)
    c, d = ev.paired_samples(teacher, other, scheduler, num_images=4, num_inference_steps=4, batch_size=4)
    assert torch.allclose(c, a, atol=1e-5)  # same seed -> same teacher images, whatever the batch size
    assert ev.ssim_vs_teacher(c, d) < 1.0


# --------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------


def test_measure_throughput_structure():
    model = tiny_unet((16, 32), 0).train()
    result = ev.measure_throughput(model, batch_size=4, num_steps=3, warmup=1, repeats=3)
    assert model.training  # mode restored
    assert len(result.step_latencies_s) == 3
    assert 0 < result.step_latency_min_s <= result.step_latency_q25_s <= result.step_latency_median_s
    assert result.step_latency_median_s <= result.step_latency_q75_s <= result.step_latency_max_s
    assert result.images_per_second == pytest.approx(4 / (3 * result.step_latency_median_s))
    assert set(result.as_dict()) >= {"images_per_second", "step_latency_median_s", "step_latencies_s"}


def test_compare_throughput_self_and_wider_model():
    small = tiny_unet((16, 32), 0)
    same = ev.compare_throughput(small, small, batch_size=8, num_steps=3, warmup=1, repeats=8)
    assert len(same.ratios) == 8
    assert same.ratio_min <= same.ratio_q25 <= same.ratio <= same.ratio_q75 <= same.ratio_max
    assert same.ratio_min <= 1.0 <= same.ratio_max  # a model against itself: 1 lies within the spread

    wide = tiny_unet((64, 128), 0)  # 4x the channels, ~16x the MACs
    faster = ev.compare_throughput(wide, small, batch_size=8, num_steps=3, warmup=1, repeats=5)
    assert faster.ratio > 1.0 and faster.ratio_of_medians > 1.0
    assert faster.dense.step_latency_median_s > faster.pruned.step_latency_median_s


@pytest.mark.parametrize("num_images", [2, 3])
def test_digits_evaluation_at_the_smallest_sample_counts(num_images):
    """prune.py accepts --num_eval_images 2; the KID subsets must still have 2 images (half of 2 or 3 is 1)."""
    from diffusers import DDPMScheduler

    teacher, pruned = tiny_unet((16, 32), 0), tiny_unet((16, 32), 1)
    comparison = ev.evaluate_against_teacher(teacher, pruned, DDPMScheduler(num_train_timesteps=1000), num_images,
                                             num_inference_steps=2, digits=True, fid="auto")
    values = {m.key: m.value for m in comparison.metrics}
    assert values["fid_digits_classifier"] > 0 and values["kid_digits_classifier"] == values["kid_digits_classifier"]
    assert "KID subsets of 2" in next(m.how for m in comparison.metrics if m.key == "fid_digits_classifier")


def test_evaluation_keeps_uint8_samples_and_streams_ssim():
    """The samples are kept as uint8 (not float32) and the SSIM, computed batch by batch on the float samples, is the
    SSIM of the whole float set."""
    from diffusers import DDPMScheduler

    teacher, pruned = tiny_unet((16, 32), 0), tiny_unet((16, 32), 1)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    comparison = ev.evaluate_against_teacher(teacher, pruned, scheduler, 5, num_inference_steps=2, fid="none",
                                             batch_size=2, progress=False)
    assert comparison.teacher_images.dtype == comparison.pruned_images.dtype == torch.uint8
    floats = [ev.paired_samples(teacher, pruned, scheduler, n, 2, seed=start, batch_size=n) for start, n in ((0, 2), (2, 2), (4, 1))]
    t, p = torch.cat([a for a, _ in floats]), torch.cat([b for _, b in floats])
    ssim = next(m.value for m in comparison.metrics if m.key == "ssim_vs_teacher")
    assert ssim == pytest.approx(ev.ssim_vs_teacher(t, p), abs=1e-12)
    assert torch.equal(comparison.teacher_images, (t * 255).round().to(torch.uint8))
