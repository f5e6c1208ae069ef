"""The packer (vlmstream/dataset/build.py, behind `vlmstream pack` and tools/pack_shards.py) end to end on easy-VQA
and its pure maths (shuffle permutation, job partition) apart from any I/O."""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

import vlmstream as vs
from conftest import SCHEMA_CASES, TOOLS, Case, FullDisk, check_manifest, read_pack, run_pack, shard_bytes
from servers import Fault, FaultPlan, fault_server
from vlm_data import CaptionSample, img2dataset_samples, write_img2dataset_shards
from vlmstream.dataset.build import Positions, job_of, job_positions, shuffled_position, shuffled_positions
from vlmstream.dataset.format import ShardInfo, conversation_from_sample, pack_id, read_manifest, write_manifest

TOOL = os.path.join(TOOLS, "pack_shards.py")


# ----------------------------------------------------------------------------------------- the pure maths


@given(st.integers(0, 3000), st.integers(0, 2**70))
@settings(max_examples=60, deadline=None)
def test_shuffle_is_a_permutation(total, seed):
    positions = shuffled_positions(range(total), total, seed)
    assert sorted(positions.tolist()) == list(range(total))


def test_shuffle_depends_on_the_seed_only_and_is_pinned():
    a = shuffled_positions(range(1000), 1000, 0).tolist()
    assert a == shuffled_positions(range(1000), 1000, 0).tolist()
    assert a != shuffled_positions(range(1000), 1000, 1).tolist()
    assert a != list(range(1000))
    # One index at a time agrees with a whole range (the packer computes positions a block at a time).
    assert [shuffled_position(i, 1000, 0) for i in (0, 17, 999)] == [a[0], a[17], a[999]]
    # The permutation decides which machine packs what: it must never change between versions.
    assert shuffled_positions(range(8), 10, 42).tolist() == PINNED_10_42


PINNED_10_42 = [0, 3, 8, 6, 9, 4, 1, 5]


def test_shuffle_mixes_well_enough():
    """Neighbours in the input land far apart: no long runs of consecutive positions."""
    p = shuffled_positions(range(10000), 10000, 7)
    runs = sum(1 for x, y in zip(p, p[1:]) if y == x + 1)
    assert runs < 20
    assert abs(int(p[:5000].mean()) - 5000) < 300  # the first half of the input spreads over the whole output


def test_positions_blocks_agree_with_the_function():
    total = Positions.BLOCK * 2 + 5
    pos = Positions(total, seed=3)
    for i in (0, 1, Positions.BLOCK - 1, Positions.BLOCK, total - 1):
        assert pos(i) == shuffled_position(i, total, 3)
    assert Positions(total, None)(1234) == 1234


@given(st.integers(0, 500), st.integers(1, 12))
def test_each_position_goes_to_exactly_one_job(total, num_jobs):
    shares = [job_positions(j, num_jobs, total) for j in range(num_jobs)]
    assert [p for s in shares for p in s] == list(range(total))  # disjoint, contiguous, complete, in order
    for j, share in enumerate(shares):
        assert all(job_of(p, total, num_jobs) == j for p in share)
        assert len(share) in (total // num_jobs, -(-total // num_jobs))  # near-equal


def test_job_positions_rejects_bad_jobs():
    with pytest.raises(ValueError):
        job_positions(3, 3, 10)


# ------------------------------------------------------------------------------------ every input schema


def check_samples(samples: list[dict], case: Case, indices: list[int] | None = None) -> None:
    """Field by field against the original records: keys, turns, image bytes and names, meta."""
    indices = list(range(len(case.expected))) if indices is None else indices
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in indices]
    for s, i in zip(samples, indices):
        exp = case.expected[i]
        doc = json.loads(s["json"])
        assert doc["messages"] == exp.messages
        assert doc["images"] == [f"{n}.png" for n in range(len(exp.images))]  # sniffed: easy-VQA is PNG
        assert [s[name] for name in doc["images"]] == exp.images  # the original bytes, unchanged
        assert set(s) - {"__key__", "__url__", "__local_path__"} == {"json", *doc["images"]}
        meta = {"source": case.inputs[0], "position": i, **exp.fields}  # every case is one input
        if case.jsonl:
            meta["line"] = i + 1
        assert doc["meta"] == meta
        assert conversation_from_sample(s).messages == exp.messages  # our own reader agrees


