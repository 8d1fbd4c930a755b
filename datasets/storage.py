"""URL -> filesystem, with object-storage endpoint and credentials (docs/architecture.md "Storage").

Every path in yworld is a URL: `s3://bucket/prefix`, `file:///abs/path` or a plain local path. This module
builds the fsspec filesystem (s3fs for s3://) or the native pyarrow filesystem for one URL, and turns the
three failures people actually hit (wrong endpoint, missing bucket, bad credentials) into one
`StorageError` line instead of a botocore traceback.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field, replace
from typing import Iterator
from urllib.parse import urlparse, urlsplit, urlunsplit

import fsspec

from yworld.model.errors import StorageError

S3_SCHEMES = ("s3", "s3a")
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class StorageOptions:
    """Object-storage settings (YAML `storage:` section). Empty fields fall back to the standard AWS
    environment variables (AWS_ENDPOINT_URL[_S3], AWS_REGION / AWS_DEFAULT_REGION) and, for the key and
    secret, to the AWS credential chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, instance role)."""

    endpoint_url: str = ""
    key: str = ""
    secret: str = field(default="", repr=False)  # never in a repr, a log line or a traceback
    region: str = ""
    anon: bool = False

    def resolved(self) -> "StorageOptions":
        """Fill endpoint and region from the environment of *this* process (call it on the driver, so Ray
        workers get the same values whatever their environment)."""
        env = os.environ
        return replace(
            self,
            endpoint_url=self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3", "") or env.get("AWS_ENDPOINT_URL", ""),
            key=self.key or env.get("AWS_ACCESS_KEY_ID", ""),
            secret=self.secret or env.get("AWS_SECRET_ACCESS_KEY", ""),
            region=self.region or env.get("AWS_REGION", "") or env.get("AWS_DEFAULT_REGION", ""),
        )


def is_s3(url: str) -> bool:
    return urlparse(str(url)).scheme in S3_SCHEMES


def is_local(url: str) -> bool:
    return urlparse(str(url)).scheme in ("", "file") or (len(str(url)) > 1 and str(url)[1] == ":")


def local_path(url: str) -> str:
    """Absolute local path of a `file://` URL or plain path."""
    url = str(url)
    if url.startswith("file://"):
        url = url[len("file://"):]
    return os.path.abspath(os.path.expanduser(url))


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with '/', keeping the scheme."""
    out = str(url).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def _session_token(opts: StorageOptions) -> str | None:
    # Temporary credentials from the environment come with a session token; keep them together.
    if opts.key and opts.key == os.environ.get("AWS_ACCESS_KEY_ID"):
        return os.environ.get("AWS_SESSION_TOKEN") or None
    return None


# Timeouts (seconds) and attempts. The read timeout bounds how long an endpoint that accepts the connection
# but never answers can hold a request; botocore makes at most ATTEMPTS of each request (standard mode:
# backoff on throttling and 5xx) and s3fs's own retry loop around it is turned off, so a silent endpoint
# fails a call in about ATTEMPTS x READ_TIMEOUT_S. The fail-fast probe makes one attempt with short
# timeouts: a bad endpoint is one StorageError line within ~10 s.
CONNECT_TIMEOUT_S, READ_TIMEOUT_S, ATTEMPTS = 10, 20, 3
PROBE_CONNECT_TIMEOUT_S, PROBE_READ_TIMEOUT_S = 5, 10


