"""`vlmstream pack --output hf://datasets/ORG/NAME/PATH`: the pack's output folder in a Hub dataset repo
(dataset/hub.py), written through huggingface_hub's own client to the loopback stand-in (tests/hf_standin.py).

huggingface_hub 2.4.0 uploads by Xet whenever hf_xet is installed, a choice it makes without asking the server;
the stand-in speaks plain LFS only, so ``HF_HUB_DISABLE_XET=1`` (huggingface_hub's own switch) is set here. The
environment is set, and ``huggingface_hub.constants`` reloaded from it, as tests/test_hf.py does.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os

import pytest

import vlmstream as vs
from hf_standin import HubStandin
from vlmstream.cli.pack import main as pack_main
from vlmstream.dataset import hub as hub_module
from vlmstream.dataset import writer as writer_module
from vlmstream.dataset.output import UPLOADS_IN_FLIGHT, open_folder

# huggingface_hub 2.4.0 PUTs an LFS object with httpx2's data=<file>, which httpx2 deprecates: theirs, not ours
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

TOKEN = "hf_standinWRITEtoken0123456789"
OUT = "hf://datasets/org/ds/packed"
COMMITS = "/api/datasets/org/ds/commit/"


@contextlib.contextmanager
def hub_env(monkeypatch, url: str, home: str, token: str | None = TOKEN):
    """huggingface_hub pointed at ``url`` with a private HF_HOME, the token, and plain LFS uploads."""
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_DISABLE_IMPLICIT_TOKEN", "HF_HUB_CACHE",
                "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", home)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    importlib.reload(huggingface_hub.constants)
    try:
        yield
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)


def start_hub(tmp_path, monkeypatch, **kw):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("# a dataset\n")
    stack = contextlib.ExitStack()
    srv = stack.enter_context(HubStandin({"org/ds": {"main": str(repo)}}, token=TOKEN, **kw))
    stack.enter_context(hub_env(monkeypatch, srv.url, str(tmp_path / "hf_home")))
    return srv, stack


@pytest.fixture
def hub(tmp_path, monkeypatch):
    srv, stack = start_hub(tmp_path, monkeypatch)
    with stack:
        yield srv
    assert not srv.unknown  # huggingface_hub called nothing the stand-in lacks


@pytest.fixture
def inputs(tmp_path, llava_json, captions_json, finevision_parquet) -> list[str]:
    """Three schemas, and a record whose image is missing (a reject)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "images/missing.png", "caption": "gone"}) + "\n")
    return [*llava_json.inputs, *captions_json.inputs, *finevision_parquet.inputs, str(bad)]


def pack(inputs: list[str], out: str, *args: str) -> int:
    return pack_main([*inputs, "--output", out, "--workers", "1", *args])


