"""The `vlmstream` command: inspect (shape, manifest checks, contact sheet; local, HTTP, hf://) and bench."""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from vlm_data import (chat_tokenizer, easyvqa_conversations, img2dataset_samples, write_easyvqa_shards,
                      write_img2dataset_shards)
from vlmstream.cli import main as cli
from vlmstream.cli.inspect import SheetLayout
from vlmstream.stages.tiles import num_tiles

N, PER_SHARD, TILE, MAX_SIDE, RUN = 12, 4, 32, 64, 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    index = write_easyvqa_shards(str(root), n_images=N, maxcount=PER_SHARD)  # 3 shards of 4 samples
    tok_path = str(root / "tokenizer.json")
    chat_tokenizer().tok.save(tok_path)
    return index, tok_path


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr().out
    return code, out


def inspect_json(capsys, spec, *more):
    code, out = run(capsys, "inspect", spec, "--json", "--tile", TILE, "--max-side", MAX_SIDE, *more)
    return code, json.loads(out)


def test_inspect_easyvqa_shape_tokens_and_contact_sheet(vqa, capsys, tmp_path):
    index, tok_path = vqa
    sheet = tmp_path / "sheet.png"
    code, d = inspect_json(capsys, index, "--tokenizer", tok_path, "--image-token-length", RUN,
                           "--sheet", sheet, "-n", 5, "--columns", 2)
    assert code == 0
    convs = easyvqa_conversations(N)
    assert (d["samples"], d["shards"]) == (N, 3)
    assert d["bytes"] == sum(os.path.getsize(os.path.join(os.path.dirname(index), f"shard-00000{i}.tar"))
                             for i in range(3))
    assert d["extensions"] == {"json": N, "0.png": N}
    assert d["kinds"] == {"conversation": N}
    assert d["image_formats"] == {"PNG": N} and d["image_modes"] == {"RGB": N}
    assert d["image_sizes"] == {"64x64": N}
    assert d["tile_grids"] == {"tile": TILE, "max_side": MAX_SIDE, "2x2": N}
    nums = d["numbers"]
    turns = [len(m) for m, _ in convs]
    assert nums["turns_per_sample"]["min"] == min(turns) and nums["turns_per_sample"]["max"] == max(turns)
    assert nums["turns_per_sample"]["mean"] == pytest.approx(sum(turns) / N)
    assert nums["images_per_sample"]["mean"] == 1
    chars = [sum(len(t["content"].replace("<image>", "")) for t in m) for m, _ in convs]
    assert nums["text_chars_per_sample"]["mean"] == pytest.approx(sum(chars) / N)
    tok = chat_tokenizer(image_token_length=RUN)
    tokens = [len(tok.encode(m, [(2, 2)]).input_ids) for m, _ in convs]
    assert nums["tokens_per_sample"]["mean"] == pytest.approx(sum(tokens) / N)
    assert nums["tokens_per_sample"]["max"] == max(tokens)
    assert nums["image_tokens_per_sample"]["mean"] == num_tiles((2, 2)) * RUN
    assert d["checks"] == {"verified": True, "manifest": True, "problems": [], "ok": True}
    # the contact sheet: the expected size, and drawn (not blank): tile grid lines in red, text beside
    assert d["contact_sheet"]["samples"] == 5
    with Image.open(sheet) as im:
        assert im.size == SheetLayout(columns=2).size(5) == tuple(d["contact_sheet"]["size"])
        px = im.convert("RGB")
        w, h = px.size
        red = sum(1 for x in range(0, w, 2) for y in range(0, h, 2) if px.getpixel((x, y)) == (255, 40, 40))
        assert red > 200  # the grid lines over each image


def test_inspect_text_report(vqa, capsys):
    index, _ = vqa
    code, out = run(capsys, "inspect", index, "--tile", TILE, "--max-side", MAX_SIDE)
    assert code == 0
    assert f"{N} samples in 3 shards" in out
    assert "tile grids (tile 32, max_side 64): 2x2 12" in out
    assert "turns per sample" in out and "all 3 match the manifest" in out


