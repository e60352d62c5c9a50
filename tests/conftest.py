"""Shared test setup: a local hub server that the real Hugging Face clients talk to.

``huggingface_hub`` reads ``HF_ENDPOINT`` (and its cache location) once, when it is first imported, and
transformers and datasets import it. So the environment is set here, before anything else is imported: the
clients talk to a local hub on a port chosen now, with plain LFS uploads instead of Xet, a test token, and a
fresh, empty cache under a temporary ``HF_HOME`` that never touches the user's cache.

The hub serves with a token file that gives the test token (``HF_TOKEN``) the ``admin`` role under the name
``TEST_USER``, so tests push, create branches and delete repos as an authenticated client would on the Hub.
"""

import importlib.util
import os
import shutil
import socket
import tempfile

TEST_TOKEN = "hf_local_test_token"
TEST_USER = "tester"

with socket.socket() as _sock:
    _sock.bind(("127.0.0.1", 0))
    HUB_PORT = _sock.getsockname()[1]

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
              "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "HF_XET_CACHE", "HF_TOKEN_PATH"):
    os.environ.pop(_name, None)
_HF_HOME = tempfile.mkdtemp(prefix="prg-hub-hf-home-")
os.environ.update({
    "HF_ENDPOINT": f"http://127.0.0.1:{HUB_PORT}",
    "HF_HUB_DISABLE_XET": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_TOKEN": TEST_TOKEN,
    "HF_HOME": _HF_HOME,
})

import pytest  # noqa: E402 - the environment above must be set first

from prg_hub.hub_server import HubServer, serve_hub  # noqa: E402

_servers: list[HubServer] = []


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "needs_train_extra: runs the training scripts or their augmentation, which need torchvision "
        "(prg_hub[train]); skipped where it is not installed"
    )
    config.addinivalue_line(
        "markers", "needs_browser: drives the web demo in headless Chromium, which needs gradio (prg_hub[demo]), "
        "selenium and Debian's chromium and chromium-driver; skipped where one is missing"
    )


def missing_for_browser_tests() -> list[str]:
    """What the `needs_browser` tests need and this machine lacks: modules gradio and selenium, programs chromium
    and chromedriver."""
    missing = [module for module in ("gradio", "selenium") if importlib.util.find_spec(module) is None]
    return missing + [program for program in ("chromium", "chromedriver") if shutil.which(program) is None]


def pytest_collection_modifyitems(config, items):
    """Skip the `needs_train_extra` tests where torchvision is missing (the package's core does not need it), and
    the `needs_browser` tests where gradio, selenium or Chromium is missing."""
    skips = {}
    if importlib.util.find_spec("torchvision") is None:
        skips["needs_train_extra"] = pytest.mark.skip(
            reason='needs the training extra: pip install "prg_hub[train]" (torchvision)')
    if missing := missing_for_browser_tests():
        skips["needs_browser"] = pytest.mark.skip(reason=f"needs {', '.join(missing)}: pip install "
                                                  '"prg_hub[demo,test]"; apt-get install chromium chromium-driver')
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    """Remove the temporary ``HF_HOME``."""
    shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory):
    """The hub server at ``HF_ENDPOINT``, storing under a temporary root, shared by the whole session."""
    token_file = tmp_path_factory.mktemp("hub-tokens") / "tokens.txt"
    token_file.write_text(f"{TEST_TOKEN} {TEST_USER} admin\n")
    _servers.append(serve_hub(tmp_path_factory.mktemp("hub"), "127.0.0.1", HUB_PORT, token_file=token_file))
    yield _servers[0]
    for server in _servers:
        server.shutdown()


@pytest.fixture
def restart_hub():
    """A function ``restart_hub(server)``: shut ``server`` down, then serve its root on its port again."""

    def restart(server: HubServer) -> HubServer:
        server.shutdown()
        _servers.append(serve_hub(server.root, server.host, server.port, token_file=server.token_file))
        return _servers[-1]

    return restart
