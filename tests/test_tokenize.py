"""ChatTokenizer and tokenize: image runs where the images are, labels exactly on the answers."""

import json

import pytest
import torch

import vlmstream as vs
from vlm_data import chat_tokenizer, easyvqa_conversations, img2dataset_samples, write_img2dataset_shards
from vlmstream.errors import FormatError
from vlmstream.stages.tiles import num_tiles
from vlmstream.stages.tokenize import IGNORE, labels_from, truncate

MSGS = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "<image>\nwhat color is the shape?"},
    {"role": "assistant", "content": "blue"},
    {"role": "user", "content": "and here <image> is it a circle?"},
    {"role": "assistant", "content": "no"},
]


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer(image_token_length=8)


def test_special_tokens_are_added_when_missing(tok):
    for t in ("<|image|>", "<|global_image|>", "<row_1_col_1>", "<row_8_col_8>", "<|im_start|>", "<|im_end|>"):
        assert tok.tok.token_to_id(t) is not None, t
    assert tok.pad_token == "<|endoftext|>" and tok.pad_id == tok.tok.token_to_id("<|endoftext|>")


def test_image_runs_follow_tile_order(tok):
    enc = tok.encode(MSGS, [(1, 1), (2, 3)])
    ids = enc.input_ids
    names = [tok.tok.id_to_token(i) for i in ids]
    runs = [(i, names[i]) for i in range(len(ids)) if names[i] != "<|image|>" and i + 1 < len(ids) and names[i + 1] == "<|image|>"]
    markers = [n for _, n in runs]
    assert markers == ["<|global_image|>", "<|global_image|>"] + [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2, 3)]
    for i, _ in runs:
        assert names[i + 1:i + 9] == ["<|image|>"] * 8 and names[i + 9] != "<|image|>"
    assert names.count("<|image|>") == (1 + 7) * 8
    assert [ids[s] for s, _ in enc.image_spans] == [tok.tok.token_to_id("<|global_image|>")] * 2


def test_labels_cover_exactly_the_answers_and_their_end_token(tok):
    enc = tok.encode(MSGS, [(1, 1), (1, 1)])
    answer = tok.tok.decode([i for i, m in zip(enc.input_ids, enc.target) if m], skip_special_tokens=False)
    assert answer == "blue<|im_end|>no<|im_end|>"
    labels = labels_from(enc.input_ids, enc.target, shift=True)
    for t, lab in enumerate(labels):
        assert lab == IGNORE or lab == enc.input_ids[t + 1]
    assert sum(lab != IGNORE for lab in labels) == sum(enc.target)
    unshifted = labels_from(enc.input_ids, enc.target, shift=False)
    assert [lab for lab in unshifted if lab != IGNORE] == [i for i, m in zip(enc.input_ids, enc.target) if m]


def test_chatml_rendering_round_trips(tok):
    enc = tok.encode(MSGS[:3], [(1, 1)])
    text = tok.tok.decode(enc.input_ids, skip_special_tokens=False).replace("<|image|>", "")
    assert text == ("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\n<|global_image|>\n"
                    "what color is the shape?<|im_end|>\n<|im_start|>assistant\nblue<|im_end|>\n")


