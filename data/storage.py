"""A small filesystem shim: local paths through ``os``, anything with ``://`` through fsspec.

Everything that writes goes through ``atomic_write`` so a reader never sees a half-written shard, manifest or
checkpoint: locally a temporary file is renamed into place, on object stores a single PUT (or a completed
multipart upload) only becomes visible when it is whole.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from typing import IO, Callable, Iterator, TypeVar

log = logging.getLogger("bgsplit.storage")
T = TypeVar("T")

# Errors that retrying cannot fix; every other OSError (connection reset, timeouts, 5xx that s3fs surfaces as
# OSError) is treated as transient.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
RETRY_ATTEMPTS = int(os.environ.get("BGSPLIT_IO_RETRIES", "5"))
RETRY_BASE_DELAY = 0.2
STATS = {"retries": 0, "failures": 0}
"""Per-process counts of retried and finally failed object-store calls, reported in the run summary."""


def with_retries(fn: Callable[[], T], what: str, attempts: int | None = None, base_delay: float | None = None) -> T:
    """Call ``fn``; on a transient error wait (exponential back-off, capped at 5 s) and try again, a bounded
    number of times. A permanent error (missing file, no permission) is raised at once."""
    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    delay = RETRY_BASE_DELAY if base_delay is None else base_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except PERMANENT:
            raise
        except (OSError, TimeoutError, ConnectionError) as e:
            if attempt == attempts:
                STATS["failures"] += 1
                raise
            STATS["retries"] += 1
            log.warning("%s failed (%s: %s); retry %d of %d", what, type(e).__name__, e, attempt, attempts - 1)
            time.sleep(min(delay * 2 ** (attempt - 1), 5.0))
    raise AssertionError("unreachable")


def is_remote(url: str) -> bool:
    """Anything with a scheme (s3://, gs://, memory://, file://) goes through fsspec; plain paths through os."""
    return "://" in url


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


def dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] if is_remote(url) else os.path.dirname(url)


def _fs(url: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def exists(url: str) -> bool:
    if not is_remote(url):
        return os.path.exists(url)
    fs, path = _fs(url)
    return with_retries(lambda: fs.exists(path), f"exists {url}")


def open_read(url: str) -> IO[bytes]:
    if not is_remote(url):
        try:
            return open(url, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"file not found: {url}; check the path") from None
    import fsspec

    return with_retries(lambda: fsspec.open(url, "rb").open(), f"open {url}")


def read_bytes(url: str) -> bytes:
    def read() -> bytes:
        with open_read(url) as f:
            return f.read()

    return with_retries(read, f"read {url}") if is_remote(url) else read()


def listdir(url: str) -> list[str]:
    """Names (not paths) directly under ``url``; empty when it does not exist."""
    if not is_remote(url):
        path = url
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = _fs(url)
    if not exists(url):
        return []
    names = with_retries(lambda: fs.ls(path, detail=False, refresh=True), f"list {url}")
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
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


@contextlib.contextmanager
def atomic_write(url: str) -> Iterator[IO[bytes]]:
    """Write a file that appears under ``url`` only once the block finished without an exception."""
    if is_remote(url):
        import fsspec

        with tempfile.TemporaryFile() as tmp:
            yield tmp

            def upload() -> None:
                tmp.seek(0)
                with fsspec.open(url, "wb") as out:  # an S3 object appears only when the upload completes
                    while chunk := tmp.read(16 << 20):
                        out.write(chunk)

            with_retries(upload, f"upload {url}")
        return
    path = url
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".partial", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
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
        with atomic_write(url) as f:
            f.write(data)
        return
    fs, path = _fs(url)
    with_retries(lambda: fs.pipe_file(path, data), f"upload {url}")
