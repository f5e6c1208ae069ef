"""The pipeline: a chain of stages, each an iterator-to-iterator callable, run as a torch IterableDataset.

A stage may also define:
  - ``bind(ctx)``: receive where it runs (rank, worker, seed, epoch) before an iteration starts;
  - ``state_dict()`` / ``load_state_dict(state)``: report and restore what it holds across items.
Nothing reaches a stage through globals or environment variables: the pipeline hands it a Context.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch.utils.data

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


class Pipeline(torch.utils.data.IterableDataset):
    """Stages chained in order; the first is a source (it ignores its input, e.g. `shards`).

    Use it directly (`for s in pipe`), with torch's DataLoader, or through `vs.Loader`.
    """

    def __init__(self, *stages: Stage, seed: int = 0, rank: int | None = None, world_size: int | None = None):
        if not stages:
            raise ValueError("a Pipeline needs at least one stage")
        for i, s in enumerate(stages):
            if not callable(s):
                raise TypeError(f"stage {i} ({s!r}) is not callable")
        self.stages = list(stages)
        self.seed = seed
        self.epoch = 0
        self.rank, self.world_size = rank, world_size

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

    def iterate(self, ctx: Context) -> Iterator[Any]:
        """Run the chain for one explicit slot: what each DataLoader worker does, callable in tests."""
        it: Iterator[Any] = iter(())
        for stage in self.stages:
            bind = getattr(stage, "bind", None)
            if bind is not None:
                bind(ctx)
            it = stage(it)
        return it

    def __iter__(self) -> Iterator[Any]:
        return self.iterate(self.context())

    def with_stages(self, *stages: Stage) -> "Pipeline":
        """A pipeline with more stages appended (the same settings)."""
        p = Pipeline(*self.stages, *stages, seed=self.seed, rank=self.rank, world_size=self.world_size)
        p.epoch = self.epoch
        return p

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "stages": [s.state_dict() if hasattr(s, "state_dict") else None for s in self.stages],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = state["epoch"]
        for s, st in zip(self.stages, state["stages"]):
            if st is not None:
                s.load_state_dict(st)
