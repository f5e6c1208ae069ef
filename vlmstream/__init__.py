"""vlmstream: stream image-text training data for vision-language models from WebDataset shards.

    pipe = vs.Pipeline(vs.shards(...), vs.split_by_node(), vs.split_by_worker(), vs.fetch(), vs.tar_samples(),
                       vs.shuffle(2000), vs.decode(...), vs.batch(8))
    for batch in vs.Loader(pipe, num_workers=4): ...
"""

from .batch import batch, default_collate, vlm_collate
from .decode import DecodeError, Resize, decode, open_image
from .fetch import FetchError, FetchOptions, fetch, open_url
from .format import Conversation, FormatError, ShardInfo, conversation_from_sample
from .loader import Loader
from .pack import pack
from .pipeline import Context, Pipeline
from .shardlist import shards
from .shuffle import shuffle
from .split import split_by_node, split_by_worker, take
from .tar import TarError, read_tar_samples, tar_samples
from .tiles import ImageTiles, Tiles, to_unit_float
from .tokenize import ChatTemplate, ChatTokenizer, tokenize

__all__ = [
    "Context", "Conversation", "DecodeError", "FetchError", "FetchOptions", "FormatError", "Loader", "Pipeline",
    "Resize", "ShardInfo", "TarError", "batch", "conversation_from_sample", "decode", "default_collate", "fetch",
    "open_image", "open_url", "read_tar_samples", "shards", "shuffle", "split_by_node", "split_by_worker",
    "take", "tar_samples", "ImageTiles", "Tiles", "to_unit_float", "ChatTemplate", "ChatTokenizer", "tokenize",
    "pack", "vlm_collate",
]
__version__ = "0.1.0"
