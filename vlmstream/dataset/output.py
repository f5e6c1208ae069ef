"""The pack's output: at every instant the old dataset or the new one, never a mix, never a partial file.

A run writes its shards into a staging area of its own, then publishes: its shards take names that no older
pack's shards have (``pack_id`` is in them), then its rejects file, then its manifest, whose arrival switches
readers from the old pack to the new one; only then are the old pack's files removed. So at every instant the
output's manifest names shards that are there with the bytes it says, a failed or interrupted run leaves only its
staging area (removed on the way out, or by the next run when the process was killed), and a finished one
leaves exactly its own files.

A single-job pack owns the whole folder. Job J of a multi-job pack owns only job J's files, since the other
jobs write into the same folder at the same time; and it removes none of the shards that index.json (the
merged manifest readers use) names: `merge` removes those once it has replaced index.json.

Where the folder is (`open_folder`):

- a local folder: the staging area is a folder inside it, the switch a rename (`LocalFolder`);
- a prefix in an object store (s3://, gs://, az://): shards are uploaded into a staging prefix as each is
  finished (a bounded number in flight, multipart for large ones), so local disk holds a few shards whatever
  the dataset's size; publishing copies them to their names server-side and writes the manifest last
  (`StoreFolder`);
- a folder of a Hugging Face dataset repo (hf://datasets/ORG/NAME/PATH): shards are uploaded (LFS) as each is
  finished, and one commit adds them under their names with the manifest and removes the old files: the switch
  is atomic (`HubFolder`, dataset/hub.py).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import tempfile
from typing import Any, Mapping, Protocol, Sequence

from ..errors import redact
from .format import (MANIFEST_NAME, ShardInfo, job_manifest_name, manifest_json, merge_manifests, pack_id,
                     parse_manifest, rejects_name, shard_name)
from .uploads import Uploads


class PackError(Exception):
    """A reason to stop packing, said to the user as is."""


STAGING = ".pack-staging-"  # + "jJJJJ-" for a job, then a random part: a run's files until it publishes
OLD_STAGING = ".pack-tmp-"  # the shuffle buckets' folder of earlier versions of this tool
_JOB_FILE = re.compile(r"(?:index\.j(\d{4})\.json|rejects\.j(\d{4})\.jsonl|.+-j(\d{4})-(?:[0-9a-f]{8}-)?\d{6}\.tar)"
                       r"(?:\.tmp\d*)?")
UPLOADS_IN_FLIGHT = 4  # finished shards being uploaded at once, at most (each waits on disk until it is up)


def _staging_prefix(job: int | None) -> str:
    return STAGING if job is None else f"{STAGING}j{job:04d}-"


def _own_staging(name: str, job: int | None) -> bool:
    """Whether ``name`` is a staging folder of a run of the same kind (a single-job pack, or job J): one that
    was killed, since only one such run writes into a folder at a time."""
    if job is not None:
        return name.startswith(_staging_prefix(job))
    return name.startswith(OLD_STAGING) or (name.startswith(STAGING) and not re.match(r"j\d{4}-", name[len(STAGING):]))


def _job_of_file(name: str) -> int | None:
    """The job whose manifest, rejects file or shard (or a temporary file of one) ``name`` is, if any."""
    m = _JOB_FILE.fullmatch(name)
    return None if m is None else int(next(g for g in m.groups() if g is not None))


def _is_pack_file(name: str) -> bool:
    """A file a pack run writes into its output folder, or a leftover of one (temporary files included)."""
    return (name.endswith((".tar", ".tar.tmp")) or _job_of_file(name) is not None
            or name.startswith((STAGING, OLD_STAGING)) or re.fullmatch(r"index\.json\.tmp\d*", name) is not None)


def manifest_bytes(doc: Mapping[str, Any]) -> bytes:
    """A manifest's bytes as every folder stores them (the same as `format.write_manifest` writes)."""
    return (json.dumps(doc, indent=1) + "\n").encode()


# --------------------------------------------------------------------------------------------------- folders


class Staging(Protocol):
    """A run's files until it publishes: ``path`` is the local folder the writer writes into."""

    path: str

    def shard_done(self, path: str, info: ShardInfo) -> None: ...

    def finish(self) -> None: ...

    def discard(self) -> None: ...


