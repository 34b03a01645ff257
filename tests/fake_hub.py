"""A tiny stand-in for the Hugging Face Hub on 127.0.0.1, enough for `snapshot_download`.

It answers the calls huggingface_hub 2.4 makes (read from its source, not guessed):

- `GET  /api/models/{repo}/revision/{rev}`    -> repo info; `sha` is the commit the revision points at
- `GET  /api/models/{repo}/tree/{rev}`         -> the recursive file listing (path, size, git oid, lfs): the
                                                  sha256 of each LFS file is its `lfs.oid`, as on the Hub
- `HEAD /{repo}/resolve/{rev}/{file}`          -> small files: 200 with ETag (git blob sha1) + X-Repo-Commit;
                                                  LFS files (*.safetensors): 302 to a second "CDN" server with
                                                  X-Linked-Etag (sha256), X-Linked-Size and X-Repo-Commit
- `GET` of either URL                          -> the bytes, honouring `Range: bytes=N-` (206 + Content-Range)

The CDN listens on its own port on purpose: huggingface_hub only follows redirects that stay on the Hub's
origin, and drops the Authorization header for any other origin, exactly as with the real Hub's CDN.

Errors carry the Hub's `X-Error-Code` / `X-Error-Message` headers, which is what huggingface_hub turns
into RepositoryNotFoundError, RevisionNotFoundError and GatedRepoError.

Fault injection for tests:
- `drop_connection(file, after_bytes, times, then_status)`: the next `times` GETs of `file` send their
  headers and `after_bytes` of the body, then close the socket (a transfer cut off midway). Afterwards,
  if `then_status` is set, the file answers that status (e.g. 503) until `restore()`.
- `fail_api(status, times)`: the next `times` /api/ calls answer `status` (a Hub hiccup).
- `stall(file)`: every GET of `file`'s bytes is accepted and never answered (a file server gone silent).
- `gated=True`: /resolve answers 401 (no token) or 403 (token without access) with X-Error-Code GatedRepo.

Every request is recorded in `requests` (the Authorization header only as a yes/no, never its value).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlsplit

_API_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)$")
_API_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_BLOB = re.compile(r"^/blobs/(?P<sha256>[0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(?P<start>\d+)-(?P<end>\d*)$")


@dataclass
class Seen:
    """One request as the server saw it."""

    server: str  # "hub" or "cdn"
    method: str
    path: str  # URL path, unquoted
    file: Optional[str]  # repo file whose bytes or metadata were asked for
    range: Optional[str]  # the Range header, if any
    authorized: bool  # whether an Authorization header came along


@dataclass
class _Drop:
    after_bytes: int
    times: int
    then_status: Optional[int]


def git_blob_sha1(data: bytes) -> str:
    """The git object id the Hub reports as `oid` / ETag for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Serve one model repo. Use as a context manager; `endpoint` is the value for HF_ENDPOINT."""

    def __init__(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False):
        self.repo_id = repo_id
        self.files = dict(files)
        self.gated = gated
        # Like the Hub, weights are LFS files; small JSON files are plain git blobs.
        self.lfs = {p for p in self.files if p.endswith(".safetensors")}
        self.sha256 = {p: hashlib.sha256(self.files[p]).hexdigest() for p in self.lfs}
        self.by_sha256 = {h: p for p, h in self.sha256.items()}
        digest = hashlib.sha1()
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + git_blob_sha1(self.files[path]).encode())
        self.commit = digest.hexdigest()
        self.requests: list[Seen] = []
        self._drops: dict[str, _Drop] = {}
        self._failing: dict[str, int] = {}
        self._api_failures: list[int] = []
        self._stalled: set[str] = set()
        self._stopping = threading.Event()  # releases stalled handlers
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "FakeHub":
        self._hub = self._serve("hub")
        self._cdn = self._serve("cdn")
        return self

    def stop(self) -> None:
        self._stopping.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _serve(self, role: str) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # port 0: the OS picks a free one
        server.daemon_threads = True
        server.hub, server.role = self, role  # type: ignore[attr-defined]
        # A short poll interval keeps shutdown() (called per test) fast.
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._servers.append(server)
        return server

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    # -- fault injection and inspection ------------------------------------------------------

    def drop_connection(self, file: str, after_bytes: int, times: int = 1, then_status: Optional[int] = None):
        with self._lock:
            self._drops[file] = _Drop(after_bytes, times, then_status)

    def fail_api(self, status: int, times: int = 1) -> None:
        with self._lock:
            self._api_failures.extend([status] * times)

    def stall(self, file: str) -> None:
        with self._lock:
            self._stalled.add(file)

    def restore(self) -> None:
        with self._lock:
            self._stalled.clear()
            self._drops.clear()
            self._failing.clear()
            self._api_failures.clear()

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def downloads(self, file: Optional[str] = None) -> list[Seen]:
        """GETs that asked for a file's bytes (from the Hub or the CDN)."""
        return [s for s in self.requests if s.method == "GET" and s.file is not None
                and not s.path.startswith("/api/") and (file is None or s.file == file)]

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)

    def _take_api_failure(self) -> Optional[int]:
        with self._lock:
            return self._api_failures.pop(0) if self._api_failures else None

    def _take_fault(self, file: str) -> tuple[Optional[int], Optional[int]]:
        """(bytes to send before cutting the connection, error status to answer instead)."""
        with self._lock:
            if file in self._failing:
                return None, self._failing[file]
            drop = self._drops.get(file)
            if drop is None:
                return None, None
            drop.times -= 1
            if drop.times <= 0:
                del self._drops[file]
                if drop.then_status is not None:
                    self._failing[file] = drop.then_status
            return drop.after_bytes, None


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive, as the Hub speaks it; every response therefore sends Content-Length.
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_HEAD(self):
        self._route(send_body=False)

    def do_GET(self):
        self._route(send_body=True)

    # -- routing -----------------------------------------------------------------------------

    def _route(self, send_body: bool) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        role: str = self.server.role  # type: ignore[attr-defined]
        path = unquote(urlsplit(self.path).path)
        file = None
        if role == "cdn":
            m = _BLOB.match(path)
            file = hub.by_sha256.get(m["sha256"]) if m else None
        else:
            m = _RESOLVE.match(path)
            file = m["path"] if m else None
        hub._record(Seen(role, self.command, path, file, self.headers.get("Range"),
                         "Authorization" in self.headers))

        if role == "cdn":
            if file is None:
                return self._error(404, "EntryNotFound", "Blob not found", send_body)
            return self._send_file(hub, file, send_body)
        if path.startswith("/api/models/") and (status := hub._take_api_failure()):
            return self._error(status, None, "Service temporarily unavailable", send_body)
        if m := _API_INFO.match(path):
            return self._repo_info(hub, m["repo"], m["rev"], send_body)
        if m := _API_TREE.match(path):
            return self._tree(hub, m["repo"], m["rev"], send_body)
        if m := _RESOLVE.match(path):
            return self._resolve(hub, m["repo"], m["rev"], m["path"], send_body)
        self._error(404, None, f"Not found: {path}", send_body)

    def _check_repo(self, hub: FakeHub, repo: str, rev: str, send_body: bool) -> bool:
        if repo != hub.repo_id:
            # The Hub answers 401 to anonymous callers for repos that don't exist (or are private).
            status = 404 if "Authorization" in self.headers else 401
            self._error(status, "RepoNotFound", "Repository not found", send_body)
            return False
        if rev not in ("main", hub.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", send_body)
            return False
        return True

    def _repo_info(self, hub: FakeHub, repo: str, rev: str, send_body: bool) -> None:
        if not self._check_repo(hub, repo, rev, send_body):
            return
        info = {"_id": "0" * 24, "id": hub.repo_id, "sha": hub.commit, "private": False,
                "gated": "manual" if hub.gated else False, "disabled": False,
                "siblings": [{"rfilename": p} for p in sorted(hub.files)]}
        self._json(200, info, send_body)

    def _tree(self, hub: FakeHub, repo: str, rev: str, send_body: bool) -> None:
        if not self._check_repo(hub, repo, rev, send_body):
            return
        entries = []
        for path in sorted(hub.files):
            data = hub.files[path]
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
            if path in hub.lfs:
                entry["lfs"] = {"oid": hub.sha256[path], "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(200, entries, send_body)

    def _resolve(self, hub: FakeHub, repo: str, rev: str, path: str, send_body: bool) -> None:
        if not self._check_repo(hub, repo, rev, send_body):
            return
        if hub.gated:
            # Metadata stays public for gated repos; the files are what needs a token with access.
            if "Authorization" in self.headers:
                return self._error(403, "GatedRepo", f"Access to model {repo} is restricted and you are not in "
                                   f"the authorized list. Visit {hub.endpoint}/{repo} to ask for access.", send_body)
            return self._error(401, "GatedRepo", f"Access to model {repo} is restricted. You must have access to "
                               "it and be authenticated to access it. Please log in.", send_body)
        if path not in hub.files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", send_body)
        if path in hub.lfs:
            size, sha = len(hub.files[path]), hub.sha256[path]
            self.send_response(302)
            self.send_header("Location", f"{hub.cdn}/blobs/{sha}")
            self.send_header("X-Repo-Commit", hub.commit)
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(size))
            self.send_header("ETag", f'"{sha}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send_file(hub, path, send_body, etag=git_blob_sha1(hub.files[path]), commit=hub.commit)

    # -- responses ---------------------------------------------------------------------------

    def _send_file(self, hub: FakeHub, file: str, send_body: bool, etag: Optional[str] = None,
                   commit: Optional[str] = None) -> None:
        data = hub.files[file]
        if send_body and file in hub._stalled:
            hub._stopping.wait()  # read the request, never answer: only the client's timeout ends this
            self.close_connection = True
            return
        cut_after, fail_status = hub._take_fault(file) if send_body else (None, None)
        if fail_status is not None:
            return self._error(fail_status, None, "Service temporarily unavailable", send_body)
        start, end = 0, len(data)
        requested = self.headers.get("Range")
        if requested:
            m = _RANGE.match(requested.strip())
            if not m or int(m["start"]) >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(m["start"])
            end = min(int(m["end"]) + 1, len(data)) if m["end"] else len(data)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if etag:
            self.send_header("ETag", f'"{etag}"')
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if not send_body:
            return
        body = data[start:end]
        if cut_after is None:
            self.wfile.write(body)
            return
        # Cut the transfer: part of the body, then a hard close, so the client sees a short read.
        self.wfile.write(body[:cut_after])
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _json(self, status: int, payload, send_body: bool) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _error(self, status: int, code: Optional[str], message: str, send_body: bool) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)
