"""The 224 job against its peers: each system's own format, writer and loader, side by side (suite section 224).

    python tools/bench/peers.py check                                  # the peers installed here, or why not
    python tools/bench/peers.py convert FORMAT --corpus DIR --out DIR  # one conversion, timed (JSON)
    python tools/bench/peers.py run NAME --corpus DIR --formats DIR    # one timed run of a contender (JSON)

tools/bench/suite.py's section 224 calls this file once per conversion and once per run, each in a process of its
own: every contender starts from the same fresh interpreter (its imports done before the clock), its peak RSS
counts only its own process and its DataLoader workers, and a peer runs with its own install folder first on
sys.path. The peers pin versions that clash with the project's environment (torch 2.13 CPU, huggingface_hub 2.x,
numpy 2.4), so `make bench` installs each with ``pip install --no-deps --target .venv/peers/NAME`` and the
dependencies it imports that the environment lacks (the Makefile's PEERS lines); a contender whose peer is not
installed is reported as skipped, with the reason.

The formats, each written by the system's own writer from the same source, the photo corpus's tar shards (read
with vlmstream's tar reader, the same for every writer; the JPEG bytes are stored as they are, no re-encoding):

  mds        MosaicML streaming's `MDSWriter` (columns key: str, jpg: bytes, json: str; its default 64 MB shards)
  litdata    LitData's `optimize` (2 workers, 64 MB chunks), the sample as a dict of key, jpg bytes, json text
  energon    Megatron-Energon reads the tar shards themselves once `energon prepare` has indexed them (its
             .nv-meta folder, non-interactive: split 1,0,0, sample type ImageSample, image = the 0.jpg member);
             the shards are linked into a folder of its own so the corpus folder stays untouched
  parquet    the Parquet files Hugging Face datasets streams (tools/bench/common.py write_parquet)

The contenders: 2 DataLoader workers, batches of 32, every image as a [3, 224, 224] uint8 tensor. Variant (a) is
each system's idiomatic pipeline as its documentation shows it, with the decode a user writes (Pillow's full
decode, Pillow's bilinear resize, the array as a CHW tensor: `pil_decode`); variant (b) has every system call
vlmstream's own decode and resize (`same_decode`: `open_image` with JPEG draft decoding, then `vs.Resize`), so
what remains between them is each loader's own overhead. vlmstream's pipeline is variant (b) already, so its
row stands in both. Over the network (variant (a)): vlmstream and webdataset from nginx on loopback; vlmstream,
MosaicML streaming, LitData and Energon from moto's S3 server on loopback, the peers' own copies uploaded there.
"""

from __future__ import annotations

import argparse
import glob
import importlib.machinery
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for _p in (os.path.dirname(HERE), ROOT):  # tools/ (bench.*, loopback_nginx), the checkout's vlmstream
    if _p not in sys.path:
        sys.path.insert(0, _p)

# peer: (distribution, the module that shows it is there)
PEERS = {"mosaic": ("mosaicml-streaming", "streaming"), "litdata": ("litdata", "litdata"),
         "energon": ("megatron-energon", "megatron.energon")}

