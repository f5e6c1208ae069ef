"""The 224 job's peers in the benchmark suite (tools/bench/peers.py): a peer that is not installed is reported as
skipped, with the reason, and the section's tables still render. Nothing here measures anything."""

from __future__ import annotations

from bench import peers, suite  # tools/bench/ (conftest puts tools/ on sys.path)


def test_a_peer_not_installed_is_found_missing_and_its_contenders_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMSTREAM_PEERS", str(tmp_path))  # an empty folder: no peer installed there
    found = peers.check()
    assert set(found) == set(peers.PEERS) and all("missing" in v for v in found.values())
    assert "make bench installs it" in found["mosaic"]["missing"]
    conversions = {"mds": {"skipped": "mosaicml-streaming not installed here"}, "parquet": {"s": 1.0}}
    for name in ("mosaic", "mosaic_same", "mosaic_s3", "litdata", "energon_same"):
        assert "not installed here" in suite._skip_reason(name, found, conversions, None)
    assert suite._skip_reason("vlmstream_local", found, conversions, None) is None
    assert suite._skip_reason("vlmstream_s3", found, conversions, "moto is not installed") == "moto is not installed"


def test_the_224_tables_show_skipped_contenders_and_the_targets():
    row = {"best_samples_per_s": 1200.0, "median_samples_per_s": 1100.0, "cpu_ms_per_sample": 1.5,
           "first_batch_s": 0.2, "peak_rss_mib": 700.0}
    res = {"samples": 8000, "shards": 8, "bytes": 457e6, "workers": 2, "batch": 32, "size": 224, "rounds": 3,
           "rows": {"vlmstream_local": row, "webdataset_same": {**row, "best_samples_per_s": 1000.0},
                    "limit": {k: v for k, v in row.items() if k not in ("first_batch_s", "peak_rss_mib")}},
           "ratios": {"vlmstream_local/webdataset_same": {"best": 1.2, "median_of_rounds": 1.1, "by_cpu": 1.0}},
           "targets": {"b": {"best_peer": "webdataset_same", "goal": 1.0, "best": 1.2, "median_of_rounds": 1.1}},
           "conversions": {"mds": {"skipped": "mosaicml-streaming not installed here"},
                           "parquet": {"s": 2.0, "cpu_s": 1.9, "bytes": 456e6}},
           "skipped": {"mosaic": "mosaicml-streaming not installed here"},
           "versions": {"webdataset": "1.0.2", "datasets": "5.2.0", "mosaic": None, "litdata": None,
                        "energon": None}}
    text = suite.md_224(res)
    assert "| skipped: mosaicml-streaming not installed here |" in text
    assert "| vlmstream, local tar shards: the same pipeline on index.json | 1,200 | 1,100 | 1.50 | 0.20 | 700 | - |" in text
    assert "target (b)" in text and "**1.20x** best/best" in text and ": met" in text
    assert "| Parquet: pyarrow `write_table` (what HF datasets reads) | 2.0 | 1.9 | 456 |" in text


def test_a_section_names_the_command_line_and_the_load_of_its_run():
    m = {"cores": 2, "cpu": "AMD EPYC", "memory_gib": 23.5, "os": "Linux", "kernel": "6", "python": "3.11",
         "torch": "2", "loadavg": [1.5, 1.0, 1.0]}
    r = {"readers": {}, "samples": 1, "shards": 1, "bytes": 1, "rounds": 1, "vlmstream_over_webdataset": 1.0,
         "machine": m, "started": "2026-12-07T00:00", "loadavg_end": [2.25, 2.0, 2.0],
         "run_as": "python tools/bench/suite.py --only tar --rounds 3"}
    text = suite.section_md("tar", r, {"machine": m, "started": "2026-12-07T00:00"})
    assert "These figures: `python tools/bench/suite.py --only tar --rounds 3`." in text
    assert "load average 1.5 at the start (2.25 at the end)" in text
