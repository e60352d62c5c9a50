"""The local hub server, driven by the real huggingface_hub and datasets clients (see conftest.py)."""

import base64
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from safetensors.torch import load_file, save_file

from prg_hub.hub_server import REGULAR_MAX_SIZE, HubServer, TokenFileError, serve_hub

TEST_TOKEN = os.environ["HF_TOKEN"]  # set by conftest.py; the session's hub gives it the admin role


@pytest.fixture
def api(hub_server) -> HfApi:
    return HfApi()


@pytest.fixture
def model_folder(tmp_path) -> Path:
    """A small checkpoint folder: config, safetensors weights and a model card."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "prg", "hidden_size": 8}))
    save_file({"weight": torch.arange(24, dtype=torch.float32).reshape(4, 6), "bias": torch.ones(6)},
              folder / "model.safetensors")
    (folder / "README.md").write_text("---\nlicense: mit\nlibrary_name: prg_hub\n---\n# A PRG test model\n")
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def count_blobs(hub_server) -> int:
    return sum(1 for p in (hub_server.root / "blobs").rglob("*") if p.is_file())


def raw_request(hub_server, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                token: str | None = TEST_TOKEN):
    """Send a request exactly as written (no URL normalisation) and return ``(status, headers, body)``.

    ``token`` goes in the ``Authorization`` header (the test token by default; None sends none).
    """
    headers = {**({"Authorization": f"Bearer {token}"} if token is not None else {}), **(headers or {})}
    conn = http.client.HTTPConnection("127.0.0.1", hub_server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        conn.close()


def ndjson_commit(*operations: dict, summary: str = "raw commit", parent: str | None = None) -> bytes:
    header = {"summary": summary, "description": ""}
    if parent is not None:
        header["parentCommit"] = parent
    lines = [{"key": "header", "value": header}, *operations]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def file_op(path: str, content: bytes) -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(content).decode(), "encoding": "base64"}}


def test_model_round_trip(api, model_folder, tmp_path):
    repo_url = api.create_repo("org/model-rt")
    assert repo_url.repo_id == "org/model-rt" and repo_url.repo_type == "model"
    assert api.create_repo("org/model-rt", exist_ok=True).repo_id == "org/model-rt"
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("org/model-rt")
    assert conflict.value.response.status_code == 409

    commit = api.upload_folder(repo_id="org/model-rt", folder_path=model_folder)
    expected = folder_bytes(model_folder)

    snapshot = Path(snapshot_download("org/model-rt"))
    assert snapshot.name == commit.oid
    downloaded = folder_bytes(snapshot)
    assert downloaded.pop(".gitattributes")  # every repo starts with one, as on the Hub
    assert downloaded == expected

    weights = hf_hub_download("org/model-rt", "model.safetensors", cache_dir=tmp_path / "other-cache")
    assert Path(weights).read_bytes() == expected["model.safetensors"]
    torch.testing.assert_close(load_file(weights)["weight"], torch.arange(24, dtype=torch.float32).reshape(4, 6))

    infos = {info.path: info for info in api.get_paths_info("org/model-rt", ["model.safetensors", "config.json"])}
    assert infos["model.safetensors"].lfs is not None  # went through the LFS upload
    assert infos["model.safetensors"].lfs.sha256 == hashlib.sha256(expected["model.safetensors"]).hexdigest()
    assert infos["config.json"].lfs is None  # went inline in the commit
    assert api.model_info("org/model-rt").sha == commit.oid


def test_dataset_round_trip(api):
    import datasets
    from PIL import Image

    images = [Image.fromarray(np.full((4, 5, 3), 40 * i, dtype=np.uint8)) for i in range(4)]
    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=["cat", "dog", "bird"]),
        "caption": datasets.Value("string"),
    })
    rows = {"image": images, "label": [0, 2, 1, 2], "caption": ["a", "b", "c", "d"]}
    datasets.Dataset.from_dict(rows, features=features).push_to_hub("org/ds")

    loaded = datasets.load_dataset("org/ds", split="train")
    assert loaded.features == features
    assert list(loaded["label"]) == rows["label"]
    assert list(loaded["caption"]) == rows["caption"]
    for got, sent in zip(loaded["image"], images):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(sent))

    files = api.list_repo_tree("org/ds", repo_type="dataset", recursive=True)
    parquet = [f for f in files if isinstance(f, RepoFile) and f.path.endswith(".parquet")]
    assert parquet and all(f.lfs is not None for f in parquet)


def test_revision_pinning_and_branches(api):
    api.create_repo("org/pinned")
    v1 = api.upload_file(path_or_fileobj=b"weights v1", path_in_repo="weights.bin", repo_id="org/pinned")
    v2 = api.upload_file(path_or_fileobj=b"weights v2", path_in_repo="weights.bin", repo_id="org/pinned")
    assert v1.oid != v2.oid

    assert Path(hf_hub_download("org/pinned", "weights.bin", revision=v1.oid)).read_bytes() == b"weights v1"
    assert Path(hf_hub_download("org/pinned", "weights.bin")).read_bytes() == b"weights v2"
    assert [c.commit_id for c in api.list_repo_commits("org/pinned")][:2] == [v2.oid, v1.oid]

    api.create_branch("org/pinned", branch="release/v1", revision=v1.oid)
    assert Path(hf_hub_download("org/pinned", "weights.bin", revision="release/v1")).read_bytes() == b"weights v1"
    fix = api.upload_file(path_or_fileobj=b"fix", path_in_repo="fix.txt", repo_id="org/pinned",
                          revision="release/v1")
    branches = {ref.name: ref.target_commit for ref in api.list_repo_refs("org/pinned").branches}
    assert branches == {"main": v2.oid, "release/v1": fix.oid}
    snapshot = Path(snapshot_download("org/pinned", revision="release/v1"))
    assert (snapshot / "weights.bin").read_bytes() == b"weights v1" and (snapshot / "fix.txt").read_bytes() == b"fix"
    assert not api.file_exists("org/pinned", "fix.txt")  # main did not move

    api.delete_branch("org/pinned", branch="release/v1")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/pinned", revision="release/v1")


def test_missing_repo_file_and_revision_raise_client_errors(api, tmp_path):
    api.create_repo("org/errors")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="org/errors")

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/does-not-exist", "config.json", cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/does-not-exist", cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info("org/errors")  # a model repo, asked for as a dataset
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/errors", "missing.json", cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("org/errors", path_in_repo="no-such-folder"))
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/errors", "config.json", revision="no-such-branch", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/errors", revision="0" * 40)


def test_identical_content_is_stored_once(api, hub_server, model_folder):
    api.create_repo("org/dedup-a")
    first = api.upload_folder(repo_id="org/dedup-a", folder_path=model_folder)
    blobs = count_blobs(hub_server)

    again = api.upload_folder(repo_id="org/dedup-a", folder_path=model_folder)
    assert again.oid == first.oid  # nothing changed, so no new commit
    api.create_repo("org/dedup-b")
    other = api.upload_folder(repo_id="org/dedup-b", folder_path=model_folder)
    config = (model_folder / "config.json").read_bytes()
    copy = api.upload_file(path_or_fileobj=config, path_in_repo="copies/config.json", repo_id="org/dedup-a")

    assert count_blobs(hub_server) == blobs
    assert api.model_info("org/dedup-b").sha == other.oid
    assert api.model_info("org/dedup-a").sha == copy.oid
    assert Path(hf_hub_download("org/dedup-a", "copies/config.json")).read_bytes() == config


def test_concurrent_downloads(api, tmp_path):
    payload = os.urandom(3 * 1024 * 1024 + 17)
    api.create_repo("org/concurrent")
    api.upload_file(path_or_fileobj=payload, path_in_repo="big.safetensors", repo_id="org/concurrent")
    barrier, results, errors = threading.Barrier(8), {}, []

    def download(i: int) -> None:
        try:
            barrier.wait()
            path = hf_hub_download("org/concurrent", "big.safetensors", cache_dir=tmp_path / f"cache-{i}")
            results[i] = Path(path).read_bytes()
        except Exception as err:  # reported below, with the thread's result
            errors.append(err)

    threads = [threading.Thread(target=download, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 8 and all(data == payload for data in results.values())


def test_unsafe_paths_are_refused(api, hub_server):
    api.create_repo("org/safe")
    api.upload_file(path_or_fileobj=b"ok", path_in_repo="a/file.txt", repo_id="org/safe")
    head = api.model_info("org/safe").sha
    outside = set(hub_server.root.parent.iterdir())
    blobs = count_blobs(hub_server)

    for bad in ("../escape.txt", "a/../../escape.txt", "/etc/escape.txt", "..\\escape.txt", "a/\x00.txt", "./x"):
        status, headers, _ = raw_request(hub_server, "POST", "/api/models/org/safe/commit/main",
                                         ndjson_commit(file_op(bad, b"pwned")))
        assert status == 400, bad
    for bad in ("../../../etc/passwd", "%2E%2E/%2E%2E/etc/passwd", "%2Fetc%2Fpasswd", "a%5C..%5Cb", "a/%00",
                "a/./file.txt"):
        for method in ("GET", "HEAD"):
            status, _, _ = raw_request(hub_server, method, f"/org/safe/resolve/main/{bad}")
            assert status == 400, (method, bad)
    assert raw_request(hub_server, "GET", "/api/models/org/safe/tree/main/..%2F..")[0] == 400
    assert raw_request(hub_server, "GET", "/api/models/..%2F..%2Fetc/revision/main")[0] == 400

    assert api.model_info("org/safe").sha == head
    assert set(hub_server.root.parent.iterdir()) == outside
    assert count_blobs(hub_server) == blobs
    assert not any(p.name == "escape.txt" for p in hub_server.root.parent.rglob("*"))
    status, _, body = raw_request(hub_server, "GET", "/org/safe/resolve/main/a/file.txt")
    assert (status, body) == (200, b"ok")


def test_restart_keeps_every_repo(api, hub_server, restart_hub, model_folder, tmp_path):
    api.create_repo("org/persist-model")
    model_commit = api.upload_folder(repo_id="org/persist-model", folder_path=model_folder)
    api.create_branch("org/persist-model", branch="dev")
    api.create_repo("org/persist-data", repo_type="dataset")
    data_commit = api.upload_file(path_or_fileobj=b"x,y\n1,2\n", path_in_repo="data.csv",
                                  repo_id="org/persist-data", repo_type="dataset")

    restarted = restart_hub(hub_server)
    assert restarted is not hub_server and restarted.url == hub_server.url

    snapshot = Path(snapshot_download("org/persist-model", cache_dir=tmp_path / "fresh-cache"))
    assert snapshot.name == model_commit.oid
    downloaded = folder_bytes(snapshot)
    downloaded.pop(".gitattributes")
    assert downloaded == folder_bytes(model_folder)
    assert {ref.name for ref in api.list_repo_refs("org/persist-model").branches} == {"main", "dev"}
    assert api.dataset_info("org/persist-data").sha == data_commit.oid
    csv = hf_hub_download("org/persist-data", "data.csv", repo_type="dataset", cache_dir=tmp_path / "fresh-cache")
    assert Path(csv).read_bytes() == b"x,y\n1,2\n"


def test_failed_commits_leave_the_previous_revision_intact(api, hub_server):
    api.create_repo("org/atomic")
    v1 = api.upload_file(path_or_fileobj=b"version 1", path_in_repo="state.txt", repo_id="org/atomic")
    commits = len(api.list_repo_commits("org/atomic"))
    url = "/api/models/org/atomic/commit/main"

    never_uploaded = hashlib.sha256(b"never uploaded").hexdigest()
    lfs_ref = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": never_uploaded, "size": 14}}
    status, _, _ = raw_request(hub_server, "POST", url, ndjson_commit(file_op("state.txt", b"version 2"), lfs_ref))
    assert status == 400

    status, _, _ = raw_request(hub_server, "POST", url, ndjson_commit(file_op("state.txt", b"v2"), parent="f" * 40))
    assert status == 412

    body = ndjson_commit(file_op("state.txt", b"version 2"), file_op("other.txt", b"other"))
    complete_lines = body[: body.rindex(b"\n", 0, len(body) - 1) + 1]  # header and first file, whole lines
    with socket.create_connection(("127.0.0.1", hub_server.port), timeout=10) as sock:
        sock.sendall(f"POST {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-ndjson\r\n"
                     f"Authorization: Bearer {TEST_TOKEN}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + complete_lines)
        sock.shutdown(socket.SHUT_WR)  # the client goes away mid-upload
        assert sock.makefile("rb").readline().split()[1] == b"400"

    wrong_content = hashlib.sha256(b"announced").hexdigest()
    status, _, _ = raw_request(hub_server, "PUT", f"/api/models/org/atomic/lfs-objects/{wrong_content}", b"sent")
    assert status == 400
    assert not hub_server.storage.blob_path(wrong_content).exists()

    assert api.model_info("org/atomic").sha == v1.oid
    assert len(api.list_repo_commits("org/atomic")) == commits
    assert api.list_repo_files("org/atomic") == [".gitattributes", "state.txt"]
    status, headers, content = raw_request(hub_server, "GET", "/org/atomic/resolve/main/state.txt")
    assert (status, content, headers["X-Repo-Commit"]) == (200, b"version 1", v1.oid)


# -- access control -------------------------------------------------------------------------------------

TOKENS = {"hf_reader": ("reader", "read"), "hf_writer": ("writer", "write"), "hf_admin": ("boss", "admin")}


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "tokens.txt"
    path.write_text("# TOKEN NAME ROLE\n\n" + "".join(f"{token} {name} {role}\n"
                                                   for token, (name, role) in TOKENS.items()))
    return path


@pytest.fixture
def secured_hub(tmp_path, token_file):
    """A hub of its own with the tokens of ``TOKENS``."""
    with serve_hub(tmp_path / "secured-hub", token_file=token_file) as server:
        yield server


def client(server, token: str | bool) -> HfApi:
    """The real client on ``server``; ``token=False`` sends no token."""
    return HfApi(endpoint=server.url, token=token)


def status_of(call, *args, **kwargs) -> int:
    """The HTTP status of the ``HfHubHTTPError`` that ``call(*args, **kwargs)`` raises."""
    with pytest.raises(HfHubHTTPError) as err:
        call(*args, **kwargs)
    return err.value.response.status_code


def test_whoami_reports_the_token_name_and_role(secured_hub):
    for token, (name, role) in TOKENS.items():
        me = client(secured_hub, token).whoami()
        assert (me["name"], me["auth"]["accessToken"]["role"]) == (name, role)
    assert raw_request(secured_hub, "GET", "/api/whoami-v2", token=None)[0] == 401
    with pytest.raises(HfHubHTTPError, match="Invalid user token") as err:
        client(secured_hub, "hf_unknown").whoami()
    assert err.value.response.status_code == 401


def test_an_unknown_token_gets_401_even_for_public_reads(secured_hub):
    client(secured_hub, "hf_writer").create_repo("org/public")
    for method, path in (("GET", "/api/models/org/public"), ("GET", "/org/public/resolve/main/.gitattributes"),
                         ("POST", "/api/repos/create"), ("GET", "/api/whoami-v2")):
        assert raw_request(secured_hub, method, path, token="hf_unknown")[0] == 401, path
    assert raw_request(secured_hub, "GET", "/api/models/org/public", headers={"Authorization": "Basic eDp5"})[0] == 401
    with pytest.raises(HfHubHTTPError) as err:
        client(secured_hub, "hf_unknown").model_info("org/public")
    assert err.value.response.status_code == 401 and not isinstance(err.value, RepositoryNotFoundError)


def test_anonymous_clients_and_read_tokens_read_public_repos_and_write_nothing(secured_hub, tmp_path):
    writer = client(secured_hub, "hf_writer")
    writer.create_repo("org/open")
    writer.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="org/open")
    writer.create_branch("org/open", branch="dev")

    for token, status in ((False, 401), ("hf_reader", 403)):
        api = client(secured_hub, token)
        assert api.list_repo_files("org/open") == [".gitattributes", "config.json"]
        path = hf_hub_download("org/open", "config.json", endpoint=secured_hub.url, token=token,
                               cache_dir=tmp_path / f"cache-{token}")
        assert Path(path).read_bytes() == b"{}"
        assert status_of(api.create_repo, "org/other") == status
        assert status_of(api.upload_file, path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="org/open") == status
        assert status_of(api.delete_file, "config.json", repo_id="org/open") == status
        assert status_of(api.create_branch, "org/open", branch="feature") == status
        assert status_of(api.delete_branch, "org/open", branch="dev") == status
    assert writer.list_repo_files("org/open") == [".gitattributes", "config.json"]
    assert {ref.name for ref in writer.list_repo_refs("org/open").branches} == {"main", "dev"}
    assert not any(repo.name == "org--other" for repo in (secured_hub.root / "repos" / "models").iterdir())


def test_private_repos_are_not_found_without_read_access(secured_hub, tmp_path):
    writer, reader, anonymous = (client(secured_hub, token) for token in ("hf_writer", "hf_reader", False))
    writer.create_repo("org/secret", private=True)
    writer.upload_file(path_or_fileobj=b"hidden", path_in_repo="w.txt", repo_id="org/secret")

    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info("org/secret")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/secret", "w.txt", endpoint=secured_hub.url, token=False, cache_dir=tmp_path / "anon")
    with pytest.raises(RepositoryNotFoundError):
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="org/secret")
    for path in ("/org/secret/resolve/main/w.txt", "/api/models/org/secret/tree/main", "/api/models/org/secret"):
        status, headers, _ = raw_request(secured_hub, "GET", path, token=None)
        assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound"), path

    assert reader.model_info("org/secret").private
    path = hf_hub_download("org/secret", "w.txt", endpoint=secured_hub.url, token="hf_reader", cache_dir=tmp_path)
    assert Path(path).read_bytes() == b"hidden"


def test_deleting_a_repo_needs_admin_and_deleting_files_or_branches_needs_write(secured_hub):
    writer, reader, admin = (client(secured_hub, token) for token in ("hf_writer", "hf_reader", "hf_admin"))
    writer.create_repo("org/doomed")
    writer.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id="org/doomed")
    writer.create_branch("org/doomed", branch="dev")

    assert status_of(reader.delete_file, "a.txt", repo_id="org/doomed") == 403
    assert status_of(reader.delete_branch, "org/doomed", branch="dev") == 403
    writer.delete_file("a.txt", repo_id="org/doomed")
    writer.delete_branch("org/doomed", branch="dev")
    assert writer.list_repo_files("org/doomed") == [".gitattributes"]

    assert status_of(writer.delete_repo, "org/doomed") == 403
    assert status_of(client(secured_hub, False).delete_repo, "org/doomed") == 401
    admin.delete_repo("org/doomed")
    with pytest.raises(RepositoryNotFoundError):
        admin.model_info("org/doomed")


def test_commits_are_authored_by_the_token_name_and_bare_repo_names_go_to_its_namespace(secured_hub):
    writer = client(secured_hub, "hf_writer")
    assert writer.create_repo("mine").repo_id == "writer/mine"
    writer.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id="writer/mine")
    assert [commit.authors for commit in writer.list_repo_commits("writer/mine")] == [["writer"], ["writer"]]


def test_lfs_uploads_need_the_signed_url_or_a_write_token(secured_hub):
    client(secured_hub, "hf_writer").create_repo("org/weights")
    payload = os.urandom(1000)
    oid = hashlib.sha256(payload).hexdigest()
    batch = json.dumps({"operation": "upload", "transfers": ["basic"], "hash_algo": "sha256",
                        "objects": [{"oid": oid, "size": len(payload)}]}).encode()
    assert raw_request(secured_hub, "POST", "/org/weights.git/info/lfs/objects/batch", batch, token=None)[0] == 401
    status, _, body = raw_request(secured_hub, "POST", "/org/weights.git/info/lfs/objects/batch", batch,
                                  token="hf_writer")
    assert status == 200
    href = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
    signed = href[href.index("/api/"):]
    unsigned = signed.split("?")[0]

    assert raw_request(secured_hub, "PUT", unsigned, payload, token=None)[0] == 401
    assert raw_request(secured_hub, "PUT", unsigned, payload, token="hf_reader")[0] == 403
    assert raw_request(secured_hub, "PUT", signed[:-4] + "0000", payload, token=None)[0] == 401
    other = hashlib.sha256(b"other").hexdigest()
    assert raw_request(secured_hub, "PUT", signed.replace(oid, other), b"other", token=None)[0] == 401
    assert raw_request(secured_hub, "PUT", signed, payload + b"more", token=None)[0] == 413
    assert secured_hub.storage.blob_size(oid) is None
    assert raw_request(secured_hub, "PUT", signed, payload, token=None)[0] == 200
    assert secured_hub.storage.blob_size(oid) == len(payload)


def test_without_a_token_file_every_write_is_refused(tmp_path):
    with serve_hub(tmp_path / "read-only") as server:
        server.storage.create_repo("model", "org/seeded")
        api = client(server, TEST_TOKEN)  # the server knows no token, so it is ignored: the client is anonymous
        assert api.model_info("org/seeded").id == "org/seeded"
        with pytest.raises(HfHubHTTPError, match="--token-file") as err:
            api.create_repo("org/new")
        assert err.value.response.status_code == 403
        assert status_of(api.upload_file, path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="org/seeded") == 403
        assert raw_request(server, "GET", "/api/whoami-v2")[0] == 401


def test_anonymous_writes_are_for_loopback_servers_only(tmp_path, caplog):
    with serve_hub(tmp_path / "open-hub", allow_anonymous_writes=True) as server:
        api = client(server, False)
        api.create_repo("org/anon")
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="org/anon")
        assert api.list_repo_files("org/anon") == [".gitattributes", "x.txt"]
        assert status_of(api.delete_repo, "org/anon") == 403  # deleting repos still needs an admin token

    with pytest.raises(ValueError, match="loopback"):
        HubServer(tmp_path / "exposed", "0.0.0.0", allow_anonymous_writes=True)
    with caplog.at_level(logging.WARNING, logger="prg_hub.hub_server"):
        HubServer(tmp_path / "exposed", "0.0.0.0").shutdown()
    assert "no token file" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prg_hub.hub_server"):
        HubServer(tmp_path / "quiet", "127.0.0.1").shutdown()
    assert caplog.text == ""


@pytest.mark.parametrize("lines, error", [
    (["hf_a alice write", "hf_b bob"], "line 2: expected 'TOKEN NAME ROLE'"),
    (["# TOKEN NAME ROLE", "", "hf_a alice superuser"], "line 3: unknown role 'superuser'"),
    (["hf_a alice write", "  hf_a bob read"], "line 2: this token is already given"),
    (["hf_a api write"], "line 1: the name 'api' cannot be a namespace"),
])
def test_a_bad_token_file_is_a_startup_error_naming_the_line(tmp_path, capsys, lines, error):
    from prg_hub.cli import main

    path = tmp_path / "tokens.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TokenFileError, match=re.escape(error)):
        HubServer(tmp_path / "hub", token_file=path)
    assert main(["serve-hub", "--root", str(tmp_path / "hub"), "--port", "0", "--token-file", str(path)]) == 1
    err = capsys.readouterr().err
    assert error in err and "hf_a" not in err  # the message never shows a token


# -- limits ---------------------------------------------------------------------------------------------

def test_a_regular_file_over_10_mb_is_refused_with_413(api, hub_server):
    api.create_repo("org/regular-cap")
    head = api.model_info("org/regular-cap").sha
    url = "/api/models/org/regular-cap/commit/main"
    status, _, body = raw_request(hub_server, "POST", url, ndjson_commit(file_op("big.txt", b"a" * (REGULAR_MAX_SIZE + 1))))
    assert status == 413 and b"LFS" in body
    assert api.model_info("org/regular-cap").sha == head
    assert raw_request(hub_server, "POST", url, ndjson_commit(file_op("big.txt", b"a" * REGULAR_MAX_SIZE)))[0] == 200


def test_request_bodies_over_the_limits_are_refused_with_413(tmp_path, token_file):
    with serve_hub(tmp_path / "small-hub", token_file=token_file, max_request_bytes=1 << 20,
                   max_upload_bytes=2 << 20) as server:
        writer = client(server, "hf_writer")
        writer.create_repo("org/limits")
        url = "/api/models/org/limits/commit/main"
        over = ndjson_commit(file_op("a.txt", b"a" * 900_000))  # 1.2 MB once in base64
        assert raw_request(server, "POST", url, over, token="hf_writer")[0] == 413
        chunks = iter([over[i:i + 65536] for i in range(0, len(over), 65536)])  # sent with Transfer-Encoding: chunked
        assert raw_request(server, "POST", url, chunks, token="hf_writer")[0] == 413
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:  # announces a terabyte
            sock.sendall(f"POST {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer hf_writer\r\n"
                         f"Content-Length: {10 ** 12}\r\n\r\n".encode() + b"x" * 1000)
            assert sock.makefile("rb").readline().split()[1] == b"413"

        assert status_of(writer.upload_file, path_or_fileobj=os.urandom(3 << 20), path_in_repo="big.safetensors",
                         repo_id="org/limits") == 413
        writer.upload_file(path_or_fileobj=os.urandom(1 << 20), path_in_repo="ok.safetensors", repo_id="org/limits")
        writer.upload_file(path_or_fileobj=b"a" * 500_000, path_in_repo="ok.txt", repo_id="org/limits")
        assert writer.list_repo_files("org/limits") == [".gitattributes", "ok.safetensors", "ok.txt"]


def test_slow_clients_do_not_get_a_thread_each(tmp_path):
    with serve_hub(tmp_path / "thread-hub", max_threads=4) as server:
        before = threading.active_count()
        slow = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(20)]
        for sock in slow:
            sock.sendall(b"GET /api/models/org/x HTTP/1.1\r\n")  # and never ends its headers
        time.sleep(1.0)
        assert threading.active_count() - before <= 4
        for sock in slow:
            sock.close()
        assert raw_request(server, "GET", "/api/whoami-v2")[0] == 401  # served once the slow clients are gone


# -- malformed commits, paths and names -----------------------------------------------------------------

HEADER = {"key": "header", "value": {"summary": "s", "description": ""}}


def lines(*entries) -> bytes:
    return b"".join(json.dumps(entry).encode() + b"\n" for entry in entries)


def file_line(**value) -> dict:
    return {"key": "file", "value": {"path": "a.txt", "content": "eA==", "encoding": "base64", **value}}


MALFORMED_COMMITS = {
    "empty body": b"",
    "not JSON": b'{"key": "header", "value": {"summary": "s"\n',
    "not UTF-8": b'{"key": "header", "value": {"summary": "\xff"}}\n',
    "header value is a list": lines({"key": "header", "value": ["s"]}),
    "header value is a string": lines({"key": "header", "value": "s"}),
    "header value is null": lines({"key": "header", "value": None}),
    "header without summary": lines({"key": "header", "value": {"description": ""}}),
    "summary is a number": lines({"key": "header", "value": {"summary": 3}}),
    "parentCommit is a list": lines({"key": "header", "value": {"summary": "s", "parentCommit": ["f" * 40]}}),
    "header not first": lines(file_line(), HEADER),
    "two headers": lines(HEADER, HEADER),
    "line is a list": lines(HEADER, ["file", {"path": "a.txt"}]),
    "line without value": lines(HEADER, {"key": "file"}),
    "line without key": lines(HEADER, {"value": {"path": "a.txt"}}),
    "line with an extra key": lines(HEADER, {**file_line(), "extra": 1}),
    "unknown operation": lines(HEADER, {"key": "copyFile", "value": {"path": "a.txt"}}),
    "operation key is a list": lines(HEADER, {"key": ["file"], "value": {"path": "a.txt"}}),
    "unknown field": lines(HEADER, file_line(mode="755")),
    "path is a list": lines(HEADER, file_line(path=["a.txt"])),
    "path is a number": lines(HEADER, file_line(path=3)),
    "path is null": lines(HEADER, file_line(path=None)),
    "file without path": lines(HEADER, {"key": "file", "value": {"content": "eA=="}}),
    "file without content": lines(HEADER, {"key": "file", "value": {"path": "a.txt"}}),
    "content is a number": lines(HEADER, file_line(content=5)),
    "invalid base64": lines(HEADER, file_line(content="not base64!")),
    "encoding is not base64": lines(HEADER, file_line(encoding="utf-8")),
    "deleted path is a list": lines(HEADER, {"key": "deletedFile", "value": {"path": ["a.txt"]}}),
    "deleted folder path is null": lines(HEADER, {"key": "deletedFolder", "value": {"path": None}}),
    "LFS oid is not a sha256": lines(HEADER, {"key": "lfsFile", "value": {"path": "w.bin", "oid": "abc", "size": 1}}),
    "LFS size is a string": lines(HEADER, {"key": "lfsFile", "value": {"path": "w.bin", "oid": "0" * 64,
                                                                       "size": "1"}}),
}


@pytest.mark.parametrize("case", MALFORMED_COMMITS)
def test_malformed_commits_are_400(api, hub_server, case):
    api.create_repo("org/malformed", exist_ok=True)
    head = api.model_info("org/malformed").sha
    status, headers, body = raw_request(hub_server, "POST", "/api/models/org/malformed/commit/main",
                                        MALFORMED_COMMITS[case], {"Content-Type": "application/x-ndjson"})
    assert status == 400, body
    assert json.loads(body)["error"] and headers["X-Error-Message"]
    assert api.model_info("org/malformed").sha == head


def test_malformed_json_calls_are_400(api, hub_server):
    api.create_repo("org/bad-calls")
    for path, body in (("/api/repos/create", b"[]"), ("/api/repos/create", b'{"name": ["x"]}'),
                       ("/api/repos/create", b'{"name": "x", "private": "yes"}'),
                       ("/api/models/org/bad-calls/preupload/main", b'{"files": [{"path": ["a"], "size": 1}]}'),
                       ("/api/models/org/bad-calls/preupload/main", b'{"files": "a"}'),
                       ("/api/models/org/bad-calls/paths-info/main", b'{"paths": [1]}'),
                       ("/org/bad-calls.git/info/lfs/objects/batch", b'{"operation": "upload", "objects": [1]}'),
                       ("/api/models/org/bad-calls/lfs-verify", b'{"oid": null, "size": 1}')):
        status, _, answer = raw_request(hub_server, "POST", path, body, {"Content-Type": "application/json"})
        assert status == 400, (path, body, answer)


def test_a_path_cannot_be_both_a_file_and_a_folder(api, hub_server):
    api.create_repo("org/conflicts")
    api.upload_file(path_or_fileobj=b"file", path_in_repo="cfg", repo_id="org/conflicts")
    api.upload_file(path_or_fileobj=b"inside", path_in_repo="dir/a.txt", repo_id="org/conflicts")
    head = api.model_info("org/conflicts").sha
    url = "/api/models/org/conflicts/commit/main"
    for body in (ndjson_commit(file_op("new", b"1"), file_op("new/inner.txt", b"2")),  # within the commit
                 ndjson_commit(file_op("new/inner.txt", b"2"), file_op("new", b"1")),
                 ndjson_commit(file_op("cfg/inner.txt", b"2")),  # against the branch
                 ndjson_commit(file_op("dir", b"2")),
                 ndjson_commit(file_op("dir/a.txt/deeper.txt", b"2"))):
        assert raw_request(hub_server, "POST", url, body)[0] == 400, body
    assert status_of(api.upload_file, path_or_fileobj=b"2", path_in_repo="cfg/inner.txt",
                     repo_id="org/conflicts") == 400
    assert api.model_info("org/conflicts").sha == head

    replace = ndjson_commit({"key": "deletedFile", "value": {"path": "cfg"}}, file_op("cfg/inner.txt", b"2"),
                            {"key": "deletedFolder", "value": {"path": "dir/"}}, file_op("dir", b"3"))
    assert raw_request(hub_server, "POST", url, replace)[0] == 200
    assert api.list_repo_files("org/conflicts") == [".gitattributes", "cfg/inner.txt", "dir"]


@pytest.mark.parametrize("repo_id", ["datasets/x", "spaces/x", "models/x", "api/foo", "org/api", "org/datasets",
                                     "Datasets/x"])
def test_reserved_names_are_refused(api, hub_server, repo_id):
    assert status_of(api.create_repo, repo_id) == 400
    assert raw_request(hub_server, "GET", f"/api/models/{repo_id}")[0] == 400
    assert not (hub_server.root / "repos" / "models" / repo_id.replace("/", "--")).exists()


# -- temporary files, locks and several processes -------------------------------------------------------

def test_abandoned_temp_files_are_removed_at_start(tmp_path):
    root = tmp_path / "hub"
    HubServer(root).shutdown()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    host, tmp = socket.gethostname(), root / "tmp"
    entries = {
        f"{host}-{finished.pid}-a1": False,  # its process is gone
        f"{host}-{os.getpid()}-b2": True,  # its process runs: another server on the same root
        "other-host-1-c3": True,  # recent, from a process this host cannot check
        "other-host-1-d4": False,  # not modified for two days
        "unnamed": True,
    }
    for name in entries:
        (tmp / name).write_bytes(b"partial upload")
    (tmp / f"{host}-{finished.pid}-e5" / "commits").mkdir(parents=True)  # a half-created repo
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(tmp / "other-host-1-d4", (two_days_ago, two_days_ago))

    HubServer(root).shutdown()
    assert sorted(p.name for p in tmp.iterdir()) == sorted(name for name, kept in entries.items() if kept)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_cli_server(root: Path, token_file: Path) -> tuple[subprocess.Popen, str]:
    """``prg-hub serve-hub`` in a process of its own; returns the process and its URL, once it listens."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "prg_hub.cli", "serve-hub", "--root", str(root), "--port",
                                str(port), "--token-file", str(token_file)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"http://127.0.0.1:{port}"
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "serve-hub did not start listening within 60 s"
        time.sleep(0.1)


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()
    process.stderr.close()


