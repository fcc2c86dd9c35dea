"""A small filesystem shim: local paths through ``os``, anything with ``://`` through fsspec.

Everything that writes goes through ``atomic_write`` so a reader never sees a half-written shard, manifest or
checkpoint: locally a temporary file is renamed into place, on object stores a single PUT (or a completed
multipart upload) only becomes visible when it is whole.

Every object-store call goes through ``with_retries``: an outage (the store restarting, the network gone) is
waited out for up to ``storage.outage_timeout_s`` (BGSPLIT_OUTAGE_TIMEOUT_S, default 10 minutes) and then
reported as one StorageOutage line; an answer that will not change (no such object, access denied) is raised at
once. Reads go in ranges so that an outage in the middle of a shard resumes at the byte where it stopped, and
the next ranges can be fetched while one is consumed (``open_range(read_ahead=...)``): a real store's first-byte
latency is then paid while the reader works, not on top of it.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import io
import itertools
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TypeVar

log = logging.getLogger("bgsplit.storage")
T = TypeVar("T")
A = TypeVar("A")

OUTAGE_ENV = "BGSPLIT_OUTAGE_TIMEOUT_S"
DEFAULT_OUTAGE_TIMEOUT_S = 600.0
BACKOFF_START_S = 0.2
BACKOFF_CAP_S = 10.0
STATS: dict[str, float] = {"retries": 0, "failures": 0, "bytes_read": 0, "outage_seconds": 0.0, "throttled": 0}
"""Per-process counts reported in the run summary: re-attempted calls, calls that gave up (StorageOutage), bytes
fetched by ``open_range`` (so a resumed read can be told from a re-read), seconds spent waiting out outages, and
throttling answers from the store (503 SlowDown, 429), each one, those s3fs retried by itself included."""
RETRY_AFTER_CAP_S = 60.0
"""The longest wait a store's Retry-After header is taken at (still within the outage timeout)."""
_stats_lock = threading.Lock()


class StorageOutage(OSError):
    """The object store stayed unreachable for the whole outage timeout. An OSError so that code that already
    handles I/O failures still sees one, but its own type so that a caller can tell 'the store is down' from 'this
    object is bad'."""

    def __init__(self, message: str, last_error: BaseException | None = None):
        super().__init__(message)
        self.last_error = last_error

    def __reduce__(self):
        # the message only: it crosses process boundaries (loader workers, ingest pool), the library error may not
        return type(self), (str(self),)


