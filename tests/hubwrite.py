"""A Hub look-alike that accepts writes, on 127.0.0.1, for huggingface_hub's real client (1.x and 2.x).

It speaks what ``create_repo``, ``create_commit`` (LFS path: set ``HF_HUB_DISABLE_XET=1``), ``repo_info``,
``list_repo_tree``, ``get_paths_info``, ``hf_hub_download`` and ``snapshot_download`` call, and stores what it
receives, so tests download a repo back and compare bytes:

- ``POST /api/repos/create``: ``{name, organization?, type?, private?}`` -> ``{url}``; 409 when it exists;
- ``GET /api/{type}s/{repo}[/revision/{rev}]``: ``sha`` and ``siblings``; ``RepoNotFound`` / ``RevisionNotFound``;
- ``POST .../preupload/{rev}``: ``uploadMode`` (lfs for binaries and files over 10 MB), ``shouldIgnore``, ``oid``;
- ``POST /[{type}s/]{repo}.git/info/lfs/objects/batch``: basic transfer; no ``actions`` for a stored object;
- ``PUT /lfs/{oid}`` (the upload ``href``; checked against oid and size), ``POST /lfs/{oid}/verify``;
- ``POST .../commit/{rev}[?create_pr=1]``: NDJSON ``header`` / ``file`` / ``lfsFile`` / ``deletedFile`` /
  ``deletedFolder``; ``parentCommit`` must be the branch head (412 otherwise); ``create_pr`` opens
  ``refs/pr/N`` from the parent and answers ``pullRequestUrl``;
- ``GET .../tree/{rev}[/{path}]?recursive=`` and ``POST .../paths-info/{rev}``: ``lfs.oid`` = SHA-256;
- ``HEAD``/``GET /[{type}s/]{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag``/``X-Linked-Etag``
  (the blob name in the HF cache), ``Range``.

Auth: ``tokens`` maps a token to ``"read"`` or ``"write"``. Writes without a token answer 401, with a read token
403; private repos answer 404 ``RepoNotFound`` to anyone without a token (as the Hub does). Failure injection:
``fail_put_after`` cuts the connection once that many LFS bytes were received in total (a network failure
mid-upload). ``log`` records every request line; ``commits`` every commit's operations.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

REGULAR_LIMIT = 10 * 1024 * 1024
_TEXT_SUFFIXES = (".json", ".md", ".txt", ".py", ".yaml", ".yml", ".model", ".gitattributes")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Entry:
    """A file in a commit: regular (``data``) or LFS (``oid`` of a stored object)."""

    size: int
    data: bytes | None = None
    lfs_oid: str | None = None

    @property
    def oid(self) -> str:
        if self.lfs_oid is None:
            return git_blob_sha1(self.data or b"")
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.lfs_oid}\nsize {self.size}\n"
        return git_blob_sha1(pointer.encode())


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, Entry]
    message: str = ""


@dataclass
class Repo:
    repo_type: str
    private: bool
    refs: dict[str, str]  # branch, tag or refs/pr/N -> commit sha
    commits: dict[str, Commit]
    prs: int = 0

    def resolve(self, revision: str) -> Commit | None:
        sha = self.refs.get(revision, revision)
        return self.commits.get(sha)


@dataclass
class WriteHub:
    tokens: dict[str, str] = field(default_factory=lambda: {"hf_write": "write", "hf_read": "read"})
    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)
    objects: dict[str, bytes] = field(default_factory=dict)  # LFS store: sha256 -> bytes
    log: list[str] = field(default_factory=list)
    commits: list[dict] = field(default_factory=list)
    fail_put_after: int | None = None
    received: int = 0
    _ids = itertools.count(1)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # -- set-up helpers for tests ---------------------------------------------------------------------------
    def create(self, repo_id: str, repo_type: str = "model", *, private: bool = False) -> Repo:
        root = Commit(self._sha(), None, {".gitattributes": Entry(0, b"")}, "initial commit")
        repo = Repo(repo_type, private, {"main": root.sha}, {root.sha: root})
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def seed(self, repo_id: str, files: dict[str, bytes], *, repo_type: str = "model", branch: str = "main") -> str:
        """Commit ``files`` (large or binary ones as LFS) directly, creating the repo if needed; the new sha."""
        repo = self.repos.get((repo_type, repo_id)) or self.create(repo_id, repo_type)
        parent = repo.resolve(branch) or repo.resolve("main")
        entries = dict(parent.files)
        for path, data in files.items():
            if _wants_lfs(path, data[:512], len(data)):
                oid = hashlib.sha256(data).hexdigest()
                self.objects[oid] = data
                entries[path] = Entry(len(data), lfs_oid=oid)
            else:
                entries[path] = Entry(len(data), data=data)
        commit = Commit(self._sha(), parent.sha, entries, "seed")
        repo.commits[commit.sha] = commit
        repo.refs[branch] = commit.sha
        return commit.sha

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """``{path: bytes}`` of a revision, as stored."""
        commit = self.repos[(repo_type, repo_id)].resolve(revision)
        return {p: e.data if e.lfs_oid is None else self.objects[e.lfs_oid] for p, e in commit.files.items()}

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        return self.repos[(repo_type, repo_id)].refs[revision]

    def _sha(self) -> str:
        return hashlib.sha1(b"commit %d" % next(self._ids)).hexdigest()

    def start(self) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _wants_lfs(path: str, sample: bytes, size: int) -> bool:
    """The Hub's rule as seen from outside: binaries (a NUL in the sample) and files over 10 MB go to LFS."""
    if size > REGULAR_LIMIT or path.endswith((".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")):
        return True
    return b"\0" in sample and not path.endswith(_TEXT_SUFFIXES)


