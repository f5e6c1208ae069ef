"""Shared fixtures: a small easy-VQA subset, written in every input schema the packer reads.

Each schema fixture returns a ``Case``: the input paths, the extra command-line arguments it needs and, record by
record, what packing it must give (turns, image bytes, meta fields), computed here independently of the packer.
Helpers at the bottom run the tool in-process and read its output back with webdataset, the interop reference.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)

import pack_shards  # noqa: E402  (tools/pack_shards.py)

N_IMAGES = 60
QUESTIONS_PER_IMAGE = 3  # easy-VQA has 2 to 21 per image: 60 images give about 180 questions
IMG = "<image>"


@dataclass
class Vqa:
    """The subset: image ids in order, their PNG paths and bytes, their (question, answer) pairs."""

    ids: list[int]
    paths: dict[int, str]
    qas: dict[int, list[tuple[str, str]]]
    png: dict[int, bytes]


@dataclass
class Expected:
    messages: list[dict[str, str]]
    images: list[bytes]
    fields: dict[str, Any] = field(default_factory=dict)  # the record's own fields, expected in meta


@dataclass
class Case:
    inputs: list[str]
    expected: list[Expected]  # one per record, in record order (over all inputs)
    args: list[str] = field(default_factory=list)
    jsonl: bool = False  # meta carries line numbers


@pytest.fixture(scope="session")
def vqa() -> Vqa:
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    qas: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in zip(questions, answers, image_ids):
        if i in qas or len(qas) < N_IMAGES:
            if len(qas.setdefault(i, [])) < QUESTIONS_PER_IMAGE:
                qas[i].append((q, a))
    ids = list(qas)
    png = {}
    for i in ids:
        with open(paths[i], "rb") as f:
            png[i] = f.read()
    return Vqa(ids, {i: paths[i] for i in ids}, qas, png)


@pytest.fixture(scope="session")
def data_dir(vqa: Vqa, tmp_path_factory) -> str:
    """A folder with the subset's images under images/ID.png; inputs written here resolve paths against it."""
    root = str(tmp_path_factory.mktemp("inputs"))
    os.makedirs(os.path.join(root, "images"))
    for i in vqa.ids:
        shutil.copyfile(vqa.paths[i], os.path.join(root, "images", f"{i}.png"))
    return root


def _qa_turns(qas: list[tuple[str, str]], first_prefix: str) -> list[dict[str, str]]:
    turns = []
    for t, (q, a) in enumerate(qas):
        user = (first_prefix if t == 0 else "") + q
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": a}]
    return turns


def _write_json(path: str, records: list[Any], jsonl: bool) -> str:
    with open(path, "w") as f:
        if jsonl:
            f.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, f, indent=1)
    return path


def _llava(vqa: Vqa, data_dir: str, name: str, jsonl: bool) -> Case:
    """One record per image, its questions as successive turns; a system prompt on some, one text-only record."""
    records, expected = [], []
    for n, i in enumerate(vqa.ids):
        conv = [{"from": "human" if t["role"] == "user" else "gpt", "value": t["content"]}
                for t in _qa_turns(vqa.qas[i], IMG + "\n")]
        messages = _qa_turns(vqa.qas[i], IMG + "\n")
        if n % 10 == 0:
            conv.insert(0, {"from": "system", "value": "Answer in one word."})
            messages.insert(0, {"role": "system", "content": "Answer in one word."})
        records.append({"id": f"easyvqa-{i}", "image": f"images/{i}.png", "conversations": conv})
        expected.append(Expected(messages, [vqa.png[i]], {"id": f"easyvqa-{i}"}))
    text_only = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    conv = [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]
    records.append({"id": "text-only", "conversations": conv})
    expected.append(Expected(text_only, [], {"id": "text-only"}))
    return Case([_write_json(os.path.join(data_dir, name), records, jsonl)], expected, jsonl=jsonl)