def test_two_servers_on_one_root_lose_no_commit(tmp_path, token_file):
    processes, urls = zip(*[start_cli_server(tmp_path / "shared-root", token_file) for _ in range(2)])
    try:
        apis = [HfApi(endpoint=url, token="hf_writer") for url in urls]
        apis[0].create_repo("org/shared")

        def upload(i: int):
            return apis[i % 2].upload_file(path_or_fileobj=f"file {i}".encode(), path_in_repo=f"files/{i}.txt",
                                           repo_id="org/shared").oid

        with ThreadPoolExecutor(max_workers=16) as pool:
            acknowledged = set(pool.map(upload, range(50)))
        history = [commit.commit_id for commit in apis[1].list_repo_commits("org/shared")]
        assert len(acknowledged) == 50 and acknowledged <= set(history) and len(history) == 51
        expected = [".gitattributes"] + sorted(f"files/{i}.txt" for i in range(50))
        assert sorted(apis[0].list_repo_files("org/shared")) == sorted(expected)
    finally:
        for process in processes:
            stop(process)


def test_a_writer_waits_for_the_repo_lock_a_bounded_time_and_a_killed_holder_releases_it(secured_hub):
    writer = client(secured_hub, "hf_writer")
    writer.create_repo("org/locked")
    lock_file = secured_hub.root / "locks" / "models" / "org--locked.lock"
    hold = ("import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        secured_hub.storage.lock_timeout_s = 0.5
        status, headers, body = raw_request(secured_hub, "POST", "/api/models/org/locked/commit/main",
                                            ndjson_commit(file_op("a.txt", b"1")), token="hf_writer")
        assert status == 503 and b"busy" in body and headers["Retry-After"]
    finally:
        holder.kill()  # kill -9: the kernel drops its lock
        holder.wait()
        holder.stdout.close()
    writer.upload_file(path_or_fileobj=b"2", path_in_repo="a.txt", repo_id="org/locked")
    assert writer.list_repo_files("org/locked") == [".gitattributes", "a.txt"]


def test_acknowledged_commits_survive_kill_9(tmp_path, token_file):
    root = tmp_path / "crash-root"
    process, url = start_cli_server(root, token_file)
    api = HfApi(endpoint=url, token="hf_writer")
    api.create_repo("org/crash")
    acknowledged, stop_storm = [], threading.Event()

    def storm(worker: int) -> None:
        for i in range(1000):
            if stop_storm.is_set():
                return
            try:
                commit = api.upload_file(path_or_fileobj=f"{worker} {i}".encode() * 1000,
                                         path_in_repo=f"w{worker}/{i}.txt", repo_id="org/crash")
            except Exception:  # the server died under this upload
                return
            acknowledged.append(commit.oid)

    threads = [threading.Thread(target=storm, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    while len(acknowledged) < 10:
        time.sleep(0.05)
    stop(process)
    stop_storm.set()
    for thread in threads:
        thread.join()

    process, url = start_cli_server(root, token_file)
    try:
        api = HfApi(endpoint=url, token="hf_writer")
        history = {commit.commit_id for commit in api.list_repo_commits("org/crash")}
        assert set(acknowledged) <= history
        assert api.upload_file(path_or_fileobj=b"after", path_in_repo="after.txt", repo_id="org/crash").oid
        assert not any(f"-{process.pid}-" not in p.name for p in (root / "tmp").iterdir())
    finally:
        stop(process)