class Folder(Protocol):
    """Where a pack goes. Names are of files directly in it, and of staging areas."""

    location: str

    def exists(self) -> bool: ...

    def names(self) -> list[str]: ...

    def read(self, name: str) -> bytes | None: ...

    def stage(self, job: int | None) -> Staging: ...

    def switch(self, staging: Staging, shards: Sequence[tuple[str, str]], files: Mapping[str, bytes],
               manifest: str, data: bytes, remove: Sequence[str]) -> None:
        """Publish: each staged shard under its final name, the ``files``, then the manifest last; then
        ``remove`` the old pack's files."""

    def remove(self, names: Sequence[str]) -> None: ...

    def where(self, name: str) -> str: ...


class LocalFolder:
    """A folder on local disk: staging inside it, the switch by rename."""

    def __init__(self, path: str):
        self.location = path

    def exists(self) -> bool:
        return os.path.exists(self.location)

    def names(self) -> list[str]:
        return sorted(os.listdir(self.location)) if self.exists() else []

    def read(self, name: str) -> bytes | None:
        try:
            with open(os.path.join(self.location, name), "rb") as f:
                return f.read()
        except OSError:
            return None

    def where(self, name: str) -> str:
        return os.path.join(self.location, name)

    def stage(self, job: int | None) -> "LocalStaging":
        os.makedirs(self.location, exist_ok=True)
        return LocalStaging(tempfile.mkdtemp(prefix=_staging_prefix(job), dir=self.location))

    def switch(self, staging: Staging, shards: Sequence[tuple[str, str]], files: Mapping[str, bytes],
               manifest: str, data: bytes, remove: Sequence[str]) -> None:
        scratch = staging.path or self.location
        written = []
        try:  # every file written before anything moves: a full disk stops the switch before it starts
            for name, body in [*files.items(), (manifest, data)]:
                _write_in(scratch, name + ".new", body)
                written.append(os.path.join(scratch, name + ".new"))
        except BaseException:
            for path in written:
                _remove(path)
            raise
        moved = []  # shards put in the output so far, taken back if the switch does not happen
        try:
            for staged, final in shards:
                target = os.path.join(self.location, final)
                if not os.path.exists(target):  # one that exists has this name, so these very bytes
                    moved.append(target)
                os.replace(os.path.join(staging.path, staged), target)
            for name in [*files, manifest]:  # the manifest last: the switch to the new pack
                os.replace(os.path.join(scratch, name + ".new"), os.path.join(self.location, name))
        except BaseException:
            for path in moved:
                _remove(path)
            raise
        self.remove(remove)

    def remove(self, names: Sequence[str]) -> None:
        for name in names:
            _remove(os.path.join(self.location, name))


def _write_in(folder: str, name: str, body: bytes) -> None:
    tmp = os.path.join(folder, name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, os.path.join(folder, name))
    except BaseException:
        _remove(tmp)
        raise


class LocalStaging:
    """The staging folder inside a local output: shards stay where the writer put them until the switch."""

    def __init__(self, path: str):
        self.path = path

    def shard_done(self, path: str, info: ShardInfo) -> None:
        pass

    def finish(self) -> None:
        pass

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class StoreFolder:
    """A prefix in an object store (io/store.py): shards uploaded into a staging prefix as they are finished,
    copied to their names server-side at the switch, the manifest written last."""

    def __init__(self, url: str, stores: Any = None):
        from ..io.store import DEFAULT_STORES

        self.location = url.rstrip("/")
        self.stores = stores or DEFAULT_STORES

    def where(self, name: str) -> str:
        return f"{self.location}/{name}"

    def exists(self) -> bool:
        return bool(self.names())

    def names(self) -> list[str]:
        from ..io.store import list_objects

        base = self.location + "/"
        return sorted({url[len(base):].split("/", 1)[0] for url, _, _ in list_objects(base, self.stores)})

    def read(self, name: str) -> bytes | None:
        from ..io.store import read_bytes

        return read_bytes(self.where(name), self.stores)

    def stage(self, job: int | None) -> "StoreStaging":
        name = os.path.basename(tempfile.mkdtemp(prefix=_staging_prefix(job)))  # a unique name, and a local folder
        return StoreStaging(os.path.join(tempfile.gettempdir(), name), self.where(name), self.stores)

    def switch(self, staging: Staging, shards: Sequence[tuple[str, str]], files: Mapping[str, bytes],
               manifest: str, data: bytes, remove: Sequence[str]) -> None:
        from ..io.store import copy, delete, put_bytes

        staging.finish()  # every staged shard is up
        done = []
        try:
            for staged, final in shards:
                copy(f"{getattr(staging, 'remote')}/{staged}", self.where(final), self.stores)
                done.append(final)
            for name, body in [*files.items(), (manifest, data)]:  # the manifest last: the switch to the new pack
                put_bytes(self.where(name), body, self.stores)
        except BaseException:
            for final in done:
                delete(self.where(final), self.stores)
            raise
        self.remove(remove)

    def remove(self, names: Sequence[str]) -> None:
        from ..io.store import delete, list_objects

        for name in names:
            if name.startswith((STAGING, OLD_STAGING)):  # a staging prefix: every object under it
                for url, _, _ in list_objects(self.where(name) + "/", self.stores):
                    delete(url, self.stores)
            else:
                delete(self.where(name), self.stores)


