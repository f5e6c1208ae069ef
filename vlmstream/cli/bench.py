"""`vlmstream bench SHARDS`: how fast your shards stream, stage by stage and end to end, on your machine.

    vlmstream bench shards/index.json --job 224 --workers 4 --out bench-out/
    vlmstream bench "https://host/ds/shard-{000000..000015}.tar" --job vlm --tokenizer tokenizer.json

Runs, in this order (each pass reads the whole shard list, or ``--max-shards`` of it):

  tar        shards -> split -> fetch -> tar_samples in this process: tar reading alone (the I/O and parsing limit)
  stages     the job's chain in this process (no DataLoader), with the pipeline's telemetry on: each stage's own
             time gives its samples/s and MB/s (how fast it would go alone) and the bottleneck
  loader     the job end to end through vs.Loader(num_workers=W): samples/s, MB/s, time to the first batch,
             requests made by then (HTTP), peak RSS of the process and its workers
  limit      W processes decoding the first --limit-samples images from memory with the job's transform: the
             bare decode limit (no tar, no HTTP, no batching, no IPC)
  overhead   (``--overhead``) the in-process chain with telemetry on and off, alternating: its cost

The jobs: ``224``: every image decoded and resized to [3, size, size] uint8 (`vs.Resize`), the first image of
each sample batched by ``--batch`` (32). ``vlm``: `vs.ImageTiles(tile, max_side)` -> `vs.tokenize` ->
`vs.pack(seq_len, max_images)` -> `vs.batch` (8); needs ``--tokenizer``.
Writes OUT/bench.md (a markdown table), OUT/bench.json and OUT/bench.png (a chart; needs matplotlib, the
``bench`` extra).

``--suite`` runs the project's own benchmarks instead (docs/BENCHMARKS.md): ``python tools/bench/suite.py`` of
the checkout this vlmstream is imported from, in a subprocess, with the suite's options passed on. The suite is
no part of the package (it needs the repository's tools/ and corpus), so an installed vlmstream without a
checkout says so and stops. The measuring primitives that both need (peak RSS of a process tree, the decode
limit, the machine line, the chart) live here, and the suite imports them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

JOBS = ("224", "vlm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", nargs="*", help="your shards: a manifest, brace pattern, glob, URL or hf:// spec")
    p.add_argument("--job", choices=JOBS, default="224", help="224: decode + resize + batch; vlm: tiles, "
                   "tokenize, pack, batch")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (and decode-limit processes)")
    p.add_argument("--batch", type=int, help="batch size (224: 32, vlm: 8)")
    p.add_argument("--size", type=int, default=224, help="224 job: image side")
    p.add_argument("--shuffle", type=int, default=0, help="shuffle buffer after tar_samples (0: none)")
    p.add_argument("--tokenizer", help="vlm job: tokenizer.json path or Hub model id")
    p.add_argument("--template", default="chatml")
    p.add_argument("--image-token-length", type=int, default=64)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--max-side", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--max-images", type=int, default=18)
    p.add_argument("--max-shards", type=int, help="use only the first N shards of the list")
    p.add_argument("--limit-samples", type=int, default=2000, help="images decoded by the decode-limit run")
    p.add_argument("--no-limit", action="store_true", help="skip the decode-limit run")
    p.add_argument("--overhead", action="store_true", help="also measure the telemetry's cost (on/off runs)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of each measurement (best/median reported)")
    p.add_argument("--out", default="bench-out", help="folder for bench.md, bench.json, bench.png")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    g = p.add_argument_group("the project's suite (--suite: python tools/bench/suite.py of a checkout)")
    g.add_argument("--suite", action="store_true", help="run the benchmarks of docs/BENCHMARKS.md on the "
                   "project's corpus, with webdataset, Hugging Face datasets and the decode limit (runs "
                   "tools/bench/suite.py of this vlmstream's checkout; --workers, --rounds, --out, --json and "
                   "--progress go with it)")
    g.add_argument("--only", nargs="+", metavar="SECTION", help="suite sections: tar 224 vlm startup memory "
                   "overhead (default: all); docs alone: rewrite --write-docs from the figures kept beside it")
    g.add_argument("--write-docs", metavar="MD", help="regenerate the suite's sections of this markdown file")
    g.add_argument("--workdir", default="/tmp/vlmstream-bench", help="where the suite's corpus is built")
    g.add_argument("--quick", action="store_true", help="suite: a small corpus and one round (a smoke test)")


# ------------------------------------------------------------------------------------------------ measuring


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def descendants(pid: int, exclude: Sequence[int] = ()) -> list[int]:
    """Every process below ``pid`` (DataLoader workers, also those a forkserver started), but for the subtrees
    of ``exclude`` (a server the benchmark started)."""
    out, todo = [], [c for c in _children(pid) if c not in exclude]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c in _children(p) if c not in exclude]
    return out


def _proc_kb(pid: int, name: str, field: str) -> int:
    """A field of /proc/PID/NAME in kB (``status``: VmRSS, VmHWM; ``smaps_rollup``: Pss); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakRSS(threading.Thread):
    """Peak of the summed resident memory of this process and the processes below it (a loader and its workers),
    sampled every `period` seconds from /proc (Linux); elsewhere this process's own peak from getrusage.

    ``pss=True`` also keeps the peak of the summed PSS (pages shared by the workers with the main process, torch's
    libraries above all, split among their sharers: RSS counts them once per process) and each process's own
    peak (VmHWM): what the memory benchmark reports beside RSS.
    """

    def __init__(self, period: float = 0.05, pss: bool = False, exclude: Sequence[int] = ()):
        super().__init__(daemon=True)
        self.period, self.pss, self.stop_event = period, pss, threading.Event()
        self.exclude = set(exclude)  # children that are not ours to count (a server the benchmark started)
        self.peak_kb = self.peak_main_kb = self.peak_pss_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self.proc = os.path.exists("/proc/self/status")

    def run(self) -> None:
        me = os.getpid()
        while self.proc and not self.stop_event.is_set():
            pids = [me, *descendants(me, self.exclude)]
            rss = [_proc_kb(p, "status", "VmRSS") for p in pids]
            self.peak_kb = max(self.peak_kb, sum(rss))
            self.peak_main_kb = max(self.peak_main_kb, rss[0])
            if self.pss:
                self.peak_pss_kb = max(self.peak_pss_kb, sum(_proc_kb(p, "smaps_rollup", "Pss") for p in pids))
                for p in pids:
                    self.hwm_kb[p] = max(self.hwm_kb.get(p, 0), _proc_kb(p, "status", "VmHWM"))
            self.stop_event.wait(self.period)

    def __enter__(self) -> "PeakRSS":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_event.set()
        self.join()
        if not self.proc:
            self.peak_kb = self.peak_main_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class FirstImages:
    """The 224 job's batchable samples: each sample's first image (by member name) and its provenance. A sample
    without an image (a text-only turn of a VLM dataset) has nothing to resize: it is passed over and counted."""

    def __init__(self) -> None:
        self.no_image = 0

    def __call__(self, it: Any) -> Any:
        from ..dataset.format import is_image_ext

        for s in it:
            names = sorted(k for k in s if not k.startswith("__") and is_image_ext(k))
            if names:
                yield {"__key__": s["__key__"], "image": s[names[0]]}
            else:
                self.no_image += 1


