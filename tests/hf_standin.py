"""A local stand-in for the Hugging Face Hub's file API, on loopback, for huggingface_hub's own client.

It serves folders as dataset repos (one folder per revision) and answers just what huggingface_hub 2.4.0
calls for ``HfApi().list_repo_files(...)``, ``hf_hub_download(...)`` and a plain GET of a resolve URL:

- ``GET /api/datasets/ORG/NAME/tree/REV[/PATH]?recursive=&expand=[&cursor=]``: JSON entries
  (``type``, ``oid``, ``size``, ``path``, ``lfs`` for LFS files), paged with a ``Link: <...>; rel="next"`` header
  like the Hub's cursor pagination;
- ``HEAD`` / ``GET /datasets/ORG/NAME/resolve/REV/PATH`` (and ``/ORG/NAME/resolve/...`` for model repos): the file with ``ETag`` (git blob sha1), ``X-Repo-Commit``,
  ``Content-Length``, ``Accept-Ranges`` and Range support (206 + ``Content-Range``, 416); for "LFS" files (``.tar``
  by default) a 302 to a second server, the "CDN", with ``X-Linked-Etag`` (sha256), ``X-Linked-Size`` and a signed
  looking ``Location``, as the Hub redirects to its storage host;
- ``GET /api/datasets/ORG/NAME[/revision/REV]`` (and ``/api/models/...``): the repo's info as ``HfApi().repo_info``
  reads it: ``id``, ``sha`` (the commit the revision names now), ``siblings``;
- ``GET /api/agent-harnesses``: an empty registry (huggingface_hub fetches it once to build its user-agent);
- errors as the Hub sends them: 404 with ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` /
  ``EntryNotFound``, and 401 when a token is configured and the request lacks ``Authorization: Bearer <token>``.

And the write API that ``HfApi().preupload_lfs_files(...)`` and ``HfApi().create_commit(...)`` call on a dataset
repo, over plain LFS (huggingface_hub uploads by Xet instead whenever hf_xet is installed, a choice the client
makes alone: point it here with ``HF_HUB_DISABLE_XET=1``, or its Xet token request lands in ``unknown``):

- ``POST /api/datasets/ORG/NAME/preupload/REV``: ``{"files": [{"path", "sample", "size"}]}`` -> each file's
  ``uploadMode``, "lfs" for the paths served as LFS files (``lfs``, above) and "regular" for the others, with
  ``shouldIgnore`` false and the ``oid`` of the file already at that path, if any (its sha256 for an LFS file,
  its git blob sha1 otherwise), as huggingface_hub compares them to drop unchanged files from a commit;
- ``POST /datasets/ORG/NAME.git/info/lfs/objects/batch`` (the LFS batch API, ``operation: upload``): for each
  object not stored yet a "basic" upload action, a PUT to a signed looking URL on the CDN, and a verify action
  on the Hub; an object already stored gets no actions (huggingface_hub then skips its upload);
- ``PUT /upload/SHA256?X-Amz-Signature=...`` on the CDN, the storage host: stores the body as the LFS object,
  refused (403) without the signature the batch answer gave, and (400) when the body's sha256 or size is not
  the object's. Like S3's presigned URLs it needs no token;
- ``POST /datasets/ORG/NAME.git/info/lfs/objects/verify``: 200 when the object is stored with that size;
- ``POST /api/datasets/ORG/NAME/commit/REV``: NDJSON, a ``header`` line (``summary``, ``description``, an optional
  ``parentCommit``: 412 unless the branch names it), then ``file`` (base64 ``content``), ``lfsFile`` (by ``oid``,
  which must have been uploaded), ``deletedFile`` (404 ``EntryNotFound`` "A file with this name doesn't exist"
  for a missing one) and ``deletedFolder`` lines. The operations apply all together or not at all to a copy of
  the branch's folder, which becomes the branch's new commit by ``move`` (the old one stays readable); the
  answer is what huggingface_hub reads (``commitOid``, ``commitUrl``, ...). Each commit is kept in ``pushes``.

The write endpoints on the Hub need the token as the read ones do. Uploaded objects and commit folders live in
a scratch folder of the stand-in's own, removed when it stops.

The CDN serves content by sha256, accepts Range, needs no token, and ignores its signature. Both servers record
every request (server, method, path, query, whether Authorization was sent, Range, status, the client's port)
in ``log``; the token itself is never recorded.

The Hub URL-encodes a revision as one path segment (``refs%2Fpr%2F1``); so does this server. Commit hashes
are derived from (repo, revision) and are accepted as revisions too; ``move(repo, revision, folder)`` points a
branch at new content under a new commit, and the old commit stays readable, as on the Hub.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Iterable, Mapping
from urllib.parse import parse_qs, quote, unquote, urlsplit

from servers import request_body


@dataclass(frozen=True)
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str  # decoded path, without the query
    query: str
    auth: bool  # an Authorization header was sent
    range: str | None  # the Range header
    status: int
    client_port: int  # one per TCP connection: counts keep-alive reuse


@dataclass(frozen=True)
class Push:
    """One commit made through the commit endpoint."""

    repo: str
    revision: str
    parent: str  # the commit the branch named before
    oid: str  # the new commit
    summary: str
    added: tuple[str, ...]  # paths, in the order the payload gave them ("file" and "lfsFile" lines)
    lfs: tuple[str, ...]  # those of them added by LFS object
    deleted: tuple[str, ...]  # "deletedFile" and "deletedFolder" paths


def commit_of(repo_id: str, revision: str) -> str:
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Refused(Exception):
    """A request the stand-in answers with an error: ``status``, ``X-Error-Code`` (or None), the message."""

    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client hanging up mid-body is no news
            super().handle_error(request, client_address)


class HubStandin:
    """``with HubStandin({"org/ds": {"main": folder, "v1": other}}, token="...") as hub: hub.url ...``

    ``lfs``: which paths are "LFS" files, redirected to the CDN (``cdn=False``: none, all served directly).
    ``page_size``: entries per page of a tree listing (the Hub's is 1000).
    """

    def __init__(self, repos: Mapping[str, Mapping[str, str]], *, token: str | None = None, cdn: bool = True,
                 lfs: tuple[str, ...] = (".tar",), page_size: int = 1000):
        self.repos = {rid: dict(revs) for rid, revs in repos.items()}
        self.scratch = tempfile.mkdtemp(prefix="hf-standin-")  # uploaded LFS objects, commit folders
        self.objects: dict[str, str] = {}  # sha256 -> file: the LFS objects uploaded (a commit names them by oid)
        self.pushes: list[Push] = []
        self._secret = secrets.token_bytes(16)  # signs upload URLs
        self._commit_lock = threading.Lock()  # one commit at a time, each on the branch's newest state
        self.heads: dict[tuple[str, str], str] = {}  # (repo, branch) -> its commit, once moved
        self.commits: dict[tuple[str, str], str] = {}  # (repo, commit) -> folder, for commits moved away from
        self.token, self.cdn_enabled, self.lfs, self.page_size = token, cdn, lfs, page_size
        self.log: list[Request] = []
        self.unknown: list[str] = []  # "METHOD /path" of requests for endpoints the stand-in does not implement
        self._blobs: dict[str, str] = {}  # sha256 -> file, registered when resolve redirects to the CDN
        self._lock = threading.Lock()
        self.hub = _Server(("127.0.0.1", 0), self._handler("hub"))
        self.cdn = _Server(("127.0.0.1", 0), self._handler("cdn"))
        self.url = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"
        self._threads = [threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True)
                         for s in (self.hub, self.cdn)]

    # ------------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "HubStandin":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        for s in (self.hub, self.cdn):
            s.shutdown()
            s.server_close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------- queries
    def requests(self, server: str | None = None, method: str | None = None, prefix: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.log if (server is None or r.server == server)
                    and (method is None or r.method == method) and r.path.startswith(prefix)]

    def clear(self) -> None:
        with self._lock:
            self.log.clear()
            self.unknown.clear()

    # ------------------------------------------------------------------------------------------------ repos
    def head(self, repo_id: str, revision: str) -> str:
        """The commit a branch (or tag) names now."""
        return self.heads.get((repo_id, revision), commit_of(repo_id, revision))

    def move(self, repo_id: str, revision: str, folder: str) -> str:
        """Point a branch at new content (a push); the old commit stays readable. Returns the new commit."""
        with self._lock:
            old = self.head(repo_id, revision)
            self.commits[(repo_id, old)] = self.repos[repo_id][revision]
            self.repos[repo_id][revision] = folder
            self.heads[(repo_id, revision)] = hashlib.sha1(f"{old}+{folder}".encode()).hexdigest()
            return self.heads[(repo_id, revision)]

    def _folder(self, repo_id: str, revision: str) -> tuple[str, str] | None:
        """(folder, commit) of a revision given by name or by commit hash."""
        revs = self.repos[repo_id]
        if revision in revs:
            return revs[revision], self.head(repo_id, revision)
        for name, folder in revs.items():
            if self.head(repo_id, name) == revision:
                return folder, revision
        if (repo_id, revision) in self.commits:
            return self.commits[(repo_id, revision)], revision
        return None

    # -------------------------------------------------------------------------------------------- writing
    def _signature(self, oid: str) -> str:
        return hmac.new(self._secret, oid.encode(), hashlib.sha256).hexdigest()

    def _remote_oid(self, folder: str, path: str) -> str | None:
        """The oid huggingface_hub compares a file to add with: sha256 of an LFS file, else its git blob sha1."""
        file = os.path.join(folder, path)
        if not os.path.isfile(file):
            return None
        with open(file, "rb") as f:
            data = f.read()
        return hashlib.sha256(data).hexdigest() if self._is_lfs(path) else git_blob_sha1(data)

    def _store(self, oid: str, data: bytes) -> None:
        os.makedirs(os.path.join(self.scratch, "lfs"), exist_ok=True)
        path = os.path.join(self.scratch, "lfs", oid)
        tmp = f"{path}.{threading.get_ident()}.tmp"  # two uploads of one object may cross
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        with self._lock:
            self.objects[oid] = path

    def _commit(self, repo_id: str, revision: str, lines: list[dict]) -> Push:
        """Apply a commit's operations to a copy of the branch's folder and point the branch at it; all or none."""
        if not lines or lines[0].get("key") != "header":
            raise _Refused(400, None, "the first line of a commit is its header")
        header = lines[0].get("value") or {}
        with self._commit_lock:
            if revision not in self.repos[repo_id]:
                if self._folder(repo_id, revision) is None:
                    raise _Refused(404, "RevisionNotFound", "Invalid rev id: " + revision)
                raise _Refused(400, None, f"{revision} is not a branch: commits go to a branch")
            parent, old = self.head(repo_id, revision), self.repos[repo_id][revision]
            wanted = header.get("parentCommit")
            if wanted and not parent.startswith(wanted):
                raise _Refused(412, None, "A commit has happened since. Please refresh and try again.")
            folder = tempfile.mkdtemp(prefix="commit-", dir=self.scratch)
            shutil.copytree(old, folder, dirs_exist_ok=True)
            added, lfs, deleted = [], [], []
            try:
                for line in lines[1:]:
                    key, value = line.get("key"), line.get("value") or {}
                    path = value.get("path", "")
                    if not path or path.startswith("/") or ".." in path.split("/") or "" in path.rstrip("/").split("/"):
                        raise _Refused(400, None, f"invalid path {path!r}")
                    file = os.path.join(folder, path)
                    if key in ("file", "lfsFile"):
                        if key == "file":
                            if value.get("encoding") != "base64":
                                raise _Refused(400, None, f"{path}: unknown encoding {value.get('encoding')!r}")
                            data = base64.b64decode(value.get("content", ""), validate=True)
                        else:
                            oid = value.get("oid", "")
                            if value.get("algo", "sha256") != "sha256" or oid not in self.objects:
                                raise _Refused(400, None, f"{path}: LFS object {oid} was never uploaded")
                            with open(self.objects[oid], "rb") as f:
                                data = f.read()
                            if value.get("size") is not None and value["size"] != len(data):
                                raise _Refused(400, None, f"{path}: LFS object {oid} has another size")
                            lfs.append(path)
                        if os.path.isdir(file):
                            raise _Refused(400, None, f"{path} is a folder")
                        os.makedirs(os.path.dirname(file), exist_ok=True)
                        with open(file, "wb") as f:
                            f.write(data)
                        added.append(path)
                    elif key == "deletedFile":
                        if not os.path.isfile(file):
                            raise _Refused(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
                        os.remove(file)
                        deleted.append(path)
                    elif key == "deletedFolder":
                        if not os.path.isdir(file):
                            raise _Refused(404, "EntryNotFound", f"A folder with this name doesn't exist: {path}")
                        shutil.rmtree(file)
                        deleted.append(path)
                    else:
                        raise _Refused(400, None, f"unknown commit operation {key!r}")
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            push = Push(repo_id, revision, parent, self.move(repo_id, revision, folder), str(header.get("summary")),
                        tuple(added), tuple(lfs), tuple(deleted))
            with self._lock:
                self.pushes.append(push)
            return push

    def _is_lfs(self, path: str) -> bool:
        return self.cdn_enabled and path.endswith(self.lfs)

    def _entries(self, folder: str, under: str, recursive: bool) -> Iterable[dict]:
        base = os.path.join(folder, under) if under else folder
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, folder).replace(os.sep, "/")
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            for d in dirnames:
                yield {"type": "directory", "oid": hashlib.sha1(f"tree {rel_dir}{d}".encode()).hexdigest(),
                       "size": 0, "path": rel_dir + d}
            for f in sorted(filenames):
                with open(os.path.join(dirpath, f), "rb") as fh:
                    data = fh.read()
                entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": rel_dir + f}
                if self._is_lfs(rel_dir + f):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                yield entry
            if not recursive:
                break

    # ---------------------------------------------------------------------------------------------- handler
    def _handler(self, server: str) -> type:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

            def log_message(self, *args) -> None:  # quiet
                pass

            def _reply(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> None:
                parts = urlsplit(self.path)
                with hub._lock:
                    hub.log.append(Request(server, self.command, unquote(parts.path), parts.query,
                                           "Authorization" in self.headers, self.headers.get("Range"), status,
                                           self.client_address[1]))
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, status: int, code: str | None, message: str, extra: Mapping[str, str] | None = None):
                headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
                if code:
                    headers["X-Error-Code"] = code
                self._reply(status, json.dumps({"error": message}).encode(), headers)

            def _file(self, file: str, headers: dict[str, str]) -> None:
                """The file, or the byte range asked for (206), with the given headers."""
                with open(file, "rb") as f:
                    data = f.read()
                headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", **headers}
                m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
                if not m or not (m.group(1) or m.group(2)):
                    self._reply(200, data, headers)
                    return
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
                else:  # a suffix: the last N bytes
                    start, end = max(0, len(data) - int(m.group(2))), len(data) - 1
                if start >= len(data) or start > end:
                    self._reply(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
                    return
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                self._reply(206, data[start:end + 1], headers)

            def _authorized(self) -> bool:
                return hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}"

            def _unknown(self) -> None:
                path = urlsplit(self.path).path
                with hub._lock:
                    hub.unknown.append(f"{self.command} {path}")
                self._error(404, None, f"the stand-in does not implement {self.command} {path}")

            def _json(self, body: object, status: int = 200, content_type: str = "application/json") -> None:
                self._reply(status, json.dumps(body).encode(), {"Content-Type": content_type})

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_POST(self) -> None:
                self._write()

            def do_PUT(self) -> None:
                self._write()

            def _write(self) -> None:
                try:
                    body = request_body(self)  # read in full whatever the answer, so that the connection stays usable
                    if server == "cdn":
                        self._upload(body)
                    else:
                        self._hub_write(body)
                except _Refused as e:
                    self._error(e.status, e.code, e.message)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def _upload(self, body: bytes) -> None:
                """PUT of an LFS object to the URL the batch answer gave."""
                parts = urlsplit(self.path)
                m = re.fullmatch(r"/upload/([0-9a-f]{64})", parts.path)
                if self.command != "PUT" or m is None:
                    self._unknown()
                    return
                oid = m.group(1)
                if not hmac.compare_digest(parse_qs(parts.query).get("X-Amz-Signature", [""])[0],
                                           hub._signature(oid)):
                    self._error(403, None, "SignatureDoesNotMatch")
                    return
                if hashlib.sha256(body).hexdigest() != oid:
                    self._error(400, None, "the content's sha256 is not the object's oid")
                    return
                hub._store(oid, body)
                self._reply(200, b"", {"ETag": f'"{oid}"'})

            def _hub_write(self, body: bytes) -> None:
                parts = urlsplit(self.path)
                seg = parts.path.split("/")  # split before decoding: a revision may hold an encoded "/"
                if len(seg) == 7 and seg[1:3] == ["api", "datasets"] and seg[5] in ("preupload", "commit"):
                    action, org, name, revision = seg[5], seg[3], seg[4], unquote(seg[6])
                elif (len(seg) == 8 and seg[1] == "datasets" and seg[3].endswith(".git")
                      and seg[4:7] == ["info", "lfs", "objects"] and seg[7] in ("batch", "verify")):
                    action, org, name, revision = seg[7], seg[2], seg[3][:-len(".git")], None
                else:
                    self._unknown()
                    return
                if self.command != "POST":
                    self._unknown()
                    return
                if not self._authorized():
                    self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
                    return
                repo_id = f"{unquote(org)}/{unquote(name)}"
                if repo_id not in hub.repos:
                    self._error(404, "RepoNotFound", "Repository not found")
                    return
                if "create_pr" in parse_qs(parts.query):
                    raise _Refused(400, None, "the stand-in makes no pull requests")
                try:
                    doc = (json.loads(body) if action != "commit" else
                           [json.loads(line) for line in body.decode().splitlines() if line.strip()])
                except ValueError:
                    raise _Refused(400, None, "malformed body") from None
                if action == "commit":
                    push = hub._commit(repo_id, revision, doc)
                    self._json({"success": True, "commitOid": push.oid, "hookOutput": "", "pullRequestUrl": None,
                                "commitUrl": f"{hub.url}/datasets/{repo_id}/commit/{push.oid}"})
                elif action == "preupload":
                    found = hub._folder(repo_id, revision)
                    if found is None:
                        raise _Refused(404, "RevisionNotFound", "Invalid rev id: " + revision)
                    files = [{"path": f["path"], "uploadMode": "lfs" if hub._is_lfs(f["path"]) else "regular",
                              "shouldIgnore": False, "oid": hub._remote_oid(found[0], f["path"])}
                             for f in doc["files"]]
                    self._json({"files": files, "commitOid": found[1]})
                elif action == "batch":
                    if doc.get("operation") != "upload":
                        raise _Refused(400, None, "the stand-in's LFS batch API takes uploads only")
                    objects = []
                    for obj in doc["objects"]:
                        oid, size = obj["oid"], obj["size"]
                        entry = {"oid": oid, "size": size}
                        if oid not in hub.objects:
                            entry["authenticated"] = True
                            entry["actions"] = {
                                "upload": {"href": f"{hub.cdn_url}/upload/{oid}?X-Amz-Expires=900&"
                                                   f"X-Amz-Signature={hub._signature(oid)}"},
                                "verify": {"href": f"{hub.url}/datasets/{repo_id}.git/info/lfs/objects/verify"},
                            }
                        objects.append(entry)
                    self._json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")
                else:  # verify
                    stored = hub.objects.get(doc.get("oid", ""))
                    if stored is None or os.path.getsize(stored) != doc.get("size"):
                        raise _Refused(404, None, f"LFS object {doc.get('oid')} not found")
                    self._json({}, content_type="application/vnd.git-lfs+json")

            def do_GET(self) -> None:
                try:
                    if server == "cdn":
                        self._cdn()
                    else:
                        self._hub()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def _cdn(self) -> None:
                m = re.fullmatch(r"/blobs/([0-9a-f]{64})", urlsplit(self.path).path)
                file = hub._blobs.get(m.group(1)) if m else None
                if file is None:
                    self._error(404, None, "no such blob")
                    return
                self._file(file, {"ETag": f'"{m.group(1)}"'})

            def _hub(self) -> None:
                parts = urlsplit(self.path)
                seg = parts.path.split("/")  # split before decoding: a revision may hold an encoded "/"
                if parts.path == "/api/agent-harnesses":
                    self._reply(200, b'{"standardEnvVars": [], "harnesses": {}}', {"Content-Type": "application/json"})
                    return
                if len(seg) >= 7 and seg[1:3] == ["api", "datasets"] and seg[5] == "tree":
                    api, org, name, revision, path = True, seg[3], seg[4], seg[6], seg[7:]
                elif seg[1:2] == ["api"] and seg[2:3] in (["datasets"], ["models"]) and (
                        len(seg) == 5 or (len(seg) == 7 and seg[5] == "revision")):
                    api, org, name, revision, path = "info", seg[3], seg[4], seg[6] if len(seg) == 7 else "main", []
                elif len(seg) >= 7 and seg[1] == "datasets" and seg[4] == "resolve":
                    api, org, name, revision, path = False, seg[2], seg[3], seg[5], seg[6:]
                elif len(seg) >= 6 and seg[3] == "resolve" and seg[1] not in ("api", "datasets", "spaces"):
                    api, org, name, revision, path = False, seg[1], seg[2], seg[4], seg[5:]  # a model repo
                else:
                    self._unknown()
                    return
                repo_id, revision, path = f"{unquote(org)}/{unquote(name)}", unquote(revision), unquote("/".join(path))
                if not self._authorized():
                    self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
                    return
                if repo_id not in hub.repos:
                    self._error(404, "RepoNotFound", "Repository not found")
                    return
                found = hub._folder(repo_id, revision)
                if found is None:
                    self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
                    return
                folder, commit = found
                if api == "info":
                    self._info(repo_id, folder, commit)
                elif api:
                    self._tree(folder, revision, path, parse_qs(parts.query), commit)
                else:
                    self._resolve(folder, path, commit)

            def _tree(self, folder: str, revision: str, path: str, q: dict, commit: str) -> None:
                if path and (".." in path.split("/") or not os.path.isdir(os.path.join(folder, path))):
                    self._error(404, "EntryNotFound", f"{path} does not exist on {revision!r}",
                                {"X-Repo-Commit": commit})
                    return
                entries = list(hub._entries(folder, path, q.get("recursive", ["false"])[0].lower() == "true"))
                start = int(q.get("cursor", ["0"])[0])
                page = entries[start:start + hub.page_size]
                headers = {"Content-Type": "application/json", "X-Repo-Commit": commit}
                if start + hub.page_size < len(entries):
                    rest = {k: v[0] for k, v in q.items() if k != "cursor"}
                    query = "&".join(f"{k}={quote(v)}" for k, v in rest.items())
                    nxt = f"{hub.url}{urlsplit(self.path).path}?{query}&cursor={start + hub.page_size}"
                    headers["Link"] = f'<{nxt}>; rel="next"'
                self._reply(200, json.dumps(page).encode(), headers)

            def _info(self, repo_id: str, folder: str, commit: str) -> None:
                files = [e["path"] for e in hub._entries(folder, "", True) if e["type"] == "file"]
                body = {"id": repo_id, "sha": commit, "private": False, "siblings": [{"rfilename": f} for f in files]}
                self._reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

            def _resolve(self, folder: str, path: str, commit: str) -> None:
                file = os.path.join(folder, path)
                if not path or ".." in path.split("/") or not os.path.isfile(file):
                    self._error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": commit})
                    return
                with open(file, "rb") as f:
                    data = f.read()
                etag = git_blob_sha1(data)
                if hub._is_lfs(path):
                    sha = hashlib.sha256(data).hexdigest()
                    with hub._lock:
                        hub._blobs[sha] = file
                    location = f"{hub.cdn_url}/blobs/{sha}?X-Amz-Expires=3600&X-Amz-Signature=s3cr3tsig"
                    self._reply(302, b"", {"Location": location, "ETag": f'"{etag}"', "X-Repo-Commit": commit,
                                           "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))})
                    return
                self._file(file, {"ETag": f'"{etag}"', "X-Repo-Commit": commit})

        return Handler
