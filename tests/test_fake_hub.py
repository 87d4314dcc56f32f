"""The fake Hub (tests/fake_hub.py) is faithful enough for huggingface_hub 2.4.0 and diffusers 0.42.1:
push with the real clients, load back in this process and in a fresh one, cards, errors, auth."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from huggingface_hub import (
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    create_repo,
    get_token,
    hf_hub_download,
    model_info,
    upload_folder,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash

from .fake_hub import git_blob_oid

# Runs in a fresh interpreter with only the fake hub's environment (no token): load and fingerprint the unet.
CHILD = r"""
import hashlib, json, sys
import torch
torch.set_num_threads(1)
from diffusers import DDPMPipeline
pipe = DDPMPipeline.from_pretrained(sys.argv[1])
h = hashlib.sha256()
for k, v in sorted(pipe.unet.state_dict().items()):
    h.update(k.encode())
    h.update(v.detach().cpu().contiguous().numpy().tobytes())
print(json.dumps({
    "checksum": h.hexdigest(),
    "unet": type(pipe.unet).__name__,
    "scheduler": type(pipe.scheduler).__name__,
    "num_train_timesteps": pipe.scheduler.config.num_train_timesteps,
}))
"""


def _checksum(module):
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _tiny_pipeline(seed=0):
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=37))


@pytest.fixture
def saved_pipeline(tmp_path):
    pipe = _tiny_pipeline()
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    return pipe, folder


def _local_files(folder):
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_push_pipeline_then_load_in_fresh_process(fake_hub, saved_pipeline, tmp_path):
    pipe, folder = saved_pipeline
    # A training leftover that must not be pushed.
    (folder / "checkpoint-100").mkdir()
    (folder / "checkpoint-100" / "optimizer.bin").write_bytes(b"\x01" * 64)
    expected = {f for f in _local_files(folder) if not f.startswith("checkpoint-")}
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json"} <= expected

    url = create_repo("user/tiny", token=fake_hub.token, private=False, exist_ok=True)
    assert url.repo_id == "user/tiny" and url.startswith(fake_hub.base_url)
    create_repo("user/tiny", token=fake_hub.token, exist_ok=True)  # the server answers 409, the client accepts it
    info = upload_folder(repo_id="user/tiny", folder_path=folder, token=fake_hub.token,
                         ignore_patterns=["checkpoint-*"], commit_message="Upload tiny DDPM")
    assert info.oid == fake_hub.head("user/tiny")

    # The server saw exactly the pipeline files, inline, and no checkpoint folder.
    uploaded = fake_hub.uploaded_paths("user/tiny")
    assert set(uploaded) == expected and len(uploaded) == len(expected)
    assert not any(p.startswith("checkpoint-") for p in uploaded)
    assert set(fake_hub.list_files("user/tiny")) == expected | {".gitattributes"}
    for path in expected:
        assert fake_hub.read_file("user/tiny", path) == (folder / path).read_bytes()
        assert (fake_hub.repo_path("user/tiny") / path).read_bytes() == (folder / path).read_bytes()
    assert [c.title for c in fake_hub.commits("user/tiny")] == ["Upload tiny DDPM", "initial commit"]

    # Every write carried the token.
    writes = [r for r in fake_hub.requests if r.method == "POST" and "validate-yaml" not in r.path]
    assert {r.path.rsplit("/", 1)[0] for r in writes} >= {
        "/api/repos", "/api/models/user/tiny/preupload", "/api/models/user/tiny/commit"}
    assert all(r.authorization == f"Bearer {fake_hub.token}" for r in writes)

    # Pushing the same folder again sends nothing: the server's preupload oids match the local files.
    upload_folder(repo_id="user/tiny", folder_path=folder, token=fake_hub.token, ignore_patterns=["checkpoint-*"])
    assert len(fake_hub.uploaded_paths("user/tiny")) == len(expected)

    # A fresh interpreter, no token, only the fake hub's environment.
    n_before = len(fake_hub.requests)
    env = fake_hub.subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    assert "HF_TOKEN" not in env and "HF_HUB_OFFLINE" not in env and env["HF_ENDPOINT"] == fake_hub.base_url
    result = subprocess.run([sys.executable, "-c", CHILD, "user/tiny"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    child = json.loads(result.stdout.strip().splitlines()[-1])
    assert child == {"checksum": _checksum(pipe.unet), "unet": "UNet2DModel", "scheduler": "DDPMScheduler",
                     "num_train_timesteps": 37}

    child_requests = fake_hub.requests[n_before:]
    assert all(r.authorization is None for r in child_requests)
    got = {r.path for r in child_requests if r.method == "GET" and "/resolve/" in r.path}
    assert any(p.endswith("/unet/diffusion_pytorch_model.safetensors") for p in got)
    assert all(r.status in (200, 206) for r in child_requests), [(r.method, r.path, r.status) for r in child_requests]


def test_unet_from_pretrained_subfolder_and_bare_repo(fake_hub, saved_pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "user/..." must not resolve to a local folder
    pipe, folder = saved_pipeline
    fake_hub.seed_repo("user/tiny", folder)

    unet = UNet2DModel.from_pretrained("user/tiny", subfolder="unet")
    assert _checksum(unet) == _checksum(pipe.unet)

    # A bare UNet repo (config.json + weights at the root), pushed by diffusers' own push_to_hub.
    pipe.unet.push_to_hub("user/bare-unet", token=fake_hub.token)
    files = set(fake_hub.list_files("user/bare-unet"))
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md"} <= files
    bare = UNet2DModel.from_pretrained("user/bare-unet")
    assert _checksum(bare) == _checksum(pipe.unet)

    # Sizes and oids in the tree listing are what the client computes from the bytes.
    tree = [e for e in HfApi().list_repo_tree("user/bare-unet", recursive=True) if isinstance(e, RepoFile)]
    assert {e.path for e in tree} == files
    for entry in tree:
        data = fake_hub.read_file("user/bare-unet", entry.path)
        assert entry.size == len(data) and entry.blob_id == git_hash(data) == git_blob_oid(data)
    info = HfApi().model_info("user/tiny", files_metadata=True)
    assert info.sha == fake_hub.head("user/tiny")
    assert {s.rfilename: s.size for s in info.siblings} == {
        p: len(fake_hub.read_file("user/tiny", p)) for p in fake_hub.list_files("user/tiny")}
    assert [e.path for e in HfApi().list_repo_tree("user/tiny", "unet")] == [
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]


def test_model_card_push_and_load(fake_hub):
    create_repo("user/tiny", token=fake_hub.token)
    data = ModelCardData(
        base_model="google/ddpm-cifar10-32",
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        model_name="tiny-ddpm",
        tags=["pruning"],
        eval_results=[EvalResult(task_type="unconditional-image-generation", dataset_type="cifar10",
                                 dataset_name="CIFAR-10", metric_type="fid", metric_value=12.5, metric_name="FID")],
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# tiny-ddpm\n\nA pruned DDPM.\n")
    card.push_to_hub("user/tiny", token=fake_hub.token)
    assert fake_hub.request_paths("POST").count("/api/validate-yaml") == 2  # card.validate + create_commit

    loaded = ModelCard.load("user/tiny")
    assert loaded.data.base_model == "google/ddpm-cifar10-32"
    assert loaded.data.library_name == "diffusers"
    assert loaded.data.pipeline_tag == "unconditional-image-generation"
    assert loaded.data.model_name == "tiny-ddpm"
    (result,) = loaded.data.eval_results
    assert (result.dataset_type, result.metric_type, result.metric_value) == ("cifar10", "fid", 12.5)
    assert loaded.data.to_dict()["model-index"][0]["results"][0]["metrics"][0]["value"] == 12.5
    assert "# tiny-ddpm" in loaded.text

    info = model_info("user/tiny")  # the Hub lifts some card metadata into the repo info
    assert info.library_name == "diffusers" and info.pipeline_tag == "unconditional-image-generation"
    assert "base_model:google/ddpm-cifar10-32" in info.tags and "pruning" in info.tags

    # Metadata the Hub rejects is refused before anything is committed.
    head = fake_hub.head("user/tiny")
    with pytest.raises(ValueError, match="Invalid metadata"):
        HfApi().upload_file(path_or_fileobj=b"---\nmodel-index: 3\n---\n", path_in_repo="README.md",
                            repo_id="user/tiny", token=fake_hub.token)
    assert fake_hub.head("user/tiny") == head


def test_errors_and_auth(fake_hub, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"a": 1}')
    fake_hub.seed_repo("user/tiny", tmp_path / "src")
    fake_hub.seed_repo("user/secret", tmp_path / "src", private=True)
    api = HfApi()
    assert get_token() is None  # the fixture hides any real token from this process

    # Writes without a (valid) token are refused and change nothing.
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("user/new", token=False)
    assert err.value.response.status_code == 401 and "user/new" not in fake_hub.repos
    for token in (False, "hf_not_a_valid_token"):
        with pytest.raises(HfHubHTTPError) as err:
            api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="user/tiny", token=token)
        assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("someone-else/new", token=fake_hub.token)
    assert err.value.response.status_code == 403
    assert fake_hub.list_files("user/tiny") == [".gitattributes", "config.json"]
    assert fake_hub.uploaded_paths() == []
    unauthorized = [r for r in fake_hub.requests if r.status == 401]
    assert {r.authorization for r in unauthorized} == {None, "Bearer hf_not_a_valid_token"}

    # Tokens: whoami, and the wrong one.
    assert api.whoami(token=fake_hub.token)["name"] == fake_hub.user
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        api.whoami(token="hf_not_a_valid_token")

    # Missing repo, missing file, missing revision: the client's own errors.
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        model_info("user/missing")
    with pytest.raises(RemoteEntryNotFoundError) as err:
        hf_hub_download("user/tiny", "missing.json")
    assert isinstance(err.value, EntryNotFoundError)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("user/tiny", "config.json", revision="no-such-branch")

    # A private repo is invisible without the owner's token, readable with it.
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/secret", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        model_info("user/secret")
    create_repo("user/private-new", private=True, token=fake_hub.token)
    assert fake_hub.repos["user/private-new"].private
    with pytest.raises(RepositoryNotFoundError):
        HfApi().list_repo_files("user/private-new")
    path = hf_hub_download("user/secret", "config.json", token=fake_hub.token)
    assert json.loads(open(path).read()) == {"a": 1}
    assert model_info("user/secret", token=fake_hub.token).private is True

    # An older commit stays downloadable by sha after main moved on.
    old = fake_hub.head("user/tiny")
    api.upload_file(path_or_fileobj=b'{"a": 2}', path_in_repo="config.json", repo_id="user/tiny",
                    token=fake_hub.token)
    assert fake_hub.head("user/tiny") != old
    assert json.loads(open(hf_hub_download("user/tiny", "config.json", revision=old)).read()) == {"a": 1}
    assert json.loads(open(hf_hub_download("user/tiny", "config.json")).read()) == {"a": 2}
    assert fake_hub.uploaded_paths("user/tiny") == ["config.json"]


@pytest.mark.parametrize("criterion, process, phrase, tag", [
    ("magnitude", "progressive", "by magnitude scores, through a progressive soft and hard pruning stage", "criterion-magnitude"),
    ("gradient_flow (loss_change)", "progressive", "with gradient flow, through a progressive", "gradient-flow"),
    ("diff_pruning", "one-shot", "by diff_pruning scores, in one shot, then fine-tuned", "criterion-diff-pruning"),
])
def test_card_names_the_criterion_that_was_used(criterion, process, phrase, tag):
    """A magnitude-pruned model's card does not claim gradient flow (the default criterion is magnitude)."""
    from diffusers_gfprune import hub

    assert hub.method_phrase(criterion, process).startswith(phrase) and hub.method_tag(criterion) == tag
    if not criterion.startswith("gradient_flow"):
        assert "gradient flow" not in hub.method_phrase(criterion, process)
