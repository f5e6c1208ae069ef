"""`vs.Loader`: a torch DataLoader over a Pipeline that knows its epoch and its exact position.

Checkpoints follow torchdata's StatefulDataLoader idea: each worker sends, with every batch, the state of its
slot right after making that batch; the Loader keeps, per worker, the state that goes with the last batch the
user actually received, and which worker comes next. Resuming hands each worker its state back (buffers are
fetched again by reference) and replays the workers' round-robin order from where it stopped, so the batches
that follow are byte for byte those an uninterrupted run yields. Resumed on another topology (world size or
workers), the samples of the epoch not yet delivered are re-planned over the new slots: each delivered once.
"""

from __future__ import annotations

import copy
from collections import deque
from time import perf_counter
from typing import Any, Iterator, Mapping, Sequence

import torch.utils.data

from .checkpoint import (STATE_VERSION, ShardIndex, check_cursor, decode_plan, decode_refs, encode_plan, fingerprint,
                         seal, unseal)
from .pipeline import Context, Pipeline, distributed_rank_world, ref_items
from .sharedmem import Returns
from .split import SlotCursor, resume_items
from .tar import TarSamples


class Loader:
    """Iterate batches made inside the pipeline (``batch_size=None``), with `num_workers` processes.

    Rank and world size are read once here, in the training process, and handed to the workers with the
    pipeline. Each full pass advances the epoch, so shard order and shuffling change every epoch.
    ``state_dict()`` / ``load_state_dict()`` checkpoint the position (JSON-serialisable, kilobytes).
    """

    def __init__(self, pipeline: Pipeline, num_workers: int = 0, *, epoch: int = 0, **dataloader_kwargs: Any):
        self.pipeline = pipeline
        self.num_workers = num_workers
        self.epoch = epoch
        # collate_fn: batches are made in the pipeline; torch's default (default_convert) would walk and rebuild each
        # one, every dict and list of its metadata, in the worker (0.4 ms a batch of 32 conversations, measured)
        self.kwargs = {"pin_memory": False, "prefetch_factor": 2 if num_workers else None, "collate_fn": _as_is,
                       **dataloader_kwargs}
        self.kwargs.setdefault("persistent_workers", False)
        self._fresh_epoch()
        self._resume: dict[str, Any] | None = None
        self._worker_stats: dict[int, Any] = {}  # worker -> its latest telemetry snapshot (this iteration)
        self._times: dict[str, Any] = {}  # the training process's side of the telemetry
        self._fingerprint: str | None = None  # of the pipeline's shard lists, for checkpoints

    def _fresh_epoch(self) -> None:
        self.plan: list[dict[str, Any]] | None = None  # the rest of an epoch resumed on another topology
        self.states: dict[int, Any] = {}  # worker -> state after the last batch delivered from it
        self.done: set[int] = set()  # workers whose stream ended
        self.next_worker = 0
        self.delivered = 0

    @property
    def slots(self) -> int:
        return max(1, self.num_workers)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._fresh_epoch()

    def _where(self) -> tuple[int, int]:
        p = self.pipeline
        if p.rank is None or p.world_size is None:
            p.rank, p.world_size = distributed_rank_world()
        return p.rank, p.world_size

    def __iter__(self) -> Iterator[Any]:
        rank, world = self._where()
        p = self.pipeline
        p.set_epoch(self.epoch)
        p.snapshots = True
        p.resume = self._resume or {}
        self._resume = None
        self._worker_stats, times = {}, _LoaderTimes(self.slots)
        self._times = times.__dict__
        # Batches leave the workers in shared-memory segments that come back to them when freed (sharedmem.py);
        # not when pinning (the pinned copy is what the user gets) nor with persistent workers.
        recycle = self.num_workers and not self.kwargs["pin_memory"] and not self.kwargs["persistent_workers"]
        returns = Returns(self.num_workers, self.kwargs.get("multiprocessing_context")) if recycle else None
        p.returns = returns.readers if returns else None
        dl = torch.utils.data.DataLoader(p, batch_size=None, num_workers=self.num_workers, **self.kwargs)
        queues: dict[int, deque] = {w: deque() for w in range(self.slots)}
        try:
            batches = iter(dl)  # starts the workers, which took their ends of the return pipes with them
            if returns is not None:
                returns.close_readers()
                p.returns = None
            for x in times.timed(batches):
                w = x.pop("__worker__")
                if returns is not None:
                    x = returns.unpack(x, w)
                stats = x.pop("__stats__", None)
                if stats is not None:
                    self._worker_stats[w] = stats
                queues[w].append(x)
                yield from self._in_order(queues)
            yield from self._in_order(queues)
        finally:
            p.resume, p.returns = {}, None
            times.stop()
        if len(self.done) < self.slots:
            raise RuntimeError(f"workers {sorted(set(range(self.slots)) - self.done)} ended without their end marker")
        self.epoch += 1
        self._fresh_epoch()

    def _in_order(self, queues: dict[int, deque]) -> Iterator[Any]:
        """Emit in the workers' round-robin order from `next_worker`, whatever order batches arrive in."""
        while len(self.done) < self.slots:
            w = self.next_worker
            if w in self.done:
                self.next_worker = (w + 1) % self.slots
                continue
            if not queues[w]:
                return
            x = queues[w].popleft()
            self.states[w] = x.pop("__state__")
            self.next_worker = (w + 1) % self.slots
            if x.get("__worker_done__"):
                self.done.add(w)
                continue
            self.delivered += 1
            yield x

    def stats(self, all_ranks: bool = False) -> Any:
        """Per-stage telemetry of the current (or last) pass, merged over the DataLoader workers: a
        `vlmstream.telemetry.Report` (``.summary()``: one line naming the bottleneck; ``.table()``).
        ``all_ranks=True`` merges every rank's too (a collective under torch.distributed: call it on all ranks)."""
        from .telemetry import Report, gather_ranks, merge

        raw = merge(self._worker_stats[w] for w in sorted(self._worker_stats))
        if raw is not None:
            raw["loader"] = _LoaderTimes.public(self._times)
        if all_ranks:
            raw = gather_ranks(raw)
        return Report.from_raw(raw)

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything that decides what comes next: JSON-serialisable; keep it beside the model checkpoint.
        It names the data it was taken on and carries a digest over itself (vlmstream/checkpoint.py)."""
        rank, world = self._where()
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.pipeline)
        return seal({
            "version": STATE_VERSION,
            "data": self._fingerprint,
            "epoch": self.epoch,
            "rank": rank,
            "world_size": world,
            "num_workers": self.num_workers,
            "next_worker": self.next_worker,
            "done": sorted(self.done),
            "delivered": self.delivered,
            "workers": {str(w): s for w, s in sorted(self.states.items())},
            **({} if self.plan is None else {"plan": encode_plan(self.plan, self.pipeline.stages[0])}),
        })

    def load_state_dict(self, state: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Resume from this rank's state, or from the states of every rank of the run that saved them
        (a list: needed when the world size changed, since samples move between ranks).

        Each state is checked before it is used: its digest, the data it was taken on, and every place it
        points at; a state that does not fit is refused with the reason."""
        checked = [_checked(s, self.pipeline) for s in ([state] if isinstance(state, Mapping) else list(state))]
        states = [s for s, _ in checked]
        plan = checked[0][1]
        rank, world = self._where()
        first = states[0]
        self.epoch = first["epoch"]
        self._fresh_epoch()
        same = first["world_size"] == world and first["num_workers"] == self.num_workers
        if same:
            mine = [s for s in states if s["rank"] == rank]
            if not mine:
                raise ValueError(f"no state for rank {rank} among ranks {[s['rank'] for s in states]}")
            s = mine[0]
            self.states = {int(w): v for w, v in s["workers"].items()}
            self.done, self.next_worker, self.delivered = set(s["done"]), s["next_worker"], s["delivered"]
            self.plan = plan
            self._resume = {"states": dict(self.states), "plan": plan}
            return
        if any(hasattr(stage, "streams") for stage in self.pipeline.stages):
            raise ValueError("a mixed pipeline (vs.mix) resumes on the same topology only: keep the world size "
                             f"({first['world_size']}) and workers ({first['num_workers']}) for the rest of this epoch")
        ranks = sorted(s["rank"] for s in states)
        if ranks != list(range(first["world_size"])) or any(
                (s["epoch"], s["world_size"], s["num_workers"], s.get("plan")) != (
                    first["epoch"], first["world_size"], first["num_workers"], first.get("plan")) for s in states):
            raise ValueError(f"resuming on another topology needs the states of all {first['world_size']} ranks "
                             f"of the saved run, in one epoch; got ranks {ranks}")
        # What is left of the epoch; the split stages share it out over this run's ranks and workers.
        self.plan = remaining_items(self.pipeline, states, plan)
        self._resume = {"plan": self.plan}


