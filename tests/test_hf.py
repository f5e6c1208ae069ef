"""hf:// shard lists, manifests and reads, through huggingface_hub's own client, against a local Hub stand-in.

Nothing here reaches huggingface.co: every test points the library at the stand-in with ``HF_ENDPOINT``.
huggingface_hub reads its environment once, at import, into ``huggingface_hub.constants`` (the endpoint, the
resolve-URL template, the cache and token paths); the ``hub_env`` fixture sets the variables and reloads that
module so the library derives everything from them as it would at start-up, then restores both. The subprocess
test does what a user does instead: the variable is set before the process starts, and nothing is reloaded.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import pytest

from hf_standin import HubStandin, commit_of
from vlmstream.errors import FetchError
from vlmstream.io.urls import open_url
from vlmstream.stages.fetch import fetch
from vlmstream.dataset.format import ShardInfo, write_manifest
from vlmstream.io.hub import parse_hf_url
from vlmstream.stages.shards import resolve

try:
    from vlmstream.stages.read import tar_samples# written alongside; tarfile reads the shards until it lands
except ImportError:  # pragma: no cover
    tar_samples = None

TOKEN = "hf_standinTOKEN0123456789abcdef"
REPO = "hf://datasets/org/ds"
N_SHARDS, PER_SHARD = 4, 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_shard(path: str, first: int, n: int) -> list[dict]:
    """A tar shard written with Python's tarfile: n samples (txt, json, a binary blob); returns them."""
    samples = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(first, first + n):
            key = f"sample{i:06d}"
            sample = {"__key__": key, "txt": f"caption {i}".encode(), "json": json.dumps({"i": i}).encode(),
                      "bin": hashlib.sha256(str(i).encode()).digest() * (1000 + 37 * i)}
            for ext in ("txt", "json", "bin"):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(sample[ext])
                tf.addfile(info, io.BytesIO(sample[ext]))
            samples.append(sample)
    return samples


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """Three revisions of org/ds: main (4 shards, a manifest, a nested tar, a README), v1 (2 shards), refs/pr/1."""
    root = tmp_path_factory.mktemp("hub")
    revs, samples = {}, {}
    for rev, n in (("main", N_SHARDS), ("v1", 2), ("refs/pr/1", 1)):
        folder = root / rev.replace("/", "_")
        os.makedirs(folder / "shards" / "extra")
        infos = []
        for s in range(n):
            name = f"shards/shard-{s:06d}.tar"
            samples[(rev, name)] = make_shard(str(folder / name), s * PER_SHARD + (100 if rev != "main" else 0),
                                              PER_SHARD)
            data = (folder / name).read_bytes()
            infos.append(ShardInfo(name, PER_SHARD, len(data), hashlib.sha256(data).hexdigest()))
        write_manifest(str(folder / "index.json"), infos)
        make_shard(str(folder / "shards" / "extra" / "nested.tar"), 900, 1)
        (folder / "README.md").write_text("# a dataset\n")
        revs[rev] = str(folder)
    return revs, samples


@pytest.fixture(scope="module")
def hub(repo):
    with HubStandin({"org/ds": repo[0]}, token=TOKEN, page_size=3) as srv:  # 3 entries a page: paging runs
        yield srv


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):
    """huggingface_hub pointed at the stand-in through HF_ENDPOINT, with a private HF_HOME and HF_TOKEN."""
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_DISABLE_IMPLICIT_TOKEN",
                "HF_OIDC_RESOURCE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HUGGINGFACE_CO_STAGING",
                "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    importlib.reload(huggingface_hub.constants)
    assert huggingface_hub.constants.ENDPOINT == hub.url
    hub.clear()
    yield hub
    monkeypatch.undo()
    importlib.reload(huggingface_hub.constants)
    assert not hub.unknown  # huggingface_hub called nothing the stand-in lacks


