"""Reliability of the local Hub server (`prg_hub.hub_server`): access, hostile input, concurrency and crashes.

    from reliability_server import server_checks
    server_checks(quick=True)  # {"server auth": {...}, "traversal": {...}, ...}

Each category is {"tried", "correct", "wrong", "wrong_cases": [short descriptions]}. Every check starts its own
servers on free ports, storing under a temporary root. The real `huggingface_hub` client runs in subprocesses,
with the environment the tests use (`HF_HUB_DISABLE_XET=1`, a temporary `HF_HOME`, no token from the user);
the other requests are raw HTTP, sent exactly as written.

* "server auth": a token file with read, write and admin tokens; whoami, unknown tokens, anonymous and
  token-holding reads and writes of public and private repos, deleting files, branches and repos, unsigned LFS
  uploads, a server without a token file, anonymous writes on a non-loopback host. Correct: the status (and
  error code) the access rules in `prg_hub.hub_server.auth` give.
* "traversal": commits of unsafe paths (`..`, absolute, backslash, NUL, `.`) and downloads, tree listings and repo
  ids with them, plain and percent-encoded. Correct: 400, the branch head unchanged, nothing written outside the
  root.
* "malformed commits": NDJSON that is not JSON, headers and operations of the wrong shape or type, unknown
  operations and fields, bad base64, bad LFS references, a path that is both a file and a folder. Correct: 400
  with a JSON error, the branch head unchanged.
* "concurrent commits (one server)", "concurrent commits (two servers)": N uploads by `HfApi.upload_file` from
  8 threads per client process, through one server, or split between two server processes on one root.
  A case is one upload; correct when it is acknowledged and its commit is in the branch history. One more case:
  the history holds nothing else (N commits on top of the first).
* "concurrent downloads (sha256)": `hf_hub_download` of one 3 MB LFS file by parallel threads, each into its own
  cache, plus ranged raw downloads. Correct: the sha256 of what arrived is the file's.
* "kill -9 during commit storm": a server process is killed with SIGKILL while 4 client threads commit; a new
  server then serves the same root. A case is one acknowledged commit: correct when it is still in the history.
  One more case per round: the repo takes a new commit after the restart and no temporary file of the killed
  server is left.

`quick=True` (under a minute on 2 cores) uses fewer uploads, downloads and kill rounds than the full run.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import importlib.util
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prg_hub.hub_server import HubServer, Operation, TokenFileError

TOKENS = {"hf_reader": ("reader", "read"), "hf_writer": ("writer", "write"), "hf_admin": ("boss", "admin")}
SIZES = {True: {"uploads": 30, "two_server_uploads": 30, "downloads": 8, "kill_rounds": 1},
         False: {"uploads": 300, "two_server_uploads": 200, "downloads": 32, "kill_rounds": 10}}

# Started with `python -c`: the server needs only the hub modules, so they are loaded without the package's
# __init__ (which imports torch and transformers) and a server process starts in a fraction of a second.
_SERVER_SCRIPT = """
import sys, types
package = types.ModuleType("prg_hub")
package.__path__ = [sys.argv[1]]
sys.modules["prg_hub"] = package
from prg_hub.hub_server import HubServer
server = HubServer(sys.argv[2], "127.0.0.1", 0, token_file=sys.argv[3])
print(server.port, flush=True)
server.serve_forever()
"""

# The client side, in its own process: `upload`, `download` and `storm` jobs; one JSON object on stdout, or one
# line per acknowledged commit for `storm` (the server may be killed under it).
_CLIENT_SCRIPT = """
import hashlib, json, sys, threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from huggingface_hub import HfApi, hf_hub_download

