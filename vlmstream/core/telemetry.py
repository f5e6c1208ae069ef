"""Per-stage telemetry: items in and out, bytes, errors skipped, time in each stage and time waiting on its input.

The pipeline wraps each stage's output iterator in `timed`, which adds up the time spent in the stage's
``next()``. That time includes the stage's own wait on its input (the upstream's ``next()``, measured by the
upstream's timer), so a stage's own time is its timer minus its upstream's. Bytes are counted where samples
are made from shards (``tar_samples``, or a ``vs.mix`` source): the lengths of their bytes members. Each stage's
own ``stats`` object (fetch requests, tokenize drops, pack fill, mix draws, ``skipped`` counters ...) is read
as it is, numbers and nested dicts of numbers.

In a DataLoader worker the slot's counters travel to the training process with every batch (next to the slot's
checkpoint state), as a small dict of numbers; `vs.Loader.stats()` merges the workers (and, on request, the
ranks) into a `Report`, whose ``summary()`` is one line naming the bottleneck: the stage with the most own time.

The cost is two clock reads and a generator step per item per stage (about 0.3 us), plus a few microseconds per
batch for the snapshot; docs/BENCHMARKS.md measures it on the benchmark jobs. ``vs.Pipeline(..., telemetry=False)``
turns it off.
"""

from __future__ import annotations

import dataclasses
import re
from time import perf_counter
from typing import Any, Iterable, Iterator, Mapping, Sequence

SNAPSHOT_VERSION = 1
_NOT_ADDITIVE = {"seq_len"}  # stage stats that are settings, not counts: kept (max), not summed over workers


class StageTimer:
    """The live counters of one stage in one slot."""

    __slots__ = ("items", "seconds", "bytes")

    def __init__(self) -> None:
        self.items = 0
        self.seconds = 0.0
        self.bytes = 0


def timed(it: Iterable[Any], rec: StageTimer, count_bytes: bool = False) -> Iterator[Any]:
    """`it`'s items, adding the time spent in its ``next()`` and the items it gave to ``rec``; with
    ``count_bytes``, also the bytes members of each sample (where shard bytes become samples)."""
    nxt = iter(it).__next__
    clock = perf_counter
    while True:
        t0 = clock()
        try:
            x = nxt()
        except StopIteration:
            rec.seconds += clock() - t0
            return
        except BaseException:
            rec.seconds += clock() - t0
            raise
        rec.seconds += clock() - t0
        rec.items += 1
        if count_bytes and type(x) is dict:
            n = 0
            for v in x.values():
                if type(v) is bytes:
                    n += len(v)
            rec.bytes += n
        yield x
        x = None  # hold no item while the next is made (a batch of tiles is megabytes)


def stage_name(stage: Any, k: int) -> str:
    """``tar_samples``, ``decode``, ...: a function's name, or a stage class's name in snake case."""
    name = getattr(stage, "__name__", None)
    if name is None:
        func = getattr(stage, "func", None)  # functools.partial
        name = getattr(func, "__name__", None) or type(stage).__name__
    if name == "<lambda>":
        return f"stage{k}"
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def unique_names(stages: Sequence[Any]) -> list[str]:
    names: list[str] = []
    seen: dict[str, int] = {}
    for k, s in enumerate(stages):
        n = stage_name(s, k)
        seen[n] = seen.get(n, 0) + 1
        names.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return names


def plain(obj: Any, depth: int = 0) -> Any:
    """Numbers and (nested) dicts of numbers from a stats object (a dataclass, an object, a dict); else None."""
    if isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, (int, float)):
        return obj
    if depth > 4:
        return None
    if isinstance(obj, Mapping):
        items = obj.items()
    elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        items = vars(obj).items()
    else:
        return None
    out = {}
    for k, v in items:
        if isinstance(k, str) and k.startswith("_"):
            continue
        p = plain(v, depth + 1)
        if p is not None:
            out[str(k)] = p
    return out


