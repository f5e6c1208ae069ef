"""The benchmarks behind docs/BENCHMARKS.md, in one run, from a checkout of the repository.

    python tools/bench/suite.py --write-docs docs/BENCHMARKS.md      # everything, then the docs' sections rewritten
    python tools/bench/suite.py --only 224 overhead                  # some sections
    python tools/bench/suite.py --quick --out /tmp/suite             # a small corpus, one round: a smoke test
    python tools/bench/suite.py --only docs --write-docs docs/BENCHMARKS.md   # the page again from its .json

``vlmstream bench --suite [...]`` runs this file of the checkout it is imported from, with the same options.

Sections (each one a block of docs/BENCHMARKS.md between ``<!-- vlmstream-bench:NAME -->`` markers):

  tar       the tar reader alone against plain reads and webdataset (tools/bench/tar.py)
  224       the 224 job against its peers, rounds interleaved (tools/bench/peers.py): the same samples in each
            system's own format, converted by its own writer (timed), read from local disk by vlmstream,
            webdataset, MosaicML streaming, LitData, Megatron-Energon and Hugging Face ``datasets``, (a) each
            with its own pipeline, (b) each calling vlmstream's decode; vlmstream and webdataset over nginx,
            vlmstream, Mosaic, LitData and Energon from moto's S3 server; the bare decode limit with and
            without draft decoding
  vlm       the VLM job: tiles, tokenize, pack, batch through vs.Loader with 1 and 2 workers, tiles as uint8 and
            float, beside its decode limit, the nanoVLM preset and nanoVLM's own data path (../shared/nanovlm;
            skipped with a note without it) (tools/bench/vlm.py; reported as missing if it fails)
  startup   time to the first batch and requests before it (from the 224 runs), and resuming from a
            checkpoint against replaying (tools/bench/resume.py)
  memory    peak RSS over N and 10N shards (tools/bench/pipeline.py --memory)
  overhead  the telemetry's cost: a chain of pass-through stages (per item and stage), the 224 job in one
            process and through vs.Loader, and the VLM job in one process, each with telemetry on and off
            in alternating runs

Writes OUT/suite.json (every figure), OUT/suite.md (the tables) and OUT/suite.png (a chart).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.dirname(HERE)]  # the checkout's vlmstream; tools/

from bench.common import (build_corpus, build_vlm_corpus, cpu_times, read_all, vlm_tokenizer,  # noqa: E402
                          write_manifests)
from bench import peers  # noqa: E402  (the 224 job's contenders)
from loopback_nginx import LoopbackNginx  # noqa: E402  (tools/loopback_nginx.py)
from vlmstream.cli.bench import Bars, draw, machine, machine_line, overhead_figures  # noqa: E402
from vlmstream.progress import bar  # noqa: E402

SECTIONS = ("tar", "224", "vlm", "startup", "memory", "overhead")
MARK = "<!-- vlmstream-bench:{} -->"
END = "<!-- /vlmstream-bench:{} -->"
TITLES = {"summary": "Summary", "tar": "Tar reading alone", "224": "The 224 job", "vlm": "The VLM job",
          "startup": "Startup", "memory": "Memory against dataset length", "overhead": "Telemetry overhead"}
SUITE = "python tools/bench/suite.py"


def command(name: str) -> str:
    """The command that reruns a section (startup's first-batch table comes from the 224 runs)."""
    return f"{SUITE} --only {'224 startup' if name == 'startup' else name}"


class Config:
    def __init__(self, args: argparse.Namespace):
        q = args.quick
        self.quick = q
        self.workdir = args.workdir
        self.shards, self.per_shard = (4, 200) if q else (8, 1000)
        self.rounds = args.rounds or (1 if q else 2)
        self.workers = args.workers
        self.vlm_shards, self.vlm_per_shard = (2, 24) if q else (8, 250)  # 2,000 samples: a round takes ~15 min
        self.vlm_rounds = 1 if q else (args.rounds or 1)
        self.repeat = 2 if q else 5
        self.memory_repeat = 2 if q else 10  # issue 3's check: 10x the shards, peak RSS within 10%
        self.small = (4, 200)  # the overhead runs: short, so that many on/off pairs fit
        self.progress = args.progress

    def corpus_args(self) -> list[str]:
        return ["--workdir", self.workdir, "--shards", str(self.shards), "--per-shard", str(self.per_shard)]


def run_tool(script: str, *argv: str) -> dict[str, Any]:
    """A tools/bench/ benchmark with --json in a process of its own, its progress lines passed through on
    stderr; the figures it printed, with the command that reproduces them."""
    path = os.path.join(HERE, script)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tools/bench/{script} is not there")
    proc = subprocess.run([sys.executable, path, *argv, "--json"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"tools/bench/{script} {' '.join(argv)} exited with status {proc.returncode}")
    out = proc.stdout
    return {**json.loads(out[out.index("{"):]), "tool_command": f"python tools/bench/{script} {' '.join(argv)}"}


# ------------------------------------------------------------------------------------------------------- tar


def section_tar(cfg: Config) -> dict[str, Any]:
    rounds = 3 if cfg.quick else 7
    return run_tool("tar.py", *cfg.corpus_args(), "--rounds", str(rounds))


def md_tar(r: dict[str, Any]) -> str:
    names = {"plain read": "plain read: 1 MiB `read()`s of the shard files, nothing else (the I/O limit)",
             "webdataset": "webdataset `tarfile_to_samples()` on `{\"url\": path}` (opens with `open(path, \"rb\")`)",
             "vlmstream": "vlmstream `tar_samples()` on `open(path, \"rb\")` streams",
             "vlmstream+buf": "vlmstream `tar_samples()` on `open(path, \"rb\", buffering=1 << 20)` streams"}
    lines = [f"What: samples per second out of the tar stage alone (bytes -> samples, no decoding), one process, "
             f"local shards in the page cache: {r['samples']:,} samples in {r['shards']} shards, "
             f"{r['bytes'] / 1e6:,.0f} MB (640x480 photo JPEGs of ~55 KB plus a JSON conversation). Best of "
             f"{r['rounds']} rounds, the readers alternating within each round.", "",
             "| reader | samples/s | MB/s |", "|---|---:|---:|"]
    for k, row in r["readers"].items():
        lines.append(f"| {names.get(k, k)} | {row['samples_per_s']:,} | {row['mb_per_s']:,.0f} |")
    lines += ["", f"vlmstream / webdataset: **{r['vlmstream_over_webdataset']:.1f}x**."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- 224


def hf_datasets_version() -> str | None:
    try:
        import datasets

        return datasets.__version__
    except ImportError:
        return None


HTTP_ROWS = ("vlmstream", "webdataset")  # nginx's log gives their requests


def _skip_reason(name: str, peers_found: dict[str, Any], conversions: dict[str, Any], s3_missing: str | None
                 ) -> str | None:
    """Why a contender cannot run here (its package, its format or its server missing), or None."""
    import shutil

    peer, _, where, _ = peers.CONTENDERS[name]
    if peer and "missing" in peers_found[peer]:
        return f"{peers.PEERS[peer][0]} not installed here ({peers_found[peer]['missing']}); `make bench` installs it"
    fmt = {"mosaic": "mds", "litdata": "litdata", "energon": "energon"}.get(peer or "")
    if name.startswith("hf_datasets"):
        fmt = "parquet"
        if not hf_datasets_version():
            return "Hugging Face datasets not installed (the bench extra)"
    if fmt and "skipped" in conversions.get(fmt, {}):
        return conversions[fmt]["skipped"]
    if where == "s3" and s3_missing:
        return s3_missing
    if name == "webdataset" and not shutil.which("curl"):
        return "webdataset reads http:// with curl: not installed (make system-deps)"
    return None


def section_224(cfg: Config) -> dict[str, Any]:
    """Every contender of tools/bench/peers.py, each run in a process of its own, rounds interleaved and their
    order rotating; the formats converted first, each by its own writer, timed."""
    import contextlib

    from bench import pipeline as bp

    paths = build_corpus(cfg.workdir, cfg.shards, cfg.per_shard)
    expect = cfg.shards * cfg.per_shard
    manifest, _ = write_manifests(paths, cfg.repeat)
    folder = os.path.dirname(paths[0])
    formats = os.path.join(cfg.workdir, f"peers-{cfg.shards}x{cfg.per_shard}")
    found = peers.check()
    conversions: dict[str, Any] = {}
    for fmt, peer in peers.FORMATS.items():
        if peer and "missing" in found[peer]:
            conversions[fmt] = {"skipped": f"{peers.PEERS[peer][0]} not installed here"}
        elif fmt == "parquet" and not hf_datasets_version():
            conversions[fmt] = {"skipped": "Hugging Face datasets not installed"}
        else:
            print(f"[224] converting the corpus to {fmt} ...", file=sys.stderr, flush=True)
            conversions[fmt] = peers.call(["convert", fmt, "--corpus", folder, "--out", os.path.join(formats, fmt)])
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from stores import S3Server  # tests/stores.py: moto's S3 server

    s3_missing = S3Server.missing()
    skipped = {n: why for n in peers.CONTENDERS if (why := _skip_reason(n, found, conversions, s3_missing))}
    only = os.environ.get("VLMSTREAM_BENCH_224")  # a comma-separated subset of the contenders (debugging)
    names = [n for n in peers.CONTENDERS if n not in skipped and (not only or n in only.split(","))]
    read_all(paths + [os.path.join(d, f) for d, _, fs in os.walk(formats) for f in fs])  # warm the page cache
    w, batch, size = cfg.workers, 32, 224
    runs: dict[str, list[dict[str, Any]]] = {}
    use_s3 = any(peers.CONTENDERS[n][2] == "s3" for n in names)
    with LoopbackNginx(folder) as srv, (S3Server() if use_s3 else contextlib.nullcontext()) as s3:
        argv = ["--corpus", folder, "--formats", formats, "--parquet", os.path.join(formats, "parquet"),
                "--url", srv.url, "--workers", str(w), "--batch", str(batch), "--size", str(size),
                "--expect", str(expect)]
        if s3 is not None:  # the corpus and the peers' copies in a bucket of the S3 server
            bucket = s3.make_bucket()
            for name in [manifest, *map(os.path.basename, paths)]:
                with open(os.path.join(folder, name), "rb") as f:
                    s3.put(bucket, f"corpus/{name}", f.read())
            for fmt, who in (("mds", "mosaic_s3"), ("litdata", "litdata_s3"), ("energon", "energon_s3")):
                top = os.path.join(formats, fmt)  # the peer's copy (energon's: the shards, linked, and its index)
                for d, _, files in (os.walk(top) if who in names else ()):
                    for name in files:
                        with open(os.path.join(d, name), "rb") as f:
                            s3.put(bucket, f"{fmt}/{os.path.relpath(os.path.join(d, name), top)}", f.read())
            argv += ["--s3", s3.url(bucket).rstrip("/"), "--s3-env", json.dumps(s3.env)]
        with bar(total=cfg.rounds * len(names), desc="224 job", unit="run", enabled=cfg.progress) as pb:
            for r in range(cfg.rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    pb.set_postfix_str(name)
                    mark = srv.mark()
                    out = peers.call(["run", name, *argv])
                    if name in HTTP_ROWS:
                        out.update(bp.requests_of(srv.since(mark), out))
                    runs.setdefault(name, []).append(out)
                    print(f"[224] round {r + 1} {name:<17} {out['samples_per_s']:7.0f} samples/s, "
                          f"{out['cpu_ms_per_sample']:.2f} CPU ms/sample", file=sys.stderr, flush=True)
                    pb.update(1)
    med = statistics.median
    rows = {}
    for name, rs in runs.items():
        rates = [x["samples_per_s"] for x in rs]
        row = {"best_samples_per_s": max(rates), "median_samples_per_s": med(rates), "runs": rates,
               "cpu_ms_per_sample": med(x["cpu_ms_per_sample"] for x in rs)}
        for k in ("first_batch_s", "peak_rss_mib", "steady_samples_per_s"):
            if k in rs[0]:
                row[k] = med(x[k] for x in rs)
        if "requests" in rs[0]:
            row["requests"] = rs[0]["requests"]
            row["requests_before_first_batch"] = rs[0]["requests_before_first_batch"]
        rows[name] = row

    def ratio(a: str, b: str, steady: bool = False) -> dict[str, Any]:
        key = "steady_samples_per_s" if steady else "samples_per_s"
        per_round = [x.get(key, x["samples_per_s"]) / y["samples_per_s"] for x, y in zip(runs[a], runs[b])]
        return {"best": max(x.get(key, x["samples_per_s"]) for x in runs[a]) / rows[b]["best_samples_per_s"],
                "median_of_rounds": med(per_round), "per_round": per_round,
                "by_cpu": rows[b]["cpu_ms_per_sample"] / rows[a]["cpu_ms_per_sample"]}

    pairs = [("vlmstream", "webdataset")] + [("vlmstream_s3", n) for n in ("mosaic_s3", "litdata_s3", "energon_s3")]
    pairs += [("vlmstream_local", n) for n in runs if peers.CONTENDERS[n][1] in ("a", "b") and n != "vlmstream_local"
              and peers.CONTENDERS[n][2] == "local"]
    pairs += [("vlmstream", "limit"), ("vlmstream_local", "limit"), ("limit", "limit_full")]
    ratios = {f"{a}/{b}": ratio(a, b) for a, b in pairs if a in runs and b in runs}
    if "vlmstream" in runs and "limit" in runs:  # from vlmstream's first batch on, as the limit is timed
        ratios["vlmstream (from its first batch)/limit"] = ratio("vlmstream", "limit", steady=True)
    targets = {}
    for variant, goal in (("a", 1.5), ("b", 1.0)):
        peer_rows = [n for n in runs if peers.CONTENDERS[n][1] == variant and peers.CONTENDERS[n][2] == "local"]
        if peer_rows and "vlmstream_local" in runs:
            best = max(peer_rows, key=lambda n: rows[n]["best_samples_per_s"])
            worst_cpu = min(ratios[f"vlmstream_local/{n}"]["by_cpu"] for n in peer_rows)
            targets[variant] = {"best_peer": best, "goal": goal, **ratios[f"vlmstream_local/{best}"],
                                "lowest_by_cpu": worst_cpu}
    import webdataset

    versions = {"webdataset": webdataset.__version__, "datasets": hf_datasets_version(),
                **{p: v.get("version") for p, v in found.items()}}
    return {"samples": expect, "shards": len(paths), "bytes": sum(os.path.getsize(p) for p in paths),
            "workers": w, "batch": batch, "size": size, "rounds": cfg.rounds, "rows": rows, "ratios": ratios,
            "targets": targets, "conversions": conversions, "skipped": skipped, "versions": versions}


def _row_text(name: str, versions: dict[str, Any]) -> str:
    text = ROW_TEXT.get(name, name)
    return text.format(**{k: v or "" for k, v in versions.items()})


ROW_TEXT = {name: text for name, (_, _, _, text) in peers.CONTENDERS.items()}
GROUPS = (("Each system's own pipeline (a), local files", "a", "local"),
          ("Every system calling vlmstream's decode and resize (b), local files", "b", "local"),
          ("Over the network (loopback): nginx for HTTP, moto's S3 server", None, "net"),
          ("The decode limit", "limit", "memory"))
CONVERSION_TEXT = {"mds": "MDS: `streaming.MDSWriter` (MosaicML streaming {mosaic})",
                   "litdata": "LitData chunks: `litdata.optimize(num_workers=2)` ({litdata})",
                   "energon": "Energon: `energon prepare` on the tar shards ({energon}; index only)",
                   "parquet": "Parquet: pyarrow `write_table` (what HF datasets reads)"}


def md_224(r: dict[str, Any]) -> str:
    v = {k: x or "" for k, x in r["versions"].items()}
    lines = [f"What: {r['samples']:,} samples ({r['shards']} shards, {r['bytes'] / 1e6:,.0f} MB of 640x480 photo "
             f"JPEGs) decoded to [3, 224, 224] uint8 tensors in batches of {r['batch']}, {r['workers']} DataLoader "
             f"workers (or processes), page cache warm. Each run in a fresh process of its own "
             "(tools/bench/peers.py: its imports done before the clock), timed from building the loader to the "
             "last batch (the limit: its decoding loop, in processes started and data loaded before the clock); "
             "CPU time of the process and its workers; peak RSS of the process and its workers (summed, sampled "
             f"every 50 ms). {r['rounds']} round{'s' * (r['rounds'] != 1)}, contenders interleaved, their order "
             "rotating. Variant (a): each system's pipeline as its documentation shows it, with the decode a user "
             "writes (Pillow's full decode and bilinear resize); variant (b): every system calling vlmstream's "
             "decode and resize (`open_image` with JPEG draft decoding, then `vs.Resize`), so what remains is "
             "each loader's own overhead. vlmstream's pipeline is that decode already: its row stands in both."]
    header = ["| contender | best samples/s | median | CPU ms/sample | first batch s | peak RSS MiB | "
              "requests (before 1st batch) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for title, variant, where in GROUPS:
        names = [n for n in peers.CONTENDERS if (n in r["rows"] or n in r["skipped"])
                 and ((peers.CONTENDERS[n][2] in ("http", "s3")) if where == "net" else
                      (peers.CONTENDERS[n][2] == where and variant in peers.CONTENDERS[n][1]))]
        if not names:
            continue
        lines += ["", f"{title}:", "", *header]
        for n in names:
            text = _row_text(n, v)
            if n in r["skipped"]:
                lines.append(f"| {text} | skipped: {r['skipped'][n]} | | | | | |")
                continue
            row = r["rows"][n]
            fb = f"{row['first_batch_s']:.2f}" if "first_batch_s" in row else "-"
            rss = f"{row['peak_rss_mib']:,.0f}" if "peak_rss_mib" in row else "-"
            rq = f"{row['requests']} ({row['requests_before_first_batch']})" if "requests" in row else "-"
            lines.append(f"| {text} | {row['best_samples_per_s']:,.0f} | {row['median_samples_per_s']:,.0f} | "
                         f"{row['cpu_ms_per_sample']:.2f} | {fb} | {rss} | {rq} |")
    if r.get("conversions"):
        lines += ["", f"Conversions from the tar shards, each by its system's own writer, once per run (the tar "
                  "shards are vlmstream's and webdataset's format as they are; vlmstream reads them without an "
                  "index, its `index.json` is optional):", "",
                  "| format | seconds | CPU s | size MB |", "|---|---:|---:|---:|"]
        for fmt, c in r["conversions"].items():
            text = CONVERSION_TEXT.get(fmt, fmt).format(**v)
            if "skipped" in c:
                lines.append(f"| {text} | skipped: {c['skipped']} | | |")
            else:
                lines.append(f"| {text} | {c['s']:.1f} | {c['cpu_s']:.1f} | {c['bytes'] / 1e6:,.0f} |")
    lines.append("")
    for k, x in r["ratios"].items():
        by_cpu = f", {x['by_cpu']:.2f}x by CPU time per sample" if "by_cpu" in x else ""
        lines.append(f"- {k.replace('/', ' / ')}: **{x['best']:.2f}x** (best/best), {x['median_of_rounds']:.2f}x "
                     f"median of rounds{by_cpu}")
    for variant, t in r.get("targets", {}).items():
        verdict = ("met" if t["best"] >= t["goal"] else
                   f"missed by {t['goal'] - t['best']:.2f}x (vlmstream would need "
                   f"{t['goal'] / t['best'] - 1:.0%} more)")
        by_cpu = f"; by CPU time per sample {t['lowest_by_cpu']:.2f}x the leanest peer" if "lowest_by_cpu" in t else ""
        lines.append(f"- target ({variant}): vlmstream, local files >= {t['goal']:.1f}x the best peer "
                     f"({t['best_peer']}): **{t['best']:.2f}x** best/best, {t['median_of_rounds']:.2f}x median of "
                     f"rounds: {verdict}{by_cpu}")
    if r.get("skipped"):
        lines.append(f"- skipped here: {', '.join(sorted(r['skipped']))} (reasons in the tables)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- vlm


def section_vlm(cfg: Config) -> dict[str, Any]:
    """tools/bench/vlm.py: the VLM job with 1 and 2 workers, tiles as uint8 and float, the nanoVLM preset, the
    decode limits and nanoVLM's own data path (skipped with a note without ../shared/nanovlm)."""
    argv = ["--workdir", cfg.workdir, "--shards", str(cfg.vlm_shards), "--per-shard", str(cfg.vlm_per_shard),
            "--rounds", str(cfg.vlm_rounds), "--workers", str(cfg.workers)]
    if cfg.quick:
        argv += ["--limit-samples", "16", "--breakdown", "4"]
    try:
        return run_tool("vlm.py", *argv)
    except (FileNotFoundError, RuntimeError, ValueError) as e:  # a failed VLM run leaves the other sections be
        return {"missing": str(e)}


VLM_TARGETS = {"limit": 0.9, "workers": 1.8, "first_batch_s": 1.5, "nanovlm": 2.0}


def _verdict(value: float, target: float, higher: bool = True) -> str:
    """"met" or how far off: the factor still missing."""
    ok = value >= target if higher else value <= target
    if ok:
        return "met"
    return f"missed by {target / value if higher else value / target:.2f}x"


def md_vlm(r: dict[str, Any]) -> str:
    if "missing" in r:
        return f"Not measured in this run: {r['missing']}."
    rows, ratios, w = r["rows"], r["ratios"], r["workers"]
    fill = r["pack_fill_by_buffer"]
    job = rows.get(f"vlmstream_uint8_w{w}") or next(v for k, v in rows.items() if "counts" in v)
    c = job["counts"]
    lines = [f"What: {r['samples']:,} samples ({r['images']:,} images, {r['shards']} shards, {r['bytes'] / 1e6:,.0f} "
             f"MB): 640x480 photo JPEGs with easy-VQA conversations of 2-6 turns, {r['multi']:.0%} of the samples "
             "with 2-3 photos -> `decode(ImageTiles(512, max_side=2048), lazy=True)` (to_max_side: a photo becomes "
             "2048x1536, 4x3 tiles + a global view = 13 tiles, 845 tokens) -> `tokenize(max_len=4096)` -> "
             f"`pack(4096, max_images=18, buffer={r['pack_buffer']})` -> `batch(8)`, through `vs.Loader` with 1 and "
             f"{w} workers. Per batch: {c['rows'] / c['batches']:.1f} rows, {c['samples'] / c['batches']:.1f} "
             f"samples, {c['tokens'] / c['batches']:,.0f} tokens ({c['image_tokens'] / c['tokens']:.0%} image "
             f"tokens), {c['tiles'] / c['batches']:.0f} tiles ({c['tiles'] / c['batches'] * 3 * 512 * 512 / 2**20:,.0f}"
             f" MiB as uint8, {c['tiles'] / c['batches'] * 12 * 512 * 512 / 2**20:,.0f} as float); pack fill "
             f"{c['fill']:.1%}. {r['rounds']} round{'s' * (r['rounds'] != 1)}, contenders interleaved; each "
             "contender a process of its own, its peak RSS per process (VmHWM). CPU time: the process and its "
             "workers (user + system)."
             + (f" The decode limits time the images of the first {r['limit_samples']:,} samples, held in memory."
                if r.get("limit_samples") else ""), "",
             "| contender | samples/s | tokens/s | image tokens/s | CPU ms/sample | first batch | pack fill | "
             "peak RSS MiB: main; workers |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, x in rows.items():
        tok = (f"{x['tokens_per_s']:,.0f} | {x['image_tokens_per_s']:,.0f}" if "tokens_per_s" in x else "- | -")
        fb = f"{x['first_batch_s']:.2f} s" if x.get("first_batch_s") else "-"
        fl = f"{x['fill']:.1%}" if "fill" in x else "-"
        rss = x["rss"]
        lines.append(f"| {VLM_NAMES.get(name.rsplit('_w', 1)[0], name)}, {name.rsplit('_w', 1)[1]}w | "
                     f"{x['samples_per_s']:,.1f} | {tok} | {x['cpu_ms_per_sample']:,.1f} | {fb} | {fl} | "
                     f"{rss['main_mib']:,}; {', '.join(f'{v:,}' for v in rss['workers_mib']) or '-'} |")
    lines += ["", "| target | measured | |", "|---|---:|---|"]
    for o in r["outputs"]:
        k = f"vlmstream_{o}/limit"
        if k in ratios:
            v = ratios[k]["by_cpu_time"]
            lines.append(f"| {o}: CPU time per sample >= 0.9x the decode limit's (limit / job) | {v:.2f}x | "
                         f"{_verdict(v, VLM_TARGETS['limit'])} |")
        k = f"vlmstream_{o}: {w} workers/1"
        if k in ratios:
            v = ratios[k]["by_wall"]
            lines.append(f"| {o}: {w} workers >= 1.8x one (samples/s) | {v:.2f}x | {_verdict(v, VLM_TARGETS['workers'])} |")
        x = rows.get(f"vlmstream_{o}_w{w}", {})
        if x.get("first_batch_s"):
            v = x["first_batch_s"]
            lines.append(f"| {o}: first batch <= 1.5 s | {v:.2f} s | {_verdict(v, VLM_TARGETS['first_batch_s'], False)} |")
        k = f"vlmstream_{o}/nanovlm"
        if k in ratios:
            for key, label in (("by_wall", "samples/s"), ("tokens_per_s", "tokens/s")):
                v = ratios[k][key]
                lines.append(f"| {o}: >= 2x nanoVLM's {label} | {v:.2f}x | {_verdict(v, VLM_TARGETS['nanovlm'])} |")
    if "preset/nanovlm" in ratios:
        v = ratios["preset/nanovlm"]
        lines.append(f"| the nanoVLM preset (its pixels, bit for bit): >= 2x nanoVLM's samples/s, tokens/s | "
                     f"{v['by_wall']:.2f}x, {v['tokens_per_s']:.2f}x | {_verdict(min(v['by_wall'], v['tokens_per_s']), VLM_TARGETS['nanovlm'])} |")
    stage_rows = {k: v["stages"] for k, v in rows.items() if "stages" in v}
    if stage_rows:
        names = list(dict.fromkeys(s for st in stage_rows.values() for s in st))
        lines += ["", "Where the workers' time goes, CPU ms per sample (summed over workers; with lazy decode the "
                  "pixels are made in `pack`, as it emits a sequence; `ship`: the rest of the workers' CPU time: "
                  "the batch's other tensors into shared memory, the DataLoader's worker loop, the kernel's work):", "",
                  "| contender | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for k, st in stage_rows.items():
            lines.append(f"| {k} | " + " | ".join(f"{st.get(n, 0):.2f}" for n in names) + " |")
    for out, b in r.get("breakdown", {}).items():
        if not lines[-1].startswith("| ImageTiles"):
            lines += ["", f"ImageTiles' steps timed apart on the images of the first {b['samples']} samples (CPU ms "
                      "per image, one thread): `kernel='auto'` (the job: torch's antialiased uint8 kernels) and "
                      "`kernel='pillow'` (Pillow's resize: the limit's calls, the preset's kernel):", "",
                      "| ImageTiles | " + " | ".join(next(iter(b["ms_per_image"].values()))) + " |",
                      "|---|" + "---:|" * len(next(iter(b["ms_per_image"].values())))]
        for kernel, steps in b["ms_per_image"].items():
            lines.append(f"| ImageTiles(output={out}, kernel={kernel}) | " + " | ".join(f"{v:.1f}" for v in steps.values()) + " |")
    if fill:
        lines += ["", "Pack fill by buffer size (the corpus's token counts, grids from the JPEG headers): " + ", ".join(
            f"{b} samples {x['fill']:.1%}" for b, x in fill["by_buffer"].items()) + "."]
    if r.get("nanovlm_note"):
        lines += ["", f"nanoVLM: {r['nanovlm_note']}"]
    elif "nanovlm" in r:
        n = r["nanovlm"]
        lines += ["", "nanoVLM (../shared/nanovlm, its environment under .venv/nanovlm): `load_dataset('parquet', "
                  "streaming=True)` over the same samples -> `VQADataset` -> `ConstantLengthDataset("
                  f"num_of_sequences={n['num_of_sequences']}, queue_size={n['queue_size']})` -> `DataLoader(8, "
                  "collate_fn=VQACollator, num_workers)`, its config's defaults otherwise (train.py: "
                  "num_of_sequences 4 x batch, queue 8: more decoded float tiles than this machine holds with two "
                  "workers)."]
    lines += ["", f"Load average at the end: {r.get('load_avg_end', 0):.2f} (the start's is on the machine line)."]
    return "\n".join(lines)


VLM_NAMES = {"vlmstream_uint8": "vlmstream, uint8 tiles", "vlmstream_float": "vlmstream, float tiles",
             "limit_uint8": "decode limit (Pillow calls), uint8", "limit_float": "decode limit (Pillow calls), float",
             "limit_vs_uint8": "vlmstream's transform alone, uint8", "limit_vs_float": "vlmstream's transform alone, float",
             "preset": "`vs.presets.nanovlm` (nanoVLM's pixels)", "nanovlm": "nanoVLM's own data path"}


# --------------------------------------------------------------------------------------------------- startup


def section_startup(cfg: Config, earlier: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "224" in earlier:
        out["first_batch"] = {k: {kk: v[kk] for kk in ("first_batch_s", "requests", "requests_before_first_batch")
                                  if kk in v} for k, v in earlier["224"]["rows"].items() if "first_batch_s" in v}
    try:
        out["resume"] = run_tool("resume.py", *cfg.corpus_args(), "--batches", "10" if cfg.quick else "100")
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        out["resume"] = {"missing": str(e)}
    return out


def md_startup(r: dict[str, Any]) -> str:
    lines = []
    if r.get("first_batch"):
        lines += ["Time from building the loader to its first batch, and the requests the server saw before it "
                  "(the 224 job's runs above, medians):", "",
                  "| contender | first batch s | requests before the first batch (all requests) |",
                  "|---|---:|---:|"]
        for k, v in r["first_batch"].items():
            rq = f"{v['requests_before_first_batch']} ({v['requests']})" if "requests" in v else "- (local files)"
            lines.append(f"| {k} | {v['first_batch_s']:.2f} | {rq} |")
        lines.append("")
    res = r.get("resume") or {}
    if "missing" in res:
        lines.append(f"Resume: not measured ({res['missing']}).")
    elif res:
        lines += ["Resuming from a checkpoint (`load_state_dict`, then the first batch) against replaying the epoch "
                  f"to the same point, after {res['batches_before_checkpoint']} batches of the 224 job with "
                  "`shuffle(2000)`, 2 workers, local shards:", "",
                  "| | seconds |", "|---|---:|",
                  f"| fresh start to the first batch | {res['fresh_time_to_first_batch_s']:.2f} |",
                  f"| resume to the first batch | {res['resume_to_first_batch_s']:.2f} |",
                  f"| replay to the same batch | {res['replay_to_same_batch_s']:.2f} |", "",
                  f"The state is {res['state_bytes']:,} bytes of JSON; resuming is "
                  f"**{res['speedup_vs_replay']:.1f}x** faster than replaying."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- memory


def section_memory(cfg: Config) -> dict[str, Any]:
    return run_tool("pipeline.py", *cfg.corpus_args(), "--memory", "--repeat", str(cfg.memory_repeat),
                    "--rounds", "1")


def md_memory(r: dict[str, Any]) -> str:
    lines = [f"What: peak resident memory of one epoch of {r['pipeline']}, over nginx on loopback, for N shards and "
             f"for a manifest listing them {r['shards'][[k for k in r['shards'] if k != 'N'][0]] // r['shards']['N']} "
             f"times (shards of {r['shard_mb']} MB); the main process and its workers sampled every 50 ms, highest "
             f"of {r['rounds']} rounds.", "",
             "| shards | peak RSS MiB (sum over processes) | peak PSS MiB | sum of per-process peaks MiB |",
             "|---:|---:|---:|---:|"]
    for k, n in r["shards"].items():
        lines.append(f"| {n:,} | {r['peak_rss_mib'][k]:,} | {r['peak_pss_mib'][k]:,} | {r['hwm_sum_mib'][k]:,} |")
    lines += ["", f"{[k for k in r['shards'] if k != 'N'][0]} / N: **{r['ratio_peak_rss']:.3f}** (peak RSS), "
              f"{r['ratio_pss']:.3f} (PSS): memory does not grow with the dataset's length."]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- overhead


def snapshot_cost(pipe: Any, repeat: int = 2000) -> dict[str, Any]:
    """What a batch's telemetry snapshot costs in a worker (build it, pickle it as the DataLoader does)."""
    import pickle

    tel = pipe._telemetry
    t0 = time.process_time()
    for _ in range(repeat):
        snap = tel.snapshot(pipe.stages)
    build = (time.process_time() - t0) / repeat
    data = pickle.dumps(snap, protocol=pickle.HIGHEST_PROTOCOL)
    t0 = time.process_time()
    for _ in range(repeat):
        pickle.loads(pickle.dumps(snap, protocol=pickle.HIGHEST_PROTOCOL))
    return {"build_us": build * 1e6, "pickle_us": (time.process_time() - t0) / repeat * 1e6, "bytes": len(data)}


def passthrough_cost(items: int = 300_000, stages: int = 8, rounds: int = 5) -> dict[str, Any]:
    """ns per item per stage that the timers add, on a chain of pass-through generators (the worst case)."""
    import vlmstream as vs

    def through(it: Any) -> Any:
        for x in it:
            yield x

    def source(_: Any) -> Any:
        return iter(range(items))

    best = {True: float("inf"), False: float("inf")}
    for _ in range(rounds):
        for flag in (True, False):
            pipe = vs.Pipeline(source, *[through] * stages, rank=0, world_size=1, telemetry=flag)
            t0 = time.process_time()
            for _ in pipe:
                pass
            best[flag] = min(best[flag], time.process_time() - t0)
    per = (best[True] - best[False]) / (items * (stages + 1)) * 1e9
    return {"items": items, "stages": stages + 1, "best_cpu_s_on": best[True], "best_cpu_s_off": best[False],
            "ns_per_item_per_stage": per, "ns_per_item_per_stage_off": best[False] / (items * (stages + 1)) * 1e9}


def _timed_run(make: Callable[[], Any], count: Callable[[Any], int]) -> dict[str, Any]:
    c0, t0 = cpu_times(), time.perf_counter()
    n = sum(count(b) for b in make())
    c1 = cpu_times()
    return {"s": time.perf_counter() - t0, "cpu_s": c1.total - c0.total, "user_s": c1.user - c0.user, "n": n}


def _pinned(flag: bool, make: Callable[[bool], Callable[[], Any]], count: Callable[[Any], int], conn: Any) -> None:
    """A child of `side_by_side`: runs the job when told, on the core it is told, and reports its CPU time."""
    import torch

    torch.set_num_threads(1)
    _timed_run(make(flag), count)  # warm-up, not reported
    conn.send("ready")
    while True:
        core = conn.recv()
        if core is None:
            return
        os.sched_setaffinity(0, {core})
        conn.send(_timed_run(make(flag), count))


def side_by_side(make: Callable[[bool], Callable[[], Any]], count: Callable[[Any], int], rounds: int, pb: Any,
                 label: str) -> dict[str, Any] | None:
    """The job with telemetry on and off at the same time, in two processes pinned to two cores (swapped every
    round): both halves of a pair meet the same load from the rest of the machine. None without two cores."""
    import multiprocessing as mp

    try:
        cores = sorted(os.sched_getaffinity(0))[:2]
    except AttributeError:
        return None
    if len(cores) < 2:
        return None
    ctx = mp.get_context("fork")
    pipes, procs = [], []
    for flag in (True, False):
        a, b = ctx.Pipe()
        p = ctx.Process(target=_pinned, args=(flag, make, count, b), daemon=True)
        p.start()
        pipes.append(a)
        procs.append(p)
    try:
        for c in pipes:
            c.recv()
        on, off = [], []
        for r in range(rounds):
            pb.set_postfix_str(f"{label} on and off side by side")
            pipes[0].send(cores[r % 2])
            pipes[1].send(cores[(r + 1) % 2])
            on.append(pipes[0].recv())
            off.append(pipes[1].recv())
            pb.update(2)
    finally:
        for c in pipes:
            c.send(None)
        for p in procs:
            p.join(timeout=30)
    return {**_figures(on, off), "side_by_side": True}


def _figures(on: list[dict[str, Any]], off: list[dict[str, Any]]) -> dict[str, Any]:
    res = overhead_figures(on, off)
    res["items"] = on[0]["n"]
    res["user_s_on"] = statistics.median(x["user_s"] for x in on)
    res["user_s_off"] = statistics.median(x["user_s"] for x in off)
    res["pairs_user"] = [x["user_s"] / y["user_s"] - 1 for x, y in zip(on, off)]
    res["user_overhead"] = statistics.median(res["pairs_user"])
    return res


def _on_off(make: Callable[[bool], Callable[[], Any]], count: Callable[[Any], int], rounds: int,
            pb: Any, label: str, a_a: bool = False) -> dict[str, Any]:
    """Pairs of runs with telemetry on and off, back to back, in alternating order; ``a_a``: off and off (an
    A/A control: how far apart two identical runs land on this machine)."""
    on, off = [], []
    pb.set_postfix_str(f"{label} warm-up")
    _timed_run(make(False), count)  # not counted: the first run of a process pays for growing its heap
    for r in range(rounds):
        for first in ((True, False) if r % 2 == 0 else (False, True)):
            flag = first and not a_a
            pb.set_postfix_str(f"{label} telemetry {'on' if flag else 'off'}")
            (on if first else off).append(_timed_run(make(flag), count))
            pb.update(1)
    if {x["n"] for x in on} != {x["n"] for x in off}:
        raise SystemExit(f"{label}: runs with and without telemetry gave different counts")
    return _figures(on, off)


def section_overhead(cfg: Config) -> dict[str, Any]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker; idle intra-op threads spinning would blur CPU times
    try:
        return _section_overhead(cfg)
    finally:
        torch.set_num_threads(threads)


def _section_overhead(cfg: Config) -> dict[str, Any]:
    import vlmstream as vs
    from bench import pipeline as bp

    paths = build_corpus(cfg.workdir, *cfg.small)
    manifest, _ = write_manifests(paths, cfg.repeat)
    spec = os.path.join(os.path.dirname(paths[0]), manifest)
    rounds = 2 if cfg.quick else 8
    out: dict[str, Any] = {"rounds": rounds}
    out["passthrough"] = passthrough_cost(100_000 if cfg.quick else 300_000)

    def pipe_224(flag: bool) -> Any:
        p = bp.vlmstream_pipeline(spec, 32, 224)
        p.telemetry = flag
        return p

    vlm = None
    try:
        from bench import vlm as bench_vlm

        index = build_vlm_corpus(cfg.workdir, 2, 50)  # 100 samples: a run takes seconds, not minutes
        tok = vlm_tokenizer(cfg.workdir, bench_vlm.RUN)
        vlm = (bench_vlm, index, tok)
    except Exception as e:  # a failed VLM corpus leaves the other jobs be
        out["vlm_in_process"] = {"missing": f"tools/bench/vlm.py: {type(e).__name__}: {e}"}
    jobs = 3 + (vlm is not None)
    with bar(total=jobs * 2 * rounds, desc="overhead", unit="run", enabled=cfg.progress) as pb:
        one = lambda b: len(b["__key__"])  # noqa: E731
        out["224_in_process"] = (side_by_side(lambda f: (lambda: iter(pipe_224(f))), one, rounds, pb, "224 in-process")
                                 or _on_off(lambda f: (lambda: iter(pipe_224(f))), one, rounds, pb, "224 in-process"))
        out["224_loader"] = _on_off(lambda f: (lambda: iter(vs.Loader(pipe_224(f), num_workers=cfg.workers))),
                                    lambda b: len(b["__key__"]), rounds, pb, f"224 Loader({cfg.workers})")
        out["224_loader_aa"] = _on_off(lambda f: (lambda: iter(vs.Loader(pipe_224(f), num_workers=cfg.workers))),
                                       lambda b: len(b["__key__"]), rounds, pb, f"224 Loader({cfg.workers}) A/A",
                                       a_a=True)
        if vlm is not None:
            mod, index, tok = vlm

            def pipe_vlm(flag: bool) -> Any:
                return vs.Pipeline(*mod.stages(index, tok, "float"), rank=0, world_size=1, telemetry=flag)

            packed = lambda b: sum(k.count("+") + 1 for k in b["__key__"])  # noqa: E731
            out["vlm_in_process"] = (side_by_side(lambda f: (lambda: iter(pipe_vlm(f))), packed, rounds, pb, "vlm")
                                     or _on_off(lambda f: (lambda: iter(pipe_vlm(f))), packed, rounds, pb, "vlm"))
        # the items the timers saw in the 224 job (every stage's output), from a run with telemetry on
        p = pipe_224(True)
        for _ in p:
            pass
        events = sum(st.items_out for st in p.stats().stages)
        batches = p.stats().stages[-1].items_out
        out["snapshot"] = snapshot_cost(p)
    # What the timers cost per item and stage, times the items of the 224 job, plus a snapshot per batch:
    j = out["224_in_process"]
    j["timer_events"], j["batches"] = events, batches
    snap = out["snapshot"]
    j["modelled"] = (out["passthrough"]["ns_per_item_per_stage"] * 1e-9 * events
                     + batches * (snap["build_us"] + snap["pickle_us"]) * 1e-6) / j["cpu_s_off"]
    return out


def md_overhead(r: dict[str, Any]) -> str:
    pt = r["passthrough"]
    lines = [f"What: the cost of the pipeline's telemetry (per-stage counters and timers, a snapshot shipped with each "
             f"batch), measured by running the same job with `vs.Pipeline(..., telemetry=True)` and `False` in "
             f"alternating runs ({r['rounds']} of each; overheads are the medians of the on/off pairs, after one "
             "warm-up run). The one-process jobs run on and off at the same time, in two processes pinned to the two "
             "cores (swapped every pair), so both halves of a pair meet the same load; the Loader runs (two "
             "workers each) run one after the other, with an A/A control beside them. CPU time is of the process and its workers, with one torch thread. "
             "User CPU time is the figure to read: the system part follows the heap's page faults, hundreds of "
             "thousands in one run and none in the next whatever the setting, and wall time follows the rest of "
             "the machine's load. On this shared machine differences of a few percent either way are noise; the "
             "per-item cost measured below is the precise figure.", "",
             "| job | pairs | user CPU s (on / off) | **user CPU overhead** (pairs' range) | with system CPU | "
             "wall |", "|---|---:|---:|---:|---:|---:|"]
    names = {"224_in_process": "224 job, one process (0 workers)", "vlm_in_process": "VLM job, one process (0 workers)",
             "224_loader": "224 job, `vs.Loader(2 workers)`",
             "224_loader_aa": "A/A control: the same Loader runs with telemetry off in both halves of each pair"}
    for k, text in names.items():
        x = r.get(k)
        if not x:
            continue
        if "missing" in x:
            lines.append(f"| {text} | - | not measured: {x['missing']} | | | |")
            continue
        if x.get("side_by_side"):
            text += " (on and off side by side, one core each)"
        lines.append(f"| {text}, {x['items']:,} samples | {x['rounds']} | {x['user_s_on']:.2f} / {x['user_s_off']:.2f} | "
                     f"**{x['user_overhead']:+.1%}** ({min(x['pairs_user']):+.0%} to {max(x['pairs_user']):+.0%}) | "
                     f"{x['cpu_overhead']:+.1%} | {x['wall_overhead']:+.1%} |")
    lines += ["", f"The timers themselves, on a chain of {pt['stages']} pass-through generator stages over "
              f"{pt['items']:,} items (the worst case: stages that do nothing): **{pt['ns_per_item_per_stage']:.0f} ns "
              f"per item per stage** (a bare generator step costs {pt['ns_per_item_per_stage_off']:.0f} ns). The 224 "
              f"job's timers see {r['224_in_process']['timer_events']:,} items (every stage's outputs: shard items, "
              f"samples twice, batches); with one snapshot per batch ({r['snapshot']['build_us']:.0f} us to build, "
              f"{r['snapshot']['pickle_us']:.0f} us to pickle and unpickle, {r['snapshot']['bytes']:,} bytes), "
              f"telemetry adds about **{r['224_in_process']['modelled']:.3%}** to the job's CPU time: far under the "
              "2% target. The on/off runs above agree with it within their noise (compare the A/A control's spread)."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the report


def summary_rows(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    s = res["sections"]
    rows = []
    if "224" in s and "rows" in s["224"]:
        r = s["224"]
        label = {"vlmstream": "vlmstream over HTTP", "webdataset": "webdataset over HTTP",
                 "vlmstream_local": "vlmstream, local files", "hf_datasets": "HF datasets, local Parquet",
                 "limit": "the decode limit"}
        ratio = {"vlmstream": ("vlmstream/webdataset", "webdataset"),
                 "vlmstream_local": ("vlmstream_local/hf_datasets", "HF datasets")}
        for k, text in label.items():
            if k in r["rows"]:
                value = f"{r['rows'][k]['best_samples_per_s']:,.0f} samples/s"
                if k in ratio and ratio[k][0] in r["ratios"]:
                    value += f" ({r['ratios'][ratio[k][0]]['best']:.2f}x {ratio[k][1]})"
                rows.append((f"224 job: {text}", value, command("224")))
        for variant, t in r.get("targets", {}).items():
            what = ("its own pipeline" if variant == "a" else "vlmstream's decode") + ", local files"
            rows.append((f"224 job ({variant}): vlmstream against the fastest peer, {what}",
                         f"{t['best']:.2f}x {t['best_peer']} ({r['rows'][t['best_peer']]['best_samples_per_s']:,.0f} "
                         "samples/s)", command("224")))
        for peer, text in (("mosaic_s3", "MosaicML streaming"), ("litdata_s3", "LitData"),
                           ("energon_s3", "Megatron-Energon")):
            if f"vlmstream_s3/{peer}" in r["ratios"]:
                rows.append((f"224 job over S3 (loopback): vlmstream against {text}",
                             f"{r['ratios'][f'vlmstream_s3/{peer}']['best']:.2f}x", command("224")))
    if "vlm" in s and "rows" in s["vlm"]:
        v = s["vlm"]
        for o in v["outputs"]:
            x = v["rows"].get(f"vlmstream_{o}_w{v['workers']}")
            if x:
                vs_nano = v["ratios"].get(f"vlmstream_{o}/nanovlm")
                rows.append((f"VLM job, vs.Loader({v['workers']}), {o} tiles",
                             f"{x['samples_per_s']:,.1f} samples/s, {x['tokens_per_s']:,.0f} tokens/s"
                             + (f" ({vs_nano['by_wall']:.1f}x nanoVLM)" if vs_nano else ""), command("vlm")))
    if "tar" in s and "readers" in s["tar"]:
        t = s["tar"]
        rows.append(("tar reading alone: vlmstream", f"{t['readers']['vlmstream']['samples_per_s']:,} samples/s "
                     f"({t['vlmstream_over_webdataset']:.1f}x webdataset)", command("tar")))
    if "startup" in s:
        fb = s["startup"].get("first_batch", {}).get("vlmstream")
        if fb:
            rows.append(("startup: first batch (vlmstream, HTTP)", f"{fb['first_batch_s']:.2f} s, "
                         f"{fb.get('requests_before_first_batch', '-')} requests before it",
                         command("startup")))
        rs = s["startup"].get("resume", {})
        if "resume_to_first_batch_s" in rs:
            rows.append(("startup: resume from a checkpoint", f"{rs['resume_to_first_batch_s']:.2f} s "
                         f"({rs['speedup_vs_replay']:.1f}x faster than replay)", command("startup")))
    if "memory" in s and "ratio_peak_rss" in s["memory"]:
        m = s["memory"]
        big = [k for k in m["shards"] if k != "N"][0]
        rows.append((f"memory: peak RSS, N vs {big} shards", f"{m['peak_rss_mib']['N']:,} vs {m['peak_rss_mib'][big]:,} MiB",
                     command("memory")))
    if "overhead" in s:
        o = s["overhead"]
        rows.append(("telemetry overhead (224 job)", f"{o['224_in_process']['modelled']:.2%} of CPU time from the "
                     f"measured per-item cost; on/off runs {o['224_in_process']['user_overhead']:+.1%} (one process), "
                     f"{o['224_loader']['user_overhead']:+.1%} (Loader) user CPU, within their noise",
                     command("overhead")))
    return rows


RENDER = {"tar": md_tar, "224": md_224, "vlm": md_vlm, "startup": md_startup, "memory": md_memory,
          "overhead": md_overhead}


def section_md(name: str, r: dict[str, Any], res: dict[str, Any]) -> str:
    body = RENDER[name](r)
    tool = r.get("tool_command") or (r.get("resume") or {}).get("tool_command")
    extra = f" (runs `{tool}`)" if tool else ""
    m, when = r.get("machine", res["machine"]), r.get("started", res["started"])
    took = f", in {r['seconds']:,.0f} s" if "seconds" in r else ""
    end = f" ({r['loadavg_end'][0]:.2f} at the end)" if "loadavg_end" in r else ""
    ran = f"\nThese figures: `{r['run_as']}`." if "run_as" in r else ""
    return (f"{body}\n\nReproduce: `{command(name)}`{extra}.{ran}\nMachine: {machine_line(m)}{end}; measured "
            f"{when[:10]}{took}.")


def summary_md(res: dict[str, Any]) -> str:
    lines = ["| figure | value | command |", "|---|---|---|"]
    for a, b, c in summary_rows(res):
        lines.append(f"| {a} | {b} | `{c}` |")
    lines += ["", f"Machine: {machine_line(res['machine'])}; measured {res['started'][:10]} (each section below "
              f"names its own run). `{SUITE} --write-docs docs/BENCHMARKS.md` reruns every figure on "
              "this page and rewrites its tables; the figures are kept in docs/BENCHMARKS.json."]
    return "\n".join(lines)


def markdown(res: dict[str, Any]) -> str:
    parts = [f"# vlmstream benchmark suite\n\n{summary_md(res)}\n"]
    for name, r in res["sections"].items():
        parts.append(f"## {TITLES[name]}\n\n{section_md(name, r, res)}\n")
    return "\n".join(parts)


def update_docs(path: str, res: dict[str, Any], everything: bool = False) -> list[str]:
    """Rewrite the blocks between this run's sections' markers, and the summary from every section measured so
    far (kept beside the page: PATH with .json for .md); a section without markers is appended at the end with
    its heading. Returns the blocks written."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    store = os.path.splitext(path)[0] + ".json"
    merged = {"sections": {}}
    if os.path.exists(store):
        with open(store) as f:
            merged = json.load(f)
    if res["sections"] or "machine" not in merged:  # a rewrite without measuring keeps the last run's header
        merged = {**merged, "started": res["started"], "machine": res["machine"]}
    merged["sections"] = {**merged.get("sections", {}), **res["sections"]}
    with open(store + ".tmp", "w") as f:
        json.dump(merged, f, indent=1, default=str)
    os.replace(store + ".tmp", store)
    shown = merged if everything else res
    blocks = {name: section_md(name, r, shown) for name, r in shown["sections"].items()}
    png = chart(merged, os.path.splitext(path)[0] + ".png")
    blocks["summary"] = summary_md(merged) + (f"\n\n![benchmark chart]({os.path.basename(png)})" if png else "")
    done = []
    for name, body in blocks.items():
        start, end = MARK.format(name), END.format(name)
        block = f"{start}\n{body}\n{end}"
        if start in text and end in text:
            text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
        else:
            text = text.rstrip("\n") + f"\n\n## {TITLES[name]}\n\n{block}\n"
        done.append(name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, path)
    return done


def chart(res: dict[str, Any], path: str) -> str | None:
    """The page's chart: the 224 job's contenders, the tar readers, memory against length, telemetry overhead."""
    s = res["sections"]
    panels = []
    if "224" in s and "rows" in s["224"]:
        rows = s["224"]["rows"]
        panels.append(Bars("224 job, 2 workers", list(rows), [r["best_samples_per_s"] for r in rows.values()],
                           "samples/s (best)", ["#d9822b" if n.startswith("vlmstream") else "#888888" for n in rows]))
    if "tar" in s and "readers" in s["tar"]:
        rd = s["tar"]["readers"]
        panels.append(Bars("tar reading alone", list(rd), [r["samples_per_s"] for r in rd.values()],
                           "samples/s (log)", log=True))
    if "memory" in s and "shards" in s["memory"]:
        m = s["memory"]
        panels.append(Bars("memory against dataset length", [f"{n} shards" for n in m["shards"].values()],
                           [m["peak_rss_mib"][k] for k in m["shards"]], "peak RSS MiB (sum)", horizontal=False))
    if "overhead" in s:
        o = s["overhead"]
        names = [n for n in ("224_in_process", "vlm_in_process", "224_loader", "224_loader_aa")
                 if n in o and "user_overhead" in o[n]]
        panels.append(Bars("telemetry overhead (target: under 2%)", names,
                           [100 * o[n]["user_overhead"] for n in names], "user CPU time, telemetry on vs off (%)",
                           ["#bbbbbb" if n.endswith("_aa") else "#5b8bd0" for n in names], horizontal=False,
                           lines=(2, -2)))
    return draw(panels, path, f"vlmstream benchmarks: {machine_line(res['machine'])}")


def main_from_args(args: argparse.Namespace) -> int:
    if args.only == ["docs"]:  # no measuring: rewrite the page from the figures kept beside it
        if not args.write_docs:
            raise SystemExit("--only docs rewrites the page given by --write-docs from its .json")
        res = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "sections": {}}
        print(f"[suite] rewrote {', '.join(update_docs(args.write_docs, res, everything=True))} in {args.write_docs}",
              file=sys.stderr)
        return 0
    cfg = Config(args)
    sections = args.only or list(SECTIONS)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    res: dict[str, Any] = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                           "quick": cfg.quick, "sections": {}}
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "tar": lambda: section_tar(cfg), "224": lambda: section_224(cfg), "vlm": lambda: section_vlm(cfg),
        "startup": lambda: section_startup(cfg, res["sections"]), "memory": lambda: section_memory(cfg),
        "overhead": lambda: section_overhead(cfg),
    }
    run_as = " ".join([SUITE, *sys.argv[1:]])  # the exact command line, beside the generic `command(name)`
    for name in [s for s in SECTIONS if s in sections]:
        t0 = time.perf_counter()
        print(f"[suite] {name} ...", file=sys.stderr, flush=True)
        m, started = machine(), datetime.datetime.now().isoformat(timespec="seconds")
        res["sections"][name] = runners[name]()
        res["sections"][name].update(seconds=round(time.perf_counter() - t0, 1), machine=m, started=started,
                                     loadavg_end=list(os.getloadavg()), run_as=run_as)
    res["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    res["loadavg_end"] = list(os.getloadavg())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "suite.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    md = markdown(res)
    with open(os.path.join(args.out, "suite.md"), "w") as f:
        f.write(md)
    png = chart(res, os.path.join(args.out, "suite.png"))
    if args.write_docs:
        done = update_docs(args.write_docs, res)
        print(f"[suite] rewrote {', '.join(done)} in {args.write_docs}", file=sys.stderr)
    if args.json:
        print(json.dumps(res, indent=1, default=str))
    else:
        print(md)
        print(f"wrote {args.out}/suite.md, suite.json" + (", suite.png" if png else ""))
    return 0


def main() -> int:
    """The suite's command line: `vlmstream bench`'s own options (its --suite group, --workers, --rounds, --out,
    --json, --progress), so that `vlmstream bench --suite ...` and this file take the same ones."""
    from vlmstream.cli.bench import add_arguments

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args()
    if args.shards:
        ap.error("the suite runs on the project's own corpus; `vlmstream bench SHARDS` benchmarks yours")
    return main_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
