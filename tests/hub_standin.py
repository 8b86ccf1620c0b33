"""A stand-in for the Hugging Face hub on a loopback port, for tests that download through the real
``huggingface_hub`` client (``HF_ENDPOINT`` points here). It serves model folders from disk under the routes that
``snapshot_download`` uses — repo info at a revision, the recursive file tree, and ``resolve`` for each file (HEAD
and GET, with the commit and ETag headers) — and answers errors as the hub does, with ``X-Error-Code``
(RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), so the client raises its own typed errors.
It records every request, so a test can assert that nothing was downloaded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    revisions: dict[str, Path]  # branch or tag -> folder of files
    token: str | None = None  # when set, the repo is gated: requests need "Authorization: Bearer <token>"

    def commit(self, revision: str) -> str | None:
        """The commit a revision names: a known branch/tag, or a commit hash of one of them."""
        if revision in self.revisions:
            return hashlib.sha1(f"{revision}:{self.revisions[revision]}".encode()).hexdigest()
        return revision if any(self.commit(r) == revision for r in self.revisions) else None

    def folder(self, commit: str) -> Path:
        return next(f for r, f in self.revisions.items() if self.commit(r) == commit)


@dataclass
class HubStandIn:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def start(self, host: str = "127.0.0.1") -> "HubStandIn":
        """Serve on `host` (loopback by default; the node suite binds the node's address, which pods reach)."""
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._route(body=False)

            def do_GET(self) -> None:
                self._route(body=True)

            def _send(self, status: int, payload: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(status)
                for k, v in {"Content-Length": str(len(payload)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(payload)

            def _error(self, status: int, code: str, message: str, body: bool) -> None:
                self._send(status, json.dumps({"error": message}).encode(),
                           {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}, body)

            def _route(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                api = parts[:2] == ["api", "models"]
                repo_id = "/".join(parts[2:4] if api else parts[0:2])
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._error(401, "RepoNotFound", f"Repository Not Found for url: {path}", body)
                if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                    return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted.", body)
                kind, revision = (parts[4], parts[5]) if api else (parts[2], parts[3])
                commit = repo.commit(revision)
                if commit is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
                folder = repo.folder(commit)
                files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                if api and kind == "revision":
                    info = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": bool(repo.token),
                            "siblings": [{"rfilename": f} for f in files]}
                    return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
                if api and kind == "tree":
                    tree = [{"type": "file", "path": f, "size": (folder / f).stat().st_size,
                             "oid": hashlib.sha1((folder / f).read_bytes()).hexdigest()} for f in files]
                    return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
                if not api and kind == "resolve":
                    name = "/".join(parts[4:])
                    if name not in files:
                        return self._error(404, "EntryNotFound", f"{name} does not exist at {revision}", body)
                    data = (folder / name).read_bytes()
                    etag = hashlib.sha1(data).hexdigest()
                    return self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{etag}"',
                                                  "Content-Type": "application/octet-stream"}, body)
                return self._error(404, "EntryNotFound", f"no route {path}", body)

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloads(self) -> list[str]:
        return [p for m, p in self.requests if m == "GET" and "/resolve/" in p]