# name: (peer or None for the project's own environment, variant, how it reads, what it is)
CONTENDERS: dict[str, tuple[str | None, str, str, str]] = {
    "vlmstream": (None, "ab", "http", "vlmstream over HTTP: `vs.Loader` of shards(index.json) -> split -> fetch -> "
                  "tar_samples -> decode(Resize(224)) -> batch(32)"),
    "webdataset": (None, "a", "http", "webdataset {webdataset} over HTTP (curl): `.decode(\"pil\").map(resize)"
                   ".to_tuple().batched(32)`, WebLoader"),
    "vlmstream_s3": (None, "ab", "s3", "vlmstream from s3:// (moto's S3 server on loopback): the same pipeline"),
    "mosaic_s3": ("mosaic", "a", "s3", "MosaicML streaming {mosaic} from s3:// (the same server): "
                  "`StreamingDataset(remote=s3://..., local=fresh cache)` subclass, Pillow decode + resize, "
                  "StreamingDataLoader"),
    "litdata_s3": ("litdata", "a", "s3", "LitData {litdata} from s3:// (the same server): `StreamingDataset("
                   "\"s3://...\", cache_dir=fresh cache, transform=decode + resize)`, StreamingDataLoader"),
    "energon_s3": ("energon", "a", "s3", "Megatron-Energon {energon} from s3:// (the same server, through a "
                   "Multi-Storage Client profile): the prepared tar shards, the same TaskEncoder and `get_loader`"),
    "vlmstream_local": (None, "ab", "local", "vlmstream, local tar shards: the same pipeline on index.json"),
    "webdataset_local": (None, "a", "local", "webdataset {webdataset}, local tar shards: the same pipeline as over "
                         "HTTP"),
    "hf_datasets": (None, "a", "local", "Hugging Face datasets {datasets}, `load_dataset(\"parquet\", "
                    "streaming=True).map(decode + resize)`, local Parquet, torch DataLoader"),
    "mosaic": ("mosaic", "a", "local", "MosaicML streaming {mosaic}, local MDS: `StreamingDataset` subclass whose "
               "`__getitem__` decodes + resizes with Pillow, StreamingDataLoader"),
    "litdata": ("litdata", "a", "local", "LitData {litdata}, local optimized chunks: `StreamingDataset(transform="
                "decode + resize)`, StreamingDataLoader"),
    "energon": ("energon", "a", "local", "Megatron-Energon {energon}, the local tar shards after `energon prepare`: "
                "`get_train_dataset(repeat=False)` with a TaskEncoder (decoder `pilrgb`, Pillow resize in "
                "`encode_sample`), `get_loader`"),
    "webdataset_same": (None, "b", "local", "webdataset, local tar shards, no `.decode`: `.map(vlmstream's decode)`"),
    "hf_datasets_same": (None, "b", "local", "HF datasets, local Parquet: `.map(vlmstream's decode)`"),
    "mosaic_same": ("mosaic", "b", "local", "MosaicML streaming, local MDS: `__getitem__` calls vlmstream's decode"),
    "litdata_same": ("litdata", "b", "local", "LitData, local chunks: `transform=` vlmstream's decode"),
    "energon_same": ("energon", "b", "local", "Megatron-Energon, prepared tar shards: `decoder = None`, "
                     "`encode_sample` calls vlmstream's decode"),
    "limit": (None, "limit", "memory", "decode limit: the images decoded from memory with vlmstream's draft decode "
              "+ resize, no tar/HTTP/batching/IPC"),
    "limit_full": (None, "limit", "memory", "decode limit without draft decoding (full 640x480 decode, then resize)"),
}
FORMATS = {"mds": "mosaic", "litdata": "litdata", "energon": "energon", "parquet": None}


# ------------------------------------------------------------------------------------------- environment


def peers_root() -> str:
    """Where `make bench` installs the peers: $VLMSTREAM_PEERS, else the checkout's .venv/peers, else the running
    environment's."""
    if os.environ.get("VLMSTREAM_PEERS"):
        return os.environ["VLMSTREAM_PEERS"]
    mine = os.path.join(ROOT, ".venv", "peers")
    return mine if os.path.isdir(mine) else os.path.join(sys.prefix, "peers")


def use_peer(peer: str) -> None:
    """The peer's install folder first on sys.path (its pinned dependencies shadow the environment's).

    MosaicML streaming imports torchvision when it is imported (``streaming.vision``: `VisionDataset` and
    `to_tensor`, neither used here), and the registry's torchvision wheel does not load beside this CPU torch: its
    package ``__init__`` loads C++ operators built for another torch ("operator torchvision::nms does not exist").
    So the wheel's folder (installed with --no-deps under .venv/peers/torchvision) is registered as a bare package
    without running that ``__init__``, its pure-Python submodules found in place (as tests/nanovlm_ref.py does for
    nanoVLM). transformers, which Mosaic's loader imports for two isinstance checks, is imported first: it probes
    for torchvision at import and then does without it."""
    folder = os.path.join(peers_root(), peer)
    if not os.path.isdir(folder):
        raise ModuleNotFoundError(f"{PEERS[peer][0]} is not installed under {folder} (make bench installs it)")
    sys.path.insert(0, folder)
    if peer == "mosaic" and "torchvision" not in sys.modules:
        import transformers  # noqa: F401  (before torchvision is findable)

        tv = os.path.join(peers_root(), "torchvision", "torchvision")
        if not os.path.isdir(tv):
            raise ModuleNotFoundError(f"torchvision's wheel is not installed under {os.path.dirname(tv)}")
        spec = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
        spec.submodule_search_locations = [tv]
        pkg = types.ModuleType("torchvision")
        pkg.__spec__, pkg.__path__ = spec, spec.submodule_search_locations
        sys.modules["torchvision"] = pkg


