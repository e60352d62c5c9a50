"""The Hub API endpoints: each takes the :class:`~.messages.Request` and its URL's parameters, returns an
:class:`~.messages.Answer`, and refuses with the errors of :mod:`prg_hub.hub_server.errors`.

The URLs, methods and roles that lead to each endpoint are in :data:`prg_hub.hub_server.http.ROUTES`; the role a
route names is checked before its endpoint runs. Parameters arrive checked and decoded: ``repo_type`` is
``model``, ``dataset`` or ``space``, ``repo_id`` a valid id, ``revision`` a branch or commit id (``main`` when the
URL gives none), ``path`` and ``branch`` percent-decoded.
"""

from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import parse_qs, urlencode

from .commits import parse_commit
from .errors import (
    EntryNotFound,
    InvalidRequest,
    NotFound,
    RangeNotSatisfiable,
    RepoExists,
    TooLarge,
    Unauthenticated,
)
from .messages import Answer, FileRange, Request, json_answer
from .names import SHA256_RE, check_path, check_repo_id
from .storage import (
    DEFAULT_BRANCH,
    LFS_SUFFIXES,
    LOCAL_USER,
    REGULAR_MAX_SIZE,
    lfs_pointer,
)

_MISSING = object()


def _field(obj: dict, key: str, kind: type, default=_MISSING):
    """``obj[key]`` if it has type ``kind``; ``default`` if it is absent or null and a default is given.

    Anything else is refused (InvalidRequest).
    """
    value = obj.get(key)
    if value is None and default is not _MISSING:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidRequest(f"Field {key!r} must be of type {kind.__name__}")
    return value


def _objects(obj: dict, key: str) -> list[dict]:
    """``obj[key]`` if it is a list of JSON objects, else refused."""
    items = _field(obj, key, list)
    if not all(isinstance(item, dict) for item in items):
        raise InvalidRequest(f"Field {key!r} must be a list of objects")
    return items


def upload_mode(path: str, size: int, sample: bytes) -> str:
    """The preupload decision for one file: ``"lfs"`` or ``"regular"`` (rule in :mod:`.storage`)."""
    is_binary = b"\x00" in sample
    return "lfs" if path.lower().endswith(LFS_SUFFIXES) or size > REGULAR_MAX_SIZE or is_binary else "regular"


def file_info(path: str, entry: dict) -> dict:
    """The JSON the tree and paths-info endpoints give for a file."""
    info = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        pointer_size = len(lfs_pointer(entry["sha256"], entry["size"]))
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


def _refuse_pull_requests(request: Request) -> None:
    if request.query.get("create_pr", ["0"])[0] not in ("", "0", "false"):
        raise InvalidRequest("Pull requests are not supported by this server")


def _namespaced(request: Request, body: dict) -> tuple[str, str]:
    """The repo type and id named by a create or delete body; a bare name is in the caller's namespace."""
    name = _field(body, "name", str)
    namespace = _field(body, "organization", str, None) or request.identity.name or LOCAL_USER
    return _field(body, "type", str, "model"), check_repo_id(f"{namespace}/{name}")


# -- account and repos ----------------------------------------------------------------------------------------

def whoami(request: Request) -> Answer:
    """The token's name and role, in the shape of the Hub's answer; Unauthenticated without a token."""
    name, role = request.identity
    if name is None:
        raise Unauthenticated("Authentication required: send a token (Authorization: Bearer TOKEN)"
                              if request.access.tokens is not None
                              else "This server knows no tokens (no --token-file)")
    return json_answer({
        "type": "user", "id": name, "name": name, "fullname": name, "email": None, "emailVerified": False,
        "isPro": False, "canPay": False, "orgs": [],
        "auth": {"type": "access_token", "accessToken": {"displayName": name, "role": role}},
    })


def validate_yaml(request: Request) -> Answer:
    """Model card metadata check: every card is accepted, as long as the request is a JSON object."""
    request.json_object()
    return json_answer({"errors": [], "warnings": []})


def create_repo(request: Request) -> Answer:
    """Create a repo; a repo id without organisation goes to the caller's namespace, as on the Hub.

    An existing repo is a 409 whose body still gives the repo's ``url``, which ``create_repo(exist_ok=True)``
    reads.
    """
    request.require("write")
    body = request.json_object()
    repo_type, repo_id = _namespaced(request, body)
    private = _field(body, "visibility", str, "public") != "public" or _field(body, "private", bool, False)
    url = request.repo_url(repo_type, repo_id)
    try:
        request.storage.create_repo(repo_type, repo_id, private, author=request.identity.name or LOCAL_USER)
    except RepoExists as err:
        return json_answer({"error": err.message, "url": url}, 409)
    return json_answer({"url": url, "name": repo_id, "id": repo_id})