class StoreStaging:
    """A local folder for the shard being written, and a staging prefix the finished ones are uploaded to, a
    bounded number at a time; each local file goes once its upload is done."""

    def __init__(self, path: str, remote: str, stores: Any):
        os.makedirs(path, exist_ok=True)
        self.path, self.remote, self.stores = path, remote, stores
        self._uploads = Uploads(UPLOADS_IN_FLIGHT, "vlmstream-upload")

    def shard_done(self, path: str, info: ShardInfo) -> None:
        # the writer waits here while UPLOADS_IN_FLIGHT shards are on their way
        self._uploads.submit(self._upload, path, f"{self.remote}/{info.url}")

    def _upload(self, path: str, url: str) -> None:
        from ..io.store import put_file

        put_file(url, path, self.stores)
        os.remove(path)

    def finish(self) -> None:
        self._uploads.finish()

    def discard(self) -> None:
        from ..io.store import delete, list_objects

        self._uploads.stop()
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            for url, _, _ in list_objects(self.remote + "/", self.stores):
                delete(url, self.stores)
        except Exception:  # noqa: BLE001 - the next run removes what is left
            pass


def open_folder(location: str, storage_options: Mapping[str, Any] | None = None, hf_token: Any = None) -> Folder:
    """The folder a location names: an object-store prefix, a Hub repo folder, or a local path."""
    from ..io.store import Stores, is_store_url

    if is_store_url(location):
        return StoreFolder(location, Stores(storage_options) if storage_options else None)
    if location.startswith("hf://"):
        from .hub import HubFolder

        return HubFolder(location, hf_token, in_flight=UPLOADS_IN_FLIGHT)
    return LocalFolder(location)


# ---------------------------------------------------------------------------------------------- the rules


def check_output(out: Folder, job: int | None, overwrite: bool) -> None:
    """Refuse to pack over what is in ``out`` unless ``overwrite``: for a single-job pack, anything but the
    staging folder of a killed run; for job J, job J's files of an earlier pack, or a finished pack (index.json)."""
    if overwrite or not out.exists():
        return
    names = [n for n in out.names() if not _own_staging(n, job)]
    if job is None and names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise PackError(f"{redact(out.location)} is not empty ({shown}): pass --overwrite to replace what is there "
                        "with the new pack, or choose an empty folder")
    if job is not None:
        found = [n for n in names if n == MANIFEST_NAME or _job_of_file(n) == job]
        if found:
            raise PackError(f"{redact(out.location)} holds {found[0]} of an earlier pack: pass --overwrite to replace "
                            f"job {job}'s part of it (what the other jobs wrote is left to them), or choose an empty "
                            "folder")


def start_staging(out: Folder, job: int | None) -> Staging:
    """Remove the staging areas that killed runs of the same kind left in ``out``, and start a new one."""
    out.remove([n for n in out.names() if _own_staging(n, job)])
    return out.stage(job)