class Telemetry:
    """The counters of one slot's iteration: one timer per stage, plus the time spent snapshotting state."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.timers = [StageTimer() for _ in names]
        self.t0 = perf_counter()
        self.state_s = 0.0

    def wrap(self, k: int, it: Iterable[Any], count_bytes: bool = False) -> Iterator[Any]:
        return timed(it, self.timers[k], count_bytes)

    def snapshot(self, stages: Sequence[Any] = ()) -> dict[str, Any]:
        """Plain numbers (cheap to send with a batch): per stage [items out, seconds in next(), bytes, stats]."""
        rows = []
        for k, t in enumerate(self.timers):
            st = getattr(stages[k], "stats", None) if k < len(stages) else None
            rows.append([t.items, t.seconds, t.bytes, plain(st) if st is not None else None])
        return {"v": SNAPSHOT_VERSION, "names": self.names, "stages": rows, "wall_s": perf_counter() - self.t0,
                "state_s": self.state_s, "slots": 1}


# ------------------------------------------------------------------------------------------------------- merge


def _merge_stats(a: Any, b: Any, key: str = "") -> Any:
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _merge_stats(out.get(k), v, k)
        return out
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return max(a, b) if key in _NOT_ADDITIVE else a + b
    return a


def merge(snapshots: Iterable[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """Several slots' (or ranks') snapshots as one: counts, bytes and times summed, wall time the longest."""
    out: dict[str, Any] | None = None
    for s in snapshots:
        if not s:
            continue
        if out is None:
            out = {"v": SNAPSHOT_VERSION, "names": list(s["names"]), "stages": [list(r) for r in s["stages"]],
                   "wall_s": s["wall_s"], "state_s": s["state_s"], "slots": s.get("slots", 1),
                   "loader": s.get("loader")}
            continue
        if list(s["names"]) != out["names"]:
            raise ValueError(f"cannot merge telemetry of different pipelines: {s['names']} vs {out['names']}")
        for row, r in zip(out["stages"], s["stages"]):
            row[0] += r[0]
            row[1] += r[1]
            row[2] += r[2]
            row[3] = _merge_stats(row[3], r[3])
        out["wall_s"] = max(out["wall_s"], s["wall_s"])
        out["state_s"] += s["state_s"]
        out["slots"] += s.get("slots", 1)
        out["loader"] = _merge_loader(out.get("loader"), s.get("loader"))
    return out


def _merge_loader(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not a or not b:
        return dict(a or b) if (a or b) else None
    return {"ranks": a.get("ranks", 1) + b.get("ranks", 1), "batches": a["batches"] + b["batches"],
            "wall_s": max(a["wall_s"], b["wall_s"]), "wait_s": a["wait_s"] + b["wait_s"],
            "wall_sum_s": a.get("wall_sum_s", a["wall_s"]) + b.get("wall_sum_s", b["wall_s"]),
            "first_batch_s": max(a["first_batch_s"] or 0.0, b["first_batch_s"] or 0.0) or None,
            "workers": a.get("workers", 0) + b.get("workers", 0)}


def gather_ranks(raw: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Every rank's merged telemetry, merged (a collective: call it on every rank). Local only without
    an initialised torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return dict(raw) if raw else None
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, raw)
    return merge(parts)


# ------------------------------------------------------------------------------------------------------ report


@dataclasses.dataclass
class StageReport:
    """One stage, summed over the slots (DataLoader workers, ranks) that ran it."""

    name: str
    items_in: int  # items its upstream gave it (0 for the source)
    items_out: int
    bytes: int  # bytes members of the samples it made (where shards become samples), else 0
    skipped: int  # errors skipped, from the stage's own stats (``skipped``), where it counts them
    own_s: float  # time inside the stage: its next() minus its upstream's
    wait_s: float  # time it waited on its input (its upstream's next())
    stats: dict[str, Any] | None  # the stage's own stats object, as numbers

    def rate(self) -> float | None:
        """Items out per second of the stage's own time: how fast it would go if it were alone."""
        return self.items_out / self.own_s if self.own_s > 0 else None


def _skipped(stats: Any) -> int:
    v = stats.get("skipped", 0) if isinstance(stats, dict) else 0
    if isinstance(v, dict):
        return int(sum(x for x in v.values() if isinstance(x, (int, float))))
    return int(v) if isinstance(v, (int, float)) else 0


def _derive(stats: Any) -> Any:
    if isinstance(stats, dict) and {"tokens", "sequences", "seq_len"} <= stats.keys() and stats["sequences"]:
        stats = {**stats, "fill": stats["tokens"] / (stats["sequences"] * stats["seq_len"])}
    return stats


