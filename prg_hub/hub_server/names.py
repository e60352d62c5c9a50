"""What may name things on the local hub: namespaces and repo names, repo ids, branches, paths inside a repo.

File paths are only keys of a commit's tree and never reach the file system, and repo ids become one folder
name; every path and id is checked anyway: ``..`` or ``.`` segments, empty segments, absolute paths, backslashes
and NUL bytes are refused with :class:`~prg_hub.hub_server.errors.InvalidPath`, unsafe or reserved names with
:class:`~prg_hub.hub_server.errors.InvalidRequest`.
"""

from __future__ import annotations

import re

from .errors import InvalidPath, InvalidRequest

# Words that begin Hub URLs; no namespace or repo name may be one of them (compared case-insensitively).
RESERVED_NAMES = frozenset({"api", "datasets", "models", "spaces"})
# Path words that follow a repo id in /api URLs; they cannot be repo names either.
API_ACTIONS = frozenset(
    {"revision", "tree", "paths-info", "preupload", "commit", "commits", "refs", "branch", "lfs-objects",
     "lfs-verify", "resolve"}
)
SHA1_RE = re.compile(r"[0-9a-f]{40}")  # a commit id
SHA256_RE = re.compile(r"[0-9a-f]{64}")  # a blob, and the oid of an LFS object

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_BRANCH_RE = re.compile(r"[A-Za-z0-9._/-]{1,200}")


def is_valid_name(name: str) -> bool:
    """Whether ``name`` may be a namespace or a repo name: safe characters, not reserved, not a URL word."""
    return bool(_NAME_RE.fullmatch(name)) and "--" not in name and ".." not in name \
        and name.lower() not in RESERVED_NAMES | API_ACTIONS and not name.endswith(".git")


def check_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is ``name`` or ``org/name`` made of valid names, else raise InvalidRequest."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if not (1 <= len(parts) <= 2 and all(is_valid_name(part) for part in parts)):
        reserved = ", ".join(sorted(RESERVED_NAMES))
        raise InvalidRequest(f"Invalid repo id: {repo_id!r} (org/name of letters, digits, '.', '_' and '-'; "
                             f"neither part may be one of {reserved})")
    return repo_id


def check_branch_name(branch: str) -> str:
    """Return ``branch`` if it may name a new branch (not a commit id, no ``..`` or ``//``), else raise."""
    if not _BRANCH_RE.fullmatch(branch) or SHA1_RE.fullmatch(branch) or ".." in branch or "//" in branch \
            or branch.startswith(("/", "refs/")) or branch.endswith(("/", ".lock")):
        raise InvalidRequest(f"Invalid branch name: {branch!r}")
    return branch


def check_path(path: str) -> str:
    """Return ``path`` if it is a safe relative path inside a repo, else raise InvalidPath."""
    if not isinstance(path, str) or not path or "\x00" in path or "\\" in path or path.startswith("/") or any(
        part in ("", ".", "..") for part in path.split("/")
    ):
        raise InvalidPath(f"Invalid path in repo: {path!r}")
    return path