def version_of(peer: str) -> str:
    use_peer(peer)
    mod = __import__(PEERS[peer][1], fromlist=["_"])
    if getattr(mod, "__version__", None) not in (None, "unknown"):
        return mod.__version__
    from importlib.metadata import version

    return version(PEERS[peer][0])


def check() -> dict[str, dict[str, str]]:
    """Each peer's version, or why it cannot run here: each imported in a process of its own."""
    out = {}
    for peer in PEERS:
        proc = subprocess.run([sys.executable, __file__, "version", peer], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode == 0:
            out[peer] = {"version": proc.stdout.strip().splitlines()[-1]}
        else:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            out[peer] = {"missing": last}
    return out


# ------------------------------------------------------------------------------------------- the decodes


def pil_decode(size: int) -> Callable[[bytes], Any]:
    """Variant (a), what a user writes: Pillow decodes the whole JPEG, resizes it (bilinear), the array becomes a
    CHW uint8 tensor (torchvision's Resize + PILToTensor on a PIL image do the same)."""
    from PIL import Image

    from bench.pipeline import pil_resize_to_tensor

    resize = pil_resize_to_tensor(size)
    return lambda data: resize(Image.open(io.BytesIO(data)).convert("RGB"))


def same_decode(size: int) -> Callable[[bytes], Any]:
    """Variant (b): vlmstream's decode and resize, as `vs.decode(vs.Resize(size))` runs it on each image."""
    import vlmstream as vs
    from vlmstream.stages.decode import open_image

    resize = vs.Resize(size)
    draft = resize.draft_size()
    return lambda data: resize(open_image(data, draft))


# ------------------------------------------------------------------------------------------- conversions


def _records(paths: list[str]) -> Any:
    from bench.common import IMAGE_KEY
    from vlmstream.io.tar import read_tar_samples

    for p in paths:
        with open(p, "rb") as f:
            for s in read_tar_samples(f, p):
                yield {"key": s["__key__"], "jpg": s[IMAGE_KEY], "json": s["json"].decode()}


def convert_mds(paths: list[str], out: str) -> None:
    use_peer("mosaic")
    from streaming import MDSWriter

    with MDSWriter(out=out, columns={"key": "str", "jpg": "bytes", "json": "str"}) as w:
        for r in _records(paths):
            w.write(r)


def _litdata_fn(path: str) -> Any:
    yield from _records([path])


def convert_litdata(paths: list[str], out: str) -> None:
    use_peer("litdata")
    import litdata

    litdata.optimize(fn=_litdata_fn, inputs=paths, output_dir=out, chunk_bytes="64MB", num_workers=2,
                     verbose=False)


def convert_energon(paths: list[str], out: str) -> None:
    use_peer("energon")
    from megatron.energon.tools.prepare import command

    os.makedirs(out, exist_ok=True)
    for p in paths:  # energon's index goes beside the shards: a folder of links keeps the corpus folder as it is
        os.symlink(p, os.path.join(out, os.path.basename(p)))
    command.main([out, "--non-interactive", "--split-ratio", "1,0,0", "--sample-type", "ImageSample",
                  "--field-map", json.dumps({"image": "0.jpg"}), "--num-workers", "2", "--no-progress"],
                 standalone_mode=False)


def convert_parquet(paths: list[str], out: str) -> None:
    from bench.common import write_parquet

    write_parquet(paths, out)


CONVERT = {"mds": convert_mds, "litdata": convert_litdata, "energon": convert_energon, "parquet": convert_parquet}


def convert(fmt: str, corpus: str, out: str) -> dict[str, Any]:
    """A fresh conversion of the corpus's shards into `out` (removed first), timed from its first read of the
    shards to its last write; the bytes it wrote."""
    paths = sorted(glob.glob(os.path.join(corpus, "shard-*.tar")))
    shutil.rmtree(out, ignore_errors=True)
    if FORMATS[fmt]:  # the peer's imports before the clock
        use_peer(FORMATS[fmt])
        __import__(PEERS[FORMATS[fmt]][1])
        if fmt == "energon":
            import megatron.energon.tools.prepare  # noqa: F401
    t0, c0 = time.perf_counter(), _cpu()
    with _quiet():
        CONVERT[fmt](paths, out)
    took, cpu = time.perf_counter() - t0, _cpu() - c0
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs
               if not os.path.islink(os.path.join(d, f)))
    return {"format": fmt, "s": took, "cpu_s": cpu, "bytes": size}


