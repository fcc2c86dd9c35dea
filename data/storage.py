"""A small filesystem shim: local paths through ``os``, anything with ``://`` through fsspec.

Everything that writes goes through ``atomic_write`` so a reader never sees a half-written shard, manifest or
checkpoint: locally a temporary file is renamed into place, on object stores a single PUT (or a completed
multipart upload) only becomes visible when it is whole. A full local disk is one DiskFull line, never retried.

What every caller needs of a location lives here: joining and normalising paths and URLs, existence, listing,
whole-object reads and writes. Every object-store call is waited out through data.remote's ``with_retries``;
whole-object reads go through data.ranged's range reader, so an outage in the middle of one resumes where it
stopped.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TypeVar

from data import ranged, remote

T = TypeVar("T")
A = TypeVar("A")


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
    """Flush and fsync a file being written (``path``: where it is being written): where a full disk (or a network
    filesystem's quota) usually shows itself, since writes only fill the page cache. Its own function so a test can
    fail it as a full disk would."""
    f.flush()
    os.fsync(f.fileno())


def join(base: str, *parts: str) -> str:
    """``base``/``parts``; a part that is itself a URL or an absolute path starts afresh (as os.path.join does),
    so a manifest can list shards that live in another set. ``..`` segments are resolved (lexically), so a part
    relative to a set's folder (``../train/shard-000000.tar``: how `shards add-labels` lists its parent's shards)
    names the same object on any machine; on an object store they never climb above the bucket."""
    for i in range(len(parts) - 1, -1, -1):
        if remote.is_remote(parts[i]) or (not remote.is_remote(base) and os.path.isabs(parts[i])):
            return join(parts[i], *parts[i + 1:])
    if remote.is_remote(base):
        return normalize("/".join([base.rstrip("/"), *[p.strip("/") for p in parts]]))
    return normalize(os.path.join(base, *parts))


def _has_dots(path: str, sep: str) -> bool:
    return ".." in path.split(sep)


def normalize(url: str) -> str:
    """``url`` with its ``.`` and ``..`` segments resolved, when it has a ``..`` (otherwise unchanged, so every name
    that never had one stays byte-identical). Raises ValueError for a URL whose ``..`` climbs above its bucket."""
    if not remote.is_remote(url):
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
    return normalize(url) if remote.is_remote(url) else os.path.abspath(url)


def relative(url: str, folder: str) -> str | None:
    """``url`` as a path relative to ``folder`` (``../train/shard-000000.tar``), such that ``join(folder, result)``
    is ``url`` again; None when no such path exists: one is local and the other a URL, or they are URLs of another
    scheme or bucket."""
    if remote.is_remote(url) != remote.is_remote(folder):
        return None
    if not remote.is_remote(url):
        return os.path.relpath(os.path.abspath(url), os.path.abspath(folder))
    (scheme, rest), (folder_scheme, folder_rest) = normalize(url).split("://", 1), normalize(folder).split("://", 1)
    anchor, _, path = rest.partition("/")
    folder_anchor, _, folder_path = folder_rest.rstrip("/").partition("/")
    if (scheme, anchor) != (folder_scheme, folder_anchor):
        return None
    import posixpath

    return posixpath.relpath("/" + path, "/" + folder_path)


def dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] if remote.is_remote(url) else os.path.dirname(url)


UPLOAD_CHUNK = 64 << 20
"""Multipart part size of uploads; smaller objects go up in one PUT."""


def exists(url: str) -> bool:
    if not remote.is_remote(url):
        return os.path.exists(url)
    fs, path = remote._fs(url)
    return remote.with_retries(lambda: remote._call(fs, "exists", path), f"exists {url}")


def open_read(url: str) -> IO[bytes]:
    """A whole object as a stream. Remote objects are read in ranges, each waited out on its own, so a store that
    goes away in the middle of a shard costs the wait, not the shard."""
    if not remote.is_remote(url):
        try:
            return open(url, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"file not found: {url}; check the path") from None
    return ranged.open_range(url)


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


def listdir(url: str) -> list[str]:
    """Names (not paths) directly under ``url``; empty when it does not exist."""
    if not remote.is_remote(url):
        path = url
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = remote._fs(url)
    if not exists(url):
        return []
    names = remote.with_retries(lambda: remote._call(fs, "ls", path, detail=False, refresh=True), f"list {url}")
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in names)


def remove(url: str, recursive: bool = False) -> None:
    if not remote.is_remote(url):
        path = url
        if os.path.isdir(path):
            import shutil

            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        return
    fs, path = remote._fs(url)
    if remote.with_retries(lambda: remote._call(fs, "exists", path), f"exists {url}"):
        remote.with_retries(lambda: remote._call(fs, "rm", path, recursive=recursive), f"remove {url}")


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import (os.umask can only be read by setting it)


@contextlib.contextmanager
def atomic_write(url: str, size: int | None = None) -> Iterator[IO[bytes]]:
    """Write a file that appears under ``url`` only once the block finished without an exception. A full local
    disk (the file itself, or an upload's staging copy) is one DiskFull line and leaves no partial file;
    ``size``, when the caller knows it, is what that line says the write needed."""
    if remote.is_remote(url):
        fs, remote_path = remote._fs(url)
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
            remote.with_retries(lambda: remote._call(fs, "put_file", tmp.name, remote_path, nbytes=size, **kwargs),
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
    if not remote.is_remote(url):
        with atomic_write(url, size=len(data)) as f:
            f.write(data)
        return
    fs, path = remote._fs(url)
    remote.with_retries(lambda: remote._call(fs, "pipe_file", path, data, nbytes=len(data)), f"upload {url}")
