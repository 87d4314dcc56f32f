"""Shared fixtures. ``fake_hub``: a fake Hugging Face Hub (see ``tests/fake_hub.py``) for push / load tests."""

import os
import sys
from urllib.parse import urlsplit

import pytest

from .fake_hub import FakeHub


@pytest.fixture(scope="session")
def fake_hub_server(tmp_path_factory):
    """One server for the whole session; ``fake_hub`` gives each test fresh storage and a fresh client cache."""
    hub = FakeHub(storage_dir=tmp_path_factory.mktemp("fake_hub_session"))
    hub.start()
    yield hub
    hub.stop()


def _point_huggingface_hub_at(hub: FakeHub, monkeypatch) -> None:
    """Make this process's huggingface_hub (and diffusers) talk to `hub` only, with a cache of its own.

    huggingface_hub reads its environment once, at import, into ``huggingface_hub.constants``; a few values are
    also copied elsewhere at import (the module-level ``HfApi`` behind ``model_info`` / ``create_repo`` /
    ``upload_folder`` / ..., the trusted-origin set used to follow redirects, diffusers' own copies).
    """
    import huggingface_hub.constants as constants
    from huggingface_hub import hf_api
    from huggingface_hub.utils import _http

    home = str(hub.hf_home)
    for var in FakeHub.CLIENT_VARS_TO_DROP:
        monkeypatch.delenv(var, raising=False)
    for var, value in hub.env.items():
        monkeypatch.setenv(var, value)

    endpoint = hub.base_url
    values = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {urlsplit(endpoint).hostname}),
        "HF_HOME": home,
        "HF_HUB_CACHE": str(hub.hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub.hub_cache),
        "default_cache_path": str(hub.hub_cache),
        "HF_ASSETS_CACHE": os.path.join(home, "assets"),
        "HUGGINGFACE_ASSETS_CACHE": os.path.join(home, "assets"),
        "default_assets_cache_path": os.path.join(home, "assets"),
        "HF_XET_CACHE": os.path.join(home, "xet"),
        "HF_TOKEN_PATH": os.path.join(home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": os.path.join(home, ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": os.path.join(home, ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": os.path.join(home, ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HUB_ETAG_TIMEOUT": constants.DEFAULT_ETAG_TIMEOUT,
        "_staging_mode": False,
    }
    for name, value in values.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)  # the HfApi() created at import
    monkeypatch.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {_http._url_origin(endpoint)}))

    # Copies made with `from ... import NAME` at import time, in modules already loaded.
    copies = {
        "huggingface_hub.utils._cache_manager": {"HF_HUB_CACHE": str(hub.hub_cache)},
        "huggingface_hub.utils._cache_assets": {"HF_ASSETS_CACHE": os.path.join(home, "assets")},
    }
    for module_name, attrs in copies.items():
        module = sys.modules.get(module_name)
        for name, value in attrs.items():
            if module is not None and hasattr(module, name):
                monkeypatch.setattr(module, name, value)
    diffusers_values = {
        "HUGGINGFACE_CO_RESOLVE_ENDPOINT": endpoint,
        "HF_MODULES_CACHE": os.path.join(home, "modules"),
        "HF_HUB_OFFLINE": False,
    }
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("diffusers"):
            continue
        for name, value in diffusers_values.items():
            if name in vars(module):
                monkeypatch.setattr(module, name, value)


@pytest.fixture
def fake_hub(fake_hub_server, tmp_path, monkeypatch):
    """A running fake Hub with empty storage, and this process pointed at it.

    ``fake_hub.base_url``, ``fake_hub.token`` (valid write token of ``fake_hub.user`` == "user"),
    ``fake_hub.env`` (variables a child process needs; no token, no HF_HUB_OFFLINE),
    ``fake_hub.subprocess_env()`` (os.environ cleaned of token / offline / cache variables, plus ``env``),
    ``fake_hub.seed_repo(repo_id, folder)``, ``fake_hub.list_files(repo_id)``, ``fake_hub.read_file(...)``,
    ``fake_hub.uploaded_paths(repo_id)``, ``fake_hub.requests`` (method, path, query, authorization, status),
    ``fake_hub.server_errors`` (tracebacks of crashes of the fake itself).
    """
    fake_hub_server.reset(storage_dir=tmp_path / "fake_hub_storage", hf_home=tmp_path / "hf_home")
    _point_huggingface_hub_at(fake_hub_server, monkeypatch)
    yield fake_hub_server
    assert not fake_hub_server.server_errors, "the fake hub crashed:\n" + "\n".join(fake_hub_server.server_errors)


# ---------------------------------------------------------------------- the training scripts and a tiny teacher
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_TEACHER_ARGS = [
    "--sample_size", "16", "--block_out_channels", "16", "32", "--norm_num_groups", "8", "--layers_per_block", "1",
    "--max_train_steps", "2", "--train_batch_size", "8", "--checkpointing_steps", "100", "--validation_steps", "100",
    "--num_inference_steps", "2", "--num_validation_images", "2", "--report_to", "none",
]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one intra-op thread on a small shared machine (and launched processes get
    OMP_NUM_THREADS=1); a module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_script(name: str, folder: str = "training"):
    """``<folder>/<name>.py`` (``training/`` or ``benchmarks/``, which are not packages) as a module,
    loaded once per session and registered in ``sys.modules`` (dataclasses look their module up there)."""
    import importlib.util

    module_name = f"_gfprune_script_{name}" if folder == "training" else f"_gfprune_{folder}_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(REPO_ROOT, folder, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A tiny digits DDPM teacher trained for 2 steps by ``training/train_ddpm.py`` (1 channel, 16 px,
    block_out_channels (16, 32), 8 GroupNorm groups, so its units come in eighths).

    Returns a dict: ``pipeline`` (a DDPMPipeline folder) and ``unet`` (a folder holding the bare UNet2DModel).
    """
    import shutil

    import torch

    root = tmp_path_factory.mktemp("tiny_teacher")
    pipeline = root / "pipeline"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: a second thread only contends with whatever else runs
    try:
        load_script("train_ddpm").main(["--dataset_name", "digits", "--output_dir", str(pipeline), *TINY_TEACHER_ARGS])
    finally:
        torch.set_num_threads(threads)
    bare = root / "bare_unet"
    shutil.copytree(pipeline / "unet", bare)
    return {"pipeline": str(pipeline), "unet": str(bare)}


TABLES = pytest.StashKey[list]()  # text tables test modules add with config.stash.setdefault(TABLES, []).append(...)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Tables that test modules register (``config.stash[TABLES]``), shown even without ``-s``."""
    for table in config.stash.get(TABLES, []):
        terminalreporter.write_line("")
        for line in table.splitlines():
            terminalreporter.write_line(line)
