"""The pipeline: a chain of stages, each an iterator-to-iterator callable, run as a torch IterableDataset.

The runner knows no concrete stage: it binds each stage to its Context, runs the chain, counts per stage
(core/telemetry.py) and, to resume, asks core/checkpoint.py what to run where (`SlotResume`). Stages tell it
what it needs through the protocol of core/stage.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterator

import torch.utils.data

from .checkpoint import SlotResume
from .sharedmem import SegmentPool  # imported here, not in the DataLoader workers: they inherit modules
from .stage import MIXER, READER, Context, Stage, distributed_rank_world, role_of, topology
from .telemetry import Report, Telemetry, unique_names


class Pipeline(torch.utils.data.IterableDataset):
    """Stages chained in order; the first is a source (it ignores its input, e.g. `shards`).

    Use it directly (`for s in pipe`), with torch's DataLoader, or through `vs.Loader`. Rank and world size
    are given here, declared by a stage (``split_by_node(rank=..., world_size=...)``), or read from
    torch.distributed where an iteration starts.
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
        self.rank, self.world_size = topology(self.stages, rank, world_size)
        self.telemetry = telemetry  # per-stage counters and timers (core/telemetry.py); False: none
        self._telemetry: Any = None  # the counters of the last iteration in this process

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (DataLoader workers get a fresh copy of the pipeline each epoch)."""
        self.epoch = epoch

    def where(self) -> tuple[int, int]:
        """Rank and world size, read from torch.distributed (or torchrun's variables) once when not given."""
        if self.rank is None or self.world_size is None:
            self.rank, self.world_size = distributed_rank_world()
        return self.rank, self.world_size

    def context(self) -> Context:
        rank, world = (self.rank, self.world_size)
        if rank is None or world is None:
            rank, world = distributed_rank_world()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return Context(rank, world, worker, workers, self.seed, self.epoch)

    def iterate(self, ctx: Context, resume: SlotResume | None = None, *, memory: SegmentPool | None = None
                ) -> Iterator[Any]:
        """Run the chain for one explicit slot: what each DataLoader worker does, callable in tests.

        ``resume``: where this slot continues from (a checkpoint's state, a plan); see core/checkpoint.py.
        ``memory``: where the outputs will be shipped from (``Context.memory``, given to the last stage).
        """
        if resume is not None:
            resume.restore(self)
        it: Iterator[Any] = iter(())
        tel = self._telemetry = Telemetry(unique_names(self.stages)) if self.telemetry else None
        last = len(self.stages) - 1
        if last > 0 and getattr(self.stages[last], "passes_tensors", False):  # vs.batch keeps its rows' tensors:
            last -= 1  # the stage before it (vs.pack) may make them where they will be shipped from, and it stacks
        for k, stage in enumerate(self.stages):
            bind = getattr(stage, "bind", None)
            if bind is not None:
                bind(replace(ctx, memory=memory) if memory is not None and k >= last else ctx)
            run = resume.stage_at(self, k, stage) if resume is not None else stage
            it = run(it)
            if tel is not None:  # bytes are counted where shards become samples
                it = tel.wrap(k, it, count_bytes=role_of(stage) in (READER, MIXER))
        return it

    def __iter__(self) -> Iterator[Any]:
        it = self.iterate(self.context())
        if torch.utils.data.get_worker_info() is not None:  # leaving a DataLoader worker: one segment per batch
            return SegmentPool(None).ship(it)
        return it

    def with_stages(self, *stages: Stage) -> "Pipeline":
        """A pipeline with more stages appended (the same settings)."""
        p = Pipeline(*self.stages, *stages, seed=self.seed, rank=self.rank, world_size=self.world_size,
                     telemetry=self.telemetry)
        p.epoch = self.epoch
        return p

    def stats(self) -> Report:
        """Per-stage telemetry of the last iteration run in this process (`vs.Loader.stats()` merges its
        DataLoader workers'): a `Report`; ``.summary()`` names the bottleneck."""
        tel = self._telemetry
        return Report.from_raw(tel.snapshot(self.stages) if tel is not None else None)


__all__ = ["Context", "Pipeline"]
