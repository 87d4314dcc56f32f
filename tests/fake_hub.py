"""A fake Hugging Face Hub for the tests: standard library only, served on 127.0.0.1.

It implements the routes that huggingface_hub 2.4.0 and diffusers 0.42.1 really call to create a repo,
push a folder or a model card, read repo info and trees, and download files (``hf_hub_download`` /
``snapshot_download`` / ``DiffusionPipeline.from_pretrained`` / ``ModelMixin.from_pretrained``):

====== ============================================================ ======================================
method route                                                        used by
====== ============================================================ ======================================
GET    /api/whoami-v2                                               ``whoami``
POST   /api/repos/create                                            ``create_repo`` (409 + url if it exists)
DELETE /api/repos/delete                                            ``delete_repo``
POST   /api/validate-yaml                                           ``ModelCard.validate``, README commits
GET    /api/models/{ns}/{name}[/revision/{rev}]                     ``model_info`` / ``repo_info``
GET    /api/models/{ns}/{name}/tree/{rev}[/{path}]                  ``list_repo_tree`` (``?recursive=``)
POST   /api/models/{ns}/{name}/paths-info/{rev}                     ``get_paths_info``
GET    /api/models/{ns}/{name}/refs                                 ``list_repo_refs``
GET    /api/models/{ns}/{name}/commits/{rev}                        ``list_repo_commits``
POST   /api/models/{ns}/{name}/preupload/{rev}                      ``create_commit`` (every file "regular")
POST   /api/models/{ns}/{name}/commit/{rev}                         ``create_commit`` (NDJSON, inline base64)
GET    /api/agent-harnesses, POST /api/telemetry/...                side calls, answered with empty JSON
GET    /{ns}/{name}/resolve/{rev}/{path}  (and HEAD)                ``hf_hub_download``
====== ============================================================ ======================================

Every file is answered with upload mode "regular", so its content arrives inline in the commit and no LFS
or Xet transfer ever happens; trees and HEAD responses carry no ``lfs`` / ``xetHash`` / ``X-Xet-*`` data, so
downloads are plain HTTP GETs of ``/resolve/`` (no redirect). An ``lfsFile`` commit line is refused (400).

Errors follow the Hub: ``X-Error-Code: RepoNotFound`` (401 anonymous / 404 authenticated, also for a private
repo the caller may not read), ``RevisionNotFound`` (404), ``EntryNotFound`` (404, with ``X-Repo-Commit``),
401 for writes without a valid ``Authorization: Bearer <token>``, 401 "Invalid credentials in Authorization
header" for an unknown token, 403 for writes outside the token owner's namespace.

Storage: ``storage_dir/repos/{ns}/{name}/`` holds the files of ``main`` as plain files, ``storage_dir/blobs/``
holds every committed content by git blob oid, so every commit sha stays resolvable. Every request is
recorded (:attr:`FakeHub.requests`), and every path received in a commit payload
(:meth:`FakeHub.uploaded_paths`).
"""

from __future__ import annotations

import base64
import copy
import fnmatch
import hashlib
import json
import mimetypes
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_TOKEN = "hf_fake_write_token_0123456789"
DEFAULT_USER = "user"

# What the Hub puts in the first commit of every new model repo.
GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)

_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob, as the Hub reports it in `oid` / `blobId` / ETag for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


@dataclass
class RequestRecord:
    method: str
    path: str  # URL path as sent (still percent-encoded), without the query
    query: str
    authorization: str | None
    headers: dict
    status: int | None = None
    thread: str = ""


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    date: str
    author: str
    files: dict  # path -> (blob oid, size), the full tree after this commit
    added: list = field(default_factory=list)  # paths whose content arrived in this commit's payload
    deleted: list = field(default_factory=list)


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str
    branches: dict = field(default_factory=dict)  # name -> commit oid
    commits: dict = field(default_factory=dict)  # oid -> Commit
    history: list = field(default_factory=list)  # commit oids, oldest first


def _parse_frontmatter(text: str) -> tuple[list[str] | None, str]:
    """The YAML lines between the leading `---` fences of a card (None if there are none), and the body."""
    text = text.lstrip("\ufeff")
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return None, text
    for i in range(1, len(lines)):
        if lines[i].strip() == "---":
            return lines[1:i], "\n".join(lines[i + 1 :])
    return None, text