_TYPES = "(models|datasets|spaces)"
_API = re.compile(rf"^/api/{_TYPES}/([^/]+/[^/]+)(?:/(revision|tree|paths-info|preupload|commit)(?:/(.*))?)?$")
_LFS_BATCH = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/(.+)$")


class _Reply(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.error_code = status, error_code


def _handler(hub: WriteHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._dispatch()

        def do_GET(self):
            self._dispatch()

        def do_POST(self):
            self._dispatch()

        def do_PUT(self):
            self._dispatch()

        # -- plumbing ---------------------------------------------------------------------------------------
        def _dispatch(self):
            hub.log.append(f"{self.command} {self.path}")
            try:
                self._route()
            except _Reply as reply:
                headers = {"X-Error-Code": reply.error_code} if reply.error_code else {}
                self._json(reply.status, {"error": str(reply)}, headers, {"X-Error-Message": str(reply)})
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _token_scope(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            token = auth[7:] if auth.startswith("Bearer ") else None
            if token is None:
                return None
            if token not in hub.tokens:
                raise _Reply(401, "Invalid credentials in Authorization header")
            return hub.tokens[token]

        def _require_write(self):
            scope = self._token_scope()
            if scope is None:
                raise _Reply(401, "You must be authenticated to write")
            if scope != "write":
                raise _Reply(403, "You don't have the rights to write to this repo (read-only token)")

        def _repo(self, repo_type: str, repo_id: str) -> Repo:
            repo = hub.repos.get((repo_type, repo_id))
            if repo is None or (repo.private and self._token_scope() is None):
                raise _Reply(404, "Repository not found", "RepoNotFound")
            return repo

        def _commit(self, repo: Repo, revision: str) -> Commit:
            commit = repo.resolve(revision)
            if commit is None:
                raise _Reply(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return commit

        def _json(self, status: int, data, headers: dict | None = None, extra: dict | None = None):
            body = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in {**(headers or {}), **(extra or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        # -- routes -----------------------------------------------------------------------------------------
        def _route(self):
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            if path == "/api/repos/create" and self.command == "POST":
                return self._create_repo(json.loads(self._body() or b"{}"))
            if m := _API.match(path):
                return self._api(m[1][:-1], m[2], m[3], m[4] or "", query)
            if m := _LFS_BATCH.match(path):
                return self._lfs_batch((m[1] or "models")[:-1], m[2], json.loads(self._body()))
            if m := re.match(r"^/lfs/([0-9a-f]{64})(/verify)?$", path):
                return self._lfs_verify(m[1]) if m[2] else self._lfs_put(m[1])
            if m := _RESOLVE.match(url.path):  # quoted: the revision may hold an escaped "/"
                return self._resolve((m[1] or "models")[:-1], unquote(m[2]), m[3])
            raise _Reply(404, f"no route for {self.command} {path}")

        def _create_repo(self, body: dict):
            self._require_write()
            repo_type = body.get("type") or "model"
            repo_id = f"{body.get('organization') or 'user'}/{body['name']}"
            if (repo_type, repo_id) in hub.repos:
                raise _Reply(409, "You already created this model repo")
            with hub.lock:
                hub.create(repo_id, repo_type, private=bool(body.get("private") or body.get("visibility") == "private"))
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            self._json(200, {"url": f"{hub.url}/{prefix}{repo_id}", "name": repo_id, "id": repo_id})

        def _api(self, repo_type: str, repo_id: str, what: str | None, rest: str, query):
            repo = self._repo(repo_type, repo_id)
            if what in (None, "revision"):
                commit = self._commit(repo, rest or "main")
                return self._json(
                    200,
                    {
                        "id": repo_id,
                        "sha": commit.sha,
                        "private": repo.private,
                        "siblings": [{"rfilename": p} for p in sorted(commit.files)],
                    },
                )
            if what == "tree":
                revision, _, sub = rest.partition("/")
                return self._tree(repo, self._commit(repo, revision), sub.strip("/"), query)
            if what == "paths-info":
                commit = self._commit(repo, rest)
                paths = parse_qs(self._body().decode()).get("paths", [])
                return self._json(200, [self._item(p, commit.files[p]) for p in paths if p in commit.files])
            body = self._body()
            self._require_write()
            if what == "preupload":
                commit = self._commit(repo, rest)
                return self._preupload(commit, json.loads(body))
            return self._commit_post(repo, repo_id, repo_type, rest, body, create_pr="create_pr" in query)

        @staticmethod
        def _item(path: str, entry: Entry) -> dict:
            item = {"type": "file", "path": path, "size": entry.size, "oid": entry.oid}
            if entry.lfs_oid is not None:
                item["lfs"] = {"oid": entry.lfs_oid, "size": entry.size, "pointerSize": 134}
            return item

        def _tree(self, repo: Repo, commit: Commit, prefix: str, query):
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            items, folders = [], set()
            for path, entry in sorted(commit.files.items()):
                if prefix and not path.startswith(prefix + "/"):
                    continue
                rest = path[len(prefix) + 1 :] if prefix else path
                parts = rest.split("/")
                for depth in range(1, len(parts)):
                    if recursive or depth == 1:
                        folders.add("/".join(([prefix] if prefix else []) + parts[:depth]))
                if len(parts) > 1 and not recursive:
                    continue
                items.append(self._item(path, entry))
            if prefix and not items and not folders:
                raise _Reply(404, "Entry not found", "EntryNotFound")
            items += [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in sorted(folders)]
            self._json(200, items)

        def _preupload(self, commit: Commit, body: dict):
            files = []
            for f in body["files"]:
                sample = base64.b64decode(f["sample"])
                mode = "lfs" if _wants_lfs(f["path"], sample, f["size"]) else "regular"
                entry = commit.files.get(f["path"])
                oid = None
                if entry is not None:
                    oid = entry.lfs_oid if mode == "lfs" else (entry.oid if entry.lfs_oid is None else None)
                files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
            self._json(200, {"files": files, "commitOid": commit.sha})

        def _lfs_batch(self, repo_type: str, repo_id: str, body: dict):
            self._repo(repo_type, repo_id)
            self._require_write()
            objects = []
            for obj in body["objects"]:
                if obj["oid"] in hub.objects:
                    objects.append({"oid": obj["oid"], "size": obj["size"]})
                    continue
                href = f"{hub.url}/lfs/{obj['oid']}"
                actions = {"upload": {"href": href, "header": {}}, "verify": {"href": href + "/verify"}}
                objects.append({"oid": obj["oid"], "size": obj["size"], "authenticated": True, "actions": actions})
            body = json.dumps({"transfer": "basic", "objects": objects}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.git-lfs+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _lfs_put(self, oid: str):
            length = int(self.headers.get("Content-Length") or 0)
            digest, data, left = hashlib.sha256(), bytearray(), length
            while left:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
                with hub.lock:
                    hub.received += len(chunk)
                    cut = hub.fail_put_after is not None and hub.received > hub.fail_put_after
                if cut:  # the network fails: drop the connection without a reply
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                digest.update(chunk)
                data += chunk
            if digest.hexdigest() != oid:
                raise _Reply(400, "object does not match its oid")
            hub.objects[oid] = bytes(data)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _lfs_verify(self, oid: str):
            body = json.loads(self._body())
            if oid not in hub.objects or len(hub.objects[oid]) != body.get("size"):
                raise _Reply(404, "object not found")
            self._json(200, {"success": True})

        def _commit_post(self, repo: Repo, repo_id: str, repo_type: str, revision: str, body: bytes, *, create_pr: bool):
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = lines[0]["value"] if lines and lines[0]["key"] == "header" else {}
            with hub.lock:
                base = self._commit(repo, revision)
                parent = header.get("parentCommit")
                if parent and not create_pr and parent != base.sha:
                    raise _Reply(412, f"A commit has happened since. Please refresh and try again ({parent} is not the head)")
                if parent and create_pr:
                    base = repo.commits.get(parent) or base
                files = dict(base.files)
                for line in lines[1:]:
                    key, value = line["key"], line["value"]
                    path = value["path"]
                    if key == "file":
                        data = base64.b64decode(value["content"])
                        files[path] = Entry(len(data), data=data)
                    elif key == "lfsFile":
                        stored = hub.objects.get(value["oid"])
                        if stored is None:
                            raise _Reply(422, f"LFS object {value['oid']} of {path} was never uploaded")
                        files[path] = Entry(len(stored), lfs_oid=value["oid"])
                    elif key == "deletedFile":
                        if path not in files:
                            raise _Reply(404, "A file with this name doesn't exist", "EntryNotFound")
                        del files[path]
                    elif key == "deletedFolder":
                        files = {p: e for p, e in files.items() if not p.startswith(path.rstrip("/") + "/")}
                    else:
                        raise _Reply(400, f"unknown commit line {key!r}")
                commit = Commit(hub._sha(), base.sha, files, header.get("summary", ""))
                repo.commits[commit.sha] = commit
                prefix = "" if repo_type == "model" else f"{repo_type}s/"
                reply = {"commitOid": commit.sha, "commitUrl": f"{hub.url}/{prefix}{repo_id}/commit/{commit.sha}"}
                if create_pr:
                    repo.prs += 1
                    repo.refs[f"refs/pr/{repo.prs}"] = commit.sha
                    reply["pullRequestUrl"] = f"{hub.url}/{prefix}{repo_id}/discussions/{repo.prs}"
                else:
                    ref = revision if revision in repo.refs else None
                    if ref is None:
                        raise _Reply(400, f"cannot commit to {revision!r}: not a branch")
                    repo.refs[ref] = commit.sha
                hub.commits.append({"repo": repo_id, "revision": revision, "create_pr": create_pr, "operations": lines[1:]})
            self._json(200, reply)

        def _resolve(self, repo_type: str, repo_id: str, rest: str):
            repo = self._repo(repo_type, repo_id)
            # The revision is one quoted path segment (refs%2Fpr%2F1) followed by the file path.
            revision, _, name = rest.partition("/")
            commit = self._commit(repo, unquote(revision))
            entry = commit.files.get(unquote(name))
            if entry is None:
                raise _Reply(404, "Entry not found", "EntryNotFound")
            data = entry.data if entry.lfs_oid is None else hub.objects[entry.lfs_oid]
            start, stop, status = 0, len(data), 200
            spec = self.headers.get("Range")
            if spec and (m := re.match(r"bytes=(\d+)-(\d*)$", spec)):
                start, stop, status = int(m[1]), min(len(data), int(m[2]) + 1) if m[2] else len(data), 206
            self.send_response(status)
            self.send_header("X-Repo-Commit", commit.sha)
            self.send_header("ETag", f'"{entry.oid}"')
            if entry.lfs_oid is not None:
                self.send_header("X-Linked-Etag", f'"{entry.lfs_oid}"')
                self.send_header("X-Linked-Size", str(entry.size))
            self.send_header("Content-Length", str(stop - start))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data[start:stop])

    return Handler


def resolve_url(base: str, repo_id: str, revision: str, path: str) -> str:
    return f"{base}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"
