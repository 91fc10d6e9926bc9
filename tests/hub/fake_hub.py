"""A small Hugging Face Hub-compatible HTTP server for offline tests (loopback only, regular uploads only).

Run ``python tests/hub/fake_hub.py ROOT``: it binds 127.0.0.1 on a free port, prints ``PORT <n>`` on its first line
and stores each repository's current files under ``ROOT/<org>/<name>/``. It answers the endpoints that
``HfApi.create_repo``, ``upload_folder``/``upload_file``, ``file_exists``, ``hf_hub_download`` and
``snapshot_download`` use. Every preupload answer is "regular", which keeps LFS and Xet out of the picture.
Stop it by its pid. Real Hub behaviour (size limits, LFS, auth) is not covered.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(".")
# Current commit sha of every repository, "org/name" -> 40 hex digits.
HEADS: dict[str, str] = {}

_REPO = r"(?:models/)?(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/{_REPO}/revision/(?P<rev>[^/]+)$"), "revision"),
    ("GET", re.compile(rf"^/api/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("GET", re.compile(rf"^/api/{_REPO}$"), "info"),
    ("HEAD", re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("GET", re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


def _new_sha() -> str:
    return hashlib.sha1(uuid.uuid4().bytes).hexdigest()


def _files(repo: str) -> dict[str, Path]:
    folder = ROOT / repo
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # quiet: tests read stdout for the port only
        pass

    def _route(self, method: str) -> None:
        path = unquote(urlparse(self.path).path)
        for verb, pattern, name in _ROUTES:
            match = pattern.match(path)
            if verb == method and match:
                return getattr(self, "_" + name)(**{k: v for k, v in match.groupdict().items() if v})
        self._send(404, {"error": f"fake hub does not serve {method} {path}"})

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    # -- helpers -------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _send(self, status: int, payload=None, headers: dict[str, str] | None = None, raw: bytes | None = None):
        body = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _missing_repo(self, repo: str) -> bool:
        if repo in HEADS:
            return False
        self._send(404, {"error": f"repository {repo} not found"}, {"X-Error-Code": "RepoNotFound"})
        return True

    # -- endpoints -----------------------------------------------------------------------------------------

    def _create(self) -> None:
        request = json.loads(self._body() or b"{}")
        repo = f"{request.get('organization') or 'user'}/{request['name']}"
        if repo not in HEADS:
            (ROOT / repo).mkdir(parents=True, exist_ok=True)
            HEADS[repo] = _new_sha()
        self._send(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo, "id": repo})

    def _validate_yaml(self) -> None:
        self._body()
        self._send(200, {"errors": [], "warnings": []})

    def _preupload(self, repo: str, rev: str) -> None:
        request = json.loads(self._body())
        if self._missing_repo(repo):
            return
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in request["files"]]
        self._send(200, {"files": files, "commitOid": HEADS[repo]})

    def _commit(self, repo: str, rev: str) -> None:
        lines = [json.loads(line) for line in self._body().decode().splitlines() if line.strip()]
        if self._missing_repo(repo):
            return
        for line in lines:
            value = line.get("value", {})
            if line["key"] == "file":
                target = ROOT / repo / value["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(value["content"]))
            elif line["key"] == "deletedFile":
                (ROOT / repo / value["path"]).unlink(missing_ok=True)
            elif line["key"] != "header":
                self._send(400, {"error": f"fake hub cannot handle commit entries of kind {line['key']!r}"})
                return
        HEADS[repo] = _new_sha()
        url = f"http://{self.headers['Host']}/{repo}/commit/{HEADS[repo]}"
        self._send(200, {"commitUrl": url, "commitOid": HEADS[repo], "success": True})

    def _info(self, repo: str) -> None:
        self._revision(repo, "main")

    def _revision(self, repo: str, rev: str) -> None:
        if self._missing_repo(repo):
            return
        siblings = [{"rfilename": name} for name in _files(repo)]
        self._send(200, {"id": repo, "modelId": repo, "sha": HEADS[repo], "siblings": siblings, "private": False})

    def _tree(self, repo: str, rev: str, path: str = "") -> None:
        if self._missing_repo(repo):
            return
        entries = [
            {"type": "file", "path": name, "size": p.stat().st_size, "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
            for name, p in _files(repo).items()
            if name.startswith(path)
        ]
        self._send(200, entries)

    def _resolve(self, repo: str, rev: str, path: str) -> None:
        if self._missing_repo(repo):
            return
        file = _files(repo).get(path)
        if file is None:
            self._send(404, {"error": f"{path} not in {repo}"}, {"X-Error-Code": "EntryNotFound"})
            return
        data = file.read_bytes()
        etag = '"' + hashlib.sha1(data).hexdigest() + '"'
        self._send(200, headers={"X-Repo-Commit": HEADS[repo], "ETag": etag}, raw=data)


def main() -> None:
    global ROOT
    ROOT = Path(sys.argv[1])
    ROOT.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
