"""`vs.Loader`: a torch DataLoader over a Pipeline that knows its epoch (and, later, its exact position)."""

from __future__ import annotations

from typing import Any, Iterator

import torch.utils.data

from .pipeline import Pipeline, distributed_rank_world


class Loader:
    """Iterate batches made inside the pipeline (``batch_size=None``), with `num_workers` processes.

    Rank and world size are read once here, in the training process, and handed to the workers with the
    pipeline. Each full pass advances the epoch, so shard order and shuffling change every epoch.
    """

    def __init__(self, pipeline: Pipeline, num_workers: int = 0, *, epoch: int = 0, **dataloader_kwargs: Any):
        self.pipeline = pipeline
        self.num_workers = num_workers
        self.epoch = epoch
        self.kwargs = {"pin_memory": False, "prefetch_factor": 2 if num_workers else None, **dataloader_kwargs}
        self.kwargs.setdefault("persistent_workers", False)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        p = self.pipeline
        if p.rank is None or p.world_size is None:
            p.rank, p.world_size = distributed_rank_world()
        p.set_epoch(self.epoch)
        dl = torch.utils.data.DataLoader(p, batch_size=None, num_workers=self.num_workers, **self.kwargs)
        yield from dl
        self.epoch += 1
