"""A minimal Hugging Face Hub look-alike for tests, on 127.0.0.1, speaking the endpoints huggingface_hub uses.

- ``GET /api/{type}s/{repo}[/revision/{rev}]``: repo info with the commit ``sha``;
- ``GET /api/{type}s/{repo}/tree/{rev}[/{path}]`` and ``POST .../paths-info/{rev}``: files with sizes;
- ``HEAD /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag``, ``Content-Length`` (what hf_hub_download reads);
- ``GET /{repo}/resolve/{rev}/{path}``: a 302 redirect to ``/cdn/...``, which serves the bytes honouring
  ``Range`` (206 + ``Content-Range``) unless the server is told to ignore it.

A file's body is ``head`` bytes followed by zeros up to its declared ``size``, produced lazily, so a repo of
multi-GB shards costs nothing. Gated repos answer 401 + ``X-Error-Code: GatedRepo`` to file requests without
a token; unknown repos answer 401 + ``X-Error-Code: RepoNotFound``, as the Hub does. ``sent`` counts body bytes.

Misbehaviours for the failure tests: ``honour_range=False`` answers every ``Range`` with the whole file (200);
``hang="all"`` accepts connections and never answers, ``hang="cdn"`` answers the API but never sends file bodies;
``die_after=N`` drops every request (connection closed, no answer) once N file bodies were sent in full.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class VirtualFile:
    head: bytes
    size: int

    def read(self, start: int, stop: int):
        """Yield the bytes ``[start, stop)`` in chunks."""
        position = start
        while position < stop:
            end = min(stop, position + (1 << 16))
            if position < len(self.head):
                end = min(end, len(self.head))
                yield self.head[position:end]
            else:
                yield bytes(end - position)
            position = end


@dataclass
class Repo:
    files: dict[str, VirtualFile]
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False


@dataclass
class HubServer:
    repos: dict[str, Repo] = field(default_factory=dict)
    honour_range: bool = True
    sent: int = 0
    requests: list[str] = field(default_factory=list)
    hang: str | None = None  # "all" or "cdn"
    die_after: int | None = None
    bodies_sent: int = 0
    _stopping: threading.Event = field(default_factory=threading.Event)

    def add_folder(self, repo_id: str, folder, *, gated: bool = False) -> Repo:
        """Serve the files of a local folder (and its subfolders) as a repo."""
        import os

        files = {}
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                rel = os.path.relpath(path, folder).replace(os.sep, "/")
                with open(path, "rb") as handle:
                    files[rel] = VirtualFile(handle.read(), os.path.getsize(path))
        repo = Repo(files=files, gated=gated)
        self.repos[repo_id] = repo
        return repo

    def start(self) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}"

    def stop(self) -> None:
        self._stopping.set()  # releases hanging handlers
        self._server.shutdown()
        self._server.server_close()


_API = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/([^/]+)(?:/(.*))?)?$")
_RESOLVE = re.compile(r"^(?:/(datasets|spaces))?/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_CDN = re.compile(r"^/cdn/([^/]+/[^/]+)/([^/]+)/(.+)$")


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms delayed-ACK stall

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._route(head=True)

        def do_GET(self):
            self._route(head=False)

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            self._form = parse_qs(self.rfile.read(length).decode())
            self._route(head=False)

        def _route(self, head: bool):
            hub.requests.append(f"{self.command} {self.path} {self.headers.get('Range', '')}".strip())
            url = urlsplit(self.path)
            path = unquote(url.path)
            if hub.die_after is not None and hub.bodies_sent >= hub.die_after:
                self.close_connection = True  # gone: the client sees the connection closed without an answer
                return
            if hub.hang == "all" or (hub.hang == "cdn" and _CDN.match(path)):
                hub._stopping.wait(60)  # accepted, never answered
                self.close_connection = True
                return
            if m := _API.match(path):
                return self._api(m[2], m[3], m[5] or "", parse_qs(url.query))
            if m := _RESOLVE.match(path):
                return self._resolve(m[2], m[3], m[4], head)
            if m := _CDN.match(path):
                return self._cdn(m[1], m[3], head)
            self._json(404, {"error": "not found"})

        def _repo(self, repo_id: str, *, files: bool):
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._json(401, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return None
            if files and repo.gated and not self.headers.get("Authorization"):
                self._json(401, {"error": "Access to this repo is restricted"}, {"X-Error-Code": "GatedRepo"})
                return None
            return repo

        def _api(self, repo_id: str, what: str, sub: str, query):
            repo = self._repo(repo_id, files=False)
            if repo is None:
                return
            if what in ("revision", None):
                siblings = [{"rfilename": p} for p in sorted(repo.files)]
                return self._json(
                    200, {"id": repo_id, "sha": repo.sha, "siblings": siblings, "private": False, "gated": repo.gated}
                )
            if what == "tree":
                prefix = sub.strip("/")
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                items, folders = [], set()
                for name, vf in sorted(repo.files.items()):
                    if prefix and not name.startswith(prefix + "/"):
                        continue
                    rest = name[len(prefix) + 1 :] if prefix else name
                    if "/" in rest and not recursive:
                        folders.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                        continue
                    items.append(self._entry(name, vf))
                items += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
                if prefix and not items:
                    return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                return self._json(200, items)
            paths = self._form.get("paths", [])
            return self._json(200, [self._entry(p, repo.files[p]) for p in paths if p in repo.files])

        @staticmethod
        def _entry(name: str, vf: VirtualFile) -> dict:
            oid = hashlib.sha1(name.encode()).hexdigest()
            entry = {"type": "file", "oid": oid, "size": vf.size, "path": name}
            if vf.size > 1000:
                entry["lfs"] = {"oid": hashlib.sha256(name.encode()).hexdigest(), "size": vf.size, "pointerSize": 134}
            return entry

        def _resolve(self, repo_id: str, revision: str, name: str, head: bool):
            repo = self._repo(repo_id, files=True)
            if repo is None:
                return
            vf = repo.files.get(name)
            if vf is None:
                return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            meta = {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha1(name.encode()).hexdigest()}"'}
            if head:
                self.send_response(200)
                for key, value in meta.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(vf.size))
                self.end_headers()
                return
            self.send_response(302)
            for key, value in meta.items():
                self.send_header(key, value)
            self.send_header("Location", f"/cdn/{repo_id}/{repo.sha}/{name}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _cdn(self, repo_id: str, name: str, head: bool):
            repo = hub.repos.get(repo_id)
            vf = repo.files.get(name) if repo else None
            if vf is None:
                return self._json(404, {"error": "not found"})
            start, stop, status = 0, vf.size, 200
            spec = self.headers.get("Range")
            if spec and hub.honour_range:
                m = re.match(r"bytes=(\d+)-(\d*)$", spec)
                start = int(m[1])
                stop = min(vf.size, int(m[2]) + 1) if m[2] else vf.size
                if start >= vf.size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{vf.size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            self.send_response(status)
            self.send_header("Content-Length", str(stop - start))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{vf.size}")
            self.end_headers()
            if head:
                return
            try:
                for chunk in vf.read(start, stop):
                    self.wfile.write(chunk)
                    hub.sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                return
            if (start, stop) == (0, vf.size):
                hub.bodies_sent += 1

        def _json(self, status: int, data, headers: dict | None = None):
            body = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def isolate(monkeypatch, tmp_path, endpoint: str) -> None:
    """Point huggingface_hub at ``endpoint`` with an empty HF_HOME and no token.

    huggingface_hub reads its settings at import, so the constants are patched too; ``constants.ENDPOINT`` stays:
    shardkit passes the endpoint explicitly, and hf_hub_url only swaps an endpoint it recognises as the default.
    """
    home = tmp_path / "hf_home"
    for name, value in {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    import huggingface_hub.constants

    constants = huggingface_hub.constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
