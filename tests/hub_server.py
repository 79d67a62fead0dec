"""A protocol double of the Hugging Face Hub, for tests: NOT the real Hub.

It speaks just enough of the Hub's HTTP protocol for the stock
`huggingface_hub` client (2.4.0, with HF_HUB_DISABLE_XET=1) to create a repo,
upload a folder in one commit (regular files inline, LFS files through the
batch API), and download it again with `snapshot_download`. Everything else
answers 404. Only the standard library is used; the server runs on
127.0.0.1 on an ephemeral port, in a thread (see `running_hub`).

What it enforces, because these are the properties the publish client relies on:
- a bearer token on every write and on whoami (a wrong or missing one: 401,
  and nothing changes); a wrong token is rejected on reads too, like the Hub;
- file contents are stored by sha256 (content-addressed blob store);
- a commit is atomic: every operation is checked before the branch moves, so
  all the files of a commit land or none do; each commit gets a new oid and
  keeps its parent (history per repo);
- private repos are invisible (404 RepoNotFound) without a valid token.

Routes (model repos only; `{repo}` is `namespace/name`):
    GET  /api/whoami-v2
    POST /api/repos/create
    POST /api/validate-yaml                      (called for README.md)
    GET  /api/models/{repo}[/revision/{rev}]     (repo info; `blobs=True` adds file metadata)
    GET  /api/models/{repo}/tree/{rev}[/{path}]  (`recursive`, `expand`)
    GET  /api/models/{repo}/commits/{rev}
    GET  /api/models/{repo}/refs
    POST /api/models/{repo}/branch/{branch}
    POST /api/models/{repo}/preupload/{rev}
    POST /api/models/{repo}/commit/{rev}         (NDJSON: header, file, lfsFile, deletedFile)
    POST /{repo}.git/info/lfs/objects/batch
    PUT  /_lfs/upload/{ticket}                   (capability URL: the client sends no auth here)
    POST /{repo}.git/info/lfs/objects/verify
    GET|HEAD /{repo}/resolve/{rev}/{path}
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import parse_qs, unquote, urlsplit

# Files the double stores through LFS, like the Hub's default .gitattributes.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.onnx", "*.h5", "*.msgpack")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub sends files from 10 MB on through LFS
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
COMMIT_OID = re.compile(r"^[0-9a-f]{40}$")


class HubError(Exception):
    """An HTTP error answer, with the X-Error-Code the client maps to an exception class."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True)
class Entry:
    """One file in a commit's tree: its content is found in the blob store by sha256."""

    sha256: str
    size: int
    lfs: bool
    blob_id: str  # git oid: of the content (regular) or of the LFS pointer


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    author: str
    tree: dict[str, Entry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_objects: set[str] = field(default_factory=set)  # sha256 uploaded to this repo's LFS store


class HubState:
    """Repos, commits and the content-addressed blob store; one lock guards it all."""

    def __init__(self, tokens: dict[str, dict]):
        self.tokens = tokens  # token -> {"user": ..., "orgs": [...], "role": "write" | "read"}
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.upload_tickets: dict[str, tuple[str, str, int]] = {}  # ticket -> (repo_id, sha256, size)
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for tests

    # -- blobs and commits ------------------------------------------------

    def put_blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.blobs.setdefault(digest, data)
        return digest

    def entry_for(self, data: bytes, lfs: bool) -> Entry:
        digest = self.put_blob(data)
        blob_id = git_blob_id(lfs_pointer(digest, len(data)) if lfs else data)
        return Entry(sha256=digest, size=len(data), lfs=lfs, blob_id=blob_id)

    def add_commit(self, repo: Repo, branch: str, tree: dict[str, Entry], title: str, message: str, author: str) -> Commit:
        parent = repo.branches.get(branch)
        seed = json.dumps([repo.repo_id, parent, sorted((p, e.blob_id) for p, e in tree.items()), title, len(repo.commits)])
        commit = Commit(
            oid=hashlib.sha1(seed.encode() + secrets.token_bytes(8)).hexdigest(),
            parent=parent,
            title=title,
            message=message,
            date=_now(),
            author=author,
            tree=tree,
        )
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def resolve(self, repo: Repo, revision: str) -> Commit:
        """A branch name or a full commit oid of this repo."""
        oid = repo.branches.get(revision)
        if oid is None and COMMIT_OID.match(revision) and revision in repo.commits:
            oid = revision
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    def history(self, repo: Repo, revision: str) -> list[Commit]:
        commit, out = self.resolve(repo, revision), []
        while commit is not None:
            out.append(commit)
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return out


def is_lfs_path(path: str, size: int, sample: bytes) -> bool:
    """How the double answers preupload: LFS for weight patterns, big files and binary samples."""
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS) or size >= LFS_SIZE_THRESHOLD or b"\0" in sample