def delete_repo(request: Request) -> Answer:
    """Delete a repo: this needs the ``admin`` role."""
    repo_type, repo_id = _namespaced(request, request.json_object())
    request.authorize(repo_type, repo_id, "admin")
    request.storage.delete_repo(repo_type, repo_id)
    return json_answer({})


def repo_info(request: Request, repo_type: str, repo_id: str, revision: str = DEFAULT_BRANCH) -> Answer:
    """Repo metadata at a revision: ``sha`` and ``siblings`` are what the client relies on."""
    meta = request.storage.repo_meta(repo_type, repo_id)
    commit = request.storage.read_commit(repo_type, repo_id, revision)
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
    return json_answer(info)


def refs(request: Request, repo_type: str, repo_id: str) -> Answer:
    """The branches and the commits they point to (no tags, converts or pull requests here)."""
    branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit}
                for name, commit in sorted(request.storage.refs(repo_type, repo_id).items())]
    return json_answer({"branches": branches, "converts": [], "tags": [], "pullRequests": []})


def commits(request: Request, repo_type: str, repo_id: str, revision: str) -> Answer:
    """The commits reachable from a revision, newest first."""
    return json_answer([
        {"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"],
         "authors": [{"user": user, "avatar": None} for user in c["authors"]]}
        for c in request.storage.history(repo_type, repo_id, revision)
    ])


def create_branch(request: Request, repo_type: str, repo_id: str, branch: str) -> Answer:
    """Create a branch at the body's ``startingPoint`` (default: the default branch)."""
    starting_point = _field(request.json_object(), "startingPoint", str, None)
    request.storage.create_branch(repo_type, repo_id, branch, starting_point)
    return json_answer({})


def delete_branch(request: Request, repo_type: str, repo_id: str, branch: str) -> Answer:
    """Delete a branch other than the default one."""
    request.storage.delete_branch(repo_type, repo_id, branch)
    return json_answer({})


# -- listing ------------------------------------------------------------------------------------------------

def tree(request: Request, repo_type: str, repo_id: str, revision: str, path: str) -> Answer:
    """List the folder ``path`` ("" for the root); EntryNotFound if there is no such folder at that revision."""
    commit = request.storage.read_commit(repo_type, repo_id, revision)
    folder = check_path(path) if path else ""
    if folder and not any(p.startswith(folder + "/") for p in commit["tree"]):
        raise EntryNotFound(folder, commit["id"])
    recursive = request.query.get("recursive", ["false"])[0].lower() in ("1", "true")
    return json_answer(list_tree(commit["tree"], folder, recursive))


def paths_info(request: Request, repo_type: str, repo_id: str, revision: str) -> Answer:
    """Info on the given paths (form-encoded ``paths=...``, as the client sends them); unknown ones skipped."""
    if request.headers.get("Content-Type", "").startswith("application/json"):
        paths = _field(request.json_object(), "paths", list)
    else:
        paths = parse_qs(request.body.read().decode()).get("paths", [])
    files = request.storage.read_commit(repo_type, repo_id, revision)["tree"]
    infos = []
    for path in (check_path(p.rstrip("/") if isinstance(p, str) else p) for p in paths):
        if path in files:
            infos.append(file_info(path, files[path]))
        elif any(p.startswith(path + "/") for p in files):
            infos.append(folder_info(path, files))
    return json_answer(infos)


# -- upload ---------------------------------------------------------------------------------------------------

def preupload(request: Request, repo_type: str, repo_id: str, revision: str) -> Answer:
    """Say per file whether it goes inline ("regular") or through LFS, and give the oid already stored."""
    _refuse_pull_requests(request)
    commit = request.storage.read_commit(repo_type, repo_id, revision)
    files = []
    for item in _objects(request.json_object(), "files"):
        path = check_path(item.get("path"))
        entry = commit["tree"].get(path)
        sample = base64.b64decode(_field(item, "sample", str, ""))
        files.append({
            "path": path,
            "uploadMode": upload_mode(path, _field(item, "size", int), sample),
            "shouldIgnore": False,
            "oid": None if entry is None else entry["sha256"] if entry["lfs"] else entry["oid"],
        })
    return json_answer({"files": files, "commitOid": commit["id"]})


