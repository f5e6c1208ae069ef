"""Presets: the stages after reading, set up to give the batches a known training codebase's own loader gives.

``vs.presets.nanovlm(...)`` reproduces nanoVLM's data path (its ``VQADataset``, image processor,
``ConstantLengthDataset`` and ``VQACollator``, with its config's defaults) for the same records, bit for bit:
tokens, labels, attention masks, padding and tile pixels (tests/test_presets.py runs nanoVLM's own code beside
it). Each difference from vlmstream's defaults is one named option of a stage, so the preset is only a list of
stages::

    nano = vs.presets.nanovlm("tokenizer.json", batch_size=8)
    pipe = vs.Pipeline(vs.shards(...), vs.split_by_node(), vs.split_by_worker(), vs.fetch(), vs.tar_samples(),
                       vs.shuffle(2000), *nano)
    model = VisionLanguageModel(cfg)  # vocabulary: len(nano.tokenizer)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from tokenizers import Tokenizer

from .stages.batch import batch
from .stages.decode import decode
from .stages.pack import pack as pack_stage
from .stages.tiles import ImageTiles
from .stages.tokenize import ChatTokenizer, tokenize


@dataclass
class Preset:
    """A tokenizer and the stages that use it; iterating gives the stages (``vs.Pipeline(..., *preset)``)."""

    tokenizer: ChatTokenizer
    stages: list[Any]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.stages)


def nanovlm_tokenizer(tokenizer: str | Tokenizer, *, image_token_length: int = 64, max_grid: int = 8,
                      pad_token: str = "<|im_end|>") -> ChatTokenizer:
    """nanoVLM's tokenizer set-up: ChatML with the newline after each answer trained, ``<image: i>`` before each
    image of a sample with several, its image and tile tokens added in its order, padding with the eos
    (``<|im_end|>`` for SmolLM2-Instruct, nanoVLM's default language model). ``tokenizer``: a tokenizer.json
    path, a Hub model id, or a `tokenizers.Tokenizer`."""
    kw: dict[str, Any] = dict(template="nanovlm", image_token_length=image_token_length, max_grid=max_grid,
                              pad_token=pad_token, image_label="<image: {}>")
    if isinstance(tokenizer, Tokenizer):
        return ChatTokenizer(tokenizer, **kw)
    return ChatTokenizer.load(tokenizer, **kw)


def nanovlm(tokenizer: str | Tokenizer, *, batch_size: int, seq_len: int = 4096, tile: int = 512,
            max_side: int = 2048, image_token_length: int = 64, pack: bool = True, max_sample_length: int = 4096,
            max_images_per_example: int | None = 4, max_images_per_knapsack: int | None = 18,
            pack_buffer: int = 256, rounding: str = "exact", pad_token: str = "<|im_end|>",
            on_error: str = "raise") -> Preset:
    """decode -> tokenize -> pack -> batch as nanoVLM's train.py builds its loader; the defaults are its config's
    (``vit_img_size`` 512, ``max_img_size`` 2048 with ``resize_to_max_side_len``, ``mp_image_token_length`` 64,
    ``lm_max_length`` / ``max_sample_length`` 4096, 4 images a sample, 18 a packed sequence).

    Images: Pillow's RGB conversion (alpha dropped), decoded whole (no JPEG draft), resized by Pillow, tiles as
    float, the global view by torch's bilinear filter; with ``pack``, decoded lazily (the pack buffer holds
    compressed images). Samples: those of ``max_sample_length`` tokens or more, or with more than
    ``max_images_per_example`` images, are dropped and counted (``tokenize().stats``). Packing: each sample
    followed by an unattended pad token, at most ``max_images_per_knapsack`` images a sequence; which samples
    share a sequence is vlmstream's first-fit decreasing (deterministic and resumable), not nanoVLM's randomised
    balanced knapsack. Batches: left-padded to ``seq_len`` with the pad token, labels -100 there.
    ``rounding="nanovlm"`` repeats nanoVLM's floating-point tile-grid rounding (which can make a side a tile
    longer than it should be); the default computes the grid exactly, which differs for a few sizes.
    """
    tok = nanovlm_tokenizer(tokenizer, image_token_length=image_token_length, pad_token=pad_token)
    tiles = ImageTiles(tile, max_side, to_max_side=True, rounding=rounding, view="torch", output="float", draft=False,
                       kernel="pillow")
    max_len = min(max_sample_length - 1, seq_len - 1) if pack else seq_len  # a packed sample brings its pad token
    stages: list[Any] = [decode(tiles, rgb="pillow", lazy=pack, on_error=on_error),  # pixels made as rows leave
                         tokenize(tok, max_len=max_len, max_images=max_images_per_example, on_error=on_error)]
    if pack:
        stages.append(pack_stage(seq_len, max_images=max_images_per_knapsack, buffer=pack_buffer, trailing_sep=True,
                                 attend_sep=False))
    stages.append(batch(batch_size, padding="left", pad_to=seq_len))
    return Preset(tok, stages)


__all__ = ["Preset", "nanovlm", "nanovlm_tokenizer"]