@dataclasses.dataclass
class Report:
    """What `vs.Loader.stats()` / `vs.Pipeline.stats()` return: per-stage figures and a one-line summary."""

    stages: list[StageReport]
    slots: int = 0  # (rank, worker) slots merged
    wall_s: float = 0.0  # the longest slot's time since its iteration began
    state_s: float = 0.0  # time spent taking checkpoint snapshots (one per batch, in the slots)
    loader: dict[str, Any] | None = None  # the training process's side: batches, wall_s, wait_s, first_batch_s

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any] | None) -> "Report":
        if not raw:
            return cls([])
        stages = []
        prev_items, prev_s = 0, 0.0
        for k, (name, (items, secs, nbytes, stats)) in enumerate(zip(raw["names"], raw["stages"])):
            stats = _derive(stats)
            stages.append(StageReport(name, prev_items if k else 0, items, nbytes, _skipped(stats),
                                      max(0.0, secs - prev_s), prev_s if k else 0.0, stats))
            prev_items, prev_s = items, secs
        return cls(stages, raw.get("slots", 1), raw["wall_s"], raw["state_s"], raw.get("loader"))

    def stage(self, name: str) -> StageReport:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} among {[s.name for s in self.stages]}")

    @property
    def bytes(self) -> int:
        """Bytes of the samples read from shards (the largest byte count of any stage)."""
        return max((s.bytes for s in self.stages), default=0)

    @property
    def stage_s(self) -> float:
        return sum(s.own_s for s in self.stages)

    def bottleneck(self) -> StageReport | None:
        """The stage with the most own time (over all slots)."""
        return max(self.stages, key=lambda s: s.own_s, default=None)

    def shares(self) -> dict[str, float]:
        total = self.stage_s
        return {s.name: (s.own_s / total if total else 0.0) for s in self.stages}

    def samples(self) -> int | None:
        """Samples made from shards (the output of the stage whose bytes are counted), where known."""
        made = [s for s in self.stages if s.bytes]
        return made[0].items_out if made else None

    def summary(self) -> str:
        """One line: output, rates, the bottleneck stage and the next ones, the training loop's wait on data."""
        if not self.stages:
            return "no telemetry (the pipeline has not run, or runs with telemetry=False)"
        last = self.stages[-1]
        ld = self.loader or {}
        wall = ld.get("wall_s") or self.wall_s
        samples = self.samples()
        per = lambda n: f"{n / wall:,.1f}/s" if wall else "-"  # noqa: E731
        what = "batches" if last.name == "batch" else f"{last.name} outputs"
        out = f"{last.items_out:,} {what} ({per(last.items_out)})"
        if samples is not None and last.bytes == 0:
            out += f", {samples:,} samples ({per(samples)})"
        if self.bytes:
            out += f", {self.bytes / 1e6:,.1f} MB" + (f" ({self.bytes / wall / 1e6:,.1f} MB/s)" if wall else "")
        out += f" in {wall:.1f} s, {self.slots} slot{'s' * (self.slots != 1)}"
        if ld.get("first_batch_s") is not None:
            out += f", first batch at {ld['first_batch_s']:.2f} s"
        top = sorted(self.stages, key=lambda s: -s.own_s)
        shares = self.shares()
        b = top[0]
        ms = f", {1e3 * b.own_s / b.items_out:.3f} ms/item" if b.items_out else ""
        out += f"; bottleneck: {b.name} ({shares[b.name]:.0%} of stage time{ms})"
        rest = [f"{s.name} {shares[s.name]:.0%}" for s in top[1:3] if shares[s.name] >= 0.005]
        if rest:
            out += ", then " + ", ".join(rest)
        skipped = sum(s.skipped for s in self.stages)
        if skipped:
            out += f"; {skipped:,} skipped"
        if ld.get("wall_s"):
            share = ld["wait_s"] / ld.get("wall_sum_s", ld["wall_s"])  # over ranks: their mean share
            verdict = "data-bound" if share >= 0.1 else "the data keeps up"
            out += f"; the training loop waited on data {share:.0%} of its time ({verdict})"
        return out

    def table(self) -> str:
        """A fixed-width table, one row per stage."""
        shares = self.shares()
        lines = [f"{'stage':<16} {'in':>9} {'out':>9} {'MB':>8} {'skipped':>7} {'own s':>8} {'share':>6} "
                 f"{'wait s':>8} {'out/s (own)':>12}"]
        for s in self.stages:
            rate = s.rate()
            lines.append(f"{s.name:<16} {s.items_in:>9,} {s.items_out:>9,} {s.bytes / 1e6:>8.1f} {s.skipped:>7,} "
                         f"{s.own_s:>8.3f} {shares[s.name]:>6.1%} {s.wait_s:>8.3f} "
                         f"{(f'{rate:,.0f}' if rate is not None else '-'):>12}")
        lines.append(self.summary())
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"stages": [dataclasses.asdict(s) for s in self.stages], "slots": self.slots, "wall_s": self.wall_s,
                "state_s": self.state_s, "loader": self.loader, "bottleneck": (self.bottleneck() or StageReport(
                    "", 0, 0, 0, 0, 0, 0, None)).name, "summary": self.summary()}

    def __str__(self) -> str:
        return self.table()


__all__ = ["Report", "StageReport", "Telemetry", "gather_ranks", "merge", "timed"]