class DiskFull(OSError):
    """A local write ran out of room (ENOSPC, or EDQUOT: over quota). One line: the file, the bytes it needed and
    the room there was, and the fix; the partial file is already gone. Waiting does not cure a full disk, so it is
    never retried: the caller stops (a training run with its previous checkpoint intact)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return type(self), (self.message,)


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full(path: str, needed: int | None, written: int, what: str = "") -> DiskFull:
    """The one-line DiskFull for a write of ``path`` that failed for room (``needed``: its size when known,
    ``written``: the bytes it got down)."""
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
        free = f"{st.f_bavail * st.f_frsize:,} bytes were free there"
    except OSError:
        free = "the free space there is unknown"
    size = f"it needed {needed:,} bytes" if needed is not None else f"it had {written:,} bytes down and needed more"
    return DiskFull(f"no space left on device writing {path}{what}: {size} and {free}; free space on that disk "
                    "or write to a larger one (run.out_dir; TMPDIR for upload staging)")


def _sync(f: IO[bytes], path: str) -> None:
    """Flush and fsync a file being written (``path``: where it is being written): where a full disk (or a network filesystem's quota) usually shows
    itself, since writes only fill the page cache. Its own function so a test can fail it as a full disk would."""
    f.flush()
    os.fsync(f.fileno())


def configure(*, outage_timeout_s: float | None = None) -> None:
    """Process-wide settings. Written to the environment because loader workers (forked or spawned), ingest's
    forkserver pool and Ray workers all read it from there: a module global would not reach the spawned ones."""
    if outage_timeout_s is not None:
        if not outage_timeout_s > 0:
            raise ValueError(f"storage.outage_timeout_s must be > 0 seconds, got {outage_timeout_s!r}")
        os.environ[OUTAGE_ENV] = repr(float(outage_timeout_s))


def outage_timeout() -> float:
    """Read at every call, not at import, so that a setting made after the import (a test, a launcher) counts."""
    raw = os.environ.get(OUTAGE_ENV, "").strip()
    if not raw:
        return DEFAULT_OUTAGE_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{OUTAGE_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{OUTAGE_ENV}={raw!r} must be > 0 seconds")
    return value


def _count(key: str, n: float = 1) -> None:
    with _stats_lock:  # the checkpoint writer thread and the training thread both do I/O
        STATS[key] += n


# -- what is worth waiting for -------------------------------------------------------------------------------------
# Local filesystem verdicts: retrying cannot make a missing object appear or a permission be granted.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
             StorageOutage)
# errnos of a network that is (for now) not there, and the ones s3fs gives 5xx/SlowDown answers (EBUSY, EREMOTEIO)
TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
                    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET, errno.EHOSTDOWN,
                    errno.EAGAIN, errno.EBUSY, errno.EIO, getattr(errno, "EREMOTEIO", errno.EIO)}
# S3 answers that mean "not now" rather than "no": botocore's own throttling list plus the 5xx codes
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
                   "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
                   "BandwidthLimitExceeded", "ProvisionedThroughputExceededException", "LimitExceededException",
                   "PriorRequestNotComplete", "RequestTimeout", "RequestTimeoutException", "InternalError",
                   "ServiceUnavailable", "503", "500", "502", "504"}


def _client_error_is_transient(exc) -> bool:
    response = getattr(exc, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code", ""))
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    try:
        status = int(status) if status is not None else None
    except (TypeError, ValueError):
        status = None
    return code in TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429))


def is_transient(exc: BaseException) -> bool:
    """True for failures that waiting can cure (the store, or the network to it, is down or overloaded); False
    for answers that will not change (no such object, no permission, a bad request, a bug), which are raised at
    once instead of being retried for ten minutes."""
    if isinstance(exc, PERMANENT):
        return False
    try:
        import botocore.exceptions as bce
    except ImportError:  # no S3 support installed: only builtin and aiohttp errors can occur
        bce = None
    if bce is not None:
        if isinstance(exc, bce.ClientError):
            return _client_error_is_transient(exc)
        if isinstance(exc, bce.SSLError):
            return False  # a certificate or TLS configuration problem: the same answer every time
        if isinstance(exc, (bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError, bce.ChecksumError)):
            return True  # refused, reset, closed, timed out, proxy down, body cut short or corrupted in flight
        if isinstance(exc, bce.BotoCoreError):
            return False  # no credentials, bad parameters, unknown region: configuration, not the network
    try:
        import aiohttp
    except ImportError:
        aiohttp = None
    if aiohttp is not None and isinstance(exc, aiohttp.ClientError):
        if isinstance(exc, aiohttp.ClientResponseError):
            return (exc.status or 0) >= 500 or exc.status == 429
        if isinstance(exc, aiohttp.ClientSSLError):
            return False
        return not isinstance(exc, aiohttp.InvalidURL)  # connection, payload and timeout errors
    if isinstance(exc, (ConnectionError, TimeoutError)):  # refused, reset, aborted, broken pipe; asyncio timeouts
        return True
    if isinstance(exc, OSError):
        # s3fs turns S3 error answers into OSErrors and keeps the answer as the cause: judge the answer itself
        cause = exc.__cause__
        if bce is not None and isinstance(cause, bce.ClientError):
            return _client_error_is_transient(cause)
        return exc.errno is None or exc.errno in TRANSIENT_ERRNOS
    return False


# -- waiting outages out --------------------------------------------------------------------------------------------
class _Outage:
    """The process-wide view of an outage: concurrent calls (loader thread, checkpoint writer) that fail together
    make one outage with one start and one end line, not one per call or per attempt."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.failing = 0
        self.since = 0.0

    def begin(self, what: str, exc: BaseException, timeout: float) -> None:
        with self.lock:
            self.failing += 1
            first = self.failing == 1
            if first:
                self.since = time.monotonic()
        if first:
            log.warning("object store outage: %s failed (%s); retrying with back-off for up to %gs "
                        "(storage.outage_timeout_s)", what, _describe(exc), timeout)

    def end(self, what: str, recovered: bool) -> None:
        with self.lock:
            self.failing -= 1
            last = self.failing == 0
            duration = time.monotonic() - self.since
        if last:
            _count("outage_seconds", duration)
            if recovered:
                log.warning("object store recovered after %.1fs of outage (%s went through)", duration, what)


_outage = _Outage()


def _client_error(exc: BaseException):
    """The botocore ClientError behind ``exc`` (s3fs keeps it as the cause of its OSError), or None."""
    for e in (exc, exc.__cause__):
        if e is not None and hasattr(e, "response") and isinstance(getattr(e, "response"), dict):
            return e
    return None


def retry_after(exc: BaseException) -> float | None:
    """Seconds a store's answer asked the client to wait (its Retry-After header: seconds or an HTTP date), or
    None when it named none."""
    value = None
    error = _client_error(exc)
    if error is not None:
        headers = (error.response.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}
        value = {str(k).lower(): v for k, v in headers.items()}.get("retry-after")
    elif getattr(exc, "headers", None) is not None:  # aiohttp's ClientResponseError
        value = exc.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        import email.utils

        try:
            return max(0.0, email.utils.parsedate_to_datetime(str(value)).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _on_s3_attempt(response=None, **_) -> None:
    """botocore's per-attempt hook: counts each throttling answer, also those s3fs retries on its own before
    with_retries sees anything. Returns None, so retrying is decided as before."""
    if response is not None and getattr(response[0], "status_code", 0) in (429, 503):
        _count("throttled")


def _watch(fs) -> None:
    """Count this s3fs filesystem's throttling answers (once per client it makes: a fork or a refresh makes a new
    one)."""
    client = fs.s3
    if getattr(fs, "_bgsplit_watched", None) is not client:
        client.meta.events.register("needs-retry.s3", _on_s3_attempt)
        fs._bgsplit_watched = client


def _describe(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())  # one line whatever the library put in its message
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


def _backoff(attempt: int) -> float:
    """Capped exponential, with +-10% jitter so that many workers hit by the same outage do not retry in step."""
    return min(BACKOFF_START_S * 2 ** attempt, BACKOFF_CAP_S) * random.uniform(0.9, 1.1)


def with_retries(fn: Callable[[], T], what: str, outage_timeout_s: float | None = None) -> T:
    """Call ``fn``, waiting out a transient failure until the store has been unreachable for the outage timeout
    (counted from this call's first failure), then raise StorageOutage. A deadline, not an attempt count: an
    object store restart or a network blip takes tens of seconds, and a training run should sit it out rather
    than die on it. Permanent errors are raised at once."""
    timeout = outage_timeout() if outage_timeout_s is None else outage_timeout_s
    first_failure: float | None = None
    attempt, reached = 0, False
    try:
        while True:
            try:
                result = fn()
            except Exception as e:
                if not is_transient(e):
                    reached = True  # an answer, even "no": the store is there
                    raise
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                    _outage.begin(what, e, timeout)
                waited = now - first_failure
                if waited >= timeout:
                    _count("failures")
                    raise StorageOutage(
                        f"{what}: the object store failed for {waited:.1f}s ({attempt + 1} attempts), last error "
                        f"{_describe(e)}; check the object store, or raise storage.outage_timeout_s "
                        f"(now {timeout:g}s, {OUTAGE_ENV})", last_error=e) from None
                # a store that says when to come back (Retry-After, as a throttling store may) is taken at its word
                asked = retry_after(e)
                wait = _backoff(attempt) if asked is None else min(max(asked, BACKOFF_START_S), RETRY_AFTER_CAP_S)
                time.sleep(max(0.0, min(wait, timeout - waited)))
                attempt += 1
                _count("retries")
                continue
            reached = True
            return result
    finally:
        if first_failure is not None:
            _outage.end(what, recovered=reached)


def is_remote(url: str) -> bool:
    """Anything with a scheme (s3://, gs://, memory://, file://) goes through fsspec; plain paths through os."""
    return "://" in url


def join(base: str, *parts: str) -> str:
    """``base``/``parts``; a part that is itself a URL or an absolute path starts afresh (as os.path.join does),
    so a manifest can list shards that live in another set. ``..`` segments are resolved (lexically), so a part
    relative to a set's folder (``../train/shard-000000.tar``: how `shards add-labels` lists its parent's shards)
    names the same object on any machine; on an object store they never climb above the bucket."""
    for i in range(len(parts) - 1, -1, -1):
        if is_remote(parts[i]) or (not is_remote(base) and os.path.isabs(parts[i])):
            return join(parts[i], *parts[i + 1:])
    if is_remote(base):
        return normalize("/".join([base.rstrip("/"), *[p.strip("/") for p in parts]]))
    return normalize(os.path.join(base, *parts))


def _has_dots(path: str, sep: str) -> bool:
    return ".." in path.split(sep)


def normalize(url: str) -> str:
    """``url`` with its ``.`` and ``..`` segments resolved, when it has a ``..`` (otherwise unchanged, so every name
    that never had one stays byte-identical). Raises ValueError for a URL whose ``..`` climbs above its bucket."""
    if not is_remote(url):
        return os.path.normpath(url) if _has_dots(url.replace(os.sep, "/"), "/") else url
    scheme, rest = url.split("://", 1)
    if not _has_dots(rest, "/"):
        return url
    anchor, *segments = rest.split("/")
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if not kept:
                raise ValueError(f"{url} climbs above {scheme}://{anchor}: a path relative to a set's folder cannot "
                                 "leave its bucket; list the object by its full URL")
            kept.pop()
        elif segment not in ("", "."):
            kept.append(segment)
    return "/".join([f"{scheme}://{anchor}", *kept])


def absolute(url: str) -> str:
    """The location of ``url`` independent of the working directory: an absolute path, or the normalised URL."""
    return normalize(url) if is_remote(url) else os.path.abspath(url)


def relative(url: str, folder: str) -> str | None:
    """``url`` as a path relative to ``folder`` (``../train/shard-000000.tar``), such that ``join(folder, result)``
    is ``url`` again; None when no such path exists: one is local and the other a URL, or they are URLs of another
    scheme or bucket."""
    if is_remote(url) != is_remote(folder):
        return None
    if not is_remote(url):
        return os.path.relpath(os.path.abspath(url), os.path.abspath(folder))
    (scheme, rest), (folder_scheme, folder_rest) = normalize(url).split("://", 1), normalize(folder).split("://", 1)
    anchor, _, path = rest.partition("/")
    folder_anchor, _, folder_path = folder_rest.rstrip("/").partition("/")
    if (scheme, anchor) != (folder_scheme, folder_anchor):
        return None
    import posixpath

    return posixpath.relpath("/" + path, "/" + folder_path)


def dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] if is_remote(url) else os.path.dirname(url)


CALL_TIMEOUT_S = 60.0
SLOWEST_BYTES_PER_S = 1 << 20
"""Every object-store request is bounded: 60 s plus its bytes at 1 MB/s. A request that never answers (seen
once: an upload in flight when the store went down never returned, long after the store came back) is then
abandoned and retried like any other transient failure, instead of hanging the run."""
UPLOAD_CHUNK = 64 << 20
"""Multipart part size of uploads; smaller objects go up in one PUT."""


def _call(fs, method: str, *args, nbytes: int = 0, **kwargs):
    """One request on an fsspec filesystem, with the time bound above when the filesystem is asynchronous
    (s3fs: fsspec then cancels it); synchronous ones (memory://, file://) are called as they are."""
    if getattr(fs, "async_impl", False):
        kwargs["timeout"] = CALL_TIMEOUT_S + nbytes / SLOWEST_BYTES_PER_S
    return getattr(fs, method)(*args, **kwargs)


def _fs(url: str):
    import fsspec

    protocol = url.split("://", 1)[0]
    if protocol not in ("s3", "s3a"):
        return fsspec.core.url_to_fs(url)
    fs, path = fsspec.core.url_to_fs(url, **_s3_options())
    _watch(fs)
    return fs, path


def _s3_options() -> dict:
    """botocore's legacy retry mode makes 5 attempts at a refused connection with random back-off in between, so
    one s3fs call took 5.3-10.9 s to report it (measured, up to 15 s possible): with that inside, an outage deadline
    of a few seconds could not be kept and the back-off would be botocore's, not ours. So botocore makes one
    attempt (a refused connection then surfaces in 1-3 ms) unless the user configured its retries (AWS_MAX_ATTEMPTS
    / AWS_RETRY_MODE, or ``retries`` in fsspec's s3 config_kwargs). s3fs's own retries stay: about 1 s in all, for
    a connection closed mid-answer or SlowDown, and they keep a multipart upload from restarting for one bad part."""
    import fsspec.config

    if os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE"):
        return {}
    config = dict((fsspec.config.conf.get("s3") or {}).get("config_kwargs") or {})
    if "retries" in config:
        return {}
    config["retries"] = {"total_max_attempts": 1}
    return {"config_kwargs": config}


def exists(url: str) -> bool:
    if not is_remote(url):
        return os.path.exists(url)
    fs, path = _fs(url)
    return with_retries(lambda: _call(fs, "exists", path), f"exists {url}")


def open_read(url: str) -> IO[bytes]:
    """A whole object as a stream. Remote objects are read in ranges, each waited out on its own, so a store that
    goes away in the middle of a shard costs the wait, not the shard."""
    if not is_remote(url):
        try:
            return open(url, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"file not found: {url}; check the path") from None
    return open_range(url)


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        return f.read()


def in_flight(fn: Callable[[A], T], items: Iterable[A], depth: int = 16) -> Iterator[tuple[A, T]]:
    """``(item, fn(item))`` in the order of ``items``, with up to ``depth`` calls running at once in threads.

    For many small object-store reads (a set's 10k completion records, a shard's source images): one at a time
    each waits a first-byte latency, all at once holds every answer; a bounded window pays the latency ``depth``
    at a time and holds at most ``depth`` answers. An error is raised when its item's turn comes."""
    from concurrent.futures import ThreadPoolExecutor

    rest = iter(items)
    with ThreadPoolExecutor(max(1, depth), thread_name_prefix="bgsplit-in-flight") as pool:
        window: collections.deque = collections.deque()
        for item in itertools.islice(rest, max(1, depth)):
            window.append((item, pool.submit(fn, item)))
        while window:
            item, future = window.popleft()
            for more in itertools.islice(rest, 1):
                window.append((more, pool.submit(fn, more)))
            yield item, future.result()


READ_AHEAD_MAX_RANGES = 16
"""Most range requests one reader keeps in flight, whatever ``read_ahead / chunk`` gives: with small chunks (the
tests' 64 KiB) the MB bound alone would mean hundreds of threads."""


class ObjectChanged(ValueError):
    """An object is not the one a reader started on: its size is not the one recorded for it, or its version (S3's
    ETag; a local file's inode, size and mtime) changed between two reads. A ValueError: bad data for this read,
    never waited out or retried."""


class Pin:
    """What a reader expects of one object for a while (a shard for an epoch): the size its record gives, and the
    version it was first read at. Every range read through a RangeReader holding this pin is checked against it,
    so bytes of two versions are never put together, however many readers, ranges or pieces share the pin."""

    def __init__(self, url: str, size: int | None):
        self.url, self.size = url, size
        self.version: str | None = None

    def check(self, version: str | None, size: int | None) -> None:
        if size is not None and self.size is not None and size != self.size:
            raise ObjectChanged(f"{self.url} is {size:,} bytes where its record says {self.size:,}: it was "
                                "rewritten after the set was built; rebuild the set (or restore the object)")
        if version is not None and self.version is not None and version != self.version:
            raise ObjectChanged(f"{self.url} changed while it was being read (version {self.version} then "
                                f"{version}): it is being rewritten in place; rebuild the set under a new name")
        self.version = self.version or version


class Fetched(bytes):
    """A range's bytes, with what the store said of the object they came from: its version (ETag) and its
    whole size (from Content-Range), for a Pin to check."""

    version: str | None = None
    size: int | None = None


def _content_range_total(value: str | None) -> int | None:
    """The object's size from a Content-Range answer (``bytes a-b/TOTAL``), None when not given."""
    try:
        return int(value.rsplit("/", 1)[1]) if value and "/" in value else None
    except ValueError:
        return None


def _local_version(f: IO[bytes]) -> tuple[str, int]:
    st = os.fstat(f.fileno())
    return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}", st.st_size