def _simple_metadata(yaml_lines: list[str]) -> dict:
    """Top-level scalars and simple lists of a card's YAML header. Not a YAML parser: enough for
    `library_name`, `pipeline_tag`, `tags`, `base_model`, which the Hub lifts into `model_info`."""
    meta: dict = {}
    key = None
    for line in yaml_lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.match(r"^([A-Za-z0-9_-]+):\s*(.*)$", line)
        if m:
            key, value = m.group(1), m.group(2).strip()
            if value == "":
                meta[key] = []
            elif value.startswith("[") and value.endswith("]"):
                meta[key] = [v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip()]
            else:
                meta[key] = value.strip("'\"")
            continue
        m = re.match(r"^\s*-\s+(.*)$", line)
        if m and key is not None and isinstance(meta.get(key), list):
            item = m.group(1).strip()
            if not re.match(r"^[A-Za-z0-9_-]+:", item):  # a list of mappings (model-index): not a scalar list
                meta[key].append(item.strip("'\""))
        elif key is not None and line[:1].isspace():
            continue  # nested content of a complex key
    return meta


def _validate_card(content: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) the way /api/validate-yaml reports them; a light subset of the Hub's checks."""
    errors, warnings = [], []
    yaml_lines, _ = _parse_frontmatter(content)
    if yaml_lines is None or not any(line.strip() for line in yaml_lines):
        warnings.append("empty or missing yaml metadata in repo card")
        return errors, warnings
    for line in yaml_lines:
        if line[: len(line) - len(line.lstrip())].count("\t"):
            errors.append(f"Invalid YAML in card metadata: tab used for indentation ({line!r})")
    top = {m.group(1): m.group(2) for m in (re.match(r"^([A-Za-z0-9_-]+):\s*(.*)$", l) for l in yaml_lines) if m}
    if "model-index" in top:
        idx = yaml_lines.index(next(l for l in yaml_lines if l.startswith("model-index:")))
        following = next((l for l in yaml_lines[idx + 1 :] if l.strip()), "")
        if top["model-index"].strip() or not following.lstrip().startswith("- "):
            errors.append('"model-index" must be an array')
    return errors, warnings


def _gitignore_matches(patterns: list[str], path: str) -> bool:
    """A small subset of .gitignore: plain / glob patterns, `dir/` patterns, `/anchored` patterns; no negation."""
    parts = path.split("/")
    for pattern in patterns:
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#") or pattern.startswith("!"):
            continue
        dir_only = pattern.endswith("/")
        pattern = pattern.rstrip("/")
        anchored = "/" in pattern
        pattern = pattern.lstrip("/")
        if anchored:
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            candidates = prefixes[:-1] if dir_only else prefixes
            if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
                return True
        else:
            candidates = parts[:-1] if dir_only else parts
            if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
                return True
    return False


