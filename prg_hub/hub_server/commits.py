"""The Hub's NDJSON commit format, as ``huggingface_hub`` sends it to ``POST /api/{type}s/{id}/commit/{rev}``.

One JSON object per line, each ``{"key": KIND, "value": {...}}``. The first line is the header, the others are
operations, applied in order::

    {"key": "header", "value": {"summary": str, "description": str | null, "parentCommit": sha1 | null}}
    {"key": "file", "value": {"path": str, "content": base64 str, "encoding": "base64"}}
    {"key": "lfsFile", "value": {"path": str, "oid": sha256, "algo": "sha256", "size": int}}
    {"key": "deletedFile", "value": {"path": str}}
    {"key": "deletedFolder", "value": {"path": str}}

``encoding``, ``algo``, ``size`` (and, in the header, ``description`` and ``parentCommit``) may be left out.
Anything else is refused with :class:`~.errors.InvalidRequest` (:class:`~.errors.InvalidPath` for an unsafe path)
naming the line: a line that is not such an object, a missing, unknown or ill-typed field, content that is not
base64. A regular file over ``REGULAR_MAX_SIZE`` is :class:`~.errors.TooLarge`: larger files go through LFS.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import NamedTuple

from .errors import InvalidRequest, TooLarge
from .names import SHA1_RE, SHA256_RE, check_path
from .storage import REGULAR_MAX_SIZE, Operation

# kind -> (required fields, optional fields)
_FIELDS = {
    "header": ({"summary"}, {"description", "parentCommit"}),
    "file": ({"path", "content"}, {"encoding"}),
    "lfsFile": ({"path", "oid"}, {"algo", "size"}),
    "deletedFile": ({"path"}, set()),
    "deletedFolder": ({"path"}, set()),
}


class Commit(NamedTuple):
    """A parsed commit request."""

    summary: str
    description: str
    parent_commit: str | None
    operations: list[Operation]


def parse_commit(body: bytes) -> Commit:
    """Parse and check an NDJSON commit body (format and errors in the module docstring)."""
    entries = [(number, *_entry(number, line)) for number, line in enumerate(body.split(b"\n"), 1) if line.strip()]
    if not entries or entries[0][1] != "header":
        raise InvalidRequest("The first line of a commit must be its header")
    if any(kind == "header" for _, kind, _ in entries[1:]):
        raise InvalidRequest("A commit has one header, on its first line")
    number, _, header = entries[0]
    description, parent = header.get("description"), header.get("parentCommit")
    if not isinstance(header["summary"], str) or not isinstance(description, (str, type(None))):
        raise InvalidRequest(f"Line {number}: the commit summary and description must be strings")
    if parent is not None and not (isinstance(parent, str) and SHA1_RE.fullmatch(parent)):
        raise InvalidRequest(f"Line {number}: parentCommit must be a commit id (40 hexadecimal digits)")
    operations = [_operation(number, kind, value) for number, kind, value in entries[1:]]
    return Commit(header["summary"], description or "", parent, operations)


def _entry(number: int, line: bytes) -> tuple[str, dict]:
    """The kind and value of one line, with the value's fields checked against ``_FIELDS``."""
    try:
        entry = json.loads(line)
    except ValueError:
        raise InvalidRequest(f"Line {number} of the commit is not JSON") from None
    if not isinstance(entry, dict) or entry.keys() != {"key", "value"}:
        raise InvalidRequest(f"Line {number}: expected an object with exactly the fields 'key' and 'value'")
    kind, value = entry["key"], entry["value"]
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise InvalidRequest(f"Line {number}: unknown commit operation {kind!r} (expected header, file, lfsFile, "
                             "deletedFile or deletedFolder)")
    if not isinstance(value, dict):
        raise InvalidRequest(f"Line {number}: the value of a {kind!r} line must be an object")
    required, optional = _FIELDS[kind]
    if missing := required - value.keys():
        raise InvalidRequest(f"Line {number}: {kind!r} is missing {', '.join(sorted(missing))}")
    if unknown := value.keys() - required - optional:
        raise InvalidRequest(f"Line {number}: {kind!r} has unknown field(s) {', '.join(sorted(unknown))}")
    return kind, value


def _operation(number: int, kind: str, value: dict) -> Operation:
    path = value["path"]
    if not isinstance(path, str):
        raise InvalidRequest(f"Line {number}: the path must be a string")
    if kind == "deletedFolder":
        path = path.rstrip("/")
    check_path(path)
    if kind == "file":
        if value.get("encoding", "base64") != "base64" or not isinstance(value["content"], str):
            raise InvalidRequest(f"Line {number}: file content must be a base64 string")
        try:
            content = base64.b64decode(value["content"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"Line {number}: invalid base64 content for {path!r}") from None
        if len(content) > REGULAR_MAX_SIZE:
            raise TooLarge(f"Line {number}: {path!r} has {len(content)} bytes; regular files may have at most "
                           f"{REGULAR_MAX_SIZE}, larger ones go through LFS")
        return Operation(kind, path, content=content)
    if kind == "lfsFile":
        oid, size = value["oid"], value.get("size")
        if not (isinstance(oid, str) and SHA256_RE.fullmatch(oid)) or value.get("algo", "sha256") != "sha256":
            raise InvalidRequest(f"Line {number}: an LFS file needs a sha256 oid (64 hexadecimal digits)")
        if size is not None and (type(size) is not int or size < 0):
            raise InvalidRequest(f"Line {number}: the size of an LFS file must be a non-negative integer")
        return Operation(kind, path, oid=oid, size=size)
    return Operation(kind, path)