class _Range:
    """One prefetched range: bytes [a, b) and the request fetching them."""

    __slots__ = ("a", "b", "future")

    def __init__(self, a: int, b: int, future):
        self.a, self.b, self.future = a, b, future


class RangeReader(io.RawIOBase):
    """Bytes [start, end) of an object, fetched ``chunk`` bytes per request. Each request is its own with_retries
    call, so an outage in the middle of a multi-gigabyte shard resumes at the byte where it stopped instead of
    starting the object again (a plain streaming GET cannot resume: its connection dies with the server).

    ``read_ahead`` (bytes, remote objects only): while the consumer works on one range, the next ones are
    already being fetched, so a store's first-byte latency (20-80 ms a GET on a real region) is paid while the
    consumer decodes rather than on top of it. At most ``read_ahead`` bytes (``read_ahead // chunk`` ranges,
    ranges of ``min(chunk, read_ahead)``) are requested ahead of the range being consumed, so memory is that
    plus the current range, whatever the object's size. A prefetch makes one attempt: a failure that waiting
    can cure is redone, when the consumer reaches that range, through with_retries (the same outage deadline,
    StorageOutage and retry count as a read without read-ahead); any other failure is raised there, then. The
    threads are started at the first read, in the process that reads (a DataLoader worker forked from a parent
    that opened the reader starts its own), and ``close`` cancels what has not started and waits for the rest.

    Positions (``tell``/``seek``) count from ``start``."""

    def __init__(self, url: str, start: int = 0, end: int | None = None, chunk: int = 8 << 20,
                 read_ahead: int = 0, pin: Pin | None = None):
        super().__init__()
        self.pin = pin
        """Checked against every range read (see Pin); None: no check."""
        if start < 0 or (end is not None and end < start) or chunk <= 0:
            raise ValueError(f"bad range for {url}: start={start}, end={end}, chunk={chunk}")
        if read_ahead < 0:
            raise ValueError(f"read-ahead for {url} is {read_ahead} bytes: give 0 (off) or more "
                             "(data.read_ahead_mb)")
        self.url, self.name, self.chunk = url, url, chunk
        self._file: IO[bytes] | None = None
        if is_remote(url):
            self._fs, self._path = _fs(url)
            if end is None:
                end = int(with_retries(lambda: _call(self._fs, "size", self._path), f"size {url}"))
        else:
            try:
                self._file = open(url, "rb")
            except FileNotFoundError:
                raise FileNotFoundError(f"file not found: {url}; check the path") from None
            if end is None:
                end = os.fstat(self._file.fileno()).st_size
            if pin is not None:
                pin.check(*_local_version(self._file))
            read_ahead = 0  # the page cache and the kernel's own read-ahead do it locally
        self.start, self.end = start, max(start, end)
        self._pos = start
        self._step = min(chunk, read_ahead) if read_ahead else chunk
        self.depth = min(read_ahead // self._step, READ_AHEAD_MAX_RANGES) if read_ahead else 0
        """Ranges requested ahead (0: read-ahead off, each range fetched when the consumer asks for it)."""
        self._pending: collections.deque[_Range] = collections.deque()
        self._next = start  # where the next prefetch starts
        self._current: tuple[int, bytes] | None = None  # the range being consumed: (its start, its bytes)
        self._pool = None
        self._pool_pid = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos - self.start

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: self.start, io.SEEK_CUR: self._pos, io.SEEK_END: self.end}[whence]
        self._pos = max(self.start, base + offset)
        return self._pos - self.start

    def _what(self, a: int, b: int) -> str:
        return f"read {self.url} bytes {a}-{b}"

    def _get(self, a: int, b: int) -> bytes:
        data = _fetch_range(self._fs, self._path, a, b)
        _count("bytes_read", len(data))
        return data

    def _fetch(self, n: int) -> bytes | memoryview:
        """Up to ``n`` bytes at the position (fewer at the end of a range), empty at the end."""
        a = self._pos
        if self.depth:
            data = self._ahead(a)[:n] if a < self.end else b""
            self._pos = a + len(data)
            return data
        b = min(a + n, self.end)
        if a >= b:
            return b""
        if self._file is not None:
            self._file.seek(a)
            data = self._file.read(b - a)
            if self.pin is not None:  # rewritten in place under the open file (a rename leaves ours intact)
                self.pin.check(*_local_version(self._file))
        else:
            data = with_retries(lambda: _fetch_range(self._fs, self._path, a, b), self._what(a, b))
            self._check(data)
        if len(data) < b - a:
            self.end = a + len(data)  # the object is shorter than the range asked for: its end is the end
        self._pos = a + len(data)
        _count("bytes_read", len(data))
        return data

    # -- read-ahead -------------------------------------------------------------------------------------------
    def _ensure_pool(self) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            return
        from concurrent.futures import ThreadPoolExecutor

        # a reader inherited by a forked process has its parent's pool object but none of its threads
        self._pending.clear()
        self._pool = ThreadPoolExecutor(max_workers=self.depth, thread_name_prefix="bgsplit-read-ahead")
        self._pool_pid = os.getpid()

    def _top_up(self, ranges: int) -> None:
        while len(self._pending) < ranges and self._next < self.end:
            a, b = self._next, min(self._next + self._step, self.end)
            self._pending.append(_Range(a, b, self._pool.submit(self._get, a, b)))
            self._next = b

    def _drop_pending(self) -> None:
        while self._pending:
            self._pending.popleft().future.cancel()  # one already running finishes; its bytes are dropped

    def prefetch(self, ranges: int = 1) -> None:
        """Start fetching the first ``ranges`` ranges from the position now, before anything is read (the next
        shard while the current one is decoded). No-op without read-ahead."""
        if not self.depth or self.closed or self._pos >= self.end:
            return
        self._ensure_pool()
        if not self._pending:
            self._next = self._pos
        self._top_up(min(ranges, self.depth))

    def _ahead(self, a: int) -> memoryview:
        """The bytes from ``a`` to the end of the range holding it, fetched ahead when the consumer got here."""
        if self._current is not None:
            at, data = self._current
            if at <= a < at + len(data):
                return memoryview(data)[a - at:]
            self._current = None
        self._ensure_pool()
        while self._pending and self._pending[0].b <= a:  # seeked past them
            self._pending.popleft().future.cancel()
        if not self._pending or self._pending[0].a > a:  # the first read, or a seek out of what was prefetched
            self._drop_pending()
            self._next = a
        self._top_up(self.depth)
        r = self._pending.popleft()
        data = self._result(r)
        self._check(data)
        self._current = (r.a, data)
        if len(data) < r.b - r.a:
            self.end = r.a + len(data)  # the object is shorter than the range asked for: its end is the end
            self._drop_pending()
        self._top_up(self.depth)  # keep `depth` ranges in flight while this one is consumed
        return memoryview(data)[a - r.a:]

    def _check(self, data: bytes) -> None:
        if self.pin is not None:
            self.pin.check(getattr(data, "version", None), getattr(data, "size", None))

    def _result(self, r: _Range) -> bytes:
        try:
            return r.future.result()
        except Exception as e:
            if not is_transient(e):
                raise  # an answer that will not change (no such object): surfaces where the range is read
        _count("retries")  # the prefetch's failed attempt; the wait for the store is the consumer's, as without
        return with_retries(lambda: self._get(r.a, r.b), self._what(r.a, r.b))

    # -- the io interface -------------------------------------------------------------------------------------
    def readinto(self, buffer) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        view = memoryview(buffer).cast("B")
        data = self._fetch(min(len(view), self.chunk))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        """Whole chunks: RawIOBase's default would ask for 8 KiB at a time, one request each."""
        parts = []
        while data := self._fetch(self.chunk):
            parts.append(bytes(data))
        return b"".join(parts)

    def close(self) -> None:
        if self._pool is not None:
            self._drop_pending()
            if self._pool_pid == os.getpid():
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._current = None
        if self._file is not None:
            self._file.close()
        super().close()