def pinned(rev: str = "main") -> str:
    """The repo's URL prefix at the commit a revision names: what listings and manifests hand out."""
    return f"{REPO}@{commit_of('org/ds', rev)}"


def data(repo, name: str, rev: str = "main") -> bytes:
    with open(os.path.join(repo[0][rev], name), "rb") as f:
        return f.read()


def read_all(stage, urls: list[str]) -> list[bytes]:
    out = []
    for item in stage(iter([{"url": u} for u in urls])):
        with item.stream as f:
            out.append(f.read())
    return out


# -------------------------------------------------------------------------------------------- listing


def test_parse_hf_url():
    assert parse_hf_url("hf://datasets/org/ds/a/b.tar") == ("dataset", "org/ds", None, "a/b.tar")
    assert parse_hf_url("hf://datasets/org/ds@v1/b.tar") == ("dataset", "org/ds", "v1", "b.tar")
    assert parse_hf_url("hf://datasets/org/ds@refs/pr/1/b.tar") == ("dataset", "org/ds", "refs/pr/1", "b.tar")
    assert parse_hf_url("hf://datasets/org/ds@refs%2Fpr%2F1/b.tar") == ("dataset", "org/ds", "refs/pr/1", "b.tar")
    assert parse_hf_url("hf://models/org/m@refs/convert/parquet/x") == ("model", "org/m", "refs/convert/parquet", "x")
    for bad in ("hf://datasets/org/ds", "hf://datasets/org", "hf://buckets/org/ds/x", "hf://datasets/org/ds@/x"):
        with pytest.raises(ValueError):
            parse_hf_url(bad)


def test_brace_pattern_lists_through_hfapi(hub_env):
    got = resolve(f"{REPO}/shards/shard-{{000000..000003}}.tar")
    assert [s.url for s in got] == [f"{pinned()}/shards/shard-{i:06d}.tar" for i in range(4)]
    tree = hub_env.requests("hub", "GET", f"/api/datasets/org/ds/tree/{commit_of('org/ds', 'main')}")
    assert len(tree) >= 3 and all(r.auth and r.status == 200 for r in tree)  # paged, token sent every time
    with pytest.raises(FileNotFoundError, match="shard-000004.tar"):  # a named shard that is missing: an error
        resolve(f"{REPO}/shards/shard-{{000000..000004}}.tar")


def test_glob_pattern_stays_in_its_folder(hub_env):
    got = resolve(f"{REPO}/shards/*.tar")
    assert [s.url for s in got] == [f"{pinned()}/shards/shard-{i:06d}.tar" for i in range(N_SHARDS)]
    assert [s.url for s in resolve(f"{REPO}/shards/*/*.tar")] == [f"{pinned()}/shards/extra/nested.tar"]
    assert [s.url for s in resolve(f"{REPO}/shards/shard-00000[13].tar")] == [
        f"{pinned()}/shards/shard-000001.tar", f"{pinned()}/shards/shard-000003.tar"]


@pytest.mark.parametrize("rev", ["v1", "refs/pr/1", "refs%2Fpr%2F1"])
def test_revision_is_pinned_to_its_commit_in_listing_and_reads(hub_env, repo, rev):
    got = resolve(f"{REPO}@{rev}/shards/*.tar")
    plain = "refs/pr/1" if "pr" in rev else rev
    commit = commit_of("org/ds", plain)
    names = sorted(n for r, n in repo[1] if r == plain)
    assert [s.url for s in got] == [f"{REPO}@{commit}/{n}" for n in names]
    info = hub_env.requests("hub", "GET", "/api/datasets/org/ds/revision/")
    assert [r.path for r in info] == [f"/api/datasets/org/ds/revision/{plain}"]  # the name, asked once
    tree = hub_env.requests("hub", "GET", "/api/datasets/org/ds/tree/")
    assert {r.path for r in tree} == {f"/api/datasets/org/ds/tree/{commit}"}
    assert read_all(fetch(prefetch=0), [s.url for s in got]) == [data(repo, n, plain) for n in names]
    assert {r.path for r in hub_env.requests("hub", "GET", "/datasets/")} == {
        f"/datasets/org/ds/resolve/{commit}/{n}" for n in names}
    assert [s.url for s in resolve(f"{REPO}@{commit}/shards/*.tar")] == [s.url for s in got]  # already pinned