class HubHandler(BaseHTTPRequestHandler):
    """Routes one request; every answer has a JSON body (the client calls .json() even on errors)."""

    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer sets Content-Length
    timeout = 10  # an idle keep-alive connection does not hold a thread forever
    state: HubState  # set on the subclass made by `running_hub`

    def log_message(self, format, *args):  # noqa: A002 - quiet: pytest shows failures, not access logs
        pass

    # -- plumbing -----------------------------------------------------------

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def read_body(self) -> bytes:
        """The whole request body, by Content-Length or chunked (httpx may stream a file object)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send(self, status: int, body: object = None, headers: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        headers = headers or {}
        if "Content-Type" not in headers:
            self.send_header("Content-Type", "application/json")
        for key, value in headers.items():
            if key != "Content-Length":
                self.send_header(key, str(value))
        # HEAD answers carry the file's length without its body.
        self.send_header("Content-Length", str(headers.get("Content-Length", len(data))))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def dispatch(self) -> None:
        body = self.read_body()  # always drained, so an early 401 does not break the connection
        with self.state.lock:
            self.state.requests.append((self.command, self.path))
        parts = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.raw_segments = parts.path.strip("/").split("/")
        try:
            route(self, body)
        except HubError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            self.send(err.status, {"error": err.message}, headers)

    do_GET = do_POST = do_PUT = do_HEAD = dispatch

    # -- auth ---------------------------------------------------------------

    def user(self) -> dict | None:
        """The token's identity; None when no token was sent; 401 for a wrong one."""
        header = self.headers.get("Authorization", "")
        if not header:
            return None
        token = header[len("Bearer ") :] if header.startswith("Bearer ") else ""
        identity = self.state.tokens.get(token)
        if identity is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return identity

    def writer(self) -> dict:
        identity = self.user()
        if identity is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        if identity.get("role") != "write":
            raise HubError(403, "You don't have write access with a read token")
        return identity

    def repo(self, repo_id: str, *, write: bool = False) -> Repo:
        identity = self.writer() if write else self.user()
        repo = self.state.repos.get(repo_id)
        visible = repo is not None and (not repo.private or (identity and may_write(identity, repo_id)))
        if not visible:
            # Like the Hub: a private repo you may not see does not exist for you.
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and not may_write(identity, repo_id):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo


def may_write(identity: dict, repo_id: str) -> bool:
    return repo_id.split("/")[0] in {identity["user"], *identity.get("orgs", [])}


# -- routing ----------------------------------------------------------------


def route(h: HubHandler, body: bytes) -> None:
    seg, method = h.raw_segments, h.command
    if seg[:2] == ["api", "whoami-v2"] and method == "GET":
        return whoami(h)
    if seg[:3] == ["api", "repos", "create"] and method == "POST":
        return create_repo(h, body)
    if seg[:2] == ["api", "validate-yaml"] and method == "POST":
        h.writer()
        return h.send(200, {"errors": [], "warnings": []})
    if seg[:2] == ["_lfs", "upload"] and method == "PUT" and len(seg) == 3:
        return lfs_put(h, seg[2], body)
    if seg[:2] == ["api", "models"] and len(seg) >= 4:
        return api_model(h, "/".join(seg[2:4]), seg[4:], body)
    if len(seg) >= 2 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"] and method == "POST":
        return lfs_batch(h, f"{seg[0]}/{seg[1][:-4]}", body)
    if len(seg) >= 2 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "verify"] and method == "POST":
        return lfs_verify(h, f"{seg[0]}/{seg[1][:-4]}", body)
    if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
        # The revision is quoted with safe="" (a branch "a/b" is one segment), the path keeps its slashes.
        return resolve_file(h, f"{seg[0]}/{seg[1]}", unquote(seg[3]), unquote("/".join(seg[4:])))
    raise HubError(404, f"No route for {method} {urlsplit(h.path).path} in the Hub protocol double")


