"""Where a study's runs live and when a stored result is reused; the trials an executor runs.

Each run's result is stored beside it with the key it was made under (its config away from the defaults, its
sets' identities) and the code's fingerprint, and a rerun of the study reuses every stored result whose key and
code still match. A trial is everything an executor needs to run one run anywhere (this process, a Ray Tune trial)
and store its result where the driver looks for it."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.experiment_configs import dotted
from cluster.experiment_records import RunRecord
from cluster.experiment_scorers import default_score, wise_ft_from_checkpoint
from cluster.study_cost import Progress
from data import storage
from data.shards import manifest_identity
from trainer.config import JobConfig


Score = Callable[[JobConfig, str], dict[str, Any]]
"""(config to train, evaluation set location) -> {"map": float, "ap": {...}}; trains once, scores once."""


def run_hash(value: Any) -> str:
    """A short hash of a run's overrides, which names its folder (tune-<hash>, final-<hash>)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


ROOT = Path(__file__).resolve().parents[1]


def code_fingerprint() -> str:
    """Hash of bgsplit's own source under data/ and trainer/ (sub-folders included: a change to a source reader
    changes what a run trains on) and of this study's own modules (cluster/experiment*.py: how a run is trained
    and scored): a stored result is reused only if neither its config nor the code changed."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("data/**/*.py"), *ROOT.glob("trainer/**/*.py"),
                        *ROOT.glob("cluster/experiment*.py")]):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def config_key(cfg: JobConfig) -> dict[str, Any]:
    """The config as what it sets away from JobConfig's defaults (dotted key -> value), without where the run and
    its sets are (the sets enter a result's key by their manifests' identity): a field added to the config later,
    at its default, and a study moved to another folder or machine, leave every stored result reusable."""
    defaults = dotted(JobConfig().to_dict())
    where = {"data.train", "data.val", "data.test", "run.out_dir", "model.probe_val", "model.probe_cache_dir",
             "views.cache_dir"}
    return {k: v for k, v in dotted(cfg.to_dict()).items()
            if k not in where and (k not in defaults or defaults[k] != v)}


ProbeScore = Callable[[Any, str, str], dict[str, Any]]
"""(trainer.probe.ProbeParams, training set, evaluation set) -> {"map", "ap", "fit"}: fit once, score once."""


@dataclass
class Trial:
    """One train-and-score run, as an executor gets it: everything needed to run it anywhere and store its result
    where the experiment looks for it (``cfg.run.out_dir``), so a driver that dies loses only runs in flight."""

    cfg: JobConfig
    eval_set: str
    key: dict[str, Any]
    code: str


Execute = Callable[[list[Trial], Callable[[int, dict[str, Any]], None]], None]
"""Runs trials (in this process, or as Ray Tune trials), calling ``on_done(i, result)`` as trial i finishes."""


def store_result(out_dir: str, key: dict[str, Any], code: str, result: dict[str, Any]) -> None:
    # atomic: a killed experiment never leaves a half-written result to be reused
    storage.write_bytes(os.path.join(out_dir, "experiment_result.json"),
                        json.dumps({"key": key, "code": code, "result": result}, indent=1, default=str).encode())


SCORES, SCORE_LABELS = "scores.npy", "scores_labels.npy"
"""Beside a run's result: the main head's scores of every image it was scored on ([N, K+1], the set's manifest
order) and their labels, so a later question about the same images (how sure is validation's pick?) needs no
rerun. Arrays only: read back with allow_pickle=False."""


def save_scores(out_dir: str, scored: dict[str, Any]) -> None:
    import io

    import numpy as np

    if scored.get("scores") is None:
        return
    for name, array in ((SCORES, np.asarray(scored["scores"], np.float32)),
                        (SCORE_LABELS, np.asarray(scored["labels"], np.int64))):
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        storage.write_bytes(os.path.join(out_dir, name), buf.getvalue())


def load_scores(out_dir: str) -> tuple[Any, Any] | None:
    """(scores, labels) a run stored, None for a run made before they were kept."""
    import numpy as np

    paths = [os.path.join(out_dir, name) for name in (SCORES, SCORE_LABELS)]
    if not all(os.path.exists(p) for p in paths):
        return None
    return tuple(np.load(p, allow_pickle=False) for p in paths)  # type: ignore[return-value]


def _result(scored: dict[str, Any], start: float) -> dict[str, Any]:
    return {"map": float(scored["map"]), "ap": scored.get("ap", {}), "seconds": time.time() - start,
            "started": start, "curve": scored.get("curve", []), "fit": scored.get("fit", {}),
            **({"wise_ft": scored["wise_ft"]} if scored.get("wise_ft") else {})}


def run_trial(trial: Trial, score: Score) -> dict[str, Any]:
    """Train and score one trial and store its result beside its run: what every executor runs."""
    start = time.time()
    scored = score(trial.cfg, trial.eval_set)
    result = _result(scored, start)
    save_scores(trial.cfg.run.out_dir, scored)  # before the result: a stored result always has its scores
    store_result(trial.cfg.run.out_dir, trial.key, trial.code, result)
    return result


def sequential(score: Score) -> Execute:
    """The executor without a cluster: one trial after another in this process."""
    def execute(trials: list[Trial], on_done: Callable[[int, dict[str, Any]], None]) -> None:
        for i, trial in enumerate(trials):
            on_done(i, run_trial(trial, score))
    return execute


@dataclass
class Runner:
    """Runs (config, evaluation set) pairs, reusing each stored result when nothing that affects it changed."""

    score: Score
    code: str
    log: Callable[[str], None] = print
    probe: ProbeScore | None = None
    keep_results: bool = False
    """Reuse a stored result made by another version of the code (a study that spans sessions while the code
    moves on); results.md counts the runs per code version, so the mix is never hidden."""
    execute: Execute | None = None
    """How the runs that are not stored are run (default: ``sequential(score)``)."""
    progress: Progress | None = None
    """Told of every run as it finishes or is found stored."""

    def run(self, cfg: JobConfig, eval_set: str, record: RunRecord) -> RunRecord:
        return self.run_many([(cfg, eval_set, record)])[0]

    def run_many(self, items: list[tuple[JobConfig, str, RunRecord]]) -> list[RunRecord]:
        """Every (config, evaluation set, planned record): stored results at once, the rest handed to the executor
        in one batch (independent runs: parallel trials on a cluster); records in the order given."""
        records: list[RunRecord | None] = [None] * len(items)
        pending: list[tuple[int, Trial, RunRecord]] = []
        for i, (cfg, eval_set, record) in enumerate(items):
            key = {"config": config_key(cfg),
                   "data": {"train": manifest_identity(cfg.data.train), "val": manifest_identity(cfg.data.val),
                            "eval": manifest_identity(eval_set),
                            **({"probe_val": manifest_identity(cfg.model.probe_val)}
                               if cfg.model.head_init == "probe" else {})}}
            record = dataclasses.replace(record, image_size=cfg.data.image_size, run_dir=cfg.run.out_dir)
            stored = self._stored(cfg.run.out_dir, key)
            if stored is not None:
                result, code = stored
                if (record.phase == "final" and cfg.model.head_init == "probe" and cfg.model.probe_val
                        and not result.get("wise_ft") and self.score is default_score):
                    wise = wise_ft_from_checkpoint(cfg, eval_set, result["map"])
                    if wise is not None:  # scored before WiSE-FT was reported: added from its checkpoint, kept
                        result["wise_ft"] = wise
                        store_result(cfg.run.out_dir, key, code, result)
                records[i] = dataclasses.replace(record, result=result, code=code, reused=True)
                self._log(records[i])
            else:
                # a checkpoint left by an earlier config or a killed attempt must not outlive its result
                shutil.rmtree(Path(cfg.run.out_dir) / "checkpoints", ignore_errors=True)
                pending.append((i, Trial(cfg, eval_set, key, self.code), record))

        def on_done(j: int, result: dict[str, Any]) -> None:
            i, _, record = pending[j]
            records[i] = dataclasses.replace(record, result=result, code=self.code, reused=False)
            self._log(records[i])

        if pending:
            (self.execute or sequential(self.score))([t for _, t, _ in pending], on_done)
        missing = [items[i][0].run.out_dir for i, r in enumerate(records) if r is None]
        if missing:
            raise RuntimeError(f"{len(missing)} run(s) gave no result (first: {missing[0]}): rerun the experiment "
                               "(finished runs are reused)")
        return records  # type: ignore[return-value]

    def run_probe(self, params: Any, train: str, eval_set: str, out_dir: str, record: RunRecord) -> RunRecord:
        if self.probe is None:
            raise ValueError("a probe method needs a probe scorer")
        key = {"probe": dataclasses.asdict(params),
               "data": {"train": manifest_identity(train), "eval": manifest_identity(eval_set)}}
        record = dataclasses.replace(record, run_dir=out_dir)
        stored = self._stored(out_dir, key)
        if stored is None:
            start = time.time()
            scored = self.probe(params, train, eval_set)
            result = _result(scored, start)
            save_scores(out_dir, scored)
            store_result(out_dir, key, self.code, result)
            record = dataclasses.replace(record, result=result, code=self.code, reused=False)
        else:
            record = dataclasses.replace(record, result=stored[0], code=stored[1], reused=True)
        self._log(record)
        return record

    def _stored(self, out_dir: str, key: dict[str, Any]) -> tuple[dict[str, Any], str | None] | None:
        """The stored result of the run in ``out_dir`` and the code that made it, when its key matches and its code
        is this code (or ``keep_results``)."""
        path = Path(out_dir) / "experiment_result.json"
        if path.exists():
            stored = json.loads(path.read_text())
            if stored.get("key") == key and (stored.get("code") == self.code or self.keep_results):
                return stored["result"], stored.get("code")
        return None

    def _log(self, rec: RunRecord) -> None:
        what = f"tune {rec.point}: val" if rec.phase == "tune" else f"seed {rec.seed}: test"
        self.log(f"  {rec.setting:9s} {rec.method:24s} {what} mAP {100 * rec.map:5.1f} "
                 f"({rec.result['seconds']:.0f}s{', reused' if rec.reused else ''})")
        if self.progress is not None:
            self.progress.record(rec.row())
