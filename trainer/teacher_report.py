"""`bgsplit teacher-report`: what the teacher makes of a set's background, before anyone spends a GPU day on BG
splitting.

BG splitting helps only when the teacher splits the background into coherent groups: its auxiliary loss asks the
trunk to tell those groups apart. A teacher that answers near-uniformly (Fashion-MNIST at 48 px: a mean top-1
probability of ~0.005 over ImageNet's 1,000 classes), or that changes its mind between two crops of one image,
gives the aux head noise to fit. Per input size this reports, over a sample of the background:

- ``classes_90``: how many teacher classes hold 90% of the images' top-1 answers (a few: coarse groups; most of
  1,000: no structure the images share);
- ``top1``: the mean top-1 probability, and ``entropy`` the mean entropy (nats; ln 1000 = 6.91 is uniform);
- ``agreement``: how often two training-augmented views of an image get the same top-1 (stable groups);
- ``nmi``: where the set records finer source labels of its background (a sample's ``orig``: Fashion-MNIST's
  classes, a folder's subfolders), the normalised mutual information between them and the teacher's top-1.

The sample is whole shards in a salted hash order of their names (trainer.probe_model.sample_shards' rule), so a
10M-image set costs what ``--images`` costs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import Any

import numpy as np
import torch

from data import storage
from data.shards import iter_tar, read_manifest

log = logging.getLogger("bgsplit.teacher_report")

SALT = b"bgsplit-teacher-report\0"


def background_sample(location: str, images: int) -> tuple[list[bytes], list[str]]:
    """Up to ``images`` encoded background images of the set and their source labels ('' where none)."""
    manifest = read_manifest(location)
    order = sorted(manifest.shards, key=lambda s: (s.kind != "background",
                                                   hashlib.sha256(SALT + s.record.encode()).digest()))
    encoded, orig = [], []
    for shard in order:
        with storage.open_read(storage.join(manifest.root, shard.url)) as stream:
            for _, fields in iter_tar(stream):
                if int(fields.get("cls", b"-1")) != 0:
                    continue
                image = next((fields[e] for e in ("jpg", "jpeg", "png", "webp") if e in fields), None)
                if image is None:
                    continue
                encoded.append(image)
                try:
                    orig.append(str(json.loads(fields["json"]).get("orig", "")))
                except (KeyError, ValueError):
                    orig.append("")
                if len(encoded) == images:
                    return encoded, orig
    if not encoded:
        raise ValueError(f"shard set {location} holds no background images: the report describes a set's "
                         "background (label 0); give a training set or a pool")
    return encoded, orig


def classes_covering(top1: np.ndarray, share: float = 0.9) -> int:
    counts = np.sort(np.bincount(top1))[::-1]
    return int(np.searchsorted(np.cumsum(counts), share * len(top1)) + 1)


def nmi(a: list[str], b: np.ndarray) -> float:
    """Normalised mutual information (arithmetic mean of the entropies, as scikit-learn's default)."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(a, b.tolist()))


@torch.no_grad()
def report_size(teacher: Any, encoded: list[bytes], orig: list[str], size: int, batch_size: int = 64,
                resize_ratio: float = 1.15, min_crop_scale: float = 0.35, seed: int = 0) -> dict[str, Any]:
    from data.transforms import eval_transform, sample_rng, train_transform

    def forward(images: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.stack(images[i:i + batch_size])
            out.append(teacher(x).float().softmax(dim=1))
        return torch.cat(out)

    probs = forward([eval_transform(b, size, resize_ratio) for b in encoded])
    views = [forward([train_transform(b, size, sample_rng(seed, v, i), min_crop_scale)
                      for i, b in enumerate(encoded)]).argmax(dim=1) for v in (1, 2)]
    top1 = probs.argmax(dim=1).numpy()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
    row = {"image_size": size, "images": len(encoded), "teacher_classes": int(probs.shape[1]),
           "classes_90": classes_covering(top1), "top1": float(probs.max(dim=1).values.mean()),
           "entropy": float(entropy.mean()), "uniform_entropy": math.log(probs.shape[1]),
           "agreement": float((views[0] == views[1]).float().mean()), "nmi": None, "source_labels": 0}
    labelled = [i for i, o in enumerate(orig) if o]
    if labelled and len({orig[i] for i in labelled}) > 1:
        row["nmi"] = nmi([orig[i] for i in labelled], top1[labelled])
        row["source_labels"] = len({orig[i] for i in labelled})
    return row


def reading(row: dict[str, Any]) -> str:
    """One line a user can act on; thresholds are rules of thumb, said as such in the page."""
    if row["top1"] < 0.05:
        return "barely splits it (near-uniform answers): BG splitting has little to learn from at this size"
    if row["agreement"] < 0.3:
        return "unstable: two crops of one image mostly get different answers"
    if row["nmi"] is not None and row["nmi"] < 0.1:
        return "splits it, but not along the source's own groups"
    return "splits it into stable groups"


def teacher_report(location: str, sizes: list[int], *, teacher: str = "efficientnet_lite0", weights: str = "",
                   images: int = 1000, batch_size: int = 64) -> dict[str, Any]:
    from trainer.models import build_teacher

    if not sizes or any(s < 16 for s in sizes):
        raise ValueError(f"--sizes {sizes}: give input sizes in pixels, each at least 16 (e.g. 64,160,224)")
    if images < 10:
        raise ValueError(f"--images {images}: a report needs at least 10 background images")
    encoded, orig = background_sample(location, images)
    net = build_teacher(teacher, weights).eval()
    rows = []
    for size in sizes:
        row = report_size(net, encoded, orig, size, batch_size)
        row["reading"] = reading(row)
        rows.append(row)
        log.info("teacher at %d px: %d classes hold 90%%, top-1 %.3f, agreement %.2f", size, row["classes_90"],
                 row["top1"], row["agreement"])
    return {"data": location, "teacher": teacher, "weights": weights or "DEFAULT", "rows": rows}


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"What the teacher ({doc['teacher']}) makes of the background of `{doc['data']}` "
             f"({doc['rows'][0]['images']} images):", "",
             "| input size | classes holding 90% of top-1 | mean top-1 prob. | mean entropy (nats) | "
             "two-view top-1 agreement | NMI with source labels | reading |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in doc["rows"]:
        nmi_text = "—" if r["nmi"] is None else f"{r['nmi']:.2f} ({r['source_labels']} labels)"
        lines.append(f"| {r['image_size']} px | {r['classes_90']} of {r['teacher_classes']} | {r['top1']:.3f} | "
                     f"{r['entropy']:.2f} of {r['uniform_entropy']:.2f} | {r['agreement']:.2f} | {nmi_text} | "
                     f"{reading(r)} |")
    lines += ["", "_Readings are rules of thumb: a mean top-1 under 0.05 says the teacher barely splits the "
              "background, a two-view agreement under 0.3 that its groups are unstable, an NMI under 0.1 that they "
              "are not the source's._"]
    return "\n".join(lines) + "\n"