def test_inspect_counts_empty_captions_apart_from_bad_conversations(capsys, tmp_path):
    """img2dataset-shaped shards: empty and blank captions are counted as such, not as problems; a sample that is
    neither a conversation nor a caption (an image alone) still is one."""
    samples = img2dataset_samples(20)
    write_img2dataset_shards(str(tmp_path), samples)
    with tarfile.open(tmp_path / "00002.tar", "w") as tf:
        info = tarfile.TarInfo("alone.jpg")
        info.size = len(samples[0].jpg)
        tf.addfile(info, io.BytesIO(samples[0].jpg))
    empty = sum(not s.caption.strip() for s in samples)
    code, d = inspect_json(capsys, f"{tmp_path}/{{00000..00002}}.tar")
    assert code == 0
    assert d["kinds"] == {"caption": len(samples) - empty, "empty caption": empty, "not a conversation": 1}
    assert d["empty_captions"] == empty and list(d["sample_problems"]) == ["not a conversation"]
    code, out = run(capsys, "inspect", f"{tmp_path}/{{00000..00001}}.tar")
    assert f"empty captions: {empty} " in out and "not a conversation" not in out


def test_inspect_detects_sha256_bytes_and_count_mismatches(vqa, capsys, tmp_path):
    index, _ = vqa
    folder = tmp_path / "copy"
    shutil.copytree(os.path.dirname(index), folder)
    doc = json.loads((folder / "index.json").read_text())
    doc["shards"][1]["samples"] += 1  # a count the shard does not hold
    doc["samples"] += 1
    (folder / "index.json").write_text(json.dumps(doc))
    shard = folder / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # in the end-of-archive padding: still a valid tar, but not the bytes of the manifest
    shard.write_bytes(bytes(data))
    code, d = inspect_json(capsys, folder / "index.json")
    assert code == 1 and not d["checks"]["ok"]
    problems = d["checks"]["problems"]
    assert len(problems) == 2
    assert "shard-000001.tar: 4 samples, the manifest says 5" in problems[0]
    assert "shard-000002.tar: sha256" in problems[1] and "does not match" in problems[1]
    assert d["samples"] == N  # every shard still read
    (folder / "shard-000000.tar").write_bytes(b"not a tar" * 100)  # unreadable: reported, the rest still read
    code, d = inspect_json(capsys, folder / "index.json", "--no-verify")
    assert code == 1
    assert any("shard-000000.tar: TarError" in p for p in d["checks"]["problems"])
    assert d["samples"] == N - PER_SHARD


def test_inspect_over_http(vqa, capsys):
    from servers import Nginx

    index, _ = vqa
    srv = Nginx(os.path.dirname(index))
    try:
        code, d = inspect_json(capsys, f"{srv.url}/index.json")
        assert code == 0 and d["checks"]["ok"] and d["samples"] == N and d["image_sizes"] == {"64x64": N}
        got = srv.requests()
        assert got["/index.json"] == 1 and all(got[f"/shard-00000{i}.tar"] == 1 for i in range(3))  # read once
    finally:
        srv.close()


