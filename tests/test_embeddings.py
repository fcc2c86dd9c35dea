"""A pool embedded once: mining with a probe ranks from stored rows, every later round reuses them, a killed
pass resumes, and rows of another network, input size or shard version are never read as this one's."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cluster.cli import main
from data.shards import read_manifest
from trainer.embeddings import EmbeddingCache, EmbedPass, Space
from trainer.scoring import ScoringConfig

SIZE = 64


def _candidates(out):
    return [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def probe(tiny_sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "fit"
    assert main(["train", "--config", "configs/debug.yaml", f"data.train={tiny_sets['train']}", "data.val=",
                 f"data.image_size={SIZE}", f"run.out_dir={out}", "data.num_workers=0", "probe.kind=logistic",
                 "probe.C=0.1"]) == 0
    return str(out)


def test_mining_with_a_probe_ranks_from_rows_stored_once_and_reused(tiny_sets, probe, tmp_path, capsys):
    pool = tiny_sets["test"]
    rows = tmp_path / "rows"
    capsys.readouterr()
    assert main(["mine", "--checkpoint", probe, "--pool", pool, "--out", str(tmp_path / "a"), "--top", "20",
                 "--embeddings", str(rows), "--precision", "fp32"]) == 0
    first = capsys.readouterr().out
    assert f"({read_manifest(pool).count} image(s) embedded now)" in first
    spaces = list(rows.iterdir())  # the teacher's pass and the probe's ranking share one space: the same trunk
    assert len(spaces) == 1
    stored = sorted(p.name for p in spaces[0].iterdir())
    assert len(stored) == 2 * len(read_manifest(pool).shards) and all(n.endswith((".npy", ".json")) for n in stored)
    # the same ranking as the network's own forward pass (fp16 rows: scores within ~1e-3)
    assert main(["mine", "--checkpoint", probe, "--pool", pool, "--out", str(tmp_path / "b"), "--top", "20",
                 "--embeddings", "none", "--precision", "fp32"]) == 0
    from_rows, direct = _candidates(tmp_path / "a"), _candidates(tmp_path / "b")
    by_key = {(r["key"], r["class"]): r["score"] for r in direct}
    shared = [r for r in from_rows if (r["key"], r["class"]) in by_key]
    assert len(shared) >= 0.9 * len(direct)
    assert max(abs(r["score"] - by_key[r["key"], r["class"]]) for r in shared) < 2e-3
    # a later round (another output folder) embeds nothing
    capsys.readouterr()
    assert main(["mine", "--checkpoint", probe, "--pool", pool, "--out", str(tmp_path / "c"), "--top", "20",
                 "--embeddings", str(rows)]) == 0
    assert "(0 image(s) embedded now)" in capsys.readouterr().out


def test_a_killed_pass_resumes_and_a_rewritten_shard_is_embedded_again(tiny_sets, tmp_path):
    pool = str(tmp_path / "pool")
    shutil.copytree(tiny_sets["test"], pool)
    p = EmbedPass(pool=pool, root=str(tmp_path / "rows"), arch="efficientnet_lite0", weights="DEFAULT",
                  scoring=ScoringConfig(SIZE, 128))
    shards = list(range(len(p.manifest.shards)))
    assert len(shards) >= 2
    p.run(shards[:1], device=__import__("torch").device("cpu"))  # a pass killed after its first shard
    assert p.todo(shards) == shards[1:]
    first = p.cache.load(p.manifest.shards[0])
    assert first is not None and first[0].dtype == np.float16 and first[0].shape[0] == p.manifest.shards[0].count
    # a shard rebuilt in place (its recorded size changes): its rows are stale, so it is to do again
    doc_url = next(u for u in (tmp_path / "rows").rglob("*.json"))
    doc = json.loads(doc_url.read_text())
    doc["bytes"] += 1
    doc_url.write_text(json.dumps(doc))
    assert p.todo(shards) == shards


def test_rows_of_another_network_or_size_are_refused_in_one_line(tiny_sets, tmp_path):
    p = EmbedPass(pool=tiny_sets["test"], root=str(tmp_path / "rows"), arch="efficientnet_lite0", weights="DEFAULT",
                  scoring=ScoringConfig(SIZE, 128))
    shard = p.manifest.shards[0]
    p.run([0], device=__import__("torch").device("cpu"))
    other = EmbeddingCache(p.root, Space(p.space.arch, p.space.trunk, 96))
    other_folder = tmp_path / "rows" / other.space.tag
    shutil.copytree(tmp_path / "rows" / p.space.tag, other_folder)  # files copied from a 64-px cache
    with pytest.raises(ValueError) as e:
        other.load(shard)
    message = str(e.value)
    assert "\n" not in message and "another network or input size" in message and str(other_folder) in message