def head_files(hub: HubStandin, sub: str = "packed") -> dict[str, bytes]:
    """The folder's files at the branch's head, by name."""
    folder = os.path.join(hub.repos["org/ds"]["main"], sub)
    if not os.path.isdir(folder):
        return {}
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def local_files(folder: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def commits(hub: HubStandin) -> list:
    return [r for r in hub.requests("hub", "POST", COMMITS) if r.status == 200]


def stream(spec: str) -> list[dict]:
    """Every sample of a manifest through the library's pipeline, without provenance fields."""
    pipe = vs.Pipeline(vs.shards(spec), vs.split_by_node(), vs.split_by_worker(), vs.fetch(), vs.tar_samples())
    return [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"} for s in pipe]


def by_key(samples: list[dict]) -> dict[str, dict]:
    keyed = {s["__key__"]: s for s in samples}
    assert len(keyed) == len(samples), "a sample came back twice"
    return keyed


# ---------------------------------------------------------------------------------------------- packing


def test_pack_to_the_hub_writes_what_a_local_pack_writes_in_one_commit(hub, inputs, tmp_path, capsys):
    local = str(tmp_path / "local")
    assert pack(inputs, local, "--maxcount", "16") == 0
    before = hub.head("org/ds", "main")
    capsys.readouterr()
    assert pack(inputs, OUT, "--maxcount", "16") == 0
    assert capsys.readouterr().out.rstrip().endswith(f"-> {OUT}/index.json")

    want = local_files(local)
    assert head_files(hub) == want  # same names, same bytes: shards, rejects, manifest
    assert json.loads(want["rejects.jsonl"])["source"].endswith("bad.jsonl")
    assert sorted(os.listdir(hub.repos["org/ds"]["main"])) == ["README.md", "packed"]

    assert len(commits(hub)) == 1 and len(hub.pushes) == 1
    push = hub.pushes[0]
    shards = sorted(n for n in want if n.endswith(".tar"))
    assert len(shards) > 5 and push.parent == before and push.oid == hub.head("org/ds", "main")
    assert sorted(push.lfs) == [f"packed/{n}" for n in shards]  # by pre-uploaded object, not in the commit body
    assert sorted(push.added) == [f"packed/{n}" for n in want] and push.deleted == ()
    assert sorted(hub.objects) == sorted(hashlib.sha256(want[n]).hexdigest() for n in shards)
    puts = hub.requests("cdn", "PUT")
    assert len(puts) == len(shards) and all(r.status == 200 and not r.auth for r in puts)  # token stays home
    writes = hub.requests("hub", "POST")
    assert writes and all(r.auth for r in writes)
    assert not [r for r in hub.log if ".pack-staging-" in r.path]

    got = by_key(stream(f"{OUT}/index.json"))
    assert got == by_key(stream(os.path.join(local, "index.json")))  # every sample, byte-identical
    assert len(got) == json.loads(want["index.json"])["samples"]


def test_shards_leave_local_disk_as_they_are_uploaded(hub, inputs, monkeypatch):
    """With uploads slower than the writer, the writer waits: the staging folder holds the shards on their way
    and the one just finished, never more."""
    import time

    seen: list[tuple[str, int]] = []
    real_done, real_upload = hub_module.HubStaging.shard_done, hub_module.HubStaging._upload

    def shard_done(self, path, info):
        folder = os.path.dirname(path)
        seen.append((folder, len([n for n in os.listdir(folder) if n.endswith(".tar")])))
        return real_done(self, path, info)

    def slow_upload(self, path, info):
        time.sleep(0.1)
        return real_upload(self, path, info)

    monkeypatch.setattr(hub_module.HubStaging, "shard_done", shard_done)
    monkeypatch.setattr(hub_module.HubStaging, "_upload", slow_upload)
    assert pack(inputs, OUT, "--maxcount", "8") == 0
    counts = [n for _, n in seen]
    assert len(counts) > 2 * UPLOADS_IN_FLIGHT
    assert max(counts) == UPLOADS_IN_FLIGHT + 1  # reached (the uploads were the slower side), never passed
    assert not os.path.exists(seen[0][0])  # the local staging folder is gone
    assert len(commits(hub)) == 1
    assert len(hub.requests("cdn", "PUT")) == len(counts)


def test_a_shard_the_hub_wants_as_a_regular_file_goes_in_the_commit(inputs, tmp_path, monkeypatch):
    """A repo that does not send .tar to LFS (here: none): the shards stay on disk until the commit holds them."""
    srv, stack = start_hub(tmp_path, monkeypatch, cdn=False)
    with stack:
        local = str(tmp_path / "local")
        assert pack(inputs, local, "--maxcount", "32") == 0
        assert pack(inputs, OUT, "--maxcount", "32") == 0
        assert head_files(srv) == local_files(local)
        assert len(commits(srv)) == 1 and srv.pushes[0].lfs == ()
        assert not srv.requests("cdn") and not srv.objects
        assert not srv.unknown


def test_an_interrupted_pack_leaves_the_repo_as_it_was(hub, inputs, monkeypatch, capsys):
    real_close = writer_module.ShardWriter._close_shard
    closed = []
    staged = []
    real_done = hub_module.HubStaging.shard_done

    def close_shard(self):
        if len(closed) == 3:
            raise OSError("the disk caught fire")
        closed.append(1)
        return real_close(self)

    def shard_done(self, path, info):
        staged.append(os.path.dirname(path))
        return real_done(self, path, info)

    monkeypatch.setattr(writer_module.ShardWriter, "_close_shard", close_shard)
    monkeypatch.setattr(hub_module.HubStaging, "shard_done", shard_done)
    before = hub.head("org/ds", "main")
    assert pack(inputs, OUT, "--maxcount", "8") == 1
    assert "the disk caught fire" in capsys.readouterr().err
    assert hub.head("org/ds", "main") == before and not commits(hub) and not hub.pushes
    assert head_files(hub) == {}  # nothing partial in the repo
    assert 1 <= len(hub.objects) <= 3  # what was uploaded is in no commit: invisible
    assert staged and not os.path.exists(staged[0])  # the local staging folder is gone
    monkeypatch.setattr(writer_module.ShardWriter, "_close_shard", real_close)
    assert pack(inputs, OUT, "--maxcount", "8") == 0  # no leftover to clean, no --overwrite needed
    assert len(commits(hub)) == 1


def test_overwrite_replaces_the_pack_in_one_commit(hub, inputs, tmp_path, capsys):
    assert pack(inputs, OUT, "--maxcount", "16") == 0
    first = head_files(hub)
    first_commit = hub.head("org/ds", "main")
    old_shards = sorted(n for n in first if n.endswith(".tar"))

    capsys.readouterr()
    assert pack(inputs[:2], OUT, "--maxcount", "10") == 1  # not empty, no --overwrite: refused
    err = capsys.readouterr().err
    assert f"{OUT} is not empty" in err and "--overwrite" in err
    assert len(commits(hub)) == 1 and head_files(hub) == first

    local = str(tmp_path / "local")
    assert pack(inputs[:2], local, "--maxcount", "10") == 0
    hub.clear()
    assert pack(inputs[:2], OUT, "--maxcount", "10", "--overwrite") == 0
    assert len(commits(hub)) == 1  # one commit: the new pack in, the old one out
    push = hub.pushes[-1]
    assert push.parent == first_commit
    assert sorted(push.deleted) == [f"packed/{n}" for n in old_shards]  # rejects and index.json: replaced
    assert head_files(hub) == local_files(local)
    assert by_key(stream(f"{OUT}/index.json")) == by_key(stream(os.path.join(local, "index.json")))
    # the old pack stays whole at its own commit, as readers that pinned it see it
    old = stream(f"hf://datasets/org/ds@{first_commit}/packed/index.json")
    assert len(old) == json.loads(first["index.json"])["samples"]


def test_a_non_empty_folder_is_refused_before_anything_is_written(hub, inputs, capsys):
    folder = os.path.join(hub.repos["org/ds"]["main"], "packed")
    os.makedirs(folder)
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("mine\n")
    assert pack(inputs, OUT) == 1
    err = capsys.readouterr().err
    assert f"{OUT} is not empty (notes.txt)" in err
    assert not hub.requests(method="POST") and not hub.requests(method="PUT")
    assert pack(inputs, "hf://datasets/org/ds") == 1  # the repo's root holds README.md
    assert "is not empty (README.md, packed)" in capsys.readouterr().err


def test_jobs_then_merge_stream_every_sample_once(hub, inputs, tmp_path):
    local = str(tmp_path / "local")
    assert pack(inputs, local, "--maxcount", "16") == 0
    want = by_key(stream(os.path.join(local, "index.json")))
    for job in (0, 1):
        assert pack(inputs, OUT, "--maxcount", "16", "--job-index", str(job), "--num-jobs", "2") == 0
    assert len(commits(hub)) == 2
    names = sorted(head_files(hub))
    assert "index.j0000.json" in names and "index.j0001.json" in names and "index.json" not in names
    assert pack_main(["merge", f"{OUT}/index.j*.json", "--output", f"{OUT}/index.json"]) == 0
    assert len(commits(hub)) == 3  # the merged manifest; nothing older to remove
    assert by_key(stream(f"{OUT}/index.json")) == want

    # job 0 again, otherwise: its old shards stay while index.json names them; the next merge removes them
    old0 = sorted(n for n in head_files(hub) if n.startswith("shard-j0000-"))
    assert pack(inputs, OUT, "--maxcount", "7", "--job-index", "0", "--num-jobs", "2", "--overwrite") == 0
    assert set(old0) <= set(head_files(hub))
    assert by_key(stream(f"{OUT}/index.json")) == want  # readers of index.json are untouched
    assert pack_main(["merge", f"{OUT}/index.j*.json", "--output", f"{OUT}/index.json"]) == 0
    assert len(commits(hub)) == 6  # job 0, the manifest, then one commit removing what it no longer names
    assert sorted(hub.pushes[-1].deleted) == [f"packed/{n}" for n in old0]
    assert not set(old0) & set(head_files(hub))
    assert by_key(stream(f"{OUT}/index.json")) == want


# ---------------------------------------------------------------------------------------------- the stand-in


def test_standin_write_api_wants_the_token_and_refuses_what_the_hub_refuses(hub, tmp_path):
    import urllib.error
    import urllib.request

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError

    api = HfApi()

    def post(url: str, body: bytes, method: str = "POST", auth: bool = True) -> int:
        headers = {"Authorization": f"Bearer {TOKEN}"} if auth else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, body, headers, method=method)) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    with pytest.raises(HfHubHTTPError, match="401"):
        api.preupload_lfs_files("org/ds", [CommitOperationAdd("a.tar", b"x" * 10)], repo_type="dataset", token=False)
    with pytest.raises(HfHubHTTPError, match="401"):
        api.create_commit("org/ds", [CommitOperationAdd("a.txt", b"x")], commit_message="m", repo_type="dataset",
                          token=False)
    batch = json.dumps({"operation": "upload", "objects": [{"oid": "0" * 64, "size": 1}]}).encode()
    assert post(f"{hub.url}/datasets/org/ds.git/info/lfs/objects/batch", batch, auth=False) == 401
    assert post(f"{hub.url}/datasets/org/ds.git/info/lfs/objects/verify", b"{}", auth=False) == 401
    oid = hashlib.sha256(b"data").hexdigest()
    assert post(f"{hub.cdn_url}/upload/{oid}?X-Amz-Signature=forged", b"data", "PUT") == 403
    href = json.loads(urllib.request.urlopen(urllib.request.Request(  # the URL the batch answer gives
        f"{hub.url}/datasets/org/ds.git/info/lfs/objects/batch",
        json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": 4}]}).encode(),
        {"Authorization": f"Bearer {TOKEN}"})).read())["objects"][0]["actions"]["upload"]["href"]
    assert post(href, b"other", "PUT", auth=False) == 400 and oid not in hub.objects  # not the object's bytes
    assert post(href, b"data", "PUT", auth=False) == 200 and oid in hub.objects
    assert not hub.pushes

    never = CommitOperationAdd("never.tar", b"never uploaded")
    never._upload_mode, never._is_uploaded, never._should_ignore = "lfs", True, False
    with pytest.raises(HfHubHTTPError, match="never uploaded"):
        api.create_commit("org/ds", [never], commit_message="m", repo_type="dataset")
    with pytest.raises(RemoteEntryNotFoundError):
        api.create_commit("org/ds", [CommitOperationDelete("missing.txt")], commit_message="m", repo_type="dataset")
    stale = hub.head("org/ds", "main")
    api.create_commit("org/ds", [CommitOperationAdd("a.txt", b"a")], commit_message="m", repo_type="dataset",
                      parent_commit=stale)
    with pytest.raises(HfHubHTTPError, match="412"):
        api.create_commit("org/ds", [CommitOperationAdd("b.txt", b"b")], commit_message="m", repo_type="dataset",
                          parent_commit=stale)
    assert [p.added for p in hub.pushes] == [("a.txt",)] and hub.pushes[0].parent == stale
    hub.clear()  # the 404s of refused paths are on purpose


