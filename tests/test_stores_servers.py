"""The store emulators of tests/stores.py and their fault proxy: each emulator takes a bucket and an object and
gives them back to obstore (list, head, ranges, signed URLs); the proxy forwards signed requests, injects each
kind of fault as planned and counts the GETs of each object."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import time
import urllib.request
from datetime import timedelta

import pytest

import stores
from stores import Fault, FaultPlan, GCSServer, RealS3, S3Server, setenv, unique_key

obstore = pytest.importorskip("obstore")
from obstore.store import from_url  # noqa: E402

SERVERS = ["s3_server", "azure_server", "gcs_server"]


@pytest.fixture(params=SERVERS)
def server(request):
    return request.getfixturevalue(request.param)


def _emulated(server) -> None:
    if server.real:
        pytest.skip("needs an emulator (a real endpoint cannot be proxied)")


def _listed(store, prefix: str) -> list[tuple[str, int]]:
    return sorted((m["path"], m["size"]) for batch in obstore.list(store, prefix=prefix) for m in batch)


def test_roundtrip(server, monkeypatch):
    bucket = server.make_bucket()
    prefix = unique_key()
    data = {prefix + "shard-000.tar": os.urandom(100_000), prefix + "sub dir/shard 001.tar": b"x" * 1000}
    for key, body in data.items():
        server.put(bucket, key, body)
    setenv(monkeypatch, server.env)
    store = from_url(server.url(bucket))

    assert _listed(store, prefix) == sorted((k, len(v)) for k, v in data.items())
    for key, body in data.items():
        assert obstore.head(store, key)["size"] == len(body)
        assert bytes(obstore.get_range(store, key, start=10, end=510)) == body[10:510]
        assert bytes(obstore.get(store, key).bytes()) == body
    if isinstance(server, GCSServer):
        return  # fake-gcs-server: no signing key (module docstring of stores.py)
    for key, body in data.items():
        if " " in key and server.flavor == "azure":
            continue  # test_azure_sas_of_a_key_to_percent_encode
        url = obstore.sign(store, "GET", key, timedelta(hours=1))
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.read() == body


@pytest.mark.xfail(reason="obstore 0.12's Azure SAS does not match Azurite's for a blob name that must be "
                          "percent-encoded (space, non-ASCII): 403; SharedKey-signed requests for it pass")
def test_azure_sas_of_a_key_to_percent_encode(azure_server, monkeypatch):
    bucket = azure_server.make_bucket()
    azure_server.put(bucket, "sub dir/é.tar", b"abc")
    setenv(monkeypatch, azure_server.env)
    url = obstore.sign(from_url(azure_server.url(bucket)), "GET", "sub dir/é.tar", timedelta(hours=1))
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.read() == b"abc"


def test_each_fault_kind(s3_server, monkeypatch):
    """Every fault, asked for with a raw HTTP client (a presigned URL: moto refuses anonymous GETs), is what the
    client sees; the log has every GET."""
    _emulated(s3_server)
    bucket, key = s3_server.make_bucket(), "faults/shard.tar"
    body = os.urandom(10_000)
    s3_server.put(bucket, key, body)
    path = s3_server.object_path(bucket, key)
    plan = FaultPlan({(path, 0): Fault(cut_at=1000), (path, 1): Fault(status=503),
                      (path, 2): Fault(status=429, retry_after="3"), (path, 3): Fault(stall=0.5),
                      (path, 4): Fault(short_by=100), (path, 5): Fault(ignore_range=True)})
    with s3_server.proxy(plan) as proxy:
        port = int(proxy.url.rsplit(":", 1)[1])
        setenv(monkeypatch, proxy.env)
        signed = obstore.sign(from_url(s3_server.url(bucket)), "GET", key, timedelta(hours=1))
        assert signed.startswith(proxy.url + path + "?")
        target = signed[len(proxy.url):]

        def get(range_: str | None = None) -> tuple[http.client.HTTPResponse, bytes, BaseException | None]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", target, headers={"Range": range_} if range_ else {})
            resp = conn.getresponse()
            got, error = b"", None
            try:
                while chunk := resp.read1(65536):
                    got += chunk
                if len(got) < int(resp.getheader("Content-Length")):
                    error = EOFError(len(got))
            except (ConnectionError, http.client.IncompleteRead) as e:
                error = e
            conn.close()
            return resp, got, error

        resp, got, error = get()  # 0: the headers and 1000 bytes, then an RST
        assert resp.status == 200 and resp.getheader("Content-Length") == str(len(body))
        assert got == body[:1000] and isinstance(error, ConnectionResetError), error

        resp, got, error = get()  # 1: S3's SlowDown
        assert resp.status == 503 and b"<Code>SlowDown</Code>" in got and error is None

        resp, got, error = get()  # 2: 429 with Retry-After
        assert resp.status == 429 and resp.getheader("Retry-After") == "3"

        t0 = time.monotonic()  # 3: a stall before the body
        resp, got, error = get()
        assert time.monotonic() - t0 >= 0.5 and got == body and error is None

        resp, got, error = get()  # 4: 100 bytes short of the Content-Length, then the end
        assert resp.getheader("Content-Length") == str(len(body))
        assert got == body[:-100] and error is not None

        resp, got, error = get("bytes=100-")  # 5: Range ignored
        assert resp.status == 200 and resp.getheader("Content-Range") is None and got == body

        resp, got, error = get("bytes=100-")  # 6: no fault
        assert resp.status == 206 and got == body[100:] and error is None

        assert proxy.counts("GET") == {path: 7}
        assert [(r.method, r.path, r.range, r.status) for r in proxy.log] == [
            ("GET", path, None, 200), ("GET", path, None, 503), ("GET", path, None, 429), ("GET", path, None, 200),
            ("GET", path, None, 200), ("GET", path, "bytes=100-", 200), ("GET", path, "bytes=100-", 206)]
        assert plan.log[-2:] == [(path, 100, 200), (path, 100, 206)]


def test_proxy_in_front_of_each_emulator(server, monkeypatch):
    """obstore through the proxy: signed requests still pass (Azure's SharedKey signed again where the proxy drops
    a Range), planned faults hit the object's GETs, and the log counts the GETs of the object."""
    _emulated(server)
    bucket, key = server.make_bucket(), "proxied/shard.tar"
    body = os.urandom(50_000)
    server.put(bucket, key, body)
    path = server.object_path(bucket, key)
    plan = FaultPlan({(path, 0): Fault(status=503), (path, 1): Fault(status=429, retry_after="0"),
                      (path, 3): Fault(ignore_range=True)})
    with server.proxy(plan) as proxy:
        setenv(monkeypatch, proxy.env)
        store = from_url(server.url(bucket))
        assert _listed(store, "proxied/") == [(key, len(body))]
        assert obstore.head(store, key)["size"] == len(body)
        mark = proxy.mark()
        assert bytes(obstore.get_range(store, key, start=1000, end=2000)) == body[1000:2000]
        assert [(r.path, r.status) for r in proxy.since(mark)] == [(path, 503), (path, 429), (path, 206)]
        mark = proxy.mark()
        with contextlib.suppress(Exception):  # obstore 0.12 refuses a 200 to a ranged GET; not what is tested here
            obstore.get_range(store, key, start=10, end=20)
        assert [(r.path, r.range, r.status) for r in proxy.since(mark)][0] == (path, "bytes=10-19", 200)
        assert obstore.get(store, key).bytes() == body
        signs = not isinstance(server, GCSServer)
        if signs:
            url = obstore.sign(store, "GET", key, timedelta(hours=1))
            assert url.startswith(proxy.url)
            with urllib.request.urlopen(url, timeout=30) as resp:
                assert resp.read() == body
        assert proxy.counts("GET")[path] == 5 + signs
        assert proxy.counts("HEAD") == {path: 1}
        assert plan.counts[path] == 5 + signs