class Job:
    """The stages of a benchmark job over a shard list."""

    def __init__(self, args: argparse.Namespace, urls: list[str]):
        self.args, self.urls = args, urls
        self.kind = args.job
        self.batch = args.batch or (32 if self.kind == "224" else 8)
        self.tok = None
        self.first = FirstImages()
        if self.kind == "vlm":
            from ..stages.tokenize import ChatTokenizer  # the one tokenizer factory (cli/main's too)

            if not args.tokenizer:
                raise SystemExit("the vlm job needs --tokenizer (a tokenizer.json or a Hub model id)")
            self.tok = ChatTokenizer.load(args.tokenizer, template=args.template,
                                          image_token_length=args.image_token_length)

    def transform(self) -> Any:
        import vlmstream as vs

        if self.kind == "224":
            return vs.Resize(self.args.size)
        return vs.ImageTiles(tile=self.args.tile, max_side=self.args.max_side)

    def reader(self) -> list[Any]:
        import vlmstream as vs

        return [vs.shards(self.urls, shuffle=False), vs.split_by_node(0, 1), vs.split_by_worker(), vs.fetch(),
                vs.tar_samples()]

    def stages(self) -> list[Any]:
        import vlmstream as vs

        a = self.args
        out = self.reader()
        if a.shuffle:
            out.append(vs.shuffle(a.shuffle))
        out.append(vs.decode(self.transform()))
        if self.kind == "224":
            self.first = FirstImages()
            out += [self.first, vs.batch(self.batch)]
        else:
            out += [vs.tokenize(self.tok, max_len=a.seq_len), vs.pack(a.seq_len, max_images=a.max_images),
                    vs.batch(self.batch)]
        return out

    def pipeline(self, telemetry: bool = True, stages: list[Any] | None = None) -> Any:
        import vlmstream as vs

        return vs.Pipeline(*(stages or self.stages()), rank=0, world_size=1, telemetry=telemetry)


