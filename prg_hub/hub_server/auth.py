"""Who may do what on the local hub server: tokens and their roles, access rules, and signed LFS upload URLs.

A token file holds one token per line, ``TOKEN NAME ROLE`` separated by whitespace; blank lines and lines
starting with ``#`` are ignored. ``NAME`` is what ``/api/whoami-v2`` reports and the namespace of the repos the
token creates without naming one. Each role includes the ones before it:

====== ==================================================================================================
read   read private repos (public repos are readable by anyone, even without a token)
write  create repos; commit, which includes deleting files and folders; create and delete branches
admin  delete repos
====== ==================================================================================================

A client that sends no token is anonymous: it reads public repos only, unless the server lets anonymous
clients write (then they act with the ``write`` role). There are no per-user or per-namespace rights: any
token with ``write`` may commit to any repo, and any valid token may read every private repo.

Refusals (:class:`AccessRules`): a token the server does not know is :class:`~.errors.Unauthenticated` on every
request, even for public reads. A private repo is :class:`~.errors.RepoNotFound`, as on the Hub, to clients
without the ``read`` role. Lacking a role is :class:`~.errors.Unauthenticated` for anonymous clients and
:class:`~.errors.PermissionDenied` for tokens. Without a token file the server knows no token: the
``Authorization`` header is ignored, every client is anonymous, and lacking a role is
:class:`~.errors.PermissionDenied`, since no token could help.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from typing import NamedTuple

from .errors import PermissionDenied, RepoNotFound, Unauthenticated
from .names import is_valid_name

ROLES = ("read", "write", "admin")
LFS_URL_TTL_S = 3600  # how long an upload URL handed out by the LFS batch endpoint stays valid
# The message huggingface_hub recognises as a bad token (other refusals on repo URLs become RepositoryNotFoundError).
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


class TokenFileError(ValueError):
    """A token file that cannot be read or has a malformed line (the message names the file and line)."""


class Identity(NamedTuple):
    """Who sent a request: a token's name and role, or an anonymous client (``name`` is None)."""

    name: str | None
    role: str | None

    def can(self, role: str) -> bool:
        """Whether this identity holds ``role`` or a higher one."""
        return self.role is not None and ROLES.index(self.role) >= ROLES.index(role)


ANONYMOUS = Identity(None, None)
ANONYMOUS_WRITER = Identity(None, "write")


class TokenTable:
    """The tokens of a token file, looked up by their sha256 so that a lookup does not compare secrets byte by byte."""

    def __init__(self, identities: dict[str, Identity]):
        self._by_digest = {_digest(token): identity for token, identity in identities.items()}

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, token: str) -> Identity | None:
        """The identity of ``token``, or None if the token is not in the table."""
        return self._by_digest.get(_digest(token))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TokenTable:
        """Read a token file (format in the module docstring); raise :class:`TokenFileError` on any bad line.

        Error messages give the line number but never the line itself, which holds a secret.
        """
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise TokenFileError(f"Cannot read the token file {path}: {err}") from None
        identities: dict[str, Identity] = {}
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            where = f"{path}, line {number}"
            if len(fields) != 3:
                raise TokenFileError(f"{where}: expected 'TOKEN NAME ROLE', found {len(fields)} field(s)")
            token, name, role = fields
            if role not in ROLES:
                raise TokenFileError(f"{where}: unknown role {role!r}; the roles are {', '.join(ROLES)}")
            if not is_valid_name(name):
                raise TokenFileError(f"{where}: the name {name!r} cannot be a namespace (letters, digits, '.', '_' "
                                     "and '-'; no '--', '..' or reserved word such as 'api' or 'datasets')")
            if token in identities:
                raise TokenFileError(f"{where}: this token is already given on an earlier line")
            identities[token] = Identity(name, role)
        return cls(identities)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class AccessRules:
    """Who sends a request, and whether that identity may do what it asks (rules in the module docstring).

    Args:
        tokens: the token file's table, or None for a server without one.
        allow_anonymous_writes: clients without a token act with the ``write`` role.
    """

    def __init__(self, tokens: TokenTable | None, allow_anonymous_writes: bool = False):
        self.tokens, self.allow_anonymous_writes = tokens, allow_anonymous_writes

    def identify(self, authorization: str | None) -> Identity:
        """The identity of a request's ``Authorization`` header (None when absent); Unauthenticated for a bad one."""
        if self.tokens is None or authorization is None:
            return ANONYMOUS_WRITER if self.allow_anonymous_writes else ANONYMOUS
        scheme, _, token = authorization.strip().partition(" ")
        identity = self.tokens.lookup(token.strip()) if scheme.lower() == "bearer" else None
        if identity is None:
            raise Unauthenticated(INVALID_CREDENTIALS)
        return identity

    def require(self, identity: Identity, role: str) -> None:
        """Refuse unless ``identity`` holds ``role``: Unauthenticated for anonymous clients, else PermissionDenied."""
        if identity.can(role):
            return
        if identity.name is not None:
            raise PermissionDenied(f"The token of {identity.name} has the {identity.role} role; "
                                   f"this needs the {role} role")
        if self.tokens is None:
            raise PermissionDenied(f"This needs a token with the {role} role, and this server knows no tokens: "
                                   "start it with --token-file FILE (or, on a loopback address, "
                                   "--allow-anonymous-writes)")
        raise Unauthenticated(f"Authentication required: this needs a token with the {role} role "
                              "(Authorization: Bearer TOKEN)")

    def require_on_repo(self, identity: Identity, repo_id: str, private: bool, role: str) -> None:
        """Refuse unless ``identity`` may act with ``role`` on a repo.

        A private repo, without the ``read`` role, is RepoNotFound. Anyone may read a public repo; other roles
        are checked by :meth:`require`.
        """
        if private and not identity.can("read"):
            raise RepoNotFound(repo_id)
        if role != "read":
            self.require(identity, role)


class UploadSigner:
    """Signs the upload URLs that the LFS batch endpoint hands out, and checks them when the upload arrives.

    The client sends the LFS ``PUT`` without its token, as it would to a presigned storage URL on the Hub, so
    the URL itself carries the right to upload: one object (repo, sha256 and size) until it expires. The key is
    random and lives in the server process, so URLs die with it.
    """

    def __init__(self, ttl_s: int = LFS_URL_TTL_S):
        self._key = secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def sign(self, repo_type: str, repo_id: str, oid: str, size: int) -> dict[str, str]:
        """The query parameters that authorise uploading object ``oid`` of ``size`` bytes to this repo."""
        expires = str(int(time.time()) + self.ttl_s)
        return {"size": str(size), "expires": expires,
                "signature": self._signature(repo_type, repo_id, oid, str(size), expires)}

    def check(self, repo_type: str, repo_id: str, oid: str, params: dict[str, str]) -> int | None:
        """The signed size if ``params`` (from :meth:`sign`) authorise this upload now, else None."""
        size, expires, signature = params.get("size", ""), params.get("expires", ""), params.get("signature", "")
        if not (size.isdigit() and expires.isdigit()) or int(expires) < time.time():
            return None
        expected = self._signature(repo_type, repo_id, oid, size, expires)
        return int(size) if hmac.compare_digest(expected, signature) else None

    def _signature(self, *fields: str) -> str:
        return hmac.new(self._key, "\n".join(fields).encode(), hashlib.sha256).hexdigest()
