"""Hostile and broken shards: a clear error naming shard, key and reason, or, under on_error="skip" / "warn",
the bad part skipped and counted with every good sample around it delivered. And nothing from a shard runs
code, names a file, or leaks a credential."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import re
import zlib

import pytest
import torch
from PIL import Image

import vlmstream as vs
from servers import FaultPlan, fault_server
from vlm_data import chat_tokenizer
from vlmstream.errors import DecodeError
from vlmstream.io.cache import ShardCache
from vlmstream.dataset.format import ShardInfo, write_manifest
from vlmstream.errors import FormatError
from vlmstream.core.stage import Context
from vlmstream.errors import TarError
from vlmstream.stages.read import TarSamples
from vlmstream.dataset.writer import closed_size, tar_member

PER_SHARD = 10
BAD = 5  # the bad sample's position in the middle shard


def jpeg(seed: int, size: int = 24) -> bytes:
    im = Image.frombytes("RGB", (size, size), random.Random(seed).randbytes(size * size * 3))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims another size (IHDR patched, CRC fixed): a decompression bomb."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    b[29:33] = zlib.crc32(bytes(b[12:29])).to_bytes(4, "big")
    return bytes(b)


def conversation(i: int, images: int = 1) -> bytes:
    msgs = [{"role": "user", "content": "<image>\n" * images + f"what is shape {i}?"},
            {"role": "assistant", "content": "a circle"}]
    return json.dumps({"messages": msgs, "images": ["0.jpg"]}).encode()


def key(shard: int, i: int) -> str:
    return f"{shard * PER_SHARD + i:06d}"


def members(shard: int, i: int) -> list[tuple[str, bytes]]:
    k = key(shard, i)
    return [(f"{k}.json", conversation(shard * PER_SHARD + i)), (f"{k}.0.jpg", jpeg(shard * PER_SHARD + i))]


def tar(names: list[tuple[str, bytes]]) -> bytes:
    body = b"".join(tar_member(n, d) for n, d in names)
    return body + bytes(closed_size(len(body)) - len(body))


def dataset(root, middle: bytes | list[tuple[str, bytes]]) -> tuple[str, str]:
    """Three shards of PER_SHARD samples (as the manifest says); the middle one as given. -> (index, middle path)"""
    infos = []
    for s in range(3):
        data = middle if s == 1 else [m for i in range(PER_SHARD) for m in members(s, i)]
        data = data if isinstance(data, bytes) else tar(data)
        name = f"shard-{s:06d}.tar"
        (root / name).write_bytes(data)
        infos.append(ShardInfo(name, PER_SHARD, len(data), "0" * 64))
    write_manifest(str(root / "index.json"), infos)
    return str(root / "index.json"), str(root / "shard-000001.tar")


def middle_with(bad: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The middle shard's members with sample BAD's members replaced by `bad`."""
    out = []
    for i in range(PER_SHARD):
        out += bad if i == BAD else members(1, i)
    return out


def all_keys(but: set[str] = frozenset()) -> list[str]:
    return [key(s, i) for s in range(3) for i in range(PER_SHARD) if key(s, i) not in but]


def read(index: str, policy: str, *stages, tar_kw=None) -> tuple[list[dict], vs.Pipeline]:
    pipe = vs.Pipeline(vs.shards(index, shuffle=False), vs.split_by_node(), vs.split_by_worker(),
                       vs.fetch(prefetch=0), vs.tar_samples(on_error=policy, **(tar_kw or {})), *stages)
    return list(pipe.iterate(Context())), pipe