@pytest.fixture(scope="session")
def llava_json(vqa: Vqa, data_dir: str) -> Case:
    return _llava(vqa, data_dir, "llava.json", jsonl=False)


@pytest.fixture(scope="session")
def llava_jsonl(vqa: Vqa, data_dir: str) -> Case:
    return _llava(vqa, data_dir, "llava.jsonl", jsonl=True)


@pytest.fixture(scope="session")
def sharegpt_json(vqa: Vqa, data_dir: str) -> Case:
    """ShareGPT with image paths relative to --image-root (easy-VQA's own folder); pairs of images, one per
    question, so that placeholders in different turns must map to images in order."""
    root = os.path.dirname(vqa.paths[vqa.ids[0]])
    records, expected = [], []
    for a, b in zip(vqa.ids[0::2], vqa.ids[1::2]):
        (qa, aa), (qb, ab) = vqa.qas[a][0], vqa.qas[b][0]
        messages = [
            {"role": "user", "content": f"{IMG} {qa}"}, {"role": "assistant", "content": aa},
            {"role": "user", "content": f"And here? {IMG} {qb}"}, {"role": "assistant", "content": ab},
        ]
        records.append({"messages": messages, "images": [f"{a}.png", f"{b}.png"], "source": "easy-vqa"})
        expected.append(Expected(messages, [vqa.png[a], vqa.png[b]], {"record_source": "easy-vqa"}))
    path = _write_json(os.path.join(data_dir, "sharegpt.json"), records, jsonl=False)
    return Case([path], expected, args=["--image-root", root])


@pytest.fixture(scope="session")
def finevision_json(vqa: Vqa, data_dir: str) -> Case:
    records, expected = [], []
    for i in vqa.ids:
        texts = [{"user": q, "assistant": a} for q, a in vqa.qas[i]]
        records.append({"images": [f"images/{i}.png"], "texts": texts, "id": i})
        expected.append(Expected(_qa_turns(vqa.qas[i], IMG), [vqa.png[i]], {"id": i}))
    return Case([_write_json(os.path.join(data_dir, "finevision.json"), records, jsonl=False)], expected)


def _caption(vqa: Vqa, i: int) -> str:
    return " ".join(a for _, a in vqa.qas[i])


@pytest.fixture(scope="session")
def captions_json(vqa: Vqa, data_dir: str) -> Case:
    records = [{"image": f"images/{i}.png", "caption": _caption(vqa, i) + "\n"} for i in vqa.ids]
    expected = [Expected([{"role": "user", "content": IMG}, {"role": "assistant", "content": _caption(vqa, i)}],
                         [vqa.png[i]]) for i in vqa.ids]
    return Case([_write_json(os.path.join(data_dir, "captions.jsonl"), records, jsonl=True)], expected, jsonl=True)


@pytest.fixture(scope="session")
def image_folder(vqa: Vqa, tmp_path_factory) -> Case:
    """img2dataset-like folder: a.png + a.txt, walked in sorted order (names sort as strings)."""
    root = str(tmp_path_factory.mktemp("folder"))
    for i in vqa.ids:
        shutil.copyfile(vqa.paths[i], os.path.join(root, f"{i}.png"))
        with open(os.path.join(root, f"{i}.txt"), "w") as f:
            f.write(_caption(vqa, i))
    order = sorted(vqa.ids, key=lambda i: f"{i}.png")
    expected = [Expected([{"role": "user", "content": IMG}, {"role": "assistant", "content": _caption(vqa, i)}],
                         [vqa.png[i]], {"file": f"{i}.png"}) for i in order]
    return Case([root], expected)


