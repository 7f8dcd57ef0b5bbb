"""A minimal Hugging Face Hub-compatible HTTP server on 127.0.0.1 for tests (the only test double: the network edge).

It implements what ``create_repo``, ``upload_folder`` (regular, base64-in-commit uploads), ``snapshot_download`` /
``hf_hub_download`` and ``from_pretrained(repo_id)`` call, storing repositories in memory. Run it in a thread with
:func:`serve` and point clients at it with ``HF_ENDPOINT`` (set before ``huggingface_hub`` is imported).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

REPOS: dict[str, dict] = {}  # repo_id -> {"files": {path: bytes}, "sha": str}
LOCK = threading.Lock()


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode())

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

    def _repo(self, repo_id: str):
        repo = REPOS.get(repo_id)
        if repo is None:
            self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepositoryNotFound"})
        return repo

    def do_GET(self):  # noqa: N802
        path = unquote(urlparse(self.path).path)
        if path == "/api/whoami-v2":
            return self._json(200, {"name": "user", "type": "user", "auth": {"accessToken": {"role": "write"}}})
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$", path)
        if m:
            repo = self._repo(m.group(1))
            if repo is not None:
                siblings = [{"rfilename": p, "size": len(d)} for p, d in sorted(repo["files"].items())]
                self._json(200, {"id": m.group(1), "sha": repo["sha"], "siblings": siblings, "private": False})
            return None
        m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)/?(.*)$", path)
        if m:
            repo = self._repo(m.group(1))
            if repo is not None:
                prefix = m.group(3).strip("/")
                entries = [
                    {"type": "file", "path": p, "size": len(d), "oid": _sha(d)}
                    for p, d in sorted(repo["files"].items())
                    if not prefix or p.startswith(prefix + "/")
                ]
                self._json(200, entries)
            return None
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            repo = self._repo(m.group(1))
            if repo is None:
                return None
            data = repo["files"].get(m.group(3))
            if data is None:
                return self._send(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})
            headers = {"X-Repo-Commit": repo["sha"], "ETag": f'"{_sha(data)}"'}
            return self._send(200, data, headers, content_type="application/octet-stream")
        return self._send(404, b'{"error": "not implemented"}')

    do_HEAD = do_GET

    def do_POST(self):  # noqa: N802
        path = unquote(urlparse(self.path).path)
        body = self._body()
        if path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req.get('organization') or 'user'}/{req['name']}"
            with LOCK:
                exists = repo_id in REPOS
                REPOS.setdefault(repo_id, {"files": {}, "sha": "0" * 40})
            status = 409 if exists else 200
            return self._json(status, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        m = re.match(r"^/api/models/([^/]+/[^/]+)/preupload/([^/]+)$", path)
        if m:
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return self._json(200, {"files": modes})
        m = re.match(r"^/api/models/([^/]+/[^/]+)/paths-info/([^/]+)$", path)
        if m:
            repo = self._repo(m.group(1))
            if repo is not None:
                from urllib.parse import parse_qs

                form = parse_qs(body.decode()) if body and not body.startswith(b"{") else {}
                paths = form.get("paths", []) or json.loads(body or b"{}").get("paths", [])
                info = [
                    {"type": "file", "path": p, "size": len(repo["files"][p]), "oid": _sha(repo["files"][p])}
                    for p in paths
                    if p in repo["files"]
                ]
                self._json(200, info)
            return None
        m = re.match(r"^/api/models/([^/]+/[^/]+)/commit/([^/]+)$", path)
        if m:
            repo = self._repo(m.group(1))
            if repo is None:
                return None
            with LOCK:
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    op = json.loads(line)
                    if op["key"] == "file":
                        repo["files"][op["value"]["path"]] = base64.b64decode(op["value"]["content"])
                    elif op["key"] == "deletedFile":
                        repo["files"].pop(op["value"]["path"], None)
                repo["sha"] = _sha(json.dumps(sorted((p, _sha(d)) for p, d in repo["files"].items())).encode())
            url = f"http://{self.headers['Host']}/{m.group(1)}/commit/{repo['sha']}"
            return self._json(200, {"commitUrl": url, "commitOid": repo["sha"], "pullRequestUrl": None})
        return self._send(404, b'{"error": "not implemented"}')


def serve() -> tuple[ThreadingHTTPServer, str]:
    """Start the server on a free port in a daemon thread; returns (server, endpoint URL)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