job = json.loads(sys.argv[1])
if job["kind"] == "upload":
    api = HfApi(endpoint=job["endpoint"], token=job["token"])
    def upload(i):
        try:
            return api.upload_file(path_or_fileobj=f"{job['prefix']} {i}".encode(),
                                   path_in_repo=f"{job['prefix']}/{i}.txt", repo_id=job["repo"]).oid
        except Exception as err:
            return "error: " + str(err).splitlines()[0][:200]
    with ThreadPoolExecutor(8) as pool:
        print(json.dumps(list(pool.map(upload, range(job["count"])))))
elif job["kind"] == "download":
    def download(i):
        try:
            path = hf_hub_download(job["repo"], job["file"], endpoint=job["endpoint"], token=False,
                                   cache_dir=f"{job['cache']}/{i}")
            return hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except Exception as err:
            return "error: " + str(err).splitlines()[0][:200]
    barrier = threading.Barrier(job["count"])
    def start(i):
        barrier.wait()
        return download(i)
    with ThreadPoolExecutor(job["count"]) as pool:
        print(json.dumps(list(pool.map(start, range(job["count"])))))
else:
    api, lock = HfApi(endpoint=job["endpoint"], token=job["token"]), threading.Lock()
    def storm(worker):
        for i in range(100000):
            try:
                oid = api.upload_file(path_or_fileobj=f"{worker} {i}".encode() * 500,
                                      path_in_repo=f"w{worker}/{i}.txt", repo_id=job["repo"]).oid
            except Exception:
                return
            with lock:
                print(oid, flush=True)
    threads = [threading.Thread(target=storm, args=(w,)) for w in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
"""


class Tally:
    """One category's counts."""

    def __init__(self):
        self.tried, self.correct, self.wrong_cases = 0, 0, []

    def check(self, ok: bool, case: str) -> None:
        self.tried += 1
        if ok:
            self.correct += 1
        else:
            self.wrong_cases.append(case)

    def result(self) -> dict:
        return {"tried": self.tried, "correct": self.correct, "wrong": len(self.wrong_cases),
                "wrong_cases": self.wrong_cases}


def _write_tokens(folder: Path) -> Path:
    path = folder / "tokens.txt"
    path.write_text("".join(f"{token} {name} {role}\n" for token, (name, role) in TOKENS.items()))
    return path


def _request(port: int, method: str, path: str, body=b"", token: str | None = "hf_admin",
             headers: dict | None = None) -> tuple[int, dict, bytes]:
    """A raw HTTP request, sent as written; ``(status, headers, body)``."""
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        conn.close()


def _ndjson(*entries) -> bytes:
    return b"".join(json.dumps(entry).encode() + b"\n" for entry in entries)


def _file(path, content: bytes = b"x") -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(content).decode(),
                                     "encoding": "base64"}}


HEADER = {"key": "header", "value": {"summary": "s", "description": ""}}