@pytest.fixture(scope="session")
def finevision_parquet(vqa: Vqa, data_dir: str) -> Case:
    """FineVision Parquet with embedded image bytes, small row groups so reading goes batch by batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"images": [], "texts": [], "source": [], "id": []}
    expected = []
    for i in vqa.ids:
        rows["images"].append([{"bytes": vqa.png[i], "path": f"{i}.png"}])
        rows["texts"].append([{"user": q, "assistant": a} for q, a in vqa.qas[i]])
        rows["source"].append("easy-vqa")
        rows["id"].append(i)
        expected.append(Expected(_qa_turns(vqa.qas[i], IMG), [vqa.png[i]], {"record_source": "easy-vqa", "id": i}))
    path = os.path.join(data_dir, "finevision.parquet")
    pq.write_table(pa.table(rows), path, row_group_size=16)
    return Case([path], expected)


SCHEMA_CASES = ["llava_json", "llava_jsonl", "sharegpt_json", "finevision_json", "captions_json", "image_folder",
                "finevision_parquet"]


# ------------------------------------------------------------------------------------------------ helpers


def run_pack(inputs: list[str], out: str, *args: str) -> int:
    """The tool's main() in-process, one worker unless the caller says otherwise."""
    argv = [*inputs, "--output", out, *args]
    if "--workers" not in args:
        argv += ["--workers", "1"]
    return pack_shards.main(argv)


def read_pack(out: str, manifest: str = "index.json") -> list[dict[str, Any]]:
    """All samples of a pack, in manifest order, read by webdataset (not by our code)."""
    import webdataset as wds

    with open(os.path.join(out, manifest)) as f:
        doc = json.load(f)
    urls = [os.path.join(out, s["url"]) for s in doc["shards"]]
    if not urls:
        return []
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def check_manifest(out: str, manifest: str = "index.json") -> dict[str, Any]:
    """Recompute every shard's size and sha256, and the totals, against the manifest."""
    with open(os.path.join(out, manifest)) as f:
        doc = json.load(f)
    for s in doc["shards"]:
        with open(os.path.join(out, s["url"]), "rb") as f:
            data = f.read()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (s["bytes"], s["sha256"]), s["url"]
    assert doc["samples"] == sum(s["samples"] for s in doc["shards"])
    assert doc["bytes"] == sum(s["bytes"] for s in doc["shards"])
    assert doc["num_shards"] == len(doc["shards"])
    return doc


def shard_bytes(out: str) -> dict[str, bytes | None]:
    """Every file a pack wrote, by name: for byte-for-byte comparisons of two packs (a folder, such as one a
    killed run left, is there too, as None)."""
    out_files: dict[str, bytes | None] = {}
    for name in sorted(os.listdir(out)):
        if os.path.isdir(os.path.join(out, name)):
            out_files[name] = None
            continue
        with open(os.path.join(out, name), "rb") as f:
            out_files[name] = f.read()
    return out_files


class FullDisk:
    """A disk with room for ``room`` more bytes, for a module's ``open`` (``monkeypatch.setattr(module, "open",
    disk.open, raising=False)``): files opened there to write fail with ENOSPC once it is full, after writing
    what fits, as on a real disk; reading goes to the real ``open``."""

    def __init__(self, room: int) -> None:
        self.room = room

    def open(self, path, mode="r", buffering=-1, encoding=None, errors=None, newline=None):
        if not any(c in mode for c in "wax+"):
            return open(path, mode, buffering, encoding, errors, newline)
        raw = _FullDiskFile(self, path, mode.replace("b", "").replace("t", ""))
        buffered = io.BufferedWriter(raw)
        return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding or "utf-8", errors, newline)


class _FullDiskFile(io.FileIO):
    def __init__(self, disk: FullDisk, path, mode: str) -> None:
        super().__init__(path, mode)
        self.disk = disk

    def write(self, data) -> int:
        if len(data) and not self.disk.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        written = super().write(memoryview(data)[: self.disk.room])
        self.disk.room -= written
        return written


# The object-store emulators (moto, Azurite, fake-gcs-server) as session fixtures: tests/stores.py.
from stores import azure_server, gcs_server, s3_server  # noqa: E402,F401
