"""`vs.tar_samples()`: open shards in, samples out, the slot's cursor kept for checkpoints.

The reader applies what the split stages decided (each task's sample filter, the slot's quota for equal per-rank
counts), what a checkpoint asks (start at a sample's offset, skip what was delivered, read referenced samples
only, each checked by its key) and the ``on_error`` policy; the tar format itself is io/tar.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from ..core.checkpoint import SlotCursor
from ..core.stage import READER, OpenShard, ShardTask, as_open_shard, as_task
from ..errors import ErrorCounts, FetchError, TarError, check_policy, handle, redact
from ..io.tar import BadSample, Sample, group_samples, iter_members


@dataclass
class QuotaStats:
    padded: int = 0  # samples yielded a second time so that this slot reaches its quota
    dropped: int = 0  # samples of this slot's shards left out so that it stops at its quota
    unread: int = 0  # samples of this slot's shards lost to errors skipped under on_error (not in `dropped`)


@dataclass
class TarStats(QuotaStats, ErrorCounts):
    """``tar_samples().stats``: the DDP quota counts (padded, dropped) and what ``on_error`` skipped: a shard
    cut short by a bad header or truncation counts once in ``skipped`` and its remaining samples (from the
    manifest) in ``samples_lost``; a bad sample counts once in each."""


def slot_samples(shards: Iterator[Any], read: Any, stats: QuotaStats | None = None,
                 cursor: SlotCursor | None = None) -> Iterator[Any]:
    """Samples of the shards this slot holds: each task's sample filter applied, and the slot's quota (equal
    per-rank counts) enforced. ``read(shard)`` yields the samples of one (opened) shard; ``shard.task`` (or the
    item itself) is its `ShardTask`. ``cursor`` is kept up to date before each sample is yielded (and says where
    to resume)."""
    stats = stats if stats is not None else QuotaStats()
    cursor = cursor if cursor is not None else SlotCursor()
    quota = total = None
    for shard in shards:
        task = shard.task if isinstance(shard, OpenShard) else as_task(shard)
        quota, total = task.quota, task.slot_total
        if quota is not None and cursor.count >= quota:
            close = getattr(getattr(shard, "stream", None), "close", None)
            if close is not None:
                close()
            break  # the shards left are never read
        off, step, padding = task.sample_offset, task.sample_step, task.padding
        samples = read(shard)
        try:
            for sample in samples:
                if step > 1 and sample["__index__"] % step != off:
                    continue
                cursor.index, cursor.offset = sample["__index__"], sample["__offset__"]
                cursor.key, cursor.url = sample.get("__key__"), sample.get("__url__")
                cursor.count += 1
                cursor.real += not padding
                stats.padded += padding
                yield sample
                if quota is not None and cursor.count >= quota:
                    break
        finally:
            close = getattr(samples, "close", None)
            if close is not None:
                close()
        cursor.item += 1
        cursor.index = cursor.offset = cursor.key = cursor.url = None
    if quota is not None and total is not None:
        stats.dropped += max(0, total - cursor.real - stats.unread)  # from the manifest, never silent


class TarSamples:
    """The ``tar_samples()`` stage: `OpenShard`s (as an opener such as `vs.fetch` yields them) -> samples.

    Each stream is closed once its shard is read, or when the consumer stops early or an error is raised. The
    split stages' task fields (``sample_offset`` / ``sample_step``, ``quota``, ``padding``) are honoured through
    `slot_samples`; ``stats`` counts the samples padded, dropped or skipped by the current iteration.
    Samples carry the shard's URL redacted (no credentials) in ``__url__``.
    """

    role = READER

    def __init__(self, *, max_member_bytes: int | None = 1 << 30, on_error: str = "raise"):
        self.max_member_bytes = max_member_bytes
        self.on_error = check_policy(on_error)
        self.stats = TarStats()
        self.cursor = SlotCursor()  # where this slot is: what a checkpoint records, what a resume starts from
        self._resume: SlotCursor | None = None

    def __call__(self, shards: Iterable[OpenShard]) -> Iterator[Sample]:
        self.stats = TarStats()  # one count per iteration (per worker slot)
        self.cursor, self._resume = self._resume or SlotCursor(), None
        return slot_samples(iter(shards), self.read, self.stats, self.cursor)

    def state_dict(self) -> dict[str, Any]:
        return self.cursor.as_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the next iteration from this cursor (the pipeline skips the finished tasks before fetch)."""
        self._resume = SlotCursor(**state)

    def read(self, shard: OpenShard | Mapping[str, Any]) -> Iterator[Sample]:
        """The samples of one open shard, closing its stream.

        The task says where to start: ``start_offset`` / ``start_index`` (the stream starts at that sample),
        ``skip_through`` / ``skip_key`` (samples up to that index were delivered already; the last of them has
        that key), ``refs`` (``(index, key)`` pairs: only these samples, fetched again by reference). A sample a
        checkpoint names must be met again with its key, else the shard changed since the checkpoint: an error
        whatever ``on_error`` says. Under ``on_error="skip"``/``"warn"`` a bad sample is left out, and a shard
        that breaks (bad header, truncation, a fetch that gave up: that one counted by the opener) ends after
        the good samples before the break.
        """
        if not isinstance(shard, OpenShard) and not (isinstance(shard, Mapping) and "stream" in shard):
            raise TarError(f"tar_samples got a {type(shard).__name__} with no stream to read: put a fetch stage "
                           "(an opener) before tar_samples")
        shard = as_open_shard(shard)
        task, stream = shard.task, shard.stream
        url = redact(task.url)
        skip, skip_key = task.skip_through, task.skip_key
        wanted = dict(task.refs) if task.refs is not None else None
        off, step = task.sample_offset, task.sample_step
        tolerant = self.on_error != "raise"
        met = 0  # samples of this slot's share met in this shard: delivered, or skipped one by one
        checking = skip_key is not None or wanted is not None  # at a checkpoint's place, not yet confirmed
        try:
            members = iter_members(stream, url, max_member_bytes=self.max_member_bytes, skip_oversize=tolerant,
                                   base_offset=task.start_offset)
            samples = group_samples(members, url, task.start_index, bad="yield" if tolerant else "raise")
            for sample in samples:
                i = sample["__index__"]
                if i <= skip:
                    if i == skip and skip_key is not None:
                        _same(url, sample, skip_key)
                        skip_key = None
                        checking = wanted is not None
                    continue
                if skip_key is not None:
                    raise _changed(url, f"the cursor's sample {skip} ({skip_key!r}) is not where it was")
                if wanted is not None:
                    if i not in wanted:
                        continue
                    _same(url, sample, wanted.pop(i))
                    checking = False
                elif step > 1 and i % step != off:
                    continue  # another slot's sample (slot_samples filters again; this keeps bad ones out)
                met += 1
                if type(sample) is BadSample:
                    self._skipped(task, sample.error, 1, " (sample skipped)")
                else:
                    yield sample
                if wanted is not None and not wanted:
                    return
            if wanted or skip_key is not None:
                missing = sorted(wanted)[:5] if wanted else [skip]
                raise _changed(url, f"samples {missing} named by the checkpoint are not in the shard")
            stream.close()  # here, so that what closing finds (a cache copy not matching the manifest) is handled
        except TarError as e:
            if checking and e.reason != "changed":
                raise _changed(url, f"where the checkpoint points, {e}") from None
            if not tolerant or e.reason == "changed":
                raise
            lost = _left(task, met, wanted)
            self._skipped(task, e, lost, f" (rest of the shard skipped, {_count(lost)} samples lost)")
        except FetchError as e:
            if shard.report is None:  # set by fetch(on_error="skip"|"warn"): it counts the shard
                raise
            lost = _left(task, met, wanted)
            shard.report(e, lost)
            self._unread(task, lost)
        finally:
            stream.close()

    def _skipped(self, task: ShardTask, error: TarError, lost: int | None, note: str) -> None:
        handle(self.on_error, error, self.stats, "tar_samples", lost, note)
        self._unread(task, lost)

    def _unread(self, task: ShardTask, lost: int | None) -> None:
        if lost and not task.padding:
            self.stats.unread += lost  # keeps `dropped` (equal per-rank counts) from counting them again