@pytest.mark.parametrize("name", SCHEMA_CASES)
def test_pack_each_schema(name, request, tmp_path):
    case: Case = request.getfixturevalue(name)
    out = str(tmp_path / "out")
    assert run_pack(case.inputs, out, *case.args, "--maxcount", "25") == 0
    samples = read_pack(out)
    check_samples(samples, case)
    doc = check_manifest(out)
    n = len(case.expected)
    assert doc["samples"] == n and doc["num_shards"] == -(-n // 25)
    assert [s["samples"] for s in doc["shards"]] == [25] * (n // 25) + ([n % 25] if n % 25 else [])
    assert doc["packing"]["rejects"] == 0
    assert open(os.path.join(out, "rejects.jsonl")).read() == ""


def test_several_inputs_number_records_in_the_order_given(llava_jsonl, finevision_parquet, tmp_path):
    out = str(tmp_path / "out")
    assert run_pack(llava_jsonl.inputs + finevision_parquet.inputs, out) == 0
    samples = read_pack(out)
    n1 = len(llava_jsonl.expected)
    assert len(samples) == n1 + len(finevision_parquet.expected)
    assert samples[n1]["__key__"] == f"{n1:09d}"
    meta = json.loads(samples[n1]["json"])["meta"]
    assert (meta["source"], meta["position"]) == (finevision_parquet.inputs[0], 0)
    assert json.loads(samples[n1]["json"])["messages"] == finevision_parquet.expected[0].messages


def test_gnu_tar_lists_the_members_webdataset_reads(llava_jsonl, tmp_path):
    """Through the real command line, once: GNU tar reads the shards and sees the same members in order."""
    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, TOOL, *llava_jsonl.inputs, "--output", out, "--maxcount", "40"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "61 samples, 2 shards" in proc.stdout and "0 rejects" in proc.stdout
    listed = []
    for s in check_manifest(out)["shards"]:
        tar = subprocess.run(["tar", "-tvf", os.path.join(out, s["url"])], capture_output=True, text=True, check=True)
        assert tar.stderr == ""
        for line in tar.stdout.splitlines():
            mode, owner, *_, name = line.split()
            assert (mode, owner) == ("-rw-r--r--", "0/0")
            listed.append(name)
    expected = [f"{s['__key__']}.{ext}" for s in read_pack(out) for ext in ["json", *json.loads(s["json"])["images"]]]
    assert listed == expected


# --------------------------------------------------------------------------------------------- determinism


def test_two_runs_and_any_worker_count_give_identical_bytes(llava_jsonl, finevision_parquet, tmp_path):
    inputs = llava_jsonl.inputs + finevision_parquet.inputs
    runs = []
    for n, workers in enumerate(["1", "1", "2"]):
        out = str(tmp_path / f"out{n}")
        assert run_pack(inputs, out, "--maxcount", "30", "--workers", workers) == 0
        runs.append(shard_bytes(out))
    assert runs[0] == runs[1] == runs[2]
    assert len(runs[0]) == 5 + 2  # 121 samples in shards of 30, index.json, rejects.jsonl


# ------------------------------------------------------------------------------------------------- shuffle


def _keys_and_json(samples):
    return {s["__key__"]: (s["json"], s["0.png"]) for s in samples}


def test_shuffle_permutes_across_many_shards(finevision_json, tmp_path):
    plain = str(tmp_path / "plain")
    run_pack(finevision_json.inputs, plain)
    packs = {}
    for name, seed, bucket in [("a", 1, 7), ("b", 1, 1024), ("c", 2, 7)]:
        out = str(tmp_path / name)
        assert run_pack(finevision_json.inputs, out, "--shuffle", "--seed", str(seed), "--maxcount", "4",
                        "--bucket-size", str(bucket)) == 0
        doc = check_manifest(out)
        assert doc["num_shards"] == 15 and doc["packing"]["shuffle_seed"] == seed
        packs[name] = read_pack(out)
        assert not [f for f in os.listdir(out) if f.startswith(".pack-tmp")]  # temporary buckets removed
    reference = _keys_and_json(read_pack(plain))
    for samples in packs.values():
        assert _keys_and_json(samples) == reference  # the same samples, keys and bytes
    order = {name: [s["__key__"] for s in samples] for name, samples in packs.items()}
    assert order["a"] == order["b"]  # the bucket size bounds memory, it does not change the output
    assert order["a"] != order["c"] and order["a"] != sorted(order["a"])
    n = len(finevision_json.expected)
    assert [int(k) for k in order["a"]] == sorted(range(n), key=lambda i: shuffled_position(i, n, 1))


def test_shuffle_is_byte_identical_across_runs_and_workers(finevision_parquet, tmp_path):
    runs = []
    for n, workers in enumerate(["1", "2"]):
        out = str(tmp_path / f"out{n}")
        run_pack(finevision_parquet.inputs, out, "--shuffle", "--seed", "5", "--maxcount", "8", "--bucket-size", "5",
                 "--workers", workers)
        runs.append(shard_bytes(out))
    assert runs[0] == runs[1]


# ---------------------------------------------------------------------------------------------------- jobs


@pytest.mark.parametrize("shuffle", [[], ["--shuffle", "--seed", "3"]], ids=["ordered", "shuffled"])
def test_jobs_partition_and_merge(llava_jsonl, shuffle, tmp_path):
    out = str(tmp_path / "out")
    inputs = llava_jsonl.inputs
    for j in range(3):
        assert run_pack(inputs, out, *shuffle, "--maxcount", "8", "--job-index", str(j), "--num-jobs", "3") == 0
    keys = []
    for j in range(3):
        check_manifest(out, f"index.j{j:04d}.json")
        part = [s["__key__"] for s in read_pack(out, f"index.j{j:04d}.json")]
        assert all(f"-j{j:04d}-" in s["__url__"] for s in read_pack(out, f"index.j{j:04d}.json"))
        assert len(part) in (20, 21)
        keys.append(part)
    assert sorted(k for part in keys for k in part) == [f"{i:09d}" for i in range(61)]  # disjoint, complete
    assert sorted(os.listdir(out)) == sorted(
        [f"index.j{j:04d}.json" for j in range(3)] + [f"rejects.j{j:04d}.jsonl" for j in range(3)]
        + [f"shard-j{j:04d}-{job_pack_id(out, j)}-{n:06d}.tar" for j in range(3) for n in range(3)]
    )
    manifests = [os.path.join(out, f"index.j{j:04d}.json") for j in range(3)]
    assert run_pack_merge(manifests, os.path.join(out, "index.json")) == 0
    doc = check_manifest(out)
    assert doc["samples"] == 61 and doc["num_shards"] == 9
    merged = read_pack(out)
    assert [s["__key__"] for s in merged] == [k for part in keys for k in part]
    if not shuffle:  # without shuffle the jobs' parts follow each other: the merged pack is the plain one
        check_samples(merged, llava_jsonl)


def job_pack_id(out, job):
    """The pack id in job ``job``'s shard names: a digest of its shards' sha256s."""
    return pack_id(read_manifest(os.path.join(out, f"index.j{job:04d}.json"))[1])


def run_pack_merge(manifests, output):
    from pack_shards import main

    return main(["merge", *manifests, "--output", output])


def test_merging_a_manifest_twice_is_an_error(llava_json, tmp_path, capsys):
    out = str(tmp_path / "out")
    run_pack(llava_json.inputs, out, "--job-index", "0", "--num-jobs", "2")
    m = os.path.join(out, "index.j0000.json")
    assert run_pack_merge([m, m], os.path.join(out, "index.json")) == 1
    assert "already listed" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "index.json"))