def publish(out: Folder, staging: Staging, job: int | None, prefix: str, shards: list[ShardInfo],
            packing: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Publish a finished pack from ``staging`` (see the module's docstring); returns where the manifest is and
    its content."""
    pack = pack_id(shards)
    named = [ShardInfo(shard_name(prefix, n, job, pack), s.samples, s.bytes, s.sha256) for n, s in enumerate(shards)]
    manifest = MANIFEST_NAME if job is None else job_manifest_name(job)
    doc = manifest_json(named, packing=packing)
    with open(os.path.join(staging.path, rejects_name(job)), "rb") as f:
        rejects = f.read()
    names = out.names()
    keep = {manifest, rejects_name(job), *(s.url for s in named)}
    if job is None:  # every pack file but the new ones; job manifests first, before the shards they name
        old = sorted((n for n in names if n not in keep and _is_pack_file(n)), key=lambda n: not n.endswith(".json"))
    else:  # job J's files only, and none that the merged manifest still names
        keep |= _named_shards(out.read(MANIFEST_NAME))
        old = [n for n in names if n not in keep and (_job_of_file(n) == job or _own_staging(n, job))]
    old = [n for n in old if n != os.path.basename(staging.path)]  # the caller discards it, once this returns
    out.switch(staging, [(s.url, f.url) for s, f in zip(shards, named)], {rejects_name(job): rejects}, manifest,
               manifest_bytes(doc), old)
    return out.where(manifest), doc


def _named_shards(manifest: bytes | None) -> set[str]:
    """The shards in the manifest's own folder that it names (none if it is missing or unreadable)."""
    if manifest is None:
        return set()
    try:
        shards = parse_manifest(json.loads(manifest))
    except (ValueError, TypeError):  # FormatError is a ValueError
        return set()
    return {s.url for s in shards if "/" not in s.url and "://" not in s.url}


def _is_single_job_pack(manifest: bytes | None) -> bool:
    """Whether the manifest is one a single-job pack wrote (its rejects file is then ``rejects.jsonl``)."""
    try:
        packing = json.loads(manifest).get("packing") if manifest is not None else None
    except (ValueError, AttributeError):
        return False
    return isinstance(packing, dict) and "job" not in packing


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def merge(manifests: list[str], output: str, storage_options: Mapping[str, Any] | None = None,
          hf_token: Any = None) -> dict[str, Any]:
    """Join job manifests into ``output`` (DIR/index.json, local or remote), then remove the pack it replaced:
    its shards that neither the new manifest nor a job manifest beside it names (a job's are its own), and a
    single-job pack's rejects file. Remote job manifests lie beside ``output``; their names may be globs
    (``s3://b/ds/index.j*.json``). Returns the merged manifest."""
    folder_location, output_name = posixpath.split(output) if "://" in output else os.path.split(output)
    out = open_folder(folder_location or ".", storage_options, hf_token)
    old_manifest = out.read(output_name)
    if isinstance(out, LocalFolder):
        doc = merge_manifests(manifests, output)
    else:
        doc = _merge_remote(out, manifests, output_name)
    live = {s["url"] for s in doc["shards"]}
    for name in out.names():
        if _job_of_file(name) is not None and name.endswith(".json"):
            live |= _named_shards(out.read(name))
    gone = sorted(_named_shards(old_manifest) - live)
    if _is_single_job_pack(old_manifest):
        gone.append(rejects_name())
    out.remove(gone)
    return doc


def _merge_remote(out: Folder, manifests: list[str], output_name: str) -> dict[str, Any]:
    from ..io.patterns import glob_match, has_glob

    names = out.names()
    picked: list[str] = []
    for m in manifests:
        name = m.rsplit("/", 1)[-1]
        if not m.startswith(out.location + "/") and m != name:
            raise PackError(f"{redact(m)}: a remote merge reads job manifests beside {redact(out.where(output_name))}")
        picked += [n for n in names if glob_match(n, name)] if has_glob(name) else [name]
    shards: list[ShardInfo] = []
    seen: dict[str, str] = {}
    for name in picked:
        data = out.read(name)
        if data is None:
            raise PackError(f"{redact(out.where(name))}: no such manifest")
        for s in parse_manifest(json.loads(data), redact(out.where(name))):
            if s.url in seen:
                raise PackError(f"{redact(out.where(name))}: shard {s.url} is already listed by {seen[s.url]}")
            seen[s.url] = name
            shards.append(s)
    doc = manifest_json(shards, merged_from=picked)
    out.switch(_NoStaging(), [], {}, output_name, manifest_bytes(doc), [])
    return doc


class _NoStaging:
    path = ""

    def shard_done(self, path: str, info: ShardInfo) -> None:
        pass

    def finish(self) -> None:
        pass

    def discard(self) -> None:
        pass


__all__ = ["Folder", "LocalFolder", "PackError", "StoreFolder", "check_output", "merge", "open_folder", "publish",
           "start_staging"]

