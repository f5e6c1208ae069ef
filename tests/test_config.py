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
    # The shipped tiles are nanoVLM's: 512 px, the long side taken to 2048, so each 64 px test image becomes 4x4
    # tiles and a global view. One batch is enough to check the contract.
    b = next(iter(loader))
    assert b["input_ids"].shape[0] <= 8
    assert b["input_ids"].dtype == torch.int64 and b["images"][0][0].shape == (17, 3, 512, 512)
    tiles = sum(t.shape[0] for row in b["images"] for t in row)
    assert int((b["input_ids"] == loader.pipeline.stages[7].tok.image_token_id).sum()) == 64 * tiles


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown stage 'shufle'"):
        vs.from_config({"pipeline": [{"shufle": {"bufsize": 3}}]})
    with pytest.raises(ValueError, match="pass data=..."):
        vs.from_config({"pipeline": [{"shards": {"spec": "{data}/x.tar"}}]})
    with pytest.raises(ValueError, match="needs a top-level 'tokenizer:'"):
        vs.from_config({"pipeline": [{"tokenize": {}}]})


def test_the_nanovlm_config_is_the_preset(tmp_path):
    import yaml

    shards = write_easyvqa_shards(str(tmp_path))
    chat_tokenizer().save(str(tmp_path / "tokenizer.json"))
    loader = vs.from_config("configs/nanovlm.yaml", data=shards, tokenizer=str(tmp_path / "tokenizer.json"))
    names = [type(s).__name__ for s in loader.pipeline.stages]
    assert names[-4:] == ["decode", "tokenize", "pack", "batch"]
    decode, tokenize, pack, batch = loader.pipeline.stages[-4:]
    assert decode.image.view == "torch" and decode.rgb == "pillow" and tokenize.tok.template.after_is_target
    assert pack.trailing_sep and not pack.attend_sep and batch.pad_to == 4096 and batch.n == 8
    with open("configs/nanovlm.yaml") as f:  # the same config with one-tile images, to run it here
        cfg = yaml.safe_load(f)
    cfg["pipeline"][-1]["nanovlm"].update(tile=64, max_side=64, seq_len=1024)
    cfg["loader"]["num_workers"] = 2
    b = next(iter(vs.from_config(cfg, data=shards, tokenizer=str(tmp_path / "tokenizer.json"))))
    assert b["input_ids"].shape[1] == 1024 and (b["attention_mask"][:, 0] == 0).any()  # fixed width, left pad
    with pytest.raises(ValueError, match="needs 'tokenizer:'"):
        vs.from_config({"pipeline": [{"nanovlm": {"batch_size": 2}}]})
