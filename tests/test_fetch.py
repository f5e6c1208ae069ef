"""fetch: local files, nginx over HTTP, and every fault path against a fault-injecting server."""

import os
import threading

import pytest

from servers import Fault, FaultPlan, Nginx, fault_server, no_sleep, self_signed
from vlmstream.errors import FetchError, redact
from vlmstream.io.cache import ShardCache
from vlmstream.io.http import FetchOptions
from vlmstream.io.urls import open_url
from vlmstream.stages.fetch import fetch

SIZE = 3_000_000


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blobs")
    data = {}
    for i in range(4):
        b = os.urandom(SIZE + i * 1000)
        (root / f"s{i}.tar").write_bytes(b)
        data[f"s{i}.tar"] = b
    return root, data


@pytest.fixture(scope="module")
def nginx(blobs):
    srv = Nginx(str(blobs[0]))
    yield srv
    srv.close()


def fetched(stage, urls):
    out = []
    for item in stage(iter([{"url": u} for u in urls])):
        with item.stream as f:
            out.append(f.read())
    return out


def opts(**kw):
    return FetchOptions(sleep=no_sleep, **kw)


def test_local_paths_and_file_urls(blobs):
    root, data = blobs
    assert fetched(fetch(prefetch=0), [str(root / "s0.tar"), f"file://{root}/s1.tar"]) == [data["s0.tar"], data["s1.tar"]]
    with pytest.raises(FetchError, match="s9.tar"):
        open_url(str(root / "s9.tar"))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_nginx_streams_every_byte_over_one_keepalive_connection(blobs, nginx, prefetch):
    root, data = blobs
    before = nginx.connections()
    stage = fetch(prefetch=prefetch)
    names = sorted(data)
    assert fetched(stage, [f"{nginx.url}/{n}" for n in names]) == [data[n] for n in names]
    assert stage.stats.requests == 4 and stage.stats.retries == 0
    assert nginx.connections() - before == 1


def test_range_resume_after_a_cut_connection(blobs):
    root, data = blobs
    plan = FaultPlan({("/s0.tar", 0): Fault(cut_at=1_234_567), ("/s0.tar", 1): Fault(cut_at=1_000_000)})
    with fault_server(str(root), plan) as (url, plan):
        stage = fetch(prefetch=0, options=opts())
        assert fetched(stage, [f"{url}/s0.tar"]) == [data["s0.tar"]]
    assert [(p, start) for p, start, _ in plan.log] == [("/s0.tar", 0), ("/s0.tar", 1_234_567), ("/s0.tar", 2_234_567)]
    assert stage.stats.resumed == 2 and stage.stats.retries == 2


def test_nginx_honours_range_for_resume(blobs, nginx):
    from vlmstream.io.http import HTTPClient, HTTPStream
    from vlmstream.stages.fetch import FetchStats

    root, data = blobs
    s = HTTPStream(f"{nginx.url}/s1.tar", HTTPClient(opts(), FetchStats()))
    head = s.read(1000)
    s._drop()  # as if the connection broke here
    assert head + s.read() == data["s1.tar"]


def test_5xx_bursts_and_429_retry_after(blobs):
    root, data = blobs
    waits = []
    plan = FaultPlan({
        ("/s1.tar", 0): Fault(status=503), ("/s1.tar", 1): Fault(status=502), ("/s1.tar", 2): Fault(status=500),
        ("/s2.tar", 0): Fault(status=429, retry_after="7"),
    })
    with fault_server(str(root), plan) as (url, plan):
        stage = fetch(prefetch=0, options=FetchOptions(sleep=waits.append, backoff=0.01))
        assert fetched(stage, [f"{url}/s1.tar", f"{url}/s2.tar"]) == [data["s1.tar"], data["s2.tar"]]
    assert stage.stats.retries == 4
    assert waits[-1] == 7.0 and all(w <= 0.01 * 4 for w in waits[:3])


def test_stall_longer_than_read_timeout_is_retried(blobs):
    root, data = blobs
    plan = FaultPlan({("/s0.tar", 0): Fault(stall=1.5)})
    with fault_server(str(root), plan) as (url, plan):
        stage = fetch(prefetch=0, options=opts(read_timeout=0.3))
        assert fetched(stage, [f"{url}/s0.tar"]) == [data["s0.tar"]]
    assert stage.stats.retries == 1