def api_model(h: HubHandler, repo_id: str, rest: list[str], body: bytes) -> None:
    method = h.command
    if not rest and method == "GET":
        return repo_info(h, repo_id, "main")
    if len(rest) == 2 and rest[0] == "revision" and method == "GET":
        return repo_info(h, repo_id, unquote(rest[1]))
    if len(rest) >= 2 and rest[0] == "tree" and method == "GET":
        return tree(h, repo_id, unquote(rest[1]), unquote("/".join(rest[2:])))
    if len(rest) == 2 and rest[0] == "commits" and method == "GET":
        return commits(h, repo_id, unquote(rest[1]))
    if rest == ["refs"] and method == "GET":
        return refs(h, repo_id)
    if len(rest) == 2 and rest[0] == "branch" and method == "POST":
        return create_branch(h, repo_id, unquote(rest[1]), body)
    if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
        return preupload(h, repo_id, unquote(rest[1]), body)
    if len(rest) == 2 and rest[0] == "commit" and method == "POST":
        return commit(h, repo_id, unquote(rest[1]), body)
    raise HubError(404, f"No route for {method} /api/models/{repo_id}/{'/'.join(rest)} in the Hub protocol double")


# -- endpoints --------------------------------------------------------------


def whoami(h: HubHandler) -> None:
    identity = h.user()
    if identity is None:
        raise HubError(401, "Invalid credentials in Authorization header")
    h.send(
        200,
        {
            "type": "user",
            "name": identity["user"],
            "orgs": [{"name": org} for org in identity.get("orgs", [])],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": identity["role"]}},
        },
    )


def create_repo(h: HubHandler, body: bytes) -> None:
    identity = h.writer()
    payload = json.loads(body or b"{}")
    if payload.get("type", "model") != "model":
        raise HubError(400, "The protocol double serves model repos only")
    repo_id = f"{payload.get('organization') or identity['user']}/{payload['name']}"
    if not may_write(identity, repo_id):
        raise HubError(403, f"You don't have the rights to create a model under the namespace {repo_id.split('/')[0]}")
    with h.state.lock:
        if repo_id in h.state.repos:
            # create_repo(exist_ok=True) reads "url" from this 409 body (KeyError without it).
            message = "You already created this model repo"
            return h.send(409, {"error": message, "url": f"{h.base_url}/{repo_id}"}, {"X-Error-Message": message})
        repo = Repo(repo_id=repo_id, private=payload.get("visibility") == "private", created_at=_now())
        # The Hub's first commit holds a .gitattributes; a repo always has a head, so repo_info has a sha.
        h.state.add_commit(
            repo, "main", {".gitattributes": h.state.entry_for(GITATTRIBUTES, lfs=False)}, "initial commit", "", identity["user"]
        )
        h.state.repos[repo_id] = repo
    h.send(200, {"url": f"{h.base_url}/{repo_id}", "name": repo_id, "id": repo_id})


def file_json(path: str, entry: Entry, commit: Commit | None = None) -> dict:
    info = {"type": "file", "oid": entry.blob_id, "size": entry.size, "path": path}
    if entry.lfs:
        info["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": len(lfs_pointer(entry.sha256, entry.size))}
    if commit is not None:
        info["lastCommit"] = {"id": commit.oid, "title": commit.title, "date": commit.date}
    return info


def repo_info(h: HubHandler, repo_id: str, revision: str) -> None:
    with h.state.lock:
        repo = h.repo(repo_id)
        head = h.state.resolve(repo, revision)
        siblings = []
        for path, entry in sorted(head.tree.items()):
            sibling = {"rfilename": path}
            if h.query.get("blobs") in ("True", "true", "1"):
                sibling.update(size=entry.size, blobId=entry.blob_id)
                if entry.lfs:
                    sibling["lfs"] = file_json(path, entry)["lfs"] | {"sha256": entry.sha256}
            siblings.append(sibling)
        info = {
            "_id": repo_id,
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": head.oid,
            "lastModified": head.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "tags": [],
            "siblings": siblings,
        }
    h.send(200, info)