def lfs_batch(request: Request, repo_type: str, repo_id: str) -> Answer:
    """LFS batch API, basic transfer: signed upload URLs and verify URLs for the objects not stored yet."""
    body = request.json_object()
    if body.get("operation") != "upload":
        raise InvalidRequest("Only the upload operation is supported")
    api = f"{request.base_url}/api/{repo_type}s/{repo_id}"
    max_size = request.max_upload_bytes
    objects = []
    for obj in _objects(body, "objects"):
        oid, size = _field(obj, "oid", str), _field(obj, "size", int)
        if size > max_size:
            raise TooLarge(f"LFS object {oid} has {size} bytes; this server accepts at most {max_size} "
                           "(--max-upload-bytes)")
        if not SHA256_RE.fullmatch(oid) or size < 0:
            objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "Invalid oid or size"}})
        elif request.storage.blob_size(oid) == size:
            objects.append({"oid": oid, "size": size})
        else:
            query = urlencode(request.signer.sign(repo_type, repo_id, oid, size))
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": {"href": f"{api}/lfs-objects/{oid}?{query}"},
                "verify": {"href": f"{api}/lfs-verify"},
            }})
    return json_answer({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                       headers={"Content-Type": "application/vnd.git-lfs+json"})


def lfs_upload(request: Request, repo_type: str, repo_id: str, oid: str) -> Answer:
    """Receive an LFS object through a URL signed by the batch endpoint (or with a ``write`` token).

    Content whose sha256 is not ``oid`` is refused (InvalidRequest), content over the signed size is TooLarge.
    """
    if not SHA256_RE.fullmatch(oid):
        raise InvalidRequest(f"Invalid LFS oid: {oid!r}")
    params = {key: values[0] for key, values in request.query.items()}
    signed_size = request.signer.check(repo_type, repo_id, oid, params)
    if signed_size is None:
        request.authorize(repo_type, repo_id, "write")
    else:
        request.storage.repo_meta(repo_type, repo_id)
        request.body.limit = min(request.body.limit, signed_size)
    request.storage.put_blob(request.body, expected_sha256=oid)
    return json_answer({})


def lfs_verify(request: Request, repo_type: str, repo_id: str) -> Answer:
    """Confirm that an LFS object of the given oid and size is stored."""
    body = request.json_object()
    oid, size = _field(body, "oid", str), _field(body, "size", int)
    if request.storage.blob_size(oid) != size:
        raise NotFound(f"LFS object {oid} of size {size} is not stored")
    return json_answer({"success": True})


def create_commit(request: Request, repo_type: str, repo_id: str, revision: str) -> Answer:
    """The NDJSON commit (format in :mod:`prg_hub.hub_server.commits`) on the branch ``revision``."""
    _refuse_pull_requests(request)
    parsed = parse_commit(request.body.read())
    commit_id = request.storage.commit(repo_type, repo_id, revision, parsed.operations, parsed.summary,
                                       parsed.description, parsed.parent_commit,
                                       author=request.identity.name or LOCAL_USER)
    return json_answer({"success": True, "commitOid": commit_id, "pullRequestUrl": None,
                        "commitUrl": f"{request.repo_url(repo_type, repo_id)}/commit/{commit_id}"})


# -- download -------------------------------------------------------------------------------------------------

def resolve(request: Request, repo_type: str, repo_id: str, revision: str, path: str) -> Answer:
    """Serve a file, or the single byte range the ``Range`` header asks for (206).

    The headers give the commit (``X-Repo-Commit``) and the ``ETag``: the git blob id, or for LFS files the
    sha256, which ``X-Linked-Etag`` repeats beside ``X-Linked-Size``.
    """
    path = check_path(path)
    commit = request.storage.read_commit(repo_type, repo_id, revision)
    entry = commit["tree"].get(path)
    if entry is None:
        raise EntryNotFound(path, commit["id"])
    etag = f'"{entry["sha256"] if entry["lfs"] else entry["oid"]}"'
    size = entry["size"]
    headers = {"X-Repo-Commit": commit["id"], "ETag": etag, "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream"}
    if entry["lfs"]:
        headers.update({"X-Linked-Etag": etag, "X-Linked-Size": size})
    start, end, status = 0, size, 200
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", request.headers.get("Range", "").strip())
    if match and match.group(1):
        start, end, status = int(match.group(1)), min(int(match.group(2) or size - 1) + 1, size), 206
    elif match and match.group(2):
        start, end, status = max(size - int(match.group(2)), 0), size, 206
    if status == 206:
        if start >= end:
            raise RangeNotSatisfiable(size)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    return Answer(status, headers, FileRange(request.storage.blob_path(entry["sha256"]), start, end))