def within(seconds, fn):
    """fn() run in a thread, failing the test if it takes longer (a hang must not hang the suite)."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_a_server_that_trickles_is_a_stall_resumed_by_range(blobs):
    """One byte every 20 ms never trips the per-recv read timeout; the low-speed limit catches it."""
    root, data = blobs
    plan = FaultPlan({("/s0.tar", 0): Fault(drip=0.02)})
    with fault_server(str(root), plan) as (url, plan):
        stage = fetch(prefetch=0, options=opts(read_timeout=0.5, low_speed_limit=1000, low_speed_time=0.3))
        assert within(5, lambda: fetched(stage, [f"{url}/s0.tar"])) == [data["s0.tar"]]
    assert [status for *_, status in plan.log] == [200, 206] and plan.log[1][1] > 0
    assert stage.stats.stalls == 1 and stage.stats.retries == 1 and stage.stats.resumed == 1


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_server_that_always_trickles_is_given_up_naming_the_stall(blobs, prefetch):
    root, _ = blobs
    plan = FaultPlan({("/s1.tar", n): Fault(drip=0.02) for n in range(3)})
    with fault_server(str(root), plan) as (url, plan):
        stage = fetch(prefetch=prefetch, options=opts(read_timeout=0.5, retries=2, low_speed_limit=1000,
                                                      low_speed_time=0.3))
        with pytest.raises(FetchError, match=r"s1.tar: gave up after 3 attempts .*stalled: .* under low_speed_limit="
                                             r"1000 bytes/s") as e:
            within(5, lambda: fetched(stage, [f"{url}/s1.tar"]))
    assert e.value.reason == "retries_exhausted" and stage.stats.stalls == 3


def test_short_body_and_server_ignoring_range(blobs):
    root, data = blobs
    plan = FaultPlan({("/s3.tar", 0): Fault(short_by=100_000), ("/s3.tar", 1): Fault(ignore_range=True, cut_at=2_950_000),
                      ("/s3.tar", 2): Fault(ignore_range=True)})
    with fault_server(str(root), plan) as (url, plan):
        stage = fetch(prefetch=2, options=opts())
        assert fetched(stage, [f"{url}/s3.tar"]) == [data["s3.tar"]]
    assert [status for *_, status in plan.log] == [200, 200, 200]
    assert stage.stats.retries == 2


def test_not_found_fails_at_once_naming_the_url(blobs):
    root, _ = blobs
    with fault_server(str(root)) as (url, plan):
        with pytest.raises(FetchError, match=r"/nope.tar: HTTP 404"):
            fetched(fetch(prefetch=0, options=opts()), [f"{url}/nope.tar"])
    assert len(plan.log) == 1


@pytest.mark.parametrize("prefetch", [0, 1])
def test_retries_exhausted_is_a_clear_error(blobs, prefetch):
    root, _ = blobs
    plan = FaultPlan({("/s0.tar", i): Fault(status=503) for i in range(10)})
    with fault_server(str(root), plan) as (url, plan):
        with pytest.raises(FetchError, match=r"s0.tar: gave up after 4 attempts .*HTTP 503"):
            fetched(fetch(prefetch=prefetch, options=opts(retries=3)), [f"{url}/s0.tar"])


def test_pipe_urls_need_explicit_permission(blobs):
    root, data = blobs
    with pytest.raises(FetchError, match="allow_pipe"):
        open_url(f"pipe:cat {root}/s0.tar")
    assert fetched(fetch(prefetch=0, allow_pipe=True), [f"pipe:cat {root}/s0.tar"]) == [data["s0.tar"]]


def test_credentials_never_appear_in_errors(blobs):
    root, _ = blobs
    assert redact("https://user:pw@host/a.tar?token=abc&x=1") == "https://host/a.tar?token=***&x=1"
    with fault_server(str(root)) as (url, _):
        secret_url = url.replace("http://", "http://alice:s3cret@") + "/nope.tar?sig=XYZ"
        stage = fetch(prefetch=0, headers={"Authorization": "Bearer hf_SECRET"}, options=opts())
        with pytest.raises(FetchError) as e:
            fetched(stage, [secret_url])
    msg = str(e.value)
    assert "s3cret" not in msg and "XYZ" not in msg and "hf_SECRET" not in msg and "nope.tar" in msg


def test_read_ahead_is_bounded_in_bytes_and_survives_early_close(blobs):
    root, data = blobs
    stage = fetch(prefetch=3, prefetch_bytes=1 << 20, options=opts(chunk=256 << 10))
    items = stage(iter([{"url": str(root / n)} for n in sorted(data)]))
    first = next(items)
    first.stream.read(10)
    first.stream.close()  # abandon the rest of this shard
    second = next(items)
    assert second.stream.read() == data["s1.tar"]
    items.close()
    assert not [t for t in threading.enumerate() if t.name == "vlmstream-fetch" and t.is_alive()]


def test_read_ahead_serves_reads_of_any_size_and_recycles_its_buffers(blobs, nginx, monkeypatch):
    import random

    from vlmstream.io import readahead

    root, data = blobs
    made = []
    real = readahead.Buffers.get

    def counting_get(self):
        buf = real(self)
        if all(buf is not b for b in made):
            made.append(buf)
        return buf

    monkeypatch.setattr(readahead.Buffers, "get", counting_get)
    chunk, budget = 64 << 10, 256 << 10
    stage = fetch(prefetch=2, prefetch_bytes=budget, options=opts(chunk=chunk))
    rng = random.Random(0)
    names = sorted(data)
    for item, name in zip(stage(iter([{"url": f"{nginx.url}/{n}"} for n in names])), names):
        parts, f = [], item.stream
        while True:  # member-sized reads, many across two or more chunks; a readinto now and then
            if rng.random() < 0.1:
                b = bytearray(rng.randrange(1, 3 * chunk))
                n = f.readinto(b)
                got = bytes(b[:n])
            else:
                got = f.read(rng.choice([512, 700, 60_000, 3 * chunk + 5]))
            if not got:
                break
            parts.append(got)
        f.close()
        assert b"".join(parts) == data[name]
    assert len(made) <= budget // chunk + 1  # 12 MB read through at most 5 buffers of 64 KiB


def test_cache_keeps_shards_for_later_epochs_bounded_and_lru(blobs, nginx, tmp_path):
    root, data = blobs
    cache_dir = tmp_path / "cache"
    urls = [f"{nginx.url}/{n}" for n in sorted(data)]
    stage = fetch(prefetch=0, cache=str(cache_dir), cache_bytes=2 * SIZE + 5000)
    assert fetched(stage, urls[:2]) == [data["s0.tar"], data["s1.tar"]]
    names = sorted(os.listdir(cache_dir))
    assert all(len(n) == 64 + 4 and "s0" not in n for n in names if n.endswith(".tar")), names
    assert fetched(stage, urls[:2]) == [data["s0.tar"], data["s1.tar"]]
    assert stage.stats.cache_hits == 2
    fetched(stage, urls[2:3])  # over the bound: the least recently used shard goes
    cache = ShardCache(str(cache_dir), 0)
    assert cache.get(urls[2]) and not cache.get(urls[0]) and cache.get(urls[1])


def test_cache_never_publishes_a_partial_shard(blobs, nginx, tmp_path):
    root, _ = blobs
    stage = fetch(prefetch=0, cache=str(tmp_path / "c"))
    item = next(stage(iter([{"url": f"{nginx.url}/s0.tar"}])))
    item.stream.read(1000)
    item.stream.close()
    assert os.listdir(tmp_path / "c") == []


def test_workers_without_split_by_worker_is_an_error(blobs):
    from vlmstream.core.stage import Context

    root, _ = blobs
    stage = fetch(prefetch=0)
    stage.bind(Context(num_workers=2))
    with pytest.raises(ValueError, match="split_by_worker"):
        next(stage(iter([{"url": str(root / "s0.tar")}])))


# ------------------------------------------------------------------------------------- refused, not retried


BAD_URLS = ["http://../x.tar", "http://127.0.0.1:99999/x.tar", "http://[::1/x.tar", "http://127.0.0.1:1/a b.tar",
            "http:///x.tar"]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_url_that_cannot_be_a_request_is_a_bad_url_error_skipped_under_skip(prefetch):
    import vlmstream as vs
    from vlmstream.core.stage import Context

    for url in BAD_URLS:
        stage = fetch(prefetch=prefetch, options=opts())
        with pytest.raises(FetchError, match="not a URL that can be requested") as e:
            fetched(stage, [url])
        assert e.value.reason == "bad_url" and stage.stats.requests == stage.stats.retries == 0, url
    pipe = vs.Pipeline(vs.shards(BAD_URLS), vs.fetch(prefetch=prefetch, options=opts(), on_error="skip"),
                       vs.tar_samples())
    assert list(pipe.iterate(Context())) == []
    stats = pipe.stages[1].stats
    assert stats.skipped == {"bad_url": len(BAD_URLS)} and stats.retries == 0


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x.tar", "pipe:cat /etc/passwd"])
def test_a_redirect_to_another_scheme_is_refused_at_once(blobs, location):
    root, _ = blobs
    waits = []
    plan = FaultPlan({("/s0.tar", n): Fault(redirect=location) for n in range(10)})
    with fault_server(str(root), plan) as (url, plan):
        stage = fetch(prefetch=0, options=FetchOptions(sleep=waits.append))
        with pytest.raises(FetchError, match=r"s0.tar: redirect to a \w+ URL refused") as e:
            fetched(stage, [f"{url}/s0.tar"])
    assert e.value.reason == "redirect_refused" and len(plan.log) == 1 and waits == []
    assert "passwd" not in str(e.value)


def test_relative_redirects_resolve_against_the_url(blobs):
    root, data = blobs
    plan = FaultPlan({("/d/s0.tar", 0): Fault(redirect="../s1.tar?x=1")})
    os.makedirs(root / "d", exist_ok=True)
    (root / "d" / "s0.tar").write_bytes(b"")
    with fault_server(str(root), plan) as (url, plan):
        assert fetched(fetch(prefetch=0, options=opts()), [f"{url}/d/s0.tar"]) == [data["s1.tar"]]
    assert [p for p, *_ in plan.log] == ["/d/s0.tar", "/s1.tar"]


def test_a_certificate_that_is_not_trusted_fails_at_once(blobs, tmp_path):
    root, _ = blobs
    waits = []
    with fault_server(str(root), tls=self_signed(str(tmp_path))) as (url, plan):
        stage = fetch(prefetch=0, options=FetchOptions(sleep=waits.append))
        with pytest.raises(FetchError, match="s0.tar: TLS certificate refused") as e:
            fetched(stage, [f"{url}/s0.tar"])
    assert e.value.reason == "bad_certificate" and waits == []


# ------------------------------------------------------------------------------------- credentials stay home


def test_headers_go_to_the_shard_urls_origin_only(blobs):
    root, data = blobs
    secret = {"Authorization": "Bearer s3cret", "X-Api-Key": "k3y"}
    with fault_server(str(root)) as (other, other_plan):
        plan = FaultPlan({("/s0.tar", 0): Fault(redirect=f"{other}/s0.tar"), ("/s1.tar", 0): Fault(redirect="/s2.tar")})
        with fault_server(str(root), plan) as (url, plan):
            stage = fetch(prefetch=0, headers=secret, options=opts())
            assert fetched(stage, [f"{url}/s0.tar", f"{url}/s1.tar"]) == [data["s0.tar"], data["s2.tar"]]
    sent = [(path, {k: h.get(k) for k in secret}) for path, _, h in plan.seen]
    assert sent == [("/s0.tar", secret), ("/s1.tar", secret), ("/s2.tar", secret)]  # its own origin: all of them
    assert [(path, [k for k in secret if k in h]) for path, _, h in other_plan.seen] == [("/s0.tar", [])]


def test_an_https_to_http_redirect_on_the_same_host_and_port_sends_no_credentials(blobs, tmp_path, monkeypatch):
    root, data = blobs
    cert, key = self_signed(str(tmp_path))
    monkeypatch.setenv("SSL_CERT_FILE", cert)  # trusted by the default context http.client makes
    with fault_server(str(root), tls=(cert, key)) as (url, plan):
        plan.faults[("/s0.tar", 0)] = Fault(redirect=url.replace("https://", "http://") + "/s0.tar")
        stage = fetch(prefetch=0, headers={"Authorization": "Bearer s3cret"}, options=opts())
        assert fetched(stage, [f"{url}/s0.tar"]) == [data["s0.tar"]]
    assert [(tls, h.get("Authorization")) for _, tls, h in plan.seen] == [(True, "Bearer s3cret"), (False, None)]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_header_values_are_stripped_and_bad_ones_refused_where_the_stage_is_built(blobs, prefetch):
    root, data = blobs
    with fault_server(str(root)) as (url, plan):
        stage = fetch(prefetch=prefetch, headers={"Authorization": "Bearer abc\n"}, on_error="skip", options=opts())
        assert fetched(stage, [f"{url}/s0.tar"]) == [data["s0.tar"]]  # a token read from a file, newline and all
    assert plan.seen[0][2]["Authorization"] == "Bearer abc"
    for headers in ({"Authorization": "Bearer s3cr\net"}, {"Authorization": "Bearer s3cr\r\nX-Evil: 1"},
                    {"X-Key": "s3cr\x00et"}, {"X-Key": "s3cr\u20acet"}, {"Bad Name: s3cret": "x"}):
        for make in (lambda: fetch(headers=headers, on_error="skip"),
                     lambda: fetch(options=FetchOptions(headers=headers), on_error="skip")):
            with pytest.raises(ValueError, match="fetch headers: .*not shown") as e:
                make()
            assert "s3cr" not in str(e.value), headers
