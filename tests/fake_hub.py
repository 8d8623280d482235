"""TEST DOUBLE: a tiny stand-in for the Hugging Face Hub HTTP API, on 127.0.0.1, for tests only.

It is not the Hub and not a mirror. It implements just the endpoints huggingface_hub 2.x calls to
download (repo info, tree listing, /resolve with HEAD and Range), to read safetensors headers, and to
push (create repo, create branch, validate-yaml, preupload, the LFS batch API with basic PUT
transfers, commit), with the headers the client checks (X-Repo-Commit, ETag, X-Error-Code).
Tests build the repos themselves (``add_commit``), inspect what was served (``log``,
``weight_bytes_served``, ``lfs_bytes_received``) and inject faults (``fail``).

Bounded: at most ``max_threads`` connections at once, a socket timeout per connection, one request
per connection (``Connection: close``) unless ``keep_alive``, bound to 127.0.0.1 only. Point
huggingface_hub at it with the ``hub_env`` fixture (tests/hub_fixtures.py).

With ``cdn=True`` it answers /resolve for LFS files as the Hub does: a 302 to a signed URL on another
origin (a second port: ``cdn_url``) that expires after ``cdn_ttl`` seconds (then HTTP 403), with the
file's metadata (X-Linked-Size, X-Linked-Etag, X-Repo-Commit) on the redirect itself. The storage
origin serves ranges without auth and counts requests that carried an Authorization header
(``cdn_auth_seen``: a client must not send the Hub token off the Hub).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    data: bytes
    lfs: bool

    @cached_property  # computed once: a request for a range must not hash the whole file again
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @cached_property
    def oid(self) -> str:  # what the tree listing calls the git blob id
        return git_blob_oid(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:  # the Hub's ETag: sha256 for LFS files, the git blob id otherwise
        return self.sha256 if self.lfs else self.oid


@dataclass
class Repo:
    private: bool = False
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        return rev if rev in self.commits else None


@dataclass
class Fault:
    """Make matching requests fail: ``drop`` closes the connection after ``after_bytes`` of body,
    ``status`` answers with that HTTP status, ``slow`` sends the body at ``rate`` bytes/s (a
    straggling connection). Applies ``times`` times."""

    method: str
    pattern: str  # fnmatch pattern on the request path
    mode: str = "drop"
    after_bytes: int = 0
    status: int = 403
    times: int = 1
    range_from: int | None = None  # only requests with a Range starting at or after this byte
    rate: float = 100.0  # bytes/s of a ``slow`` body


@dataclass(frozen=True)
class Logged:
    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int


class FakeHub:
    """In-memory repos served over HTTP. ``with FakeHub() as hub: hub.url ...``"""

    def __init__(self, *, token: str | None = None, max_threads: int = 16, timeout: float = 10.0,
                 bandwidth: float | None = None, cdn: bool = False, cdn_ttl: float = 3600.0, keep_alive: bool = False):
        self.token = token
        self.cdn = cdn  # LFS files redirect to signed URLs on the storage origin
        self.cdn_ttl = cdn_ttl  # seconds a signed URL stays valid
        self.cdn_auth_seen = 0  # requests to the storage origin that carried an Authorization header
        self.keep_alive = keep_alive  # serve more than one request per connection (files and ranges)
        self._secret = hashlib.sha256(str(time.time_ns()).encode()).digest()
        self.bandwidth = bandwidth  # bytes/s over all connections together (a token bucket); None: no cap
        self.ignore_range = False  # answer range requests on /resolve with the whole file (HTTP 200)
        self.corrupt: set[str] = set()  # "org/name/file" served with one bit flipped (its sha256 no longer matches)
        self._next_send = 0.0
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.lfs_names: dict[str, str] = {}  # sha256 -> a path it was committed under (what the storage origin serves)
        self.faults: list[Fault] = []
        self.log: list[Logged] = []
        self.weight_bytes_served = 0
        self.lfs_bytes_received = 0
        self.lfs_offered: list[str] = []  # oids the client asked about in LFS batch requests
        self.connections = 0  # connections accepted (both origins)
        self._lock = threading.Lock()
        self._counter = 0
        self._slots = threading.BoundedSemaphore(max_threads)
        self._timeout = timeout
        self._server: ThreadingHTTPServer | None = None
        self._cdn_server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub
            timeout = hub._timeout

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def process_request(self, request: Any, client_address: Any) -> None:
                hub._slots.acquire()  # bounded: at most max_threads connections at once
                with hub._lock:
                    hub.connections += 1
                try:
                    super().process_request(request, client_address)
                except BaseException:
                    hub._slots.release()
                    raise

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    hub._slots.release()

        self._server = Server(("127.0.0.1", 0), Handler)
        self._cdn_server = Server(("127.0.0.1", 0), Handler) if self.cdn else None
        for server in filter(None, (self._server, self._cdn_server)):
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        for server in filter(None, (self._server, self._cdn_server)):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        """The storage origin (``cdn=True``): another port, so another origin for the client."""
        assert self._cdn_server is not None
        return f"http://127.0.0.1:{self._cdn_server.server_address[1]}"

    def signed_url(self, sha256: str) -> str:
        """A URL of the storage origin for the LFS object ``sha256``, valid for ``cdn_ttl`` seconds."""
        expires = int(time.time() + self.cdn_ttl)
        return f"{self.cdn_url}/cdn/{sha256}?expires={expires}&sig={self._sign(sha256, expires)}"

    def _sign(self, sha256: str, expires: int) -> str:
        return hmac.new(self._secret, f"{sha256}:{expires}".encode(), "sha256").hexdigest()[:32]

    # -- building repos ------------------------------------------------------------------------

    def _new_sha(self, seed: str) -> str:
        with self._lock:
            self._counter += 1
            return hashlib.sha1(f"{self._counter}:{seed}:{time.time_ns()}".encode()).hexdigest()

    def create_repo(self, repo_id: str, *, private: bool = False) -> Repo:
        repo = Repo(private=private)
        sha = self._new_sha(repo_id)
        repo.commits[sha] = {".gitattributes": Blob(GITATTRIBUTES, lfs=False)}
        repo.branches["main"] = sha
        self.repos[repo_id] = repo
        return repo

    def add_commit(self, repo_id: str, files: dict[str, bytes] | Path, *, branch: str = "main",
                   replace: bool = True, private: bool = False) -> str:
        """Commit ``files`` (a dict, or every file of a folder) on ``branch``; returns the commit sha."""
        if isinstance(files, Path):
            folder = files
            files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        repo = self.repos.get(repo_id) or self.create_repo(repo_id, private=private)
        head = repo.branches.get(branch) or repo.branches["main"]
        tree = {".gitattributes": repo.commits[head][".gitattributes"]} if replace else dict(repo.commits[head])
        for path, data in files.items():
            tree[path] = Blob(data, lfs=path.endswith(LFS_SUFFIXES))
            if tree[path].lfs:
                self.lfs_store[tree[path].sha256] = data
                self.lfs_names[tree[path].sha256] = path
        sha = self._new_sha(repo_id + branch)
        repo.commits[sha] = tree
        repo.branches[branch] = sha
        return sha

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return {p: b.data for p, b in repo.commits[repo.resolve(rev)].items()}  # type: ignore[index]

    def fail(self, method: str, pattern: str, **kwargs: Any) -> Fault:
        fault = Fault(method=method, pattern=pattern, **kwargs)
        self.faults.append(fault)
        return fault

    def throttle(self, n: int) -> None:
        """Wait until ``n`` more bytes fit under ``bandwidth`` (shared by every connection)."""
        if not self.bandwidth:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_send)
            self._next_send = done = start + n / self.bandwidth
        if done > now:
            time.sleep(done - now)

    def reset_stats(self) -> None:
        with self._lock:
            self.log.clear()
            self.weight_bytes_served = 0
            self.lfs_bytes_received = 0
            self.lfs_offered.clear()
            self.connections = 0
            self.cdn_auth_seen = 0

    def requests(self, method: str | None = None, contains: str = "") -> list[Logged]:
        return [r for r in list(self.log) if (method is None or r.method == method) and contains in r.path]

    # -- used by the handler -------------------------------------------------------------------

    def _take_fault(self, method: str, path: str, mode: str, rng: str | None = None) -> Fault | None:
        start = int(m.group(1)) if rng and (m := re.match(r"bytes=(\d+)-", rng)) else None
        with self._lock:
            for fault in self.faults:
                if (fault.times > 0 and fault.mode == mode and fault.method == method
                        and fnmatch.fnmatch(path, fault.pattern)
                        and (fault.range_from is None or (start is not None and start >= fault.range_from))):
                    fault.times -= 1
                    return fault
        return None

    def _record(self, entry: Logged, weight_bytes: int = 0, lfs_bytes: int = 0) -> None:
        with self._lock:
            self.log.append(entry)
            self.weight_bytes_served += weight_bytes
            self.lfs_bytes_received += lfs_bytes


def _weight_span(path: str, data: bytes) -> tuple[int, int]:
    """Byte range of ``data`` that holds tensor data (after a safetensors header; all of a pickle)."""
    if path.endswith(".safetensors") and len(data) >= 8:
        return 8 + struct.unpack("<Q", data[:8])[0], len(data)
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        return 0, len(data)
    return len(data), len(data)


class _Error(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None,
                 body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.code, self.headers, self.body = status, code, headers or {}, body or {}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/0 (test double)"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing ------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", weight_span: tuple[int, int] = (0, 0), offset: int = 0,
              lfs_bytes: int = 0) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        keep = self.fake.keep_alive
        if not keep:
            self.send_header("Connection", "close")
        fault = (self.fake._take_fault(self.command, self._path, "drop", self.headers.get("Range"))
                 if self.command != "HEAD" and body else None)
        slow = (self.fake._take_fault(self.command, self._path, "slow", self.headers.get("Range"))
                if self.command != "HEAD" and body and fault is None else None)
        sent = 0 if self.command == "HEAD" else len(body) if fault is None else min(fault.after_bytes, len(body))
        lo, hi = weight_span
        served_weights = max(0, min(hi, offset + sent) - max(lo, offset)) if sent else 0
        # Record before answering: once the client has the answer, the counters already include it.
        self.fake._record(Logged(self.command, self._path, self.headers.get("Range"), status, sent),
                          weight_bytes=served_weights, lfs_bytes=lfs_bytes)
        self.end_headers()
        if slow is not None:
            step = max(1, int(slow.rate / 20))
            for i in range(0, sent, step):  # a write every 50 ms; gives up when the client hangs up
                time.sleep(step / slow.rate)
                self.wfile.write(body[i:min(sent, i + step)])
        elif self.fake.bandwidth:
            view = memoryview(body)[:sent]
            step = max(4096, min(256 << 10, int(self.fake.bandwidth / 50)))  # a write every 20 ms at most
            for i in range(0, len(view), step):
                self.fake.throttle(len(view[i:i + step]))
                self.wfile.write(view[i:i + step])
        else:
            self.wfile.write(body[:sent])
        if fault is not None:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = not keep or fault is not None

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self._path = split.path
        self._query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        try:
            fault = self.fake._take_fault(self.command, self._path, "status", self.headers.get("Range"))
            if fault is not None:
                body = self._body()
                if self.command == "PUT":
                    with self.fake._lock:
                        self.fake.lfs_bytes_received += len(body)
                raise _Error(fault.status, None, "injected failure")
            self._route()
        except _Error as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = str(err)
            self._json(err.status, {"error": str(err), **err.body}, headers)
        except (TimeoutError, ConnectionError):
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # -- auth and lookup -----------------------------------------------------------------------

    def _authorized(self) -> bool:
        token = self.fake.token
        return token is None or self.headers.get("Authorization") == f"Bearer {token}"

    def _repo(self, repo_id: str) -> Repo:
        repo = self.fake.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            raise _Error(404 if repo is None else 401, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def _commit(self, repo: Repo, rev: str) -> str:
        sha = repo.resolve(unquote(rev))
        if sha is None:
            raise _Error(404, "RevisionNotFound", f"Invalid rev id: {unquote(rev)}")
        return sha

    def _require_write(self) -> None:
        if not self._authorized():
            raise _Error(401, None, "Invalid credentials in Authorization header")

    # -- routes --------------------------------------------------------------------------------

    def _route(self) -> None:
        parts = [unquote(p) for p in self._path.strip("/").split("/")]
        m, n = self.command, len(parts)
        if parts[:2] == ["api", "models"] and n >= 4:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if m == "GET" and not rest:
                return self._repo_info(repo_id, "main")
            if m == "GET" and rest[0] == "revision" and len(rest) == 2:
                return self._repo_info(repo_id, rest[1])
            if m == "GET" and rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]))
            if m == "POST" and rest[0] == "branch" and len(rest) >= 2:
                return self._create_branch(repo_id, "/".join(rest[1:]))
            if m == "POST" and rest[0] == "preupload" and len(rest) == 2:
                return self._preupload(repo_id, rest[1])
            if m == "POST" and rest[0] == "commit" and len(rest) == 2:
                return self._commit_files(repo_id, rest[1])
        if m == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo()
        if m == "POST" and parts == ["api", "validate-yaml"]:
            return self._validate_yaml()
        if m == "PUT" and n == 2 and parts[0] == "lfs-upload":
            return self._lfs_put(parts[1])
        if m == "POST" and n == 2 and parts[0] == "lfs-verify":
            self._body()
            return self._json(200 if parts[1] in self.fake.lfs_store else 404, {"success": True})
        if m == "POST" and n == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}")
        if m in ("GET", "HEAD") and n == 2 and parts[0] == "cdn":
            return self._cdn(parts[1])
        if m in ("GET", "HEAD") and n >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise _Error(404, None, f"not implemented by the fake hub: {m} {self._path}")

    def _repo_info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        sha = self._commit(repo, rev)
        self._json(200, {"_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                         "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])]})

    def _tree(self, repo_id: str, rev: str, prefix: str) -> None:
        repo = self._repo(repo_id)
        files = repo.commits[self._commit(repo, rev)]
        recursive = self._query.get("recursive", "").lower() in ("1", "true")
        base = prefix.rstrip("/") + "/" if prefix else ""
        out, folders = [], set()
        for path, blob in sorted(files.items()):
            if not path.startswith(base):
                continue
            rel = path[len(base):]
            if "/" in rel and not recursive:
                folders.add(base + rel.split("/")[0])
                continue
            entry: dict[str, Any] = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
            out.append(entry)
        out += [{"type": "directory", "oid": git_blob_oid(f.encode()), "size": 0, "path": f} for f in sorted(folders)]
        self._json(200, out)

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(repo_id)
        sha = self._commit(repo, rev)
        blob = repo.commits[sha].get(path)
        if blob is None:
            raise _Error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": sha})
        data, total = blob.data, len(blob.data)
        if f"{repo_id}/{path}" in self.fake.corrupt and total:  # one flipped bit in the last byte: the sha256 no longer matches
            data = data[:-1] + bytes([data[-1] ^ 1])
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.etag}"', "X-Linked-Size": str(total)})
        if blob.lfs and self.fake.cdn:  # the Hub sends LFS files from storage: a redirect to a signed URL
            key = blob.sha256
            if f"{repo_id}/{path}" in self.fake.corrupt:
                key += "-corrupt"
                self.fake.lfs_store[key] = data
            return self._send(302, b"", {**headers, "Location": self.fake.signed_url(key)})
        self._serve_bytes(data, headers, weight_span=_weight_span(path, blob.data))

    def _cdn(self, key: str) -> None:
        """The storage origin: an LFS object by a signed URL, ranges allowed, no auth (and none expected)."""
        if self.headers.get("Authorization"):
            with self.fake._lock:
                self.fake.cdn_auth_seen += 1
        expires, sig = self._query.get("expires", "0"), self._query.get("sig", "")
        if not expires.isdigit() or not hmac.compare_digest(sig, self.fake._sign(key, int(expires))):
            raise _Error(403, None, "SignatureDoesNotMatch")
        if time.time() > int(expires):
            raise _Error(403, None, "Request has expired")
        data = self.fake.lfs_store.get(key)
        if data is None:
            raise _Error(404, None, "NoSuchKey")
        name = self.fake.lfs_names.get(key.removesuffix("-corrupt"), "")
        self._serve_bytes(data, {"ETag": f'"{key}"', "Accept-Ranges": "bytes"}, weight_span=_weight_span(name, data))

    def _serve_bytes(self, data: bytes, headers: dict[str, str], weight_span: tuple[int, int]) -> None:
        """A file's bytes, or the range the request asks for (206), or only its headers (HEAD)."""
        total = len(data)
        status, offset = 200, 0
        rng = self.headers.get("Range")
        if rng and self.command == "GET" and not self.fake.ignore_range:
            start_s, _, end_s = rng.removeprefix("bytes=").partition("-")
            start = int(start_s)
            end = min(int(end_s), total - 1) if end_s else total - 1
            if start >= total:
                raise _Error(416, None, "range not satisfiable", {"Content-Range": f"bytes */{total}"})
            data, status, offset = data[start:end + 1], 206, start
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        if self.command == "HEAD":
            # Content-Length of a HEAD is the file's size, with no body
            self.send_response(200)
            for k, v in {**headers, "Content-Length": str(total), "Connection": "close"}.items():
                self.send_header(k, v)
            self.end_headers()
            self.close_connection = True
            self.fake._record(Logged("HEAD", self._path, None, 200, 0))
            return
        self._send(status, data, headers, content_type="application/octet-stream", weight_span=weight_span,
                   offset=offset)

    # -- writes --------------------------------------------------------------------------------

    def _create_repo(self) -> None:
        self._require_write()
        payload = json.loads(self._body() or b"{}")
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        if repo_id in self.fake.repos:
            raise _Error(409, None, "You already created this model repo", body={"url": f"{self.fake.url}/{repo_id}"})
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        self.fake.create_repo(repo_id, private=private)
        self._json(200, {"url": f"{self.fake.url}/{repo_id}", "name": repo_id})

    def _create_branch(self, repo_id: str, branch: str) -> None:
        self._require_write()
        repo = self._repo(repo_id)
        payload = json.loads(self._body() or b"{}")
        if branch in repo.branches:
            raise _Error(409, None, f"Branch {branch} already exists")
        repo.branches[branch] = self._commit(repo, payload.get("startingPoint") or "main")
        self._json(200, {})

    def _validate_yaml(self) -> None:
        payload = json.loads(self._body() or b"{}")
        text = payload.get("content", "")
        try:
            meta = yaml.safe_load(text.split("---", 2)[1]) if text.startswith("---") else {}
        except yaml.YAMLError as exc:
            return self._json(400, {"errors": [{"message": str(exc)}], "warnings": []})
        bases = (meta or {}).get("base_model") or []
        bad = [b for b in ([bases] if isinstance(bases, str) else bases) if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(b))]
        if bad:  # as the Hub does: base_model must name model repos
            return self._json(400, {"errors": [{"message": f'"base_model" with value "{bad[0]}" is not valid. '
                                                           "Use a model id from https://hf.co/models."}]})
        self._json(200, {"errors": [], "warnings": []})

    def _preupload(self, repo_id: str, rev: str) -> None:
        self._require_write()
        repo = self._repo(repo_id)
        files = repo.commits[self._commit(repo, rev)]
        payload = json.loads(self._body())
        out = []
        for f in payload["files"]:
            binary = b"\0" in base64.b64decode(f.get("sample", ""))  # the Hub sends binary files to LFS
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10 * 2**20 or binary
            existing = files.get(f["path"])
            oid = None if existing is None else (existing.sha256 if existing.lfs else existing.oid)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": out, "commitOid": repo.branches.get(unquote(rev))})

    def _lfs_batch(self, repo_id: str) -> None:
        self._require_write()
        self._repo(repo_id)
        payload = json.loads(self._body())
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            self.fake.lfs_offered.append(oid)
            if len(self.fake.lfs_store.get(oid, b"")) == size and oid in self.fake.lfs_store:
                objects.append({"oid": oid, "size": size})  # already there: no actions, nothing to send
            else:
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": f"{self.fake.url}/lfs-upload/{oid}", "header": {}},
                    "verify": {"href": f"{self.fake.url}/lfs-verify/{oid}", "header": {}},
                }})
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise _Error(400, None, "sha256 mismatch")
        self.fake.lfs_store[oid] = data
        self._send(200, b"", lfs_bytes=len(data))

    def _commit_files(self, repo_id: str, rev: str) -> None:
        self._require_write()
        repo = self._repo(repo_id)
        branch = unquote(rev)
        if branch not in repo.branches:
            raise _Error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != repo.branches[branch]:
            raise _Error(412, None, "A commit has happened since. Please refresh and try again.")
        tree = dict(repo.commits[repo.branches[branch]])
        for item in lines[1:]:
            key, value = item["key"], item["value"]
            if key == "file":
                tree[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = self.fake.lfs_store.get(value["oid"])
                if data is None:
                    raise _Error(400, None, f"LFS object {value['oid']} was never uploaded")
                tree[value["path"]] = Blob(data, lfs=True)
            elif key == "deletedFile":
                tree.pop(value["path"], None)
            elif key == "deletedFolder":
                tree = {p: b for p, b in tree.items() if not p.startswith(value["path"].rstrip("/") + "/")}
        sha = self.fake._new_sha(repo_id + header.get("summary", ""))
        repo.commits[sha] = tree
        repo.branches[branch] = sha
        self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.fake.url}/{repo_id}/commit/{sha}"})