def _fetch_range(fs, path: str, start: int, end: int) -> bytes:
    """The one request a range read makes, named so that a test can make it fail inside a forked loader worker.
    On S3 the answer's ETag and Content-Range come back with the bytes (a Fetched), so a Pin can tell when the
    object changed between two ranges."""
    if not hasattr(fs, "_call_s3"):
        return _call(fs, "cat_file", path, start=start, end=end, nbytes=end - start)
    from fsspec.asyn import sync

    bucket, key, version = fs.split_path(path)

    async def get() -> Fetched:
        extra = {"VersionId": version} if version else {}
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **extra)
        try:
            data = Fetched(await resp["Body"].read())
        finally:
            resp["Body"].close()
        data.version, data.size = resp.get("ETag"), _content_range_total(resp.get("ContentRange"))
        return data

    return sync(fs.loop, get, timeout=CALL_TIMEOUT_S + (end - start) / SLOWEST_BYTES_PER_S)


def open_range(url: str, start: int = 0, end: int | None = None, chunk: int = 8 << 20,
               read_ahead: int = 0, pin: Pin | None = None) -> io.BufferedReader:
    """A read-only stream over bytes [start, end) of ``url`` (``end`` None: to the end of the object, one size
    request). The buffer is one chunk, so sequential reads of any size turn into whole-chunk requests;
    ``read_ahead`` bytes of them are fetched ahead of the reader (see RangeReader; 0: none, as for a local file)."""
    return io.BufferedReader(RangeReader(url, start, end, chunk, read_ahead, pin), buffer_size=chunk)


