"""The local hub's storage: repos, commits, branches and content-addressed blobs on disk.

Layout under ``root``::

    blobs/<sha256[:2]>/<sha256>       file contents, content-addressed and shared by all repos
    repos/<type>s/<org>--<name>/      one folder per repo (``<name>`` alone for repos without a namespace)
        repo.json                     id, type, creation date, visibility
        refs.json                     branch name -> commit id
        commits/<commit id>.json      id, parents, title, message, date, authors and the full tree:
                                      path -> {sha256, size, oid (git blob id), lfs}
    locks/<type>s/<org>--<name>.lock  the repo's lock file (kept when the repo is deleted)
    tmp/<host>-<pid>-<random>         files being written; never referenced

Writes are atomic: a commit writes its blobs first, then its commit object, then replaces ``refs.json``
(a file written under ``tmp/``, fsynced, then moved with ``os.replace``). A request that fails or is cut off
part-way, or a server killed with ``kill -9``, therefore leaves every branch where it was; at worst it leaves
unreferenced blobs behind. Identical content is stored once, whatever the repo or path. Blobs are never
garbage-collected, not even when a repo is deleted.

Writers to one repo (create, delete, commit, branch changes) take an exclusive ``fcntl.flock`` on the repo's lock
file for the whole read-refs, write-commit, replace-refs sequence. The lock works between threads and between
processes, so several servers may share one ``root`` (on a local file system: ``flock`` over NFS is not
reliable). The kernel releases it when its holder dies, so a killed server never leaves a stale lock. A writer
waits at most ``lock_timeout_s`` for it, then gets :class:`~prg_hub.hub_server.errors.RepoBusy`. Reads take no
lock.

Temporary files are named after the host and process that write them. At start-up a server removes those it
can tell are abandoned: written by a process of this host that no longer runs, or, from any host, not modified
for ``TMP_MAX_AGE_S``. Files of a live server sharing the root are left alone.

Repo ids, branch names and paths are checked by :mod:`prg_hub.hub_server.names`. Refusals are the domain errors
of :mod:`prg_hub.hub_server.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from .errors import (
    AlreadyExists,
    EntryNotFound,
    InvalidRequest,
    PermissionDenied,
    RepoBusy,
    RepoExists,
    RepoNotFound,
    RevisionConflict,
    RevisionNotFound,
)
from .names import SHA1_RE, SHA256_RE, check_branch_name, check_path, check_repo_id

REPO_TYPES = ("model", "dataset", "space")
DEFAULT_BRANCH = "main"
LOCAL_USER = "local"  # namespace of repos created without one by anonymous clients, and their commit author

# Upload rule given by the preupload endpoint: "lfs" for these suffixes, for files over REGULAR_MAX_SIZE and
# for binary files (a NUL byte in the first 512 bytes); "regular" (inline base64 in the commit) otherwise.
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".tflite", ".pb", ".ot",
    ".npy", ".npz", ".pkl", ".pickle", ".joblib", ".model", ".parquet", ".arrow",
    ".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z",
)
REGULAR_MAX_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)

LOCK_TIMEOUT_S = 30.0
TMP_MAX_AGE_S = 24 * 3600

_HOST = socket.gethostname()


def find_path_conflict(tree: dict, paths: Iterable[str]) -> tuple[str, str] | None:
    """A pair ``(file, path inside it)`` if one of ``paths`` is both a file and a folder in ``tree``, else None."""
    folders: dict[str, str] = {}  # folder -> a file below it
    for path in tree:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            folders.setdefault("/".join(parts[:depth]), path)
    for path in paths:
        if path in folders:
            return path, folders[path]
        parts = path.split("/")
        for depth in range(1, len(parts)):
            if (parent := "/".join(parts[:depth])) in tree:
                return parent, path
    return None


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob with this content (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git LFS pointer file that stands for an LFS object in git."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # noqa: UP017 - datetime.UTC needs 3.11


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it runs, as another user
        return False
    return False


class Operation(NamedTuple):
    """One operation of a commit. ``kind`` is ``file``, ``lfsFile``, ``deletedFile`` or ``deletedFolder``."""

    kind: str
    path: str
    content: bytes | None = None
    oid: str | None = None
    size: int | None = None


class HubStorage:
    """Repos, commits, branches and content-addressed blobs on disk (layout in the module docstring)."""

    def __init__(self, root: str | os.PathLike, lock_timeout_s: float = LOCK_TIMEOUT_S):
        self.root = Path(root)
        self.lock_timeout_s = lock_timeout_s
        for sub in ("blobs", "repos", "locks", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- temporary files and locks ----------------------------------------------------------------------

    def _tmp_path(self) -> Path:
        return self.root / "tmp" / f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex}"

    def _write_json_atomic(self, path: Path, obj) -> None:
        """Write JSON to ``path`` so that readers see either the old file or the complete new one."""
        tmp = self._tmp_path()
        with open(tmp, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def remove_abandoned_temp_files(self, max_age_s: float = TMP_MAX_AGE_S) -> int:
        """Remove the entries of ``tmp/`` that are abandoned (rule in the module docstring); return how many."""
        removed = 0
        for entry in (self.root / "tmp").iterdir():
            host, pid, _ = entry.name.rsplit("-", 2) if entry.name.count("-") >= 2 else ("", "", "")
            try:
                stale = time.time() - entry.lstat().st_mtime > max_age_s
            except FileNotFoundError:  # removed meanwhile by its owner
                continue
            if stale or (host == _HOST and pid.isdigit() and _process_is_gone(int(pid))):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
        return removed

    @contextlib.contextmanager
    def _repo_lock(self, repo_type: str, repo_id: str) -> Iterator[None]:
        """Hold the repo's lock file exclusively (between threads and processes); RepoBusy after ``lock_timeout_s``."""
        path = self.root / "locks" / f"{repo_type}s" / f"{self._repo_dir(repo_type, repo_id).name}.lock"
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline, pause = time.monotonic() + self.lock_timeout_s, 0.002
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as err:
                    if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                        raise
                if time.monotonic() >= deadline:
                    raise RepoBusy(f"{repo_id} is busy: another write held its lock for more than "
                                   f"{self.lock_timeout_s:g} s; retry later")
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
            yield
        finally:
            os.close(fd)  # closing the only descriptor of the open file releases the lock

    # -- blobs ------------------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this sha256 lives (it may not exist)."""
        return self.root / "blobs" / sha256[:2] / sha256

    def blob_size(self, sha256: str) -> int | None:
        """Size of a stored blob, or None if no such blob is stored."""
        try:
            return self.blob_path(sha256).stat().st_size if SHA256_RE.fullmatch(sha256) else None
        except FileNotFoundError:
            return None

    def put_blob(self, chunks: Iterable[bytes], expected_sha256: str | None = None) -> tuple[str, int]:
        """Store a blob from byte chunks and return ``(sha256, size)``; a blob already stored is kept as is.

        With ``expected_sha256``, content that hashes differently is discarded and refused (InvalidRequest).
        """
        digest, size = hashlib.sha256(), 0
        tmp = self._tmp_path()
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
                raise InvalidRequest(f"Content sha256 {sha256} does not match the announced oid {expected_sha256}")
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
            raise InvalidRequest(f"Invalid repo type: {repo_type!r}")
        return self.root / "repos" / f"{repo_type}s" / check_repo_id(repo_id).replace("/", "--")

    def _existing_repo_dir(self, repo_type: str, repo_id: str) -> Path:
        repo_dir = self._repo_dir(repo_type, repo_id)
        if not (repo_dir / "refs.json").is_file():
            raise RepoNotFound(repo_id)
        return repo_dir

    def create_repo(self, repo_type: str, repo_id: str, private: bool = False, author: str = LOCAL_USER) -> None:
        """Create a repo whose first commit holds a ``.gitattributes``; RepoExists if it already exists."""
        repo_dir = self._repo_dir(repo_type, repo_id)
        with self._repo_lock(repo_type, repo_id):
            if repo_dir.exists():
                raise RepoExists()
            content = GITATTRIBUTES.encode()
            sha256, size = self.put_blob([content])
            tree = {".gitattributes": {"sha256": sha256, "size": size, "oid": git_blob_id(content), "lfs": False}}
            staging = self._tmp_path()
            (staging / "commits").mkdir(parents=True)
            commit = self._new_commit([], tree, "initial commit", "", author)
            self._write_json_atomic(staging / "commits" / f"{commit['id']}.json", commit)
            self._write_json_atomic(staging / "repo.json", {"id": repo_id, "type": repo_type, "private": private,
                                                             "createdAt": commit["date"]})
            self._write_json_atomic(staging / "refs.json", {DEFAULT_BRANCH: commit["id"]})
            repo_dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, repo_dir)

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        """Delete a repo's refs and commits (its blobs stay, they may be shared)."""
        repo_dir = self._repo_dir(repo_type, repo_id)
        trash = self._tmp_path()
        with self._repo_lock(repo_type, repo_id):
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
        if SHA1_RE.fullmatch(revision) and self._commit_file(repo_type, repo_id, revision).is_file():
            return revision
        raise RevisionNotFound(revision)

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
        """Create ``branch`` at ``starting_point`` (default: the default branch); AlreadyExists if it exists."""
        check_branch_name(branch)
        with self._repo_lock(repo_type, repo_id):
            repo_dir = self._existing_repo_dir(repo_type, repo_id)
            refs = self.refs(repo_type, repo_id)
            if branch in refs:
                raise AlreadyExists(f"Branch {branch} already exists")
            refs[branch] = self.resolve(repo_type, repo_id, starting_point or DEFAULT_BRANCH)
            self._write_json_atomic(repo_dir / "refs.json", refs)

    def delete_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        """Delete a branch other than the default one."""
        with self._repo_lock(repo_type, repo_id):
            repo_dir = self._existing_repo_dir(repo_type, repo_id)
            refs = self.refs(repo_type, repo_id)
            if branch not in refs:
                raise RevisionNotFound(branch)
            if branch == DEFAULT_BRANCH:
                raise PermissionDenied("The default branch cannot be deleted")
            del refs[branch]
            self._write_json_atomic(repo_dir / "refs.json", refs)

    @staticmethod
    def _new_commit(parents: list[str], tree: dict, title: str, message: str, author: str) -> dict:
        commit = {"parents": parents, "tree": tree, "title": title, "message": message, "date": _now(),
                  "authors": [author]}
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
        author: str = LOCAL_USER,
    ) -> str:
        """Apply ``operations`` in order on top of ``branch`` as one new commit and return its id.

        Raises RevisionConflict if ``parent_commit`` is given and is not the branch head; InvalidRequest for a
        revision that is not a branch, an LFS object that was never uploaded or an added path that is both a file
        and a folder in the resulting tree (like ``cfg`` and ``cfg/inner.txt``); EntryNotFound for deleting a path
        that does not exist.
        """
        with self._repo_lock(repo_type, repo_id):
            repo_dir = self._existing_repo_dir(repo_type, repo_id)
            refs = self.refs(repo_type, repo_id)
            if branch not in refs:
                self.resolve(repo_type, repo_id, branch)  # RevisionNotFound unless it is a commit id
                raise InvalidRequest("Commits can only be made on a branch")
            head = refs[branch]
            if parent_commit is not None and parent_commit != head:
                raise RevisionConflict(f"Parent commit {parent_commit} is not the head of {branch} ({head})")
            tree = dict(self.read_commit(repo_type, repo_id, head)["tree"])
            added = []
            for op in operations:
                path = check_path(op.path)
                if op.kind == "file":
                    sha256, size = self.put_blob([op.content])
                    tree[path] = {"sha256": sha256, "size": size, "oid": git_blob_id(op.content), "lfs": False}
                    added.append(path)
                elif op.kind == "lfsFile":
                    size = self.blob_size(op.oid)
                    if size is None or (op.size is not None and op.size != size):
                        raise InvalidRequest(f"LFS object {op.oid} ({path}) was not uploaded")
                    oid = git_blob_id(lfs_pointer(op.oid, size))
                    tree[path] = {"sha256": op.oid, "size": size, "oid": oid, "lfs": True}
                    added.append(path)
                elif op.kind == "deletedFile":
                    if tree.pop(path, None) is None:
                        raise EntryNotFound(path, head)
                else:
                    inside = [p for p in tree if p.startswith(path + "/")]
                    if not inside:
                        raise EntryNotFound(path, head)
                    for p in inside:
                        del tree[p]
            conflict = find_path_conflict(tree, [path for path in added if path in tree])
            if conflict is not None:
                raise InvalidRequest(f"{conflict[0]!r} would be both a file and a folder (it holds {conflict[1]!r})")
            commit = self._new_commit([head], tree, title, message, author)
            self._write_json_atomic(repo_dir / "commits" / f"{commit['id']}.json", commit)
            refs[branch] = commit["id"]
            self._write_json_atomic(repo_dir / "refs.json", refs)
            return commit["id"]
