"""Cached teacher labels: each sample's teacher top-k class indices and probabilities, keyed by sample key.

One sidecar file per shard set (``teacher-<name>-<size>px-top<k>.npz`` next to the manifest) so shards stay
immutable and several teachers can label the same set. Indices are int16 (ImageNet has 1000 classes) and
probabilities fp16: 4 bytes a class, 20 bytes an image at k=5, about 20 MB for a million images.
"""
from __future__ import annotations

import io

import numpy as np

from data import storage


def cache_name(teacher: str, image_size: int, topk: int) -> str:
    return f"teacher-{teacher}-{image_size}px-top{topk}.npz"


def write_cache(url: str, keys: list[str], indices: np.ndarray, probs: np.ndarray, meta: dict) -> None:
    if len(keys) != len(indices) or len(keys) != len(probs):
        raise ValueError("teacher cache: keys, indices and probabilities differ in length")
    buf = io.BytesIO()
    np.savez(buf, keys=np.array(keys), indices=indices.astype(np.int16), probs=probs.astype(np.float16),
             meta=np.array(repr(meta)))
    storage.write_bytes(url, buf.getvalue())


class TeacherCache:
    """Key -> (top-k indices int64, top-k probabilities float32); loaded once per loader worker."""

    def __init__(self, url: str):
        if not storage.exists(url):
            raise FileNotFoundError(f"teacher cache {url} does not exist: run `bgsplit teacher-label` on this "
                                    "shard set first, or set teacher.mode=online")
        self.url = url
        with np.load(io.BytesIO(storage.read_bytes(url))) as doc:
            self.keys = doc["keys"]
            self.indices = doc["indices"]
            self.probs = doc["probs"]
        self.row = {str(k): i for i, k in enumerate(self.keys)}
        self.topk = self.indices.shape[1]

    def __len__(self) -> int:
        return len(self.row)

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        i = self.row.get(key)
        if i is None:
            return None
        return self.indices[i].astype(np.int64), self.probs[i].astype(np.float32)
