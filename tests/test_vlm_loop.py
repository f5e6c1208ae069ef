"""The batch contract as a nanoVLM-style loop uses it: shards -> ... -> batches -> model(...) with no glue."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vlmstream as vs
from vlm_data import chat_tokenizer, write_easyvqa_shards
from vlmstream.stages.tiles import num_tiles
from vlmstream.stages.tokenize import IGNORE

TILE, MAX_SIDE, RUN = 32, 64, 64


class TinyVLM(nn.Module):
    """nanoVLM's forward signature and image splicing: tiles -> 64 patch features replacing the image tokens."""

    def __init__(self, vocab: int, image_token_id: int, dim: int = 32):
        super().__init__()
        self.image_token_id = image_token_id
        self.vision = nn.Conv2d(3, dim, 4, 4)  # a 32x32 tile -> 8x8 = 64 features
        self.embed = nn.Embedding(vocab, dim)
        self.block = nn.TransformerEncoderLayer(dim, 2, 64, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, images, attention_mask=None, targets=None):
        if isinstance(images, list):  # nanoVLM flattens the nested list in token order
            images = torch.cat([img for sample in images for img in sample])
        feats = self.vision(images).flatten(2).transpose(1, 2).reshape(-1, self.embed.embedding_dim)
        x = self.embed(input_ids)
        where = input_ids == self.image_token_id
        assert int(where.sum()) == feats.shape[0], "image tokens and image features must match one to one"
        x = x.masked_scatter(where.unsqueeze(-1), feats)
        causal = nn.Transformer.generate_square_subsequent_mask(input_ids.shape[1])
        x = self.block(x, src_mask=causal, src_key_padding_mask=attention_mask == 0 if attention_mask is not None else None,
                       is_causal=True)
        logits = self.head(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_easyvqa_shards(str(tmp_path_factory.mktemp("vqa")))


def vlm_pipe(index, tok, packed):
    stages = [vs.shards(index, seed=0), vs.split_by_node(0, 1), vs.split_by_worker(), vs.fetch(), vs.tar_samples(),
              vs.shuffle(20), vs.decode(vs.ImageTiles(TILE, MAX_SIDE)), vs.tokenize(tok, max_len=2048)]
    if packed:
        stages.append(vs.pack(2048, max_images=3, buffer=16))
    return vs.Pipeline(*stages, vs.batch(4))


def check_contract(b, tok):
    ids, mask, labels, images = b["input_ids"], b["attention_mask"], b["labels"], b["images"]
    assert ids.dtype == mask.dtype == labels.dtype == torch.int64 and ids.shape == mask.shape == labels.shape
    assert isinstance(images, list) and len(images) == ids.shape[0]
    markers = {tok.tok.token_to_id(tok.global_image_token)} | {tok.tok.token_to_id(tok.tile_marker(r, c)) for r in (1, 2) for c in (1, 2)}
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        assert mask[row, -n:].all() and not mask[row, :-n].any(), "left padding"
        assert (ids[row, :-n] == tok.pad_id).all() and (labels[row, :-n] == IGNORE).all()
        tiles = sum(img.shape[0] for img in images[row])
        assert all(img.dtype == torch.float32 and img.shape[1:] == (3, TILE, TILE) and 0 <= img.min() and img.max() <= 1
                   for img in images[row])
        assert int((ids[row] == tok.image_token_id).sum()) == tiles * RUN
        seq = ids[row].tolist()
        runs = [seq[i] for i in range(len(seq) - 1) if seq[i] in markers and seq[i + 1] == tok.image_token_id]
        expected = []
        for img in images[row]:  # 5 tiles: global, then row 1 col 1, 1-2, 2-1, 2-2
            assert img.shape[0] == num_tiles((2, 2))
            expected += [tok.global_image_token] + [tok.tile_marker(r, c) for r in (1, 2) for c in (1, 2)]
        assert runs == [tok.tok.token_to_id(t) for t in expected]
        for t in range(len(seq)):
            assert labels[row, t] == IGNORE or labels[row, t] == seq[t + 1]
        assert (labels[row] != IGNORE).any()


@pytest.mark.parametrize("packed", [False, True])
def test_a_nanovlm_loop_trains_on_vlmstream_batches_with_no_glue(shards, packed):
    torch.manual_seed(0)
    tok = chat_tokenizer(image_token_length=RUN)
    model = TinyVLM(len(tok), tok.image_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, seen = [], 0
    for batch in vs.Loader(vlm_pipe(shards, tok, packed), num_workers=2):
        check_contract(batch, tok)
        if packed:
            assert batch["position_ids"].shape == batch["input_ids"].shape
        _, loss = model(batch["input_ids"], batch["images"], attention_mask=batch["attention_mask"], targets=batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        seen += 1
    assert seen >= 3 and all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < losses[0]


def test_answers_in_labels_are_the_easyvqa_answers(shards):
    tok = chat_tokenizer(image_token_length=RUN)
    answers = set()
    for batch in vlm_pipe(shards, tok, packed=False):
        for row in range(batch["input_ids"].shape[0]):
            seq, lab = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
            text = tok.tok.decode([seq[t + 1] for t in range(len(seq) - 1) if lab[t] != IGNORE], skip_special_tokens=False)
            answers.update(a for a in text.split("<|im_end|>") if a)
    import easy_vqa

    assert answers and answers <= set(easy_vqa.get_answers())