def test_real_endpoint_switch(s3_server, monkeypatch):
    """The VLMSTREAM_TEST_S3_* variables give a RealS3; here pointed at moto to see that it works end to end."""
    _emulated(s3_server)
    bucket = s3_server.make_bucket()
    environ = {"VLMSTREAM_TEST_S3_ENDPOINT": s3_server.endpoint, "VLMSTREAM_TEST_S3_BUCKET": bucket,
               "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "eu-west-1"}
    with RealS3(environ) as real:
        assert real.real and real.make_bucket() == bucket and real.env["AWS_REGION"] == "eu-west-1"
        real.put(bucket, "real/a.tar", b"abc")
        setenv(monkeypatch, real.env)
        store = from_url(real.url(bucket))
        assert _listed(store, "real/") == [("real/a.tar", 3)]
        with pytest.raises(pytest.skip.Exception):
            real.make_bucket("another")
        with pytest.raises(pytest.skip.Exception):
            real.proxy()
    assert _listed(store, "real/") == []  # what it wrote, deleted
    with pytest.raises(RuntimeError, match="VLMSTREAM_TEST_S3_BUCKET"):
        RealS3({"VLMSTREAM_TEST_S3_ENDPOINT": s3_server.endpoint})


def test_missing_emulators_skip_with_a_reason(monkeypatch):
    monkeypatch.setenv("VLMSTREAM_FAKE_GCS_SERVER", "/nonexistent/fake-gcs-server")
    assert "fake-gcs-server" in GCSServer.missing()
    monkeypatch.setattr(stores, "_find_azurite", lambda: (None, ".venv/npm"))
    assert "make test" in stores.AzureServer.missing()
    monkeypatch.setattr(stores.importlib.util, "find_spec", lambda name: None)
    assert "moto[server]" in S3Server.missing()


def test_stop_kills_the_process_group():
    if GCSServer.missing():
        pytest.skip(GCSServer.missing())
    with GCSServer() as gcs:
        pid = gcs.proc.pid
        assert gcs.make_bucket() == "bucket1"
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, signal.SIGCONT)  # a signal that would do no harm, had the group survived
