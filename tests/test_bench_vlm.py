"""tools/bench/vlm.py and the suite's VLM section: what they compute and write, untimed, without ../shared."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

import vlmstream as vs


def _jpeg(w: int, h: int) -> bytes:
    arr = np.random.default_rng(w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_the_decode_limits_pillow_calls_make_the_jobs_tiles_with_pillows_kernel(monkeypatch):
    from bench import vlm

    from vlmstream.stages.decode import open_image

    monkeypatch.setattr(vlm, "TILE", 32)
    for w, h in ((70, 50), (300, 200)):  # upscaled: the view from the decoded photo; downscaled: from the grid
        data = _jpeg(w, h)
        for output in ("uint8", "float"):
            tiles = vs.ImageTiles(32, 128, output=output, kernel="pillow")
            want = tiles(open_image(data, tiles.draft_size)).pixels
            assert torch.equal(vlm.pillow_tiles(data, tiles), want), (w, h, output)


def test_nanovlm_is_skipped_with_a_note_without_its_source(monkeypatch, tmp_path):
    from bench import vlm

    monkeypatch.setattr(vlm, "NANOVLM", str(tmp_path / "nanovlm"))
    note = vlm.nanovlm_env()
    assert isinstance(note, str) and "../shared/nanovlm" in note


def _row(samples_per_s: float, cpu_ms: float, **kw):
    return {"samples_per_s": samples_per_s, "best_samples_per_s": samples_per_s, "cpu_ms_per_sample": cpu_ms,
            "rss": {"main_mib": 300, "workers_mib": [700, 710], "others_mib": [], "peak_sum_mib": 1700}, **kw}


def test_the_vlm_section_says_which_targets_are_met_and_by_how_much_the_others_are_missed():
    from bench import suite

    counts = {"samples": 2000, "batches": 50, "rows": 400, "tokens": 1_500_000, "image_tokens": 1_300_000,
              "tiles": 20_000, "fill": 0.91, "tile_dtype": "torch.uint8"}
    job = _row(40.0, 45.0, counts=counts, tokens_per_s=30_000, image_tokens_per_s=26_000, first_batch_s=1.2,
               fill=0.91, stages={"decode": 0.2, "pack": 40.0, "ship": 1.0})
    r = {"samples": 2000, "images": 2600, "shards": 8, "bytes": 200e6, "multi": 0.25, "rounds": 1, "workers": 2,
         "outputs": ["uint8"], "pack_buffer": 256, "machine": {}, "load_avg_end": 1.5,
         "rows": {"vlmstream_uint8_w2": job, "vlmstream_uint8_w1": _row(25.0, 40.0, counts=counts),
                  "limit_uint8_w2": _row(30.0, 60.0)},
         "ratios": {"vlmstream_uint8/limit": {"by_cpu_time": 60 / 45, "by_wall": 1.3, "best_over_best": 1.3},
                    "vlmstream_uint8: 2 workers/1": {"by_cpu_time": 0.9, "by_wall": 1.6, "best_over_best": 1.6}},
         "breakdown": {}, "pack_fill_by_buffer": {"by_buffer": {"256": {"fill": 0.91}}},
         "nanovlm_note": "not run: nanoVLM's source is not at ../shared/nanovlm"}
    md = suite.md_vlm(r)
    assert "| vlmstream, uint8 tiles, 2w | 40.0 | 30,000 | 26,000 | 45.0 | 1.20 s | 91.0% | 300; 700, 710 |" in md
    assert "| uint8: CPU time per sample >= 0.9x the decode limit's (limit / job) | 1.33x | met |" in md
    assert "| uint8: 2 workers >= 1.8x one (samples/s) | 1.60x | missed by 1.12x |" in md
    assert "| uint8: first batch <= 1.5 s | 1.20 s | met |" in md
    assert "nanoVLM: not run" in md and "| vlmstream_uint8_w2 | 0.20 | 40.00 | 1.00 |" in md