def test_a_push_to_the_branch_mid_run_changes_nothing_for_the_run(repo, tmp_path, monkeypatch):
    """Workers and later epochs read the commit the listing saw, not whatever the branch names by then."""
    import huggingface_hub.constants

    with HubStandin({"org/ds": repo[0]}, token=TOKEN) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        importlib.reload(huggingface_hub.constants)
        try:
            listed = [s.url for s in resolve(f"{REPO}/shards/*.tar")]
            manifest = [s.url for s in resolve(f"{REPO}/index.json")]
            new = hub.move("org/ds", "main", repo[0]["v1"])  # someone pushes other shards to main
            assert new != commit_of("org/ds", "main")
            want = [data(repo, f"shards/shard-{i:06d}.tar") for i in range(N_SHARDS)]
            assert read_all(fetch(prefetch=0), listed) == want
            assert read_all(fetch(prefetch=0), manifest) == want
            assert [s.url for s in resolve(f"{REPO}/shards/*.tar")] == [  # a new listing sees the push
                f"{REPO}@{new}/shards/shard-{i:06d}.tar" for i in range(2)]
        finally:
            monkeypatch.undo()
            importlib.reload(huggingface_hub.constants)


def test_listing_errors_name_the_repo_not_the_token(hub_env, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError) as e:
        resolve("hf://datasets/org/ds@nope/shards/*.tar")
    assert "nope" in str(e.value) and TOKEN not in str(e.value)
    monkeypatch.setenv("HF_TOKEN", "hf_wrongTOKEN")
    with pytest.raises(HfHubHTTPError) as e:
        resolve(f"{REPO}/shards/*.tar")
    assert "401" in str(e.value) and "hf_wrongTOKEN" not in str(e.value)


# ------------------------------------------------------------------------------------------- manifest


@pytest.mark.parametrize("rev", [None, "v1"])
def test_manifest_resolves_relative_to_itself(hub_env, repo, rev):
    at = f"@{rev}" if rev else ""
    got = resolve(f"{REPO}{at}/index.json")
    names = sorted(n for r, n in repo[1] if r == (rev or "main"))
    assert [s.url for s in got] == [f"{pinned(rev or 'main')}/{n}" for n in names]
    assert [s.samples for s in got] == [PER_SHARD] * len(names)
    assert [s.sha256 for s in got] == [hashlib.sha256(data(repo, n, rev or "main")).hexdigest() for n in names]
    calls = hub_env.requests("hub", prefix="/datasets/")
    commit = commit_of("org/ds", rev or "main")
    assert {(r.method, r.path) for r in calls} == {(m, f"/datasets/org/ds/resolve/{commit}/index.json")
                                                   for m in ("HEAD", "GET")}
    assert all(r.auth for r in calls)


# ---------------------------------------------------------------------------------------------- fetch


@pytest.mark.parametrize("prefetch", [0, 2])
def test_fetch_reads_hf_shards_byte_identical_with_the_token(hub_env, repo, prefetch):
    urls = [s.url for s in resolve(f"{REPO}/shards/*.tar")]
    hub_env.clear()
    stage = fetch(prefetch=prefetch)
    assert read_all(stage, urls) == [data(repo, f"shards/shard-{i:06d}.tar") for i in range(N_SHARDS)]
    resolves, cdn = hub_env.requests("hub"), hub_env.requests("cdn")
    assert len(resolves) == len(cdn) == N_SHARDS and all(r.status == 302 and r.auth for r in resolves)
    assert all(r.status == 200 and not r.auth for r in cdn)  # the token stays on the Hub's host
    assert stage.stats.requests == 2 * N_SHARDS and stage.stats.shards == N_SHARDS and stage.stats.retries == 0
    assert len({r.client_port for r in resolves}) == 1 and len({r.client_port for r in cdn}) == 1  # keep-alive


