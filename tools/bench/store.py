"""The 224 job read from an S3 server on loopback, beside the same job over nginx and a bare ranged-GET loop.

    python tools/bench/store.py [--workdir /tmp/vlmstream-bench] [--shards 8] [--per-shard 1000] [--rounds 3]

The corpus is tools/bench/common.py's photo corpus with its ``index.json``; a copy goes into a bucket of moto's S3
server (tests/stores.py starts it, `make test` installs it) and nginx serves the folder. Each round runs, in turn
(the order rotating from round to round):

  vlmstream_http    the 224 job (shards(URL/index.json) -> split -> fetch -> tar_samples -> decode(Resize(224)) ->
                    batch(32)) through vs.Loader(num_workers=2), over nginx
  vlmstream_s3      the same job from s3://BUCKET/corpus/index.json (workers started by forkserver, as vs.Loader
                    does for object stores)
  get_loop          2 processes GETting their half of the shards from the S3 server, signed as vlmstream signs
                    them, with nothing done with the bytes: the store's own limit on this machine

Per run: samples/s, CPU ms a sample of this process tree, the server's CPU, the first batch's time, peak RSS of this
process and its workers (the servers left out) and the GETs: vlmstream's own count (its fetch stages') and, in a
separate untimed run through a counting proxy, the requests the S3 server saw before the first batch and in all.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.dirname(HERE), os.path.join(ROOT, "tests")]  # vlmstream; tools/; tests/stores.py

import vlmstream as vs  # noqa: E402
from bench.common import IMAGE_KEY, build_corpus, corpus_arguments, cpu_times, read_all, write_manifests  # noqa: E402
from loopback_nginx import LoopbackNginx  # noqa: E402
from stores import S3Server  # noqa: E402
from vlmstream.cli.bench import PeakRSS, descendants, machine, machine_line  # noqa: E402

CONTENDERS = ("vlmstream_http", "vlmstream_s3", "get_loop")


def pipeline(spec: str, batch: int, size: int, storage: dict[str, str] | None = None) -> vs.Pipeline:
    return vs.Pipeline(vs.shards(spec, shuffle=False, storage_options=storage), vs.split_by_node(0, 1),
                       vs.split_by_worker(), vs.fetch(storage_options=storage), vs.tar_samples(),
                       vs.decode(vs.Resize(size)), vs.batch(batch))


def _cpu(pid: int, reaped: bool = False) -> float:
    """CPU seconds (user + system) of a live process and, with ``reaped``, of the children it has reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if reaped else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a server and the processes below it."""
    return sum(_cpu(p) for p in [pid, *descendants(pid)])


def _forkserver_cpu() -> float:
    """What the workers a forkserver started have used: its own CPU and that of the children it reaped (they are
    not this process's children, so its own rusage does not count them)."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    return _cpu(pid, reaped=True) + sum(_cpu(p) for p in descendants(pid)) if pid else 0.0


def run_loader(spec: str, args: argparse.Namespace, expect: int, servers: list[int],
               storage: dict[str, str] | None = None) -> dict[str, Any]:
    cpu0, fs0, t0 = cpu_times(), _forkserver_cpu(), time.perf_counter()
    first = last = None
    n = n_first = 0
    loader = vs.Loader(pipeline(spec, args.batch, args.size, storage), num_workers=args.workers)
    with PeakRSS(exclude=servers) as rss:
        for b in loader:
            last = time.perf_counter() - t0
            if first is None:
                first, n_first = last, b[IMAGE_KEY].shape[0]
            n += b[IMAGE_KEY].shape[0]
    took = time.perf_counter() - t0
    if n != expect:
        raise SystemExit(f"read {n} samples, expected {expect}")
    cpu = cpu_times().total - cpu0.total + _forkserver_cpu() - fs0
    fetch = loader.stats().stage("fetch").stats
    return {"s": took, "samples_per_s": n / took, "steady_samples_per_s": (n - n_first) / (last - first),
            "cpu_ms_per_sample": cpu / n * 1e3, "first_batch_s": first, "peak_rss_mib": rss.peak_kb / 1024,
            "gets": fetch["requests"], "retries": fetch["retries"]}


def _get_worker(urls: list[str], environ: dict[str, str], done: Any) -> None:
    os.environ.update(environ)
    from vlmstream.io.urls import open_url

    t0, n = time.process_time(), 0
    for url in urls:
        with open_url(url, buffer_size=0) as f:
            buf = bytearray(1 << 20)
            while got := f.readinto(buf):
                n += got
    done.put((n, time.process_time() - t0))


def run_get_loop(urls: list[str], workers: int, expect: int, environ: dict[str, str]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")  # a clean process: the store client does not survive fork
    done = ctx.Queue()
    procs = [ctx.Process(target=_get_worker, args=(urls[w::workers], environ, done)) for w in range(workers)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    got = [done.get() for _ in procs]
    took = time.perf_counter() - t0
    for p in procs:
        p.join()
    nbytes = sum(g[0] for g in got)
    return {"s": took, "samples_per_s": expect / took, "mb_per_s": nbytes / took / 1e6,
            "cpu_ms_per_sample": sum(g[1] for g in got) / expect * 1e3}


def startup_requests(server: S3Server, spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """Through a counting proxy, untimed: the requests the store saw before the first batch (the manifest's
    GET and the first shards'), and in all."""
    with server.proxy() as proxy:
        storage = {"endpoint": proxy.url}  # the store settings of this pipeline alone: through the proxy
        mark = proxy.mark()
        loader = iter(vs.Loader(pipeline(spec, args.batch, args.size, storage), num_workers=args.workers))
        next(loader)
        before = len(proxy.since(mark))
        for _ in loader:
            pass
        gets = proxy.counts("GET", since=mark)
    return {"requests_before_first_batch": before, "gets": sum(gets.values()),
            "most_gets_of_one_object": max(gets.values()), "requests": len(proxy.since(mark))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    corpus_arguments(ap)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    paths = build_corpus(args.workdir, args.shards, args.per_shard)
    manifest, _ = write_manifests(paths, 1)
    read_all(paths)
    folder = os.path.dirname(paths[0])
    expect = args.shards * args.per_shard
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in CONTENDERS}
    with LoopbackNginx(folder) as nginx, S3Server() as s3:
        os.environ.update(s3.env)
        bucket = s3.make_bucket()
        for name in [manifest, *map(os.path.basename, paths)]:
            with open(os.path.join(folder, name), "rb") as f:
                s3.put(bucket, f"corpus/{name}", f.read())
        s3_spec, http_spec = s3.url(bucket, f"corpus/{manifest}"), f"{nginx.url}/{manifest}"
        s3_urls = [s3.url(bucket, f"corpus/{os.path.basename(p)}") for p in paths]
        servers = [nginx.proc.pid, s3.proc.pid]
        runs: dict[str, tuple[Callable[[], dict[str, Any]], Callable[[], float]]] = {
            "vlmstream_http": (lambda: run_loader(http_spec, args, expect, servers), nginx.cpu),
            "vlmstream_s3": (lambda: run_loader(s3_spec, args, expect, servers), lambda: tree_cpu(s3.proc.pid)),
            "get_loop": (lambda: run_get_loop(s3_urls, args.workers, expect, s3.env), lambda: tree_cpu(s3.proc.pid)),
        }
        for r in range(args.rounds):
            for name in CONTENDERS[r % 3:] + CONTENDERS[:r % 3]:
                run, server_cpu = runs[name]
                c0 = server_cpu()
                out = run()
                out["server_cpu_ms_per_sample"] = (server_cpu() - c0) / expect * 1e3
                results[name].append(out)
                print(f"round {r + 1} {name:<15} {out['samples_per_s']:8.0f} samples/s in {out['s']:6.2f} s",
                      file=sys.stderr, flush=True)
        counted = startup_requests(s3, s3_spec, args)
    med = statistics.median
    summary = {name: {k: round(med(x[k] for x in runs_), 3) for k in runs_[0] if isinstance(runs_[0][k], (int, float))}
               for name, runs_ in results.items()}
    for name, runs_ in results.items():
        summary[name]["best_samples_per_s"] = round(max(x["samples_per_s"] for x in runs_), 1)
    http, s3r = results["vlmstream_http"], results["vlmstream_s3"]
    out = {"machine": machine(), "shards": args.shards, "samples": expect, "rounds": args.rounds,
           "summary": summary, "s3_over_http_per_round": [round(a["samples_per_s"] / b["samples_per_s"], 3)
                                                         for a, b in zip(s3r, http)],
           "s3_over_http_best": round(summary["vlmstream_s3"]["best_samples_per_s"]
                                      / summary["vlmstream_http"]["best_samples_per_s"], 3),
           "s3_over_http_steady_per_round": [round(a["steady_samples_per_s"] / b["steady_samples_per_s"], 3)
                                             for a, b in zip(s3r, http)],
           "s3_requests": counted, "runs": results}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{'contender':<16} {'best/s':>8} {'median/s':>9} {'steady/s':>9} {'CPU ms/sample':>14} "
          f"{'server CPU ms':>14} {'1st batch s':>12} {'peak RSS MiB':>13} {'GETs':>5}")
    nan = float("nan")
    for name in CONTENDERS:
        s = summary[name]
        print(f"{name:<16} {s['best_samples_per_s']:8.0f} {s['samples_per_s']:9.0f} "
              f"{s.get('steady_samples_per_s', nan):9.0f} {s['cpu_ms_per_sample']:14.2f} "
              f"{s['server_cpu_ms_per_sample']:14.2f} {s.get('first_batch_s', nan):12.2f} "
              f"{s.get('peak_rss_mib', nan):13.0f} {s.get('gets', nan):5.0f}")
    print(f"s3 / http per round: {out['s3_over_http_per_round']}, best/best {out['s3_over_http_best']}; "
          f"from the first batch on: {out['s3_over_http_steady_per_round']}")
    print(f"S3 requests (counted by a proxy, untimed run): {counted}")
    print(f"machine: {machine_line(out['machine'])}")


if __name__ == "__main__":
    main()