def warned(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vlmstream"]


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer(image_token_length=4)


# ------------------------------------------------------------------------------------ shards that break


def truncated_middle() -> tuple[bytes, int]:
    """The middle shard cut inside sample 6's image: samples 0..5 complete before the cut."""
    data = tar(middle_with(members(1, BAD)))
    cut_member = 2 * (BAD + 1) + 1  # the image member of sample 6
    offsets, pos = [], 0
    for n, d in middle_with(members(1, BAD)):
        offsets.append(pos)
        pos += len(tar_member(n, d))
    return data[: offsets[cut_member] + 512 + 100], BAD + 1


def garbage_middle() -> tuple[bytes, int]:
    """Garbage over sample 4's first header: samples 0..2 are before it; sample 3, still open when the shard
    breaks (more of its members might have followed), is lost with the rest."""
    data = bytearray(tar(middle_with(members(1, BAD))))
    at = sum(len(tar_member(n, d)) for n, d in middle_with(members(1, BAD))[: 2 * 4])
    data[at : at + 40] = os.urandom(40)
    return bytes(data), 3


@pytest.mark.parametrize("policy", ["raise", "skip", "warn"])
@pytest.mark.parametrize("case,reason,message", [
    (truncated_middle, "truncated", r"offset \d+: truncated member '000016.0.jpg' \(100 of \d+ bytes\)"),
    (garbage_middle, "bad_header", r"offset \d+: bad header checksum"),
])
def test_a_shard_that_breaks_keeps_the_samples_before_it(tmp_path, caplog, policy, case, reason, message):
    data, good = case()
    index, path = dataset(tmp_path, data)
    if policy == "raise":
        with pytest.raises(TarError, match=rf"^{re.escape(path)}: {message}"):
            read(index, policy)
        return
    with caplog.at_level(logging.WARNING, "vlmstream"):
        samples, pipe = read(index, policy)
    lost = {key(1, i) for i in range(good, PER_SHARD)}
    assert [s["__key__"] for s in samples] == all_keys(but=lost)  # the good ones before and after, in order
    stats = pipe.stages[4].stats
    assert stats.skipped == {reason: 1} and stats.samples_lost == len(lost)  # counted from the manifest
    assert path in stats.errors[0] and f"{len(lost)} samples lost" in stats.errors[0]
    assert (len(warned(caplog)) == 1 and path in warned(caplog)[0]) if policy == "warn" else not warned(caplog)


def test_without_a_manifest_the_loss_is_counted_as_unknown(tmp_path):
    data, good = truncated_middle()
    (tmp_path / "a.tar").write_bytes(data)
    pipe = vs.Pipeline(vs.shards([str(tmp_path / "a.tar")]), vs.fetch(), vs.tar_samples(on_error="skip"))
    assert len(list(pipe.iterate(Context()))) == good
    stats = pipe.stages[2].stats
    assert stats.skipped == {"truncated": 1} and stats.samples_lost == 0 and stats.unknown_losses == 1


# -------------------------------------------------------------------------------------- bad samples


def oversized() -> list[tuple[str, bytes]]:
    k = key(1, BAD)
    return [(f"{k}.json", conversation(15)), (f"{k}.0.jpg", os.urandom(3 << 20))]


def duplicate_extension() -> list[tuple[str, bytes]]:
    k = key(1, BAD)
    return [*members(1, BAD), (f"{k}.0.JPG", jpeg(1))]


@pytest.mark.parametrize("policy", ["raise", "skip", "warn"])
@pytest.mark.parametrize("bad,reason,message", [
    (oversized, "member_too_large", r"key '000015': member '000015.0.jpg' is 3145728 bytes, over max_member_bytes=1048576"),
    (duplicate_extension, "duplicate_extension", r"key '000015': extension '0.jpg' is a duplicate in the sample"),
])
def test_a_bad_sample_is_skipped_alone(tmp_path, caplog, policy, bad, reason, message):
    index, path = dataset(tmp_path, middle_with(bad()))
    if policy == "raise":
        with pytest.raises(TarError, match=rf"^{re.escape(path)}: offset \d+: {message}"):
            read(index, policy, tar_kw={"max_member_bytes": 1 << 20})
        return
    with caplog.at_level(logging.WARNING, "vlmstream"):
        samples, pipe = read(index, policy, tar_kw={"max_member_bytes": 1 << 20})
    assert [s["__key__"] for s in samples] == all_keys(but={key(1, BAD)})
    stats = pipe.stages[4].stats
    assert stats.skipped == {reason: 1} and stats.samples_lost == 1
    if policy == "warn":
        (line,) = warned(caplog)
        assert path in line and "'000015'" in line and f"tar_samples skipped ({reason})" in line


def test_an_oversized_member_is_never_read_whole():
    big = 5 << 20
    data = tar([("a.txt", b"x"), ("b.bin", os.urandom(big)), ("c.txt", b"y")])

    class Watch(io.BytesIO):
        largest = 0

        def read(self, n=-1):
            Watch.largest = max(Watch.largest, n if n is not None and n >= 0 else 1 << 62)
            return super().read(n)

    stage = TarSamples(max_member_bytes=1 << 20, on_error="skip")
    got = [s["__key__"] for s in stage.read({"url": "mem://x.tar", "stream": Watch(data)})]
    assert got == ["a", "c"] and Watch.largest <= (1 << 20) + 1024  # passed over in chunks of at most 1 MiB
    assert stage.stats.skipped == {"member_too_large": 1}
    Watch.largest = 0
    with pytest.raises(TarError, match="over max_member_bytes"):
        list(TarSamples(max_member_bytes=1 << 20).read({"url": "mem://x.tar", "stream": Watch(data)}))
    assert Watch.largest < big


def test_a_garbage_size_field_is_refused_without_allocating_it():
    data = bytearray(tar([("a.txt", b"x" * 10), ("b.txt", b"y")]))
    head = bytearray(data[1024:1536])
    head[124:136] = b"\x80" + (1 << 80).to_bytes(11, "big")  # base-256: 2**80 bytes
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    data[1024:1536] = head
    with pytest.raises(TarError, match=r"offset 1024: implausible size field"):
        list(vs.read_tar_samples(io.BytesIO(bytes(data)), "mem://x.tar"))


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_members_of_one_sample_that_are_not_adjacent(tmp_path, policy):
    """000013's image comes after 000014: webdataset would make two samples keyed 000013. We deliver the first
    fragment (it is what the stream holds at that point), then refuse the key when it appears again."""
    names = middle_with(members(1, BAD))
    k3, k4 = key(1, 3), key(1, 4)
    image3 = (f"{k3}.0.jpg", jpeg(13))
    names.remove(image3)
    names.insert(names.index((f"{k4}.0.jpg", jpeg(14))) + 1, image3)
    index, path = dataset(tmp_path, names)
    if policy == "raise":
        with pytest.raises(TarError, match=rf"^{re.escape(path)}: offset \d+: key '{k3}' appears again in the shard"):
            read(index, policy)
        return
    samples, pipe = read(index, policy)
    keys = [s["__key__"] for s in samples]
    assert keys == all_keys()  # 000013 once: its first fragment (json only)
    assert "0.jpg" not in samples[13] and "json" in samples[13]
    assert pipe.stages[4].stats.skipped == {"repeated_key": 1}
    # downstream, the half sample is bad data in its turn: tokenize names it
    tok = chat_tokenizer(image_token_length=4)
    with pytest.raises(FormatError, match=rf"sample '{k3}': image members \['0.jpg'\] referenced but not in the sample"):
        list(vs.tokenize(tok)(vs.decode(vs.ImageTiles(32, 64))(iter(samples[13:14]))))


# --------------------------------------------------------------------------------- decode and tokenize


def middle_sample(member: str, data: bytes) -> list[tuple[str, bytes]]:
    k = key(1, BAD)
    return [(f"{k}.{m}", data if m == member else d) for m, d in
            (("json", conversation(15)), ("0.jpg", jpeg(15)))]


@pytest.mark.parametrize("policy", ["raise", "skip", "warn"])
@pytest.mark.parametrize("member,data,reason,message", [
    ("0.jpg", jpeg(15)[:300], "corrupt_image", r"member '0.jpg': OSError: "),
    ("0.jpg", b"\x89PNG garbage", "corrupt_image", r"member '0.jpg': UnidentifiedImageError"),
    ("0.jpg", png_claiming(100_000, 100_000), "decompression_bomb", r"member '0.jpg': DecodeError: image .*exceeds"),
    ("json", b'{"messages": [', "invalid_json", r"member 'json': JSONDecodeError"),
    ("json", b'{"messages": "\xff\xfe"}', "invalid_utf8", r"member 'json': UnicodeDecodeError"),
])
def test_decode_names_shard_key_and_reason_or_skips(tmp_path, caplog, policy, member, data, reason, message):
    index, path = dataset(tmp_path, middle_with(middle_sample(member, data)))
    stage = vs.decode(vs.ImageTiles(32, 64, output="uint8"), on_error=policy)
    if policy == "raise":
        with pytest.raises(DecodeError, match=rf"^{re.escape(path)}: sample '000015' {message}") as e:
            read(index, policy, stage)
        assert e.value.reason == reason
        return
    with caplog.at_level(logging.WARNING, "vlmstream"):
        samples, _ = read(index, policy, stage)
    assert [s["__key__"] for s in samples] == all_keys(but={key(1, BAD)})
    assert stage.stats.skipped == {reason: 1} and stage.stats.samples_lost == 1
    assert stage.stats.samples == 3 * PER_SHARD - 1
    if policy == "warn":
        assert len(warned(caplog)) == 1 and f"decode skipped ({reason})" in warned(caplog)[0]
        assert path in warned(caplog)[0] and "'000015'" in warned(caplog)[0]


def test_invalid_utf8_text(tmp_path):
    names = [(f"k{i}.txt", b"caption \xff" if i == 2 else b"caption") for i in range(4)]
    (tmp_path / "t.tar").write_bytes(tar(names))
    pipe = vs.Pipeline(vs.shards([str(tmp_path / "t.tar")]), vs.fetch(), vs.tar_samples(),
                       vs.decode(on_error="skip"))
    assert [s["txt"] for s in pipe.iterate(Context())] == ["caption"] * 3
    assert pipe.stages[3].stats.skipped == {"invalid_utf8": 1}


@pytest.mark.parametrize("policy", ["raise", "skip", "warn"])
@pytest.mark.parametrize("json_bytes,reason,message", [
    (conversation(15, images=2), "placeholder_mismatch", r"2 <image> placeholders but 1 images"),
    (json.dumps({"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}],
                 "images": ["1.jpg"]}).encode(), "missing_image", r"image members \['1.jpg'\] referenced"),
    (b"[1, 2", "invalid_json", r"invalid json member"),
])
def test_tokenize_names_shard_key_and_reason_or_skips(tmp_path, tok, caplog, policy, json_bytes, reason, message):
    index, path = dataset(tmp_path, middle_with(middle_sample("json", json_bytes)))
    stage = vs.tokenize(tok, max_len=512, on_error=policy)
    chain = (vs.decode(vs.ImageTiles(32, 64, output="uint8"), json=False), stage)
    if policy == "raise":
        with pytest.raises(FormatError, match=rf"^{re.escape(path)}: sample '000015': {message}") as e:
            read(index, policy, *chain)
        assert e.value.reason == reason
        return
    with caplog.at_level(logging.WARNING, "vlmstream"):
        samples, _ = read(index, policy, *chain)
    assert [s["__key__"] for s in samples] == all_keys(but={key(1, BAD)})
    assert stage.stats.skipped == {reason: 1} and stage.stats.samples == 3 * PER_SHARD - 1
    assert len(warned(caplog)) == (policy == "warn")


# ------------------------------------------------------------------------------------------ no code runs


class Boom:
    """Unpickling this creates a directory: proof that unpickling ran code from the shard."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path, 0o777, True))


def test_pickles_are_never_unpickled_unless_asked_by_name(tmp_path):
    marker = str(tmp_path / "pwned")
    payload = pickle.dumps(Boom(marker))
    buf = io.BytesIO()
    torch.save({"w": torch.arange(3)}, buf)
    sample = {"__key__": "k", "__url__": "u", "pyd": payload, "pickle": payload, "pkl": payload, "pth": buf.getvalue()}
    out = vs.decode().decode_sample(sample)
    assert out["pyd"] == out["pickle"] == out["pkl"] == payload and out["pth"] == buf.getvalue()
    assert not os.path.exists(marker)
    assert not vs.decode(unsafe_pickle=1).unsafe_pickle  # only True, given by name, turns it on
    unsafe = vs.decode(unsafe_pickle=True).decode_sample(sample)
    assert os.path.isdir(marker)  # the code ran: exactly why this is off by default
    assert unsafe["pth"]["w"].tolist() == [0, 1, 2]


def test_cache_file_names_never_come_from_the_url(tmp_path):
    cache = ShardCache(str(tmp_path / "c"), 1 << 30)
    for url in ("http://h/../../../../etc/passwd", "http://h/a.tar?token=S3CRET&x=/../../y", "/abs/../x.tar",
                "http://h/%2e%2e%2f%2e%2e%2fescape.tar", "pipe:cat /etc/passwd"):
        p = cache.path(url)
        assert os.path.dirname(p) == str(tmp_path / "c") and re.fullmatch(r"[0-9a-f]{64}\.tar", os.path.basename(p))


# ----------------------------------------------------------------------------------- no credential leaks


SECRET_TOKEN, SECRET_PW = "tOkEn_s3cret", "pAsS_s3cret"


def test_credentials_never_reach_samples_errors_logs_stats_or_state(tmp_path, caplog):
    index, path = dataset(tmp_path, middle_with(middle_sample("0.jpg", b"not an image")))
    names = [f"shard-{s:06d}.tar" for s in range(3)]
    plan = FaultPlan(token=SECRET_TOKEN)
    with fault_server(str(tmp_path), plan) as (url, plan):
        secret = [url.replace("http://", f"http://alice:{SECRET_PW}@") + f"/{n}?token={SECRET_TOKEN}&x=1"
                  for n in names]

        def make(policy="warn"):  # in-process (num_workers=0): the log lines reach caplog
            pipe = vs.Pipeline(vs.shards(secret, seed=1), vs.split_by_node(), vs.split_by_worker(),
                               vs.fetch(prefetch=1, headers={"Authorization": f"Bearer {SECRET_TOKEN}"}),
                               vs.tar_samples(), vs.shuffle(8, initial=4), vs.decode("uint8", on_error=policy),
                               vs.batch(4), rank=0, world_size=1)
            return vs.Loader(pipe, num_workers=0)

        with caplog.at_level(logging.WARNING, "vlmstream"):
            full = [b["__key__"] for b in make()]
        loader = make()
        it = iter(loader)
        first = [next(it)["__key__"] for _ in range(3)]
        state = json.dumps(loader.state_dict())
        it.close()
        resumed = make()
        resumed.load_state_dict(json.loads(state))
        rest = [b["__key__"] for b in resumed]
        stats = json.dumps(resumed.stats().as_dict(), default=str)
        with pytest.raises(DecodeError) as bad:  # the same bad image, under "raise", in this process
            pipe = make("raise").pipeline
            for ctx in (Context(0, 1, 0, 2), Context(0, 1, 1, 2)):
                list(pipe.iterate(ctx))
        bad_pipe_stats = repr(pipe.stages[3].stats) + repr(pipe.stages[6].stats)
    assert first + rest == full  # resumed exactly: the redacted URLs in the state were resolved back
    assert all(status != 403 for _, _, status in plan.log)  # and every request carried the token
    assert "***" in state and "alice" not in state  # the refs are there, redacted
    leaks = {"state": state, "stats": stats, "error": str(bad.value), "logs": "\n".join(warned(caplog)),
             "stage stats": bad_pipe_stats, "keys": repr(full)}
    assert warned(caplog) and "shard-000001.tar" in leaks["logs"] and "shard-000001.tar" in leaks["error"]
    for where, text in leaks.items():
        assert SECRET_TOKEN not in text and SECRET_PW not in text, where


def test_samples_carry_the_redacted_url(tmp_path):
    index, _ = dataset(tmp_path, middle_with(members(1, BAD)))
    with fault_server(str(tmp_path), FaultPlan(token="t0k")) as (url, _):
        u = url.replace("http://", "http://bob:pw@") + "/shard-000000.tar?token=t0k"
        samples = list(vs.Pipeline(vs.shards([u]), vs.fetch(), vs.tar_samples()).iterate(Context()))
    assert len(samples) == PER_SHARD and {s["__url__"] for s in samples} == {u.replace("bob:pw@", "").replace(
        "token=t0k", "token=***")}


SIGNED = {"X-Goog-Algorithm": "GOOG4-RSA-SHA256", "X-Goog-Credential": "gcred_S3CRET%2F20240101",
          "X-Goog-Signature": "gsig_S3CRET", "X-Amz-Credential": "acred_S3CRET", "X-Amz-Signature": "asig_S3CRET",
          "X-Amz-Security-Token": "atok_S3CRET", "api_key": "apikey_S3CRET", "sig": "sas_S3CRET",
          "client_secret": "cs_S3CRET", "password": "pw_S3CRET"}


def test_secrets_in_signed_urls_never_reach_samples_errors_logs_stats_state_or_reports(tmp_path, caplog):
    """Signed URLs (GCS, S3, Azure SAS) and API keys in query strings: every value redacted wherever a URL shows."""
    from vlmstream.cli.inspect import inspect_shards

    dataset(tmp_path, middle_with(middle_sample("0.jpg", b"not an image")))
    query = "&".join(f"{k}={v}" for k, v in SIGNED.items()) + "&x=1"
    with fault_server(str(tmp_path)) as (url, plan):
        good = [f"{url}/shard-{s:06d}.tar?{query}" for s in range(3)]
        missing = f"{url}/gone.tar?{query}"

        def make(urls, policy="warn"):
            pipe = vs.Pipeline(vs.shards(urls, shuffle=False), vs.split_by_node(), vs.split_by_worker(),
                               vs.fetch(prefetch=2, on_error=policy), vs.tar_samples(), vs.shuffle(8, initial=4),
                               vs.decode("uint8", on_error=policy), vs.batch(4), rank=0, world_size=1)
            return vs.Loader(pipe, num_workers=0)

        with caplog.at_level(logging.WARNING, "vlmstream"):
            loader = make(good + [missing])  # a bad image (decode) and a missing shard (fetch), both warned
            it = iter(loader)
            batches = [next(it) for _ in range(3)]
            state = json.dumps(loader.state_dict())
            batches += list(it)
        stats = json.dumps(loader.stats().as_dict(), default=str)
        with pytest.raises(vs.FetchError) as failed:  # the same missing shard, under "raise"
            list(make([missing], "raise"))
        report = json.dumps(inspect_shards(good + [missing]).as_dict(), default=str)
    urls = {u for b in batches for u in b["__url__"]}
    assert len(urls) == 3 and sum(len(b["__key__"]) for b in batches) == 3 * PER_SHARD - 1
    assert all("X-Goog-Signature=***" in u and "x=1" in u for u in urls)
    assert "X-Goog-Signature=***" in state  # the shuffle buffer's samples, by reference
    logs = "\n".join(warned(caplog))
    assert "gone.tar" in logs and "shard-000001.tar" in logs and "gone.tar" in str(failed.value)
    texts = {"samples": repr(urls), "state": state, "stats": stats, "logs": logs, "error": str(failed.value),
             "inspect": report}
    for where, text in texts.items():
        leaked = [v for v in SIGNED.values() if "S3CRET" in v and v.split("%")[0] in text]
        assert not leaked, (where, leaked)
