"""vlmstream.records: input schemas -> records -> sample members, without writing any tar."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys

import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from conftest import SCHEMA_CASES, Case
from vlmstream.dataset import records as R
from vlmstream.dataset.format import ShardInfo, manifest_json, write_manifest
from vlmstream.errors import FormatError


def _png(size=(8, 8), mode="RGB", **save) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, "PNG", **save)
    return out.getvalue()


def _jpeg(size=(8, 8), exif=None) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, "JPEG", **({"exif": exif} if exif else {}))
    return out.getvalue()


# ------------------------------------------------------------------------------------------ the schemas


@pytest.mark.parametrize("keys, schema", [
    ({"id", "image", "conversations"}, "llava"),
    ({"conversations"}, "llava"),
    ({"messages", "images"}, "sharegpt"),
    ({"messages"}, "sharegpt"),
    ({"conversations", "images"}, "sharegpt"),
    ({"images", "texts", "source"}, "finevision"),
    ({"image", "caption"}, "caption"),
    ({"question", "answer"}, None),
])
def test_schema_of(keys, schema):
    assert R.schema_of(dict.fromkeys(keys)) == schema


def test_llava_roles_and_images():
    rec = {"id": "1", "image": "a.jpg", "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>\nWhat?"},
        {"from": "gpt", "value": "A cat."}]}
    messages, images, used = R.parse_record(rec, "llava")
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat?"},
                        {"role": "assistant", "content": "A cat."}]
    assert images == ["a.jpg"] and "id" not in used
    assert R.parse_record({**rec, "image": ["a.jpg", "b.png"]}, "llava")[1] == ["a.jpg", "b.png"]
    assert R.parse_record({k: v for k, v in rec.items() if k != "image"}, "llava")[1] == []
    with pytest.raises(FormatError, match="unknown role 'bot'"):
        R.parse_record({"conversations": [{"from": "bot", "value": "x"}]}, "llava")


def test_sharegpt_messages_conversations_and_system():
    turns = [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}]
    assert R.parse_record({"messages": turns, "images": ["x.png"]}, "sharegpt")[:2] == (turns, ["x.png"])
    legacy = {"conversations": [{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "yo"}],
              "images": ["x.png"]}
    assert R.parse_record(legacy, "sharegpt")[:2] == (turns, ["x.png"])
    messages, _, used = R.parse_record({"messages": turns, "system": "Be kind."}, "sharegpt")
    assert messages[0] == {"role": "system", "content": "Be kind."} and "system" in used


def test_finevision_puts_the_images_first_in_the_first_user_turn():
    rec = {"images": ["a.png", "b.png"], "texts": [{"user": "Compare.", "assistant": "Same."},
                                                   {"user": "Sure?", "assistant": "Yes."}]}
    messages, images, _ = R.parse_record(rec, "finevision")
    assert messages[0] == {"role": "user", "content": "<image><image>Compare."}
    assert messages[2] == {"role": "user", "content": "Sure?"}
    assert images == ["a.png", "b.png"]
    with pytest.raises(FormatError, match=r"texts\[0\]"):
        R.parse_record({"images": [], "texts": [{"user": "q", "assistant": None}]}, "finevision")


def test_caption_is_a_user_image_and_an_assistant_caption():
    messages, images, _ = R.parse_record({"image": "a.png", "caption": "  A dog.\n"}, "caption")
    assert messages == [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A dog."}]


@pytest.mark.parametrize("rec, match", [
    ([1, 2], "not an object"),
    ({"question": "q"}, "unknown schema"),
    ({"conversations": "hi"}, "turns must be a list"),
    ({"conversations": [{"from": "human", "value": 3}]}, "content must be a string"),
    ({"conversations": [], "image": 7}, "expected a path"),
])
def test_bad_records_raise_format_errors(rec, match):
    with pytest.raises(FormatError, match=match):
        R.parse_record(rec, "llava")


def test_meta_keeps_the_records_fields_and_provenance():
    raw = {"id": "7", "source": "vqav2", "score": float("nan"), "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    rec = R.make_record(raw, "llava", "in.jsonl", 3, "/root", line=5)
    assert rec.conversation.meta == {"source": "in.jsonl", "position": 3, "line": 5, "id": "7",
                                     "record_source": "vqav2", "score": None}
    assert rec.error is None and rec.images == []


# ------------------------------------------------------------------------------------------ inputs


@pytest.mark.parametrize("name, fmt", list(zip(SCHEMA_CASES, ["llava", "llava", "sharegpt", "finevision", "caption",
                                                               "folder", "parquet"])))
def test_open_input_detects_and_counts(name, fmt, request):
    case: Case = request.getfixturevalue(name)
    inp = R.open_input(case.inputs[0])
    assert (inp.format, inp.count) == (fmt, len(case.expected))
    recs = list(R.read_records(inp))
    assert [r.position for r in recs] == list(range(inp.count))
    assert all(r.error is None for r in recs)
    assert [r.conversation.messages for r in recs] == [e.messages for e in case.expected]


def test_want_skips_positions(llava_jsonl, finevision_parquet, image_folder):
    for case in (llava_jsonl, finevision_parquet, image_folder):
        recs = list(R.read_records(R.open_input(case.inputs[0]), want=lambda p: p % 7 == 3))
        assert [r.position for r in recs] == list(range(3, len(case.expected), 7))


def test_jsonl_lines_blank_lines_and_bad_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    good = json.dumps({"image": "a.png", "caption": "x"})
    path.write_bytes(("\n".join([good, "", "  ", "{oops", good]) + "\n").encode() + b"\xff\n")
    inp = R.open_input(str(path))
    assert (inp.format, inp.count) == ("caption", 4)
    recs = list(R.read_records(inp))
    assert [(r.position, r.line) for r in recs] == [(0, 1), (1, 4), (2, 5), (3, 6)]
    assert recs[1].error.startswith("invalid JSON") and recs[3].error.startswith("invalid UTF-8")
    assert recs[2].images == [os.path.join(str(tmp_path), "a.png")]


def test_records_before_the_first_known_schema_are_rejects(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"question": "q"}\n{"image": "a.png", "caption": "x"}\n')
    recs = list(R.read_records(R.open_input(str(path))))
    assert recs[0].error.startswith("unknown schema") and recs[1].error is None
    path.write_text('{"question": "q"}\n')
    with pytest.raises(FormatError, match="--format"):
        R.open_input(str(path))
    assert R.open_input(str(path), fmt="caption").count == 1  # named, it is read (and rejected record by record)


def test_open_inputs_tells_webdataset_shards_from_records(tmp_path, llava_json, llava_jsonl):
    """Records (a JSON array, JSONL) stay one input; tar names, patterns of them, manifests (as the packer writes
    them, or on one line) and URLs are webdataset shards, one input each, counted where a manifest says."""
    for case in (llava_json, llava_jsonl):
        assert R.open_inputs(case.inputs[0]) == [R.open_input(case.inputs[0])]
    for name in ("a.tar", "b.tar.gz", "c.TGZ"):
        (tmp_path / name).write_bytes(b"")
    shard = lambda path, count=None: R.Input(str(path), "webdataset", None, count)  # noqa: E731
    assert R.open_inputs(str(tmp_path / "a.tar")) == [shard(tmp_path / "a.tar")]
    assert R.open_inputs(str(tmp_path / "{a.tar,b.tar.gz,c.TGZ}")) == [
        shard(tmp_path / n) for n in ("a.tar", "b.tar.gz", "c.TGZ")]
    write_manifest(str(tmp_path / "index.json"), [ShardInfo("a.tar", 3, 1, "0" * 64)])
    (tmp_path / "one.json").write_text(json.dumps(manifest_json([ShardInfo("b.tar.gz", 4, 1, "0" * 64)])))
    assert R.open_inputs(str(tmp_path / "index.json")) == [shard(tmp_path / "a.tar", 3)]
    assert R.open_inputs(str(tmp_path / "one.json")) == [shard(tmp_path / "b.tar.gz", 4)]
    assert R.open_inputs("https://h/x-{0..1}.tar") == [shard("https://h/x-0.tar"), shard("https://h/x-1.tar")]
    with pytest.raises(FormatError, match=r"https://h/x\.bin: not a webdataset shard"):
        R.open_inputs("https://h/x.bin")
    assert R.open_inputs("https://h/x.bin", fmt="wds") == [shard("https://h/x.bin")]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@given(st.lists(json_values, max_size=8), st.integers(1, 9), st.sampled_from(["", " ", "\n  "]))
@settings(max_examples=80, deadline=None)
def test_json_array_streaming_equals_json_load(tmp_path_factory, items, chunk, space):
    """Elements, numbers and strings cut at any chunk boundary still parse to what json.load gives."""
    path = tmp_path_factory.mktemp("arr") / "a.json"
    path.write_text(space + "[" + space + ("," + space).join(json.dumps(x) for x in items) + space + "]" + space)
    assert list(R._json_array(str(path), chunk=chunk)) == json.loads(path.read_text())


@pytest.mark.parametrize("text, match", [("[1, 2", "unexpected end"), ("[1 2]", "expected ','"),
                                         ("[{}, {]", "element 1"), ('{"a": 1}', None)])
def test_json_array_errors_name_the_element(tmp_path, text, match):
    path = tmp_path / "a.json"
    path.write_text(text)
    if match is None:  # an object at the top is read as JSONL: one record
        assert R.open_input(str(path), fmt="caption").count == 1
        return
    with pytest.raises(FormatError, match=match):
        list(R._json_array(str(path), chunk=2))


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["plain", "bom"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_json_array_bad_utf8_names_the_file_line_and_byte(tmp_path, bom, chunk):
    """Wherever the chunks cut, a byte that is not UTF-8 is reported with its exact place, not as a bare
    UnicodeDecodeError; characters of several bytes cut by a chunk still decode."""
    head = bom + '[\n {"caption": "été ✓ 😀"},\n {"caption": "'.encode()
    path = tmp_path / "a.json"
    path.write_bytes(head + b"ab\xffc" + b'"}\n]\n')
    with pytest.raises(FormatError) as e:
        list(R._json_array(str(path), chunk=chunk))
    assert str(e.value) == f"{path}: invalid UTF-8 at line 3, byte {len(head) + 2}: invalid start byte"
    path.write_bytes(head + "ab✓c".encode() + b'"}\n]\n')
    assert [r["caption"] for r in R._json_array(str(path), chunk=chunk)] == ["été ✓ 😀", "ab✓c"]
    path.write_bytes(head + "ab✓".encode()[:-1])  # the file ends inside a character
    with pytest.raises(FormatError, match=f"line 3, byte {len(head) + 2}: unexpected end of data"):
        list(R._json_array(str(path), chunk=chunk))


def test_parquet_is_read_in_batches_never_whole(finevision_parquet, monkeypatch):
    import pyarrow.parquet as pq

    def no(*a, **k):
        raise AssertionError("read the whole file")

    monkeypatch.setattr(pq.ParquetFile, "read", no)
    monkeypatch.setattr(pq, "read_table", no)
    sizes = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **k):
        for b in real(self, *a, **k):
            sizes.append(b.num_rows)
            yield b

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(R, "PARQUET_BATCH_ROWS", 7)
    recs = list(R.read_records(R.open_input(finevision_parquet.inputs[0])))
    assert len(recs) == 60 and max(sizes) == 7
    assert recs[0].images == [finevision_parquet.expected[0].images[0]]  # the embedded bytes


def test_parquet_images_by_path_and_missing_columns(vqa, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    i = vqa.ids[0]
    path = str(tmp_path / "p.parquet")
    pq.write_table(pa.table({"images": [[{"bytes": None, "path": f"{i}.png"}]],
                             "texts": [[{"user": "q", "assistant": "a"}]]}), path)
    root = os.path.dirname(vqa.paths[i])
    rec = next(R.read_records(R.open_input(path, image_root=root)))
    assert rec.images == [vqa.paths[i]]
    assert R.convert(rec)[1][1] == ("0.png", vqa.png[i])
    pq.write_table(pa.table({"images": [[]]}), path)
    with pytest.raises(FormatError, match="texts"):
        R.open_input(path)


def test_image_folder_sorted_recursive_and_missing_captions(tmp_path):
    for rel in ["b.png", "a.jpg", "sub/c.png", "notes.md"]:
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        (tmp_path / rel).write_bytes(_png())
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub" / "c.txt").write_text("third")
    inp = R.open_input(str(tmp_path))
    assert (inp.format, inp.count) == ("folder", 3)
    recs = list(R.read_records(inp))
    assert [r.conversation and r.conversation.meta["file"] for r in recs] == ["a.jpg", None, "sub/c.png"]
    assert recs[1].error == "b.png: no caption file b.txt"
    assert recs[2].images == [os.path.join(str(tmp_path), "sub/c.png")]


@pytest.mark.skipif(sys.platform != "linux", reason="FIFOs as on Linux")
def test_image_folder_captions_are_read_as_images_are(tmp_path):
    """A caption sidecar is read only as a bounded regular file inside the folder: a FIFO would block the
    packer's main process, a link out of the folder would pack a file nobody chose."""
    folder, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.png").write_bytes(_png())
    (folder / "a.txt").write_text("a caption")
    os.mkfifo(folder / "b.txt")
    (elsewhere / "secret.txt").write_text("not for packing")
    os.symlink(elsewhere / "secret.txt", folder / "c.txt")
    inp = R.open_input(str(folder))
    with deadline(10):
        recs = list(R.read_records(inp))
    assert recs[0].error is None and recs[0].conversation.messages[1]["content"] == "a caption"
    assert recs[1].error == f"b.png: caption {folder / 'b.txt'} is not a regular file but a FIFO"
    assert recs[2].error.startswith(f"c.png: caption {folder / 'c.txt'} is outside the image root {folder}")
    with deadline(10):
        recs = list(R.read_records(inp, allow_outside_root=True))
    assert recs[2].error is None and recs[2].conversation.messages[1]["content"] == "not for packing"
    assert "FIFO" in recs[1].error