def test_fetch_resumes_an_hf_shard_by_range_through_the_redirect(hub_env, repo):
    from vlmstream.io.http import FetchOptions, HTTPClient, HTTPStream
    from vlmstream.io.hub import hf_resolve_url
    from vlmstream.stages.fetch import FetchStats

    url, token = hf_resolve_url(f"{REPO}/shards/shard-000002.tar")
    assert token == TOKEN and url == f"{hub_env.url}/datasets/org/ds/resolve/main/shards/shard-000002.tar"
    s = HTTPStream(url, HTTPClient(FetchOptions(), FetchStats()), {"Authorization": f"Bearer {token}"})
    head = s.read(1000)
    s._drop()  # as if the connection broke here
    assert head + s.read() == data(repo, "shards/shard-000002.tar")
    assert [(r.range, r.auth) for r in hub_env.requests("cdn")] == [(None, False), ("bytes=1000-", False)]


def test_the_token_never_appears_in_errors_stats_or_reprs(hub_env, monkeypatch):
    good = f"{REPO}/shards/shard-000000.tar"
    stage = fetch(prefetch=0)
    assert len(read_all(stage, [good])[0]) > 0
    with pytest.raises(FetchError, match="404") as e:  # a missing shard
        read_all(stage, [f"{REPO}/shards/missing.tar"])
    texts = [str(e.value), repr(e.value), repr(stage), str(stage.stats.as_dict()), repr(vars(stage))]
    assert pickle.dumps(stage).find(TOKEN.encode()) < 0  # the token reaches workers by the environment
    monkeypatch.setenv("HF_TOKEN", "hf_wrongTOKEN")
    with pytest.raises(FetchError, match="401") as e:
        read_all(fetch(prefetch=2), [good])
    texts += [str(e.value), repr(e.value)]
    with open_url(good, hf_token=TOKEN) as f:  # an explicit token wins over the environment
        texts.append(repr(f))
        assert f.read(4)
    explicit = fetch(prefetch=0, hf_token=TOKEN)
    texts += [repr(explicit), str(explicit.stats.as_dict())]
    assert not [t for t in texts if TOKEN in t or "hf_wrongTOKEN" in t]


@pytest.mark.parametrize("how", ["no token", "hf_token=False", "HF_HUB_DISABLE_IMPLICIT_TOKEN"])
def test_no_token_sent_gets_401(hub_env, monkeypatch, how):
    import huggingface_hub.constants

    kwargs = {}
    if how == "no token":
        monkeypatch.delenv("HF_TOKEN")
    elif how == "hf_token=False":
        kwargs["hf_token"] = False
    else:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
    with pytest.raises(FetchError, match="HTTP 401"):
        read_all(fetch(prefetch=0, **kwargs), [f"{REPO}/shards/shard-000000.tar"])
    assert [r.auth for r in hub_env.requests("hub")] == [False]


# ------------------------------------------------------------------------------------------- end to end


