"""The pack's output in a folder of a Hugging Face dataset repo: hf://datasets/ORG/NAME[@BRANCH]/PATH.

Through huggingface_hub, whose endpoint (``HF_ENDPOINT``) and token (``HF_TOKEN``, the token file, or the one
given) are used as its own downloads use them; the token is never printed, logged or put in a message.

- Staging is local and in the Hub's LFS store: the writer writes each shard into a local folder, and each
  finished shard is pre-uploaded (``HfApi.preupload_lfs_files``, one ``CommitOperationAdd`` per shard) under a
  provisional path in the folder that no commit ever names, at most ``in_flight`` at a time (the writer waits
  for a free slot), and its local file is deleted once it is up: local disk holds a few shards whatever the
  dataset's size. A shard the Hub wants as a regular file rather than LFS (a repo whose .gitattributes does
  not send .tar to LFS, for a small one) stays on disk, since its bytes go in the commit itself.
- The switch is ONE commit (``HfApi.create_commit``): every pre-uploaded shard re-pointed at its final name
  (the commit names it by sha256; nothing is uploaded again), the rejects file and the manifest, and the
  deletion of the old pack's files, those of ``remove`` that are there. A reader of the branch sees the old
  commit or the new one, never a mix.
- A run that fails or is killed before the switch commits nothing: the repo is as it was, and the objects it
  uploaded are in no commit, so nobody sees them. No staging name ever exists in the repo: there is nothing
  to clean up, and ``names()`` never returns one.
- ``remove`` outside a switch (the merge's) is one commit of deletions; ``names`` lists the folder and ``read``
  downloads a file, both at the branch's head.

huggingface_hub uploads by Xet rather than plain LFS whenever hf_xet is installed, unless ``HF_HUB_DISABLE_XET``
is set: its choice, not this module's. Either way the objects are up when ``preupload_lfs_files`` returns and
the commit names them by sha256, so all of the above holds for both.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
import threading
from typing import Any, Mapping, Sequence

from ..io.hub import parse_hf_url
from .uploads import Uploads

_COMMIT = re.compile(r"[0-9a-f]{40}")


class HubWriteError(OSError):
    """A reason the repo folder cannot take the pack, said to the user as is."""


class HubFolder:
    """A folder of a dataset repo at a branch (main unless ``@BRANCH``); see the module's docstring.

    ``hf_token``: a token, False for none, or None for huggingface_hub's own (``HF_TOKEN``, the token file).
    ``in_flight``: finished shards being uploaded at once, at most (`open_folder` passes the packer's).
    """

    def __init__(self, location: str, hf_token: Any = None, in_flight: int = 4):
        from huggingface_hub import HfApi

        self.location = location.rstrip("/")
        try:  # the folder may be the repo's root: parse it as the folder of a file in it
            kind, repo_id, revision, path = parse_hf_url(self.location + "/_")
        except ValueError:
            raise HubWriteError(f"{location}: expected hf://datasets/ORG/NAME[@BRANCH]/PATH") from None
        if kind != "dataset":
            raise HubWriteError(f"{location}: a pack goes to a dataset repo (hf://datasets/ORG/NAME/PATH)")
        if revision is not None and _COMMIT.fullmatch(revision):
            raise HubWriteError(f"{location}: {revision} is a commit; a pack is committed to a branch")
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, got {in_flight}")
        self.repo_id, self.revision, self.path = repo_id, revision or "main", path[:-1].rstrip("/")
        self.in_flight = in_flight
        self._token = hf_token
        self._api = HfApi()

    def __repr__(self) -> str:  # never the token
        return f"HubFolder({self.location!r})"

    def repo_path(self, name: str) -> str:
        """The path in the repo of ``name`` in this folder."""
        return f"{self.path}/{name}" if self.path else name

    def where(self, name: str) -> str:
        return f"{self.location}/{name}"

    # ------------------------------------------------------------------------------------------ reading
    def _listing(self) -> dict[str, bool]:
        """Name -> whether it is a folder, for each entry directly in the folder at the branch's head."""
        from huggingface_hub.errors import RemoteEntryNotFoundError
        from huggingface_hub.hf_api import RepoFolder

        try:
            entries = list(self._api.list_repo_tree(self.repo_id, self.path or None, revision=self.revision,
                                                    repo_type="dataset", token=self._token))
        except RemoteEntryNotFoundError:  # no such folder in the repo (yet)
            return {}
        return {posixpath.basename(e.path): isinstance(e, RepoFolder) for e in entries}

    def names(self) -> list[str]:
        return sorted(self._listing())

    def exists(self) -> bool:
        return bool(self._listing())

    def read(self, name: str) -> bytes | None:
        """The file's bytes at the branch's head, or None when the repo has no such file (any other failure,
        such as the Hub being out of reach, is raised: a manifest that cannot be read is not a missing one)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RemoteEntryNotFoundError

        try:
            local = hf_hub_download(self.repo_id, self.repo_path(name), repo_type="dataset", revision=self.revision,
                                    token=self._token)
        except RemoteEntryNotFoundError:
            return None
        with open(local, "rb") as f:
            return f.read()

    # ------------------------------------------------------------------------------------------ writing
    def stage(self, job: int | None) -> "HubStaging":
        prefix = ".pack-staging-" + ("" if job is None else f"j{job:04d}-")  # output.STAGING's names
        return HubStaging(self, tempfile.mkdtemp(prefix=prefix))

    def switch(self, staging: Any, shards: Sequence[tuple[str, str]], files: Mapping[str, bytes],
               manifest: str, data: bytes, remove: Sequence[str]) -> None:
        """One commit: the staged shards under their final names, the ``files``, the manifest, and the deletion
        of those of ``remove`` that are there."""
        from huggingface_hub import CommitOperationAdd

        staging.finish()  # every staged shard is up
        ops: list[Any] = []
        for staged, final in shards:
            op = staging.operation(staged)
            op.path_in_repo = self.repo_path(final)  # the object is stored by sha256: only its path changes
            ops.append(op)
        ops += [CommitOperationAdd(self.repo_path(name), body) for name, body in [*files.items(), (manifest, data)]]
        deletions = self._deletions(remove)
        self._commit(ops + deletions, f"vlmstream pack: {self.repo_path(manifest)}, {len(shards)} shards added, "
                                      f"{len(deletions)} files removed")

    def remove(self, names: Sequence[str]) -> None:
        """One commit deleting those of ``names`` that are there (none: no commit)."""
        deletions = self._deletions(names)
        if deletions:
            self._commit(deletions, f"vlmstream pack: {len(deletions)} files of an older pack removed from "
                                    f"{self.path or 'the repo root'}")

    def _deletions(self, names: Sequence[str]) -> list[Any]:
        from huggingface_hub import CommitOperationDelete

        if not names:
            return []
        there = self._listing()
        return [CommitOperationDelete(self.repo_path(n), is_folder=there[n]) for n in dict.fromkeys(names)
                if n in there]

    def _commit(self, operations: list[Any], message: str) -> None:
        self._api.create_commit(self.repo_id, operations, commit_message=message, repo_type="dataset",
                                revision=self.revision, token=self._token)

    def _preupload(self, op: Any) -> None:
        self._api.preupload_lfs_files(self.repo_id, [op], token=self._token, repo_type="dataset",
                                      revision=self.revision, num_threads=1)


class HubStaging:
    """A local folder for the shard being written; each finished shard pre-uploaded under a provisional path
    that no commit names, ``in_flight`` at a time at most, its local file deleted once it is up."""

    def __init__(self, folder: HubFolder, path: str):
        self.path = path
        self._folder = folder
        self._remote = folder.repo_path(os.path.basename(path))  # provisional paths: never committed
        self._uploads = Uploads(folder.in_flight, "vlmstream-hub-upload")
        self._ops: dict[str, Any] = {}  # staged name -> its CommitOperationAdd, once uploaded
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HubStaging({self._folder.location!r}, {self.path!r})"

    def shard_done(self, path: str, info: Any) -> None:
        self._uploads.submit(self._upload, path, info)  # the writer waits here while in_flight shards are on their way

    def _upload(self, path: str, info: Any) -> None:
        from huggingface_hub import CommitOperationAdd

        op = CommitOperationAdd(f"{self._remote}/{info.url}", path)
        op.upload_info.sha256 = bytes.fromhex(info.sha256)  # the writer's digest: no second read of the file
        self._folder._preupload(op)
        if op._should_ignore:
            raise HubWriteError(f"{self._folder.where(info.url)}: the repo's .gitignore ignores this shard, so "
                                "no commit would hold it")
        with self._lock:
            self._ops[info.url] = op
        if op._is_uploaded:  # in the LFS store, named by sha256: the commit needs no local copy
            os.remove(path)
        # else the Hub takes it as a regular file: its bytes go in the commit, read from this file then

    def finish(self) -> None:
        self._uploads.finish()

    def operation(self, staged: str) -> Any:
        """The uploaded shard's CommitOperationAdd (after ``finish``)."""
        return self._ops[staged]

    def discard(self) -> None:
        """Stop: wait for the uploads on their way (those not started are dropped) and remove the local folder.
        What was uploaded is in no commit: nothing in the repo to remove."""
        self._uploads.stop()
        shutil.rmtree(self.path, ignore_errors=True)


__all__ = ["HubFolder", "HubStaging", "HubWriteError"]