def listdir(url: str) -> list[str]:
    """Names (not paths) directly under ``url``; empty when it does not exist."""
    if not is_remote(url):
        path = url
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = _fs(url)
    if not exists(url):
        return []
    names = with_retries(lambda: _call(fs, "ls", path, detail=False, refresh=True), f"list {url}")
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in names)


def remove(url: str, recursive: bool = False) -> None:
    if not is_remote(url):
        path = url
        if os.path.isdir(path):
            import shutil

            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        return
    fs, path = _fs(url)
    if with_retries(lambda: _call(fs, "exists", path), f"exists {url}"):
        with_retries(lambda: _call(fs, "rm", path, recursive=recursive), f"remove {url}")


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import (os.umask can only be read by setting it)


@contextlib.contextmanager
def atomic_write(url: str, size: int | None = None) -> Iterator[IO[bytes]]:
    """Write a file that appears under ``url`` only once the block finished without an exception. A full local
    disk (the file itself, or an upload's staging copy) is one DiskFull line and leaves no partial file;
    ``size``, when the caller knows it, is what that line says the write needed."""
    if is_remote(url):
        fs, remote_path = _fs(url)
        with tempfile.NamedTemporaryFile(prefix="bgsplit-upload-") as tmp:
            try:
                yield tmp
                tmp.flush()
            except OSError as e:
                if e.errno not in FULL_ERRNOS or isinstance(e, DiskFull):
                    raise
                written = 0
                with contextlib.suppress(OSError):
                    written = tmp.tell()
                with contextlib.suppress(OSError):
                    tmp.close()  # drops what did not fit, and removes the staging file
                raise disk_full(tmp.name, size, written, f" (the staging copy of {url})") from None
            size = os.fstat(tmp.fileno()).st_size
            # one PUT, or a multipart upload that becomes visible only once complete and that s3fs aborts when a
            # part fails (never a truncated object), retried whole
            kwargs = {"chunksize": UPLOAD_CHUNK} if "s3" in getattr(fs, "protocol", ()) else {}
            with_retries(lambda: _call(fs, "put_file", tmp.name, remote_path, nbytes=size, **kwargs),
                         f"upload {url}")
        return
    path = url
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".partial", dir=folder)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide reports and review pages from other users
    written = 0
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                yield f
                written = f.tell()
                _sync(f, tmp_path)
            except OSError as e:
                if e.errno not in FULL_ERRNOS or isinstance(e, DiskFull):
                    raise
                with contextlib.suppress(OSError):
                    written = written or f.tell()
                with contextlib.suppress(OSError):
                    f.close()  # drops what did not fit (closing flushes it, and would fail the same way again)
                raise disk_full(path, size, written) from None
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise


def write_bytes(url: str, data: bytes) -> None:
    """Whole-object write. On an object store one ``pipe``: a single PUT, or above 100 MB a multipart upload
    whose parts go up in parallel (several times one stream's speed) and which is visible only once completed;
    a failed multipart upload is aborted, so nothing half-written ever appears."""
    if not is_remote(url):
        with atomic_write(url, size=len(data)) as f:
            f.write(data)
        return
    fs, path = _fs(url)
    with_retries(lambda: _call(fs, "pipe_file", path, data, nbytes=len(data)), f"upload {url}")
