"""A local Hugging Face Hub server, built on the standard library only.

It speaks the subset of the Hub HTTP API that ``huggingface_hub`` uses to push and pull model, dataset and
space repos, so ``HfApi``, ``snapshot_download``, ``PreTrainedModel.push_to_hub`` and
``datasets.load_dataset`` work against it unchanged once ``HF_ENDPOINT`` points at it and
``HF_HUB_DISABLE_XET=1`` is set (Xet storage exists only on the real Hub).

Storage layout under ``root``::

    blobs/<sha256[:2]>/<sha256>       file contents, content-addressed and shared by all repos
    repos/<type>s/<org>--<name>/      one folder per repo (``<name>`` alone for repos without a namespace)
        repo.json                     id, type, creation date, visibility
        refs.json                     branch name -> commit id
        commits/<commit id>.json      id, parents, title, message, date, authors and the full tree:
                                      path -> {sha256, size, oid (git blob id), lfs}
    tmp/                              uploads in progress; files here are never referenced

A commit writes its blobs first, then its commit object, then replaces ``refs.json`` (temporary file plus
``os.replace``). A request that fails or is cut off part-way therefore leaves every branch where it was; at
worst it leaves unreferenced blobs behind. Identical content is stored once, whatever the repo or path. Blobs
are never garbage-collected, not even when a repo is deleted.

File paths are only keys of a commit's tree and never reach the file system, and every path that arrives
over HTTP is checked anyway: ``..`` or ``.`` segments, absolute paths, backslashes and NUL bytes are refused
with 400. Commits to one repo are serialised by a per-repo lock; reads take no lock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

REPO_TYPES = ("model", "dataset", "space")
API_PREFIXES = {"models": "model", "datasets": "dataset", "spaces": "space"}
WEB_PREFIXES = {"datasets": "dataset", "spaces": "space"}
LOCAL_USER = "local"
DEFAULT_BRANCH = "main"

# Upload rule given by the preupload endpoint: "lfs" for these suffixes, for files over REGULAR_MAX_SIZE and
# for binary files (a NUL byte in the first 512 bytes); "regular" (inline base64 in the commit) otherwise.
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".tflite", ".pb", ".ot",
    ".npy", ".npz", ".pkl", ".pickle", ".joblib", ".model", ".parquet", ".arrow",
    ".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z",
)
REGULAR_MAX_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)

# Path words that follow a repo id in /api URLs; they cannot be repo names.
API_ACTIONS = frozenset(
    {"revision", "tree", "paths-info", "preupload", "commit", "commits", "refs", "branch", "lfs-objects",
     "lfs-verify", "resolve"}
)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_BRANCH_RE = re.compile(r"[A-Za-z0-9._/-]{1,200}")
_SHA1_RE = re.compile(r"[0-9a-f]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1024 * 1024


class HubError(Exception):
    """An error answered to the client: HTTP status, message, and the ``X-Error-Code`` the client maps."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def _entry_not_found(path: str, commit: str) -> HubError:
    return HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit})


