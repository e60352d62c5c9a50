"""A local Hugging Face Hub server, built on the standard library only.

It speaks the subset of the Hub HTTP API that ``huggingface_hub`` uses to push and pull model, dataset and
space repos, so ``HfApi``, ``snapshot_download``, ``PreTrainedModel.push_to_hub`` and
``datasets.load_dataset`` work against it unchanged once ``HF_ENDPOINT`` points at it and
``HF_HUB_DISABLE_XET=1`` is set (Xet storage exists only on the real Hub).

This module is the HTTP side. Storage, atomic commits and the cross-process repo lock are in
:mod:`prg_hub.hub_storage`, the commit format in :mod:`prg_hub.hub_commits`, tokens and roles in
:mod:`prg_hub.hub_auth`.

Authentication. ``Authorization: Bearer TOKEN`` is looked up in the token file given at start; a token that is
not in it gets 401 on every request. A request without a token is anonymous and may read public repos. Writes
need the ``write`` role, deleting a repo ``admin``. Private repos answer 404 ``RepoNotFound``, as on the Hub,
to clients without the ``read`` role. Without a token file the server knows no token: the header is ignored,
every request is anonymous and every write is refused (403), unless anonymous writes are allowed, which only a
server bound to a loopback address accepts. A server bound elsewhere without a token file logs a warning.

Limits, answered with 413: a request body over ``max_request_bytes``; an LFS upload over ``max_upload_bytes``
or over the size it announced; a regular (inline) file over ``REGULAR_MAX_SIZE``. Malformed requests get 400,
never 500. At most ``max_threads`` requests are served at once; further connections wait in the listen
backlog, and a client that stalls mid-request is dropped after ``HubRequestHandler.timeout`` seconds.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from .hub_auth import ANONYMOUS, ANONYMOUS_WRITER, Identity, TokenTable, UploadSigner
from .hub_commits import parse_commit
from .hub_storage import (
    API_ACTIONS,
    DEFAULT_BRANCH,
    LFS_SUFFIXES,
    LOCAL_USER,
    REGULAR_MAX_SIZE,
    SHA256_RE,
    HubError,
    HubStorage,
    check_path,
    check_repo_id,
    entry_not_found,
    lfs_pointer,
    repo_not_found,
)

logger = logging.getLogger(__name__)

API_PREFIXES = {"models": "model", "datasets": "dataset", "spaces": "space"}
WEB_PREFIXES = {"datasets": "dataset", "spaces": "space"}

DEFAULT_MAX_REQUEST_BYTES = 128 * 1024 * 1024  # API and commit bodies: many inline files of up to 10 MB each
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 ** 3  # one LFS object
DEFAULT_MAX_THREADS = 32
LINGER_BYTES = 64 * 1024 * 1024  # what is read and dropped of a body left unread, before closing
LINGER_S = 5.0
# The message huggingface_hub recognises as a bad token (other 401s on repo URLs become RepositoryNotFoundError).
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"

_CHUNK = 1024 * 1024
_MISSING = object()


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def upload_mode(path: str, size: int, sample: bytes) -> str:
    """The preupload decision for one file: ``"lfs"`` or ``"regular"``."""
    is_binary = b"\x00" in sample
    return "lfs" if path.lower().endswith(LFS_SUFFIXES) or size > REGULAR_MAX_SIZE or is_binary else "regular"


def _field(obj: dict, key: str, kind: type, default=_MISSING):
    """``obj[key]`` if it has type ``kind``; ``default`` if it is absent or null and a default is given; else 400."""
    value = obj.get(key)
    if value is None and default is not _MISSING:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HubError(400, f"Field {key!r} must be of type {kind.__name__}")
    return value


def _objects(obj: dict, key: str) -> list[dict]:
    """``obj[key]`` if it is a list of JSON objects, else 400."""
    items = _field(obj, key, list)
    if not all(isinstance(item, dict) for item in items):
        raise HubError(400, f"Field {key!r} must be a list of objects")
    return items


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


class RequestBody:
    """A request body (``Content-Length`` or chunked), read lazily in chunks, of at most ``limit`` bytes.

    Iterating yields the chunks, once. Going over ``limit`` raises a 413: before reading anything when
    ``Content-Length`` or a chunk's size says so. A body that ends early or is badly chunked raises a 400.
    """

    def __init__(self, rfile: BinaryIO, headers, limit: int):
        self._rfile, self.limit, self.received = rfile, limit, 0
        self._chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        length = "0" if self._chunked else headers.get("Content-Length") or "0"
        self._length = int(length) if length.isdigit() else None
        self.complete = not self._chunked and self._length == 0  # whether the body has been read to its end
        self._chunks = self._read()

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def read(self) -> bytes:
        """The whole body."""
        return b"".join(self._chunks)

    def _count(self, size: int) -> None:
        self.received += size
        if self.received > self.limit:
            raise HubError(413, f"The request body is over the limit of {self.limit} bytes")

    def _read(self) -> Iterator[bytes]:
        if self._length is None:
            raise HubError(400, "Invalid Content-Length")
        if self._chunked:
            while size := self._chunk_size():
                self._count(size)
                yield from self._read_exactly(size)
                if not self._rfile.readline(1024).endswith(b"\n"):
                    raise HubError(400, "Request body ended early or is not properly chunked")
            while self._rfile.readline(1024).strip():  # trailer fields
                pass
        else:
            self._count(self._length)
            yield from self._read_exactly(self._length)
        self.complete = True

    def _read_exactly(self, size: int) -> Iterator[bytes]:
        while size:
            chunk = self._rfile.read(min(size, _CHUNK))
            if not chunk:
                raise HubError(400, "Request body ended early")
            size -= len(chunk)
            yield chunk

    def _chunk_size(self) -> int:
        line = self._rfile.readline(1024)
        try:
            return int(line.split(b";")[0], 16)
        except ValueError:
            raise HubError(400, "Request body ended early or is not properly chunked") from None


class HubRequestHandler(BaseHTTPRequestHandler):
    """Authenticates requests and routes Hub API, LFS and download requests to the server's storage."""

    server_version = "prg-hub"
    timeout = 120  # seconds a client may stall mid-request

    def do_GET(self):  # noqa: N802 - names required by BaseHTTPRequestHandler
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        logger.debug("%s %s", self.address_string(), format % args)

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    @property
    def storage(self) -> HubStorage:
        return self.server.hub.storage

    # -- plumbing ---------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Answer one request; then close the connection gracefully if its body was left unread."""
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        limit = self.hub.max_upload_bytes if self.command == "PUT" else self.hub.max_request_bytes
        self._body = RequestBody(self.rfile, self.headers, limit)
        try:
            self._answer(url.path.split("/")[1:])
        except (ConnectionError, TimeoutError):  # the client went away or stalled: nobody to answer
            self.close_connection = True
        finally:
            if not self._body.complete:
                self._linger()

    def _answer(self, parts: list[str]) -> None:
        """Authenticate and route the request; answer errors as JSON with ``X-Error-Code`` and ``X-Error-Message``.

        A client that went away or stalled gets no answer: its ``ConnectionError`` or ``TimeoutError`` goes up.
        """
        try:
            self.identity = self._authenticate()
            if parts[0] == "api":
                self._route_api(parts[1:])
            else:
                self._route_web(parts)
        except (ConnectionError, TimeoutError):
            raise
        except HubError as err:
            self._send_error(err.status, err.message, {**err.headers, "X-Error-Code": err.code})
        except (ValueError, KeyError, TypeError, IndexError) as err:
            self._send_error(400, f"Bad request: {err}")
        except Exception:
            logger.exception("Failed to serve %s %s", self.command, self.path)
            self._send_error(500, "Internal server error")

    def _linger(self) -> None:
        """Close a connection whose request body was not read to its end, without resetting it.

        The answer is followed by a FIN; then what the client still sends is read and dropped (at most
        ``LINGER_BYTES``, for at most ``LINGER_S``), so that the client reads the answer instead of a reset.
        """
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline, dropped = time.monotonic() + LINGER_S, 0
            while dropped < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not (data := self.connection.recv(_CHUNK)):
                    break
                dropped += len(data)
        except OSError:
            pass

    def _send_error(self, status: int, message: str, headers: dict | None = None) -> None:
        # X-Error-Message is read by huggingface_hub; header values must be one line of Latin-1.
        header_message = message.encode("ascii", "backslashreplace").decode().replace("\r", " ").replace("\n", " ")
        self._send_json({"error": message}, status, {**(headers or {}), "X-Error-Message": header_message})

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

    def _json_object(self) -> dict:
        """The request body as a JSON object (an empty body is ``{}``); 400 for anything else."""
        body = json.loads(self._body.read() or b"{}")
        if not isinstance(body, dict):
            raise HubError(400, "The request body must be a JSON object")
        return body

    def _base_url(self) -> str:
        host = self.headers.get("Host") or "%s:%s" % self.server.server_address[:2]
        return f"http://{host}"

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = {"dataset": "datasets/", "space": "spaces/"}.get(repo_type, "")
        return f"{self._base_url()}/{prefix}{repo_id}"

    def _expect(self, method: str) -> None:
        if self.command != method:
            raise HubError(405, f"{self.command} is not allowed here")

    # -- authentication and access ----------------------------------------------------------------------

    def _authenticate(self) -> Identity:
        """Who sent the request: a token's identity, or anonymous; 401 for a token the server does not know."""
        header = self.headers.get("Authorization")
        if self.hub.tokens is None or header is None:
            return ANONYMOUS_WRITER if self.hub.allow_anonymous_writes else ANONYMOUS
        scheme, _, token = header.strip().partition(" ")
        identity = self.hub.tokens.lookup(token.strip()) if scheme.lower() == "bearer" else None
        if identity is None:
            raise HubError(401, INVALID_CREDENTIALS)
        return identity

    def _require(self, role: str) -> None:
        """Refuse the request unless its identity holds ``role``: 401 for anonymous clients, 403 for tokens."""
        if self.identity.can(role):
            return
        if self.identity.name is not None:
            raise HubError(403, f"The token of {self.identity.name} has the {self.identity.role} role; "
                                f"this needs the {role} role")
        if self.hub.tokens is None:
            raise HubError(403, f"This needs a token with the {role} role, and this server knows no tokens: start it "
                                "with --token-file FILE (or, on a loopback address, --allow-anonymous-writes)")
        raise HubError(401, f"Authentication required: this needs a token with the {role} role "
                            "(Authorization: Bearer TOKEN)")

    def _authorize(self, repo_type: str, repo_id: str, role: str) -> dict:
        """The metadata of a repo the request may access with ``role``.

        A missing repo, or a private one without the ``read`` role, is 404 ``RepoNotFound``. Anyone may read a
        public repo; other roles are left to :meth:`_require`.
        """
        meta = self.storage.repo_meta(repo_type, repo_id)
        if meta["private"] and not self.identity.can("read"):
            raise repo_not_found(repo_id)
        if role != "read":
            self._require(role)
        return meta

    def _namespaced(self, body: dict) -> tuple[str, str]:
        """The repo type and id named by a create or delete body; a bare name is in the caller's namespace."""
        name = _field(body, "name", str)
        namespace = _field(body, "organization", str, None) or self.identity.name or LOCAL_USER
        return _field(body, "type", str, "model"), check_repo_id(f"{namespace}/{name}")

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
            self._json_object()
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
        handlers = {  # action: (method, role, handler); LFS uploads carry their own authorisation
            None: ("GET", "read", lambda: self._repo_info(repo_type, repo_id, DEFAULT_BRANCH)),
            "revision": ("GET", "read", lambda: self._repo_info(repo_type, repo_id, unquote("/".join(args)))),
            "tree": ("GET", "read", lambda: self._tree(repo_type, repo_id, revision, unquote("/".join(args[1:])))),
            "paths-info": ("POST", "read", lambda: self._paths_info(repo_type, repo_id, revision)),
            "commits": ("GET", "read", lambda: self._commits(repo_type, repo_id, revision)),
            "refs": ("GET", "read", lambda: self._refs(repo_type, repo_id)),
            "preupload": ("POST", "write", lambda: self._preupload(repo_type, repo_id, revision)),
            "commit": ("POST", "write", lambda: self._commit(repo_type, repo_id, revision)),
            "branch": (self.command, "write", lambda: self._branch(repo_type, repo_id, unquote("/".join(args)))),
            "lfs-verify": ("POST", "write", lambda: self._lfs_verify(repo_type, repo_id)),
            "lfs-objects": ("PUT", None, lambda: self._lfs_upload(repo_type, repo_id, args[0])),
        }
        if action not in handlers:
            raise HubError(404, "Unknown endpoint")
        method, role, handler = handlers[action]
        self._expect(method)
        if role is not None:
            self._authorize(repo_type, repo_id, role)
        handler()

    def _route_web(self, parts: list[str]) -> None:
        """``[datasets/|spaces/]{id}/resolve/{rev}/{path}`` and ``[prefix]{id}.git/info/lfs/objects/batch``."""
        repo_type = WEB_PREFIXES.get(parts[0], "model")
        if repo_type != "model":
            parts = parts[1:]
        if len(parts) > 4 and parts[-4:] == ["info", "lfs", "objects", "batch"] and parts[-5].endswith(".git"):
            self._expect("POST")
            repo_id = check_repo_id("/".join(parts[:-5] + [parts[-5][:-4]]))
            self._authorize(repo_type, repo_id, "write")
            return self._lfs_batch(repo_type, repo_id)
        if "resolve" not in parts[1:3]:
            raise HubError(404, "Unknown endpoint")
        i = parts.index("resolve", 1)
        rest = parts[i + 1:]
        n = 3 if rest[:1] == ["refs"] and rest[1:2] in (["pr"], ["convert"]) else 1  # unquoted special refs
        if self.command not in ("GET", "HEAD"):
            raise HubError(405, f"{self.command} is not allowed here")
        repo_id = check_repo_id("/".join(parts[:i]))
        self._authorize(repo_type, repo_id, "read")
        self._resolve(repo_type, repo_id, unquote("/".join(rest[:n])), unquote("/".join(rest[n:])))

    # -- account and repos ------------------------------------------------------------------------------

    def _whoami(self) -> None:
        """The token's name and role, in the shape of the Hub's answer; 401 without a token."""
        self._expect("GET")
        name, role = self.identity
        if name is None:
            raise HubError(401, "Authentication required: send a token (Authorization: Bearer TOKEN)"
                           if self.hub.tokens is not None else "This server knows no tokens (no --token-file)")
        self._send_json({
            "type": "user", "id": name, "name": name, "fullname": name, "email": None, "emailVerified": False,
            "isPro": False, "canPay": False, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": name, "role": role}},
        })

    def _create_repo(self) -> None:
        """Create a repo; a repo id without organisation goes to the caller's namespace, as on the Hub."""
        self._expect("POST")
        self._require("write")
        body = self._json_object()
        repo_type, repo_id = self._namespaced(body)
        private = _field(body, "visibility", str, "public") != "public" or _field(body, "private", bool, False)
        created = self.storage.create_repo(repo_type, repo_id, private, author=self.identity.name or LOCAL_USER)
        url = self._repo_url(repo_type, repo_id)
        if not created:
            return self._send_json({"error": "You already created this repo", "url": url}, 409)
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        """Delete a repo: this needs the ``admin`` role."""
        self._expect("DELETE")
        repo_type, repo_id = self._namespaced(self._json_object())
        self._authorize(repo_type, repo_id, "admin")
        self.storage.delete_repo(repo_type, repo_id)
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
            starting_point = _field(self._json_object(), "startingPoint", str, None)
            self.storage.create_branch(repo_type, repo_id, branch, starting_point)
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
            raise entry_not_found(folder, commit["id"])
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        self._send_json(list_tree(commit["tree"], folder, recursive))

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        """Info on the given paths (form-encoded ``paths=...``, as the client sends them); unknown ones skipped."""
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = _field(self._json_object(), "paths", list)
        else:
            paths = parse_qs(self._body.read().decode()).get("paths", [])
        tree = self.storage.read_commit(repo_type, repo_id, revision)["tree"]
        infos = []
        for path in (check_path(p.rstrip("/") if isinstance(p, str) else p) for p in paths):
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
        for item in _objects(self._json_object(), "files"):
            path = check_path(item.get("path"))
            entry = commit["tree"].get(path)
            sample = base64.b64decode(_field(item, "sample", str, ""))
            files.append({
                "path": path,
                "uploadMode": upload_mode(path, _field(item, "size", int), sample),
                "shouldIgnore": False,
                "oid": None if entry is None else entry["sha256"] if entry["lfs"] else entry["oid"],
            })
        self._send_json({"files": files, "commitOid": commit["id"]})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        """LFS batch API, basic transfer: signed upload URLs and verify URLs for the objects not stored yet."""
        body = self._json_object()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        api = f"{self._base_url()}/api/{repo_type}s/{repo_id}"
        objects = []
        for obj in _objects(body, "objects"):
            oid, size = _field(obj, "oid", str), _field(obj, "size", int)
            if size > self.hub.max_upload_bytes:
                raise HubError(413, f"LFS object {oid} has {size} bytes; this server accepts at most "
                                    f"{self.hub.max_upload_bytes} (--max-upload-bytes)")
            if not SHA256_RE.fullmatch(oid) or size < 0:
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "Invalid oid or size"}})
            elif self.storage.blob_size(oid) == size:
                objects.append({"oid": oid, "size": size})
            else:
                query = urlencode(self.hub.signer.sign(repo_type, repo_id, oid, size))
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": f"{api}/lfs-objects/{oid}?{query}"},
                    "verify": {"href": f"{api}/lfs-verify"},
                }})
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                        headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, repo_type: str, repo_id: str, oid: str) -> None:
        """Receive an LFS object through a URL signed by the batch endpoint (or with a ``write`` token).

        Content whose sha256 is not ``oid`` is refused with 400, content over the signed size with 413.
        """
        if not SHA256_RE.fullmatch(oid):
            raise HubError(400, f"Invalid LFS oid: {oid!r}")
        params = {key: values[0] for key, values in self.query.items()}
        signed_size = self.hub.signer.check(repo_type, repo_id, oid, params)
        if signed_size is None:
            self._authorize(repo_type, repo_id, "write")
        else:
            self.storage.repo_meta(repo_type, repo_id)
            self._body.limit = min(self._body.limit, signed_size)
        self.storage.put_blob(self._body, expected_sha256=oid)
        self._send_json({})

    def _lfs_verify(self, repo_type: str, repo_id: str) -> None:
        body = self._json_object()
        oid, size = _field(body, "oid", str), _field(body, "size", int)
        if self.storage.blob_size(oid) != size:
            raise HubError(404, f"LFS object {oid} of size {size} is not stored")
        self._send_json({"success": True})

    def _commit(self, repo_type: str, repo_id: str, branch: str) -> None:
        """The NDJSON commit (format in :mod:`prg_hub.hub_commits`)."""
        self._refuse_pull_requests()
        commit = parse_commit(self._body.read())
        commit_id = self.storage.commit(repo_type, repo_id, branch, commit.operations, commit.summary,
                                        commit.description, commit.parent_commit,
                                        author=self.identity.name or LOCAL_USER)
        self._send_json({"success": True, "commitOid": commit_id, "pullRequestUrl": None,
                         "commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{commit_id}"})

    # -- download -------------------------------------------------------------------------------------

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        """Serve a file (with single-range support); LFS files answer their sha256 as ``X-Linked-Etag``."""
        path = check_path(path)
        commit = self.storage.read_commit(repo_type, repo_id, revision)
        entry = commit["tree"].get(path)
        if entry is None:
            raise entry_not_found(path, commit["id"])
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
    """A threading HTTP server that serves at most ``max_threads`` connections at once.

    Accepting waits for a free slot, so the connections beyond the limit wait in the listen backlog instead of
    each getting a thread.
    """

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], hub: HubServer, max_threads: int):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.hub = hub
        self._slots = threading.BoundedSemaphore(max_threads)
        self.closing = threading.Event()  # set before shutting down, so that a wait for a slot gives up
        super().__init__(address, HubRequestHandler)

    def process_request(self, request, client_address):
        while not self._slots.acquire(timeout=0.2):
            if self.closing.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class HubServer:
    """A hub server on ``host:port`` (port 0 picks a free one); ``url`` is the value for ``HF_ENDPOINT``.

    Args:
        root: the storage folder (created if needed). Several servers may share it. At start, abandoned
            temporary files under it are removed (see :mod:`prg_hub.hub_storage`).
        token_file: the tokens and their roles (format in :mod:`prg_hub.hub_auth`); without one, writes are
            refused unless ``allow_anonymous_writes``.
        allow_anonymous_writes: let requests without a token act with the ``write`` role (for local tests);
            refused with ``ValueError`` unless ``host`` is a loopback address.
        max_upload_bytes: the largest LFS object accepted.
        max_request_bytes: the largest other request body (a commit with its inline files, JSON calls).
        max_threads: how many requests are served at once.

    Raises ``TokenFileError`` (a ``ValueError``) for a bad token file and ``ValueError`` for bad options.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token_file: str | os.PathLike | None = None,
        allow_anonymous_writes: bool = False,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_threads: int = DEFAULT_MAX_THREADS,
    ):
        if allow_anonymous_writes and not is_loopback(host):
            raise ValueError(f"Anonymous writes are only allowed on a loopback address, not on {host!r}: "
                             "use --token-file to let others write")
        if min(max_upload_bytes, max_request_bytes, max_threads) < 1:
            raise ValueError("max_upload_bytes, max_request_bytes and max_threads must be positive")
        self.root, self.token_file = Path(root), token_file
        self.tokens = None if token_file is None else TokenTable.from_file(token_file)
        self.allow_anonymous_writes = allow_anonymous_writes
        self.max_upload_bytes, self.max_request_bytes = max_upload_bytes, max_request_bytes
        self.signer = UploadSigner()
        self.storage = HubStorage(self.root)
        if removed := self.storage.remove_abandoned_temp_files():
            logger.info("Removed %d abandoned temporary file(s) from %s", removed, self.root / "tmp")
        self._httpd = _HubHTTPServer((host, port), self, max_threads)
        self.host, self.port = host, self._httpd.server_address[1]
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None
        if self.tokens is None and not is_loopback(host):
            logger.warning("WARNING: the hub server on %s has no token file: anyone who can reach it reads every "
                           "public repo, and nobody can write. Pass --token-file to control access.", self.url)

    def start(self) -> HubServer:
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
        self._httpd.closing.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()


def serve_hub(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, **options) -> HubServer:
    """Start a hub server storing its data under ``root`` in a background thread and return it.

    ``options`` are :class:`HubServer`'s keyword arguments (token file, limits, threads).
    """
    return HubServer(root, host, port, **options).start()


def run_hub_server(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve a hub from ``root`` in the foreground until interrupted (Ctrl-C); ``options`` as for :class:`HubServer`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server = HubServer(root, host, port, **options)
    if server.tokens is not None:
        access = f"{len(server.tokens)} token(s) from {server.token_file}"
    elif server.allow_anonymous_writes:
        access = "no token file, anonymous writes allowed"
    else:
        access = "no token file: read-only"
    logger.info("Hub server on %s (storage: %s; %s); use HF_ENDPOINT=%s HF_HUB_DISABLE_XET=1",
                server.url, server.root, access, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