def _checked(state: Mapping[str, Any], pipe: Pipeline) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """A loader state whose digest, data and topology fields hold, and whose slots fit this pipeline's shards;
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
        ctx = Context(rank, world, int(w), slots, pipe.seed, state["epoch"])
        check_slot(pipe, slot, ctx, shards, plan=plan)
    return state, plan


def check_slot(pipe: Pipeline, slot: Any, ctx: Context, shards: ShardIndex, stream: str | None = None,
               plan: list[dict[str, Any]] | None = None) -> None:
    """A slot's state against the slot it claims to be and the shards that slot holds (no I/O)."""
    where = f"slot rank {ctx.rank} worker {ctx.worker}" + ("" if stream is None else f" of stream {stream!r}")
    if not isinstance(slot, Mapping) or slot.get("version") != STATE_VERSION or \
            not isinstance(slot.get("stages"), list) or len(slot["stages"]) != len(pipe.stages):
        raise ValueError(f"checkpoint: {where}: malformed slot state (or one of another pipeline)")
    if list(slot.get("slot", [])) != [ctx.rank, ctx.world_size, ctx.worker, ctx.num_workers]:
        raise ValueError(f"checkpoint: {where}: the state says slot {slot.get('slot')}")
    ctx = Context(ctx.rank, ctx.world_size, ctx.worker, ctx.num_workers, ctx.seed, slot.get("epoch", ctx.epoch))
    reader = pipe._reader_index() if any(isinstance(s, TarSamples) for s in pipe.stages) else None
    for k, (stage, st) in enumerate(zip(pipe.stages, slot["stages"])):
        if st is None:
            continue
        if isinstance(st, Mapping) and "refs" in st:
            decode_refs(st, shards)  # each reference names its stream: checked against that stream's list
        if k == reader:
            check_cursor(st, _slot_items(pipe, ctx, reader, plan), shards, where)
        if hasattr(stage, "streams") and isinstance(st, Mapping):
            for name, sub in (st.get("streams") or {}).items():
                if name not in stage.streams:
                    raise ValueError(f"checkpoint: {where}: no stream {name!r} in this mix")
                if sub is not None:  # a stream's samples are its own pipeline's until the mix draws them
                    sub_pipe = stage.streams[name].pipeline
                    check_slot(sub_pipe, sub, ctx, ShardIndex(sub_pipe), name)