# ---------------------------------------------------------------------------------------------- the folder


def test_folder_names_read_and_remove(hub):
    folder = open_folder(f"{OUT}/", hf_token=TOKEN)
    assert folder.location == OUT and folder.where("index.json") == f"{OUT}/index.json"
    assert not folder.exists() and folder.names() == [] and folder.read("index.json") is None
    folder.remove(["index.json"])  # nothing there: no commit
    assert not commits(hub)
    root = open_folder("hf://datasets/org/ds", hf_token=TOKEN)
    assert root.names() == ["README.md"] and root.read("README.md") == b"# a dataset\n"
    root.remove(["README.md", "missing.txt"])
    assert [p.deleted for p in hub.pushes] == [("README.md",)]
    assert root.names() == [] and root.read("README.md") is None
    for bad in ("hf://datasets/org", "hf://models/org/m/x", f"hf://datasets/org/ds@{'a' * 40}/x"):
        with pytest.raises(OSError, match="hf://"):
            open_folder(bad)


def test_the_token_never_shows(hub, inputs, tmp_path, monkeypatch, capfd, caplog):
    wrong = "hf_wrong" + "TOKEN"  # not written out, so that no line of this file shows it either
    library = logging.getLogger("huggingface_hub")  # its debug lines too, into caplog (not its own handler)
    monkeypatch.setattr(library, "handlers", [])
    monkeypatch.setattr(library, "level", logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    assert pack(inputs, OUT, "--maxcount", "16") == 0
    folder = open_folder(OUT, hf_token=TOKEN)
    staging = folder.stage(None)
    texts = [repr(folder), repr(staging)]
    staging.discard()
    assert pack_main(["merge", f"{OUT}/index.json", "--output", f"{OUT}/index.json"]) == 0

    monkeypatch.setenv("HF_TOKEN", wrong)  # the Hub refuses: the messages name the repo, not the token
    assert pack(inputs, f"{OUT}2") == 1
    with pytest.raises(OSError) as e:
        open_folder(OUT, hf_token=wrong).remove(["index.json"])
    texts += [str(e.value), repr(e.value)]
    out = capfd.readouterr()
    texts += [out.out, out.err, caplog.text, *(str(r.__dict__) for r in caplog.records), repr(hub.log)]
    assert "401" in out.err and "authenticated: True" in caplog.text
    assert not [t for t in texts if TOKEN in t or wrong in t]
    hub.clear()  # the refused requests are on purpose