# ------------------------------------------------------------------------------------------ images


def test_load_image_sniffs_the_real_format(tmp_path):
    fake = tmp_path / "photo.jpg"
    fake.write_bytes(_png())
    assert R.load_image(str(fake)) == ("PNG", _png())
    assert R.load_image(_jpeg())[0] == "JPEG"


@pytest.mark.parametrize("data, match", [
    (b"not an image", "unreadable image"),
    (None, "unreadable image"),  # truncated PNG
    (b"P6\n2 2\n255\n" + bytes(12), "unsupported image format 'PPM'"),
])
def test_load_image_rejects_what_training_could_not_decode(data, match):
    data = _png((64, 64))[:-40] if data is None else data
    with pytest.raises(FormatError, match=match):
        R.load_image(data)


def test_missing_image(tmp_path):
    with pytest.raises(FormatError, match="missing image"):
        R.load_image(str(tmp_path / "nope.png"))


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise in the main thread if the block takes longer: a read that blocks fails the test, not the suite."""
    def expire(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(sys.platform != "linux", reason="FIFOs and devices as on Linux")
def test_read_image_file_reads_bounded_regular_files_only(tmp_path):
    data = _png((16, 16))
    (tmp_path / "a.png").write_bytes(data)
    assert R.read_image_file(str(tmp_path / "a.png"), max_bytes=len(data)) == data  # exactly the limit: read
    with pytest.raises(FormatError, match=f"a.png is {len(data)} bytes, more than the {len(data) - 1} bytes allowed"):
        R.read_image_file(str(tmp_path / "a.png"), max_bytes=len(data) - 1)
    os.mkfifo(tmp_path / "pipe.png")
    with deadline(10):  # nobody writes to it: opening it to read would block forever
        with pytest.raises(FormatError, match="pipe.png is not a regular file but a FIFO"):
            R.read_image_file(str(tmp_path / "pipe.png"))
    for path, kind in [("/dev/zero", "character device"), (str(tmp_path), "folder")]:
        with pytest.raises(FormatError, match=f"{path} is not a regular file but a {kind}$"):
            R.load_image(path)  # /dev/zero read to its end would take all the memory there is
    with pytest.raises(FormatError, match="missing image"):
        R.read_image_file(str(tmp_path / "nope.png"))
    with pytest.raises(FormatError, match="bad image path .*: a NUL character"):
        R.read_image_file(str(tmp_path / "a\0b.png"))
    with pytest.raises(FormatError, match=f"embedded image is {len(data)} bytes, more than the {len(data) - 1} bytes"):
        R.load_image(data, max_bytes=len(data) - 1)


def test_read_image_file_stays_under_the_root_symlinks_included(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    data = _png()
    (root / "sub" / "a.png").write_bytes(data)
    (elsewhere / "b.png").write_bytes(data)
    os.symlink(root / "sub" / "a.png", root / "in.png")  # a link that stays inside: fine
    os.symlink(elsewhere / "b.png", root / "out.png")
    os.symlink(elsewhere, root / "linked")
    inside = [root / "sub" / "a.png", root / "sub" / ".." / "sub" / "a.png", root / "in.png"]
    assert all(R.read_image_file(str(p), root=str(root)) == data for p in inside)
    for p in [root / ".." / "elsewhere" / "b.png", root / "out.png", root / "linked" / "b.png", "/dev/zero",
              str(root) + "-sibling/x.png"]:
        with pytest.raises(FormatError, match=f"outside the image root {root}"):
            R.read_image_file(str(p), root=str(root))
    assert R.read_image_file(str(root / "out.png")) == data  # no root: anywhere
    # Records carry the root their paths were resolved against; convert holds them to it unless told not to.
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"image": p, "caption": "x"}) + "\n" for p in ("../elsewhere/b.png", "sub/a.png")]
    src.write_text("".join(lines))
    recs = list(R.read_records(R.open_input(str(src), image_root=str(root))))
    assert [r.image_root for r in recs] == [str(root)] * 2
    (_, members, reject), (_, _, fine) = [R.convert(r) for r in recs]
    assert members is None and reject["source"] == str(src) and reject["position"] == 0
    assert "outside the image root" in reject["reason"] and fine is None
    assert [R.convert(r, allow_outside_root=True)[2] for r in recs] == [None, None]


def test_shrink_bounds_the_long_side_and_keeps_what_it_must():
    fmt, data = R.load_image(_jpeg((400, 100)), max_side=100, jpeg_quality=70)
    assert fmt == "JPEG" and Image.open(io.BytesIO(data)).size == (100, 25)
    fmt, data = R.load_image(_png((50, 300), "LA"), max_side=30)
    assert fmt == "PNG" and Image.open(io.BytesIO(data)).size == (5, 30) and Image.open(io.BytesIO(data)).mode == "RGBA"
    fmt, data = R.load_image(_png((300, 300), "L"), max_side=30)
    assert fmt == "JPEG" and Image.open(io.BytesIO(data)).mode == "L"
    fmt, data = R.load_image(_png((40, 40), "P", transparency=0), max_side=20)
    assert fmt == "PNG"
    small = _png((30, 30))
    assert R.load_image(small, max_side=30) == ("PNG", small)  # not larger: untouched


def test_shrink_applies_the_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    fmt, data = R.load_image(_jpeg((200, 100), exif=exif.tobytes()), max_side=50)
    assert Image.open(io.BytesIO(data)).size == (25, 50)


# ------------------------------------------------------------------------------------------ convert


def _record(messages, images, **kw):
    from vlmstream.dataset.format import Conversation

    return R.Record("in.json", 4, None, Conversation(messages, [], {"source": "in.json", "position": 4}), images, **kw)


def test_convert_names_images_by_format_and_orders_members(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    msgs = [{"role": "user", "content": "<image> and <image>"}, {"role": "assistant", "content": "two"}]
    index, members, reject = R.convert(_record(msgs, [_jpeg(), str(tmp_path / "a.png")], index=9))
    assert index == 9 and reject is None
    assert [m[0] for m in members] == ["json", "0.jpg", "1.png"]
    doc = json.loads(members[0][1])
    assert doc == {"messages": msgs, "images": ["0.jpg", "1.png"], "meta": {"source": "in.json", "position": 4}}
    assert members[0][1] == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("messages, images, reason", [
    ([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}], [],
     "1 <image> placeholders but 0 images"),
    ([], [], "empty conversation"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], [], "no assistant answer"),
    ([{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "x"}], [], "not valid Unicode"),
])
def test_convert_rejects_with_a_reason(messages, images, reason):
    index, members, reject = R.convert(_record(messages, images, index=2))
    assert members is None
    assert reject["source"] == "in.json" and reject["position"] == 4 and reject["index"] == 2
    assert reason in reject["reason"]


def test_convert_checks_turns_before_reading_images():
    msgs = [{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "x"}]
    _, _, reject = R.convert(_record(msgs, ["/nonexistent.png"]))
    assert reject["reason"] == "2 <image> placeholders but 1 images"