def _s3_kwargs(options: StorageOptions, fast_fail: bool = False) -> dict:
    opts = options.resolved()
    client_kwargs = {}
    if opts.endpoint_url:
        client_kwargs["endpoint_url"] = opts.endpoint_url
    client_kwargs["region_name"] = opts.region or "us-east-1"
    kwargs: dict = {"client_kwargs": client_kwargs, "anon": opts.anon}
    if opts.key and not opts.anon:
        kwargs["key"] = opts.key
        kwargs["secret"] = opts.secret
        kwargs["token"] = _session_token(opts)
    if fast_fail:
        config = {"retries": {"total_max_attempts": 1}, "connect_timeout": PROBE_CONNECT_TIMEOUT_S,
                  "read_timeout": PROBE_READ_TIMEOUT_S}
    else:
        config = {"retries": {"total_max_attempts": ATTEMPTS, "mode": "standard"},
                  "connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S}
    kwargs["config_kwargs"] = config
    # No folder-listing cache: fsspec hands back one cached filesystem per set of options, and its listings
    # never expire, so a long-running process (eval-watch as a service) would never see what other
    # processes write after its first look (new checkpoints, another watcher's done.json).
    kwargs["use_listings_cache"] = False
    return kwargs


def _s3(options: StorageOptions, fast_fail: bool = False):
    import s3fs

    fs = s3fs.S3FileSystem(**_s3_kwargs(options, fast_fail))
    fs.retries = 1  # s3fs's own loop (default 5 tries) would multiply botocore's attempts and timeouts
    return fs


def filesystem(url: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a URL. s3:// paths come back as `bucket/key`."""
    options = options or StorageOptions()
    if is_s3(url):
        parsed = urlparse(url)
        return _s3(options), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if is_local(url):
        return fsspec.filesystem("file"), local_path(url)
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def pyarrow_filesystem(url: str, options: StorageOptions | None = None):
    """(pyarrow.fs.FileSystem, path) for a URL; native S3 client for s3:// (faster than going through fsspec)."""
    import pyarrow.fs as pafs

    options = (options or StorageOptions()).resolved()
    if is_s3(url):
        parsed = urlparse(url)
        kwargs: dict = {"region": options.region or "us-east-1", "anonymous": options.anon,
                        "connect_timeout": CONNECT_TIMEOUT_S, "request_timeout": READ_TIMEOUT_S,
                        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=ATTEMPTS)}
        if options.endpoint_url:
            ep = urlparse(options.endpoint_url)
            kwargs["endpoint_override"] = ep.netloc or ep.path
            kwargs["scheme"] = ep.scheme or "https"
        if options.key and not options.anon:
            kwargs["access_key"] = options.key
            kwargs["secret_key"] = options.secret
            kwargs["session_token"] = _session_token(options)
        return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if is_local(url):
        return pafs.LocalFileSystem(), local_path(url)
    fs, path = filesystem(url, options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def redact_url(url: str) -> str:
    """`url` fit to print: credentials inside it become `***` (`http://user:***@host`; a lone user part,
    often a token, `http://***@host`)."""
    try:
        parts = urlsplit(str(url))
        if "@" not in parts.netloc:
            return str(url)
        host = parts.netloc.rpartition("@")[2]
        user = f"{parts.username}:***" if parts.password is not None else "***"
        return urlunsplit(parts._replace(netloc=f"{user}@{host}"))
    except ValueError:  # not a URL we can parse: print nothing of it that could be a credential
        return "<unprintable URL>" if "@" in str(url) else str(url)


def _where(url: str, options: StorageOptions) -> str:
    ep = redact_url(options.resolved().endpoint_url) or "the default AWS endpoint"
    return f"{redact_url(url)} (endpoint {ep})"


def storage_error(exc: BaseException, url: str, options: StorageOptions | None = None) -> StorageError | None:
    """The one-line StorageError for a storage-level failure, or None when `exc` is not one."""
    if not is_s3(url):
        return None  # local errors (permissions, missing files) keep their own meaning
    options = options or StorageOptions()
    where = _where(url, options)
    text = f"{type(exc).__name__}: {exc}"
    bucket = urlparse(url).netloc if is_s3(url) else ""
    conn_markers = ("EndpointConnectionError", "ConnectTimeout", "ClientConnectorError", "Could not connect",
                    "Connection refused", "connect to the endpoint", "Name or service not known",
                    "CURL", "curlCode", "Couldn't connect", "Timeout was reached")
    if any(m in text for m in conn_markers):
        return StorageError(f"cannot reach object storage for {where}: connection failed; "
                            "check --endpoint-url / storage.endpoint_url / AWS_ENDPOINT_URL")
    if any(m in text for m in ("ReadTimeout", "Read timeout", "ServerTimeoutError", "TimeoutError", "timed out")):
        return StorageError(f"object storage for {where} accepted the connection but did not answer in time; "
                            "check that the endpoint is an S3 service (storage.endpoint_url / AWS_ENDPOINT_URL)")
    if isinstance(exc, PermissionError) or any(m in text for m in (
            "AccessDenied", "ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")):
        return StorageError(f"access denied to {where}: check the access key and secret "
                            "(--key/--aws-secret-file, storage.key/storage.secret, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    if bucket and any(m in text for m in ("NoSuchBucket", "bucket does not exist", "NO_SUCH_BUCKET")):
        return StorageError(f"bucket '{bucket}' does not exist at {where}: create it or fix the URL")
    return None


@contextlib.contextmanager
def storage_errors(url: str, options: StorageOptions | None = None) -> Iterator[None]:
    """Translate storage-level failures inside the block into one StorageError line; other errors pass."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        err = storage_error(e, url, options)
        if err is None:
            raise
        raise err from e


def probe(url: str, options: StorageOptions | None = None) -> None:
    """Fail fast, with one StorageError line, when `url` cannot be used: for s3:// the endpoint is
    reachable, the bucket exists and the credentials are accepted (a HeadBucket request)."""
    options = options or StorageOptions()
    if not is_s3(url):
        return
    bucket = urlparse(url).netloc
    fs = _s3(options, fast_fail=True)
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise StorageError(f"bucket '{bucket}' does not exist at {_where(url, options)}: "
                           "create it or fix the URL") from None
    except Exception as e:
        err = storage_error(e, url, options)
        if err is None:
            raise StorageError(f"cannot use {_where(url, options)}: {type(e).__name__}: {e}") from e
        raise err from None


def make_parent_dirs(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Create the parent folder of `path` on local disks. Object stores have no folders (and s3fs's
    makedirs would create a missing *bucket*, hiding a wrong URL), so nothing is done there."""
    if is_object_store(fs):
        return
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return any(p in ("s3", "s3a", "gs", "gcs", "abfs", "az") for p in protocols)


def tmp_name(name: str) -> str:
    """A unique temporary name for `name` in the same folder. The leading '.' hides it from Arrow / Ray
    dataset discovery, which skips names starting with '.' or '_'."""
    return f".{name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so readers never see a partial file: write a hidden temporary name beside it,
    then rename (local: atomic rename; S3: server-side copy then delete; an object only becomes visible
    once its upload has completed, so a killed writer leaves at most a hidden orphan)."""
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/{tmp_name(name)}"
    make_parent_dirs(fs, path)
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    finally:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)


def read_bytes(url: str, options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(url, options)
    with storage_errors(url, options):
        return fs.cat_file(path)
