"""The pipeline: a chain of stages, each an iterator-to-iterator callable, run as a torch IterableDataset.

A stage may also define:
  - ``bind(ctx)``: receive where it runs (rank, worker, seed, epoch) before an iteration starts;
  - ``state_dict()`` / ``load_state_dict(state)``: report and restore what it holds across items.
Nothing reaches a stage through globals or environment variables: the pipeline hands it a Context.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from time import perf_counter
from typing import Any, Callable, Iterator, Mapping

import torch.utils.data

from .checkpoint import STATE_VERSION, ShardIndex, decode_refs
from .sharedmem import SegmentPool  # imported here, not in the DataLoader workers: they inherit modules
from .telemetry import Report, Telemetry, unique_names

Stage = Callable[[Iterator[Any]], Iterator[Any]]


@dataclass(frozen=True)
class Context:
    """Where this copy of the pipeline runs: one (rank, worker) slot of one epoch."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1
    seed: int = 0
    epoch: int = 0
    # Given to the last stage only, in a DataLoader worker under vs.Loader: the SegmentPool its outputs leave the
    # worker through. ``memory.empty(shape, dtype)`` places a tensor where it will be shipped from (vs.batch
    # stacks there), so that it leaves without a copy.
    memory: Any = field(default=None, compare=False, repr=False)

    @property
    def slot(self) -> int:
        """This reader's index among all ranks x workers."""
        return self.rank * self.num_workers + self.worker