class FakeHub:
    """The fake Hub server. Use as a context manager or call :meth:`start` / :meth:`stop`.

    Attributes: ``base_url`` (``http://127.0.0.1:<port>``), ``token`` (the one valid write token),
    ``user`` (its owner), ``tokens`` (token -> user; add more with :meth:`add_token`), ``storage_dir``,
    ``hf_home`` / ``hub_cache`` (client-side folders that :attr:`env` points a child process at).
    """

    def __init__(self, storage_dir: str | os.PathLike | None = None, token: str = DEFAULT_TOKEN, user: str = DEFAULT_USER):
        self.token = token
        self.user = user
        self.tokens: dict[str, str] = {token: user}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._own_tmp: tempfile.TemporaryDirectory | None = None
        self._counter = 0
        self.repos: dict[str, Repo] = {}
        self._requests: list[RequestRecord] = []
        self._uploads: dict[str, list[str]] = {}
        self.server_errors: list[str] = []  # tracebacks of handler crashes (answered with 500)
        if storage_dir is None:
            self._own_tmp = tempfile.TemporaryDirectory(prefix="fake_hub_")
            storage_dir = self._own_tmp.name
        self.storage_dir = Path(storage_dir)
        self.hf_home = self.storage_dir / "client_hf_home"
        self.hub_cache = self.hf_home / "hub"
        self._init_storage()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeHub":
        if self._server is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._own_tmp is not None:
            self._own_tmp.cleanup()
            self._own_tmp = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("fake hub is not started")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self, storage_dir: str | os.PathLike | None = None, hf_home: str | os.PathLike | None = None) -> None:
        """Forget every repo, request and token but the default one; optionally move the storage / client home."""
        with self._lock:
            if storage_dir is not None:
                self.storage_dir = Path(storage_dir)
            if hf_home is not None:
                self.hf_home = Path(hf_home)
                self.hub_cache = self.hf_home / "hub"
            self.repos.clear()
            self._requests.clear()
            self._uploads.clear()
            self.server_errors.clear()
            self.tokens = {self.token: self.user}
            self._init_storage()

    def _init_storage(self) -> None:
        for sub in ("repos", "blobs"):
            path = self.storage_dir / sub
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
        self.hub_cache.mkdir(parents=True, exist_ok=True)

    def add_token(self, token: str, user: str) -> None:
        with self._lock:
            self.tokens[token] = user

    # ------------------------------------------------------------------ client environment
    @property
    def env(self) -> dict[str, str]:
        """What a child process needs in its environment to talk to this server (and to nothing else)."""
        return {
            "HF_ENDPOINT": self.base_url,
            "HF_HOME": str(self.hf_home),
            "HF_HUB_CACHE": str(self.hub_cache),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        }

    # Variables of the parent's environment that would leak a token, force offline mode or another endpoint.
    CLIENT_VARS_TO_DROP = (
        "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
        "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN", "HUGGINGFACE_CO_STAGING", "HUGGINGFACE_HUB_CACHE",
        "HUGGINGFACE_ASSETS_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_MODULES_CACHE", "HF_HUB_ETAG_TIMEOUT",
    )

    def subprocess_env(self, token: str | None = None, base: dict | None = None) -> dict[str, str]:
        """A full environment for `subprocess.run(..., env=...)`: `base` (default `os.environ`) without the
        variables above, plus :attr:`env`, plus `HF_TOKEN` if a token is given."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if k not in self.CLIENT_VARS_TO_DROP}
        env.update(self.env)
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    # ------------------------------------------------------------------ inspection helpers
    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def request_paths(self, method: str | None = None) -> list[str]:
        """Decoded request paths (no query), optionally only those of one method."""
        return [unquote(r.path) for r in self.requests if method is None or r.method == method]

    def authorization_headers(self) -> list[str | None]:
        return [r.authorization for r in self.requests]

    def uploaded_paths(self, repo_id: str | None = None) -> list[str]:
        """Every path whose content arrived in a commit payload (all commits, in order; all repos if None)."""
        with self._lock:
            if repo_id is not None:
                return list(self._uploads.get(repo_id, []))
            return [p for paths in self._uploads.values() for p in paths]

    def commits(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """Commits reachable from `revision`, newest first."""
        with self._lock:
            repo = self.repos[repo_id]
            oid = self._resolve(repo, revision)
            out = []
            while oid is not None:
                commit = repo.commits[oid]
                out.append(copy.deepcopy(commit))
                oid = commit.parent
            return out

    def list_files(self, repo_id: str, revision: str = "main") -> list[str]:
        with self._lock:
            repo = self.repos[repo_id]
            return sorted(repo.commits[self._resolve(repo, revision)].files)

    def read_file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        with self._lock:
            repo = self.repos[repo_id]
            oid, _ = repo.commits[self._resolve(repo, revision)].files[path]
        return (self.storage_dir / "blobs" / oid).read_bytes()

    def repo_path(self, repo_id: str) -> Path:
        """The folder holding the repo's `main` files as plain files."""
        return self.storage_dir / "repos" / repo_id

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self._lock:
            return self.repos[repo_id].branches[branch]

    # ------------------------------------------------------------------ seeding (no HTTP)
    def create_repo(self, repo_id: str, private: bool = False) -> str:
        """Create a repo with the Hub's initial commit (a `.gitattributes`); returns the commit sha."""
        with self._lock:
            if repo_id in self.repos:
                raise ValueError(f"{repo_id} already exists")
            ns, name = repo_id.split("/")
            self.repos[repo_id] = Repo(repo_id=repo_id, private=private, created_at=_now_iso())
            self.repo_path(repo_id).mkdir(parents=True, exist_ok=True)
            return self._commit(
                self.repos[repo_id], "main", "initial commit", "", ns,
                additions={".gitattributes": GITATTRIBUTES.encode()}, deletions=[], record=False,
            )

    def seed_repo(self, repo_id: str, folder: str | os.PathLike, private: bool = False, path_in_repo: str = "",
                  commit_message: str = "Upload folder") -> str:
        """Create `repo_id` if needed and commit every file of `folder` to `main`; returns the commit sha."""
        folder = Path(folder)
        additions = {}
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and not (rel.startswith(".git/") or rel.startswith(".cache/huggingface/")):
                additions[(path_in_repo.strip("/") + "/" + rel).lstrip("/")] = path.read_bytes()
        with self._lock:
            if repo_id not in self.repos:
                self.create_repo(repo_id, private=private)
            return self._commit(self.repos[repo_id], "main", commit_message, "", repo_id.split("/")[0],
                                additions=additions, deletions=[], record=False)

    # ------------------------------------------------------------------ internals
    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests.append(record)

    def _resolve(self, repo: Repo, revision: str) -> str:
        revision = str(revision)
        if revision in repo.branches:
            return repo.branches[revision]
        if _HEX40.match(revision) and revision in repo.commits:
            return revision
        if re.fullmatch(r"[0-9a-f]{7,39}", revision):
            matches = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _commit(self, repo: Repo, branch: str, title: str, description: str, author: str, *,
                additions: dict, deletions: list, deleted_folders: list = (), parent_commit: str | None = None,
                record: bool = True) -> str:
        with self._lock:
            parent = repo.branches.get(branch)
            if parent_commit is not None and (parent is None or not parent.startswith(parent_commit)):
                raise HubError(412, f"Parent commit {parent_commit} is not the head of {branch} ({parent})")
            files = dict(repo.commits[parent].files) if parent else {}
            deleted = []
            for path in deletions:
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
                deleted.append(path)
            for folder in deleted_folders:
                inside = [p for p in files if p.startswith(folder.rstrip("/") + "/")]
                if not inside:
                    raise HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
                for p in inside:
                    del files[p]
                    deleted.append(p)
            for path, data in additions.items():
                oid = git_blob_oid(data)
                blob = self.storage_dir / "blobs" / oid
                if not blob.exists():
                    blob.write_bytes(data)
                files[path] = (oid, len(data))
            self._counter += 1
            seed = json.dumps([parent, title, time.time_ns(), self._counter, sorted(files.items())])
            oid = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[oid] = Commit(oid=oid, parent=parent, title=title, description=description,
                                       date=_now_iso(), author=author, files=files,
                                       added=list(additions), deleted=deleted)
            repo.history.append(oid)
            repo.branches[branch] = oid
            if record:
                self._uploads.setdefault(repo.repo_id, []).extend(additions)
            if branch == "main":
                self._write_working_tree(repo, additions, deleted)
            return oid

    def _write_working_tree(self, repo: Repo, additions: dict, deleted: list) -> None:
        root = self.repo_path(repo.repo_id)
        for path in deleted:
            target = root / path
            if target.exists():
                target.unlink()
            parent = target.parent
            while parent != root and parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        for path, data in additions.items():
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