def tree(h: HubHandler, repo_id: str, revision: str, prefix: str) -> None:
    recursive = h.query.get("recursive") in ("True", "true", "1")
    expand = h.query.get("expand") in ("True", "true", "1")
    with h.state.lock:
        repo = h.repo(repo_id)
        head = h.state.resolve(repo, revision)
        history = h.state.history(repo, head.oid) if expand else []
        base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        files, folders = [], {}
        for path, entry in sorted(head.tree.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base) :].split("/")
            for depth in range(1, len(rest)):  # the folders on the way down
                if depth > 1 and not recursive:
                    break
                folder = base + "/".join(rest[:depth])
                folders[folder] = {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder}
            if len(rest) == 1 or recursive:
                files.append(file_json(path, entry, last_commit(history, path) if expand else None))
        if base and not files and not folders:
            raise HubError(404, f"{prefix} does not exist on {revision}", "EntryNotFound")
    h.send(200, list(folders.values()) + files)


def last_commit(history: list[Commit], path: str) -> Commit:
    """The oldest commit in a row of commits, from the head back, that still holds this exact file."""
    found = history[0]
    for commit in history:
        if commit.tree.get(path) != history[0].tree.get(path):
            break
        found = commit
    return found


def commits(h: HubHandler, repo_id: str, revision: str) -> None:
    with h.state.lock:
        repo = h.repo(repo_id)
        items = [
            {"id": c.oid, "title": c.title, "message": c.message, "date": c.date, "authors": [{"user": c.author}]}
            for c in h.state.history(repo, revision)
        ]
    h.send(200, items)


def refs(h: HubHandler, repo_id: str) -> None:
    with h.state.lock:
        repo = h.repo(repo_id)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in sorted(repo.branches.items())]
    h.send(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []})


def create_branch(h: HubHandler, repo_id: str, branch: str, body: bytes) -> None:
    payload = json.loads(body or b"{}")
    with h.state.lock:
        repo = h.repo(repo_id, write=True)
        if branch in repo.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = h.state.resolve(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.oid
    h.send(200, {})


def preupload(h: HubHandler, repo_id: str, revision: str, body: bytes) -> None:
    payload = json.loads(body)
    with h.state.lock:
        repo = h.repo(repo_id, write=True)
        head = h.state.resolve(repo, revision)
        files = []
        for item in payload["files"]:
            lfs = is_lfs_path(item["path"], int(item["size"]), base64.b64decode(item.get("sample", "")))
            remote = head.tree.get(item["path"])
            # The client compares this oid with its own (sha256 for LFS, git sha1 for regular) to skip no-ops.
            oid = None if remote is None else (remote.sha256 if remote.lfs else remote.blob_id)
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
    h.send(200, {"files": files, "commitOid": head.oid})


def lfs_batch(h: HubHandler, repo_id: str, body: bytes) -> None:
    payload = json.loads(body)
    if payload.get("operation") != "upload":
        raise HubError(400, "The protocol double only accepts LFS uploads")
    with h.state.lock:
        repo = h.repo(repo_id, write=True)
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            if oid in repo.lfs_objects:
                objects.append({"oid": oid, "size": size})  # no actions: already stored, the client skips it
                continue
            ticket = secrets.token_urlsafe(16)
            h.state.upload_tickets[ticket] = (repo_id, oid, size)
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        # The client PUTs here without auth (on the Hub it is a signed storage URL): the
                        # one-time ticket in the URL is the capability.
                        "upload": {"href": f"{h.base_url}/_lfs/upload/{ticket}"},
                        "verify": {"href": f"{h.base_url}/{repo_id}.git/info/lfs/objects/verify"},
                    },
                }
            )
    h.send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})


def lfs_put(h: HubHandler, ticket: str, body: bytes) -> None:
    with h.state.lock:
        grant = h.state.upload_tickets.pop(ticket, None)
    if grant is None:
        raise HubError(403, "Unknown or used upload ticket")
    repo_id, oid, size = grant
    if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
        raise HubError(400, f"Uploaded content does not match sha256 {oid} / size {size}")
    with h.state.lock:
        h.state.put_blob(body)
        h.state.repos[repo_id].lfs_objects.add(oid)
    h.send(200, {}, {"ETag": f'"{oid}"'})