def run_tar(job: Job) -> dict[str, Any]:
    pipe = job.pipeline(stages=job.reader())
    t0 = time.perf_counter()
    n = sum(1 for _ in pipe)
    took = time.perf_counter() - t0
    r = pipe.stats()
    return {"samples": n, "s": took, "bytes": r.bytes, "requests": _requests(r)}


def _requests(report: Any) -> int | None:
    try:
        return int(report.stage("fetch").stats["requests"])
    except (KeyError, TypeError):
        return None


def run_stages(job: Job, telemetry: bool = True) -> dict[str, Any]:
    pipe = job.pipeline(telemetry)
    c0, t0 = time.process_time(), time.perf_counter()
    batches = sum(1 for _ in pipe)
    took, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"s": took, "cpu_s": cpu, "batches": batches, "no_image": job.first.no_image}
    if telemetry:
        r = pipe.stats()
        out.update(samples=r.samples(), bytes=r.bytes, report=r.as_dict())
    return out


def run_loader(job: Job) -> dict[str, Any]:
    import vlmstream as vs

    loader = vs.Loader(job.pipeline(), num_workers=job.args.workers)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        first = None
        requests_first = None
        for _ in loader:
            if first is None:
                first = time.perf_counter() - t0
                requests_first = _requests(loader.stats())
        took = time.perf_counter() - t0
    r = loader.stats()
    return {"s": took, "first_batch_s": first, "samples": r.samples(), "bytes": r.bytes,
            "requests": _requests(r), "requests_by_first_batch": requests_first, "peak_rss_mib": rss.peak_kb / 1024,
            "summary": r.summary(), "report": r.as_dict()}


def _limit_worker(load: Callable[[], list[bytes]], transform: Any, draft: Any, ready: Any, go: Any,
                  done: Any) -> None:
    import torch

    from ..stages.decode import open_image

    torch.set_num_threads(1)  # as in a DataLoader worker
    images = load()
    ready.put(len(images))
    go.wait()
    c0 = time.process_time()
    for data in images:
        out = transform(open_image(data, draft))
        if isinstance(out, torch.Tensor):
            out.contiguous()  # a finished planar image, as the pipeline's batches hold it (vs.Resize gives a view)
    done.put((len(images), time.process_time() - c0))


def decode_limit(loads: list[Callable[[], list[bytes]]], transform: Any, draft: Any = None) -> dict[str, Any]:
    """The bare decode limit: one forked process per ``loads[i]``, each decoding the images it loads with
    `transform` (``open_image(data, draft)`` first) and nothing else: no tar, HTTP, batching or IPC.

    The clock starts once every process has its images in memory and stops when the last is done, so the figure
    is the decoding alone, to hold a pipeline's rate against. Returns images, seconds, processes and the CPU
    seconds of the decoding loops."""
    took, got = timed_in_forks(_limit_worker, [(load, transform, draft) for load in loads])
    return {"images": sum(g[0] for g in got), "s": took, "processes": len(loads), "cpu_s": sum(g[1] for g in got)}


def timed_in_forks(worker: Callable[..., None], args: list[tuple[Any, ...]]) -> tuple[float, list[Any]]:
    """One forked process per ``args`` item, each running ``worker(*item, ready, go, done)``: it puts to `ready`
    once its inputs are loaded, waits for `go`, and puts its result to `done`. The clock runs from `go` to the
    last result, so loading is never timed. Returns the seconds and the results."""
    ctx = mp.get_context("fork")
    ready, done, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=worker, args=(*a, ready, go, done)) for a in args]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get()
    t0 = time.perf_counter()
    go.set()
    got = [done.get() for _ in procs]
    took = time.perf_counter() - t0
    for p in procs:
        p.join()
    return took, got


