"""vlmstream: stream image-text training data for vision-language models from WebDataset shards.

    pipe = vs.Pipeline(vs.shards(...), vs.split_by_node(), vs.split_by_worker(), vs.fetch(), vs.tar_samples(),
                       vs.shuffle(2000), vs.decode(vs.ImageTiles(512, 2048)), vs.tokenize(tok, 4096),
                       vs.pack(4096, max_images=18), vs.batch(8))
    for batch in vs.Loader(pipe, num_workers=4): ...

Names are imported on first use, so that tools needing only the format (the pack tool) do not load torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

# public name -> module that defines it
_EXPORTS = {
    "batch": "batch", "default_collate": "batch", "vlm_collate": "batch",
    "DecodeError": "decode", "Resize": "decode", "decode": "decode", "open_image": "decode",
    "FetchError": "fetch", "FetchOptions": "fetch", "fetch": "fetch", "open_url": "fetch",
    "Conversation": "format", "FormatError": "format", "ShardInfo": "format", "conversation_from_sample": "format",
    "Loader": "loader",
    "from_config": "config",
    "Stream": "mix", "mix": "mix",
    "pack": "pack",
    "Context": "pipeline", "Pipeline": "pipeline",
    "shards": "shardlist",
    "shuffle": "shuffle",
    "split_by_node": "split", "split_by_worker": "split", "take": "split",
    "TarError": "tar", "read_tar_samples": "tar", "tar_samples": "tar",
    "ImageTiles": "tiles", "Tiles": "tiles", "to_unit_float": "tiles",
    "ChatTemplate": "tokenize", "ChatTokenizer": "tokenize", "tokenize": "tokenize",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vlmstream' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # next time, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Importing a submodule binds it on the package. Where a public verb shares its module's name
        # (vs.batch lives in vlmstream/batch.py), the verb must win: leave the binding to __getattr__.
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
