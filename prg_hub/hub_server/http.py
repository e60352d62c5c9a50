"""The HTTP side of the local hub: reading requests, routing them to endpoints, writing answers.

Each request is authenticated first (an unknown token is refused whatever it asks), then routed by
:data:`ROUTES`, a table from (method, path pattern) to endpoint; a route that names a role is authorized on its
repo before the endpoint runs. A path that no route matches is a 404, an invalid repo id in a matched path a 400,
a path matched with another method a 405.

Refusals are answered in one place, :func:`error_answer`: a JSON body ``{"error": message}`` with the status of
:data:`ERROR_STATUS`, the message repeated in ``X-Error-Message``, and for the errors ``huggingface_hub`` tells
apart the ``X-Error-Code`` of :data:`ERROR_CODES`, from which it raises ``RepositoryNotFoundError``,
``RevisionNotFoundError`` or ``EntryNotFoundError``. Malformed requests are 400, never 500.

A request whose body was not read to its end (a refusal before reading it, a body over the limit) is answered,
then its connection is closed gracefully, so that the client reads the answer rather than a reset.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

from . import endpoints
from .errors import (
    AlreadyExists,
    EntryNotFound,
    HubError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PermissionDenied,
    RangeNotSatisfiable,
    RepoBusy,
    RepoNotFound,
    RevisionConflict,
    RevisionNotFound,
    TooLarge,
    Unauthenticated,
)
from .messages import CHUNK, Answer, FileRange, Request, RequestBody, json_answer
from .names import check_repo_id
from .storage import DEFAULT_BRANCH

logger = logging.getLogger(__name__)

LINGER_BYTES = 64 * 1024 * 1024  # what is read and dropped of a body left unread, before closing
LINGER_S = 5.0

# The status of each kind of refusal; an error takes the entry of its nearest listed class.
ERROR_STATUS: dict[type[HubError], int] = {
    HubError: 400,  # a refusal of none of the kinds below
    InvalidRequest: 400,
    Unauthenticated: 401,
    PermissionDenied: 403,
    NotFound: 404,
    MethodNotAllowed: 405,
    AlreadyExists: 409,
    RevisionConflict: 412,
    TooLarge: 413,
    RangeNotSatisfiable: 416,
    RepoBusy: 503,
}
# The X-Error-Code of the refusals that huggingface_hub turns into exceptions of their own.
ERROR_CODES: dict[type[HubError], str] = {
    RepoNotFound: "RepoNotFound",
    RevisionNotFound: "RevisionNotFound",
    EntryNotFound: "EntryNotFound",
}


def error_answer(err: HubError) -> Answer:
    """The answer to a refusal (format in the module docstring), with the headers some refusals add."""
    status = next(ERROR_STATUS[cls] for cls in type(err).__mro__ if cls in ERROR_STATUS)
    headers = {"X-Error-Code": ERROR_CODES.get(type(err))}
    if isinstance(err, EntryNotFound):
        headers["X-Repo-Commit"] = err.commit_id
    elif isinstance(err, RangeNotSatisfiable):
        headers["Content-Range"] = f"bytes */{err.size}"
    elif isinstance(err, RepoBusy):
        headers["Retry-After"] = str(err.retry_after_s)
    return _error(status, err.message, headers)


def _error(status: int, message: str, headers: dict | None = None) -> Answer:
    # X-Error-Message is read by huggingface_hub; header values must be one line of Latin-1.
    header_message = message.encode("ascii", "backslashreplace").decode().replace("\r", " ").replace("\n", " ")
    return json_answer({"error": message}, status, {**(headers or {}), "X-Error-Message": header_message})


class Route(NamedTuple):
    """Requests whose path matches ``pattern`` go to the endpoint that ``endpoints`` gives for their method.

    ``role``: what the identity needs on the repo of the path, checked before the endpoint runs; None for the
    routes whose endpoint checks access itself.
    """

    pattern: re.Pattern
    role: str | None
    endpoints: dict[str, Callable[..., Answer]]


def _route(pattern: str, role: str | None, **endpoints_by_method: Callable[..., Answer]) -> Route:
    return Route(re.compile(pattern), role, endpoints_by_method)


# A repo id is one or two path segments; in /api paths, two when the word after the second one is the action.
_API_REPO = r"/api/(?P<repo_type>models|datasets|spaces)/(?P<repo_id>[^/]*(?:/[^/]*)?)"
# Web paths: ``datasets/`` or ``spaces/`` before the id, or nothing for a model.
_WEB_REPO = r"/(?:(?P<repo_type>datasets|spaces)/)?(?P<repo_id>[^/]*(?:/[^/]*)??)"
_REVISION = r"(?:/(?P<revision>[^/]*))?"  # percent-encoded, so one segment; the default branch when left out

# The first route whose pattern matches a request's path serves it: action routes come before the bare repo route.
ROUTES = (
    _route(r"/api/whoami-v2", None, GET=endpoints.whoami),
    _route(r"/api/repos/create", None, POST=endpoints.create_repo),
    _route(r"/api/repos/delete", None, DELETE=endpoints.delete_repo),
    _route(r"/api/validate-yaml", None, POST=endpoints.validate_yaml),
    _route(_API_REPO + r"/revision/(?P<revision>.+)", "read", GET=endpoints.repo_info),
    _route(_API_REPO + r"/tree(?:/(?P<revision>[^/]*)(?:/(?P<path>.*))?)?", "read", GET=endpoints.tree),
    _route(_API_REPO + r"/paths-info" + _REVISION, "read", POST=endpoints.paths_info),
    _route(_API_REPO + r"/commits" + _REVISION, "read", GET=endpoints.commits),
    _route(_API_REPO + r"/refs", "read", GET=endpoints.refs),
    _route(_API_REPO + r"/preupload" + _REVISION, "write", POST=endpoints.preupload),
    _route(_API_REPO + r"/commit" + _REVISION, "write", POST=endpoints.create_commit),
    _route(_API_REPO + r"/branch/(?P<branch>.+)", "write", POST=endpoints.create_branch,
           DELETE=endpoints.delete_branch),
    _route(_API_REPO + r"/lfs-verify", "write", POST=endpoints.lfs_verify),
    _route(_API_REPO + r"/lfs-objects/(?P<oid>[^/]*)", None, PUT=endpoints.lfs_upload),  # signed URLs
    _route(_API_REPO, "read", GET=endpoints.repo_info),
    _route(_WEB_REPO + r"\.git/info/lfs/objects/batch", "write", POST=endpoints.lfs_batch),
    # Special refs (refs/pr/N, refs/convert/...) come unquoted in download URLs.
    _route(_WEB_REPO + r"/resolve/(?P<revision>refs/(?:pr|convert)/[^/]*|[^/]*)(?:/(?P<path>.*))?", "read",
           GET=endpoints.resolve, HEAD=endpoints.resolve),
)

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
# How each path parameter reaches the endpoint: checked and percent-decoded.
_PARAMETERS: dict[str, Callable[[str | None], str]] = {
    "repo_type": lambda value: _REPO_TYPES.get(value, "model"),
    "repo_id": check_repo_id,
    "revision": lambda value: unquote(value or "") or DEFAULT_BRANCH,
    "path": lambda value: unquote(value or ""),
    "branch": unquote,
    "oid": str,
}


def find_route(method: str, path: str) -> tuple[Route, Callable[..., Answer], dict[str, str]]:
    """The route of a request, its endpoint and its path parameters.

    Refusals, in this order: NotFound if no route matches the path, InvalidRequest if the path names an invalid
    repo id, MethodNotAllowed if the route takes other methods.
    """
    for route in ROUTES:
        if match := route.pattern.fullmatch(path):
            params = {name: _PARAMETERS[name](value) for name, value in match.groupdict().items()}
            if method not in route.endpoints:
                raise MethodNotAllowed(method)
            return route, route.endpoints[method], params
    raise NotFound("Unknown endpoint")


class HubRequestHandler(BaseHTTPRequestHandler):
    """Reads a request, routes it to its endpoint and writes the answer.

    Its server's ``hub`` is the :class:`~prg_hub.hub_server.server.HubServer` it serves: storage, access rules,
    upload signer and limits.
    """

    server_version = "prg-hub"
    timeout = 120  # seconds a client may stall mid-request

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format, *args):
        logger.debug("%s %s", self.address_string(), format % args)

    def _dispatch(self) -> None:
        """Answer one request; then close the connection gracefully if its body was left unread."""
        hub = self.server.hub
        limit = hub.max_upload_bytes if self.command == "PUT" else hub.max_request_bytes
        body = RequestBody(self.rfile, self.headers, limit)
        try:
            self._answer(body)
        except (ConnectionError, TimeoutError):  # the client went away or stalled: nobody to answer
            self.close_connection = True
        finally:
            if not body.complete:
                self._linger()

    def _answer(self, body: RequestBody) -> None:
        """Authenticate, route and serve the request, and write its answer or the answer to its refusal.

        A client that went away or stalled gets no answer: its ``ConnectionError`` or ``TimeoutError`` goes up.
        """
        try:
            url = urlsplit(self.path)
            address, port = self.server.server_address[:2]
            host = self.headers.get("Host") or f"{address}:{port}"
            hub = self.server.hub
            request = Request(self.command, parse_qs(url.query), self.headers, body,
                              hub.access.identify(self.headers.get("Authorization")), f"http://{host}",
                              hub.storage, hub.access, hub.signer, hub.max_upload_bytes)
            route, endpoint, params = find_route(self.command, url.path)
            if route.role is not None:
                request.authorize(params["repo_type"], params["repo_id"], route.role)
            self._write(endpoint(request, **params))
        except (ConnectionError, TimeoutError):
            raise
        except HubError as err:
            self._write(error_answer(err))
        except (ValueError, KeyError, TypeError, IndexError) as err:
            self._write(error_answer(InvalidRequest(f"Bad request: {err}")))
        except Exception:
            logger.exception("Failed to serve %s %s", self.command, self.path)
            self._write(_error(500, "Internal server error"))

    def _write(self, answer: Answer) -> None:
        status, headers, body = answer
        self.send_response(status)
        for key, value in headers.items():
            if value is not None:
                self.send_header(key, str(value))
        self.send_header("Content-Length", str(body.end - body.start if isinstance(body, FileRange) else len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if not isinstance(body, FileRange):
            self.wfile.write(body)
            return
        with open(body.path, "rb") as f:
            f.seek(body.start)
            remaining = body.end - body.start
            while remaining and (chunk := f.read(min(CHUNK, remaining))):
                self.wfile.write(chunk)
                remaining -= len(chunk)

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
                if not (data := self.connection.recv(CHUNK)):
                    break
                dropped += len(data)
        except OSError:
            pass
