"""Decode and augment: encoded bytes to a uint8 CHW tensor; each model normalises its own input later.

Augmentation parameters come from a generator seeded by (seed, epoch, position), not from global RNG state, so
a sample gets the same crop whichever worker decodes it and a resumed run replays the exact same batches.
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image

# Larger images than this are refused as decompression bombs (a 40k x 40k "JPEG" would exhaust memory).
MAX_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class BadImage(ValueError):
    """An encoded image that cannot be decoded (corrupt, truncated, or absurdly large)."""


def decode_rgb(data: bytes, draft: tuple[int, int] | None = None) -> Image.Image:
    """Grey and palette images become RGB; anything PIL cannot decode raises ``BadImage``.

    ``draft`` lets a JPEG decode at a reduced DCT scale that is still at least that size: several times faster
    when the caller only needs a smaller image (or only to know that it decodes)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise BadImage(f"{img.width}x{img.height} exceeds {MAX_PIXELS} pixels")
            img.draft("RGB", draft or (img.width, img.height))
            return img.convert("RGB")
    except BadImage:
        raise
    except Exception as e:  # PIL raises many types for bad data: OSError, SyntaxError, ValueError, bomb errors
        raise BadImage(f"{type(e).__name__}: {e}") from None


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def crop_params(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float],
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, w, h), drawn from ``rng``; same rule as torchvision's."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_transform(data: bytes, size: int, rng: np.random.Generator, min_scale: float = 0.35) -> torch.Tensor:
    img = decode_rgb(data)
    left, top, w, h = crop_params(img.width, img.height, rng, (min_scale, 1.0))
    out = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return _to_tensor(out)


def eval_transform(data: bytes, size: int, resize_ratio: float = 1.15) -> torch.Tensor:
    """Resize the short side to size * ratio, then centre-crop size x size (the paper's evaluation)."""
    img = decode_rgb(data)
    short = int(round(size * resize_ratio))
    scale = short / min(img.width, img.height)
    w, h = max(size, int(round(img.width * scale))), max(size, int(round(img.height * scale)))
    img = img.resize((w, h), Image.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    return _to_tensor(img.crop((left, top, left + size, top + size)))


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, position])
