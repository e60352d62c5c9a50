"""A local Hugging Face Hub server, built on the standard library only.

It speaks the subset of the Hub HTTP API that ``huggingface_hub`` uses to push and pull model, dataset and
space repos, so ``HfApi``, ``snapshot_download``, ``PreTrainedModel.push_to_hub`` and
``datasets.load_dataset`` work against it unchanged once ``HF_ENDPOINT`` points at it and
``HF_HUB_DISABLE_XET=1`` is set (Xet storage exists only on the real Hub).

Modules:

=============== ==============================================================================================
``server``      :class:`HubServer`, :func:`serve_hub`, :func:`run_hub_server`: options, limits, thread bound
``http``        reading requests, the routing table, writing answers; refusals mapped to HTTP statuses
``endpoints``   one function per Hub API endpoint
``messages``    requests and answers as the endpoints see them; request bodies read under a limit
``auth``        the token file, roles, access rules and signed LFS upload URLs
``storage``     repos, commits and blobs on disk; atomic commits and the cross-process repo lock
``commits``     strict parsing of commit requests (NDJSON)
``names``       valid repo ids, branch names and paths
``errors``      why a request is refused, as domain errors
=============== ==============================================================================================
"""

from .auth import TokenFileError
from .server import (
    DEFAULT_MAX_THREADS,
    DEFAULT_MAX_UPLOAD_BYTES,
    HubServer,
    run_hub_server,
    serve_hub,
)
from .storage import REGULAR_MAX_SIZE, Operation

__all__ = [
    "DEFAULT_MAX_THREADS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "REGULAR_MAX_SIZE",
    "HubServer",
    "Operation",
    "TokenFileError",
    "run_hub_server",
    "serve_hub",
]
