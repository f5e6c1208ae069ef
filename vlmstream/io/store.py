"""Object stores: s3:// (AWS and S3-compatible: R2, MinIO, Ceph), gs:// and az:// / abfs[s]://, through obstore.

Reading goes through the same HTTP engine as http(s):// (io/http.py): each request for an object is a URL that
`signed_request` signs just before it is sent (S3 SigV4, GCS V4, an Azure SAS), or a plain one where no
signature is wanted (a public bucket with ``skip_signature``, the GCS emulator). So retries on throttling
(S3's 503 SlowDown, 429) and resets, the resume of a broken transfer by a ranged GET (a changed ETag is an
error), the low-speed limit, read-ahead, the shard cache and resume by reference are those of HTTP, with one
GET per shard. Listing, heads, uploads, copies and deletes are obstore's.

Credentials, endpoints and regions are read where each cloud's own tools read them: obstore reads the
environment (``AWS_*`` with ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``GOOGLE_*``, ``AZURE_*``) and
instance metadata; with boto3 installed, S3 credentials also come from AWS profiles and config files
(``AWS_PROFILE``, ``~/.aws``) when the environment holds no keys; ``STORAGE_EMULATOR_HOST`` points gs:// at an
emulator, as Google's client libraries do. ``options`` passed in (e.g. ``vs.shards(..., storage_options=...)``)
override them. Signed URLs, keys and tokens are never shown: URLs are redacted by the name of their query
parameters (errors.redact), and the s3:// URL is what errors and checkpoints name.

obstore's runtime does not survive fork(): a process forked after it was used cannot use it again. vs.Loader
starts its workers with "forkserver" when a pipeline reads object-store URLs (core/loader.py).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping
from urllib.parse import quote, urlsplit

from ..errors import FetchError, redact

SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs", "az": "az", "azure": "az", "abfs": "az", "abfss": "az"}
SIGNED_FOR = datetime.timedelta(hours=6)  # how long one request's signature is valid (each request signs anew)
_ABFS = re.compile(r"([^@/]+)@([^./]+)\.(?:dfs|blob)\.core\.windows\.net")


def is_store_url(url: str) -> bool:
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


@dataclass(frozen=True)
class ObjectURL:
    """An object (or a key prefix) in a bucket: ``s3://bucket/key``, ``gs://bucket/key``, ``az://container/key``
    or ``abfs[s]://container@account.dfs.core.windows.net/key``."""

    scheme: str  # s3, gs or az
    bucket: str  # the bucket, or the Azure container
    key: str
    account: str | None = None  # Azure: the account named in an abfs URL (else the environment's)
    text: str = field(default="", compare=False)  # the URL as written

    @classmethod
    def parse(cls, url: str) -> "ObjectURL":
        raw_scheme, _, rest = url.partition("://")
        scheme = SCHEMES.get(raw_scheme.lower())
        if scheme is None:
            raise ValueError(f"{redact(url)}: not an object-store URL (s3://, gs://, az://, abfs://)")
        bucket, _, key = rest.partition("/")
        account = None
        m = _ABFS.fullmatch(bucket)
        if m:
            bucket, account = m.groups()
        if not bucket or "?" in url or "#" in url:
            raise ValueError(f"{redact(url)}: expected {raw_scheme}://BUCKET/KEY")
        return cls(scheme, bucket, key, account, url)

    def __str__(self) -> str:
        return self.text or f"{self.scheme}://{self.bucket}/{self.key}"

    def with_key(self, key: str) -> "ObjectURL":
        """The object ``key`` of the same bucket, written as this URL writes its bucket."""
        head = str(self)[: len(str(self)) - len(self.key)] if self.text.endswith(self.key) else \
            f"{self.scheme}://{self.bucket}/"
        return ObjectURL(self.scheme, self.bucket, key, self.account, head + key)

    @property
    def origin(self) -> tuple[str, str, str | None]:
        """What a remote manifest's entries must share with it: the store, the bucket (and the Azure account)."""
        return self.scheme, self.bucket, self.account


# ---------------------------------------------------------------------------------------------------- stores


ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_", "AZURITE_", "STORAGE_EMULATOR_HOST")