def _client_env(home: Path) -> dict:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HF_", "HUGGINGFACE_")) and key not in ("TRANSFORMERS_OFFLINE",)}
    env.update({"HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "HF_HOME": str(home)})
    return env


def _run_client(job: dict, home: Path, timeout: float = 300) -> list:
    done = subprocess.run([sys.executable, "-c", _CLIENT_SCRIPT, json.dumps(job)], env=_client_env(home),
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"client job {job['kind']} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def _start_server(root: Path, token_file: Path) -> tuple[subprocess.Popen, int]:
    """A hub server process on ``root``; returns it and its port once it listens.

    The server binds a port the system picks and prints it: a port chosen here and bound there could be taken by
    another program in between, and a probe would then find that program listening instead.
    """
    package_dir = importlib.util.find_spec("prg_hub").submodule_search_locations[0]
    process = subprocess.Popen([sys.executable, "-c", _SERVER_SCRIPT, package_dir, str(root), str(token_file)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ready, _, _ = select.select([process.stdout], [], [], 60)
    line = process.stdout.readline() if ready else ""
    if not line.strip().isdigit():
        process.kill()
        raise RuntimeError(f"the hub server on {root} did not start")
    return process, int(line)


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def _history(port: int, repo: str) -> list[str]:
    status, _, body = _request(port, "GET", f"/api/models/{repo}/commits/main")
    if status != 200:
        raise RuntimeError(f"listing the commits of {repo} answered {status}")
    return [commit["id"] for commit in json.loads(body)]


def _head(port: int, repo: str) -> str:
    return json.loads(_request(port, "GET", f"/api/models/{repo}")[2])["sha"]


# -- categories ---------------------------------------------------------------------------------------------

def _auth(tally: Tally, work: Path) -> None:
    token_file = _write_tokens(work)
    with HubServer(work / "auth-hub", token_file=token_file).start() as server:
        port = server.port
        for repo, private in (("org/public", False), ("org/secret", True), ("org/doomed", False)):
            server.storage.create_repo("model", repo, private)
        server.storage.create_branch("model", "org/public", "dev")
        commit = _ndjson(HEADER, _file("a.txt"))
        delete = _ndjson(HEADER, {"key": "deletedFile", "value": {"path": ".gitattributes"}})
        refused = b"an LFS upload that must be refused"
        lfs_put = f"/api/models/org/public/lfs-objects/{hashlib.sha256(refused).hexdigest()}"
        cases = [  # name, method, path, body, token, expected status, expected X-Error-Code
            ("anonymous whoami", "GET", "/api/whoami-v2", b"", None, 401, None),
            ("unknown token whoami", "GET", "/api/whoami-v2", b"", "hf_unknown", 401, None),
            ("unknown token reads a public repo", "GET", "/api/models/org/public", b"", "hf_unknown", 401, None),
            ("unknown token downloads", "GET", "/org/public/resolve/main/.gitattributes", b"", "hf_unknown", 401,
             None),
            ("anonymous reads a public repo", "GET", "/api/models/org/public", b"", None, 200, None),
            ("anonymous downloads from a public repo", "GET", "/org/public/resolve/main/.gitattributes", b"", None,
             200, None),
            ("anonymous reads a private repo", "GET", "/api/models/org/secret", b"", None, 404, "RepoNotFound"),
            ("anonymous downloads from a private repo", "GET", "/org/secret/resolve/main/.gitattributes", b"",
             None, 404, "RepoNotFound"),
            ("anonymous lists a private repo", "GET", "/api/models/org/secret/tree/main", b"", None, 404,
             "RepoNotFound"),
            ("anonymous commits to a private repo", "POST", "/api/models/org/secret/commit/main", commit, None, 404,
             "RepoNotFound"),
            ("reader reads a private repo", "GET", "/api/models/org/secret", b"", "hf_reader", 200, None),
            ("anonymous creates a repo", "POST", "/api/repos/create", b'{"name": "x", "organization": "org"}',
             None, 401, None),
            ("reader creates a repo", "POST", "/api/repos/create", b'{"name": "x", "organization": "org"}',
             "hf_reader", 403, None),
            ("anonymous commits", "POST", "/api/models/org/public/commit/main", commit, None, 401, None),
            ("reader commits", "POST", "/api/models/org/public/commit/main", commit, "hf_reader", 403, None),
            ("reader deletes a file", "POST", "/api/models/org/public/commit/main", delete, "hf_reader", 403, None),
            ("reader deletes a branch", "DELETE", "/api/models/org/public/branch/dev", b"", "hf_reader", 403, None),
            ("reader asks for LFS upload URLs", "POST", "/org/public.git/info/lfs/objects/batch",
             b'{"operation": "upload", "objects": []}', "hf_reader", 403, None),
            ("anonymous LFS upload without a signed URL", "PUT", lfs_put, refused, None, 401, None),
            ("LFS upload with a forged signature", "PUT", lfs_put + "?size=1&expires=9999999999&signature=00",
             refused, None, 401, None),
            ("writer commits", "POST", "/api/models/org/public/commit/main", commit, "hf_writer", 200, None),
            ("writer deletes a branch", "DELETE", "/api/models/org/public/branch/dev", b"", "hf_writer", 200, None),
            ("writer deletes a repo", "DELETE", "/api/repos/delete", b'{"name": "doomed", "organization": "org"}',
             "hf_writer", 403, None),
            ("anonymous deletes a repo", "DELETE", "/api/repos/delete", b'{"name": "doomed", "organization": "org"}',
             None, 401, None),
            ("admin deletes a repo", "DELETE", "/api/repos/delete", b'{"name": "doomed", "organization": "org"}',
             "hf_admin", 200, None),
        ]
        for name, method, path, body, token, status, code in cases:
            got, headers, _ = _request(port, method, path, body, token)
            tally.check(got == status and (code is None or headers.get("X-Error-Code") == code),
                        f"{name}: {got}, expected {status}")
        for token, (name, role) in TOKENS.items():
            got, _, body = _request(port, "GET", "/api/whoami-v2", token=token)
            me = json.loads(body) if got == 200 else {}
            tally.check((me.get("name"), me.get("auth", {}).get("accessToken", {}).get("role")) == (name, role),
                        f"whoami of a {role} token: {got} {me.get('name')}")
        tally.check(server.storage.blob_size(hashlib.sha256(refused).hexdigest()) is None,
                    "a refused LFS upload was stored")

    with HubServer(work / "read-only-hub").start() as server:
        server.storage.create_repo("model", "org/seeded")
        got, _, body = _request(server.port, "POST", "/api/repos/create", b'{"name": "x"}', "hf_admin")
        tally.check(got == 403 and b"--token-file" in body, f"write without a token file: {got}")
        got = _request(server.port, "GET", "/api/models/org/seeded", token="hf_admin")[0]
        tally.check(got == 200, f"read without a token file, a token sent: {got}")
    try:
        HubServer(work / "exposed-hub", "0.0.0.0", allow_anonymous_writes=True).shutdown()
        tally.check(False, "anonymous writes on 0.0.0.0 were accepted")
    except ValueError:
        tally.check(True, "")
    bad_tokens = work / "bad-tokens.txt"
    bad_tokens.write_text("# comment\nhf_x someone superuser\n")
    try:
        HubServer(work / "bad-token-hub", token_file=bad_tokens).shutdown()
        tally.check(False, "a token file with an unknown role was accepted")
    except TokenFileError as err:
        tally.check("line 2" in str(err) and "hf_x" not in str(err), f"token file error: {err}")


def _traversal(tally: Tally, work: Path) -> None:
    root = work / "traversal-hub"
    with HubServer(root, token_file=_write_tokens(work)).start() as server:
        port = server.port
        server.storage.create_repo("model", "org/safe")
        server.storage.commit("model", "org/safe", "main", [Operation("file", "a/file.txt", content=b"ok")], "ok")
        head, outside = _head(port, "org/safe"), set(work.iterdir())
        for bad in ("../escape.txt", "a/../../escape.txt", "/etc/escape.txt", "..\\escape.txt", "a/\x00.txt",
                    "./x", "a//b.txt", "a/./b.txt"):
            got = _request(port, "POST", "/api/models/org/safe/commit/main", _ndjson(HEADER, _file(bad)))[0]
            tally.check(got == 400, f"commit of {bad!r}: {got}")
        for bad in ("../../../etc/passwd", "%2E%2E/%2E%2E/etc/passwd", "%2Fetc%2Fpasswd", "a%5C..%5Cb", "a/%00",
                    "a/./file.txt", "a/%2E%2E/%2E%2E/%2E%2E/etc/passwd"):
            for method in ("GET", "HEAD"):
                got = _request(port, method, f"/org/safe/resolve/main/{bad}")[0]
                tally.check(got == 400, f"{method} resolve {bad!r}: {got}")
        for path in ("/api/models/org/safe/tree/main/..%2F..", "/api/models/..%2F..%2Fetc/revision/main",
                     "/api/models/org/safe/tree/main/%2Fetc", "/..%2F..%2Fetc/resolve/main/passwd"):
            got = _request(port, "GET", path)[0]
            tally.check(got == 400, f"GET {path}: {got}")
        tally.check(_head(port, "org/safe") == head, "a refused commit moved the branch")
        tally.check(set(work.iterdir()) == outside and not any(p.name == "escape.txt" for p in work.rglob("*")),
                    "a file was written outside the root")


_MALFORMED = {
    "not JSON": b'{"key": "header", "value": {"summary": "s"\n',
    "not UTF-8": b'{"key": "header", "value": {"summary": "\xff"}}\n',
    "empty body": b"",
    "header value is a list": _ndjson({"key": "header", "value": ["s"]}),
    "header value is a string": _ndjson({"key": "header", "value": "s"}),
    "header value is null": _ndjson({"key": "header", "value": None}),
    "header without summary": _ndjson({"key": "header", "value": {"description": ""}}),
    "summary is a number": _ndjson({"key": "header", "value": {"summary": 3}}),
    "parentCommit is a list": _ndjson({"key": "header", "value": {"summary": "s", "parentCommit": ["f" * 40]}}),
    "header not first": _ndjson(_file("a.txt"), HEADER),
    "two headers": _ndjson(HEADER, HEADER),
    "line is a list": _ndjson(HEADER, ["file", {"path": "a.txt"}]),
    "line is a number": _ndjson(HEADER, 7),
    "line without value": _ndjson(HEADER, {"key": "file"}),
    "line without key": _ndjson(HEADER, {"value": {"path": "a.txt"}}),
    "line with an extra key": _ndjson(HEADER, {**_file("a.txt"), "extra": 1}),
    "unknown operation": _ndjson(HEADER, {"key": "copyFile", "value": {"path": "a.txt"}}),
    "operation key is a list": _ndjson(HEADER, {"key": ["file"], "value": {"path": "a.txt"}}),
    "unknown field": _ndjson(HEADER, {"key": "file", "value": {**_file("a.txt")["value"], "mode": "755"}}),
    "path is a list": _ndjson(HEADER, {"key": "file", "value": {"path": ["a.txt"], "content": "eA=="}}),
    "path is a number": _ndjson(HEADER, {"key": "file", "value": {"path": 3, "content": "eA=="}}),
    "path is null": _ndjson(HEADER, {"key": "file", "value": {"path": None, "content": "eA=="}}),
    "path is an object": _ndjson(HEADER, {"key": "deletedFile", "value": {"path": {"a": 1}}}),
    "file without content": _ndjson(HEADER, {"key": "file", "value": {"path": "a.txt"}}),
    "content is a number": _ndjson(HEADER, {"key": "file", "value": {"path": "a.txt", "content": 5}}),
    "invalid base64": _ndjson(HEADER, {"key": "file", "value": {"path": "a.txt", "content": "not base64!"}}),
    "encoding is not base64": _ndjson(HEADER, {"key": "file", "value": {"path": "a.txt", "content": "eA==",
                                                                        "encoding": "utf-8"}}),
    "deleted folder path is null": _ndjson(HEADER, {"key": "deletedFolder", "value": {"path": None}}),
    "LFS oid is not a sha256": _ndjson(HEADER, {"key": "lfsFile", "value": {"path": "w.bin", "oid": "abc"}}),
    "LFS size is a string": _ndjson(HEADER, {"key": "lfsFile", "value": {"path": "w.bin", "oid": "0" * 64,
                                                                         "size": "1"}}),
    "LFS object never uploaded": _ndjson(HEADER, {"key": "lfsFile", "value": {"path": "w.bin", "oid": "0" * 64}}),
    "file and folder in one commit": _ndjson(HEADER, _file("cfg"), _file("cfg/inner.txt")),
    "folder where the branch has a file": _ndjson(HEADER, _file("existing.txt/inner.txt")),
    "file where the branch has a folder": _ndjson(HEADER, _file("folder")),
}


def _malformed(tally: Tally, work: Path) -> None:
    with HubServer(work / "malformed-hub", token_file=_write_tokens(work)).start() as server:
        port = server.port
        server.storage.create_repo("model", "org/m")
        server.storage.commit("model", "org/m", "main", [Operation("file", "existing.txt", content=b"1"),
                                                         Operation("file", "folder/a.txt", content=b"2")], "setup")
        head = _head(port, "org/m")
        for name, body in _MALFORMED.items():
            got, _, answer = _request(port, "POST", "/api/models/org/m/commit/main", body,
                                      headers={"Content-Type": "application/x-ndjson"})
            try:
                has_error = bool(json.loads(answer)["error"])
            except (ValueError, KeyError, TypeError):
                has_error = False
            tally.check(got == 400 and has_error, f"{name}: {got}")
        tally.check(_head(port, "org/m") == head, "a malformed commit moved the branch")


def _record_uploads(tally: Tally, results: list, history: list[str], label: str) -> None:
    acknowledged = [oid for oid in results if not oid.startswith("error")]
    for i, oid in enumerate(results):
        tally.check(oid in history, f"{label} upload {i}: {oid if oid.startswith('error') else 'commit lost'}")
    tally.check(len(history) == len(acknowledged) + 1,
                f"{label}: {len(history) - 1} commits in the history for {len(acknowledged)} acknowledged uploads")


def _one_server(tally: Tally, work: Path, count: int) -> None:
    with HubServer(work / "one-hub", token_file=_write_tokens(work)).start() as server:
        server.storage.create_repo("model", "org/busy")
        results = _run_client({"kind": "upload", "endpoint": server.url, "token": "hf_writer", "repo": "org/busy",
                               "prefix": "one", "count": count}, work / "hf-home-one")
        _record_uploads(tally, results, _history(server.port, "org/busy"), "one server")


def _two_servers(tally: Tally, work: Path, count: int) -> None:
    root, token_file = work / "shared-root", _write_tokens(work)
    servers = [_start_server(root, token_file) for _ in range(2)]
    try:
        got = _request(servers[0][1], "POST", "/api/repos/create", b'{"name": "shared", "organization": "org"}')[0]
        if got != 200:
            raise RuntimeError(f"creating the repo answered {got}")
        clients = [subprocess.Popen([sys.executable, "-c", _CLIENT_SCRIPT, json.dumps({
            "kind": "upload", "endpoint": f"http://127.0.0.1:{port}", "token": "hf_writer", "repo": "org/shared",
            "prefix": f"server{i}", "count": count // 2})], env=_client_env(work / f"hf-home-two-{i}"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i, (_, port) in enumerate(servers)]
        results = []
        for client in clients:
            out, err = client.communicate(timeout=300)
            if client.returncode != 0:
                raise RuntimeError(f"client failed: {err.strip().splitlines()[-1:]}")
            results += json.loads(out)
        _record_uploads(tally, results, _history(servers[1][1], "org/shared"), "two servers")
    finally:
        for process, _ in servers:
            _kill(process)


def _downloads(tally: Tally, work: Path, count: int) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    expected = hashlib.sha256(payload).hexdigest()
    with HubServer(work / "download-hub", token_file=_write_tokens(work)).start() as server:
        server.storage.create_repo("model", "org/big")
        sha256, size = server.storage.put_blob([payload])
        server.storage.commit("model", "org/big", "main", [Operation("lfsFile", "big.safetensors", oid=sha256,
                                                                     size=size)], "weights")
        results = _run_client({"kind": "download", "endpoint": server.url, "repo": "org/big",
                               "file": "big.safetensors", "count": count, "cache": str(work / "caches")},
                              work / "hf-home-downloads")
        for i, digest in enumerate(results):
            tally.check(digest == expected, f"download {i}: {digest[:80]}")
        for start, end in ((0, 99), (1024 * 1024, 2 * 1024 * 1024 - 1), (len(payload) - 17, len(payload) - 1)):
            got, _, body = _request(server.port, "GET", "/org/big/resolve/main/big.safetensors", token=None,
                                    headers={"Range": f"bytes={start}-{end}"})
            tally.check(got == 206 and body == payload[start:end + 1], f"range {start}-{end}: {got}")


def _kill_storm(tally: Tally, work: Path, rounds: int) -> None:
    root, token_file = work / "crash-root", _write_tokens(work)
    for round_ in range(1, rounds + 1):
        process, port = _start_server(root, token_file)
        if round_ == 1:
            _request(port, "POST", "/api/repos/create", b'{"name": "crash", "organization": "org"}')
        client = subprocess.Popen([sys.executable, "-c", _CLIENT_SCRIPT, json.dumps({
            "kind": "storm", "endpoint": f"http://127.0.0.1:{port}", "token": "hf_writer", "repo": "org/crash"})],
            env=_client_env(work / "hf-home-storm"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        acknowledged = []
        deadline = time.monotonic() + 60
        while len(acknowledged) < 8 + 4 * round_ and time.monotonic() < deadline and (line := client.stdout.readline()):
            acknowledged.append(line.strip())
        _kill(process)  # mid-storm: the client threads have requests in flight
        time.sleep(1.0)  # lets the client print the answers that arrived before the kill; then it would only retry
        _kill(client)
        acknowledged += [line.strip() for line in client.stdout if line.strip()]
        client.stdout.close()

        process, port = _start_server(root, token_file)
        try:
            history = set(_history(port, "org/crash"))
            for oid in acknowledged:
                tally.check(oid in history, f"round {round_}: acknowledged commit {oid[:12]} lost")
            got = _request(port, "POST", "/api/models/org/crash/commit/main",
                           _ndjson(HEADER, _file(f"after-{round_}.txt")), token="hf_writer")[0]
            leftovers = [p.name for p in (root / "tmp").iterdir() if f"-{process.pid}-" not in p.name]
            tally.check(got == 200 and not leftovers and acknowledged,
                        f"round {round_}: after the restart, commit {got}, {len(acknowledged)} acknowledged, "
                        f"temporary files left {leftovers[:3]}")
        finally:
            _kill(process)


def server_checks(quick: bool) -> dict[str, dict]:
    """Run every Hub-server check (categories in the module docstring) and return their tallies."""
    sizes = SIZES[quick]
    categories = {
        "server auth": lambda work: _auth(tallies["server auth"], work),
        "traversal": lambda work: _traversal(tallies["traversal"], work),
        "malformed commits": lambda work: _malformed(tallies["malformed commits"], work),
        "concurrent commits (one server)": lambda work: _one_server(
            tallies["concurrent commits (one server)"], work, sizes["uploads"]),
        "concurrent commits (two servers)": lambda work: _two_servers(
            tallies["concurrent commits (two servers)"], work, sizes["two_server_uploads"]),
        "concurrent downloads (sha256)": lambda work: _downloads(
            tallies["concurrent downloads (sha256)"], work, sizes["downloads"]),
        "kill -9 during commit storm": lambda work: _kill_storm(
            tallies["kill -9 during commit storm"], work, sizes["kill_rounds"]),
    }
    tallies = {name: Tally() for name in categories}
    for name, run in categories.items():
        work = Path(tempfile.mkdtemp(prefix="prg-hub-reliability-"))
        try:
            run(work)
        except Exception as err:  # a check that cannot finish counts as one wrong case, with the reason
            tallies[name].check(False, f"check failed: {type(err).__name__}: {str(err)[:200]}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return {name: tally.result() for name, tally in tallies.items()}
