"""`vs.Loader`: a torch DataLoader over a Pipeline that knows its epoch and its exact position.

Checkpoints follow torchdata's StatefulDataLoader idea: each worker sends, with every batch, the state of its
slot right after making that batch; the Loader keeps, per worker, the state that goes with the last batch the
user actually received, and which worker comes next. Resuming hands each worker its state back (buffers are
fetched again by reference) and replays the workers' round-robin order from where it stopped, so the batches
that follow are byte for byte those an uninterrupted run yields. Resumed on another topology (world size or
workers), the samples of the epoch not yet delivered are re-planned over the new slots: each delivered once.
"""

from __future__ import annotations

from collections import deque
from time import perf_counter
from typing import Any, Iterator, Mapping, Sequence

import torch.utils.data

from ..io.store import is_store_url
from .checkpoint import (STATE_VERSION, SlotResume, check_loader_state, encode_plan, fingerprint, remaining_tasks, seal,
                         shard_lists, slot_state)
from .pipeline import Pipeline
from .sharedmem import Returns, SegmentPool
from .stage import MIXER, ShardTask, find_role
from .telemetry import Report, gather_ranks, merge


class _Workers(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs: its slot of the pipeline, resumed where the Loader says, each batch sent
    with the slot's state after it (and the telemetry counters), then an end marker; batches leave through
    shared memory (core/sharedmem.py), the segments coming back through ``returns``."""

    def __init__(self, pipeline: Pipeline, states: Mapping[int, Any], plan: Sequence[ShardTask] | None,
                 returns: list | None):
        self.pipeline, self.states, self.plan, self.returns = pipeline, states, plan, returns

    def __iter__(self) -> Iterator[Any]:
        p = self.pipeline
        ctx = p.context()
        state = self.states.get(ctx.worker)
        resume = SlotResume(state, self.plan) if state is not None or self.plan is not None else None
        pool = SegmentPool(self.returns[ctx.worker] if self.returns else None)
        it = p.iterate(ctx, resume, memory=pool if pool.returns else None)
        return pool.ship(self._with_states(it, ctx))

    def _with_states(self, it: Iterator[Any], ctx: Any) -> Iterator[Any]:
        for x in it:
            if not isinstance(x, dict):
                raise TypeError(f"a checkpointed pipeline yields dicts (batches), got {type(x).__name__}")
            yield {**x, **self._snapshot(ctx)}
        yield {"__worker_done__": True, **self._snapshot(ctx)}

    def _snapshot(self, ctx: Any) -> dict[str, Any]:
        p, tel = self.pipeline, self.pipeline._telemetry
        if tel is None:
            return {"__state__": slot_state(p, ctx), "__worker__": ctx.worker}
        t0 = perf_counter()
        state = slot_state(p, ctx)
        tel.state_s += perf_counter() - t0
        return {"__state__": state, "__worker__": ctx.worker, "__stats__": tel.snapshot(p.stages)}


class Loader:
    """Iterate batches made inside the pipeline (``batch_size=None``), with `num_workers` processes.

    Rank and world size are read once here, in the training process, and handed to the workers with the
    pipeline. Workers start with "forkserver" when the pipeline reads object stores (their client does not
    survive fork), else as torch starts them (fork on Linux). Each full pass advances the epoch, so shard order and shuffling change every epoch.
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
        if num_workers and "multiprocessing_context" not in dataloader_kwargs and reads_object_stores(pipeline):
            # obstore's runtime does not survive fork() once used (the listing used it here): workers start clean
            self.kwargs["multiprocessing_context"] = start_forkserver(pipeline)
        self._fresh_epoch()
        self._resume: dict[int, Any] = {}  # worker -> the state it resumes from, for the next pass only
        self._worker_stats: dict[int, Any] = {}  # worker -> its latest telemetry snapshot (this iteration)
        self._times: dict[str, Any] = {}  # the training process's side of the telemetry
        self._fingerprint: str | None = None  # of the pipeline's shard lists, for checkpoints

    def _fresh_epoch(self) -> None:
        self.plan: list[ShardTask] | None = None  # the rest of an epoch resumed on another topology
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

    def __iter__(self) -> Iterator[Any]:
        p = self.pipeline
        p.where()  # once, here in the training process; the workers get it with the pipeline
        p.set_epoch(self.epoch)
        resume, self._resume = self._resume, {}
        self._worker_stats, times = {}, _LoaderTimes(self.slots)
        self._times = times.__dict__
        # Batches leave the workers in shared-memory segments that come back to them when freed (sharedmem.py);
        # not when pinning (the pinned copy is what the user gets) nor with persistent workers.
        recycle = self.num_workers and not self.kwargs["pin_memory"] and not self.kwargs["persistent_workers"]
        returns = Returns(self.num_workers, self.kwargs.get("multiprocessing_context")) if recycle else None
        workers = _Workers(p, resume, self.plan, returns.readers if returns else None)
        dl = torch.utils.data.DataLoader(workers, batch_size=None, num_workers=self.num_workers, **self.kwargs)
        queues: dict[int, deque] = {w: deque() for w in range(self.slots)}
        try:
            batches = iter(dl)  # starts the workers, which took their ends of the return pipes with them
            if returns is not None:
                returns.close_readers()
                workers.returns = None
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
        `Report` (``.summary()``: one line naming the bottleneck; ``.table()``). ``all_ranks=True`` merges
        every rank's too (a collective under torch.distributed: call it on all ranks)."""
        raw = merge(self._worker_stats[w] for w in sorted(self._worker_stats))
        if raw is not None:
            raw["loader"] = _LoaderTimes.public(self._times)
        if all_ranks:
            raw = gather_ranks(raw)
        return Report.from_raw(raw)

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything that decides what comes next: JSON-serialisable; keep it beside the model checkpoint.
        It names the data it was taken on and carries a digest over itself (core/checkpoint.py)."""
        rank, world = self.pipeline.where()
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
        checked = [check_loader_state(s, self.pipeline) for s in ([state] if isinstance(state, Mapping) else list(state))]
        states = [s for s, _ in checked]
        plan = checked[0][1]
        rank, world = self.pipeline.where()
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
            self._resume = dict(self.states)
            return
        if find_role(self.pipeline.stages, MIXER) is not None:
            raise ValueError("a mixed pipeline (vs.mix) resumes on the same topology only: keep the world size "
                             f"({first['world_size']}) and workers ({first['num_workers']}) for the rest of this epoch")
        ranks = sorted(s["rank"] for s in states)
        if ranks != list(range(first["world_size"])) or any(
                (s["epoch"], s["world_size"], s["num_workers"], s.get("plan")) != (
                    first["epoch"], first["world_size"], first["num_workers"], first.get("plan")) for s in states):
            raise ValueError(f"resuming on another topology needs the states of all {first['world_size']} ranks "
                             f"of the saved run, in one epoch; got ranks {ranks}")
        # What is left of the epoch; the split stages share it out over this run's ranks and workers.
        self.plan = remaining_tasks(self.pipeline, states, plan)
        self._resume = {}


def start_forkserver(pipeline: Pipeline) -> str:
    """Start the forkserver now, with torch and the pipeline's modules imported once in it: each epoch's workers
    fork from it in a tenth of a second, instead of importing torch anew (1.5 s), and the first epoch's import
    runs while the training process sets up its model."""
    import multiprocessing
    from multiprocessing import forkserver

    if getattr(forkserver._forkserver, "_forkserver_pid", None) is None:  # its modules can be set before it starts
        modules = {"torch", __name__, *(type(s).__module__ for s in pipeline.stages)}
        multiprocessing.get_context("forkserver").set_forkserver_preload(sorted(modules))
        forkserver.ensure_running()
    return "forkserver"


def reads_object_stores(pipeline: Pipeline) -> bool:
    """Whether any shard list of the pipeline (a mix's streams included) names an object-store URL."""
    return any(is_store_url(s.url) for _, specs in shard_lists(pipeline) for s in specs)


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


__all__ = ["Loader"]