def check_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is ``name`` or ``org/name`` with safe characters, else raise a 400."""
    parts = repo_id.split("/")
    if not (
        1 <= len(parts) <= 2
        and all(_NAME_RE.fullmatch(part) and "--" not in part and ".." not in part for part in parts)
        and parts[-1] not in API_ACTIONS
        and not parts[-1].endswith(".git")
    ):
        raise HubError(400, f"Invalid repo id: {repo_id!r}")
    return repo_id


def check_path(path: str) -> str:
    """Return ``path`` if it is a safe relative path inside a repo, else raise a 400."""
    if not path or "\x00" in path or "\\" in path or path.startswith("/") or any(
        part in ("", ".", "..") for part in path.split("/")
    ):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def upload_mode(path: str, size: int, sample: bytes) -> str:
    """The preupload decision for one file: ``"lfs"`` or ``"regular"``."""
    is_binary = b"\x00" in sample
    return "lfs" if path.lower().endswith(LFS_SUFFIXES) or size > REGULAR_MAX_SIZE or is_binary else "regular"


def _git_blob_id(data: bytes) -> str:
    """The git object id of a blob with this content (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _write_json_atomic(path: Path, obj) -> None:
    """Write JSON to ``path`` so that readers see either the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Operation(NamedTuple):
    """One operation of a commit. ``kind`` is ``file``, ``lfsFile``, ``deletedFile`` or ``deletedFolder``."""

    kind: str
    path: str
    content: bytes | None = None
    oid: str | None = None
    size: int | None = None


class HubStorage:
    """Repos, commits, branches and content-addressed blobs on disk (layout in the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        for sub in ("blobs", "repos", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._locks: defaultdict[Path, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()

    # -- blobs ------------------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this sha256 lives (it may not exist)."""
        return self.root / "blobs" / sha256[:2] / sha256

    def blob_size(self, sha256: str) -> int | None:
        """Size of a stored blob, or None if no such blob is stored."""
        try:
            return self.blob_path(sha256).stat().st_size if _SHA256_RE.fullmatch(sha256) else None
        except FileNotFoundError:
            return None

    def put_blob(self, chunks: Iterable[bytes], expected_sha256: str | None = None) -> tuple[str, int]:
        """Store a blob from byte chunks and return ``(sha256, size)``; a blob already stored is kept as is.

        With ``expected_sha256``, content that hashes differently is discarded and refused with a 400.
        """
        digest, size = hashlib.sha256(), 0
        tmp = self.root / "tmp" / uuid.uuid4().hex
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            sha256 = digest.hexdigest()
            if expected_sha256 is not None and sha256 != expected_sha256:
                raise HubError(400, f"Content sha256 {sha256} does not match the announced oid {expected_sha256}")
            target = self.blob_path(sha256)
            if not target.exists():
                target.parent.mkdir(exist_ok=True)
                os.replace(tmp, target)
            return sha256, size
        finally:
            tmp.unlink(missing_ok=True)

    # -- repos ------------------------------------------------------------------------------------------

    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type!r}")
        return self.root / "repos" / f"{repo_type}s" / check_repo_id(repo_id).replace("/", "--")

    def _existing_repo_dir(self, repo_type: str, repo_id: str) -> Path:
        repo_dir = self._repo_dir(repo_type, repo_id)
        if not (repo_dir / "refs.json").is_file():
            raise _repo_not_found(repo_id)
        return repo_dir

    def _lock(self, repo_dir: Path) -> threading.Lock:
        with self._locks_guard:
            return self._locks[repo_dir]

    def create_repo(self, repo_type: str, repo_id: str, private: bool = False) -> bool:
        """Create a repo whose first commit holds a ``.gitattributes``; return False if it already exists."""
        repo_dir = self._repo_dir(repo_type, repo_id)
        with self._lock(repo_dir):
            if repo_dir.exists():
                return False
            content = GITATTRIBUTES.encode()
            sha256, size = self.put_blob([content])
            tree = {".gitattributes": {"sha256": sha256, "size": size, "oid": _git_blob_id(content), "lfs": False}}
            staging = self.root / "tmp" / uuid.uuid4().hex
            (staging / "commits").mkdir(parents=True)
            commit = self._new_commit([], tree, "initial commit", "")
            _write_json_atomic(staging / "commits" / f"{commit['id']}.json", commit)
            _write_json_atomic(staging / "repo.json", {"id": repo_id, "type": repo_type, "private": private,
                                                        "createdAt": commit["date"]})
            _write_json_atomic(staging / "refs.json", {DEFAULT_BRANCH: commit["id"]})
            repo_dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, repo_dir)
            return True

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        """Delete a repo's refs and commits (its blobs stay, they may be shared)."""
        repo_dir = self._repo_dir(repo_type, repo_id)
        trash = self.root / "tmp" / uuid.uuid4().hex
        with self._lock(repo_dir):
            self._existing_repo_dir(repo_type, repo_id)
            os.replace(repo_dir, trash)
        shutil.rmtree(trash)

    def repo_meta(self, repo_type: str, repo_id: str) -> dict:
        """The ``repo.json`` of an existing repo."""
        return json.loads((self._existing_repo_dir(repo_type, repo_id) / "repo.json").read_text())

    # -- refs and commits -------------------------------------------------------------------------------

    def refs(self, repo_type: str, repo_id: str) -> dict[str, str]:
        """Branch name -> commit id."""
        return json.loads((self._existing_repo_dir(repo_type, repo_id) / "refs.json").read_text())

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> str:
        """The commit id a branch name or a full commit id points to."""
        refs = self.refs(repo_type, repo_id)
        if revision in refs:
            return refs[revision]
        if _SHA1_RE.fullmatch(revision) and self._commit_file(repo_type, repo_id, revision).is_file():
            return revision
        raise _revision_not_found(revision)

    def _commit_file(self, repo_type: str, repo_id: str, commit_id: str) -> Path:
        return self._repo_dir(repo_type, repo_id) / "commits" / f"{commit_id}.json"

    def read_commit(self, repo_type: str, repo_id: str, revision: str) -> dict:
        """The commit object a revision resolves to."""
        commit_id = self.resolve(repo_type, repo_id, revision)
        return json.loads(self._commit_file(repo_type, repo_id, commit_id).read_text())

    def history(self, repo_type: str, repo_id: str, revision: str) -> list[dict]:
        """Commits reachable from a revision, newest first."""
        commits = [self.read_commit(repo_type, repo_id, revision)]
        while commits[-1]["parents"]:
            commits.append(self.read_commit(repo_type, repo_id, commits[-1]["parents"][0]))
        return commits

    def create_branch(self, repo_type: str, repo_id: str, branch: str, starting_point: str | None = None) -> None:
        """Create ``branch`` at ``starting_point`` (default: the default branch); 409 if it exists."""
        if not _BRANCH_RE.fullmatch(branch) or _SHA1_RE.fullmatch(branch) or ".." in branch or "//" in branch \
                or branch.startswith(("/", "refs/")) or branch.endswith(("/", ".lock")):
            raise HubError(400, f"Invalid branch name: {branch!r}")
        repo_dir = self._existing_repo_dir(repo_type, repo_id)
        with self._lock(repo_dir):
            refs = self.refs(repo_type, repo_id)
            if branch in refs:
                raise HubError(409, f"Branch {branch} already exists")
            refs[branch] = self.resolve(repo_type, repo_id, starting_point or DEFAULT_BRANCH)
            _write_json_atomic(repo_dir / "refs.json", refs)

    def delete_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        """Delete a branch other than the default one."""
        repo_dir = self._existing_repo_dir(repo_type, repo_id)
        with self._lock(repo_dir):
            refs = self.refs(repo_type, repo_id)
            if branch not in refs:
                raise _revision_not_found(branch)
            if branch == DEFAULT_BRANCH:
                raise HubError(403, "The default branch cannot be deleted")
            del refs[branch]
            _write_json_atomic(repo_dir / "refs.json", refs)

    @staticmethod
    def _new_commit(parents: list[str], tree: dict, title: str, message: str) -> dict:
        commit = {"parents": parents, "tree": tree, "title": title, "message": message, "date": _now(),
                  "authors": [LOCAL_USER]}
        commit["id"] = hashlib.sha1(json.dumps(commit, sort_keys=True).encode()).hexdigest()
        return commit

    def commit(
        self,
        repo_type: str,
        repo_id: str,
        branch: str,
        operations: list[Operation],
        title: str,
        message: str = "",
        parent_commit: str | None = None,
    ) -> str:
        """Apply ``operations`` on top of ``branch`` as one new commit and return its id.

        Raises 412 if ``parent_commit`` is given and is not the branch head, 400 for an LFS object that was
        never uploaded, 404 ``EntryNotFound`` for deleting a path that does not exist.
        """
        repo_dir = self._existing_repo_dir(repo_type, repo_id)
        with self._lock(repo_dir):
            refs = self.refs(repo_type, repo_id)
            if branch not in refs:
                self.resolve(repo_type, repo_id, branch)  # 404 RevisionNotFound unless it is a commit id
                raise HubError(400, "Commits can only be made on a branch")
            head = refs[branch]
            if parent_commit is not None and parent_commit != head:
                raise HubError(412, f"Parent commit {parent_commit} is not the head of {branch} ({head})")
            tree = dict(self.read_commit(repo_type, repo_id, head)["tree"])
            for op in operations:
                path = check_path(op.path)
                if op.kind == "file":
                    sha256, size = self.put_blob([op.content])
                    tree[path] = {"sha256": sha256, "size": size, "oid": _git_blob_id(op.content), "lfs": False}
                elif op.kind == "lfsFile":
                    size = self.blob_size(op.oid)
                    if size is None or (op.size is not None and op.size != size):
                        raise HubError(400, f"LFS object {op.oid} ({path}) was not uploaded")
                    oid = _git_blob_id(_lfs_pointer(op.oid, size))
                    tree[path] = {"sha256": op.oid, "size": size, "oid": oid, "lfs": True}
                elif op.kind == "deletedFile":
                    if tree.pop(path, None) is None:
                        raise _entry_not_found(path, head)
                else:
                    inside = [p for p in tree if p.startswith(path + "/")]
                    if not inside:
                        raise _entry_not_found(path, head)
                    for p in inside:
                        del tree[p]
            commit = self._new_commit([head], tree, title, message)
            _write_json_atomic(repo_dir / "commits" / f"{commit['id']}.json", commit)
            refs[branch] = commit["id"]
            _write_json_atomic(repo_dir / "refs.json", refs)
            return commit["id"]


def file_info(path: str, entry: dict) -> dict:
    """The JSON the tree and paths-info endpoints give for a file."""
    info = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        pointer_size = len(_lfs_pointer(entry["sha256"], entry["size"]))
        info["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
    return info


def folder_info(path: str, tree: dict) -> dict:
    """The JSON the tree and paths-info endpoints give for a folder (its oid hashes its content)."""
    listing = "".join(f"{p} {e['oid']}\n" for p, e in sorted(tree.items()) if p.startswith(path + "/"))
    return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}


def list_tree(tree: dict, folder: str, recursive: bool) -> list[dict]:
    """Entries under ``folder`` ("" for the root): children only, or everything below with ``recursive``."""
    prefix = folder + "/" if folder else ""
    folders, files = set(), []
    for path in sorted(p for p in tree if p.startswith(prefix)):
        parts = path[len(prefix):].split("/")
        if recursive:
            folders.update(prefix + "/".join(parts[:depth]) for depth in range(1, len(parts)))
            files.append(path)
        elif len(parts) == 1:
            files.append(path)
        else:
            folders.add(prefix + parts[0])
    return [folder_info(p, tree) for p in sorted(folders)] + [file_info(p, tree[p]) for p in files]


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes Hub API, LFS and download requests to the server's :class:`HubStorage`."""

    server_version = "prg-hub"
    timeout = 120  # seconds a client may stall mid-request

    def do_GET(self):  # noqa: N802 - names required by BaseHTTPRequestHandler
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        logger.debug("%s %s", self.address_string(), format % args)

    @property
    def storage(self) -> HubStorage:
        return self.server.storage

    # -- plumbing ---------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Parse the URL, route it, and answer errors as JSON with ``X-Error-Code``."""
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self._body = self._iter_body()
        parts = url.path.split("/")[1:]
        try:
            if parts[0] == "api":
                self._route_api(parts[1:])
            else:
                self._route_web(parts)
        except HubError as err:
            self._send_json({"error": err.message}, err.status, {**err.headers, "X-Error-Code": err.code})
        except (ValueError, KeyError, TypeError, IndexError) as err:
            self._send_json({"error": f"Bad request: {err}"}, 400)
        except Exception:
            logger.exception("Failed to serve %s %s", self.command, self.path)
            self._send_json({"error": "Internal server error"}, 500)
        finally:
            try:  # read what is left of the body, so that closing the socket does not reset the connection
                for _ in self._body:
                    pass
            except (HubError, OSError, ValueError):
                pass

    def _iter_body(self) -> Iterator[bytes]:
        """The request body in chunks, for ``Content-Length`` and chunked bodies; 400 if it ends early."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while size := self._chunk_size():
                chunk = self.rfile.read(size)
                if len(chunk) != size or not self.rfile.readline(1024).endswith(b"\n"):
                    raise HubError(400, "Request body ended early")
                yield chunk
            while self.rfile.readline(1024).strip():  # trailer fields
                pass
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining:
            chunk = self.rfile.read(min(remaining, _CHUNK))
            if not chunk:
                raise HubError(400, "Request body ended early")
            remaining -= len(chunk)
            yield chunk

    def _chunk_size(self) -> int:
        line = self.rfile.readline(1024)
        try:
            return int(line.split(b";")[0], 16)
        except ValueError:
            raise HubError(400, "Request body ended early or is not properly chunked") from None

    def _json_body(self):
        return json.loads(b"".join(self._body) or b"{}")

    def _send_json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _send(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for key, value in headers.items():
            if value is not None:
                self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _base_url(self) -> str:
        host = self.headers.get("Host") or "%s:%s" % self.server.server_address[:2]
        return f"http://{host}"

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = {"dataset": "datasets/", "space": "spaces/"}.get(repo_type, "")
        return f"{self._base_url()}/{prefix}{repo_id}"

    def _expect(self, method: str) -> None:
        if self.command != method:
            raise HubError(405, f"{self.command} is not allowed here")

    # -- routing ----------------------------------------------------------------------------------------

    def _route_api(self, parts: list[str]) -> None:
        """``/api/...``: account and repo-management calls, then per-repo calls ``/api/{type}s/{id}/...``."""
        if parts == ["whoami-v2"]:
            return self._whoami()
        if parts == ["repos", "create"]:
            return self._create_repo()
        if parts == ["repos", "delete"]:
            return self._delete_repo()
        if parts == ["validate-yaml"]:
            self._expect("POST")
            return self._send_json({"errors": [], "warnings": []})
        if not parts or parts[0] not in API_PREFIXES:
            raise HubError(404, "Unknown endpoint")
        repo_type, rest = API_PREFIXES[parts[0]], parts[1:]
        # The repo id is one or two segments; the word after it, if any, says what is asked.
        n = 2 if len(rest) > 2 and rest[2] in API_ACTIONS else 1 if len(rest) > 1 and rest[1] in API_ACTIONS \
            else len(rest)
        repo_id = check_repo_id("/".join(rest[:n]))
        action, args = (rest[n], rest[n + 1:]) if len(rest) > n else (None, [])
        revision = unquote("/".join(args[:1])) or DEFAULT_BRANCH
        handlers = {
            None: ("GET", lambda: self._repo_info(repo_type, repo_id, DEFAULT_BRANCH)),
            "revision": ("GET", lambda: self._repo_info(repo_type, repo_id, unquote("/".join(args)))),
            "tree": ("GET", lambda: self._tree(repo_type, repo_id, revision, unquote("/".join(args[1:])))),
            "paths-info": ("POST", lambda: self._paths_info(repo_type, repo_id, revision)),
            "preupload": ("POST", lambda: self._preupload(repo_type, repo_id, revision)),
            "commit": ("POST", lambda: self._commit(repo_type, repo_id, revision)),
            "commits": ("GET", lambda: self._commits(repo_type, repo_id, revision)),
            "refs": ("GET", lambda: self._refs(repo_type, repo_id)),
            "branch": (self.command, lambda: self._branch(repo_type, repo_id, unquote("/".join(args)))),
            "lfs-objects": ("PUT", lambda: self._lfs_upload(repo_type, repo_id, args[0])),
            "lfs-verify": ("POST", lambda: self._lfs_verify(repo_type, repo_id)),
        }
        if action not in handlers:
            raise HubError(404, "Unknown endpoint")
        method, handler = handlers[action]
        self._expect(method)
        handler()

    def _route_web(self, parts: list[str]) -> None:
        """``[datasets/|spaces/]{id}/resolve/{rev}/{path}`` and ``[prefix]{id}.git/info/lfs/objects/batch``."""
        repo_type = WEB_PREFIXES.get(parts[0], "model")
        if repo_type != "model":
            parts = parts[1:]
        if len(parts) > 4 and parts[-4:] == ["info", "lfs", "objects", "batch"] and parts[-5].endswith(".git"):
            self._expect("POST")
            return self._lfs_batch(repo_type, check_repo_id("/".join(parts[:-5] + [parts[-5][:-4]])))
        if "resolve" not in parts[1:3]:
            raise HubError(404, "Unknown endpoint")
        i = parts.index("resolve", 1)
        rest = parts[i + 1:]
        n = 3 if rest[:1] == ["refs"] and rest[1:2] in (["pr"], ["convert"]) else 1  # unquoted special refs
        if self.command not in ("GET", "HEAD"):
            raise HubError(405, f"{self.command} is not allowed here")
        self._resolve(repo_type, check_repo_id("/".join(parts[:i])), unquote("/".join(rest[:n])),
                      unquote("/".join(rest[n:])))

    # -- account and repos ------------------------------------------------------------------------------

    def _whoami(self) -> None:
        self._expect("GET")
        self._send_json({
            "type": "user", "id": LOCAL_USER, "name": LOCAL_USER, "fullname": "Local user", "email": None,
            "emailVerified": False, "isPro": False, "canPay": False, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": LOCAL_USER, "role": "write"}},
        })

    def _create_repo(self) -> None:
        """Create a repo; a repo id without organisation goes to the user's namespace, as on the Hub."""
        self._expect("POST")
        body = self._json_body()
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or LOCAL_USER}/{body['name']}"
        private = body.get("visibility", "public") != "public" or bool(body.get("private"))
        created = self.storage.create_repo(repo_type, repo_id, private)
        url = self._repo_url(repo_type, repo_id)
        if not created:
            return self._send_json({"error": "You already created this repo", "url": url}, 409)
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        self._expect("DELETE")
        body = self._json_body()
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        self.storage.delete_repo(body.get("type") or "model", repo_id)
        self._send_json({})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        """Repo metadata at a revision: ``sha`` and ``siblings`` are what the client relies on."""
        meta = self.storage.repo_meta(repo_type, repo_id)
        commit = self.storage.read_commit(repo_type, repo_id, revision)
        siblings = []
        for path, entry in sorted(commit["tree"].items()):
            info = file_info(path, entry)
            lfs = {"size": entry["size"], "sha256": entry["sha256"], "pointerSize": info["lfs"]["pointerSize"]} \
                if entry["lfs"] else None
            siblings.append({"rfilename": path, "size": entry["size"], "blobId": entry["oid"], "lfs": lfs})
        info = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24], "id": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else LOCAL_USER, "sha": commit["id"],
            "lastModified": commit["date"], "createdAt": meta["createdAt"], "private": meta["private"],
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            "usedStorage": sum(entry["size"] for entry in commit["tree"].values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        self._send_json(info)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit}
                    for name, commit in sorted(self.storage.refs(repo_type, repo_id).items())]
        self._send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._send_json([
            {"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"],
             "authors": [{"user": user, "avatar": None} for user in c["authors"]]}
            for c in self.storage.history(repo_type, repo_id, revision)
        ])

    def _branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        if self.command == "POST":
            self.storage.create_branch(repo_type, repo_id, branch, self._json_body().get("startingPoint"))
        elif self.command == "DELETE":
            self.storage.delete_branch(repo_type, repo_id, branch)
        else:
            raise HubError(405, f"{self.command} is not allowed here")
        self._send_json({})

    # -- listing --------------------------------------------------------------------------------------

    def _tree(self, repo_type: str, repo_id: str, revision: str, folder: str) -> None:
        """List a folder; 404 ``EntryNotFound`` if there is no such folder at that revision."""
        commit = self.storage.read_commit(repo_type, repo_id, revision)
        folder = check_path(folder) if folder else ""
        if folder and not any(path.startswith(folder + "/") for path in commit["tree"]):
            raise _entry_not_found(folder, commit["id"])
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        self._send_json(list_tree(commit["tree"], folder, recursive))

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        """Info on the given paths (form-encoded ``paths=...``, as the client sends them); unknown ones skipped."""
        body = b"".join(self._body)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body)["paths"]
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        tree = self.storage.read_commit(repo_type, repo_id, revision)["tree"]
        infos = []
        for path in (check_path(p.rstrip("/")) for p in paths):
            if path in tree:
                infos.append(file_info(path, tree[path]))
            elif any(p.startswith(path + "/") for p in tree):
                infos.append(folder_info(path, tree))
        self._send_json(infos)

    # -- upload ---------------------------------------------------------------------------------------

    def _refuse_pull_requests(self) -> None:
        if self.query.get("create_pr", ["0"])[0] not in ("", "0", "false"):
            raise HubError(400, "Pull requests are not supported by this server")

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        """Say per file whether it goes inline ("regular") or through LFS, and give the oid already stored."""
        self._refuse_pull_requests()
        commit = self.storage.read_commit(repo_type, repo_id, revision)
        files = []
        for item in self._json_body()["files"]:
            path = check_path(item["path"])
            entry = commit["tree"].get(path)
            files.append({
                "path": path,
                "uploadMode": upload_mode(path, int(item["size"]), base64.b64decode(item.get("sample", ""))),
                "shouldIgnore": False,
                "oid": None if entry is None else entry["sha256"] if entry["lfs"] else entry["oid"],
            })
        self._send_json({"files": files, "commitOid": commit["id"]})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        """LFS batch API, basic transfer: upload and verify URLs for the objects not stored yet."""
        self.storage.repo_meta(repo_type, repo_id)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        api = f"{self._base_url()}/api/{repo_type}s/{repo_id}"
        objects = []
        for obj in body["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            if not _SHA256_RE.fullmatch(oid):
                objects.append({"oid": str(oid), "size": size, "error": {"code": 422, "message": "Invalid oid"}})
            elif self.storage.blob_size(oid) == size:
                objects.append({"oid": oid, "size": size})
            else:
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": f"{api}/lfs-objects/{oid}"},
                    "verify": {"href": f"{api}/lfs-verify"},
                }})
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                        headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, repo_type: str, repo_id: str, oid: str) -> None:
        """Receive an LFS object; content whose sha256 is not ``oid`` is refused."""
        self.storage.repo_meta(repo_type, repo_id)
        if not _SHA256_RE.fullmatch(oid):
            raise HubError(400, f"Invalid LFS oid: {oid!r}")
        self.storage.put_blob(self._body, expected_sha256=oid)
        self._send_json({})

    def _lfs_verify(self, repo_type: str, repo_id: str) -> None:
        self.storage.repo_meta(repo_type, repo_id)
        body = self._json_body()
        if self.storage.blob_size(body["oid"]) != int(body["size"]):
            raise HubError(404, f"LFS object {body['oid']} of size {body['size']} is not stored")
        self._send_json({"success": True})

    def _commit(self, repo_type: str, repo_id: str, branch: str) -> None:
        """The NDJSON commit: a header line, then one line per file, LFS reference or deletion."""
        self._refuse_pull_requests()
        self.storage.repo_meta(repo_type, repo_id)
        lines = [json.loads(line) for line in b"".join(self._body).splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header, operations = lines[0]["value"], []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"].rstrip("/") if key == "deletedFolder" else value["path"]
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, "File content must be base64")
                try:
                    content = base64.b64decode(value["content"], validate=True)
                except binascii.Error as err:
                    raise HubError(400, f"Invalid base64 content for {path!r}") from err
                operations.append(Operation(key, check_path(path), content=content))
            elif key == "lfsFile":
                size = value.get("size")
                operations.append(Operation(key, check_path(path), oid=value["oid"],
                                            size=None if size is None else int(size)))
            elif key in ("deletedFile", "deletedFolder"):
                operations.append(Operation(key, check_path(path)))
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        commit_id = self.storage.commit(repo_type, repo_id, branch, operations, header.get("summary") or "",
                                        header.get("description") or "", header.get("parentCommit"))
        self._send_json({"success": True, "commitOid": commit_id, "pullRequestUrl": None,
                         "commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{commit_id}"})

    # -- download -------------------------------------------------------------------------------------

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        """Serve a file (with single-range support); LFS files answer their sha256 as ``X-Linked-Etag``."""
        path = check_path(path)
        commit = self.storage.read_commit(repo_type, repo_id, revision)
        entry = commit["tree"].get(path)
        if entry is None:
            raise _entry_not_found(path, commit["id"])
        etag = f'"{entry["sha256"] if entry["lfs"] else entry["oid"]}"'
        size = entry["size"]
        headers = {"X-Repo-Commit": commit["id"], "ETag": etag, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": size})
        start, end, status = 0, size, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and match.group(1):
            start, end, status = int(match.group(1)), min(int(match.group(2) or size - 1) + 1, size), 206
        elif match and match.group(2):
            start, end, status = max(size - int(match.group(2)), 0), size, 206
        if status == 206:
            if start >= end:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(self.storage.blob_path(entry["sha256"]), "rb") as f:
            f.seek(start)
            remaining = end - start
            while remaining and (chunk := f.read(min(_CHUNK, remaining))):
                self.wfile.write(chunk)
                remaining -= len(chunk)


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], storage: HubStorage):
        super().__init__(address, HubRequestHandler)
        self.storage = storage


class HubServer:
    """A hub server on ``host:port`` (port 0 picks a free one); ``url`` is the value for ``HF_ENDPOINT``."""

    def __init__(self, root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0):
        self.root = Path(root)
        self.storage = HubStorage(self.root)
        self._httpd = _HubHTTPServer((host, port), self.storage)
        self.host, self.port = host, self._httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None

    def start(self) -> "HubServer":
        """Serve in a background daemon thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=f"hub-server-{self.port}",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`shutdown` is called from another one or the process is interrupted."""
        self._httpd.serve_forever()

    def shutdown(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()


def serve_hub(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0) -> HubServer:
    """Start a hub server storing its data under ``root`` in a background thread and return it."""
    return HubServer(root, host, port).start()


def run_hub_server(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve a hub from ``root`` in the foreground until interrupted (Ctrl-C)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server = HubServer(root, host, port)
    logger.info("Hub server on %s (storage: %s); use HF_ENDPOINT=%s HF_HUB_DISABLE_XET=1",
                server.url, server.root, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
