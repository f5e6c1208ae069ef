"""The stage protocol: what flows between stages, where a stage runs, and what it tells the runner.

A stage is a callable from an iterator to an iterator; a plain generator function is one. It may also have:

- ``bind(ctx)``: where it runs (rank, worker, seed, epoch), before each iteration. This is the only way these
  reach a stage: no stage reads environment variables or globals.
- ``state_dict()`` / ``load_state_dict(state[, samples])``: what it holds across items. A state with ``"refs"``
  holds samples by reference (`core.checkpoint.encode_refs`); the runner fetches them again and passes them in.
- ``map_sample(sample)``: one sample in, one out (decode, tokenize), so that buffered samples behind it can be
  rebuilt on resume.
- ``role``: what the runner needs to know about it, one of the roles below. A stage of yours with a role works
  as ours does: a source of shard tasks, an opener, a reader of shards, a mixer of streams.
- ``declared_topology()``: a (rank, world size) given to the stage, which the pipeline then adopts.

Between the source and the reader, items are `ShardTask`s (an opener wraps each in an `OpenShard`); from the
reader on, samples are dicts shaped like webdataset's, with their provenance (``__url__``, ``__offset__``,
``__index__``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, Callable, Iterator, Mapping

Stage = Callable[[Iterator[Any]], Iterator[Any]]

# Roles (a stage's ``role`` attribute).
SOURCE = "source"  # yields the ShardTasks of an epoch from a resolved list: has ``specs`` and ``task(i)``
OPENER = "opener"  # ShardTask -> OpenShard (a stream): a resume skips finished shards before it, unopened
READER = "reader"  # OpenShard -> samples: keeps the slot's cursor (``cursor``) and reads by ``read(shard)``
MIXER = "mixer"  # draws samples from several streams: has ``streams`` (name -> vs.Stream)


def role_of(stage: Any) -> str | None:
    return getattr(stage, "role", None)


def find_role(stages: list[Stage], role: str) -> int | None:
    """The index of the first stage with ``role``, or None."""
    return next((k for k, s in enumerate(stages) if role_of(s) == role), None)


@dataclass(frozen=True)
class Context:
    """Where this copy of the pipeline runs: one (rank, worker) slot of one epoch."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1
    seed: int = 0
    epoch: int = 0
    # Given to the last stage only (and to the one before a vs.batch that keeps its rows' tensors: vs.pack), in a
    # DataLoader worker under vs.Loader: the SegmentPool its outputs leave the worker through.
    # ``memory.empty(shape, dtype)`` places a tensor where it will be shipped from (vs.batch stacks there, vs.pack
    # makes lazy images there), so that it leaves without a copy.
    memory: Any = field(default=None, compare=False, repr=False)

    @property
    def slot(self) -> int:
        """This reader's index among all ranks x workers."""
        return self.rank * self.num_workers + self.worker


@dataclass(frozen=True)
class ShardTask:
    """One shard as a slot reads it: which shard, which of its samples, and where reading starts."""

    url: str
    shard: int | None = None  # its index in the source's resolved list
    samples: int | None = None  # its sample count, from a manifest
    sha256: str | None = None  # from a manifest
    bytes: int | None = None  # from a manifest
    num_shards: int | None = None  # the length of the list it is from
    resampled: bool = False  # drawn with replacement (endless mode): not split, not resumable by cursor
    # Which samples this slot keeps, and equal per-rank counts (split stages)
    sample_offset: int = 0  # keep samples whose __index__ % sample_step == sample_offset
    sample_step: int = 1
    worker_split: bool = False  # split_by_worker gave it to one DataLoader worker
    quota: int | None = None  # samples this slot yields in the epoch (equalize="pad" | "drop")
    slot_total: int | None = None  # samples this slot holds (its real shards)
    padding: bool = False  # a shard read again to reach the quota
    # Where reading starts: a resume, or samples fetched again by reference (core/checkpoint.py)
    resumed: bool = False  # part of the rest of an epoch resumed on another topology
    start_offset: int = 0  # the tar offset the stream starts at
    start_index: int = 0  # the __index__ of the sample there
    skip_through: int = -1  # samples up to this index were delivered already
    skip_key: str | None = None  # the key of sample skip_through: checked where it is met again
    refs: tuple[tuple[int, str], ...] | None = None  # only these (index, key) samples


@dataclass
class OpenShard:
    """A shard task with its open stream, as an opener hands it to the reader."""

    task: ShardTask
    stream: BinaryIO
    # The opener's error policy for a transfer that fails for good: called with the error and the samples of
    # this slot's share not delivered (None: unknown). None: the error is raised.
    report: Callable[[BaseException, int | None], None] | None = None


def as_task(item: Any) -> ShardTask:
    """A `ShardTask`, or one made from a mapping with its field names (``{"url": ...}``, as webdataset's items)."""
    if isinstance(item, ShardTask):
        return item
    if isinstance(item, Mapping) and isinstance(item.get("url"), str):
        fields = {f for f in ShardTask.__dataclass_fields__}
        task = ShardTask(**{k: v for k, v in item.items() if k in fields})
        return task if task.refs is None else replace(task, refs=tuple(tuple(r) for r in task.refs))
    raise TypeError(f"expected a ShardTask (or a mapping with a 'url'), got {type(item).__name__}")


def as_open_shard(item: Any) -> OpenShard:
    """An `OpenShard`, or one made from a mapping holding a ``"stream"`` beside the task's fields (webdataset's
    ``{"url", "stream"}`` items)."""
    if isinstance(item, OpenShard):
        return item
    if isinstance(item, Mapping) and "stream" in item:
        return OpenShard(as_task(item), item["stream"])
    raise TypeError(f"expected an open shard (put vs.fetch() before tar_samples), got {type(item).__name__}"
                    + (f" with keys {sorted(item)}" if isinstance(item, Mapping) else ""))


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


def topology(stages: list[Stage], rank: int | None, world_size: int | None) -> tuple[int | None, int | None]:
    """The pipeline's rank and world size: given to it, or declared by a stage (``split_by_node(rank=...,
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


__all__ = ["Context", "MIXER", "OPENER", "OpenShard", "READER", "SOURCE", "ShardTask", "Stage", "as_open_shard",
           "as_task", "distributed_rank_world", "find_role", "role_of", "topology"]
