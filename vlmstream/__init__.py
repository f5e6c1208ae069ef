"""vlmstream: stream image-text training data for vision-language models from WebDataset shards.

    pipe = vs.Pipeline(vs.shards(...), vs.split_by_node(), vs.split_by_worker(), vs.fetch(), vs.tar_samples(),
                       vs.shuffle(2000), vs.decode(vs.ImageTiles(512, 2048)), vs.tokenize(tok, 4096),
                       vs.pack(4096, max_images=18), vs.batch(8))
    for batch in vs.Loader(pipe, num_workers=4): ...

Names are imported on first use, so that tools needing only the format (the pack tool) do not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS = {
    "Context": "core.stage", "ShardTask": "core.stage", "OpenShard": "core.stage",
    "Pipeline": "core.pipeline", "Loader": "core.loader",
    "DecodeError": "errors", "FetchError": "errors", "FormatError": "errors", "TarError": "errors",
    "FetchOptions": "io.http", "open_url": "io.urls", "read_tar_samples": "io.tar",
    "shards": "stages.shards",
    "split_by_node": "stages.split", "split_by_worker": "stages.split", "take": "stages.split",
    "Stream": "stages.mix", "mix": "stages.mix",
    "fetch": "stages.fetch",
    "tar_samples": "stages.read",
    "shuffle": "stages.shuffle",
    "Resize": "stages.decode", "decode": "stages.decode", "open_image": "stages.decode",
    "ImageTiles": "stages.tiles", "Tiles": "stages.tiles", "to_unit_float": "stages.tiles",
    "ChatTemplate": "stages.tokenize", "ChatTokenizer": "stages.tokenize", "tokenize": "stages.tokenize",
    "pack": "stages.pack",
    "batch": "stages.batch", "default_collate": "stages.batch", "vlm_collate": "stages.batch",
    "Conversation": "dataset.format", "ShardInfo": "dataset.format", "conversation_from_sample": "dataset.format",
    "from_config": "config",
}
_SUBMODULES = ("presets",)  # vs.presets.nanovlm(...)
__all__ = sorted([*_EXPORTS, *_SUBMODULES])
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vlmstream' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # next time, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_SUBMODULES])