def test_mismatches_and_reserved_text_are_errors(tok):
    with pytest.raises(FormatError, match="placeholders"):
        tok.encode(MSGS, [(1, 1)])
    with pytest.raises(FormatError, match="reserved token"):
        tok.encode([{"role": "user", "content": "hi <|image|>"}, {"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="max_grid"):
        tok.encode(MSGS, [(1, 1), (9, 1)])


def test_truncation_never_cuts_through_an_image(tok):
    enc = tok.encode(MSGS, [(1, 1), (2, 2)])
    second = enc.image_spans[1]
    cut, kept = truncate(enc, second[0] + 5)
    assert kept == 1 and len(cut.input_ids) == second[0]
    full, kept = truncate(enc, len(enc.input_ids))
    assert kept == 2 and full.input_ids == enc.input_ids


def sample_of(msgs, tiles, key="k"):
    s = {"__key__": key, "__url__": "u", "json": json.dumps({"messages": msgs, "images": [f"{i}.png" for i in range(len(tiles))]}).encode()}
    for i, t in enumerate(tiles):
        s[f"{i}.png"] = t
    return s


def test_stage_drops_or_truncates_and_counts(tok):
    from vlmstream.stages.tiles import Tiles

    t = Tiles(torch.zeros(1, 3, 4, 4), (1, 1))
    long = [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "answer " * 200}]
    late = [{"role": "user", "content": "what " * 200 + "<image>"}, {"role": "assistant", "content": "no"}]
    stage = vs.tokenize(tok, max_len=150)
    out = list(stage(iter([sample_of(long, [t]), sample_of(late, [t]), sample_of(MSGS, [t, t])])))
    assert len(out) == 1 and stage.stats.too_long == 2 and stage.stats.samples == 1
    stage = vs.tokenize(tok, max_len=150, overflow="truncate")
    out = list(stage(iter([sample_of(long, [t], "a"), sample_of(late, [t], "b")])))
    assert [o["__key__"] for o in out] == ["a"]  # b's answer fell past the cut
    assert stage.stats.truncated == 2 and stage.stats.no_answer == 1
    assert len(out[0]["input_ids"]) == 150 and len(out[0]["images"]) == 1


def test_easyvqa_through_decode_and_tokenize():
    tok = chat_tokenizer(image_token_length=64)
    convs = easyvqa_conversations(8)
    samples = [sample_of(m, [png], f"{i:03d}") for i, (m, png) in enumerate(convs)]
    chain = vs.Pipeline(lambda _: iter(samples), vs.decode(vs.ImageTiles(tile=32, max_side=64)), vs.tokenize(tok, 4096))
    out = list(chain)
    assert len(out) == 8
    for o, (msgs, _) in zip(out, convs):
        ids, labels = o["input_ids"], o["labels"]
        assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
        (img,) = o["images"]
        assert img.shape == (5, 3, 32, 32)  # 64x64 -> 2x2 tiles + global
        assert int((ids == tok.image_token_id).sum()) == num_tiles((2, 2)) * 64
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        got = tok.tok.decode([int(ids[t + 1]) for t in range(len(ids) - 1) if labels[t] != IGNORE], skip_special_tokens=False)
        assert got == "".join(a + "<|im_end|>" for a in answers)


def test_from_pretrained_through_huggingface_hub(tmp_path, monkeypatch):
    """A Hub model's tokenizer.json through huggingface_hub, against the local Hub stand-in (HF_ENDPOINT)."""
    import importlib

    import huggingface_hub.constants

    from hf_standin import HubStandin
    from vlm_data import easyvqa_bpe_json

    repo = tmp_path / "model"
    repo.mkdir()
    (repo / "tokenizer.json").write_text(easyvqa_bpe_json())
    with HubStandin({"org/tiny-lm": {"main": str(repo)}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        importlib.reload(huggingface_hub.constants)
        try:
            tok = vs.ChatTokenizer.from_pretrained("org/tiny-lm", image_token_length=4)
        finally:
            monkeypatch.undo()
            importlib.reload(huggingface_hub.constants)
        assert not hub.unknown
    assert tok.encode(MSGS[:3], [(1, 1)]).input_ids == chat_tokenizer(image_token_length=4).encode(MSGS[:3], [(1, 1)]).input_ids


def test_img2dataset_captions_stream_and_the_empty_ones_are_counted(tmp_path):
    """Captions as LAION-style data has them, streamed straight from img2dataset-shaped shards: every non-empty
    caption arrives as its answer; empty and blank ones (an empty txt) are counted, not raised, under the default
    on_error="raise" of every stage."""
    samples = img2dataset_samples(24)
    shards = write_img2dataset_shards(str(tmp_path), samples)
    tok = chat_tokenizer(image_token_length=4)
    pipe = vs.Pipeline(vs.shards(shards, shuffle=False), vs.fetch(), vs.tar_samples(),
                       vs.decode(vs.ImageTiles(tile=32, max_side=64)), vs.tokenize(tok, 4096))
    out = list(pipe)
    good = [s for s in samples if s.caption.strip()]
    assert 0 < len(good) < len(samples)
    assert [o["__key__"] for o in out] == [s.key for s in good]
    for o, s in zip(out, good):
        ids, labels = o["input_ids"], o["labels"]
        got = tok.tok.decode([int(ids[t + 1]) for t in range(len(ids) - 1) if labels[t] != IGNORE],
                             skip_special_tokens=False)
        assert got == s.caption.strip() + "<|im_end|>"
    stats = pipe.stats().stage("tokenize").stats  # in the telemetry, beside too_long and no_answer
    assert stats["empty_caption"] == len(samples) - len(good) and stats["samples"] == len(good)
    assert stats["skipped"] == {} and stats["no_answer"] == 0


def test_a_conversation_without_an_answer_stays_an_error(tok):
    from vlmstream.stages.tiles import Tiles

    t = Tiles(torch.zeros(1, 3, 4, 4), (1, 1))
    question_only = sample_of([{"role": "user", "content": "<image>\nwhat shape?"}], [t])
    empty_answer = sample_of([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": " "}], [t])
    for s in (question_only, empty_answer):
        with pytest.raises(FormatError, match="no assistant answer"):
            list(vs.tokenize(tok)(iter([s])))
    stage = vs.tokenize(tok, on_error="skip")
    assert list(stage(iter([question_only, empty_answer]))) == []
    assert stage.stats.skipped == {"error": 2} and stage.stats.empty_caption == 0