def _as_is(batch: Any) -> Any:
    return batch


class _LoaderTimes:
    """The training process's side: batches received, time waiting on the DataLoader, time to the first one."""

    def __init__(self, workers: int):
        self.t0 = perf_counter()
        self.t_end: float | None = None
        self.batches = 0
        self.wait_s = 0.0
        self.first_batch_s: float | None = None
        self.workers = workers

    def timed(self, it: Any) -> Iterator[Any]:
        nxt = iter(it).__next__
        while True:
            t0 = perf_counter()
            try:
                x = nxt()
            except StopIteration:
                self.wait_s += perf_counter() - t0
                return
            t1 = perf_counter()
            self.wait_s += t1 - t0
            if not x.get("__worker_done__"):
                self.batches += 1
                if self.first_batch_s is None:
                    self.first_batch_s = t1 - self.t0
            yield x
            x = None

    def stop(self) -> None:
        self.t_end = perf_counter()

    @staticmethod
    def public(d: Mapping[str, Any]) -> dict[str, Any] | None:
        if not d:
            return None
        end = d["t_end"] if d["t_end"] is not None else perf_counter()
        return {"ranks": 1, "batches": d["batches"], "wall_s": end - d["t0"], "wait_s": d["wait_s"],
                "first_batch_s": d["first_batch_s"], "workers": d["workers"]}


def remaining_items(pipe: Pipeline, states: Sequence[Mapping[str, Any]], plan: list[dict[str, Any]] | None = None
                    ) -> list[dict[str, Any]]:
    """The shard items of the saved epoch not yet delivered: unfinished shards from where they stopped, and
    the samples that sat in buffers, as reference items. Padding and quotas of the old split are dropped.
    ``plan``: what the saved run read instead of the epoch's order (it was itself resumed on another topology)."""
    shards = ShardIndex(pipe)  # states hold URLs redacted
    reader = pipe._reader_index()
    out: list[dict[str, Any]] = []
    refs: list[tuple] = []
    for st in states:
        workers = st["num_workers"] or 1
        for w in range(max(1, workers)):
            slot = st["workers"].get(str(w))
            ctx = Context(st["rank"], st["world_size"], w, max(1, workers), pipe.seed, st["epoch"])
            items = _slot_items(pipe, ctx, reader, plan)
            cursor = SlotCursor(**slot["stages"][reader]) if slot is not None else SlotCursor()
            left = [{key: v for key, v in item.items() if key not in ("quota", "slot_total", "node_split",
                                                                     "worker_split")}
                    for item in items if not item.get("padding")]
            for item in resume_items(iter(left), cursor):
                if "skip_through" in item:
                    item["samples"] = None
                out.append({**item, "resumed": True})
            if slot is not None:
                for st_k in slot["stages"]:
                    if isinstance(st_k, dict) and "refs" in st_k:
                        refs += decode_refs(st_k, shards)
    out += [{**item, "resumed": True} for item in sorted(ref_items(refs), key=lambda i: i["url"])]
    return out


def _slot_items(pipe: Pipeline, ctx: Context, reader: int, plan: list[dict[str, Any]] | None = None
                ) -> list[dict[str, Any]]:
    """The shard items a slot of the saved run held: its list stages run again (no I/O: lists are resolved),
    on the plan it read instead of the source's epoch order where there was one."""
    opener = pipe._opener_index()
    stop = opener if opener >= 0 else reader
    it: Iterator[Any] = iter(())
    for k, stage in enumerate(pipe.stages[:stop]):
        if k == 0 and plan is not None:
            it = iter([dict(item) for item in plan])
            continue
        stage = copy.copy(stage)
        if hasattr(stage, "bind"):
            stage.bind(ctx)
        it = stage(it)
    return list(it)


__all__ = ["Loader", "remaining_items"]