def test_merge_command_line(llava_json, tmp_path):
    out = str(tmp_path / "out")
    for j in range(2):
        run_pack(llava_json.inputs, out, "--job-index", str(j), "--num-jobs", "2")
    proc = subprocess.run([sys.executable, TOOL, "merge", os.path.join(out, "index.j0000.json"),
                           os.path.join(out, "index.j0001.json"), "--output", os.path.join(out, "index.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    check_samples(read_pack(out), llava_json)


# --------------------------------------------------------------------------------------- shard boundaries


def test_maxsize_closes_shards_before_they_grow_past_it(llava_jsonl, tmp_path):
    out = str(tmp_path / "out")
    maxsize = 20 * 1024
    assert run_pack(llava_jsonl.inputs, out, "--maxsize", str(maxsize)) == 0
    doc = check_manifest(out)
    assert doc["num_shards"] > 5
    assert all(s["bytes"] <= maxsize for s in doc["shards"])
    check_samples(read_pack(out), llava_jsonl)


def test_a_sample_larger_than_maxsize_gets_a_shard_of_its_own(llava_jsonl, tmp_path):
    out = str(tmp_path / "out")
    assert run_pack(llava_jsonl.inputs, out, "--maxsize", "1000", "--prefix", "tiny") == 0
    doc = check_manifest(out)
    assert [s["samples"] for s in doc["shards"]] == [1] * 61
    pack = pack_id(read_manifest(os.path.join(out, "index.json"))[1])
    assert [s["url"] for s in doc["shards"]] == [f"tiny-{pack}-{n:06d}.tar" for n in range(61)]


def test_max_side_reencodes_larger_images_only(vqa, data_dir, tmp_path):
    from PIL import Image

    big = tmp_path / "big.png"
    rgba = tmp_path / "rgba.png"
    Image.open(vqa.paths[vqa.ids[0]]).convert("RGB").resize((300, 150)).save(big)
    Image.new("RGBA", (90, 200), (255, 0, 0, 128)).save(rgba)
    records = [{"image": str(p), "caption": "x"} for p in (big, rgba)]
    records.append({"image": f"images/{vqa.ids[1]}.png", "caption": "small"})
    src = os.path.join(data_dir, "max_side.json")
    with open(src, "w") as f:
        json.dump(records, f)
    out = str(tmp_path / "out")
    # big.png and rgba.png lie outside the input's folder, the default image root
    assert run_pack([src], out, "--max-side", "64", "--jpeg-quality", "80", "--allow-outside-root") == 0
    samples = read_pack(out)
    assert [json.loads(s["json"])["images"] for s in samples] == [["0.jpg"], ["0.png"], ["0.png"]]
    for s, size in zip(samples, [(64, 32), (29, 64), (64, 64)]):
        ext = json.loads(s["json"])["images"][0]
        assert Image.open(__import__("io").BytesIO(s[ext])).size == size
    assert Image.open(__import__("io").BytesIO(samples[1]["0.png"])).mode == "RGBA"
    assert samples[2]["0.png"] == vqa.png[vqa.ids[1]]  # 64 px: not larger than --max-side, kept as it was


# -------------------------------------------------------------------------------------------------- rejects


@pytest.fixture
def bad_jsonl(vqa, data_dir):
    good = lambda i: {"image": f"images/{i}.png", "conversations": [  # noqa: E731
        {"from": "human", "value": "<image>\nwhat shape?"}, {"from": "gpt", "value": "circle"}]}
    lines = [
        json.dumps(good(vqa.ids[0])),
        json.dumps({**good(vqa.ids[1]), "image": "images/missing.png"}),
        "{not json",
        "",  # a blank line is not a record
        json.dumps({**good(vqa.ids[2]), "conversations": [{"from": "human", "value": "<image><image> two?"},
                                                          {"from": "gpt", "value": "no"}]}),
        json.dumps({"image": f"images/{vqa.ids[3]}.png", "conversations": []}),
        json.dumps({**good(vqa.ids[4]), "conversations": [{"from": "human", "value": "<image> hi"}]}),
        json.dumps(good(vqa.ids[5])),
    ]
    path = os.path.join(data_dir, "bad.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_bad_records_are_rejected_with_position_and_reason(bad_jsonl, tmp_path):
    out = str(tmp_path / "out")
    assert run_pack([bad_jsonl], out) == 0
    assert [s["__key__"] for s in read_pack(out)] == ["000000000", "000000006"]
    with open(os.path.join(out, "rejects.jsonl")) as f:
        rejects = [json.loads(line) for line in f]
    assert [(r["source"], r["position"], r["line"], r["index"]) for r in rejects] == [
        (bad_jsonl, 1, 2, 1), (bad_jsonl, 2, 3, 2), (bad_jsonl, 3, 5, 3), (bad_jsonl, 4, 6, 4), (bad_jsonl, 5, 7, 5)]
    reasons = [r["reason"] for r in rejects]
    assert reasons[0].startswith("missing image") and reasons[0].endswith("images/missing.png")
    assert reasons[1].startswith("invalid JSON")
    assert reasons[2] == "2 <image> placeholders but 1 images"
    assert reasons[3] == "empty conversation"
    assert reasons[4] == "no assistant answer"
    assert check_manifest(out)["packing"]["rejects"] == 5


def test_empty_captions_are_rejects_named_empty_caption(vqa, data_dir, tmp_path, capsys):
    """Caption records and image-folder captions that are empty or blank (img2dataset writes an empty .txt for a
    missing caption) are rejects with the reason empty_caption, counted apart in the summary."""
    path = tmp_path / "captions.jsonl"
    captions = ["a circle", "", " \n", "blue"]
    path.write_text("".join(json.dumps({"image": f"images/{i}.png", "caption": c}) + "\n"
                            for i, c in zip(vqa.ids, captions)))
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, caption in (("a", ""), ("b", "green")):
        shutil.copyfile(vqa.paths[vqa.ids[0]], folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption)
    out = str(tmp_path / "out")
    assert run_pack([str(path), str(folder)], out, "--image-root", data_dir) == 0
    assert "3 rejects (3 empty captions)" in capsys.readouterr().out
    assert [json.loads(s["json"])["messages"][1]["content"] for s in read_pack(out)] == ["a circle", "blue", "green"]
    with open(os.path.join(out, "rejects.jsonl")) as f:
        rejects = [json.loads(line) for line in f]
    assert [(r["source"], r["position"], r["index"], r["reason"]) for r in rejects] == [
        (str(path), 1, 1, "empty_caption"), (str(path), 2, 2, "empty_caption"), (str(folder), 0, 4, "empty_caption")]
    packing = check_manifest(out)["packing"]
    assert (packing["rejects"], packing["empty_captions"]) == (3, 3)


def _at_most_2_gib():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.mark.skipif(sys.platform != "linux", reason="FIFOs, /dev/zero and RLIMIT_AS as on Linux")
def test_image_paths_the_packer_must_not_read_are_rejects(vqa, tmp_path):
    """Records naming /dev/zero, a FIFO, a folder, a file too large, or a file outside the image root (by ../,
    an absolute path or a symlink) are rejected with the reason, in bounded time and memory (the tool runs
    as a command under a 2 GiB address-space limit); --allow-outside-root reads the outside files only."""
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (root / "images").mkdir(parents=True)
    elsewhere.mkdir()
    png = vqa.png[vqa.ids[0]]
    (root / "images" / "good.png").write_bytes(png)
    (elsewhere / "secret.png").write_bytes(png)
    os.symlink(elsewhere / "secret.png", root / "images" / "link.png")
    os.mkfifo(root / "images" / "pipe.png")
    (root / "images" / "big.png").write_bytes(png + bytes(len(png)))  # past --max-image-bytes, decodable
    paths = ["images/good.png", "/dev/zero", "../" * 30 + "dev/zero", "images/pipe.png", "../elsewhere/secret.png",
             "images/link.png", "images/big.png", "images", "images/nul\0.png"]
    src = root / "records.jsonl"
    src.write_text("".join(json.dumps({"image": p, "caption": f"record {n}"}) + "\n" for n, p in enumerate(paths)))

    def pack(out, *more):
        cmd = [sys.executable, TOOL, str(src), "--output", str(tmp_path / out), "--workers", "1",
               "--max-image-bytes", str(len(png) + 10), *more]
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # no address space per core
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=_at_most_2_gib, env=env)

    def reasons(out):
        with open(tmp_path / out / "rejects.jsonl") as f:
            rejects = [json.loads(line) for line in f]
        assert all(r["source"] == str(src) and r["line"] == r["position"] + 1 for r in rejects)
        return {r["position"]: r["reason"] for r in rejects}

    real = os.path.realpath(root)
    outside = f"outside the image root {real}"
    not_regular = "is not a regular file but a "
    expected = {1: outside, 2: outside, 3: not_regular + "FIFO", 4: outside, 5: outside,
                6: f"is {2 * len(png)} bytes, more than the {len(png) + 10} bytes allowed", 7: not_regular + "folder",
                8: "bad image path"}
    proc = pack("confined")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert [s["__key__"] for s in read_pack(str(tmp_path / "confined"))] == ["000000000"]
    got = reasons("confined")
    assert sorted(got) == sorted(expected) and all(expected[p] in got[p] for p in got), got

    proc = pack("anywhere", "--allow-outside-root")
    assert proc.returncode == 0, proc.stderr
    samples = read_pack(str(tmp_path / "anywhere"))
    assert [s["__key__"] for s in samples] == ["000000000", "000000004", "000000005"]
    assert all(s["0.png"] == png for s in samples)
    expected.update({1: not_regular + "character device", 2: not_regular + "character device"})
    got = reasons("anywhere")
    assert sorted(got) == [1, 2, 3, 6, 7, 8] and all(expected[p] in got[p] for p in got), got

    proc = pack("strict", "--strict")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"--strict: bad record in {src} at position 1 (line 2): image /dev/zero is {outside}" in proc.stderr


def test_strict_stops_naming_the_record(bad_jsonl, tmp_path):
    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, TOOL, bad_jsonl, "--output", out, "--strict", "--workers", "1"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"{bad_jsonl} at position 1 (line 2)" in proc.stderr and "missing image" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(out, "index.json"))


def test_strict_with_workers_stops_them_and_keeps_no_partial_shard(bad_jsonl, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert run_pack([bad_jsonl], out, "--strict", "--workers", "2") == 1
    assert f"{bad_jsonl} at position 1 (line 2)" in capsys.readouterr().err
    assert os.listdir(out) == []  # the unfinished shard is dropped, no manifest, no file of the failed run


def test_an_input_of_unknown_schema_is_a_clear_error(data_dir, tmp_path, capsys):
    path = os.path.join(data_dir, "unknown.jsonl")
    with open(path, "w") as f:
        f.write('{"question": "q", "answer": "a"}\n')
    assert run_pack([path], str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert path in err and "--format" in err and "question" in err


def test_bad_utf8_in_a_json_array_is_an_error_naming_the_file_and_byte(data_dir, tmp_path, capsys):
    """A JSON array is parsed whole before packing (to count it): a byte that is not UTF-8 stops the tool
    through its error path, naming the file and where the byte is; JSONL rejects the line alone."""
    record = lambda caption: json.dumps({"image": "images/missing.png", "caption": caption})  # noqa: E731
    head = ("[\n" + record("first") + ",\n").encode() + b'{"image": "x.png", "caption": "'
    path = os.path.join(data_dir, "bad_utf8.json")
    with open(path, "wb") as f:
        f.write(head + b'caf\xe9"}\n]\n')  # Latin-1, not UTF-8
    out = str(tmp_path / "out")
    assert run_pack([path], out) == 1
    err = capsys.readouterr().err
    assert err == (f"pack_shards: error: {path}: invalid UTF-8 at line 3, byte {len(head) + 3}: "
                   "invalid continuation byte\n")
    assert not os.path.exists(os.path.join(out, "index.json"))
    jsonl = os.path.join(data_dir, "bad_utf8.jsonl")
    with open(jsonl, "wb") as f:
        f.write(record("first").encode() + b"\n" + b'{"image": "x.png", "caption": "caf\xe9"}\n')
    assert run_pack([jsonl], out) == 0
    with open(os.path.join(out, "rejects.jsonl")) as f:
        rejects = [json.loads(line) for line in f]
    assert [(r["position"], r["line"]) for r in rejects] == [(0, 1), (1, 2)]
    assert rejects[0]["reason"].startswith("missing image")
    assert rejects[1]["reason"].startswith("invalid UTF-8:") and "0xe9" in rejects[1]["reason"]


def test_bad_arguments_exit_with_usage(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_pack(["x.json"], str(tmp_path), "--shuffle")
    assert e.value.code == 2 and "--seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_pack(["x.json"], str(tmp_path), "--job-index", "3", "--num-jobs", "3")


def test_buckets_give_back_every_sample_in_position_order(tmp_path, monkeypatch):
    import random

    from vlmstream.dataset import build

    monkeypatch.setattr(build, "BUCKET_FLUSH_BYTES", 50)  # spill often: several appends per bucket
    positions = list(range(100, 300))
    random.Random(0).shuffle(positions)
    buckets = build.Buckets(str(tmp_path), start=100, span=16)
    for p in positions:
        buckets.add(p, f"sample {p}".encode() * (p % 5))
    assert list(buckets.sorted_samples(200)) == [f"sample {p}".encode() * (p % 5) for p in range(100, 300)]
    assert os.listdir(tmp_path) == []


def _die(records, **options):
    os._exit(1)  # as the kernel's OOM killer would end a worker


@pytest.mark.skipif(sys.platform != "linux", reason="the patched worker reaches forked workers only")
def test_a_dead_worker_is_an_error_not_a_hang(llava_json, tmp_path, monkeypatch, capsys):
    from vlmstream.dataset import build

    monkeypatch.setattr(build, "convert_batch", _die)
    assert run_pack(llava_json.inputs, str(tmp_path / "out"), "--workers", "2") == 1
    assert "worker process died" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- the output folder


def tar_names(out):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "*.tar")))


def manifest_shards(out, manifest="index.json"):
    with open(os.path.join(out, manifest)) as f:
        return sorted(s["url"] for s in json.load(f)["shards"])


def test_a_folder_holding_anything_needs_overwrite_and_then_holds_the_new_pack_only(llava_jsonl, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert run_pack(llava_jsonl.inputs, out, "--maxcount", "10") == 0
    old = shard_bytes(out)
    assert run_pack(llava_jsonl.inputs, out, "--maxcount", "7") == 1
    err = capsys.readouterr().err
    assert f"pack_shards: error: {out} is not empty (index.json, rejects.jsonl, shard-" in err and "--overwrite" in err
    assert shard_bytes(out) == old  # refused before writing anything
    other = str(tmp_path / "other")
    os.makedirs(other)
    open(os.path.join(other, "NOTES.md"), "w").close()
    assert run_pack(llava_jsonl.inputs, other) == 1 and "is not empty (NOTES.md)" in capsys.readouterr().err

    # Leftovers of killed runs and other packs' files: all go, but a file no pack writes stays.
    leftovers = {".pack-staging-x1y2z3/shard-000000.tar": b"x", ".pack-staging-j0001-abc/x.tar": b"x",
                 ".pack-tmp-abc/bucket-00000000.bin": b"x", "shard-000003.tar.tmp": b"x", "index.json.tmp4242": b"{",
                 "index.j0001.json": b"{}", "rejects.j0001.jsonl": b"", "shard-j0001-000000.tar": b"x",
                 "old-000000.tar": b"x", "NOTES.md": b"keep"}
    for name, data in leftovers.items():
        os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    assert run_pack(llava_jsonl.inputs, out, "--maxcount", "7", "--overwrite") == 0
    doc = check_manifest(out)
    assert doc["num_shards"] == 9 and tar_names(out) == manifest_shards(out)  # the glob lists the new pack only
    assert sorted(os.listdir(out)) == sorted(["index.json", "rejects.jsonl", "NOTES.md", *manifest_shards(out)])
    check_samples(read_pack(out), llava_jsonl)

    # The same inputs and options over an older pack give the bytes and names of a pack into an empty folder.
    fresh = str(tmp_path / "fresh")
    assert run_pack(llava_jsonl.inputs, fresh, "--maxcount", "10") == 0
    assert run_pack(llava_jsonl.inputs, out, "--maxcount", "10", "--overwrite") == 0
    assert shard_bytes(out) == {**shard_bytes(fresh), "NOTES.md": b"keep"}
    assert run_pack(llava_jsonl.inputs, out, "--maxcount", "10", "--overwrite") == 0  # again: the same names
    assert shard_bytes(out) == {**shard_bytes(fresh), "NOTES.md": b"keep"}


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run_of_its_kind(llava_jsonl, tmp_path, capsys):
    out = str(tmp_path / "out")
    for name in (".pack-staging-abc123", ".pack-staging-j0000-abc123", ".pack-staging-j0001-abc123"):
        os.makedirs(os.path.join(out, name))
        open(os.path.join(out, name, "shard-000000.tar.tmp"), "w").close()
    job = ["--job-index", "0", "--num-jobs", "2"]
    assert run_pack(llava_jsonl.inputs, out, *job) == 0  # job 0's leftover goes, job 1's may be a live run's
    assert sorted(n for n in os.listdir(out) if n.startswith(".")) == [".pack-staging-abc123",
                                                                        ".pack-staging-j0001-abc123"]
    shutil.rmtree(out)
    os.makedirs(os.path.join(out, ".pack-staging-abc123"))
    assert run_pack(llava_jsonl.inputs, out) == 0  # a killed single-job run's folder: not in the way
    assert sorted(os.listdir(out)) == sorted(["index.json", "rejects.jsonl", *manifest_shards(out)])
    shutil.rmtree(out)
    os.makedirs(os.path.join(out, ".pack-staging-j0001-abc123"))
    assert run_pack(llava_jsonl.inputs, out) == 1  # a job's: it may be running
    assert "is not empty (.pack-staging-j0001-abc123)" in capsys.readouterr().err


# Runs the tool, stopping it for good (to be killed) right after the rename that reaches the point named.
KILLED_AT = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
import pack_shards

out, point, marker = os.path.abspath(sys.argv[2]), sys.argv[3], sys.argv[4]
rename, shards = os.replace, []

def replace(src, dst):
    rename(src, dst)
    folder, name = os.path.split(os.path.abspath(dst))
    shards.extend([name] if name.endswith(".tar") else [])
    if {"writing": len(shards) == 2,  # a second shard is complete
            "publishing": folder == out and name.endswith(".tar"),  # a first one is in the output folder
            "switched": folder == out and name == "index.json"}[point]:
        open(marker, "w").close()
        time.sleep(600)

os.replace = replace
sys.exit(pack_shards.main(sys.argv[5:]))
"""


@pytest.mark.parametrize("point", ["writing", "publishing", "switched"])
def test_a_pack_killed_at_any_point_leaves_a_whole_dataset_and_the_next_run_cleans_up(llava_jsonl, tmp_path, point):
    out = str(tmp_path / "out")
    assert run_pack(llava_jsonl.inputs, out, "--maxcount", "10") == 0
    old = shard_bytes(out)
    marker = tmp_path / "reached"
    cmd = [sys.executable, "-c", KILLED_AT, TOOLS, out, point, str(marker), *llava_jsonl.inputs, "--output", out,
           "--overwrite", "--maxcount", "7", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"the pack ended before the point '{point}': {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the pack never reached the point"
            time.sleep(0.02)
    finally:
        proc.kill()  # SIGKILL: no cleanup of any kind runs
        proc.wait()
        proc.stderr.close()
    doc = check_manifest(out)  # every shard index.json names is there, with its bytes: the old pack or the new
    if point == "switched":
        assert doc["num_shards"] == 9
    else:
        assert all(shard_bytes(out)[name] == data for name, data in old.items())  # the old pack, untouched
    if point == "writing":
        assert [n for n in os.listdir(out) if n.startswith(".pack-staging-")]  # what the killed run left
    assert run_pack(llava_jsonl.inputs, out, "--maxcount", "7", "--overwrite") == 0
    assert sorted(os.listdir(out)) == sorted(["index.json", "rejects.jsonl", *manifest_shards(out)])
    assert check_manifest(out)["num_shards"] == 9 and tar_names(out) == manifest_shards(out)


@pytest.mark.parametrize("full_in", ["shards", "manifest"])
@pytest.mark.parametrize("old_pack", [False, True], ids=["empty", "old-pack"])
def test_a_full_disk_leaves_the_folder_as_it_was(llava_jsonl, tmp_path, monkeypatch, capsys, full_in, old_pack):
    from vlmstream.dataset import build, output, format as F, writer as W

    def disk(room):
        d = FullDisk(room)
        for module in (build, output, F, W):
            monkeypatch.setattr(module, "open", d.open, raising=False)
        return d

    out = str(tmp_path / "out")
    more = ["--overwrite"] if old_pack else []
    if old_pack:
        assert run_pack(llava_jsonl.inputs, out, "--maxcount", "10") == 0
    before = shard_bytes(out) if old_pack else {}
    probe = disk(1 << 40)
    assert run_pack(llava_jsonl.inputs, str(tmp_path / "probe"), "--maxcount", "7") == 0
    written = (1 << 40) - probe.room  # the manifest is written last, and takes more than 50 bytes
    full = disk(written // 2 if full_in == "shards" else written - 50)
    assert run_pack(llava_jsonl.inputs, out, "--maxcount", "7", *more) == 1
    assert full.room == 0 and "No space left on device" in capsys.readouterr().err
    assert shard_bytes(out) == before  # no partial file, no temporary file, no staging folder
    if old_pack:
        check_manifest(out)


def test_ctrl_c_leaves_the_folder_as_it_was(llava_jsonl, tmp_path, monkeypatch, capsys):
    from vlmstream.dataset.writer import ShardWriter

    out = str(tmp_path / "out")
    assert run_pack(llava_jsonl.inputs, out, "--maxcount", "10") == 0
    before = shard_bytes(out)
    real, calls = ShardWriter.write_encoded, []

    def interrupted(self, data):
        calls.append(1)
        if len(calls) == 30:
            raise KeyboardInterrupt
        real(self, data)

    monkeypatch.setattr(ShardWriter, "write_encoded", interrupted)
    try:
        code = run_pack(llava_jsonl.inputs, out, "--maxcount", "7", "--overwrite")
    except KeyboardInterrupt:  # would stop the whole test session
        pytest.fail("the KeyboardInterrupt went through the tool's main()")
    assert code == 130
    assert capsys.readouterr().err == "pack_shards: interrupted\n"
    assert shard_bytes(out) == before


def test_jobs_share_the_folder_and_each_replaces_only_its_own_part(llava_jsonl, tmp_path, capsys):
    out = str(tmp_path / "out")
    manifests = [os.path.join(out, f"index.j{j:04d}.json") for j in range(2)]

    def job(j, *more):
        return run_pack(llava_jsonl.inputs, out, "--job-index", str(j), "--num-jobs", "2", *more)

    assert job(0, "--maxcount", "8") == 0 and job(1, "--maxcount", "8") == 0  # job 1 starts beside job 0's files
    assert run_pack_merge(manifests, os.path.join(out, "index.json")) == 0
    first = shard_bytes(out)
    assert job(0, "--maxcount", "5") == 1  # job 0 of an earlier pack is there
    assert "holds index.j0000.json of an earlier pack" in capsys.readouterr().err and shard_bytes(out) == first
    # What a job run killed while publishing leaves: shards no manifest names.
    for j in range(2):
        with open(os.path.join(out, f"shard-j{j:04d}-deadbeef-000000.tar"), "wb") as f:
            f.write(b"stale")
    assert job(0, "--maxcount", "5", "--overwrite") == 0
    now = shard_bytes(out)
    assert "shard-j0000-deadbeef-000000.tar" not in now  # job 0's stale shard went
    assert all(now[name] == data for name, data in first.items() if name != "index.j0000.json")  # job 1's part,
    check_manifest(out)  # and every shard of the merged pack readers use, stays until the next merge
    check_manifest(out, "index.j0000.json")
    assert job(1, "--maxcount", "5", "--overwrite") == 0
    assert "shard-j0001-deadbeef-000000.tar" not in os.listdir(out)
    new = manifest_shards(out, "index.j0000.json") + manifest_shards(out, "index.j0001.json")
    assert tar_names(out) == sorted(manifest_shards(out) + new)  # the merged pack's, and the jobs' new ones
    assert run_pack_merge(manifests, os.path.join(out, "index.json")) == 0
    check_manifest(out)
    assert tar_names(out) == manifest_shards(out) == sorted(new)  # merge removed the old ones
    assert sorted(os.listdir(out)) == sorted(["index.json", *map(os.path.basename, manifests), "rejects.j0000.jsonl",
                                              "rejects.j0001.jsonl", *manifest_shards(out)])
    check_samples(read_pack(out), llava_jsonl)


def test_jobs_over_a_single_job_pack_replace_it_at_the_merge(llava_jsonl, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert run_pack(llava_jsonl.inputs, out, "--maxcount", "10") == 0
    old = manifest_shards(out)
    job = ["--job-index", "0", "--num-jobs", "2"]
    assert run_pack(llava_jsonl.inputs, out, *job) == 1 and "holds index.json" in capsys.readouterr().err
    for j in range(2):
        job[1] = str(j)
        assert run_pack(llava_jsonl.inputs, out, *job, "--overwrite") == 0
    assert tar_names(out) == sorted(old + manifest_shards(out, "index.j0000.json")
                                    + manifest_shards(out, "index.j0001.json"))
    assert check_manifest(out)["num_shards"] == len(old)  # the old pack, still whole until the merge
    manifests = [os.path.join(out, f"index.j{j:04d}.json") for j in range(2)]
    assert run_pack_merge(manifests, os.path.join(out, "index.json")) == 0
    assert tar_names(out) == manifest_shards(out) and not set(old) & set(manifest_shards(out))
    assert "rejects.jsonl" not in os.listdir(out)  # the single-job pack's, gone with it
    check_samples(read_pack(out), llava_jsonl)


def test_vlmstream_pack_and_the_tool_write_the_same_bytes(llava_json, tmp_path):
    from vlmstream.cli.main import main as vlmstream_main

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_pack(llava_json.inputs, a, "--maxcount", "7", "--shuffle", "--seed", "3") == 0
    assert vlmstream_main(["pack", *llava_json.inputs, "--output", b, "--maxcount", "7", "--shuffle", "--seed", "3",
                           "--workers", "1"]) == 0
    assert shard_bytes(a) == shard_bytes(b) and len(shard_bytes(a)) > 3


# ------------------------------------------------------------------------------------ webdataset inputs


def stream(index: str) -> list[dict]:
    """A pack's samples as a training job reads them: vs.shards(index.json) -> fetch -> tar_samples -> decode,
    images left as bytes, json decoded."""
    pipe = vs.Pipeline(vs.shards(index, shuffle=False), vs.fetch(), vs.tar_samples(), vs.decode(None))
    return list(pipe)


def expected_captions(shards: list[tuple[str, list[CaptionSample]]]) -> list[tuple[int, str, int, CaptionSample]]:
    """(global index, shard as given, position in it, sample) of every non-empty caption, in input order."""
    out, index = [], 0
    for source, samples in shards:
        for position, s in enumerate(samples):
            if s.caption.strip():
                out.append((index, source, position, s))
            index += 1
    return out


def check_captions(samples: list[dict], shards: list[tuple[str, list[CaptionSample]]]) -> None:
    """Every non-empty caption arrives, keyed by its global index, with its exact image bytes and img2dataset's
    metadata (its json's fields; the caption itself only once, in the conversation)."""
    expected = expected_captions(shards)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i, _, _, _ in expected]
    for got, (_, source, position, s) in zip(samples, expected):
        doc = got["json"]
        assert doc["messages"] == [{"role": "user", "content": "<image>"},
                                   {"role": "assistant", "content": s.caption.strip()}]
        assert doc["images"] == ["0.jpg"] and got["0.jpg"] == s.jpg
        meta = {k: v for k, v in s.meta.items() if k != "caption"}
        assert doc["meta"] == {"source": source, "position": position, "tar_key": s.key, **meta}
        assert set(got) - {"__key__", "__url__", "__offset__", "__index__", "__local_path__"} == {"json", "0.jpg"}


def check_empty_caption_rejects(out: str, shards: list[tuple[str, list[CaptionSample]]]) -> None:
    with open(os.path.join(out, "rejects.jsonl")) as f:
        rejects = [json.loads(line) for line in f]
    want, index = [], 0
    for source, samples in shards:
        for position, s in enumerate(samples):
            if not s.caption.strip():
                want.append({"source": source, "position": position, "tar_key": s.key, "index": index,
                             "reason": "empty_caption"})
            index += 1
    assert rejects == want
    packing = check_manifest(out)["packing"]
    assert packing["rejects"] == packing["empty_captions"] == len(want)


@pytest.fixture(scope="module")
def laion(tmp_path_factory) -> tuple[str, list[tuple[str, list[CaptionSample]]]]:
    """img2dataset-shaped shards, written with tarfile: laion/0000{0,1,2}.tar, 10 + 10 + 4 samples."""
    root = tmp_path_factory.mktemp("laion")
    samples = img2dataset_samples(24)
    paths = write_img2dataset_shards(str(root), samples, per_shard=10)
    return str(root), [(p, samples[k * 10:(k + 1) * 10]) for k, p in enumerate(paths)]


def test_img2dataset_shards_pack_by_brace_pattern_and_stream_back(laion, tmp_path, capsys):
    root, shards = laion
    out = str(tmp_path / "out")
    assert run_pack([f"{root}/{{00000..00002}}.tar"], out, "--maxcount", "6") == 0
    empty = sum(not s.caption.strip() for _, ss in shards for s in ss)
    assert f"7 rejects ({empty} empty captions)" in capsys.readouterr().out and empty == 7
    check_captions(stream(os.path.join(out, "index.json")), shards)
    check_empty_caption_rejects(out, shards)
    packing = check_manifest(out)["packing"]
    assert packing["inputs"] == [{"path": p, "format": "webdataset", "records": len(ss)} for p, ss in shards]
    assert packing["records"] == 24
    # the same bytes each run, whatever the worker count, and from the shards named one by one (a shell's braces)
    again = str(tmp_path / "again")
    assert run_pack([p for p, _ in shards], again, "--maxcount", "6", "--workers", "3") == 0
    assert shard_bytes(again) == shard_bytes(out)
    # images are converted as any input's: --max-side re-encodes the 64 px JPEGs at 32 px
    from PIL import Image

    small = str(tmp_path / "small")
    assert run_pack([f"{root}/{{00000..00002}}.tar"], small, "--max-side", "32") == 0
    for s, (_, _, _, want) in zip(stream(os.path.join(small, "index.json")), expected_captions(shards)):
        with Image.open(io.BytesIO(s["0.jpg"])) as im, Image.open(io.BytesIO(want.jpg)) as orig:
            assert (im.format, im.size, orig.size) == ("JPEG", (32, 32), (64, 64))


def test_webdataset_shardwriter_shards_tar_gz_and_tgz(vqa, tmp_path):
    """Shards written by webdataset's own ShardWriter and TarWriter (gzip too) and a .tgz: every caption sample
    with all its images in tar order, the json's fields in meta, a conversation sample taken as it is, and the
    members that are neither images, caption nor json (.cls, .npy) left out."""
    import numpy as np
    import webdataset as wds

    pngs = [vqa.png[i] for i in vqa.ids]
    conversation = {"messages": [{"role": "user", "content": "<image>\nwhat shape?"},
                                 {"role": "assistant", "content": "circle"}],
                    "images": ["0.png"], "meta": {"source": "easy-vqa.json", "position": 3, "id": 7}}

    def sample(n: int) -> dict:
        if n == 5:
            return {"__key__": f"s{n:04d}", "json": conversation, "0.png": pngs[n]}
        s = {"__key__": f"s{n:04d}", "png": pngs[n], "txt": f"caption {n}", "json": {"id": n, "caption": "other"},
             "cls": n % 3, "npy": np.arange(3)}
        if n % 4 == 1:
            s["seg.jpg"] = pngs[n + 1]  # a second image member (PNG bytes: the packer names them by their format)
        return s

    with wds.ShardWriter(str(tmp_path / "wds-%06d.tar"), maxcount=7, verbose=0) as w:
        for n in range(12):
            w.write(sample(n))
    with wds.TarWriter(str(tmp_path / "extra.tar.gz")) as w:
        for n in range(12, 15):
            w.write(sample(n))
    with wds.TarWriter(str(tmp_path / "plain.tar")) as w:
        for n in range(15, 18):
            w.write(sample(n))
    with open(tmp_path / "plain.tar", "rb") as f, gzip.open(tmp_path / "last.tgz", "wb") as g:
        g.write(f.read())
    inputs = [str(tmp_path / "wds-{000000..000001}.tar"), str(tmp_path / "extra.tar.gz"), str(tmp_path / "last.tgz")]
    out = str(tmp_path / "out")
    assert run_pack(inputs, out) == 0
    got = stream(os.path.join(out, "index.json"))
    assert [s["__key__"] for s in got] == [f"{n:09d}" for n in range(18)]
    sources = [str(tmp_path / "wds-000000.tar")] * 7 + [str(tmp_path / "wds-000001.tar")] * 5 + \
        [str(tmp_path / "extra.tar.gz")] * 3 + [inputs[2]] * 3
    positions = list(range(7)) + list(range(5)) + list(range(3)) * 2
    for n, s in enumerate(got):
        doc, where = s["json"], {"source": sources[n], "position": positions[n], "tar_key": f"s{n:04d}"}
        if n == 5:
            assert doc["messages"] == conversation["messages"] and s["0.png"] == pngs[5]
            assert doc["meta"] == {**where, "record_source": "easy-vqa.json", "record_position": 3, "id": 7}
            continue
        images = [pngs[n], pngs[n + 1]] if n % 4 == 1 else [pngs[n]]
        assert doc["messages"] == [{"role": "user", "content": "<image>" * len(images)},
                                   {"role": "assistant", "content": f"caption {n}"}]
        assert doc["images"] == [f"{k}.png" for k in range(len(images))]
        assert [s[e] for e in doc["images"]] == images
        assert doc["meta"] == {**where, "id": n, "caption": "other"}  # a json caption unlike the txt: kept
        assert not {"cls", "npy"} & set(s)
    assert open(os.path.join(out, "rejects.jsonl")).read() == ""


def test_a_pack_repacks_from_its_manifest_and_a_manifest_spares_the_count(laion, tmp_path, monkeypatch):
    """Our own pack's index.json as input: each conversation taken as it is (its meta kept, its provenance
    renamed record_*); the manifest's counts are the shards' counts, so --shuffle and jobs read no shard twice."""
    import vlmstream.dataset.build as build

    root, shards = laion
    first = str(tmp_path / "first")
    assert run_pack([f"{root}/0000*.tar"], first, "--maxcount", "5") == 0
    packed = stream(os.path.join(first, "index.json"))
    monkeypatch.setattr(build, "count_records", lambda inp: pytest.fail(f"{inp.path} counted by reading"))
    again = str(tmp_path / "again")
    assert run_pack([os.path.join(first, "index.json")], again, "--shuffle", "--seed", "1") == 0
    repacked = {s["__key__"]: s for s in stream(os.path.join(again, "index.json"))}
    assert len(repacked) == len(packed) and check_manifest(again)["packing"]["rejects"] == 0
    doc = check_manifest(first)
    urls = [os.path.join(first, s["url"]) for s in doc["shards"] for _ in range(s["samples"])]
    for index, s in enumerate(packed):
        r = repacked[f"{index:09d}"]
        assert r["json"]["messages"] == s["json"]["messages"] and r["0.jpg"] == s["0.jpg"]
        old = s["json"]["meta"]
        assert r["json"]["meta"] == {
            "source": urls[index], "position": index % 5, "tar_key": s["__key__"], "record_source": old["source"],
            "record_position": old["position"], "record_tar_key": old["tar_key"],
            **{k: v for k, v in old.items() if k not in ("source", "position", "tar_key")}}


def test_shuffle_and_jobs_count_the_shards_first_and_read_each_shard_once_more(laion, tmp_path):
    """Without a manifest, --shuffle and --num-jobs read each shard once to count it, then pack; the jobs' union
    is the single pack, and the shuffle permutes the same samples."""
    root, shards = laion
    spec = f"{root}/{{00000..00002}}.tar"
    single = str(tmp_path / "single")
    assert run_pack([spec], single) == 0
    by_key = {s["__key__"]: s for s in read_pack(single)}
    shuffled = str(tmp_path / "shuffled")
    assert run_pack([spec], shuffled, "--shuffle", "--seed", "5", "--maxcount", "4") == 0
    got = read_pack(shuffled)
    assert sorted(s["__key__"] for s in got) == sorted(by_key) and [s["__key__"] for s in got] != sorted(by_key)
    assert all(s["json"] == by_key[s["__key__"]]["json"] and s["0.jpg"] == by_key[s["__key__"]]["0.jpg"] for s in got)
    jobs = str(tmp_path / "jobs")
    for j in range(3):
        assert run_pack([spec], jobs, "--job-index", str(j), "--num-jobs", "3") == 0
    assert run_pack_merge(sorted(glob.glob(os.path.join(jobs, "index.j*.json"))), os.path.join(jobs, "index.json")) == 0
    assert [(s["__key__"], s["json"]) for s in read_pack(jobs)] == [(k, s["json"]) for k, s in by_key.items()]


def test_webdataset_shards_over_http_are_fetched_once_each(laion, tmp_path):
    """Shards over HTTP, by brace pattern and by manifest, through the reading stack's retries: a connection
    reset mid-shard is resumed; a plain pack GETs each shard once, --shuffle twice (counting first)."""
    root, shards = laion
    served = tmp_path / "www"
    shutil.copytree(root, served / "laion")
    plan = FaultPlan({("/laion/00001.tar", 0): Fault(cut_at=5000)})
    with fault_server(str(served), plan) as (url, _):
        out = str(tmp_path / "out")
        assert run_pack([f"{url}/laion/{{00000..00002}}.tar"], out, "--maxcount", "8") == 0
        remote = [(f"{url}/laion/{os.path.basename(p)}", ss) for p, ss in shards]
        check_captions(stream(os.path.join(out, "index.json")), remote)
        check_empty_caption_rejects(out, remote)
        gets = Counter(path for path, _, status in plan.log if status in (200, 206))
        assert gets == {"/laion/00000.tar": 1, "/laion/00001.tar": 2, "/laion/00002.tar": 1}  # 2: the resume
        # the pack served back: its manifest as input, over HTTP
        shutil.copytree(out, served / "pack")
        plan.log.clear()
        again = str(tmp_path / "again")
        assert run_pack([f"{url}/pack/index.json"], again, "--shuffle", "--seed", "0") == 0
        assert sorted(s["__key__"] for s in read_pack(again)) == [f"{i:09d}" for i in range(17)]  # numbered anew
        assert all(n == 1 for path, n in Counter(p for p, _, _ in plan.log).items() if path.endswith(".tar"))
        plan.log.clear()
        counted = str(tmp_path / "counted")
        assert run_pack([f"{url}/laion/{{00000..00002}}.tar"], counted, "--shuffle", "--seed", "0") == 0
        assert Counter(p for p, _, _ in plan.log) == {f"/laion/0000{k}.tar": 2 for k in range(3)}


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def test_bad_webdataset_samples_are_rejects_with_the_reason(vqa, tmp_path, capsys):
    """Each bad sample is a reject naming its shard, position, key and reason; a shard that breaks gives its
    samples before the break and one reject for the rest; packing goes on with the next shard."""
    png = vqa.png[vqa.ids[0]]
    conv = lambda images, answer=True: json.dumps({  # noqa: E731
        "messages": [{"role": "user", "content": "<image>" * len(images)}] + (
            [{"role": "assistant", "content": "a circle"}] if answer else []), "images": images}).encode()
    bad = write_tar(tmp_path / "bad.tar", [
        ("k0.png", png), ("k0.txt", b"good"),
        ("k1.png", png), ("k1.PNG", png), ("k1.txt", b"two images of one extension"),
        ("k2.txt", b"no image"),
        ("k3.png", png), ("k3.json", b'{"url": "https://example.com/3.png"}'),
        ("k4.png", png), ("k4.json", b"{oops"), ("k4.txt", b"bad json"),
        ("k5.png", b"not an image"), ("k5.txt", b"corrupt image"),
        ("k6.png", png), ("k6.txt", b"\xffcaption"),
        ("k7.0.png", png), ("k7.json", conv(["0.png"], answer=False)),
        ("k8.0.png", png), ("k8.json", conv(["0.png", "1.png"])),
        ("k9.png", png), ("k9.json", b'{"caption": null}'),
        ("k10.png", png), ("k10.json", b'{"caption": "from the json", "id": 10}'),
        ("k11.png", png), ("k11.cls", b"3"), ("k11.txt", b"good too"),
    ])
    whole = write_tar(tmp_path / "whole.tar", [(f"t{n}.{ext}", data) for n in range(6)
                                                for ext, data in (("png", png), ("txt", f"caption {n}".encode()))])
    with open(whole, "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:6144 + 512 + 100])  # into t3.png's data: t0 at 0, t1.png at 2048, ... 1 KiB a member
    last = write_tar(tmp_path / "last.tar", [("z0.png", png), ("z0.txt", b"after the broken shard")])
    out = str(tmp_path / "out")
    assert run_pack([bad, str(cut), last], out) == 0
    with open(os.path.join(out, "rejects.jsonl")) as f:
        rejects = [json.loads(line) for line in f]
    reasons = {(r["source"], r["position"]): r["reason"] for r in rejects}
    assert [r.get("tar_key") for r in rejects if r["source"] == bad] == [f"k{n}" for n in range(1, 10)]
    assert "extension 'png' is a duplicate in the sample" in reasons[bad, 1]
    assert reasons[bad, 2] == "no image member (members: ['txt'])"
    assert reasons[bad, 3] == "no caption: neither a txt member nor a json caption (members: ['json', 'png'])"
    assert reasons[bad, 4].startswith("invalid json member")
    assert reasons[bad, 5].startswith("unreadable image")
    assert reasons[bad, 6].startswith("txt member is not UTF-8")
    assert reasons[bad, 7] == "no assistant answer"  # a conversation without an answer stays an error
    assert reasons[bad, 8] == "image members ['1.png'] referenced but not in the sample"
    assert reasons[bad, 9] == "empty_caption"  # a null json caption, no txt
    broken = [r for r in rejects if r["source"] == str(cut)]
    assert len(broken) == 1 and "tar_key" not in broken[0]
    assert broken[0]["reason"].startswith(f"the rest of the shard is unreadable: {cut}: offset ")
    assert "truncated" in broken[0]["reason"]
    kept = broken[0]["position"]  # the samples before the break
    assert 1 <= kept < 6
    samples = read_pack(out)
    texts = [json.loads(s["json"])["messages"][-1]["content"] for s in samples]
    assert texts == ["good", "from the json", "good too", *[f"caption {n}" for n in range(kept)],
                     "after the broken shard"]
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in (0, 10, 11, *range(12, 12 + kept),
                                                                       12 + kept + 1)]
    assert json.loads(samples[1]["json"])["meta"]["id"] == 10
    assert "rejects" in capsys.readouterr().out
    # --strict stops at the first, naming it
    assert run_pack([bad], str(tmp_path / "strict"), "--strict") == 1
    assert f"--strict: bad record in {bad} at position 1" in capsys.readouterr().err


def test_webdataset_inputs_that_cannot_be_packed_are_clear_errors(laion, tmp_path, capsys):
    root, shards = laion
    out = str(tmp_path / "out")
    assert run_pack([f"{root}/{{00000..00003}}.tar"], out) == 1  # no 00003.tar
    assert f"{root}/00003.tar: no such file" in capsys.readouterr().err
    assert run_pack([shards[0][0]], out, "--format", "caption") == 1  # a tar is not JSON records
    assert "a tar file (webdataset shards), but --format caption" in capsys.readouterr().err
    odd = tmp_path / "shard.bin"
    shutil.copyfile(shards[0][0], odd)
    assert run_pack([str(tmp_path / "*.bin")], out, "--format", "wds") == 0  # named, any name is a shard
    assert check_manifest(out)["packing"]["inputs"] == [{"path": str(odd), "format": "webdataset", "records": 10}]
    assert run_pack([f"{root}/nothing-*.tar"], str(tmp_path / "none")) == 1
    assert "no shards found" in capsys.readouterr().err
    # a shard that does not match its manifest's count: the later keys would be wrong, so the pack stops
    manifest = tmp_path / "m" / "index.json"
    manifest.parent.mkdir()
    write_manifest(str(manifest), [ShardInfo(shards[0][0], 9, 1, "0" * 64), ShardInfo(shards[1][0], 10, 1, "0" * 64)])
    assert run_pack([str(manifest)], str(tmp_path / "m" / "out")) == 1
    assert f"{shards[0][0]}: 10 samples, but 9 when it was counted" in capsys.readouterr().err
