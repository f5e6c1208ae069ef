"""The project's benchmarks (docs/BENCHMARKS.md), run from a checkout of the repository:

    python tools/bench/suite.py [--only SECTION ...] [--write-docs docs/BENCHMARKS.md]   # the page's figures
    python tools/bench/pipeline.py [--rounds 3] [--memory]     # the 224 job against webdataset and the decode limit
    python tools/bench/vlm.py          # the VLM job: tiles, tokenize, pack, batch
    python tools/bench/tar.py          # the tar reader alone against plain reads and webdataset
    python tools/bench/batch.py        # the batch stage's row-by-row collation, in one process
    python tools/bench/resume.py       # resuming from a checkpoint against replaying
    python tools/bench/ab.py A B       # two commits on the 224 job (and resume), runs alternating

common.py holds what the tools share (the corpora, the tokenizer, CPU times, the corpus options); the
primitives a user's `vlmstream bench SHARDS` needs too (peak RSS of a process tree, the decode limit, the
machine line, charts, the telemetry's on/off figures) are the library's, in vlmstream/cli/bench.py. Each tool
puts the repository's root and tools/ first on sys.path, so it measures the checkout it belongs to.
"""
