"""The local hub server, driven by the real huggingface_hub and datasets clients (see conftest.py)."""

import base64
import hashlib
import http.client
import json
import os
import socket
import threading
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


def raw_request(hub_server, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """Send a request exactly as written (no URL normalisation) and return ``(status, headers, body)``."""
    conn = http.client.HTTPConnection("127.0.0.1", hub_server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
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
