"""Checkpoints, in one place: what a slot's state holds, how a slot resumes from it, how the rest of an epoch
is re-planned on another topology, and how a state is checked before it is trusted.

A slot's state is its stages' states: the reader's cursor (`SlotCursor`: shard tasks finished, the last sample
delivered of the current one), buffers as references to samples (a shuffle buffer, the packer's pending
samples), random generators. Resuming skips the finished tasks before the opener (no request), opens the current
shard at the byte where its next sample starts, and fetches buffered samples again by reference, rebuilding them
through the one-in-one-out stages between the reader and the buffer (`map_sample`). On another topology the
samples of the epoch not yet delivered become a plan (`remaining_tasks`) that the split stages share out anew.

A state is only as good as its fit to the data it is resumed on. Three checks, so that a resume either
continues exactly or refuses with a clear error, never silently delivers wrong data:

- **What it was taken on**: `fingerprint` hashes the resolved shard lists (URLs as shown, sample counts,
  sizes, sha256 from the manifest). A resume on a list that was reordered, extended or repacked is refused.
- **That it is intact**: `seal` adds a digest over the whole state; `unseal` refuses a state edited or cut.
- **Where it points**: every cursor and reference is checked against the shard list (an URL not in it is
  never opened; indexes and offsets within the shard's manifest counts), and each carries the key of its
  sample, compared where the sample is read again: a shard changed in place under the same name is caught
  there (the reader raises ``changed``).

A reference is (source, url, offset, index, key): the stream the sample came from (None outside `vs.mix`),
its shard, the byte offset of its first tar header, its position in the shard and its key. Lists of
references are stored with a table of URLs, so that a shuffle buffer of thousands of samples costs
kilobytes. URLs are stored redacted (no credentials); `ShardIndex` maps them back to the pipeline's own list.
docs/RESUME.md describes it for users.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from ..errors import redact
from .stage import MIXER, OPENER, READER, SOURCE, Context, OpenShard, ShardTask, find_role, role_of

STATE_VERSION = 2  # of a slot's state and of the Loader's
BLOCK = 512  # tar headers start on 512-byte blocks

Ref = tuple  # (source: str | None, url: str, offset: int, index: int, key: str)


# ---------------------------------------------------------------------------------------------------- cursor


@dataclass
class SlotCursor:
    """How far a slot got: the resume point a checkpoint records (small: a few numbers, a key and a URL)."""

    item: int = 0  # shard tasks of the slot's list finished
    index: int | None = None  # __index__ of the last sample yielded from the current task
    offset: int | None = None  # that sample's __offset__
    key: str | None = None  # its __key__: checked where the resumed reader meets it again
    url: str | None = None  # its shard, redacted: checked against the task the resumed slot holds there
    count: int = 0  # samples yielded so far (the quota counts these)
    real: int = 0  # of which not padding

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resume_tasks(tasks: Iterator[ShardTask], cursor: SlotCursor) -> Iterator[ShardTask]:
    """Skip the tasks a slot finished, and start its current task just after the last sample it yielded:
    at that sample's byte offset (a seek or a Range request), not from the start of the shard."""
    for k, task in enumerate(tasks):
        if k < cursor.item:
            continue
        if k == cursor.item and cursor.index is not None:
            if redact(task.url) != cursor.url:  # never read at an offset that belongs to another shard
                raise ValueError(f"checkpoint: the slot's task {k} is {redact(task.url)}, but its cursor is in "
                                 f"{cursor.url}: the state does not fit these shards")
            task = dataclasses.replace(task, skip_through=cursor.index, skip_key=cursor.key)
            if task.refs is None and not _compressed(task.url):  # offsets are uncompressed: re-read and skip
                task = dataclasses.replace(task, start_offset=cursor.offset, start_index=cursor.index)
        yield task