def test_full_read_from_manifest_through_fetch_and_tar(hub_env, repo):
    from vlmstream.core.pipeline import Pipeline
    from vlmstream.stages.shards import shards

    def tarfile_samples(items):
        for item in items:
            with item.stream as f, tarfile.open(fileobj=f, mode="r|") as tf:
                sample = None
                for m in tf:
                    key, ext = m.name.split(".", 1)
                    if sample is None or sample["__key__"] != key:
                        if sample is not None:
                            yield sample
                        sample = {"__key__": key, "__url__": item["url"]}
                    sample[ext] = tf.extractfile(m).read()
                if sample is not None:
                    yield sample

    reader = tar_samples() if tar_samples is not None else tarfile_samples
    pipe = Pipeline(shards(f"{REPO}/index.json", shuffle=False), fetch(prefetch=2), reader, rank=0, world_size=1)
    samples = list(pipe)
    got = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"} for s in samples]
    want = [s for i in range(N_SHARDS) for s in repo[1][("main", f"shards/shard-{i:06d}.tar")]]
    assert got == want
    assert [s["__url__"] for s in samples] == [f"{pinned()}/shards/shard-{i // PER_SHARD:06d}.tar"
                                               for i in range(len(want))]
    assert [(r.server, r.auth) for r in hub_env.requests(prefix="/blobs/")] == [("cdn", False)] * N_SHARDS


def test_the_packer_reads_webdataset_shards_from_the_hub(hub_env, tmp_path):
    """img2dataset-shaped shards in a Hub dataset repo, named by an hf:// pattern: packed as from local disk, each
    sample's meta naming its shard at the commit the listing pinned, the token nowhere in the output."""
    from conftest import read_pack, run_pack
    from vlm_data import img2dataset_samples, write_img2dataset_shards

    folder = tmp_path / "laion"
    folder.mkdir()
    samples = img2dataset_samples(12)
    write_img2dataset_shards(str(folder), samples, per_shard=6)
    hub_env.repos["org/laion"] = {"main": str(folder)}
    try:
        out = tmp_path / "out"
        assert run_pack(["hf://datasets/org/laion/*.tar"], str(out)) == 0
    finally:
        del hub_env.repos["org/laion"]
    packed = read_pack(str(out))
    good = [(i, s) for i, s in enumerate(samples) if s.caption.strip()]
    assert [p["__key__"] for p in packed] == [f"{i:09d}" for i, _ in good]
    commit = commit_of("org/laion", "main")
    for p, (i, s) in zip(packed, good):
        doc = json.loads(p["json"])
        assert doc["messages"][1]["content"] == s.caption.strip() and p["0.jpg"] == s.jpg
        assert doc["meta"]["source"] == f"hf://datasets/org/laion@{commit}/{i // 6:05d}.tar"
        assert doc["meta"]["url"] == s.meta["url"]
    for name in os.listdir(out):
        with open(out / name, "rb") as f:
            assert TOKEN.encode() not in f.read()


SCRIPT = """
import hashlib, json, sys
import huggingface_hub.constants
from vlmstream.stages.fetch import fetch
from vlmstream.stages.shards import resolve
specs = resolve(sys.argv[1]) + resolve(sys.argv[2])
out = {"endpoint": huggingface_hub.constants.ENDPOINT, "urls": [s.url for s in specs], "sha256": []}
for item in fetch(prefetch=1)(iter([{"url": s.url} for s in specs])):
    with item.stream as f:
        out["sha256"].append(hashlib.sha256(f.read()).hexdigest())
print(json.dumps(out))
"""


def test_hf_endpoint_set_before_start_needs_nothing_else(hub, repo, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN=TOKEN, HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]))
    hub.clear()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, f"{REPO}@v1/shards/*.tar", f"{REPO}/index.json"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    names = [f"shards/shard-{i:06d}.tar" for i in range(N_SHARDS)]
    assert out["endpoint"] == hub.url
    assert out["urls"] == [f"{pinned('v1')}/shards/shard-00000{i}.tar" for i in range(2)] + [f"{pinned()}/{n}" for n in names]
    want = [data(repo, f"shards/shard-00000{i}.tar", "v1") for i in range(2)] + [data(repo, n) for n in names]
    assert out["sha256"] == [hashlib.sha256(b).hexdigest() for b in want]
    assert {r.server for r in hub.log} == {"hub", "cdn"}
    assert all(r.auth for r in hub.requests("hub", prefix="/datasets/"))
    assert TOKEN not in proc.stdout + proc.stderr
