"""A small filesystem shim: local paths through ``os``, anything with ``://`` through fsspec.

Everything that writes goes through ``atomic_write`` so a reader never sees a half-written shard, manifest or
checkpoint: locally a temporary file is renamed into place, on object stores a single PUT (or a completed
multipart upload) only becomes visible when it is whole.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator


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
    return fs.exists(path)


def open_read(url: str) -> IO[bytes]:
    if not is_remote(url):
        try:
            return open(url, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"file not found: {url}; check the path") from None
    import fsspec

    return fsspec.open(url, "rb").open()


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        return f.read()


def listdir(url: str) -> list[str]:
    """Names (not paths) directly under ``url``; empty when it does not exist."""
    if not is_remote(url):
        path = url
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = _fs(url)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


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
            tmp.seek(0)
            with fsspec.open(url, "wb") as out:
                while chunk := tmp.read(16 << 20):
                    out.write(chunk)
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
    with atomic_write(url) as f:
        f.write(data)
