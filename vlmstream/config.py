"""Pipelines from YAML, for people who prefer configs: the same chain as in Python, stage by stage.

    seed: 0
    tokenizer: {file: "{data}/tokenizer.json", image_token_length: 64}
    pipeline:
      - shards: {spec: "{data}/index.json"}
      - split_by_node: {}
      - ...
      - decode: {image: {ImageTiles: {tile: 512, max_side: 2048}}}
      - tokenize: {max_len: 4096}          # the tokenizer above is passed in
      - batch: {n: 8}
    loader: {num_workers: 4}

``{name}`` in any string is filled from the keyword arguments of `from_config` (paths, hosts).

A preset stands for the stages it sets up: ``- nanovlm: {tokenizer: "{tokenizer}", batch_size: 8}`` is
`vs.presets.nanovlm` (decode -> tokenize -> pack -> batch as nanoVLM's loader; configs/nanovlm.yaml).

Several sources: top-level ``streams:`` and ``mix: {epoch_size, stop, seed}`` make a `vs.mix` the first stage;
``pipeline:`` then holds the stages after the samples (shuffle, decode, ...). ``streams:`` is a list of
``{name, shards or remote, cache, proportion | repeat | choose}``, or, as LLM-Foundry and MosaicML streaming
write it, a mapping of named streams:

    streams:
      vqa:      {remote: s3://bucket/vqa, local: /tmp/cache/vqa, split: train, repeat: 1.0}
      captions: {remote: s3://bucket/captions, split: train, proportion: 0.3}

``remote`` is where the shards are (its ``index.json``; ``split`` names a sub-folder, or a manifest file, under
it), ``local`` the stream's cache folder (the shards kept there as `vs.fetch(cache=...)` keeps them; alone, the
shards' own folder). See configs/mixture.yaml, configs/foundry.yaml and docs/MIXING.md.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import yaml

from . import presets
from .core.loader import Loader
from .core.pipeline import Pipeline
from .stages.batch import batch
from .stages.decode import Resize, decode
from .stages.fetch import fetch
from .stages.mix import Stream, mix
from .stages.pack import pack
from .stages.read import tar_samples
from .stages.shards import shards
from .stages.shuffle import shuffle
from .stages.split import split_by_node, split_by_worker, take
from .stages.tiles import ImageTiles
from .stages.tokenize import ChatTokenizer, tokenize

# Transforms `decode: {image: {NAME: {...}}}` may name.
TRANSFORMS: dict[str, Callable[..., Any]] = {"ImageTiles": ImageTiles, "Resize": Resize}
STAGES: dict[str, Callable[..., Any]] = {
    "shards": shards, "split_by_node": split_by_node, "split_by_worker": split_by_worker, "fetch": fetch,
    "tar_samples": tar_samples, "shuffle": shuffle, "decode": decode, "tokenize": tokenize, "pack": pack,
    "batch": batch, "take": take,
}
# Presets a pipeline entry may name, each standing for its stages: `- nanovlm: {tokenizer: ..., batch_size: 8}`.
PRESETS: dict[str, Callable[..., Any]] = {"nanovlm": presets.nanovlm}
# Keys of a `streams:` entry, and the stages each stream runs up to samples.
STREAM_KEYS = ("name", "shards", "remote", "local", "split", "cache", "cache_bytes", "storage_options",
               "proportion", "repeat", "choose")
SOURCE_STAGES = ("shards", "split_by_node", "split_by_worker", "fetch", "tar_samples")


def _fill(value: Any, variables: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        try:
            return value.format_map(variables)
        except KeyError as e:
            raise ValueError(f"config uses {{{e.args[0]}}}: pass {e.args[0]}=... to from_config") from None
    if isinstance(value, list):
        return [_fill(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, variables) for k, v in value.items()}
    return value


def load(source: str | Mapping[str, Any], **variables: Any) -> dict[str, Any]:
    """The config as a dict, placeholders filled; `source` is a YAML path or an already-parsed mapping."""
    if isinstance(source, str):
        with open(source) as f:
            source = yaml.safe_load(f)
    if not isinstance(source, Mapping):
        raise ValueError("a config is a mapping with a 'pipeline' list")
    return _fill(dict(source), variables)


def build_tokenizer(spec: Mapping[str, Any]):
    spec = dict(spec)
    if "file" in spec:
        return ChatTokenizer.from_file(spec.pop("file"), **spec)
    if "pretrained" in spec:
        return ChatTokenizer.from_pretrained(spec.pop("pretrained"), **spec)
    raise ValueError("tokenizer: give 'file' (a tokenizer.json) or 'pretrained' (a Hub repo id)")


def build_stages(entry: Mapping[str, Any], tok: Any) -> list[Any]:
    """The stages of one pipeline entry: one stage, or a preset's (``nanovlm``: its own ``tokenizer``)."""
    if isinstance(entry, Mapping) and len(entry) == 1:
        (name, args), = entry.items()
        if name in PRESETS:
            args = dict(args or {})
            if "tokenizer" not in args:
                raise ValueError(f"preset {name!r} needs 'tokenizer:' (a tokenizer.json path or a Hub model id)")
            return list(PRESETS[name](args.pop("tokenizer"), **args))
    return [build_stage(entry, tok)]