class _quiet:
    """stdout to stderr while a writer prints its progress (the caller reads this process's stdout as JSON)."""

    def __enter__(self) -> None:
        self.fd = os.dup(1)
        os.dup2(2, 1)

    def __exit__(self, *exc: Any) -> None:
        sys.stdout.flush()
        os.dup2(self.fd, 1)
        os.close(self.fd)


def _cpu() -> float:
    from bench.common import cpu_times

    return cpu_times().total


# -------------------------------------------------------------------------------------------- contenders

Loader = tuple[Callable[[], Any], Callable[[Any], Any]]


def run_webdataset_same(paths: list[str], workers: int, batch: int, size: int) -> Loader:
    import webdataset as wds

    decode = same_decode(size)

    def make() -> Any:
        ds = (wds.WebDataset(paths, shardshuffle=False, nodesplitter=wds.split_by_node,
                             workersplitter=wds.split_by_worker)
              .map(lambda s: (decode(s["0.jpg"]), s["json"])).batched(batch))
        return iter(wds.WebLoader(ds, batch_size=None, num_workers=workers))

    return make, lambda b: b[0]


def run_hf_datasets(files: list[str], workers: int, batch: int, size: int,
                    decode: Callable[[bytes], Any] | None = None) -> Loader:
    """Hugging Face datasets streaming the Parquet files, as its users write it: load_dataset(streaming=True),
    .map(decode + resize) per example, a torch DataLoader with workers (which share the files)."""
    import torch

    decode = decode or pil_decode(size)

    def make() -> Any:
        from datasets import load_dataset

        ds = load_dataset("parquet", data_files=files, split="train", streaming=True)
        ds = ds.map(lambda ex: {"image": decode(ex["jpg"])}, remove_columns=["jpg", "json"])
        return iter(torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers))

    return make, lambda b: b["image"]


def run_mosaic(local: str, decode: Callable[[bytes], Any], workers: int, batch: int,
               remote: str | None = None) -> Loader:
    """Mosaic's documented pattern: a StreamingDataset subclass whose __getitem__ turns the stored sample into
    the training sample, through its StreamingDataLoader (a torch DataLoader that can checkpoint)."""
    use_peer("mosaic")
    from streaming import StreamingDataLoader, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    class Photos(StreamingDataset):
        def __getitem__(self, idx: int) -> dict[str, Any]:
            return {"image": decode(super().__getitem__(idx)["jpg"])}

    clean_stale_shared_memory()

    def make() -> Any:
        ds = Photos(local=local, remote=remote, batch_size=batch, shuffle=False)
        return iter(StreamingDataLoader(ds, batch_size=batch, num_workers=workers))

    return make, lambda b: b["image"]


def run_litdata(folder: str, decode: Callable[[bytes], Any], workers: int, batch: int,
                cache: str | None = None) -> Loader:
    """LitData's documented pattern: `StreamingDataset(transform=...)` over the optimized chunks (local, or a
    remote folder whose chunks it downloads into `cache`), through its StreamingDataLoader."""
    use_peer("litdata")
    import litdata

    def make() -> Any:
        ds = litdata.StreamingDataset(folder, cache_dir=cache, transform=lambda s: {"image": decode(s["jpg"])})
        return iter(litdata.StreamingDataLoader(ds, batch_size=batch, num_workers=workers))

    return make, lambda b: b["image"]