def store_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables the store clients read (``AWS_*``, ``GOOGLE_*``, ``AZURE_*``, the emulators')."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.startswith(ENV_PREFIXES)}


class Stores:
    """obstore stores by bucket, made on first use in this process with the environment's settings plus
    ``options``. Sent to another process (a DataLoader worker started by forkserver or spawn), it takes the
    store variables of the sending process's environment along: a worker reads what the pipeline was built
    with. A process forked after a store was used must not use it (obstore's runtime does not survive fork):
    `check_not_forked` says so instead of hanging."""

    def __init__(self, options: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None):
        self.options = dict(options or {})
        self.environ = dict(environ) if environ is not None else None  # None: this process's own
        self._stores: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Stores(options={sorted(self.options)})"  # names only: values may be secrets

    def __getstate__(self) -> dict[str, Any]:  # stores are made again where they are used
        return {"options": self.options,
                "environ": self.environ if self.environ is not None else store_environment()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["options"], state["environ"])

    def get(self, u: ObjectURL) -> Any:
        check_not_forked()
        key = (u.scheme, u.bucket, u.account)
        with self._lock:
            store = self._stores.get(key)
            if store is None:
                if self.environ is not None:  # the clients read the environment: the one the pipeline had
                    os.environ.update(self.environ)
                store = self._stores[key] = _make(u, self.options)
                _used_in.add(os.getpid())
        return store


DEFAULT_STORES = Stores()  # settings from the environment alone: what a URL opened without others uses

_used_in: set[int] = set()  # processes that used obstore: a child forked from one of them cannot


def _forked() -> None:
    global _forked_after_use
    _forked_after_use = bool(_used_in)


_forked_after_use = False
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def check_not_forked() -> None:
    if _forked_after_use:
        raise RuntimeError("object-store URLs in a process forked after the store client was used (its runtime "
                           "does not survive fork): start DataLoader workers with multiprocessing_context="
                           "'forkserver' or 'spawn' (vs.Loader does this for you)")


def _obstore() -> Any:
    try:
        import obstore
    except ImportError:
        raise ImportError("object-store URLs (s3://, gs://, az://) need obstore: pip install 'vlmstream[stores]'"
                          ) from None
    return obstore


def _make(u: ObjectURL, options: Mapping[str, Any]) -> Any:
    """A store for ``u``'s bucket: obstore reads the environment; ``options`` add to it or override it."""
    _obstore()
    from obstore import store as st

    config = dict(options)
    if u.scheme == "s3":
        endpoint = next((config[k] for k in ("endpoint", "aws_endpoint", "endpoint_url", "aws_endpoint_url")
                         if k in config), None)
        if endpoint is not None:  # explicit settings win: obstore lets AWS_ENDPOINT_URL_S3 beat a plain "endpoint"
            config["aws_endpoint_url_s3"] = endpoint
        kw: dict[str, Any] = {}
        if not any(k in os.environ for k in ("AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE")) and \
                not config.get("skip_signature") and "access_key_id" not in config:
            provider = _boto3_provider()
            if provider is not None:
                kw["credential_provider"] = provider
        return st.S3Store(u.bucket, config=config, **kw)
    if u.scheme == "gs":
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        configured = any(k.startswith("GOOGLE_SERVICE_ACCOUNT") or k == "GOOGLE_APPLICATION_CREDENTIALS"
                         for k in os.environ)
        if emulator and not config and not configured:  # an emulator needs no credentials
            return st.GCSStore(u.bucket, config={"service_account_key": json.dumps(
                {"gcs_base_url": _http(emulator), "disable_oauth": True, "client_email": "", "private_key": ""})})
        return st.GCSStore(u.bucket, config=config)
    if u.account is not None:
        config.setdefault("account_name", u.account)
    return st.AzureStore(u.bucket, config=config)


def _boto3_provider() -> Any:
    """AWS profiles and config files, as the AWS CLI reads them, where boto3 is installed."""
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        return None
    session = boto3.Session()
    return Boto3CredentialProvider(session) if session.get_credentials() is not None else None


def _http(host: str) -> str:
    return host if "://" in host else f"http://{host}"


# --------------------------------------------------------------------------------------------------- reading


def signed_request(url: str, stores: Stores) -> tuple[str, dict[str, str]]:
    """(the HTTP(S) URL, the headers) of one GET of the object at ``url``, signed now."""
    u = ObjectURL.parse(url)
    store = stores.get(u)
    if u.scheme == "gs" and ("STORAGE_EMULATOR_HOST" in os.environ and not stores.options
                             or _skips_signature(store)):
        base = _http(os.environ.get("STORAGE_EMULATOR_HOST", "https://storage.googleapis.com"))
        return f"{base}/{u.bucket}/{quote(u.key, safe='/')}", {}
    try:
        signed = _obstore().sign(store, "GET", u.key, SIGNED_FOR)
    except Exception as e:  # noqa: BLE001 - obstore's errors: a configuration that cannot sign
        raise FetchError(f"{redact(url)}: cannot sign a request for it ({type(e).__name__}: {_first_line(e)}); "
                         "check the store's credentials (docs/PIPELINE.md, object stores)", reason="auth") from None
    if _skips_signature(store):  # a public bucket: the plain URL of the object
        signed = urlsplit(signed)._replace(query="").geturl()
    return signed, {}


def _skips_signature(store: Any) -> bool:
    return str(getattr(store, "config", {}).get("skip_signature", "")).lower() in ("true", "1")


def _first_line(e: BaseException) -> str:
    return redact(str(e).strip().splitlines()[0] if str(e).strip() else "")


class _Errors:
    """obstore's errors as FetchErrors whose message names the store URL and keeps no secret (a SAS token in a
    configured URL, a signature): "not found" stays a FileNotFoundError."""

    def __init__(self, url: str, what: str):
        self.url, self.what = url, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, e: BaseException | None, tb: Any) -> bool:
        if e is None or isinstance(e, (FetchError, KeyboardInterrupt)) or not isinstance(e, Exception):
            return False
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(f"{redact(self.url)}: no such object") from None
        raise FetchError(f"{redact(self.url)}: {self.what} failed: {type(e).__name__}: {_first_line(e)}",
                         reason="store_error") from None


