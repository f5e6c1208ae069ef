"""The pack's output folder: at every instant the old dataset or the new one, never a mix, never a partial file.

A run writes everything into a staging folder of its own inside the output, then publishes: its shards are
renamed into the output under names that no older pack's shards have (``pack_id`` is in them), then its
rejects file, then its manifest, by one rename that switches readers from the old pack to the new one; only
then are the old pack's files removed. So at every instant the output's manifest names shards that are there
with the bytes it says, a failed or interrupted run leaves only its staging folder (removed on the way out,
or by the next run when the process was killed), and a finished one leaves exactly its own files.

A single-job pack owns the whole folder. Job J of a multi-job pack owns only job J's files, since the other
jobs write into the same folder at the same time; and it removes none of the shards that index.json (the
merged manifest readers use) names: `merge` removes those once it has replaced index.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

from .format import (MANIFEST_NAME, ShardInfo, job_manifest_name, merge_manifests, pack_id, read_manifest, rejects_name,
                     shard_name, write_manifest)


class PackError(Exception):
    """A reason to stop packing, said to the user as is."""


STAGING = ".pack-staging-"  # + "jJJJJ-" for a job, then a random part: a run's files until it publishes
OLD_STAGING = ".pack-tmp-"  # the shuffle buckets' folder of earlier versions of this tool
_JOB_FILE = re.compile(r"(?:index\.j(\d{4})\.json|rejects\.j(\d{4})\.jsonl|.+-j(\d{4})-(?:[0-9a-f]{8}-)?\d{6}\.tar)"
                       r"(?:\.tmp\d*)?")


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


def check_output(out: str, job: int | None, overwrite: bool) -> None:
    """Refuse to pack over what is in ``out`` unless ``overwrite``: for a single-job pack, anything but the
    staging folder of a killed run; for job J, job J's files of an earlier pack, or a finished pack (index.json)."""
    if not os.path.exists(out) or overwrite:
        return
    names = sorted(n for n in os.listdir(out) if not _own_staging(n, job))
    if job is None and names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise PackError(f"{out} is not empty ({shown}): pass --overwrite to replace what is there with the new "
                        "pack, or choose an empty folder")
    if job is not None:
        found = [n for n in names if n == MANIFEST_NAME or _job_of_file(n) == job]
        if found:
            raise PackError(f"{out} holds {found[0]} of an earlier pack: pass --overwrite to replace job {job}'s "
                            "part of it (what the other jobs wrote is left to them), or choose an empty folder")


def start_staging(out: str, job: int | None) -> str:
    """Create ``out`` if need be, remove the staging folders that killed runs of the same kind left there, and
    return a new, empty one."""
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if _own_staging(name, job):
            _remove(os.path.join(out, name))
    return tempfile.mkdtemp(prefix=_staging_prefix(job), dir=out)


def publish(out: str, staging: str, job: int | None, prefix: str, shards: list[ShardInfo],
            packing: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Move a finished pack from ``staging`` into ``out`` (see the comment above); returns the manifest's path
    and content."""
    pack = pack_id(shards)
    named = [ShardInfo(shard_name(prefix, n, job, pack), s.samples, s.bytes, s.sha256) for n, s in enumerate(shards)]
    manifest = MANIFEST_NAME if job is None else job_manifest_name(job)
    doc = write_manifest(os.path.join(staging, manifest), named, packing=packing)
    moved = []  # shards put in the output so far, taken back if the switch does not happen
    try:
        for s, final in zip(shards, named):
            target = os.path.join(out, final.url)
            if not os.path.exists(target):  # one that exists has this name, so these very bytes
                moved.append(target)
            os.replace(os.path.join(staging, s.url), target)
        os.replace(os.path.join(staging, rejects_name(job)), os.path.join(out, rejects_name(job)))
        os.replace(os.path.join(staging, manifest), os.path.join(out, manifest))  # the switch to the new pack
    except BaseException:
        for path in moved:
            _remove(path)
        raise
    keep = {manifest, rejects_name(job), *(s.url for s in named)}
    keep.add(os.path.basename(staging))  # removed by the caller, once this returns
    if job is None:  # every pack file but the new ones; job manifests first, before the shards they name
        old = sorted((n for n in os.listdir(out) if n not in keep and _is_pack_file(n)),
                     key=lambda n: not n.endswith(".json"))
    else:  # job J's files only, and none that the merged manifest still names
        keep |= _local_shards(os.path.join(out, MANIFEST_NAME))
        old = [n for n in os.listdir(out) if n not in keep and (_job_of_file(n) == job or _own_staging(n, job))]
    for name in old:
        _remove(os.path.join(out, name))
    return os.path.join(out, manifest), doc


def _local_shards(manifest: str) -> set[str]:
    """The shards in the manifest's own folder that it names (none if it is missing or unreadable)."""
    try:
        _, shards = read_manifest(manifest)
    except (OSError, ValueError):  # FormatError is a ValueError
        return set()
    return {s.url for s in shards if "/" not in s.url and "://" not in s.url}


def _is_single_job_pack(manifest: str) -> bool:
    """Whether the manifest is one a single-job pack wrote (its rejects file is then ``rejects.jsonl``)."""
    try:
        with open(manifest) as f:
            packing = json.load(f).get("packing")
    except (OSError, ValueError, AttributeError):
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


def merge(manifests: list[str], output: str) -> dict[str, Any]:
    """Join job manifests into ``output`` (DIR/index.json), then remove the pack it replaced: its shards that
    neither the new manifest nor a job manifest beside it names (a job's are its own), and a single-job pack's
    rejects file. Returns the merged manifest."""
    folder = os.path.dirname(os.path.abspath(output))
    old_shards, old_single = _local_shards(output), _is_single_job_pack(output)
    doc = merge_manifests(manifests, output)
    live = {s["url"] for s in doc["shards"]}
    for name in os.listdir(folder):
        if _job_of_file(name) is not None and name.endswith(".json"):
            live |= _local_shards(os.path.join(folder, name))
    for name in sorted(old_shards - live):
        _remove(os.path.join(folder, name))
    if old_single:
        _remove(os.path.join(folder, rejects_name()))
    return doc
