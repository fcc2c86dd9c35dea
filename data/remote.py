"""Talking to an object store: which locations are one, the one request, and what to do when it fails.

Every object-store call goes through ``with_retries``: an outage (the store restarting, the network gone) is
waited out for up to ``storage.outage_timeout_s`` (BGSPLIT_OUTAGE_TIMEOUT_S, default 10 minutes) and then
reported as one StorageOutage line; an answer that will not change (no such object, access denied) is raised at
once. For that deadline to be ours, each request must fail fast and alike: the fsspec handle (``_fs``) makes
botocore try once, ``_call`` bounds every request in time, and the handle counts the store's throttling answers.

Its own module, below data.storage and data.ranged, because both of them wait out the same outages and count
into the same per-process STATS; it imports nothing of the project.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("bgsplit.storage")
T = TypeVar("T")

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


CALL_TIMEOUT_S = 60.0
SLOWEST_BYTES_PER_S = 1 << 20
"""Every object-store request is bounded: 60 s plus its bytes at 1 MB/s. A request that never answers (seen
once: an upload in flight when the store went down never returned, long after the store came back) is then
abandoned and retried like any other transient failure, instead of hanging the run."""


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

