"""Ranged reads of one object: a stream over bytes [start, end) that survives an outage and reads ahead.

Reads go in ranges so that an outage in the middle of a shard resumes at the byte where it stopped, and the next
ranges can be fetched while one is consumed (``open_range(read_ahead=...)``): a real store's first-byte latency is
then paid while the reader works, not on top of it. A Pin checks every range against the object's recorded size
and first-read version, so bytes of two versions of a shard are never put together.

Its own module because it is one design (RangeReader's prefetch window, the pin, the one request a range makes)
that the shard readers use directly and ``storage.open_read`` under every whole-object read of a remote object; it
stands on data.remote alone.
"""
from __future__ import annotations

import collections
import io
import os
from typing import IO

from data import remote


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
        if remote.is_remote(url):
            self._fs, self._path = remote._fs(url)
            if end is None:
                end = int(remote.with_retries(lambda: remote._call(self._fs, "size", self._path), f"size {url}"))
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
        remote._count("bytes_read", len(data))
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
            data = remote.with_retries(lambda: _fetch_range(self._fs, self._path, a, b), self._what(a, b))
            self._check(data)
        if len(data) < b - a:
            self.end = a + len(data)  # the object is shorter than the range asked for: its end is the end
        self._pos = a + len(data)
        remote._count("bytes_read", len(data))
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
            if not remote.is_transient(e):
                raise  # an answer that will not change (no such object): surfaces where the range is read
        remote._count("retries")  # the prefetch's failed attempt; the wait for the store is the consumer's, as without
        return remote.with_retries(lambda: self._get(r.a, r.b), self._what(r.a, r.b))

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
        return remote._call(fs, "cat_file", path, start=start, end=end, nbytes=end - start)
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

    return sync(fs.loop, get, timeout=remote.CALL_TIMEOUT_S + (end - start) / remote.SLOWEST_BYTES_PER_S)


def open_range(url: str, start: int = 0, end: int | None = None, chunk: int = 8 << 20,
               read_ahead: int = 0, pin: Pin | None = None) -> io.BufferedReader:
    """A read-only stream over bytes [start, end) of ``url`` (``end`` None: to the end of the object, one size
    request). The buffer is one chunk, so sequential reads of any size turn into whole-chunk requests;
    ``read_ahead`` bytes of them are fetched ahead of the reader (see RangeReader; 0: none, as for a local file)."""
    return io.BufferedReader(RangeReader(url, start, end, chunk, read_ahead, pin), buffer_size=chunk)