def run_limit(job: Job) -> dict[str, Any]:
    """The job's image transform on its first images, already in memory, in `workers` forked processes."""
    from ..dataset.format import is_image_ext

    images: list[bytes] = []
    nbytes = 0
    for s in job.pipeline(telemetry=False, stages=job.reader()):
        for k in sorted(s):
            if not k.startswith("__") and is_image_ext(k):
                images.append(s[k])
        nbytes += sum(len(v) for v in s.values() if isinstance(v, bytes))
        if len(images) >= job.args.limit_samples:
            break
    transform = job.transform()
    w = max(1, job.args.workers)
    loads = [lambda i=i: images[i::w] for i in range(w)]
    res = decode_limit(loads, transform, getattr(transform, "draft_size", None))
    return {"images": res["images"], "s": res["s"], "processes": w, "bytes": nbytes,
            "cpu_ms_per_image": 1e3 * res["cpu_s"] / max(1, res["images"])}


def run_overhead(job: Job, rounds: int) -> dict[str, Any]:
    """The in-process chain with telemetry on and off, alternating (on, off, off, on, ...)."""
    on, off = [], []
    for r in range(rounds):
        for flag in ((True, False) if r % 2 == 0 else (False, True)):
            (on if flag else off).append(run_stages(job, telemetry=flag))
    return overhead_figures(on, off)


def overhead_figures(on: list[dict[str, Any]], off: list[dict[str, Any]]) -> dict[str, Any]:
    med = statistics.median
    wall_on, wall_off = med(x["s"] for x in on), med(x["s"] for x in off)
    cpu_on, cpu_off = med(x["cpu_s"] for x in on), med(x["cpu_s"] for x in off)
    # runs of a pair are adjacent in time: their ratio cancels most of a shared machine's drifting load
    pair_wall = [a["s"] / b["s"] - 1 for a, b in zip(on, off)]
    pair_cpu = [a["cpu_s"] / b["cpu_s"] - 1 for a, b in zip(on, off)]
    return {"rounds": len(on), "wall_s_on": wall_on, "wall_s_off": wall_off, "cpu_s_on": cpu_on, "cpu_s_off": cpu_off,
            "best_wall_s_on": min(x["s"] for x in on), "best_wall_s_off": min(x["s"] for x in off),
            "wall_overhead": med(pair_wall), "cpu_overhead": med(pair_cpu), "pairs_wall": pair_wall,
            "pairs_cpu": pair_cpu, "best_wall_overhead": min(x["s"] for x in on) / min(x["s"] for x in off) - 1}


def machine() -> dict[str, Any]:
    """What the figures ran on."""
    import torch

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 1024**2
    except (OSError, ValueError, IndexError):
        mem = None
    import vlmstream

    return {"cpu": cpu, "cores": cores, "memory_gib": round(mem, 1) if mem else None, "os": platform.system(),
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
            "vlmstream": vlmstream.__version__, "loadavg": [round(x, 2) for x in os.getloadavg()]}


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['cores']} CPU cores ({m['cpu']}), {m.get('memory_gib') or '?'} GiB, {m['os']} {m['kernel']}, "
            f"Python {m['python']}, torch {m['torch']}; load average {m['loadavg'][0]} at the start")


# ---------------------------------------------------------------------------------------------------- report


