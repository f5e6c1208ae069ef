"""YAML configs build the same chain as Python."""

import pytest
import torch

import vlmstream as vs
from vlm_data import chat_tokenizer, write_easyvqa_shards


def test_the_shipped_vlm_config_runs_and_keeps_the_contract(tmp_path):
    shards = write_easyvqa_shards(str(tmp_path))
    tok = chat_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    loader = vs.from_config("configs/vlm.yaml", data=shards, tokenizer=str(tmp_path / "tokenizer.json"))
    assert isinstance(loader, vs.Loader) and loader.num_workers == 4
    loader.num_workers = 2  # this machine has 2 cores
    # The shipped tiles are 512 px; the test images are 64 px, so each is one tile: check the contract anyway.
    batches = list(loader)
    assert batches and all(b["input_ids"].shape[0] <= 8 for b in batches)
    b = batches[0]
    assert b["input_ids"].dtype == torch.int64 and b["images"][0][0].shape == (1, 3, 512, 512)
    assert int((b["input_ids"] == loader.pipeline.stages[7].tok.image_token_id).sum()) == 64 * sum(len(r) for r in b["images"])


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown stage 'shufle'"):
        vs.from_config({"pipeline": [{"shufle": {"bufsize": 3}}]})
    with pytest.raises(ValueError, match="pass data=..."):
        vs.from_config({"pipeline": [{"shards": {"spec": "{data}/x.tar"}}]})
    with pytest.raises(ValueError, match="needs a top-level 'tokenizer:'"):
        vs.from_config({"pipeline": [{"tokenize": {}}]})
