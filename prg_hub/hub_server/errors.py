"""Why the local hub refuses a request: one base class, :class:`HubError`, and one subclass per reason.

Storage, access rules, commit parsing and the endpoints raise these, and know nothing of HTTP.
:mod:`prg_hub.hub_server.http` alone turns them into answers: the status, and the ``X-Error-Code`` and
``X-Error-Message`` headers from which ``huggingface_hub`` picks the exception it raises.
"""

from __future__ import annotations


class HubError(Exception):
    """A refused request; ``message`` is what the client is told."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(HubError):
    """A malformed request: bad JSON or chunking, a field of the wrong type, an invalid name, id or operation."""


class InvalidPath(InvalidRequest):
    """A path in a repo that is not a safe relative path (``..`` or ``.`` segments, absolute, ``\\``, NUL)."""


class Unauthenticated(HubError):
    """The request needs a token and sent none, or sent a token the server does not know."""


class PermissionDenied(HubError):
    """The request's token lacks the role the action needs, or nobody may do it (delete the default branch)."""


class NotFound(HubError):
    """Nothing at the requested place: an unknown endpoint, an LFS object never uploaded."""


class RepoNotFound(NotFound):
    """No such repo, or a private one that the client may not read."""

    def __init__(self, repo_id: str):
        super().__init__(f"Repository not found: {repo_id}")


class RevisionNotFound(NotFound):
    """A revision that is neither a branch nor a commit of the repo."""

    def __init__(self, revision: str):
        super().__init__(f"Invalid rev id: {revision}")


class EntryNotFound(NotFound):
    """No file or folder at ``path`` in the commit ``commit_id``."""

    def __init__(self, path: str, commit_id: str):
        super().__init__(f"Entry not found: {path}")
        self.commit_id = commit_id


class MethodNotAllowed(HubError):
    """The endpoint exists, but not for this request method."""

    def __init__(self, method: str):
        super().__init__(f"{method} is not allowed here")


class AlreadyExists(HubError):
    """Something the request creates exists already (a branch)."""


class RepoExists(AlreadyExists):
    """The repo to create exists already."""

    def __init__(self):
        super().__init__("You already created this repo")


class RevisionConflict(HubError):
    """A commit made on top of a parent commit that is no longer the head of its branch."""


class TooLarge(HubError):
    """A request body, LFS object or inline file over its size limit."""


class RangeNotSatisfiable(HubError):
    """A download range that selects no byte of a file of ``size`` bytes."""

    def __init__(self, size: int):
        super().__init__("Range not satisfiable")
        self.size = size


class RepoBusy(HubError):
    """Another writer held the repo's lock for too long; retrying after ``retry_after_s`` seconds may succeed."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s