def lfs_verify(h: HubHandler, repo_id: str, body: bytes) -> None:
    payload = json.loads(body)
    with h.state.lock:
        repo = h.repo(repo_id, write=True)
        stored = h.state.blobs.get(payload["oid"])
        if payload["oid"] not in repo.lfs_objects or stored is None or len(stored) != int(payload["size"]):
            raise HubError(404, f"LFS object {payload['oid']} was not uploaded")
    h.send(200, {})


def parse_commit(body: bytes) -> tuple[dict, list[dict]]:
    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    if not lines or lines[0].get("key") != "header":
        raise HubError(400, "A commit starts with a header line")
    return lines[0]["value"], lines[1:]


def commit(h: HubHandler, repo_id: str, revision: str, body: bytes) -> None:
    """Check every operation first, then move the branch once: all files land or none."""
    identity = h.writer()
    if h.query.get("create_pr"):
        raise HubError(400, "Pull requests are not supported by the protocol double")
    header, operations = parse_commit(body)
    with h.state.lock:
        repo = h.repo(repo_id, write=True)
        if revision not in repo.branches:
            raise HubError(404, f"Branch {revision} does not exist (commits go to a branch)", "RevisionNotFound")
        head = h.state.resolve(repo, revision)
        if header.get("parentCommit") and header["parentCommit"] != head.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        new_tree = dict(head.tree)
        staged: list[bytes] = []
        for op in operations:
            key, value = op.get("key"), op.get("value", {})
            path = value.get("path", "")
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise HubError(400, f"Invalid path {path!r}")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "Inline files must be base64")
                data = base64.b64decode(value["content"], validate=True)
                staged.append(data)
                new_tree[path] = Entry(hashlib.sha256(data).hexdigest(), len(data), False, git_blob_id(data))
            elif key == "lfsFile":
                oid = value.get("oid", "")
                stored = h.state.blobs.get(oid)
                if oid not in repo.lfs_objects or stored is None:
                    raise HubError(422, f"LFS pointer for {path} points to an object that was not uploaded")
                if "size" in value and int(value["size"]) != len(stored):
                    raise HubError(422, f"LFS size mismatch for {path}")
                new_tree[path] = Entry(oid, len(stored), True, git_blob_id(lfs_pointer(oid, len(stored))))
            elif key == "deletedFile":
                if new_tree.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for name in [n for n in new_tree if n.startswith(prefix)]:
                    del new_tree[name]
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        # Everything checked: store the inline blobs and move the branch in one step.
        for data in staged:
            h.state.put_blob(data)
        title = header.get("summary") or "Upload"
        new = h.state.add_commit(repo, revision, new_tree, title, header.get("description", ""), identity["user"])
    h.send(200, {"success": True, "commitOid": new.oid, "commitUrl": f"{h.base_url}/{repo_id}/commit/{new.oid}"})


def resolve_file(h: HubHandler, repo_id: str, revision: str, path: str) -> None:
    with h.state.lock:
        repo = h.repo(repo_id)
        head = h.state.resolve(repo, revision)
        entry = head.tree.get(path)
        if entry is None:
            # X-Repo-Commit lets the client cache "this file does not exist at this commit".
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": head.oid})
        data = h.state.blobs[entry.sha256]
    headers = {
        "Content-Type": "application/octet-stream",
        "X-Repo-Commit": head.oid,
        "ETag": f'"{entry.blob_id}"',
        "Content-Length": entry.size,
        "Accept-Ranges": "none",
    }
    if entry.lfs:
        # The client prefers these over ETag/Content-Length: the cache blob is named by the LFS sha256.
        headers["X-Linked-Etag"] = f'"{entry.sha256}"'
        headers["X-Linked-Size"] = entry.size
    h.send(200, raw=data, headers=headers)


# -- running it -------------------------------------------------------------


@dataclass
class RunningHub:
    endpoint: str
    state: HubState


@contextmanager
def running_hub(tokens: dict[str, dict]) -> Iterator[RunningHub]:
    """Serve a fresh, empty Hub double on 127.0.0.1 (ephemeral port) in a thread, for the `with` block."""
    state = HubState(tokens)
    handler = type("BoundHubHandler", (HubHandler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="hub-double", daemon=True)
    thread.start()
    try:
        yield RunningHub(endpoint=f"http://127.0.0.1:{server.server_address[1]}", state=state)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