def distributed_rank_world(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Rank and world size from torch.distributed when initialised, else torchrun/SLURM-style variables.

    Called once where the pipeline starts an iteration, never inside a stage.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    env = os.environ if environ is None else environ
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in env and world_var in env:
            return int(env[rank_var]), int(env[world_var])
    return 0, 1


def _topology(stages: list[Stage], rank: int | None, world_size: int | None) -> tuple[int | None, int | None]:
    """The pipeline's rank and world size: given here, or declared by a stage (``split_by_node(rank=...,
    world_size=...)``), or None (read from torch.distributed where an iteration starts). One place decides,
    so that checkpoints record the topology the slots really had, however it was supplied."""
    declared = {t for s in stages if (t := getattr(s, "declared_topology", lambda: None)()) is not None}
    if len(declared) > 1:
        raise ValueError(f"stages declare different ranks and world sizes: {sorted(declared)}")
    if not declared:
        return rank, world_size
    (d_rank, d_world), = declared
    if (rank is not None and rank != d_rank) or (world_size is not None and world_size != d_world):
        raise ValueError(f"split_by_node(rank={d_rank}, world_size={d_world}) contradicts "
                         f"Pipeline(rank={rank}, world_size={world_size})")
    return d_rank, d_world


class Pipeline(torch.utils.data.IterableDataset):
    """Stages chained in order; the first is a source (it ignores its input, e.g. `shards`).

    Use it directly (`for s in pipe`), with torch's DataLoader, or through `vs.Loader`.
    """

    def __init__(self, *stages: Stage, seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 telemetry: bool = True):
        if not stages:
            raise ValueError("a Pipeline needs at least one stage")
        for i, s in enumerate(stages):
            if not callable(s):
                raise TypeError(f"stage {i} ({s!r}) is not callable")
        self.stages = list(stages)
        self.seed = seed
        self.epoch = 0
        self.rank, self.world_size = _topology(self.stages, rank, world_size)
        self.telemetry = telemetry  # per-stage counters and timers (vlmstream/telemetry.py); False: none
        self._telemetry: Any = None  # the counters of the last iteration in this process

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (DataLoader workers get a fresh copy of the pipeline each epoch)."""
        self.epoch = epoch

    def context(self) -> Context:
        rank, world = (self.rank, self.world_size)
        if rank is None or world is None:
            rank, world = distributed_rank_world()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return Context(rank, world, worker, workers, self.seed, self.epoch)

    def iterate(self, ctx: Context, state: Mapping[str, Any] | None = None, *, snapshots: bool = False,
                plan: list[dict[str, Any]] | None = None, memory: SegmentPool | None = None) -> Iterator[Any]:
        """Run the chain for one explicit slot: what each DataLoader worker does, callable in tests.

        ``state``: a snapshot of this slot (from ``snapshots=True``) to continue from exactly.
        ``snapshots``: attach the slot's state to every output (``"__state__"``) and end with a
        ``{"__worker_done__": True}`` marker, for `vs.Loader`'s checkpoints.
        ``plan``: shard items to read instead of the source's epoch order (resuming on another topology).
        ``memory``: where the outputs will be shipped from (``Context.memory``, for the last stage).
        """
        if state is not None:
            self._load_slot(state)
        it: Iterator[Any] = iter(())
        opener = self._opener_index()
        tel = self._telemetry = self._new_telemetry()
        for k, stage in enumerate(self.stages):
            bind = getattr(stage, "bind", None)
            if bind is not None:
                bind(replace(ctx, memory=memory) if memory is not None and k == len(self.stages) - 1 else ctx)
            if k == 0 and plan is not None:
                it = iter([dict(item) for item in plan])
            else:
                if k == opener and state is not None:
                    from .split import SlotCursor, resume_items

                    it = resume_items(it, SlotCursor(**state["stages"][self._reader_index()]))
                it = stage(it)
            if tel is not None:
                it = tel.wrap(k, it, count_bytes=self._makes_samples(stage))
        if snapshots:
            it = self._with_snapshots(it, ctx, tel)
        return it

    def __iter__(self) -> Iterator[Any]:
        ctx = self.context()
        resume = getattr(self, "resume", None) or {}  # set by vs.Loader, travels into the workers
        pool = None
        if torch.utils.data.get_worker_info() is not None:  # leaving a DataLoader worker: one segment per batch
            returns = getattr(self, "returns", None)  # set by vs.Loader: segments come back through it
            pool = SegmentPool(returns[ctx.worker] if returns else None)
        it = self.iterate(ctx, resume.get("states", {}).get(ctx.worker), snapshots=getattr(self, "snapshots", False),
                          plan=resume.get("plan"), memory=pool if pool is not None and pool.returns else None)
        return pool.ship(it) if pool is not None else it

    def with_stages(self, *stages: Stage) -> "Pipeline":
        """A pipeline with more stages appended (the same settings)."""
        p = Pipeline(*self.stages, *stages, seed=self.seed, rank=self.rank, world_size=self.world_size,
                     telemetry=self.telemetry)
        p.epoch = self.epoch
        return p

    # ------------------------------------------------------------------------------------------- telemetry
    def _new_telemetry(self) -> Any:
        if not getattr(self, "telemetry", True):
            return None
        return Telemetry(unique_names(self.stages))

    @staticmethod
    def _makes_samples(stage: Any) -> bool:
        """Where shards become samples (tar_samples, vs.mix): the stage whose output bytes are counted."""
        from .tar import TarSamples

        return isinstance(stage, TarSamples) or hasattr(stage, "streams")

    def stats(self) -> Any:
        """Per-stage telemetry of the last iteration run in this process (`vs.Loader.stats()` merges its
        DataLoader workers'): a `vlmstream.telemetry.Report`; ``.summary()`` names the bottleneck."""
        tel = self._telemetry
        return Report.from_raw(tel.snapshot(self.stages) if tel is not None else None)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _reader_index(self) -> int:
        """The stage where shards become samples (tar_samples): it holds the slot's cursor."""
        from .tar import TarSamples

        for k, s in enumerate(self.stages):
            if isinstance(s, TarSamples):
                return k
        raise ValueError("a resumable pipeline reads shards with vs.tar_samples()")

    def _opener_index(self) -> int:
        """Where the cursor's item skipping goes: before fetch (no request for finished shards)."""
        from .fetch import fetch

        for k, s in enumerate(self.stages):
            if isinstance(s, fetch):
                return k
        return self._reader_index() if any(hasattr(s, "cursor") for s in self.stages) else -1

    def slot_state(self, ctx: Context) -> dict[str, Any]:
        """This slot's state now: every stage's (cursor, buffers as references, random generators)."""
        return {
            "version": STATE_VERSION,
            "epoch": ctx.epoch,
            "slot": [ctx.rank, ctx.world_size, ctx.worker, ctx.num_workers],
            "stages": [s.state_dict() if hasattr(s, "state_dict") else None for s in self.stages],
        }

    def _with_snapshots(self, it: Iterator[Any], ctx: Context, tel: Any = None) -> Iterator[Any]:
        """Each output with the slot's state (and, with telemetry, its counters: ``"__stats__"``)."""
        for x in it:
            if not isinstance(x, dict):
                raise TypeError(f"a checkpointed pipeline yields dicts (batches), got {type(x).__name__}")
            yield {**x, **self._snapshot(ctx, tel)}
        yield {"__worker_done__": True, **self._snapshot(ctx, tel)}

    def _snapshot(self, ctx: Context, tel: Any) -> dict[str, Any]:
        if tel is None:
            return {"__state__": self.slot_state(ctx), "__worker__": ctx.worker}
        t0 = perf_counter()
        state = self.slot_state(ctx)
        tel.state_s += perf_counter() - t0
        return {"__state__": state, "__worker__": ctx.worker, "__stats__": tel.snapshot(self.stages)}

    def _load_slot(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"checkpoint state version {state.get('version')!r}; this vlmstream reads {STATE_VERSION}")
        for k, (stage, st) in enumerate(zip(self.stages, state["stages"])):
            if st is None:
                continue
            if "refs" in st:  # buffered samples: fetch them again and rebuild them up to this stage
                stage.load_state_dict(st, self.rematerialize(st, k))
            else:
                stage.load_state_dict(st)

    def _producer_index(self) -> int:
        """The stage whose output are samples: tar_samples, or a source mixing streams (vs.mix)."""
        for k, s in enumerate(self.stages):
            if hasattr(s, "streams"):
                return k
        return self._reader_index()

    def read_refs(self, refs: list[tuple]) -> dict[tuple[str, int], Any]:
        """Samples fetched again by reference, one read per shard from its first referenced byte."""
        reader = self._reader_index()
        opener = self._opener_index()
        fetcher = self.stages[opener] if opener != reader else None
        found: dict[tuple[str, int], Any] = {}
        for item in ref_items(refs):
            url = item["url"]
            if fetcher is not None:
                from .fetch import FetchStats, HTTPClient

                stream = fetcher.open(item, HTTPClient(fetcher.opts, FetchStats()))
            else:
                from .fetch import open_url

                stream = open_url(url, start=item["start_offset"])
            for sample in self.stages[reader].read({**item, "stream": stream}):
                found[(url, sample["__index__"])] = sample
        return found

    def rematerialize(self, refs_state: Mapping[str, Any], upto: int) -> list[Any]:
        """Buffered samples fetched again by reference (through their stream's reader, under vs.mix), then
        passed through the one-in-one-out stages (decode, tokenize) between the producer and stage `upto`."""
        refs = decode_refs(refs_state, ShardIndex(self))  # states hold URLs redacted
        producer = self._producer_index()
        found: dict[tuple[Any, str, int], Any] = {}
        for source in {r[0] for r in refs}:
            part = [r for r in refs if r[0] == source]
            pipe = self if source is None else self.stages[producer].streams[source].pipeline
            for (url, index), sample in pipe.read_refs(part).items():
                found[(source, url, index)] = sample
        out = []
        for source, url, _, index, _ in refs:
            sample = found[(source, url, index)]
            if source is not None:
                sample["__source__"] = source
            for stage in self.stages[producer + 1:upto]:
                if hasattr(stage, "map_sample"):
                    sample = stage.map_sample(sample)
                elif not hasattr(stage, "state_dict"):
                    raise ValueError(f"cannot rebuild buffered samples through stage {stage!r}: give it a "
                                     "map_sample(sample) method, or place it after the buffering stages")
            out.append(sample)
        return out


def ref_items(refs: list[tuple]) -> list[dict[str, Any]]:
    """Shard items that read the referenced samples again: one per shard, from its first referenced byte."""
    by_url: dict[str, list[tuple[int, int, str]]] = {}
    for _, url, offset, index, key in refs:
        by_url.setdefault(url, []).append((offset, index, key))
    items = []
    for url, places in by_url.items():
        places.sort()
        items.append({"url": url, "refs": [[i, k] for _, i, k in places], "start_offset": places[0][0],
                      "start_index": places[0][1], "samples": len(places)})
    return items