def _tree_entries(files: dict, base: str, recursive: bool) -> list[dict] | None:
    """Tree listing entries under `base` ('' = root), like GET /api/models/{repo}/tree; None if `base` is no folder."""
    prefix = base.strip("/") + "/" if base.strip("/") else ""
    dirs: dict[str, list] = {}
    entries = []
    found = False
    for path, (oid, size) in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        found = True
        rest = path[len(prefix):].split("/")
        for depth in range(1, len(rest)):
            dirs.setdefault(prefix + "/".join(rest[:depth]), []).append(f"{path}:{oid}")
        if recursive or len(rest) == 1:
            entries.append({"type": "file", "oid": oid, "size": size, "path": path})
    if not found:
        return None
    for d, content in dirs.items():
        if recursive or "/" not in d[len(prefix):]:
            entries.append({"type": "directory", "oid": hashlib.sha1("\n".join(content).encode()).hexdigest(),
                            "size": 0, "path": d})
    # The Hub lists folders before files at each level; sorting by (parent, kind, name) is close enough.
    entries.sort(key=lambda e: (e["path"].rsplit("/", 1)[0] if "/" in e["path"] else "", e["type"] != "directory", e["path"]))
    return entries


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60
    hub: FakeHub  # set on the bound subclass

    def log_message(self, format, *args):  # quiet
        pass

    # -------------------------------------------------------------- plumbing
    def do_GET(self):
        self._handle()

    def do_HEAD(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def do_PUT(self):
        self._handle()

    def do_DELETE(self):
        self._handle()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self):
        split = urlsplit(self.path)
        self.record = RequestRecord(
            method=self.command, path=split.path, query=split.query,
            authorization=self.headers.get("Authorization"), headers=dict(self.headers.items()),
            thread=threading.current_thread().name,
        )
        self.hub._record(self.record)
        self.query = parse_qs(split.query)
        try:
            self.body = self._read_body()
            self._route([unquote(s) for s in split.path.split("/")[1:]])
        except HubError as e:
            self._error(e)
        except Exception:  # a bug in the fake: answer 500 and keep the traceback for the test to show
            import traceback

            self.hub.server_errors.append(traceback.format_exc())
            self._error(HubError(500, "fake hub crashed: " + traceback.format_exc().splitlines()[-1]))

    def send_response(self, code, message=None):
        self.record.status = code
        super().send_response(code, message)

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json; charset=utf-8"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, payload, status: int = 200, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, e: HubError):
        headers = dict(e.headers)
        headers["X-Error-Message"] = e.message.encode("ascii", "replace").decode()
        if e.code:
            headers["X-Error-Code"] = e.code
        self._json({"error": e.message}, e.status, headers)

    def _json_body(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}")

    # -------------------------------------------------------------- auth
    def _user(self) -> str | None:
        """The token's user, None when no Authorization header; 401 for an unknown token."""
        auth = self.record.authorization
        if auth is None:
            return None
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        user = self.hub.tokens.get(token) if token else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _repo_for_read(self, repo_id: str) -> Repo:
        user = self._user()
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and user != repo_id.split("/")[0]):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _repo_for_write(self, repo_id: str) -> tuple[Repo, str]:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to write (send `Authorization: Bearer <token>`)")
        repo = self._repo_for_read(repo_id)
        if repo_id.split("/")[0] != user:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo, user

    # -------------------------------------------------------------- routing
    def _route(self, seg: list[str]):
        m = self.command
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if rest == ["whoami-v2"] and m == "GET":
                return self._whoami()
            if rest == ["repos", "create"] and m == "POST":
                return self._create_repo()
            if rest == ["repos", "delete"] and m == "DELETE":
                return self._delete_repo()
            if rest == ["validate-yaml"] and m == "POST":
                return self._validate_yaml()
            if rest == ["agent-harnesses"] and m == "GET":
                return self._json({"standardEnvVars": [], "harnesses": {}})
            if rest[:1] == ["telemetry"]:
                return self._json({})
            if len(rest) >= 3 and rest[0] in ("models", "datasets", "spaces", "kernels"):
                if rest[0] != "models":
                    raise HubError(404, f"The fake hub only serves model repos ({rest[0]})", "RepoNotFound")
                repo_id, tail = f"{rest[1]}/{rest[2]}", rest[3:]
                if not tail and m == "GET":
                    return self._model_info(repo_id, "main")
                if tail[:1] == ["revision"] and len(tail) >= 2 and m == "GET":
                    return self._model_info(repo_id, "/".join(tail[1:]))
                if tail[:1] == ["tree"] and len(tail) >= 2 and m == "GET":
                    return self._tree(repo_id, tail[1], "/".join(tail[2:]))
                if tail[:1] == ["paths-info"] and len(tail) >= 2 and m == "POST":
                    return self._paths_info(repo_id, "/".join(tail[1:]))
                if tail == ["refs"] and m == "GET":
                    return self._refs(repo_id)
                if tail[:1] == ["commits"] and len(tail) >= 2 and m == "GET":
                    return self._commits(repo_id, "/".join(tail[1:]))
                if tail[:1] == ["preupload"] and len(tail) >= 2 and m == "POST":
                    return self._preupload(repo_id, "/".join(tail[1:]))
                if tail[:1] == ["commit"] and len(tail) >= 2 and m == "POST":
                    return self._create_commit(repo_id, "/".join(tail[1:]))
        elif len(seg) >= 5 and seg[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve_file(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        elif len(seg) >= 6 and seg[0] in ("datasets", "spaces", "kernels") and seg[3] == "resolve":
            raise HubError(404, "The fake hub only serves model repos", "RepoNotFound")
        raise HubError(404, f"Route not implemented by the fake hub: {m} {self.record.path}")

    # -------------------------------------------------------------- endpoints
    def _whoami(self):
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        self._json({
            "type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user,
            "fullname": user.title(), "email": f"{user}@example.com", "emailVerified": True,
            "isPro": False, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "fake-hub", "role": "write"}},
        })

    def _create_repo(self):
        user = self._user()
        payload = self._json_body()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        repo_type = payload.get("type") or "model"
        if repo_type != "model":
            raise HubError(400, f"The fake hub only creates model repos, not {repo_type!r}")
        name, org = payload.get("name") or "", payload.get("organization") or user
        if not _REPO_NAME.match(name) or "--" in name or ".." in name or name.endswith((".", "-")):
            raise HubError(400, f"Invalid repo name: {name!r}")
        if org != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {org!r}")
        repo_id = f"{org}/{name}"
        url = f"{self.hub.base_url}/{repo_id}"
        with self.hub._lock:
            if repo_id in self.hub.repos:
                return self._json({"error": "You already created this model repo", "url": url}, 409)
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.hub.create_repo(repo_id, private=private)
        self._json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _delete_repo(self):
        payload = self._json_body()
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to delete a repo")
        repo_id = f"{payload.get('organization') or user}/{payload.get('name')}"
        with self.hub._lock:
            self._repo_for_write(repo_id)
            del self.hub.repos[repo_id]
            shutil.rmtree(self.hub.repo_path(repo_id), ignore_errors=True)
        self._json({})

    def _validate_yaml(self):
        payload = self._json_body()
        errors, warnings = _validate_card(payload.get("content") or "")
        body = {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}
        self._json(body, 400 if errors else 200)

    def _model_info(self, repo_id: str, revision: str):
        with self.hub._lock:
            repo = self._repo_for_read(repo_id)
            commit = repo.commits[self.hub._resolve(repo, revision)]
            files = dict(commit.files)
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, (oid, size) in sorted(files.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=size, blobId=oid)
            siblings.append(sibling)
        meta = {}
        if "README.md" in files:
            yaml_lines, _ = _parse_frontmatter(self.hub.read_file(repo_id, "README.md", commit.oid).decode("utf-8", "replace"))
            meta = _simple_metadata(yaml_lines or [])
        tags = list(meta.get("tags") or []) if isinstance(meta.get("tags"), list) else []
        if isinstance(meta.get("library_name"), str) and meta["library_name"] not in tags:
            tags.insert(0, meta["library_name"])
        base = meta.get("base_model")
        for b in [base] if isinstance(base, str) else (base or []):
            tags.append(f"base_model:{b}")
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo_id.split("/")[0], "sha": commit.oid, "lastModified": commit.date,
            "createdAt": repo.created_at, "private": repo.private, "gated": False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": tags, "siblings": siblings, "spaces": [],
            "usedStorage": sum(size for _, size in files.values()),
        }
        for key in ("library_name", "pipeline_tag"):
            if isinstance(meta.get(key), str):
                info[key] = meta[key]
        self._json(info)

    def _tree(self, repo_id: str, revision: str, path: str):
        with self.hub._lock:
            repo = self._repo_for_read(repo_id)
            commit = repo.commits[self.hub._resolve(repo, revision)]
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = self.query.get("expand", ["false"])[0].lower() in ("1", "true")
        entries = _tree_entries(commit.files, path, recursive)
        if entries is None:
            if path.strip("/"):
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
            entries = []
        if expand:
            for e in entries:
                e["lastCommit"] = {"id": commit.oid, "title": commit.title, "date": commit.date}
        self._json(entries, headers={"X-Repo-Commit": commit.oid})

    def _paths_info(self, repo_id: str, revision: str):
        with self.hub._lock:
            repo = self._repo_for_read(repo_id)
            commit = repo.commits[self.hub._resolve(repo, revision)]
        if (self.headers.get("Content-Type") or "").startswith("application/json"):
            payload = self._json_body()
            paths = payload.get("paths") or []
        else:
            paths = parse_qs(self.body.decode()).get("paths", [])
        out = []
        all_entries = _tree_entries(commit.files, "", True) or []
        by_path = {e["path"]: e for e in all_entries}
        for p in paths:
            if p.strip("/") in by_path:
                out.append(by_path[p.strip("/")])
        self._json(out)

    def _refs(self, repo_id: str):
        with self.hub._lock:
            repo = self._repo_for_read(repo_id)
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in repo.branches.items()]
        self._json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _commits(self, repo_id: str, revision: str):
        with self.hub._lock:
            repo = self._repo_for_read(repo_id)
            oid = self.hub._resolve(repo, revision)
            out = []
            while oid is not None:
                c = repo.commits[oid]
                out.append({"id": c.oid, "title": c.title, "message": c.description,
                            "authors": [{"user": c.author}], "date": c.date})
                oid = c.parent
        self._json(out)

    def _preupload(self, repo_id: str, revision: str):
        with self.hub._lock:
            repo, _ = self._repo_for_write(repo_id)
            commit = repo.commits[self.hub._resolve(repo, revision)]
            files = dict(commit.files)
        payload = self._json_body()
        gitignore = payload.get("gitIgnore")
        if gitignore is None and ".gitignore" in files:
            gitignore = self.hub.read_file(repo_id, ".gitignore", commit.oid).decode("utf-8", "replace")
        patterns = gitignore.splitlines() if gitignore else []
        out = []
        for f in payload.get("files") or []:
            path = f["path"]
            out.append({
                "path": path,
                "uploadMode": "regular",
                "shouldIgnore": _gitignore_matches(patterns, path),
                "oid": files[path][0] if path in files else None,
            })
        self._json({"files": out, "commitOid": commit.oid})

    def _create_commit(self, repo_id: str, revision: str):
        repo, user = self._repo_for_write(repo_id)
        if self.query.get("create_pr", ["0"])[0] not in ("0", "false", ""):
            raise HubError(400, "The fake hub does not support pull requests (create_pr)")
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
        header, additions, deletions, deleted_folders = None, {}, [], []
        for raw in self.body.splitlines():
            if not raw.strip():
                continue
            line = json.loads(raw)
            key, value = line.get("key"), line.get("value") or {}
            if key == "header":
                header = value
            elif key == "file":
                path = self._check_path(value.get("path"))
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                additions[path] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                raise HubError(400, f"The fake hub never grants LFS uploads; got an lfsFile for {value.get('path')!r}")
            elif key == "deletedFile":
                deletions.append(self._check_path(value.get("path")))
            elif key == "deletedFolder":
                deleted_folders.append(self._check_path(value.get("path")))
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        if header is None or not header.get("summary"):
            raise HubError(400, "Commit header with a summary is required")
        oid = self.hub._commit(repo, revision, header["summary"], header.get("description") or "", user,
                               additions=additions, deletions=deletions, deleted_folders=deleted_folders,
                               parent_commit=header.get("parentCommit"))
        self._json({"success": True, "commitOid": oid, "commitUrl": f"{self.hub.base_url}/{repo_id}/commit/{oid}",
                    "pullRequestUrl": None, "hookOutput": ""})

    @staticmethod
    def _check_path(path) -> str:
        if not isinstance(path, str) or not path or path.startswith("/") or any(
            part in ("", ".", "..") for part in path.split("/")
        ) or path.split("/")[0] in (".git", ".cache"):
            raise HubError(400, f"Invalid path in repo: {path!r}")
        return path

    def _resolve_file(self, repo_id: str, revision: str, path: str):
        with self.hub._lock:
            repo = self._repo_for_read(repo_id)
            commit_oid = self.hub._resolve(repo, revision)
            entry = repo.commits[commit_oid].files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit_oid})
        oid, size = entry
        data = (self.hub.storage_dir / "blobs" / oid).read_bytes()
        headers = {"X-Repo-Commit": commit_oid, "ETag": f'"{oid}"', "Accept-Ranges": "bytes",
                   "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"'}
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        if content_type.startswith("text/") or path.endswith(".json"):
            content_type += "; charset=utf-8"
        range_header = self.headers.get("Range")
        status = 200
        if range_header:
            m = _RANGE.match(range_header.strip())
            if not m or (not m.group(1) and not m.group(2)):
                raise HubError(416, f"Invalid range {range_header!r}", headers={"Content-Range": f"bytes */{size}"})
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start, end = max(size - int(m.group(2)), 0), size - 1
            if start >= size or start > end:
                raise HubError(416, f"Range not satisfiable {range_header!r}", headers={"Content-Range": f"bytes */{size}"})
            data = data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            status = 206
        self._send(status, data, headers, content_type)