def check_cursor(cursor: Any, tasks: Sequence[ShardTask], shards: "ShardIndex", where: str) -> None:
    """A slot's cursor against the shard tasks that slot holds: in range, on the same shard, within it."""
    fields = {f.name for f in dataclasses.fields(SlotCursor)}
    if not isinstance(cursor, Mapping) or set(cursor) != fields:
        raise ValueError(f"checkpoint: {where}: malformed cursor {cursor!r:.200}")
    item, index = cursor["item"], cursor["index"]
    if not (_natural(item) and item <= len(tasks) and _natural(cursor["count"]) and _natural(cursor["real"])):
        raise ValueError(f"checkpoint: {where}: cursor at task {item!r} of {len(tasks)} (or bad counts): the state "
                         "does not fit this slot's shards")
    if index is None:
        if any(cursor[k] is not None for k in ("offset", "key", "url")):
            raise ValueError(f"checkpoint: {where}: malformed cursor {dict(cursor)!r:.200}")
        return
    if item == len(tasks) or redact(tasks[item].url) != cursor["url"]:
        found = redact(tasks[item].url) if item < len(tasks) else "no shard"
        raise ValueError(f"checkpoint: {where}: the cursor is in {cursor['url']} but this slot's task {item} is "
                         f"{found}: the state does not fit these shards")
    shards.check(None, tasks[item].url, cursor["offset"], index, cursor["key"], "cursor")


# ------------------------------------------------------------------------------------------------ references


def ref_of(sample: Mapping[str, Any]) -> Ref:
    try:
        return (sample.get("__source__"), sample["__url__"], sample["__offset__"], sample["__index__"],
                sample["__key__"])
    except KeyError as e:
        raise ValueError(f"sample {sample.get('__key__', '?')!r} has no provenance ({e.args[0]}): a resumable "
                         "pipeline keeps the keys tar_samples adds (__url__, __offset__, __index__)") from None