def test_inspect_on_hf(vqa, capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from hf_standin import HubStandin

    index, _ = vqa
    with HubStandin({"org/vqa": {"main": os.path.dirname(index)}}, token="hf_standinTOKEN0123456789abcdef") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_TOKEN", "hf_standinTOKEN0123456789abcdef")
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        importlib.reload(huggingface_hub.constants)
        try:
            code, d = inspect_json(capsys, "hf://datasets/org/vqa/index.json")
            assert code == 0 and d["checks"]["ok"] and d["samples"] == N
            code, d = inspect_json(capsys, "hf://datasets/org/vqa/shard-{000000..000001}.tar")
            assert code == 0 and d["samples"] == 2 * PER_SHARD and not d["checks"]["manifest"]
        finally:
            monkeypatch.undo()
            importlib.reload(huggingface_hub.constants)


def test_bench_on_a_tiny_corpus_writes_table_json_and_chart(vqa, capsys, tmp_path):
    index, _ = vqa
    out = tmp_path / "bench"
    code, text = run(capsys, "bench", index, "--out", out, "--workers", 1, "--batch", 4, "--size", 32,
                     "--limit-samples", 6, "--overhead")
    assert code == 0
    md = (out / "bench.md").read_text()
    for row in ("tar reading alone", "stage decode", "end to end, vs.Loader(1 workers)", "decode limit", "Machine:",
                "Telemetry overhead"):
        assert row in md, row
    assert md in text
    res = json.loads((out / "bench.json").read_text())
    assert res["samples"] == N and res["loader"]["samples"] == N and res["stages"]["samples"] == N
    assert res["loader"]["first_batch_s"] > 0 and res["loader"]["peak_rss_mib"] > 0
    assert res["stages"]["report"]["bottleneck"]
    with Image.open(out / "bench.png") as im:
        assert im.format == "PNG" and im.size[0] > 500


SUITE_MACHINE = {"cores": 2, "cpu": "x", "memory_gib": 1, "os": "Linux", "kernel": "k", "python": "3", "torch": "t",
                 "loadavg": [1.0]}


def test_python_m_vlmstream_and_the_suite_docs_writer(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlmstream", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "inspect" in proc.stdout and "bench" in proc.stdout
    from bench import suite  # tools/bench/suite.py (conftest puts tools/ on sys.path)

    doc = tmp_path / "B.md"
    doc.write_text("# Benchmarks\n\nprose stays\n\n<!-- vlmstream-bench:overhead -->\nold\n"
                   "<!-- /vlmstream-bench:overhead -->\n\nmore prose\n")
    res = {"started": "2025-01-01T00:00:00", "machine": SUITE_MACHINE,
           "sections": {"startup": {"first_batch": {"vlmstream": {"first_batch_s": 0.5, "requests": 9,
                                                                  "requests_before_first_batch": 3}}}}}
    assert suite.update_docs(str(doc), res) == ["startup", "summary"]
    text = doc.read_text()
    assert json.loads((tmp_path / "B.json").read_text())["sections"]["startup"]["first_batch"]  # kept for the summary
    assert "prose stays" in text and "more prose" in text and "\nold\n" in text  # untouched: not in this run
    assert "<!-- vlmstream-bench:startup -->" in text and "| vlmstream | 0.50 | 3 (9) |" in text
    assert "Reproduce: `python tools/bench/suite.py --only 224 startup`" in text


def test_bench_suite_runs_the_checkouts_suite_in_a_subprocess(capsys, tmp_path):
    # --only docs measures nothing: the page is rewritten from the figures kept beside it, by tools/bench/suite.py
    doc, store = tmp_path / "B.md", tmp_path / "B.json"
    doc.write_text("# Benchmarks\n\n<!-- vlmstream-bench:startup -->\nold\n<!-- /vlmstream-bench:startup -->\n")
    store.write_text(json.dumps({"started": "2025-01-01T00:00:00", "machine": SUITE_MACHINE, "sections": {
        "startup": {"first_batch": {"vlmstream": {"first_batch_s": 0.25}}}}}))
    code, _ = run(capsys, "bench", "--suite", "--only", "docs", "--write-docs", doc, "--no-progress")
    assert code == 0
    text = doc.read_text()
    assert "\nold\n" not in text and "| vlmstream | 0.25 |" in text and "<!-- vlmstream-bench:summary -->" in text
    with pytest.raises(SystemExit, match="give it no shards"):
        run(capsys, "bench", "--suite", "shards/index.json")


def test_bench_suite_outside_a_checkout_says_so(capsys, monkeypatch):
    from vlmstream.cli import bench

    monkeypatch.setattr(bench, "checkout_suite", lambda: None)  # an installed vlmstream: no tools/ beside it
    with pytest.raises(SystemExit, match="checkout of the vlmstream repository"):
        run(capsys, "bench", "--suite", "--only", "224")
