"""The local hub server: :class:`HubServer`, started in a thread by :func:`serve_hub` or in the foreground by
:func:`run_hub_server` (``prg-hub serve-hub``).

Limits, refused with :class:`~.errors.TooLarge` (413): a request body over ``max_request_bytes``; an LFS upload
over ``max_upload_bytes`` or over the size it announced; a regular (inline) file over ``REGULAR_MAX_SIZE``. At
most ``max_threads`` requests are served at once; further connections wait in the listen backlog, and a client
that stalls mid-request is dropped after ``HubRequestHandler.timeout`` seconds.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

from .auth import AccessRules, TokenTable, UploadSigner
from .http import HubRequestHandler
from .storage import HubStorage

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 128 * 1024 * 1024  # API and commit bodies: many inline files of up to 10 MB each
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 ** 3  # one LFS object
DEFAULT_MAX_THREADS = 32


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
            temporary files under it are removed (see :mod:`prg_hub.hub_server.storage`).
        token_file: the tokens and their roles (format and access rules in :mod:`prg_hub.hub_server.auth`);
            without one, writes are refused unless ``allow_anonymous_writes``.
        allow_anonymous_writes: let requests without a token act with the ``write`` role (for local tests);
            refused with ``ValueError`` unless ``host`` is a loopback address.
        max_upload_bytes: the largest LFS object accepted.
        max_request_bytes: the largest other request body (a commit with its inline files, JSON calls).
        max_threads: how many requests are served at once.

    Raises ``TokenFileError`` (a ``ValueError``) for a bad token file and ``ValueError`` for bad options. A
    server bound to an address other than a loopback one, without a token file, logs a warning.
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
        self.access = AccessRules(None if token_file is None else TokenTable.from_file(token_file),
                                  allow_anonymous_writes)
        self.max_upload_bytes, self.max_request_bytes = max_upload_bytes, max_request_bytes
        self.signer = UploadSigner()
        self.storage = HubStorage(self.root)
        if removed := self.storage.remove_abandoned_temp_files():
            logger.info("Removed %d abandoned temporary file(s) from %s", removed, self.root / "tmp")
        self._httpd = _HubHTTPServer((host, port), self, max_threads)
        self.host, self.port = host, self._httpd.server_address[1]
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None
        if self.access.tokens is None and not is_loopback(host):
            logger.warning("WARNING: the hub server on %s has no token file: anyone who can reach it reads every "
                           "public repo, and nobody can write. Pass --token-file to control access.", self.url)

    def start(self) -> Self:
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

    def __enter__(self) -> Self:
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
    if server.access.tokens is not None:
        access = f"{len(server.access.tokens)} token(s) from {server.token_file}"
    elif server.access.allow_anonymous_writes:
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