def _same(url: str, sample: Any, key: str) -> None:
    """A sample a checkpoint names must have the key the checkpoint recorded."""
    if sample["__key__"] != key:
        raise _changed(url, f"sample {sample['__index__']} at offset {sample['__offset__']} has key "
                            f"{sample['__key__']!r}, the checkpoint recorded {key!r}")


def _changed(url: str, why: str) -> TarError:
    return TarError(f"{url}: the shard changed since the checkpoint (or the state was altered): {why}",
                    reason="changed")


def _left(task: ShardTask, met: int, wanted: dict[int, str] | None) -> int | None:
    """Samples of this slot's share of a shard not met yet, from the manifest's count (None if unknown)."""
    if wanted is not None:
        return len(wanted)
    n = task.samples
    if n is None:
        return None
    off, step, skip = task.sample_offset, task.sample_step, task.skip_through
    share = len(range(off, n, step)) - len(range(off, min(skip + 1, n), step))
    return max(0, share - met)


def _count(lost: int | None) -> str:
    return "an unknown number of" if lost is None else str(lost)


def tar_samples(*, max_member_bytes: int | None = 1 << 30, on_error: str = "raise") -> TarSamples:
    """Pipeline stage: shard streams -> samples grouped by webdataset's rules, with provenance.

    ``max_member_bytes``: a larger member is an error (it is never read whole into memory; None: no limit).
    ``on_error``: "raise" a bad shard or sample, or "skip" it (and "warn": also log it) and count it in
    ``stats``: a bad sample alone is left out; a bad header or a truncation keeps the good samples before it
    and skips the rest of that shard. See docs/ERRORS.md.
    """
    return TarSamples(max_member_bytes=max_member_bytes, on_error=on_error)


__all__ = ["QuotaStats", "TarSamples", "TarStats", "slot_samples", "tar_samples"]