def build_stage(entry: Mapping[str, Any], tok: Any) -> Any:
    if not isinstance(entry, Mapping) or len(entry) != 1:
        raise ValueError(f"each pipeline entry is one 'stage: {{args}}' mapping, got {entry!r}")
    (name, args), = entry.items()
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join([*STAGES, *PRESETS])}")
    args = dict(args or {})
    if name == "decode" and isinstance(args.get("image"), Mapping):
        (tname, targs), = args["image"].items()
        if tname not in TRANSFORMS:
            raise ValueError(f"unknown image transform {tname!r}; known: {', '.join(TRANSFORMS)}")
        args["image"] = TRANSFORMS[tname](**(targs or {}))
    if name == "tokenize":
        if tok is None:
            raise ValueError("a tokenize stage needs a top-level 'tokenizer:' entry")
        return tokenize(tok, **args)
    positional = {"shards": "spec", "shuffle": "bufsize", "pack": "seq_len", "batch": "n", "take": "n"}.get(name)
    if positional and positional in args:
        return STAGES[name](args.pop(positional), **args)
    return STAGES[name](**args)


def stream_spec(remote: str, split: str | None = None) -> str:
    """The shard spec a stream's ``remote`` (and ``split``) name: a manifest, a pattern or a file as given; a
    folder's ``index.json``, under its ``split`` sub-folder (or the manifest file ``split`` names) if given."""
    root = remote.rstrip("/")
    if root.endswith((".json", ".tar", ".tgz", ".tar.gz")) or any(c in root for c in "{}*?["):
        if split is not None:
            raise ValueError(f"'split: {split}' names a part of a folder, but remote {remote!r} is not a folder")
        return remote
    if split is None:
        return f"{root}/index.json"
    return f"{root}/{split}" if split.endswith(".json") else f"{root}/{split.strip('/')}/index.json"


def build_stream(name: str, entry: Mapping[str, Any]) -> Stream:
    """One named stream: its shards -> split_by_node -> split_by_worker -> fetch (cache) -> tar_samples."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"stream {name!r}: expected a mapping of settings, got {entry!r}")
    unknown = set(entry) - set(STREAM_KEYS)
    if unknown:
        raise ValueError(f"stream {name!r}: unknown keys {sorted(unknown)}; known: {', '.join(STREAM_KEYS)}")
    if "shards" in entry and ("remote" in entry or "split" in entry):
        raise ValueError(f"stream {name!r}: give one of 'shards' or 'remote' (with 'split'), not both")
    if "local" in entry and "cache" in entry:
        raise ValueError(f"stream {name!r}: 'local' and 'cache' both name its cache folder: give one")
    if "shards" in entry:
        spec = entry["shards"]
    elif "remote" in entry:
        spec = stream_spec(entry["remote"], entry.get("split"))
    elif "local" in entry:  # a local dataset, no remote: 'local' is where the shards are
        spec = stream_spec(entry["local"], entry.get("split"))
    else:
        raise ValueError(f"stream {name!r}: give one of 'shards' or 'remote' (or 'local': a dataset on disk)")
    cache = entry.get("cache") or (entry.get("local") if "remote" in entry else None)
    storage = entry.get("storage_options")
    opener = fetch(**({"cache": cache} if cache else {}), **({"cache_bytes": entry["cache_bytes"]}
                                                             if "cache_bytes" in entry else {}),
                   storage_options=storage)
    weights = {k: entry[k] for k in ("proportion", "repeat", "choose") if k in entry}
    return Stream(name, shards(spec, storage_options=storage), split_by_node(), split_by_worker(), opener,
                  tar_samples(), **weights)


def build_mix(streams: Any, settings: Mapping[str, Any] | None):
    """`vs.mix` of the configured streams: a list of entries with a ``name``, or a mapping of names to entries."""
    if isinstance(streams, Mapping) and streams:
        built = [build_stream(str(name), entry) for name, entry in streams.items()]
    elif isinstance(streams, list) and streams:
        built = []
        for entry in streams:
            if not isinstance(entry, Mapping) or "name" not in entry:
                raise ValueError(f"each stream needs a 'name', got {entry!r}")
            built.append(build_stream(entry["name"], {k: v for k, v in entry.items() if k != "name"}))
    else:
        raise ValueError("'streams:' is a mapping of named streams ({NAME: {remote, local, split, proportion | "
                         "repeat | choose}}) or a list of {name, shards (or remote), cache, ...}")
    options = dict(settings or {})
    unknown = set(options) - {"epoch_size", "stop", "seed"}
    if unknown:
        raise ValueError(f"mix: unknown keys {sorted(unknown)}; known: epoch_size, stop, seed")
    return mix(built, **options)


def from_config(source: str | Mapping[str, Any], **variables: Any):
    """A `vs.Loader` when the config has a ``loader:`` entry, else a `vs.Pipeline`."""
    cfg = load(source, **variables)
    unknown = set(cfg) - {"seed", "tokenizer", "pipeline", "loader", "streams", "mix"}
    if unknown:
        raise ValueError(f"unknown top-level config keys {sorted(unknown)}")
    tok = build_tokenizer(cfg["tokenizer"]) if "tokenizer" in cfg else None
    entries = cfg.get("pipeline") or []
    stages = []
    if "streams" in cfg:
        sources = [n for e in entries if isinstance(e, Mapping) for n in e if n in SOURCE_STAGES]
        if sources:
            raise ValueError(f"with 'streams:', each stream reads its own shards: the pipeline continues from the "
                             f"samples, remove {sources} from it")
        stages.append(build_mix(cfg["streams"], cfg.get("mix")))
    elif "mix" in cfg:
        raise ValueError("'mix:' needs a top-level 'streams:' list")
    stages += [stage for e in entries for stage in build_stages(e, tok)]
    pipe = Pipeline(*stages, seed=cfg.get("seed", 0))
    if "loader" in cfg:
        return Loader(pipe, **(cfg["loader"] or {}))
    return pipe