def rows_of(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows: what, samples/s, MB/s, notes."""
    rows = []

    def row(what: str, samples: float | None, nbytes: float | None, s: float, note: str = "") -> None:
        rows.append({"what": what, "samples_per_s": samples / s if samples and s else None,
                     "mb_per_s": nbytes / s / 1e6 if nbytes and s else None, "note": note})

    t = res.get("tar")
    if t:
        row("tar reading alone (1 process)", t["samples"], t["bytes"], t["s"], f"{t['s']:.2f} s")
    st = res.get("stages")
    if st:
        rep = st["report"]
        total = sum(x["own_s"] for x in rep["stages"]) or 1.0
        for x in rep["stages"]:
            if x["name"] in ("shards", "split_by_node", "split_by_worker"):
                continue
            samples = st["samples"] if x["items_out"] else None
            row(f"stage {x['name']} (own time, 1 process)", samples, st["bytes"], x["own_s"],
                f"{x['own_s'] / total:.0%} of stage time; {x['items_out']:,} out")
        row(f"the {res['job']} job in 1 process (0 workers)", st["samples"], st["bytes"], st["s"],
            f"bottleneck: {rep['bottleneck']}")
    ld = res.get("loader")
    if ld:
        req = ld["requests_by_first_batch"]
        note = (f"first batch {ld['first_batch_s']:.2f} s" + (f", {req} requests by then, {ld['requests']} in all"
                if req is not None and ld["requests"] else "") + f"; peak RSS {ld['peak_rss_mib']:,.0f} MiB")
        row(f"end to end, vs.Loader({res['workers']} workers)", ld["samples"], ld["bytes"], ld["s"], note)
    lim = res.get("limit")
    if lim:
        per_image = lim["bytes"] / lim["images"] if lim["images"] else 0
        row(f"decode limit ({lim['processes']} processes, images in memory)", lim["images"],
            per_image * lim["images"], lim["s"], f"{lim['cpu_ms_per_image']:.2f} CPU ms/image")
    return rows


def markdown(res: dict[str, Any]) -> str:
    lines = [f"`{res['command']}`", "", f"{res['samples']:,} samples in {res['shards']} shards "
             f"({res['bytes'] / 1e6:,.1f} MB); job: {res['job_text']}", "",
             "| measurement | samples/s | MB/s | notes |", "|---|---:|---:|---|"]
    for r in rows_of(res):
        sps = f"{r['samples_per_s']:,.0f}" if r["samples_per_s"] else "-"
        mbs = f"{r['mb_per_s']:,.1f}" if r["mb_per_s"] else "-"
        lines.append(f"| {r['what']} | {sps} | {mbs} | {r['note']} |")
    if res.get("stages", {}).get("no_image"):
        lines += ["", f"{res['stages']['no_image']:,} samples have no image: the {res['job']} job passes them over."]
    ov = res.get("overhead")
    if ov:
        lines += ["", f"Telemetry overhead (in-process chain, {ov['rounds']} on/off pairs, median of the pairs): "
                  f"wall {ov['wall_overhead']:+.2%}, CPU {ov['cpu_overhead']:+.2%}."]
    if res.get("loader"):
        lines += ["", f"Telemetry: {res['loader']['summary']}"]
    lines += ["", f"Machine: {machine_line(res['machine'])}."]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Bars:
    """One panel of a chart: a bar per label."""

    title: str
    labels: list[str]
    values: list[float]
    axis: str = ""  # the values' axis label
    colors: list[str] | str = "#5b8bd0"
    horizontal: bool = True  # bars from the left, the first label on top
    log: bool = False
    annotate: bool = False  # each value written at its bar's end
    lines: tuple[float, ...] = ()  # dashed reference lines at these values (a target)


def draw(panels: list[Bars], path: str, title: str = "", widths: list[float] | None = None,
         size: tuple[float, float] | None = None) -> str | None:
    """The panels side by side in one PNG (the user's bench.png and the suite's chart); None without matplotlib
    (the ``bench`` extra) or without panels."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not panels:
        return None
    size = size or (5.2 * len(panels), 4.2)
    fig, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False,
                             gridspec_kw={"width_ratios": widths} if widths else None)
    for ax, p in zip(axes[0], panels):
        if p.horizontal:
            colors = p.colors[::-1] if isinstance(p.colors, list) else p.colors
            ax.barh(p.labels[::-1], p.values[::-1], color=colors)
            ax.set_xlabel(p.axis)
            if p.log:
                ax.set_xscale("log")
            if p.annotate:
                for y, v in enumerate(p.values[::-1]):
                    ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
        else:
            ax.bar(p.labels, p.values, color=p.colors)
            ax.set_ylabel(p.axis)
            if p.log:
                ax.set_yscale("log")
            ax.tick_params(axis="x", labelsize=8)
        for v in p.lines:
            (ax.axvline if p.horizontal else ax.axhline)(v, color="red", linestyle="--", linewidth=1)
        ax.set_title(p.title, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chart(res: dict[str, Any], path: str) -> str | None:
    """A PNG: samples/s of each measurement (log scale) and the stages' shares of the time."""
    rows = [r for r in rows_of(res) if r["samples_per_s"]]
    names = [r["what"] for r in rows]
    panels = [Bars(res["job_text"], names, [r["samples_per_s"] for r in rows], "samples/s (log scale)",
                   ["#d9822b" if "end to end" in n else "#5b8bd0" if n.startswith("stage") else "#888888"
                    for n in names], log=True, annotate=True)]
    st = res.get("stages")
    if st:
        total = sum(x["own_s"] for x in st["report"]["stages"]) or 1.0
        stages = [x for x in st["report"]["stages"] if x["own_s"] / total >= 0.002]
        panels.append(Bars(f"bottleneck: {st['report']['bottleneck']}", [x["name"] for x in stages],
                           [x["own_s"] / total * 100 for x in stages], "% of stage time (telemetry)"))
    return draw(panels, path, widths=[3, 2][: len(panels)], size=(13, 0.45 * len(rows) + 2))


def bench_shards(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from ..errors import redact_spec, redact_text
    from ..progress import bar
    from ..stages.shards import resolve

    spec = args.shards[0] if len(args.shards) == 1 else list(args.shards)
    specs = resolve(spec)
    if args.max_shards:
        specs = specs[: args.max_shards]
    urls = [s.url for s in specs]
    job = Job(args, urls)
    rounds = args.rounds or 1
    res: dict[str, Any] = {"command": redact_text(command), "spec": redact_spec(spec), "shards": len(urls), "job": args.job,
                           "workers": args.workers, "machine": machine()}
    res["job_text"] = (f"every image decoded and resized to {args.size}x{args.size} uint8, batches of {job.batch}"
                       if args.job == "224" else
                       f"ImageTiles({args.tile}, {args.max_side}) -> tokenize({args.seq_len}) -> pack({args.seq_len}, "
                       f"max_images={args.max_images}) -> batch({job.batch})")
    steps: list[tuple[str, Callable[[], Any]]] = [("tar", lambda: run_tar(job)), ("stages", lambda: run_stages(job)),
                                                   ("loader", lambda: run_loader(job))]
    if not args.no_limit:
        steps.append(("limit", lambda: run_limit(job)))
    if args.overhead:
        steps.append(("overhead", lambda: run_overhead(job, max(2, rounds))))
    with bar(total=len(steps) * (rounds if rounds > 1 else 1), desc="bench", unit="run", enabled=args.progress) as pb:
        for name, fn in steps:
            runs = []
            for _ in range(1 if name == "overhead" else rounds):
                pb.set_postfix_str(name)
                runs.append(fn())
                pb.update(1)
            res[name] = min(runs, key=lambda r: r.get("s", 0)) if name != "overhead" else runs[0]
            if name != "overhead" and len(runs) > 1:
                res[name]["runs_s"] = [r["s"] for r in runs]
    res["samples"] = res["tar"]["samples"]
    res["bytes"] = res["tar"]["bytes"]
    return res


def main_from_args(args: argparse.Namespace) -> int:
    command = "vlmstream bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "vlmstream bench ..."
    if args.suite:
        return run_suite(args)
    if not args.shards:
        raise SystemExit("vlmstream bench: give your shards (a manifest, pattern or URL), or --suite")
    res = bench_shards(args, command)
    os.makedirs(args.out, exist_ok=True)
    md = markdown(res)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    png = chart(res, os.path.join(args.out, "bench.png"))
    if args.json:
        print(json.dumps(res, indent=1, default=str))
    else:
        print(md, end="")
        print(f"\nwrote {os.path.join(args.out, 'bench.md')}, bench.json"
              + (", bench.png" if png else " (no chart: pip install matplotlib, or the [bench] extra)"))
    return 0


def checkout_suite() -> str | None:
    """tools/bench/suite.py of the repository checkout this vlmstream is imported from; None when installed
    without one."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "tools", "bench", "suite.py")
    return path if os.path.isfile(path) else None


def suite_argv(args: argparse.Namespace) -> list[str]:
    """The suite's options of a `vlmstream bench --suite` command line, as `tools/bench/suite.py` takes them."""
    argv = ["--workdir", args.workdir, "--workers", str(args.workers), "--out", args.out]
    if args.only:
        argv += ["--only", *args.only]
    if args.write_docs:
        argv += ["--write-docs", args.write_docs]
    if args.rounds is not None:
        argv += ["--rounds", str(args.rounds)]
    if args.quick:
        argv.append("--quick")
    if args.json:
        argv.append("--json")
    if args.progress is not None:
        argv.append("--progress" if args.progress else "--no-progress")
    return argv


def run_suite(args: argparse.Namespace) -> int:
    """The project's benchmarks: `python tools/bench/suite.py` of this vlmstream's checkout, in a subprocess
    (the suite is no part of the package, and is not imported from one)."""
    path = checkout_suite()
    if path is None:
        raise SystemExit("vlmstream bench --suite runs tools/bench/suite.py of a checkout of the vlmstream "
                         "repository, and this vlmstream is installed without one; `vlmstream bench SHARDS` "
                         "benchmarks your own shards anywhere")
    if args.shards:
        raise SystemExit("vlmstream bench --suite runs on the project's own corpus: give it no shards")
    return subprocess.run([sys.executable, path, *suite_argv(args)]).returncode


__all__ = ["Bars", "PeakRSS", "add_arguments", "bench_shards", "chart", "decode_limit", "draw", "machine",
           "machine_line", "main_from_args", "markdown", "overhead_figures", "run_suite"]
