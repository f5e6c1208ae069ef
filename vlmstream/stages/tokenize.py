"""`vs.ChatTokenizer` and `vs.tokenize(...)`: conversations with images -> input ids and labels.

The conversation is rendered with a chat template (ChatML by default, as SmolLM2 / Qwen / nanoVLM use it),
each ``<image>`` placeholder replaced by the image's tile runs: per tile one marker (``<|global_image|>`` or
``<row_i_col_j>``) and ``image_token_length`` image tokens. The whole text is encoded once; the character
spans of the assistant answers (their end token included) become the label mask, so the labels are exact for
any tokenizer, whatever its merges do at piece boundaries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from tokenizers import AddedToken, Tokenizer

from ..dataset.format import EMPTY_CAPTION, IMAGE_PLACEHOLDER, conversation_from_sample
from ..errors import ErrorCounts, FormatError, check_policy, handle, redact
from .decode import LazyTiles
from .tiles import Tiles, num_tiles

IGNORE = -100


@dataclass(frozen=True)
class ChatTemplate:
    """How turns are written: ``start`` (with ``{role}``), the content, ``end`` (the end-of-turn token, a
    training target for assistant turns), then ``after`` (a target too where ``after_is_target``)."""

    start: str = "<|im_start|>{role}\n"
    end: str = "<|im_end|>"
    after: str = "\n"
    specials: tuple[str, ...] = ("<|im_start|>", "<|im_end|>")
    after_is_target: bool = False


CHATML = ChatTemplate()
# nanoVLM's: ChatML whose newline after an assistant's <|im_end|> is trained too (its label mask covers the
# whole rendered turn after the "<|im_start|>assistant\n" prefix)
NANOVLM = ChatTemplate(after_is_target=True)
LLAMA3 = ChatTemplate("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", "",
                      ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
TEMPLATES = {"chatml": CHATML, "nanovlm": NANOVLM, "llama3": LLAMA3}


@dataclass
class Encoded:
    input_ids: list[int]
    target: list[bool]  # True where the token is part of an assistant answer (its end token included)
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # [first marker, end of last run) per image


class ChatTokenizer:
    """A `tokenizers.Tokenizer` plus a chat template and the image tokens, added when missing.

    ``image_label``: text written before each image of a sample that has several, with ``{}`` standing for the
    image's index in the sample (nanoVLM writes ``"<image: {}>"``); ordinary text, not a special token.
    ``pad_token``: the padding (and packing separator) token; by default the first of ``<|pad|>``, ``<pad>``,
    ``<|endoftext|>`` the tokenizer has (nanoVLM pads with its tokenizer's eos: ``<|im_end|>`` for SmolLM2).
    """

    def __init__(self, tokenizer: Tokenizer, *, template: ChatTemplate | str = "chatml", image_token_length: int = 64,
                 image_token: str = "<|image|>", global_image_token: str = "<|global_image|>", max_grid: int = 8,
                 pad_token: str | None = None, image_label: str | None = None):
        self.tok = tokenizer
        self.image_label = image_label
        self.template = TEMPLATES[template] if isinstance(template, str) else template
        self.image_token_length = image_token_length
        self.image_token, self.global_image_token = image_token, global_image_token
        self.max_grid = max_grid
        markers = [self.tile_marker(r, c) for r in range(1, max_grid + 1) for c in range(1, max_grid + 1)]
        pads = [pad_token] if pad_token else [t for t in ("<|pad|>", "<pad>", "<|endoftext|>") if tokenizer.token_to_id(t) is not None][:1]
        wanted = [*self.template.specials, image_token, global_image_token, *markers, *(pads or ["<|pad|>"])]
        missing = [t for t in wanted if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self.pad_token = (pads or ["<|pad|>"])[0]
        self.pad_id = tokenizer.token_to_id(self.pad_token)
        self.image_token_id = tokenizer.token_to_id(image_token)
        self.end_id = tokenizer.token_to_id(self.template.end)
        self._reserved = [*wanted]

    @classmethod
    def from_file(cls, path: str, **kw: Any) -> "ChatTokenizer":
        return cls(Tokenizer.from_file(path), **kw)

    @classmethod
    def from_pretrained(cls, repo_id: str, *, revision: str | None = None, token: str | bool | None = None,
                        **kw: Any) -> "ChatTokenizer":
        """A Hub model's tokenizer.json, through huggingface_hub (its cache, endpoint and token rules)."""
        from huggingface_hub import hf_hub_download

        return cls.from_file(hf_hub_download(repo_id, "tokenizer.json", revision=revision, token=token), **kw)

    @classmethod
    def load(cls, name: str, **kw: Any) -> "ChatTokenizer":
        """A tokenizer.json path where one exists, else a Hub model id: what a command line takes."""
        return cls.from_file(name, **kw) if os.path.exists(name) else cls.from_pretrained(name, **kw)

    def save(self, path: str) -> None:
        self.tok.save(path)

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    # ---------------------------------------------------------------------------------------------- images
    def tile_marker(self, row: int, col: int) -> str:
        return f"<row_{row}_col_{col}>"

    def image_string(self, grid: tuple[int, int]) -> str:
        """Marker + image tokens per tile, in the order ImageTiles stacks the tiles."""
        rows, cols = grid
        if rows > self.max_grid or cols > self.max_grid:
            raise ValueError(f"image grid {rows}x{cols} exceeds the tokenizer's max_grid {self.max_grid}")
        run = self.image_token * self.image_token_length
        out = [self.global_image_token + run]
        if (rows, cols) != (1, 1):
            out += [self.tile_marker(r + 1, c + 1) + run for r in range(rows) for c in range(cols)]
        return "".join(out)

    # ------------------------------------------------------------------------------------------- encoding
    def encode(self, messages: Sequence[Mapping[str, str]], grids: Sequence[tuple[int, int]] = ()) -> Encoded:
        """Render, encode once, and mark answer tokens; grids[i] is the i-th placeholder's image grid."""
        t = self.template
        text: list[str] = []
        targets: list[tuple[int, int]] = []
        images: list[tuple[int, int]] = []
        pos = 0
        k = 0

        def put(s: str) -> None:
            nonlocal pos
            text.append(s)
            pos += len(s)

        labelled = self.image_label is not None and len(grids) > 1
        for m in messages:
            content = m["content"]
            for reserved in self._reserved:
                if reserved in content:
                    raise FormatError(f"turn text contains the reserved token {reserved!r}", reason="reserved_token")
            put(t.start.format(role=m["role"]))
            answer_start = pos
            pieces = content.split(IMAGE_PLACEHOLDER)
            for i, piece in enumerate(pieces):
                if i:
                    if k >= len(grids):
                        raise FormatError(f"more {IMAGE_PLACEHOLDER} placeholders than images ({len(grids)})",
                                          reason="placeholder_mismatch")
                    if m["role"] == "assistant" and pos > answer_start:
                        targets.append((answer_start, pos))
                    if labelled:  # the image's label belongs to the image: never a target
                        put(self.image_label.format(k))
                    start = pos
                    put(self.image_string(grids[k]))
                    images.append((start, pos))
                    answer_start = pos
                    k += 1
                put(piece)
            put(t.end)
            if t.after_is_target:
                put(t.after)
            if m["role"] == "assistant":
                targets.append((answer_start, pos))
            if not t.after_is_target:
                put(t.after)
        if k != len(grids):
            raise FormatError(f"{k} {IMAGE_PLACEHOLDER} placeholders but {len(grids)} images",
                              reason="placeholder_mismatch")
        enc = self.tok.encode("".join(text), add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        target = _mark(offsets, targets)
        spans = _token_spans(offsets, images)
        expected = sum(num_tiles(g) for g in grids) * self.image_token_length
        if sum(1 for i in ids if i == self.image_token_id) != expected:
            raise FormatError("image tokens in the encoding do not match the images' tiles")
        return Encoded(ids, target, spans)


def _mark(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """True for tokens whose first character lies in one of the (sorted, disjoint) character spans."""
    out = [False] * len(offsets)
    j = 0
    for i, (start, end) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j < len(spans) and spans[j][0] <= start < spans[j][1] and end > start:
            out[i] = True
    return out


def _token_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character spans -> token index spans [first, last + 1)."""
    out = []
    i = 0
    for start, end in spans:
        while offsets[i][0] < start:
            i += 1
        first = i
        while i < len(offsets) and offsets[i][0] < end:
            i += 1
        out.append((first, i))
    return out


def labels_from(ids: Sequence[int], target: Sequence[bool], shift: bool = True) -> list[int]:
    """nanoVLM's labels: position t holds ids[t+1] where t+1 is an answer token (shift=True), or ids[t]
    where t is (shift=False, for models that shift inside); -100 elsewhere."""
    if shift:
        return [ids[t + 1] if target[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE] * bool(ids)
    return [i if m else IGNORE for i, m in zip(ids, target)]


def truncate(enc: Encoded, max_len: int) -> tuple[Encoded, int]:
    """Cut to at most max_len tokens, never through an image: an image that does not fit whole goes, with
    everything after it. Returns the cut encoding and how many images it keeps."""
    cut = max_len
    kept = len(enc.image_spans)
    for n, (first, end) in enumerate(enc.image_spans):
        if end > cut:
            cut, kept = min(cut, first), n
            break
    return Encoded(enc.input_ids[:cut], enc.target[:cut], enc.image_spans[:kept]), kept


@dataclass
class TokenizeStats(ErrorCounts):
    samples: int = 0
    too_long: int = 0  # dropped, or truncated with overflow="truncate"
    truncated: int = 0
    no_answer: int = 0  # dropped: no answer token left (or none to begin with)
    too_many_images: int = 0  # dropped: more images than max_images
    empty_caption: int = 0  # dropped: a caption sample with an empty caption (LAION-style data has them)


class tokenize:
    """The stage: decoded samples (conversation json, images as `Tiles`) -> training samples.

    Out: ``input_ids``, ``labels`` (int64 [L]), ``images`` (list of [n_tiles, 3, H, W], or of `LazyTiles` that
    the pack or batch stage makes when it emits the sample), ``__key__`` etc., and
    ``__pad_id__`` for the batch stage. A sample longer than ``max_len`` is dropped (``overflow="drop"``) or
    cut (``"truncate"``, never through an image); a sample left with no answer token, with more images than
    ``max_images``, or a caption sample with an empty caption, is dropped; all are counted in ``stats``.
    ``on_error``: a sample that breaks the format (invalid JSON, placeholders that do not match its images, a
    reserved token in its text, an image member missing) raises `FormatError` naming
    shard, key and reason ("raise"), or is skipped and counted in ``stats.skipped`` by reason ("skip";
    "warn" also logs it).
    """

    def __init__(self, tok: ChatTokenizer, max_len: int = 4096, *, overflow: str = "drop", shift_labels: bool = True,
                 max_images: int | None = None, on_error: str = "raise"):
        if overflow not in ("drop", "truncate"):
            raise ValueError(f"overflow must be drop or truncate, not {overflow!r}")
        self.tok, self.max_len, self.overflow, self.shift = tok, max_len, overflow, shift_labels
        self.max_images = max_images
        self.on_error = check_policy(on_error)
        self.stats = TokenizeStats()

    def encode_sample(self, sample: Mapping[str, Any]) -> dict[str, Any] | None:
        try:
            conv = conversation_from_sample(sample)
        except FormatError as e:
            if e.reason != EMPTY_CAPTION:
                raise
            self.stats.empty_caption += 1  # nothing to learn, but not an error: counted whatever on_error says
            return None
        if self.max_images is not None and len(conv.images) > self.max_images:
            self.stats.too_many_images += 1
            return None
        tiles = [_as_tiles(sample[ext], sample, ext) for ext in conv.images]
        try:
            enc = self.tok.encode(conv.messages, [t.grid for t in tiles])
        except (FormatError, ValueError) as e:
            raise FormatError(f"{_where(sample)}: {e}", reason=getattr(e, "reason", None) or "image_grid") from None
        if len(enc.input_ids) > self.max_len:
            self.stats.too_long += 1
            if self.overflow == "drop":
                return None
            enc, kept = truncate(enc, self.max_len)
            tiles = tiles[:kept]
            self.stats.truncated += 1
        labels = labels_from(enc.input_ids, enc.target, self.shift)
        if all(x == IGNORE for x in labels):
            self.stats.no_answer += 1
            return None
        self.stats.samples += 1
        out = {k: v for k, v in sample.items() if k.startswith("__")}
        out.update(
            input_ids=torch.tensor(enc.input_ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            images=[t if isinstance(t, LazyTiles) else t.pixels for t in tiles],  # lazy ones: made when emitted
            __pad_id__=self.tok.pad_id,
        )
        return out

    map_sample = encode_sample  # how a resumed pipeline rebuilds buffered samples (never None for those)

    def __call__(self, it: Iterator[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
        self.stats = TokenizeStats()
        for sample in it:
            try:
                out = self.encode_sample(sample)
            except FormatError as e:
                if e.reason == "not_decoded":  # the chain's set-up, not the data: never skipped
                    raise
                handle(self.on_error, e, self.stats, "tokenize")
                continue
            if out is not None:
                yield out


def _where(sample: Mapping[str, Any]) -> str:
    return f"{redact(str(sample.get('__url__', '?')))}: sample {sample.get('__key__', '?')!r}"


def _as_tiles(value: Any, sample: Mapping[str, Any], ext: str) -> Tiles | LazyTiles:
    if isinstance(value, (Tiles, LazyTiles)):
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 3:  # one whole image, e.g. from vs.Resize
        return Tiles(value[None], (1, 1))
    raise FormatError(f"{_where(sample)}: image {ext!r} is "
                      f"{type(value).__name__}; decode images with vs.decode(vs.ImageTiles(...)) before tokenize",
                      reason="not_decoded")


def train_bpe(texts: Iterator[str] | Sequence[str], vocab_size: int = 2000, path: str | None = None) -> Tokenizer:
    """A small byte-level BPE trained offline (tests, the smoke run): no Hub download needed."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tok.save(path)
    return tok


__all__ = ["CHATML", "LLAMA3", "ChatTemplate", "ChatTokenizer", "Encoded", "IGNORE", "labels_from", "tokenize",
           "train_bpe", "truncate"]
