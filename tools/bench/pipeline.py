"""Benchmark the streaming pipeline on the 224 job, against webdataset and the decode limit, over nginx on loopback.

    python tools/bench/pipeline.py [--workdir /tmp/vlmstream-bench] [--shards 8] [--per-shard 1000] [--rounds 3]
    python tools/bench/pipeline.py --memory [--repeat 10] [--rounds 2]

The corpus is tools/bench/common.py's photo corpus (640x480 JPEGs of ~55 KB, each with a JSON conversation),
built once under --workdir; an ``index.json`` manifest is written next to the shards and nginx (started and
stopped by this tool) serves that folder on a free loopback port.

The 224 job: every sample's JPEG decoded to a [3, 224, 224] uint8 tensor, batches of 32, 2 DataLoader workers.
Each round runs, in turn (the order rotating from round to round), in this process tree:

  vlmstream         vs.Pipeline(shards(URL/index.json), split_by_node(0, 1), split_by_worker(), fetch(),
                    tar_samples(), decode(Resize(224)), batch(32)) through vs.Loader(num_workers=2)
  webdataset        wds.WebDataset(http URLs, shardshuffle=False, nodesplitter=wds.split_by_node,
                    workersplitter=wds.split_by_worker).decode("pil").map(resize).to_tuple("0.jpg", "json")
                    .batched(32) through wds.WebLoader(batch_size=None, num_workers=2); HTTP through curl, as
                    webdataset does. The resize is what a webdataset user writes (torchvision's Resize + PILToTensor
                    on a PIL image): Pillow's bilinear resize, then the array as a CHW uint8 tensor
  vlmstream_no_ipc  the vlmstream pipeline in 2 forked processes, each dropping its batches where it makes them:
                    the stages without the DataLoader's trip to the training process
  limit             2 processes, each decoding its half of the JPEGs from bytes already in memory with the same
                    draft decode and resize (open_image + Resize, vlmstream.cli.bench.decode_limit): no tar, HTTP,
                    batching or IPC
  limit_full        the same without draft decoding (full 640x480 decode, then resize): what draft decoding buys
  webdataset_vsresize  (only if asked, --contenders) webdataset with vs.Resize(224) as its resize

Times run from building the pipeline to the last batch. Per run the tool also records the CPU time of the process
tree (this process and its reaped workers, or the decoding processes), the first batch's time, and the requests
nginx saw (from its log, which gives each request's start time, so "before the first batch" is exact). The limits
time only their decoding loops, in processes already started with the JPEGs in memory; `vlmstream_steady / limit`
therefore also counts vlmstream's rate from its first batch to its last (its start is the first batch's time).

``--memory``: peak resident memory (the main process plus its DataLoader workers, sampled from /proc every
50 ms) of one epoch through the same pipeline with ``shuffle(1000)`` after the tar stage, over the N shards and
over a manifest listing them ``--repeat`` times (10N shards of the same size, the files reused); each epoch runs
in a fresh process, the two alternating. PSS (from smaps_rollup) is reported too: RSS counts the pages the
workers share with the main process (torch's libraries) once per process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]  # the checkout's vlmstream; tools/

import numpy as np  # noqa: E402
import torch  # noqa: E402

import vlmstream as vs  # noqa: E402
from bench.common import IMAGE_KEY, build_corpus, corpus_arguments, cpu_times, read_all, write_manifests  # noqa: E402
from loopback_nginx import LoopbackNginx, Request  # noqa: E402  (tools/loopback_nginx.py)
from vlmstream.cli.bench import PeakRSS, decode_limit, machine, machine_line  # noqa: E402
from vlmstream.core.stage import Context  # noqa: E402
from vlmstream.io.tar import read_tar_samples  # noqa: E402

CONTENDERS = ("vlmstream", "webdataset", "vlmstream_no_ipc", "limit", "limit_full", "webdataset_vsresize")


# ----------------------------------------------------------------------------------------------- contenders


def vlmstream_pipeline(spec: str, batch: int, size: int, shuffle: int = 0) -> vs.Pipeline:
    stages = [vs.shards(spec), vs.split_by_node(0, 1), vs.split_by_worker(), vs.fetch(), vs.tar_samples()]
    if shuffle:
        stages.append(vs.shuffle(shuffle))
    stages += [vs.decode(vs.Resize(size)), vs.batch(batch)]
    return vs.Pipeline(*stages)


def run_vlmstream(spec: str, workers: int, batch: int, size: int) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    def make() -> Any:
        return iter(vs.Loader(vlmstream_pipeline(spec, batch, size), num_workers=workers))

    return make, lambda b: b[IMAGE_KEY]


def pil_resize_to_tensor(size: int) -> Callable[[Any], torch.Tensor]:
    """What a webdataset user writes (torchvision's Resize((size, size)) + PILToTensor on a PIL image): Pillow's
    bilinear resize, then the HWC array as a CHW uint8 tensor."""
    from PIL import Image

    def f(im: Any) -> torch.Tensor:
        im = im.resize((size, size), Image.BILINEAR)
        return torch.as_tensor(np.array(im, copy=True)).permute(2, 0, 1)

    return f


def run_webdataset(urls: list[str], workers: int, batch: int, size: int, resize: Callable[[Any], Any] | None = None
                   ) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    import webdataset as wds

    resize = resize or pil_resize_to_tensor(size)

    def transform(sample: dict[str, Any]) -> dict[str, Any]:
        sample[IMAGE_KEY] = resize(sample[IMAGE_KEY])
        return sample

    def make() -> Any:
        ds = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                             workersplitter=wds.split_by_worker)
              .decode("pil").map(transform).to_tuple(IMAGE_KEY, "json").batched(batch))
        return iter(wds.WebLoader(ds, batch_size=None, num_workers=workers))

    return make, lambda b: b[0]


def time_loader(make: Callable[[], Any], images: Callable[[Any], Any], expect: int, size: int) -> dict[str, Any]:
    """Wall time from building the pipeline to its last batch; CPU time of this process and its (reaped) workers."""
    cpu0 = cpu_times()
    t0, wall0 = time.perf_counter(), time.time()
    first = first_wall = None
    n = n_first = 0
    for b in make():
        x = images(b)
        last = time.perf_counter() - t0
        if first is None:
            first, first_wall, n_first = last, time.time(), x.shape[0]
            if x.dtype != torch.uint8 or tuple(x.shape[1:]) != (3, size, size):
                raise SystemExit(f"unexpected batch: {x.dtype} {tuple(x.shape)}")
        n += x.shape[0]
    took = time.perf_counter() - t0
    cpu1 = cpu_times()  # DataLoader has joined its workers (and they their curl processes)
    main_cpu, cpu = cpu1.own - cpu0.own, cpu1.total - cpu0.total
    if n != expect:
        raise SystemExit(f"read {n} samples, expected {expect}")
    # From the first batch to the last: the rate the limit's timing (running processes, data in memory) compares
    # with; the start (forks, first shard, first batch) is `first_batch_s`.
    steady = (n - n_first) / (last - first) if last > first else n / took
    return {"s": took, "samples_per_s": n / took, "steady_samples_per_s": steady, "cpu_ms_per_sample": cpu / n * 1e3,
            "main_cpu_ms_per_sample": main_cpu / n * 1e3, "first_batch_s": first,
            "wall0": wall0, "first_wall": first_wall}


def _jpegs(paths: list[str]) -> list[bytes]:
    out = []
    for p in paths:
        with open(p, "rb") as f:
            out += [s[IMAGE_KEY] for s in read_tar_samples(f, p)]
    return out


def _pipeline_worker(pipe: vs.Pipeline, worker: int, workers: int, done: Any) -> None:
    torch.set_num_threads(1)  # as in a DataLoader worker
    cpu0 = time.process_time()
    n = sum(b[IMAGE_KEY].shape[0] for b in pipe.iterate(Context(0, 1, worker, workers, pipe.seed, pipe.epoch)))
    done.put((n, time.process_time() - cpu0))


def run_pipeline_no_ipc(spec: str, workers: int, batch: int, size: int, expect: int) -> dict[str, Any]:
    """The vlmstream pipeline in `workers` forked processes playing the DataLoader workers' parts, each dropping its
    batches where they are made: what the stages cost without the trip to the training process."""
    ctx = mp.get_context("fork")
    done = ctx.Queue()
    t0 = time.perf_counter()
    pipe = vlmstream_pipeline(spec, batch, size)
    procs = [ctx.Process(target=_pipeline_worker, args=(pipe, w, workers, done)) for w in range(workers)]
    for p in procs:
        p.start()
    counts, cpus = zip(*(done.get() for _ in procs))
    took = time.perf_counter() - t0
    for p in procs:
        p.join()
    n = sum(counts)
    if n != expect:
        raise SystemExit(f"vlmstream without IPC read {n} samples, expected {expect}")
    return {"s": took, "samples_per_s": n / took, "cpu_ms_per_sample": sum(cpus) / n * 1e3}


def run_limit(paths: list[str], workers: int, size: int, draft: bool, expect: int) -> dict[str, Any]:
    """`workers` forked processes, each decoding its share of the JPEGs (read into memory before the clock)."""
    resize = vs.Resize(size, draft=draft)
    loads = [lambda w=w: _jpegs(paths[w::workers]) for w in range(workers)]
    res = decode_limit(loads, resize, resize.draft_size())
    n = res["images"]
    if n != expect:
        raise SystemExit(f"limit decoded {n} images, expected {expect}")
    return {"s": res["s"], "samples_per_s": n / res["s"], "cpu_ms_per_sample": res["cpu_s"] / n * 1e3}


# ---------------------------------------------------------------------------------------------- the 224 job


def requests_of(reqs: list[Request], run: dict[str, Any]) -> dict[str, Any]:
    shards = [r for r in reqs if r.path.endswith(".tar")]
    return {
        "requests": len(reqs),
        "shard_requests": len(shards),
        "distinct_shards": len({r.path for r in shards}),
        "requests_before_first_batch": sum(r.start < run["first_wall"] for r in reqs),
        "failed": sum(r.status >= 400 for r in reqs),
    }


def bench_224(args: argparse.Namespace) -> dict[str, Any]:
    if any(c.startswith("webdataset") for c in args.contenders) and not shutil.which("curl"):
        raise SystemExit("webdataset reads http:// URLs with curl: install it (apt-get install curl, `make system-deps`)")
    paths = build_corpus(args.workdir, args.shards, args.per_shard)
    expect = args.shards * args.per_shard
    manifest, _ = write_manifests(paths, args.repeat)
    read_all(paths)  # warm the page cache
    folder = os.path.dirname(paths[0])
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in CONTENDERS}
    with LoopbackNginx(folder) as srv:
        urls = [f"{srv.url}/{os.path.basename(p)}" for p in paths]
        spec = f"{srv.url}/{manifest}"
        vl = run_vlmstream(spec, args.workers, args.batch, args.size)
        wd = run_webdataset(urls, args.workers, args.batch, args.size)
        wv = run_webdataset(urls, args.workers, args.batch, args.size, vs.Resize(args.size))
        contenders: dict[str, Callable[[], dict[str, Any]]] = {
            "vlmstream": lambda: time_loader(*vl, expect, args.size),
            "webdataset": lambda: time_loader(*wd, expect, args.size),
            "webdataset_vsresize": lambda: time_loader(*wv, expect, args.size),
            "vlmstream_no_ipc": lambda: run_pipeline_no_ipc(spec, args.workers, args.batch, args.size, expect),
            "limit": lambda: run_limit(paths, args.workers, args.size, True, expect),
            "limit_full": lambda: run_limit(paths, args.workers, args.size, False, expect),
        }
        names = [n for n in contenders if n in args.contenders]
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                mark, server_cpu = srv.mark(), srv.cpu()
                out = contenders[name]()
                if name in ("vlmstream", "webdataset", "webdataset_vsresize"):
                    out.update(requests_of(srv.since(mark), out))
                    out["server_cpu_ms_per_sample"] = (srv.cpu() - server_cpu) / expect * 1e3
                results[name].append(out)
                print(f"round {r + 1} {name:<19} {out['samples_per_s']:8.0f} samples/s in {out['s']:6.2f} s, "
                      f"{out['cpu_ms_per_sample']:.2f} CPU ms/sample"
                      + (f", first batch {out['first_batch_s']:.3f} s, {out['requests']} requests"
                         f" ({out['requests_before_first_batch']} before the first batch)" if "requests" in out else ""),
                      file=sys.stderr, flush=True)
    return summarize_224(args, results, expect, paths)


def _ratios(results: dict[str, list[dict[str, Any]]], a: str, b: str, rate: str = "samples_per_s"
            ) -> dict[str, float] | None:
    """a's rate over b's; ``rate="steady_samples_per_s"`` takes a's from its first batch on (b: a decode limit,
    timed that way already)."""
    if not results[a] or not results[b]:
        return None
    per_round = [x.get(rate, x["samples_per_s"]) / y["samples_per_s"] for x, y in zip(results[a], results[b])]
    best = max(x.get(rate, x["samples_per_s"]) for x in results[a]) / max(y["samples_per_s"] for y in results[b])
    # CPU time per sample moves much less than wall time when other work shares the cores: its inverse ratio is
    # the throughput ratio the two would have with the cores to themselves (both keep the cores busy).
    cpu = statistics.median(y["cpu_ms_per_sample"] for y in results[b]) / statistics.median(
        x["cpu_ms_per_sample"] for x in results[a])
    return {"best_over_best": round(best, 3), "median_per_round": round(statistics.median(per_round), 3),
            "per_round": [round(x, 3) for x in per_round], "by_cpu_time": round(cpu, 3)}


def summarize_224(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], expect: int,
                  paths: list[str]) -> dict[str, Any]:
    rows = {}
    for name, runs in results.items():
        if not runs:
            continue
        rates = [x["samples_per_s"] for x in runs]
        row: dict[str, Any] = {"best_samples_per_s": round(max(rates)), "median_samples_per_s": round(statistics.median(rates)),
                               "runs_samples_per_s": [round(x) for x in rates],
                               "cpu_ms_per_sample_median": round(statistics.median(x["cpu_ms_per_sample"] for x in runs), 3)}
        if "server_cpu_ms_per_sample" in runs[0]:
            row["server_cpu_ms_per_sample_median"] = round(
                statistics.median(x["server_cpu_ms_per_sample"] for x in runs), 3)
        if "first_batch_s" in runs[0]:
            row["first_batch_s_median"] = round(statistics.median(x["first_batch_s"] for x in runs), 3)
            row["first_batch_s_runs"] = [round(x["first_batch_s"], 3) for x in runs]
            for k in ("requests", "shard_requests", "distinct_shards", "requests_before_first_batch", "failed"):
                row[k] = [x[k] for x in runs]
        rows[name] = row
    return {
        "job": f"{args.size}x{args.size} uint8, batch {args.batch}, {args.workers} workers",
        "samples": expect, "shards": len(paths), "bytes": sum(os.path.getsize(p) for p in paths),
        "rounds": args.rounds, "loadavg_end": os.getloadavg(), "rows": rows,
        "vlmstream_over_webdataset": _ratios(results, "vlmstream", "webdataset"),
        "vlmstream_over_limit": _ratios(results, "vlmstream", "limit"),
        "vlmstream_steady_over_limit": _ratios(results, "vlmstream", "limit", "steady_samples_per_s"),
        "vlmstream_no_ipc_over_limit": _ratios(results, "vlmstream_no_ipc", "limit"),
        "limit_over_limit_full": _ratios(results, "limit", "limit_full"),
        "vlmstream_over_webdataset_vsresize": _ratios(results, "vlmstream", "webdataset_vsresize"),
    }


def print_224(res: dict[str, Any]) -> None:
    print(f"{res['samples']} samples in {res['shards']} shards ({res['bytes'] / 1e6:.0f} MB) over nginx on loopback, "
          f"{res['job']}, {res['rounds']} rounds; {machine_line(res['machine'])}")
    print(f"{'contender':<19} {'best/s':>8} {'median/s':>9} {'CPU ms/sample':>14} {'1st batch s':>12} "
          f"{'requests (before 1st batch)':>28}")
    for name, r in res["rows"].items():
        first = f"{r['first_batch_s_median']:.3f}" if "first_batch_s_median" in r else "-"
        reqs = f"{r['requests'][0]} ({r['requests_before_first_batch'][0]})" if "requests" in r else "-"
        print(f"{name:<19} {r['best_samples_per_s']:>8,} {r['median_samples_per_s']:>9,} "
              f"{r['cpu_ms_per_sample_median']:>14.2f} {first:>12} {reqs:>28}")
    for key in ("vlmstream_over_webdataset", "vlmstream_over_limit", "vlmstream_steady_over_limit",
                "vlmstream_no_ipc_over_limit", "limit_over_limit_full",
                "vlmstream_over_webdataset_vsresize"):
        if res[key]:
            print(f"{key.replace('_over_', ' / ')}: {res[key]['best_over_best']:.2f}x best/best, "
                  f"{res[key]['median_per_round']:.2f}x median of rounds {res[key]['per_round']}, "
                  f"{res[key]['by_cpu_time']:.2f}x by CPU time per sample")


# ---------------------------------------------------------------------------------------------------- memory


def memory_run(args: argparse.Namespace) -> None:
    """One epoch in this (fresh) process; prints a JSON line."""
    with PeakRSS(pss=True) as rss:
        pipe = vlmstream_pipeline(args.memory_run, args.batch, args.size, shuffle=args.shuffle)
        t0 = time.perf_counter()
        n = 0
        for b in vs.Loader(pipe, num_workers=args.workers):
            n += b[IMAGE_KEY].shape[0]
        took = time.perf_counter() - t0
        time.sleep(0.1)
    print(json.dumps({"samples": n, "s": took, "peak_rss_sum_kb": rss.peak_kb, "peak_pss_sum_kb": rss.peak_pss_kb,
                      "peak_main_kb": rss.peak_main_kb, "hwm_sum_kb": sum(rss.hwm_kb.values()),
                      "processes": len(rss.hwm_kb)}))


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    paths = build_corpus(args.workdir, args.shards, args.per_shard)
    one, many = write_manifests(paths, args.repeat)
    folder = os.path.dirname(paths[0])
    runs: dict[str, list[dict[str, Any]]] = {"N": [], f"{args.repeat}N": []}
    with LoopbackNginx(folder) as srv:
        specs = {"N": f"{srv.url}/{one}", f"{args.repeat}N": f"{srv.url}/{many}"}
        for r in range(args.rounds):
            for name in (list(specs) if r % 2 == 0 else list(specs)[::-1]):
                cmd = [sys.executable, os.path.abspath(__file__), "--memory-run", specs[name],
                       "--workers", str(args.workers), "--batch", str(args.batch), "--size", str(args.size),
                       "--shuffle", str(args.shuffle)]
                out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
                                 .splitlines()[-1])
                factor = 1 if name == "N" else args.repeat
                if out["samples"] != factor * args.shards * args.per_shard:
                    raise SystemExit(f"{name}: {out['samples']} samples, expected {factor * args.shards * args.per_shard}")
                runs[name].append(out)
                print(f"round {r + 1} {name:<4} peak RSS {out['peak_rss_sum_kb'] / 1024:7.0f} MiB "
                      f"(main {out['peak_main_kb'] / 1024:.0f}, PSS {out['peak_pss_sum_kb'] / 1024:.0f}, "
                      f"sum of HWMs {out['hwm_sum_kb'] / 1024:.0f}) "
                      f"{out['samples']} samples in {out['s']:.1f} s", file=sys.stderr, flush=True)
    big = f"{args.repeat}N"
    peak = {k: max(x["peak_rss_sum_kb"] for x in v) for k, v in runs.items()}
    hwm = {k: max(x["hwm_sum_kb"] for x in v) for k, v in runs.items()}
    pss = {k: max(x["peak_pss_sum_kb"] for x in v) for k, v in runs.items()}
    return {
        "pipeline": f"fetch, tar_samples, shuffle({args.shuffle}), decode(Resize({args.size})), batch({args.batch}); "
                    f"{args.workers} workers",
        "shards": {"N": args.shards, big: args.shards * args.repeat}, "shard_mb": round(
            statistics.mean(os.path.getsize(p) for p in paths) / 1e6, 1),
        "rounds": args.rounds,
        "peak_rss_mib": {k: round(v / 1024) for k, v in peak.items()},
        "peak_pss_mib": {k: round(v / 1024) for k, v in pss.items()},
        "hwm_sum_mib": {k: round(v / 1024) for k, v in hwm.items()},
        "runs": runs,
        "ratio_peak_rss": round(peak[big] / peak["N"], 3),
        "ratio_pss": round(pss[big] / pss["N"], 3),
        "ratio_hwm_sum": round(hwm[big] / hwm["N"], 3),
    }


def print_memory(res: dict[str, Any]) -> None:
    print(f"one epoch of {res['pipeline']}; shards of {res['shard_mb']} MB; highest of {res['rounds']} rounds")
    print(f"{'shards':>8} {'peak RSS MiB (sum)':>19} {'peak PSS MiB':>13} {'sum of HWM MiB':>15}")
    for k, n in res["shards"].items():
        print(f"{n:>8} {res['peak_rss_mib'][k]:>19,} {res['peak_pss_mib'][k]:>13,} {res['hwm_sum_mib'][k]:>15,}")
    big = [k for k in res["shards"] if k != "N"][0]
    print(f"{big} / N: {res['ratio_peak_rss']:.3f} (peak RSS), {res['ratio_pss']:.3f} (peak PSS), "
          f"{res['ratio_hwm_sum']:.3f} (sum of HWMs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    corpus_arguments(ap)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=[c for c in CONTENDERS if c != "webdataset_vsresize"],
                    help="what to run (default: all but webdataset_vsresize)")
    ap.add_argument("--memory", action="store_true", help="measure peak RSS over N and --repeat x N shards instead")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--shuffle", type=int, default=1000, help="shuffle buffer of --memory")
    ap.add_argument("--memory-run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_run:
        memory_run(args)
        return
    started_on = machine()  # the load average before the runs
    res = {**(bench_memory(args) if args.memory else bench_224(args)), "machine": started_on}
    if args.json:
        print(json.dumps(res, indent=1))
    elif args.memory:
        print_memory(res)
    else:
        print_224(res)


if __name__ == "__main__":
    main()