def encode_refs(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Samples -> {"urls": [(source, url), ...], "refs": [[url number, offset, index, key], ...]} (JSON-able)."""
    table: dict[tuple, int] = {}
    refs = []
    for s in samples:
        source, url, offset, index, key = ref_of(s)
        refs.append([table.setdefault((source, redact(url)), len(table)), offset, index, key])
    return {"urls": [list(k) for k in table], "refs": refs}


def decode_refs(state: Mapping[str, Any], shards: "ShardIndex") -> list[Ref]:
    """The references of a state, each checked against the shard list, with the URLs to open."""
    try:
        urls = [(source, shards.url(source, url)) for source, url in state["urls"]]
        refs = [(*urls[u], offset, index, key) for u, offset, index, key in state["refs"]]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        if isinstance(e, ValueError) and str(e).startswith("checkpoint"):
            raise
        raise ValueError(f"checkpoint: malformed sample references ({type(e).__name__}: {e})") from None
    for source, url, offset, index, key in refs:
        shards.check(source, url, offset, index, key, "reference")
    return refs


class ShardIndex:
    """The pipeline's resolved shard lists by (source, URL as a state shows it): what a state may point at."""

    def __init__(self, pipe: Any):
        self.specs: dict[tuple[Any, str], Any] = {}
        self.ambiguous: set[tuple[Any, str]] = set()
        for source, specs in shard_lists(pipe):
            for spec in specs:
                shown = (source, redact(spec.url))
                if shown in self.specs and self.specs[shown].url != spec.url:
                    self.ambiguous.add(shown)
                self.specs[shown] = spec

    def url(self, source: Any, shown: str) -> str:
        """The URL to open for a URL as a state stores it (redacted)."""
        if (source, shown) in self.ambiguous:
            raise ValueError(f"checkpoint: {shown}: several shards of the list have this URL once credentials are "
                             "removed; the checkpoint cannot tell them apart (keep tokens in fetch(headers=...))")
        spec = self.specs.get((source, shown))
        if spec is None:
            where = "" if source is None else f" of stream {source!r}"
            raise ValueError(f"checkpoint: {shown} is not in the shard list{where}: the state was taken on other data "
                             "or altered")
        return spec.url

    def spec(self, source: Any, url: str) -> Any:
        return self.specs.get((source, redact(url)))

    def check(self, source: Any, url: str, offset: Any, index: Any, key: Any, what: str) -> None:
        """A place in a shard, within the bounds the manifest gives (where it gives them)."""
        spec = self.spec(source, url)
        if spec is None:
            raise ValueError(f"checkpoint: {redact(url)} is not in the shard list")
        samples, size = getattr(spec, "samples", None), getattr(spec, "bytes", None)
        ok = (_natural(offset) and offset % BLOCK == 0 and _natural(index) and isinstance(key, str)
              and (samples is None or index < samples)
              and (size is None or _compressed(url) or offset < size))
        if not ok:
            raise ValueError(f"checkpoint: {what} to {redact(url)} out of bounds: offset {offset!r}, index {index!r}, "
                             f"key {key!r} (the shard has {samples if samples is not None else '?'} samples, "
                             f"{size if size is not None else '?'} bytes)")


def shard_lists(pipe: Any, source: Any = None) -> Iterator[tuple[Any, Sequence[Any]]]:
    """(source, resolved shard list) of every source stage in ``pipe``, streams of a `vs.mix` included."""
    for stage in pipe.stages:
        if role_of(stage) == SOURCE:
            yield source, stage.specs
        elif role_of(stage) == MIXER:
            for name, stream in stage.streams.items():
                yield from shard_lists(stream.pipeline, name)


def _natural(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _compressed(url: str) -> bool:
    """Offsets count uncompressed bytes: a gzip shard's size says nothing about them."""
    return url.endswith((".gz", ".tgz"))


# ------------------------------------------------------------------------------------------------------ plans


def encode_plan(tasks: Sequence[ShardTask], source: Any) -> list[Any]:
    """The rest of an epoch resumed on another topology, JSON-able and small: a shard read whole is its number
    in the source's list; anything else (a shard read from a resume point, samples by reference) the fields
    that differ from a task's defaults, its URL redacted."""
    out: list[Any] = []
    for task in tasks:
        plain = dataclasses.replace(task, resumed=False)
        if task.shard is not None and hasattr(source, "task") and plain == source.task(task.shard):
            out.append(task.shard)
            continue
        fields = {f.name: getattr(task, f.name) for f in dataclasses.fields(ShardTask)
                  if f.name != "resumed" and getattr(task, f.name) != f.default}
        if task.refs is not None:
            fields["refs"] = [list(r) for r in task.refs]
        out.append({**fields, "url": redact(task.url)})
    return out


def decode_plan(doc: Any, source: Any, shards: "ShardIndex") -> list[ShardTask]:
    """Plan tasks from `encode_plan`'s form, each checked against the shard list."""
    if not isinstance(doc, list):
        raise ValueError("checkpoint: malformed plan")
    n = len(getattr(source, "specs", ()))
    names = {f.name for f in dataclasses.fields(ShardTask)}
    tasks = []
    for x in doc:
        if _natural(x):
            if x >= n:
                raise ValueError(f"checkpoint: plan names shard {x} of {n}")
            tasks.append(dataclasses.replace(source.task(x), resumed=True))
            continue
        if not isinstance(x, Mapping) or not isinstance(x.get("url"), str) or not set(x) <= names:
            raise ValueError(f"checkpoint: malformed plan task {x!r:.200}")
        fields = {**x, "url": shards.url(None, x["url"]), "resumed": True}
        if "refs" in fields:
            refs = fields["refs"]
            if not isinstance(refs, list) or not refs or not all(isinstance(r, list) and len(r) == 2 for r in refs):
                raise ValueError(f"checkpoint: malformed plan task {x!r:.200}")
            fields["refs"] = tuple(tuple(r) for r in refs)
        try:
            task = ShardTask(**fields)
        except TypeError as e:
            raise ValueError(f"checkpoint: malformed plan task {x!r:.200} ({e})") from None
        if task.refs is not None:
            shards.check(None, task.url, task.start_offset, task.start_index, task.refs[0][1], "plan task")
        elif task.skip_key is not None:
            shards.check(None, task.url, task.start_offset, task.skip_through, task.skip_key, "plan task")
        tasks.append(task)
    return tasks


def ref_tasks(refs: Sequence[Ref]) -> list[ShardTask]:
    """Shard tasks that read the referenced samples again: one per shard, from its first referenced byte."""
    by_url: dict[str, list[tuple[int, int, str]]] = {}
    for _, url, offset, index, key in refs:
        by_url.setdefault(url, []).append((offset, index, key))
    tasks = []
    for url, places in by_url.items():
        places.sort()
        tasks.append(ShardTask(url, refs=tuple((i, k) for _, i, k in places), start_offset=places[0][0],
                               start_index=places[0][1], samples=len(places)))
    return tasks


def slot_tasks(pipe: Any, ctx: Context, plan: Sequence[ShardTask] | None = None) -> list[ShardTask]:
    """The shard tasks a slot holds: the stages before the opener run again for it (no I/O: lists are
    resolved), on the plan it reads instead of the source's epoch order where there is one."""
    _reader_index(pipe)  # raises where no stage reads shards
    stop = _opener_index(pipe)
    it: Iterator[Any] = iter(())
    for k, stage in enumerate(pipe.stages[:stop]):
        if k == 0 and plan is not None:
            it = iter(list(plan))
            continue
        stage = copy.copy(stage)  # binding another slot's context must not touch the stages that run
        if hasattr(stage, "bind"):
            stage.bind(ctx)
        it = stage(it)
    return list(it)


def remaining_tasks(pipe: Any, states: Sequence[Mapping[str, Any]], plan: Sequence[ShardTask] | None = None
                    ) -> list[ShardTask]:
    """The shard tasks of the saved epoch not yet delivered, over every slot of every saved rank: unfinished
    shards from where they stopped, untouched ones whole, and the samples that sat in buffers, as reference
    tasks. Padding and quotas of the old split are dropped. ``plan``: what the saved run read instead of the
    epoch's order (it was itself resumed on another topology)."""
    shards = ShardIndex(pipe)
    reader = _reader_index(pipe)
    out: list[ShardTask] = []
    refs: list[Ref] = []
    for st in states:
        workers = max(1, st["num_workers"] or 1)
        for w in range(workers):
            slot = st["workers"].get(str(w))
            ctx = Context(st["rank"], st["world_size"], w, workers, pipe.seed, st["epoch"])
            left = [dataclasses.replace(t, quota=None, slot_total=None, worker_split=False)
                    for t in slot_tasks(pipe, ctx, plan) if not t.padding]
            cursor = SlotCursor(**slot["stages"][reader]) if slot is not None else SlotCursor()
            for task in resume_tasks(iter(left), cursor):
                if task.skip_through >= 0:  # its count no longer says what is left of it
                    task = dataclasses.replace(task, samples=None)
                out.append(dataclasses.replace(task, resumed=True))
            for st_k in (slot["stages"] if slot is not None else ()):
                if isinstance(st_k, Mapping) and "refs" in st_k:
                    refs += decode_refs(st_k, shards)
    out += [dataclasses.replace(t, resumed=True) for t in sorted(ref_tasks(refs), key=lambda t: t.url)]
    return out


# ------------------------------------------------------------------------------------------- a slot's state


def slot_state(pipe: Any, ctx: Context) -> dict[str, Any]:
    """A slot's state now: every stage's (cursor, buffers as references, random generators)."""
    return {
        "version": STATE_VERSION,
        "epoch": ctx.epoch,
        "slot": [ctx.rank, ctx.world_size, ctx.worker, ctx.num_workers],
        "stages": [s.state_dict() if hasattr(s, "state_dict") else None for s in pipe.stages],
    }


@dataclass
class SlotResume:
    """What one slot of a pipeline resumes from: its state (None: the start of its share) and the plan it reads
    instead of the source's epoch order (None: that order). `Pipeline.iterate` asks it two things: to restore
    the stages before they run, and which callable to run at each place of the chain."""

    state: Mapping[str, Any] | None = None
    plan: Sequence[ShardTask] | None = None

    def restore(self, pipe: Any) -> None:
        """Each stage's state loaded; buffered samples fetched again and rebuilt up to their stage."""
        if self.state is None:
            return
        if self.state.get("version") != STATE_VERSION:
            raise ValueError(f"checkpoint state version {self.state.get('version')!r}; this vlmstream reads "
                             f"{STATE_VERSION}")
        for k, (stage, st) in enumerate(zip(pipe.stages, self.state["stages"])):
            if st is None:
                continue
            if "refs" in st:
                stage.load_state_dict(st, rematerialize(pipe, st, k))
            else:
                stage.load_state_dict(st)

    def stage_at(self, pipe: Any, k: int, stage: Any) -> Any:
        """The callable to run at place ``k``: the plan instead of the source; before the opener, the cursor's
        skipping of finished tasks (so that they are never opened)."""
        if k == 0 and self.plan is not None:
            plan = self.plan
            return lambda _: iter(list(plan))
        if self.state is not None and k == _opener_index(pipe):  # a mix's own pipeline has no reader: no cursor
            cursor = SlotCursor(**self.state["stages"][_reader_index(pipe)])
            return lambda it: stage(resume_tasks(it, cursor))
        return stage


def rematerialize(pipe: Any, refs_state: Mapping[str, Any], upto: int) -> list[Any]:
    """Buffered samples fetched again by reference (through their stream's reader, under vs.mix), then
    passed through the one-in-one-out stages (decode, tokenize) between the producer and stage ``upto``."""
    refs = decode_refs(refs_state, ShardIndex(pipe))  # states hold URLs redacted
    producer = find_role(pipe.stages, MIXER)
    if producer is None:
        producer = _reader_index(pipe)
    found: dict[tuple[Any, str, int], Any] = {}
    for source in {r[0] for r in refs}:
        part = [r for r in refs if r[0] == source]
        sub = pipe if source is None else pipe.stages[producer].streams[source].pipeline
        for (url, index), sample in read_refs(sub, part).items():
            found[(source, url, index)] = sample
    out = []
    for source, url, _, index, _ in refs:
        sample = found[(source, url, index)]
        if source is not None:
            sample["__source__"] = source
        for stage in pipe.stages[producer + 1:upto]:
            if hasattr(stage, "map_sample"):
                sample = stage.map_sample(sample)
            elif not hasattr(stage, "state_dict"):
                raise ValueError(f"cannot rebuild buffered samples through stage {stage!r}: give it a "
                                 "map_sample(sample) method, or place it after the buffering stages")
        out.append(sample)
    return out


def read_refs(pipe: Any, refs: Sequence[Ref]) -> dict[tuple[str, int], Any]:
    """Samples fetched again by reference through the pipeline's own opener and reader, one read per shard
    from its first referenced byte."""
    reader = pipe.stages[_reader_index(pipe)]
    k = find_role(pipe.stages, OPENER)
    found: dict[tuple[str, int], Any] = {}
    for task in ref_tasks(refs):
        if k is not None:
            stream = pipe.stages[k].open(task)
        else:
            from ..io.urls import open_url

            stream = open_url(task.url, start=task.start_offset)
        for sample in reader.read(OpenShard(task, stream)):
            found[(task.url, sample["__index__"])] = sample
    return found


def _reader_index(pipe: Any) -> int:
    """The stage where shards become samples: it holds the slot's cursor."""
    k = find_role(pipe.stages, READER)
    if k is None:
        raise ValueError("a resumable pipeline reads shards with vs.tar_samples() (or a stage with role READER)")
    return k


def _opener_index(pipe: Any) -> int | None:
    """Where the cursor's task skipping goes: before the opener (no request for finished shards), else before
    the reader; None in a pipeline that reads no shards itself (a mix's: its streams do)."""
    k = find_role(pipe.stages, OPENER)
    return k if k is not None else find_role(pipe.stages, READER)


# --------------------------------------------------------------------------------------------- the whole state


def fingerprint(pipe: Any) -> str:
    """What a state was taken on: a hash of the pipeline's resolved shard lists (URLs as shown, counts, sizes,
    checksums, in order)."""
    doc = [[source, [[redact(s.url), getattr(s, "samples", None), getattr(s, "bytes", None),
                      getattr(s, "sha256", None)] for s in specs]] for source, specs in shard_lists(pipe)]
    return hashlib.sha256(_canonical(doc)).hexdigest()


def seal(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state with a digest over everything else in it."""
    body = {k: v for k, v in state.items() if k != "digest"}
    return {**body, "digest": hashlib.sha256(_canonical(body)).hexdigest()}


def unseal(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state without its digest, once the digest matches (an edited, cut or unsealed state is refused)."""
    body = {k: v for k, v in state.items() if k != "digest"}
    try:
        digest = hashlib.sha256(_canonical(body)).hexdigest()
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint: the state is not plain JSON data ({e}): its digest cannot be checked") from None
    if state.get("digest") != digest:
        raise ValueError("checkpoint: the state's digest does not match its content: it was edited, truncated or "
                         "not made by Loader.state_dict()")
    return body


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


# ------------------------------------------------------------------------------------------ a Loader's state


def check_loader_state(state: Any, pipe: Any) -> tuple[dict[str, Any], list[ShardTask] | None]:
    """A Loader state whose digest, data and topology fields hold, and whose slots fit this pipeline's shards;
    with the plan it was running (None: the epoch's own order)."""
    if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
        found = state.get("version") if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"loader state version {found!r}; this vlmstream reads {STATE_VERSION}")
    state = unseal(state)
    if state.get("data") != fingerprint(pipe):
        raise ValueError("checkpoint: the state was taken on another shard list (shards reordered, added, removed "
                         "or repacked since): resuming it here would deliver wrong samples. Resume on the same data "
                         "(an hf:// branch that moved: name the commit), or start the epoch afresh")
    try:
        world, workers, rank = state["world_size"], state["num_workers"], state["rank"]
        slots = max(1, workers)
        ok = (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world
              and isinstance(workers, int) and workers >= 0 and isinstance(state["epoch"], int) and state["epoch"] >= 0
              and state["next_worker"] in range(slots) and set(state["done"]) <= set(range(slots))
              and {int(w) for w in state["workers"]} <= set(range(slots)))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"checkpoint: malformed loader state ({type(e).__name__}: {e})") from None
    if not ok:
        raise ValueError(f"checkpoint: loader state fields out of range: rank {rank} of {world}, {workers} workers, "
                         f"next worker {state['next_worker']}, done {state['done']}")
    shards = ShardIndex(pipe)
    plan = decode_plan(state["plan"], pipe.stages[0], shards) if "plan" in state else None
    for w, slot in state["workers"].items():
        check_slot(pipe, slot, Context(rank, world, int(w), slots, pipe.seed, state["epoch"]), shards, plan=plan)
    return state, plan


def check_slot(pipe: Any, slot: Any, ctx: Context, shards: ShardIndex, stream: str | None = None,
               plan: Sequence[ShardTask] | None = None) -> None:
    """A slot's state against the slot it claims to be and the shards that slot holds (no I/O)."""
    where = f"slot rank {ctx.rank} worker {ctx.worker}" + ("" if stream is None else f" of stream {stream!r}")
    if not isinstance(slot, Mapping) or slot.get("version") != STATE_VERSION or \
            not isinstance(slot.get("stages"), list) or len(slot["stages"]) != len(pipe.stages):
        raise ValueError(f"checkpoint: {where}: malformed slot state (or one of another pipeline)")
    if list(slot.get("slot", [])) != [ctx.rank, ctx.world_size, ctx.worker, ctx.num_workers]:
        raise ValueError(f"checkpoint: {where}: the state says slot {slot.get('slot')}")
    ctx = dataclasses.replace(ctx, epoch=slot.get("epoch", ctx.epoch))
    reader = find_role(pipe.stages, READER)
    for k, (stage, st) in enumerate(zip(pipe.stages, slot["stages"])):
        if st is None:
            continue
        if isinstance(st, Mapping) and "refs" in st:
            decode_refs(st, shards)  # each reference names its stream: checked against that stream's list
        if k == reader:
            check_cursor(st, slot_tasks(pipe, ctx, plan), shards, where)
        if role_of(stage) == MIXER and isinstance(st, Mapping):
            for name, sub in (st.get("streams") or {}).items():
                if name not in stage.streams:
                    raise ValueError(f"checkpoint: {where}: no stream {name!r} in this mix")
                if sub is not None:  # a stream's samples are its own pipeline's until the mix draws them
                    sub_pipe = stage.streams[name].pipeline
                    check_slot(sub_pipe, sub, ctx, ShardIndex(sub_pipe), name)


# ------------------------------------------------------------------------------------------- random generators


def rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def rng_from(state: Sequence) -> random.Random:
    rng = random.Random()
    try:
        rng.setstate((state[0], tuple(state[1]), state[2]))
    except (TypeError, ValueError, IndexError) as e:
        raise ValueError(f"checkpoint: malformed random generator state ({e})") from None
    return rng