def run_energon(folder: str, decode: Callable[[Any], Any], workers: int, batch: int, pil: bool) -> Loader:
    """Energon's documented pattern: a TaskEncoder (its `decoder` decodes the sample's parts; `encode_sample`
    makes the training sample), `get_train_dataset` over the prepared folder, `get_loader`."""
    use_peer("energon")
    from megatron.energon import (DefaultTaskEncoder, ImageSample, SampleDecoder, WorkerConfig, get_loader,
                                  get_train_dataset)

    class Resize224(DefaultTaskEncoder):
        decoder = SampleDecoder(image_decode="pilrgb") if pil else None  # None: the parts stay bytes

        def encode_sample(self, sample: ImageSample) -> ImageSample:
            return ImageSample.derive_from(sample, image=decode(sample.image))

    def make() -> Any:
        wc = WorkerConfig(rank=0, world_size=1, num_workers=workers)
        ds = get_train_dataset(folder, batch_size=batch, shuffle_buffer_size=None, max_samples_per_sequence=None,
                               worker_config=wc, task_encoder=Resize224(), repeat=False)
        return iter(get_loader(ds))

    return make, lambda b: b.image


def msc_profile(s3: str, folder: str) -> tuple[str, str]:
    """Energon reads object stores through Multi-Storage Client profiles (`msc://PROFILE/path`): a profile for
    the bucket on the loopback S3 server (its endpoint and keys from the environment), in a config file of its
    own that MSC_CONFIG names (the profile, and the folder of that file)."""
    tmp = tempfile.mkdtemp(prefix="msc-", dir=folder)
    path = os.path.join(tmp, "msc.json")
    options = {"base_path": s3.removeprefix("s3://"), "endpoint_url": os.environ["AWS_ENDPOINT_URL"],
               "region_name": os.environ.get("AWS_REGION", "us-east-1")}
    with open(path, "w") as f:
        json.dump({"profiles": {"bench": {"storage_provider": {"type": "s3", "options": options}}}}, f)
    os.environ["MSC_CONFIG"] = path
    return "msc://bench", tmp


def build(name: str, a: argparse.Namespace) -> Callable[[], dict[str, Any]]:
    """The contender's timed run (imports and set-up done here, before the clock)."""
    from bench import pipeline as bp

    paths = sorted(glob.glob(os.path.join(a.corpus, "shard-*.tar")))
    w, batch, size, expect = a.workers, a.batch, a.size, a.expect
    fmt = lambda f: os.path.join(a.formats, f)  # noqa: E731
    if name in ("limit", "limit_full"):
        return lambda: bp.run_limit(paths, w, size, name == "limit", expect)
    if name == "vlmstream":
        loader = bp.run_vlmstream(f"{a.url}/index.json", w, batch, size)
    elif name == "vlmstream_local":
        loader = bp.run_vlmstream(os.path.join(a.corpus, "index.json"), w, batch, size)
    elif name == "vlmstream_s3":
        from vlmstream.core.loader import start_forkserver

        spec = f"{a.s3}/corpus/index.json"
        import multiprocessing as mp

        # vs.Loader starts its workers by forkserver for object stores; warm it here, as in a job's later epochs:
        # started, its modules imported (a first process through it waits for that)
        start_forkserver(bp.vlmstream_pipeline(spec, batch, size))
        p = mp.get_context("forkserver").Process(target=int)
        p.start()
        p.join()
        loader = bp.run_vlmstream(spec, w, batch, size)
    elif name in ("webdataset", "webdataset_local"):
        urls = [f"{a.url}/{os.path.basename(p)}" for p in paths] if name == "webdataset" else paths
        loader = bp.run_webdataset(urls, w, batch, size)
    elif name == "webdataset_same":
        loader = run_webdataset_same(paths, w, batch, size)
    elif name.startswith("hf_datasets"):
        files = sorted(glob.glob(os.path.join(a.parquet, "*.parquet")))
        loader = run_hf_datasets(files, w, batch, size, same_decode(size) if name.endswith("_same") else None)
    else:
        peer = CONTENDERS[name][0]
        decode = same_decode(size) if name.endswith("_same") else pil_decode(size)
        if name == "mosaic_s3":
            a.cache = tempfile.mkdtemp(prefix="mosaic-cache-", dir=a.formats)  # every run downloads the shards
            loader = run_mosaic(a.cache, decode, w, batch, remote=f"{a.s3}/mds")
        elif peer == "mosaic":
            loader = run_mosaic(fmt("mds"), decode, w, batch)
        elif name == "litdata_s3":
            from litdata.streaming import downloader

            # LitData fetches chunks with obstore, whose client refuses plain http:// unless told; the loopback
            # server is http:// (a real S3 endpoint is https://), so its client options get allow_http, nothing else
            downloader._OBSTORE_CLIENT_OPTIONS = {**downloader._OBSTORE_CLIENT_OPTIONS, "allow_http": "true"}
            a.cache = tempfile.mkdtemp(prefix="litdata-cache-", dir=a.formats)  # every run downloads the chunks
            loader = run_litdata(f"{a.s3}/litdata", decode, w, batch, cache=a.cache)
        elif peer == "litdata":
            loader = run_litdata(fmt("litdata"), decode, w, batch)
        elif name == "energon_s3":
            resize = bp.pil_resize_to_tensor(size)
            profile, a.cache = msc_profile(a.s3, a.formats)
            loader = run_energon(f"{profile}/energon", resize, w, batch, pil=True)
        elif peer == "energon":
            if name == "energon":  # its decoder hands over RGB PIL images: the user's resize only
                resize = bp.pil_resize_to_tensor(size)
                loader = run_energon(fmt("energon"), resize, w, batch, pil=True)
            else:
                loader = run_energon(fmt("energon"), decode, w, batch, pil=False)
        else:
            raise SystemExit(f"unknown contender {name}")

    def timed() -> dict[str, Any]:
        from bench.store import _forkserver_cpu  # workers started by a forkserver are not this process's children
        from vlmstream.cli.bench import PeakRSS

        fs0 = _forkserver_cpu()
        with PeakRSS() as rss:
            out = bp.time_loader(*loader, expect, size)
        out["cpu_ms_per_sample"] += (_forkserver_cpu() - fs0) / expect * 1e3
        return {**out, "peak_rss_mib": rss.peak_kb / 1024, "peak_main_mib": rss.peak_main_kb / 1024}

    return timed


