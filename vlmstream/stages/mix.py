"""`vs.mix(streams)`: several sources drawn into one sample stream, LLM-Foundry / mosaicml-streaming style.

    pipe = vs.Pipeline(
        vs.mix([
            vs.Stream("vqa", vs.shards(".../vqa/index.json"), vs.split_by_node(), vs.split_by_worker(),
                      vs.fetch(), vs.tar_samples(), proportion=0.7),
            vs.Stream("captions", vs.shards(".../cap/index.json"), vs.split_by_node(), vs.split_by_worker(),
                      vs.fetch(), vs.tar_samples(), proportion=0.3),
        ], epoch_size=100_000),
        vs.shuffle(2000), vs.decode(...), ..., vs.batch(8),
    )

Weights, at most one per stream: ``proportion`` (relative), ``repeat`` (a multiplier on the stream's own sample
count, from its manifest) or ``choose`` (samples per epoch). ``repeat``/``choose``, or proportions with an
``epoch_size``, give every stream an exact per-epoch target, shared among the (rank, worker) slots; proportions
alone draw by weight until the ``stop`` strategy ends the epoch. Streams that run out are restarted as their
next pass (a new shard order); streams with more stop at their target. Streams without weights are each read
once. docs/MIXING.md has the details.

All state lives in attributes (the random generator, per-stream counts and passes, the epoch's targets), and
`state_dict()` reports it as JSON-ready data, with each open stream's own slot state (its reader's cursor):
a restored mix continues its draw sequence and every stream's reading exactly where they were.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from typing import Any, Iterator, Mapping, Sequence

from ..core.checkpoint import SlotResume, rng_from, rng_state, slot_state
from ..core.partition import shares
from ..core.pipeline import Pipeline
from ..core.stage import MIXER, OPENER, Context, ShardTask, find_role
from .split import known_samples

FIRST_EXHAUSTED = "first_exhausted"  # the epoch ends when a stream runs out
ALL_EXHAUSTED = "all_exhausted"  # streams that run out restart until every one has run out once
ENDLESS = "endless"  # streams restart forever
STOPS = (FIRST_EXHAUSTED, ALL_EXHAUSTED, ENDLESS)

# A stream's pipeline runs pass p of epoch e with Context.epoch = e + p * PASS_STRIDE: pass 0 reads exactly what
# the stream alone would read in epoch e; every later pass (and every epoch) gets its own shard order.
PASS_STRIDE = 1 << 32

SOURCE_KEY = "__source__"
_END, _AGAIN = object(), object()

# Keys of state_dict(): constants so that the loader's checkpoint code and tests name them one way.
EPOCH, SLOT, RNG, TARGETS, DRAWN, PASSES, EXHAUSTED, STREAMS = (
    "epoch", "slot", "rng", "targets", "drawn", "passes", "exhausted", "streams")


def stream_epoch(epoch: int, pass_: int) -> int:
    """The Context.epoch a stream's pipeline runs with for its pass `pass_` of the mix's epoch `epoch`."""
    if not 0 <= epoch < PASS_STRIDE:
        raise ValueError(f"epoch {epoch} out of range [0, 2**32)")
    return epoch + pass_ * PASS_STRIDE


class Stream:
    """A named source for `vs.mix`: a chain of stages up to samples, run as its own `vs.Pipeline`.

    ``proportion`` (relative weight), ``repeat`` (multiplier on the stream's sample count, which its
    manifest gives) or ``choose`` (samples per epoch): at most one. A single `vs.Pipeline` may stand for
    the stages. Rank and world size come from the pipeline holding the mix: a stream that sets its own
    (``split_by_node(rank=..., world_size=...)``) is refused.
    """

    def __init__(self, name: str, *stages: Any, proportion: float | None = None, repeat: float | None = None,
                 choose: int | None = None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"a Stream needs a non-empty name, got {name!r}")
        given = [k for k, v in (("proportion", proportion), ("repeat", repeat), ("choose", choose)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"stream {name!r}: give at most one of proportion, repeat, choose "
                             f"(got {', '.join(given)})")
        for k, v in (("proportion", proportion), ("repeat", repeat)):
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0
                                  or math.isinf(v)):
                raise ValueError(f"stream {name!r}: {k} must be a finite number >= 0, got {v!r}")
        if choose is not None and (not isinstance(choose, int) or isinstance(choose, bool) or choose < 0):
            raise ValueError(f"stream {name!r}: choose must be an integer >= 0 (samples per epoch), got {choose!r}")
        if len(stages) == 1 and isinstance(stages[0], Pipeline):
            self.pipeline = stages[0]
        elif not stages:
            raise ValueError(f"stream {name!r} has no stages (e.g. shards, split_by_node, ..., tar_samples)")
        else:
            self.pipeline = Pipeline(*stages)
        if self.pipeline.rank is not None or self.pipeline.world_size is not None:
            raise ValueError(f"stream {name!r}: its rank and world size come from the pipeline that holds the mix; "
                             "give them there (vs.Pipeline(..., rank=r, world_size=w)), not inside a stream")
        self.name, self.proportion, self.repeat, self.choose = name, proportion, repeat, choose

    def __repr__(self) -> str:
        w = {k: v for k, v in (("proportion", self.proportion), ("repeat", self.repeat), ("choose", self.choose))
             if v is not None}
        weights = "".join(f", {k}={v}" for k, v in w.items())
        return f"Stream({self.name!r}, {len(self.pipeline.stages)} stages{weights})"

    @property
    def samples(self) -> int | None:
        """The stream's sample count: the sum of its shards' counts (from a manifest), or None if unknown."""
        for stage in self.pipeline.stages:
            specs = getattr(stage, "specs", None)  # the `shards` stage's resolved list
            if specs is not None:
                counts = [getattr(s, "samples", None) for s in specs]
                return None if any(c is None for c in counts) else sum(counts)
        return None

    def holdings(self, ctx: Context) -> int | None:
        """How many samples slot `ctx` reads in one pass, from the shard tasks alone (no I/O): the stages
        before the opener (`fetch`) are run and their tasks' counts summed. None where that cannot be known (no
        manifest, resampled shards, a source without an opener)."""
        stages = self.pipeline.stages
        cut = find_role(stages, OPENER)
        if not cut:
            return None
        tasks: list[ShardTask] = []
        # Shallow copies: binding another slot's context must not touch the stages the stream runs with.
        for task in Pipeline(*map(copy.copy, stages[:cut])).iterate(ctx):
            if not isinstance(task, ShardTask) or task.resampled or task.samples is None:
                return None
            tasks.append(task)
        if tasks and tasks[0].quota is not None:  # equalized ranks: the slot yields exactly its quota
            return tasks[0].quota
        return sum(known_samples(tasks))


class mix:
    """The source stage that draws samples from several `Stream`s; see the module docstring and docs/MIXING.md.

    ``epoch_size``: samples per epoch (all slots together) shared by proportion; only with proportions (or no
    weights: then in proportion to the streams' sizes). ``stop``: how an epoch of proportions without
    ``epoch_size`` ends (``first_exhausted``, ``all_exhausted``, ``endless``). ``seed``: the draw order's seed
    (default: the pipeline's); draws are seeded by (seed, epoch, rank, worker).
    ``stats[epoch]``: per stream, the samples drawn and the passes begun by this slot in that epoch.
    """

    role = MIXER

    def __init__(self, streams: Sequence[Stream], *, epoch_size: int | None = None, stop: str = ALL_EXHAUSTED,
                 seed: int | None = None):
        streams = list(streams)
        if not streams or not all(isinstance(s, Stream) for s in streams):
            raise ValueError(f"mix needs a non-empty list of vs.Stream, got {streams!r}")
        names = [s.name for s in streams]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stream names must be unique: {dup} repeated")
        owner: dict[int, str] = {}
        for st in streams:
            for stage in st.pipeline.stages:  # a checkpoint reads each stream's stage states: one owner each
                if hasattr(stage, "state_dict") and owner.setdefault(id(stage), st.name) != st.name:
                    raise ValueError(f"streams {owner[id(stage)]!r} and {st.name!r} share one {type(stage).__name__} "
                                     "stage: it keeps per-stream state (cursor, buffered samples); give each its own")
        if stop not in STOPS:
            raise ValueError(f"unknown stop {stop!r}; choose one of {STOPS}")
        if epoch_size is not None and (not isinstance(epoch_size, int) or isinstance(epoch_size, bool)
                                       or epoch_size <= 0):
            raise ValueError(f"epoch_size must be a positive integer, got {epoch_size!r}")
        self.streams: dict[str, Stream] = {s.name: s for s in streams}
        self.names = names
        self.sizes = {s.name: s.samples for s in streams}  # from the manifests, None where unknown
        self.epoch_size, self.stop, self.seed = epoch_size, stop, seed
        self.targets, self.weights = self._plan(streams)
        if self.weights is None and stop != ALL_EXHAUSTED:
            why = f"exact per-epoch targets {self.targets}" if self.targets else "no weights (each is read once)"
            raise ValueError(f"stop={stop!r} applies to proportions without epoch_size; these streams have {why}")
        self.ctx = Context()
        # State of the current epoch of this slot: everything `state_dict` reports.
        self.epoch = 0
        self.rng = random.Random()
        self.slot_targets: dict[str, int] | None = None
        self.drawn = {n: 0 for n in names}
        self.passes = {n: 0 for n in names}  # passes begun this epoch (1 = read once, each restart adds one)
        self.exhausted: set[str] = set()  # streams that ran out at least once this epoch
        self.stats: dict[int, dict[str, dict[str, int]]] = {}
        self._iters: dict[str, Iterator[Any]] = {}  # live readers, never part of the state
        self._taken: dict[str, int] = {}  # samples taken from each live reader (to name an empty pass)
        self._run: object | None = None
        self._resume: tuple[int, int, int] | None = None
        self._restored: dict[str, Any] = {}  # restored streams' slot states, until each is reopened

    # ------------------------------------------------------------------------------------------ planning

    def _plan(self, streams: list[Stream]) -> tuple[dict[str, int] | None, dict[str, float] | None]:
        """(exact global targets per epoch, or None; draw weights for the modes without targets, or None)."""
        absolute = [s.name for s in streams if s.repeat is not None or s.choose is not None]
        relative = [s.name for s in streams if s.proportion is not None]
        if absolute and relative:
            raise ValueError(f"proportion (relative: {relative}) and repeat/choose (absolute: {absolute}) cannot "
                             "be mixed; use one kind for all streams")
        if absolute:
            if self.epoch_size is not None:
                raise ValueError("epoch_size applies to proportions; with repeat/choose the epoch is the sum of the "
                                 "streams' targets")
            targets = {}
            for s in streams:
                if s.choose is not None:
                    targets[s.name] = s.choose
                else:  # repeat, or none given: read once (repeat=1)
                    n = self.sizes[s.name]
                    if n is None:
                        why = f"repeat={s.repeat}" if s.repeat is not None else "no weight (read once: repeat=1)"
                        raise ValueError(f"stream {s.name!r}: {why} needs the stream's sample count, which is "
                                         "unknown: give its shards as a manifest (index.json), or use choose=N")
                    targets[s.name] = math.floor((1.0 if s.repeat is None else s.repeat) * n + 0.5)  # halves up
            return targets, None
        if relative:
            missing = [s.name for s in streams if s.proportion is None]
            if missing:
                raise ValueError(f"streams {missing} have no proportion: with proportions, give every stream one")
            weights = {s.name: float(s.proportion) for s in streams}
            if sum(weights.values()) <= 0:
                raise ValueError(f"proportions {weights} sum to 0")
            if self.epoch_size is not None:
                return dict(zip(self.names, shares(self.epoch_size, list(weights.values())))), None
            return None, weights
        # No weights at all: each stream once per epoch, or epoch_size shared in proportion to the sizes.
        sizes = self.sizes
        if self.epoch_size is None:
            return None, None
        unknown = [n for n, c in sizes.items() if c is None]
        if unknown:
            raise ValueError(f"epoch_size without weights shares it by stream size, unknown for {unknown}: give "
                             "manifests (index.json) or proportions")
        return dict(zip(self.names, shares(self.epoch_size, [c for c in sizes.values()]))), None

    def slot_shares(self, ctx: Context) -> dict[str, int]:
        """This slot's share of each stream's epoch target. Shares follow what each slot holds of the stream
        (so ``repeat=1`` reads every sample once); where that is unknown, the target is split evenly. Summed over
        all (rank, worker) slots, the shares are the targets exactly."""
        assert self.targets is not None
        slots = [dataclasses.replace(ctx, rank=r, worker=w, epoch=stream_epoch(ctx.epoch, 0))
                 for r in range(ctx.world_size) for w in range(ctx.num_workers)]
        out = {}
        for name, target in self.targets.items():
            held = None
            if target:
                held = [self.streams[name].holdings(c) for c in slots]
                if any(h is None for h in held) or not sum(held):
                    held = None
            out[name] = shares(target, held if held is not None else [1] * len(slots))[ctx.slot]
        return out

    # ---------------------------------------------------------------------------------------------- running

    def bind(self, ctx: Context) -> None:
        self.ctx = ctx

    def __call__(self, _: Iterator[Any] | None = None) -> Iterator[dict[str, Any]]:
        c = self.ctx
        if self._resume != (c.epoch, c.rank, c.worker):
            self._start_epoch(c)
            self._restored = {}
        self._resume = None
        self._close()
        self.stats[c.epoch] = {"drawn": self.drawn, "passes": self.passes}
        return self._draws()

    def _start_epoch(self, c: Context) -> None:
        seed = c.seed if self.seed is None else self.seed
        self.epoch = c.epoch
        self.rng = random.Random(f"vlmstream.mix/{seed}/{c.epoch}/{c.rank}/{c.worker}")
        self.slot_targets = self.slot_shares(c) if self.targets is not None else None
        self.drawn = {n: 0 for n in self.names}
        self.passes = {n: 0 for n in self.names}
        self.exhausted = set()

    def _pick(self) -> str | None:
        """The next stream to draw from, or None when the epoch's targets are all met."""
        if self.slot_targets is not None:  # in proportion to what is left of each target: exact at the end
            left = [self.slot_targets[n] - self.drawn[n] for n in self.names]
            total = sum(left)
            if total <= 0:
                return None
            u = self.rng.randrange(total)
            for name, k in zip(self.names, left):
                if u < k:
                    return name
                u -= k
        if self.weights is not None:
            names, w = self.names, [self.weights[n] for n in self.names]
        else:  # no weights, no targets: each stream read once, by size where known
            names = [n for n in self.names if n not in self.exhausted]
            if not names:
                return None
            sizes = [self.sizes[n] for n in names]
            w = [float(s) for s in sizes] if all(s for s in sizes) else [1.0] * len(names)
        u = self.rng.random() * sum(w)
        for name, x in zip(names, w):
            if u < x:
                return name
            u -= x
        return next(n for n, x in zip(reversed(names), reversed(w)) if x > 0)  # rounding at the top end

    def _stream_ctx(self, name: str) -> Context:
        return dataclasses.replace(self.ctx, epoch=stream_epoch(self.epoch, self.passes[name] - 1))

    def _open(self, name: str, new_pass: bool) -> Iterator[Any]:
        """A reader of stream `name`: its next pass, or (after a restore) its current pass where it was."""
        if new_pass or not self.passes[name]:
            self.passes[name] += 1
        restored = self._restored.pop(name, None)
        pipe = self.streams[name].pipeline
        if restored is not None and not new_pass:
            self._iters[name] = iter(pipe.iterate(self._stream_ctx(name), SlotResume(restored)))
        else:
            self._iters[name] = iter(pipe.iterate(self._stream_ctx(name)))
            restored = None
        self._taken[name] = 0 if restored is None else 1  # a restored pass had samples before the checkpoint
        return self._iters[name]

    def _next(self, name: str) -> Any:
        """The next sample of stream `name`, restarting the stream where the mode says so.

        Returns a sample, ``_END`` when the epoch ends, or ``_AGAIN`` when the stream is done for this epoch
        (streams without weights are read once) and another should be drawn.
        """
        it = self._iters.get(name) or self._open(name, new_pass=False)
        while True:
            sample = next(it, _END)
            if sample is not _END:
                self._taken[name] += 1
                return sample
            del self._iters[name]
            if not self._taken[name]:
                raise ValueError(f"stream {name!r} has no samples for rank {self.ctx.rank}, worker "
                                 f"{self.ctx.worker} (its pass {self.passes[name] - 1} is empty): nothing to draw from")
            self.exhausted.add(name)
            if self.slot_targets is None:
                if self.weights is None:
                    return _AGAIN
                if self.stop == FIRST_EXHAUSTED:
                    return _END
                if self.stop == ALL_EXHAUSTED and self.exhausted >= {n for n in self.names if self.weights[n] > 0}:
                    return _END
            it = self._open(name, new_pass=True)

    def _draws(self) -> Iterator[dict[str, Any]]:
        run = self._run = object()  # a later iteration owns the readers from then on
        try:
            while True:
                name = self._pick()
                if name is None:
                    return
                sample = self._next(name)
                if sample is _END:
                    return
                if sample is _AGAIN:
                    continue
                if SOURCE_KEY in sample:
                    raise ValueError(f"stream {name!r}: sample {sample.get('__key__', '?')!r} already has a "
                                     f"{SOURCE_KEY!r} key (nested mixes are not supported)")
                sample[SOURCE_KEY] = name
                self.drawn[name] += 1
                yield sample
        finally:
            if self._run is run:
                self._close()

    def _close(self) -> None:
        for it in self._iters.values():
            close = getattr(it, "close", None)
            if close is not None:
                close()
        self._iters = {}

    # ---------------------------------------------------------------------------------------------- state

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_iters"], state["_taken"], state["_run"] = {}, {}, None  # live readers stay where they were opened
        return state

    def _stream_state(self, name: str) -> dict[str, Any] | None:
        """The slot state of stream `name`'s current pass (its reader's cursor), None where it has no open
        reader (not drawn from yet, or read to its end)."""
        if name in self._restored:  # restored, not reopened yet
            return self._restored[name]
        pipe = self.streams[name].pipeline
        if name not in self._iters:
            return None
        return slot_state(pipe, self._stream_ctx(name))

    def state_dict(self) -> dict[str, Any]:
        """This slot's position in the epoch, JSON-ready. ``streams`` holds, per stream, its pipeline's slot
        state for the current pass (the reader's cursor), or None."""
        return {
            EPOCH: self.epoch,
            SLOT: [self.ctx.rank, self.ctx.worker],
            RNG: rng_state(self.rng),
            TARGETS: None if self.slot_targets is None else dict(self.slot_targets),
            DRAWN: dict(self.drawn),
            PASSES: dict(self.passes),
            EXHAUSTED: sorted(self.exhausted),
            STREAMS: {n: self._stream_state(n) for n in self.names},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a slot's position: the next iteration of the same (epoch, rank, worker) continues from it."""
        names = set(state[DRAWN])
        if names != set(self.names):
            raise ValueError(f"mix state is for streams {sorted(names)}, this mix has {sorted(self.names)}")
        self.rng = rng_from(state[RNG])
        self.epoch = int(state[EPOCH])
        self.slot_targets = None if state[TARGETS] is None else {n: int(state[TARGETS][n]) for n in self.names}
        self.drawn = {n: int(state[DRAWN][n]) for n in self.names}
        self.passes = {n: int(state[PASSES][n]) for n in self.names}
        self.exhausted = set(state[EXHAUSTED])
        self._restored = {n: st for n, st in (state.get(STREAMS) or {}).items() if st is not None}
        rank, worker = state[SLOT]
        self._resume = (self.epoch, int(rank), int(worker))
        self._close()
