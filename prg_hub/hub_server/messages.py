"""Requests and answers as the endpoints see them, and request bodies read under a size limit.

An endpoint gets a :class:`Request` (method, query, headers, the lazily read :class:`RequestBody`, the identity
that sent it, and the server's storage, access rules and upload signer) and returns an :class:`Answer`: a
status, headers and a body, either bytes or a :class:`FileRange` to stream. Writing it to the socket is
:mod:`prg_hub.hub_server.http`'s part.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import BinaryIO, NamedTuple

from .auth import AccessRules, Identity, UploadSigner
from .errors import InvalidRequest, TooLarge
from .storage import HubStorage

CHUNK = 1024 * 1024  # bytes read or written at once


class RequestBody:
    """A request body (``Content-Length`` or chunked), read lazily in chunks, of at most ``limit`` bytes.

    Iterating yields the chunks, once. Going over ``limit`` raises TooLarge: before reading anything when
    ``Content-Length`` or a chunk's size says so. A body that ends early or is badly chunked raises InvalidRequest.
    """

    def __init__(self, rfile: BinaryIO, headers: Message, limit: int):
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
            raise TooLarge(f"The request body is over the limit of {self.limit} bytes")

    def _read(self) -> Iterator[bytes]:
        if self._length is None:
            raise InvalidRequest("Invalid Content-Length")
        if self._chunked:
            while size := self._chunk_size():
                self._count(size)
                yield from self._read_exactly(size)
                if not self._rfile.readline(1024).endswith(b"\n"):
                    raise InvalidRequest("Request body ended early or is not properly chunked")
            while self._rfile.readline(1024).strip():  # trailer fields
                pass
        else:
            self._count(self._length)
            yield from self._read_exactly(self._length)
        self.complete = True

    def _read_exactly(self, size: int) -> Iterator[bytes]:
        while size:
            chunk = self._rfile.read(min(size, CHUNK))
            if not chunk:
                raise InvalidRequest("Request body ended early")
            size -= len(chunk)
            yield chunk

    def _chunk_size(self) -> int:
        line = self._rfile.readline(1024)
        try:
            return int(line.split(b";")[0], 16)
        except ValueError:
            raise InvalidRequest("Request body ended early or is not properly chunked") from None


@dataclass
class Request:
    """One request, once its sender is identified, with the parts of the server that endpoints use.

    ``query`` maps each query parameter to its values; ``base_url`` is the server's URL as the client reached it
    (from the ``Host`` header), for the URLs that answers hand out; ``max_upload_bytes`` is the largest LFS object
    the server accepts.
    """

    method: str
    query: dict[str, list[str]]
    headers: Message
    body: RequestBody
    identity: Identity
    base_url: str
    storage: HubStorage
    access: AccessRules
    signer: UploadSigner
    max_upload_bytes: int

    def json_object(self) -> dict:
        """The body as a JSON object (an empty body is ``{}``); InvalidRequest for anything else."""
        body = json.loads(self.body.read() or b"{}")
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object")
        return body

    def require(self, role: str) -> None:
        """Refuse the request unless its identity holds ``role``."""
        self.access.require(self.identity, role)

    def authorize(self, repo_type: str, repo_id: str, role: str) -> dict:
        """The metadata of a repo that the request may access with ``role``; RepoNotFound if it may not see it."""
        meta = self.storage.repo_meta(repo_type, repo_id)
        self.access.require_on_repo(self.identity, repo_id, meta["private"], role)
        return meta

    def repo_url(self, repo_type: str, repo_id: str) -> str:
        """The web URL of a repo, as the Hub gives it (``datasets/`` or ``spaces/`` before the id)."""
        prefix = {"dataset": "datasets/", "space": "spaces/"}.get(repo_type, "")
        return f"{self.base_url}/{prefix}{repo_id}"


class FileRange(NamedTuple):
    """Bytes ``start`` to ``end`` (excluded) of the file at ``path``."""

    path: Path
    start: int
    end: int


class Answer(NamedTuple):
    """An answer: status, headers (those whose value is None are left out) and body.

    ``Content-Length`` is added from the body, which is not sent to a ``HEAD`` request.
    """

    status: int
    headers: dict[str, object]
    body: bytes | FileRange = b""


def json_answer(obj, status: int = 200, headers: dict | None = None) -> Answer:
    """``obj`` as a JSON answer; ``headers`` may replace its ``Content-Type``."""
    return Answer(status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode())
