"""A fake Hugging Face Hub for tests: stdlib only, in memory, served over HTTP on 127.0.0.1.

It speaks enough of the Hub protocol for the real `huggingface_hub` client (create_repo, upload_folder with regular
and LFS files, repo_info, list_repo_tree, snapshot_download, hf_hub_download, whoami):

    POST /api/repos/create                                   409 + {"url"} when the repo exists
    POST /api/validate-yaml                                  always valid
    GET  /api/whoami-v2
    POST /api/{type}s/{ns}/{name}/preupload/{rev}            "lfs" for binary/large files, "regular" otherwise
    POST /api/{type}s/{ns}/{name}/commit/{rev}               NDJSON: header, file (base64), lfsFile, deletedFile,
                                                             deletedFolder; ?create_pr=1 opens refs/pr/N
    POST /{prefix}{ns}/{name}.git/info/lfs/objects/batch     LFS "basic" transfer: upload + verify actions
    PUT  /__lfs/{sha256}                                     the upload target (content checked against the oid)
    POST /__lfs/verify
    GET  /api/{type}s/{ns}/{name}[/revision/{rev}]           repo info: sha, siblings (with sizes when ?blobs=1)
    GET  /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]        ?recursive=1; lfs info; 404 EntryNotFound
    HEAD/GET /{prefix}{ns}/{name}/resolve/{rev}/{path}        X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size,
                                                             Range requests

Tokens map to users (`tokens={"hf_fake": "tester"}`); a request carrying an unknown token gets 401 ("Invalid
credentials in Authorization header"), writes need a token whose user owns the namespace, and private repos are
invisible (404 RepoNotFound) to everybody else. Every request is recorded in `hub.requests` as `(method, path)`.

Use with `HF_HUB_DISABLE_XET` set (huggingface_hub 2.x otherwise uploads LFS files through Xet); see the
`fake_hub` fixture in `conftest.py`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit


REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".parquet",
    ".arrow",
    ".npy",
    ".npz",
    ".pt",
    ".pth",
    ".onnx",
    ".msgpack",
    ".h5",
)
LFS_THRESHOLD = 10 * 2**20
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()
INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob holding `data`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass
class Entry:
    """A file in a commit: regular (`content`) or LFS (`lfs_oid`, content in `FakeHub.lfs_objects`)."""

    size: int
    blob_oid: str
    content: bytes | None = None
    lfs_oid: str | None = None


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, Entry]
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    num_prs: int = 0


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, header_message: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.header_message = status, message, code, header_message


class FakeHub:
    r"""
    An in-memory Hub server.

    Args:
        tokens (`dict[str, str]`, *optional*): Token -> user name; defaults to `{"hf_fake": "tester"}`.
        orgs (`dict[str, list[str]]`, *optional*): User -> organisations the user may write to.
        lfs (`bool`, *optional*, defaults to `True`): Answer "lfs" for binary or large files in preupload.
    """

    def __init__(
        self, tokens: dict[str, str] | None = None, orgs: dict[str, list[str]] | None = None, lfs: bool = True
    ):
        self.tokens = dict(tokens or {"hf_fake": "tester"})
        self.orgs = {user: list(names) for user, names in (orgs or {}).items()}
        self.lfs = lfs
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # ------------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakehub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------------ test helpers

    def repo(self, repo_id: str, repo_type: str = "dataset") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def history(self, repo_id: str, repo_type: str = "dataset", ref: str = "main") -> list[Commit]:
        """Commits reachable from `ref`, newest first."""
        repo = self.repo(repo_id, repo_type)
        out, oid = [], repo.refs[ref]
        while oid is not None:
            commit = repo.commits[oid]
            out.append(commit)
            oid = commit.parent
        return out

    def file_bytes(self, repo_id: str, path: str, repo_type: str = "dataset", ref: str = "main") -> bytes:
        repo = self.repo(repo_id, repo_type)
        entry = repo.commits[repo.refs[ref]].files[path]
        return entry.content if entry.lfs_oid is None else self.lfs_objects[entry.lfs_oid]

    def count(self, method: str, pattern: str) -> int:
        """Number of recorded requests with this method whose path matches the regex `pattern`."""
        regex = re.compile(pattern)
        with self.lock:
            return sum(1 for m, path in self.requests if m == method and regex.search(path))

    # ------------------------------------------------------------------------------------------------ model

    def user_of(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        token = authorization.split(" ", 1)[1] if authorization.lower().startswith("bearer ") else authorization
        user = self.tokens.get(token.strip())
        if user is None:
            raise HubError(401, "Invalid username or password.", header_message=INVALID_TOKEN_MESSAGE)
        return user

    def can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (namespace == user or namespace in self.orgs.get(user, []))

    def get_repo(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self.can_write(user, repo_id.split("/")[0])):
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    def writable_repo(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self.get_repo(repo_type, repo_id, user)
        if user is None:
            raise HubError(401, "You must be authenticated to write.")
        if not self.can_write(user, repo_id.split("/")[0]):
            raise HubError(403, f"You don't have the rights to write to {repo_id}.", header_message="Forbidden")
        return repo

    @staticmethod
    def resolve(repo: Repo, revision: str) -> Commit:
        oid = repo.refs.get(revision)
        if oid is None and revision in repo.commits:
            oid = revision
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return repo.commits[oid]

    def repo_url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    def new_commit(self, repo: Repo, parent: Commit | None, message: str, files: dict[str, Entry]) -> Commit:
        digest = hashlib.sha1()
        digest.update(f"{parent.oid if parent else ''}\n{message}\n{time.time_ns()}\n{len(repo.commits)}".encode())
        for path in sorted(files):
            digest.update(f"{path}:{files[path].blob_oid}\n".encode())
        commit = Commit(
            oid=digest.hexdigest(),
            parent=parent.oid if parent else None,
            message=message,
            files=files,
            date=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        )
        repo.commits[commit.oid] = commit
        return commit

    def is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        return self.lfs and (path.endswith(LFS_SUFFIXES) or size > LFS_THRESHOLD or b"\0" in sample)


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def log_message(self, format, *args):  # silence the default stderr log
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # ------------------------------------------------------------------------------------------------ plumbing

    def _body(self) -> bytes:
        """The request body (read once, then cached; chunked transfer encoding supported)."""
        if getattr(self, "_cached_body", None) is None:
            self._cached_body = self._read_body()
        return self._cached_body

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> dict:
        try:
            return json.loads(self._body() or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, method: str = "GET"):
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, status: int, payload, headers: dict[str, str] | None = None, method: str = "GET"):
        self._send(status, json.dumps(payload).encode(), headers, method)

    def _dispatch(self, method: str):
        hub = self.hub
        raw_path = urlsplit(self.path).path
        query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        with hub.lock:
            hub.requests.append((method, raw_path))
        self._cached_body = None
        try:
            user = hub.user_of(self.headers.get("Authorization"))
            segments = [unquote(s) for s in raw_path.strip("/").split("/")]
            self._route(method, segments, raw_path, query, user)
        except HubError as err:
            headers = {}
            if err.code:
                headers["X-Error-Code"] = err.code
            if err.header_message:
                headers["X-Error-Message"] = err.header_message
            if method in ("POST", "PUT"):
                self._body()  # drain (no-op when already read), so the connection can be reused
            self._send_json(err.status, {"error": err.message}, headers, method)

    def _route(self, method: str, seg: list[str], raw_path: str, query: dict, user: str | None):
        hub = self.hub
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if method == "POST" and rest == ["repos", "create"]:
                return self._create_repo(user)
            if method == "POST" and rest == ["validate-yaml"]:
                self._body()
                return self._send_json(200, {"errors": [], "warnings": []})
            if method == "GET" and rest == ["whoami-v2"]:
                if user is None:
                    raise HubError(401, "Invalid username or password.", header_message=INVALID_TOKEN_MESSAGE)
                orgs = [{"name": o, "type": "org"} for o in hub.orgs.get(user, [])]
                return self._send_json(
                    200,
                    {
                        "type": "user",
                        "name": user,
                        "fullname": user,
                        "orgs": orgs,
                        "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}},
                    },
                )
            if len(rest) >= 3 and rest[0] in REPO_TYPES:
                repo_type, repo_id, tail = REPO_TYPES[rest[0]], f"{rest[1]}/{rest[2]}", rest[3:]
                if method == "POST" and len(tail) == 2 and tail[0] == "preupload":
                    return self._preupload(repo_type, repo_id, tail[1], user)
                if method == "POST" and len(tail) == 2 and tail[0] == "commit":
                    return self._commit(repo_type, repo_id, tail[1], query, user)
                if method == "GET" and tail[:1] == ["tree"] and len(tail) >= 2:
                    return self._tree(repo_type, repo_id, tail[1], "/".join(tail[2:]), query, user)
                if method == "GET" and (not tail or (tail[0] == "revision" and len(tail) == 2)):
                    return self._info(repo_type, repo_id, tail[1] if tail else "main", query, user)
            raise HubError(404, f"Not found: {raw_path}")
        if seg[:1] == ["__lfs"]:
            if method == "PUT" and len(seg) == 2:
                return self._lfs_put(seg[1])
            if method == "POST" and seg[1:] == ["verify"]:
                payload = self._json_body()
                with hub.lock:
                    data = hub.lfs_objects.get(payload.get("oid"))
                if data is None or len(data) != payload.get("size"):
                    raise HubError(404, "LFS object not found")
                return self._send_json(200, {"success": True})
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
        if (
            method == "POST"
            and len(seg) == 6
            and seg[1].endswith(".git")
            and seg[2:] == ["info", "lfs", "objects", "batch"]
        ):
            return self._lfs_batch(repo_type, f"{seg[0]}/{seg[1][:-4]}", user)
        if method in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
            return self._resolve(method, repo_type, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]), user)
        raise HubError(404, f"Not found: {raw_path}")

    # ------------------------------------------------------------------------------------------------ routes

    def _create_repo(self, user: str | None):
        hub = self.hub
        payload = self._json_body()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo.")
        name, namespace = payload.get("name"), payload.get("organization") or user
        repo_type = payload.get("type") or "model"
        if not name or repo_type not in URL_PREFIXES:
            raise HubError(400, "Invalid repo name or type.")
        if not hub.can_write(user, namespace):
            raise HubError(
                403, f"You don't have the rights to create a repo under {namespace}.", header_message="Forbidden"
            )
        repo_id = f"{namespace}/{name}"
        private = payload.get("private", payload.get("visibility") == "private") or False
        with hub.lock:
            repo = hub.repos.get((repo_type, repo_id))
            if repo is not None:
                return self._send_json(
                    409, {"error": f"You already created this {repo_type} repo", "url": hub.repo_url(repo)}
                )
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=bool(private))
            entry = Entry(size=len(GITATTRIBUTES), blob_oid=git_blob_oid(GITATTRIBUTES), content=GITATTRIBUTES)
            commit = hub.new_commit(repo, None, "initial commit", {".gitattributes": entry})
            repo.refs["main"] = commit.oid
            hub.repos[(repo_type, repo_id)] = repo
        return self._send_json(200, {"url": hub.repo_url(repo), "name": repo_id, "id": repo_id})

    def _preupload(self, repo_type: str, repo_id: str, revision: str, user: str | None):
        hub = self.hub
        payload = self._json_body()
        with hub.lock:
            repo = hub.writable_repo(repo_type, repo_id, user)
            files = hub.resolve(repo, revision).files if revision in repo.refs or revision in repo.commits else {}
            out = []
            for item in payload.get("files", []):
                sample = base64.b64decode(item.get("sample", ""))
                mode = "lfs" if hub.is_lfs(item["path"], int(item.get("size", 0)), sample) else "regular"
                existing = files.get(item["path"])
                oid = None
                if existing is not None:
                    oid = existing.lfs_oid if existing.lfs_oid is not None else existing.blob_oid
                out.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return self._send_json(200, {"files": out, "commitOid": None})

    def _lfs_batch(self, repo_type: str, repo_id: str, user: str | None):
        hub = self.hub
        payload = self._json_body()
        with hub.lock:
            hub.writable_repo(repo_type, repo_id, user)
            objects = []
            for obj in payload.get("objects", []):
                oid, size = obj["oid"], int(obj["size"])
                item = {"oid": oid, "size": size, "authenticated": True}
                if oid not in hub.lfs_objects:
                    item["actions"] = {
                        "upload": {"href": f"{hub.endpoint}/__lfs/{oid}", "header": {}},
                        "verify": {"href": f"{hub.endpoint}/__lfs/verify", "header": {}},
                    }
                objects.append(item)
        return self._send_json(
            200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}
        )

    def _lfs_put(self, oid: str):
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match its sha256 oid.")
        with self.hub.lock:
            self.hub.lfs_objects[oid] = data
        return self._send(200, b"", {"ETag": f'"{oid}"'})

    def _commit(self, repo_type: str, repo_id: str, revision: str, query: dict, user: str | None):
        hub = self.hub
        body = self._body()
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line.")
        header = lines[0]["value"]
        with hub.lock:
            repo = hub.writable_repo(repo_type, repo_id, user)
            parent = hub.resolve(repo, revision)
            if header.get("parentCommit") and header["parentCommit"] != parent.oid:
                raise HubError(412, "A commit has happened since the parent commit.")
            files = dict(parent.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    content = base64.b64decode(value["content"])
                    files[path] = Entry(size=len(content), blob_oid=git_blob_oid(content), content=content)
                elif key == "lfsFile":
                    oid, size = value["oid"], int(value["size"])
                    data = hub.lfs_objects.get(oid)
                    if data is None or len(data) != size:
                        raise HubError(422, f"LFS object {oid} of {path} was not uploaded.")
                    files[path] = Entry(size=size, blob_oid=git_blob_oid(lfs_pointer(oid, size)), lfs_oid=oid)
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, "A file with this name doesn't exist", code="EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}.")
            commit = hub.new_commit(repo, parent, header.get("summary", ""), files)
            pr_url = None
            if query.get("create_pr") in ("1", "true", "True"):
                repo.num_prs += 1
                repo.refs[f"refs/pr/{repo.num_prs}"] = commit.oid
                pr_url = f"{hub.repo_url(repo)}/discussions/{repo.num_prs}"
            elif revision in repo.refs:
                repo.refs[revision] = commit.oid
            else:
                raise HubError(400, f"Cannot commit to {revision!r}: not a branch.")
        return self._send_json(
            200,
            {
                "commitUrl": f"{hub.repo_url(repo)}/commit/{commit.oid}",
                "commitOid": commit.oid,
                "commitMessage": commit.message,
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            },
        )

    @staticmethod
    def _entry_json(path: str, entry: Entry) -> dict:
        data = {"type": "file", "oid": entry.blob_oid, "size": entry.size, "path": path}
        if entry.lfs_oid is not None:
            pointer = lfs_pointer(entry.lfs_oid, entry.size)
            data["lfs"] = {"oid": entry.lfs_oid, "size": entry.size, "pointerSize": len(pointer)}
        return data

    def _info(self, repo_type: str, repo_id: str, revision: str, query: dict, user: str | None):
        hub = self.hub
        with hub.lock:
            repo = hub.get_repo(repo_type, repo_id, user)
            commit = hub.resolve(repo, revision)
            blobs = query.get("blobs") in ("1", "true", "True")
            siblings = []
            for path in sorted(commit.files):
                sibling = {"rfilename": path}
                if blobs:
                    entry = commit.files[path]
                    sibling.update(size=entry.size, blobId=entry.blob_oid)
                    if entry.lfs_oid is not None:
                        pointer = lfs_pointer(entry.lfs_oid, entry.size)
                        sibling["lfs"] = {"sha256": entry.lfs_oid, "size": entry.size, "pointerSize": len(pointer)}
                siblings.append(sibling)
            payload = {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": commit.date,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
            if repo_type == "model":
                payload["modelId"] = repo_id
        return self._send_json(200, payload)

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str, query: dict, user: str | None):
        hub = self.hub
        recursive = query.get("recursive") in ("1", "true", "True")
        with hub.lock:
            repo = hub.get_repo(repo_type, repo_id, user)
            commit = hub.resolve(repo, revision)
            prefix = path.strip("/") + "/" if path.strip("/") else ""
            below = {p: e for p, e in commit.files.items() if p.startswith(prefix)}
            if prefix and not below:
                raise HubError(404, f"{path} does not exist on {revision}", code="EntryNotFound")
            entries, folders = [], set()
            for file_path in sorted(below):
                parts = file_path[len(prefix) :].split("/")
                for depth in range(1, len(parts)):
                    if recursive or depth == 1:
                        folders.add(prefix + "/".join(parts[:depth]))
                if recursive or len(parts) == 1:
                    entries.append(self._entry_json(file_path, below[file_path]))
            for folder in sorted(folders):
                oid = hashlib.sha1(f"{commit.oid}:{folder}".encode()).hexdigest()
                entries.append({"type": "directory", "oid": oid, "size": 0, "path": folder})
        return self._send_json(200, entries)

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, path: str, user: str | None):
        hub = self.hub
        with hub.lock:
            repo = hub.get_repo(repo_type, repo_id, user)
            commit = hub.resolve(repo, revision)
            entry = commit.files.get(path)
            if entry is None:
                raise HubError(404, f"Entry not found: {path}", code="EntryNotFound")
            data = entry.content if entry.lfs_oid is None else hub.lfs_objects[entry.lfs_oid]
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{quote(path.rsplit("/", 1)[-1])}"',
        }
        if entry.lfs_oid is not None:
            headers.update({"ETag": f'"{entry.lfs_oid}"', "X-Linked-Etag": f'"{entry.lfs_oid}"'})
            headers["X-Linked-Size"] = str(entry.size)
        else:
            headers["ETag"] = f'"{entry.blob_oid}"'
        status, body = 200, data
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and method == "GET":
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            if start >= len(data) and len(data):
                raise HubError(416, "Requested range not satisfiable")
            body = data[start : end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        return self._send(status, body, headers, method)