def list_objects(prefix_url: str, stores: Stores) -> Iterator[tuple[str, int, str | None]]:
    """(URL, size, ETag) of every object whose key starts with ``prefix_url``'s key, in key order. (Stores list
    by whole path segments: the listing is of the prefix's folder, narrowed here.)"""
    u = ObjectURL.parse(prefix_url)
    store = stores.get(u)
    folder = u.key.rsplit("/", 1)[0] if "/" in u.key else ""
    found = []
    with _Errors(prefix_url, "listing"):
        for batch in _obstore().list(store, prefix=folder or None):
            for meta in batch:
                if meta["path"].startswith(u.key):
                    found.append((meta["path"], meta["size"], meta.get("e_tag")))
    for key, size, etag in sorted(found):
        yield str(u.with_key(key)), size, etag


# --------------------------------------------------------------------------------------------------- writing


def put_file(url: str, path: str, stores: Stores) -> None:
    """Upload a local file to ``url`` (multipart for a large one: nothing appears until it is whole)."""
    u = ObjectURL.parse(url)
    with open(path, "rb") as f, _Errors(url, "upload"):
        _obstore().put(stores.get(u), u.key, f, use_multipart=os.path.getsize(path) > 64 << 20)


def put_bytes(url: str, data: bytes, stores: Stores) -> None:
    u = ObjectURL.parse(url)
    with _Errors(url, "upload"):
        _obstore().put(stores.get(u), u.key, data)


def read_bytes(url: str, stores: Stores) -> bytes | None:
    """The object's bytes, or None where it does not exist (a small object: a manifest)."""
    u = ObjectURL.parse(url)
    try:
        with _Errors(url, "read"):
            return bytes(_obstore().get(stores.get(u), u.key).bytes())
    except FileNotFoundError:
        return None


def copy(src: str, dst: str, stores: Stores) -> None:
    """A server-side copy within one bucket."""
    s, d = ObjectURL.parse(src), ObjectURL.parse(dst)
    with _Errors(src, "copy"):
        _obstore().copy(stores.get(s), s.key, d.key)


def delete(url: str, stores: Stores) -> None:
    u = ObjectURL.parse(url)
    try:
        with _Errors(url, "delete"):
            _obstore().delete(stores.get(u), u.key)
    except FileNotFoundError:
        pass


__all__ = ["DEFAULT_STORES", "ObjectURL", "SCHEMES", "SIGNED_FOR", "Stores", "check_not_forked", "copy", "delete",
           "is_store_url", "list_objects", "put_bytes", "put_file", "read_bytes", "signed_request"]