def run(name: str, a: argparse.Namespace) -> dict[str, Any]:
    if CONTENDERS[name][0]:
        use_peer(CONTENDERS[name][0])
    if CONTENDERS[name][2] == "s3":
        os.environ.update(json.loads(a.s3_env))
        os.environ["S3_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"]  # what Mosaic's S3 downloader reads
    timed = build(name, a)
    with _quiet():
        out = timed()
    if getattr(a, "cache", None):
        shutil.rmtree(a.cache, ignore_errors=True)
    return {"name": name, **out}


# ------------------------------------------------------------------------------------ the suite's calls


def call(argv: list[str]) -> dict[str, Any]:
    """This file in a process of its own; its JSON answer (its progress passed through on stderr)."""
    proc = subprocess.run([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"tools/bench/peers.py {' '.join(argv)} exited with status {proc.returncode}")
    out = proc.stdout
    return json.loads(out[out.index("{"):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("check", "version", "convert", "run"))
    ap.add_argument("name", nargs="?")
    ap.add_argument("--corpus", help="the folder of the photo corpus's tar shards (and index.json)")
    ap.add_argument("--formats", help="the folder of the converted formats (mds/, litdata/, energon/)")
    ap.add_argument("--parquet", help="the folder of the Parquet files")
    ap.add_argument("--out", help="convert: the folder to write")
    ap.add_argument("--url", help="nginx's URL of the corpus folder")
    ap.add_argument("--s3", help="s3://BUCKET: the corpus under corpus/, the peers' copies under mds/, litdata/, "
                    "energon/")
    ap.add_argument("--s3-env", default="{}", help="the S3 server's environment (endpoint, keys), as JSON")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--expect", type=int, default=8000)
    a = ap.parse_args()
    if a.what == "check":
        print(json.dumps(check()))
    elif a.what == "version":
        print(version_of(a.name))
    elif a.what == "convert":
        print(json.dumps(convert(a.name, a.corpus, a.out)))
    else:
        print(json.dumps(run(a.name, a)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
