"""Committed results as Markdown: pure functions from a results file's JSON (or a study's results.md) to the text
that docs include between markers (cluster/docs.py). Nothing here measures anything or reads the clock, so a
render of the same file is the same text on every machine, and a test can hold the docs to it.

Numbers are written as strong as their evidence: a difference is called ahead or behind only when its 95%
interval excludes 0; one seed says one seed; a table whose runs come from several code versions says so.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any, Callable

# ------------------------------------------------------------------------------------------------ studies


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}".replace("-", "−")


def _bound(x: float) -> str:
    """An interval's end in points; two decimals where one would print 0.0, so its sign stays visible."""
    text = f"{100 * x:.1f}"
    if text in ("0.0", "-0.0"):
        text = f"{100 * x:.2f}"
    return text.replace("-", "−")


def reading(pair: dict[str, Any]) -> str:
    """What a paired difference may be called: ahead / behind only with a 95% interval that excludes 0."""
    if pair.get("mean") is None:
        return "no paired seeds"
    if pair.get("ci95") is None:
        return "one seed: no interval, not a result"
    low, high = pair["ci95"]
    if low > 0:
        return "ahead: the interval excludes 0"
    if high < 0:
        return "behind: the interval excludes 0"
    return "not resolved: the interval includes 0"


def _score(row: dict[str, Any] | None, seeds: bool = False) -> str:
    if row is None:
        return "n/a"
    if row.get("deterministic"):
        return f"{_pts(row['mean'])} (one fit)"
    return f"{_pts(row['mean'])} ± {_pts(row['std'])}" + (f" ({row['n']} seed{'s' if row['n'] != 1 else ''})"
                                                          if seeds else "")


def _sides(pair: dict[str, Any]) -> tuple[str, str]:
    if pair["why"].startswith("best trained"):
        return f"{pair['variant']} (best trained)", f"{pair['base']} (best probe)"
    return pair["variant"], pair["base"]


def code_versions(doc: dict[str, Any]) -> str:
    """How many runs each code version made, and a warning when there is more than one."""
    runs = doc.get("runs") or []
    counts = Counter((r.get("code") or "?")[:8] for r in runs)
    finals = sum(1 for r in runs if r.get("phase") == "final")
    text = (f"{len(runs)} runs ({finals} final, {len(runs) - finals} tuning) from "
            + ("1 code version" if len(counts) == 1 else f"{len(counts)} code versions")
            + f" ({', '.join(f'{c}: {n}' for c, n in counts.most_common())})")
    if len(counts) > 1:
        text += "; the table mixes code versions, reused across sessions with `--keep-results`"
    return text


def provenance(doc: dict[str, Any], source: str) -> str:
    spec = doc.get("spec") or {}
    seeds = spec.get("seeds") or []
    draws = (spec.get("data") or {}).get("draws")
    drawn = f" on {draws} draw{'s' if draws != 1 else ''} of the training positives" if draws else ""
    return (f"_Source: `{source}`; seeds {', '.join(map(str, seeds))}{drawn}; {code_versions(doc)}. mAP in points "
            "on the test split; differences paired by seed with a 95% t interval; a probe is one deterministic fit._")


def study_verdicts(doc: dict[str, Any], source: str) -> str:
    """Every paired difference a study computed (each BG-split variant against its base, the best trained method
    against the best probe), with both sides' test mAP and what the interval allows one to say; then which method
    validation picks, and where the numbers come from."""
    rows = {(r["setting"], r["method"]): r for r in doc["table"]}
    out = ["| setting | variant | base | variant's test mAP | base's test mAP | difference [95% CI] | seeds "
           "| reading |", "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for p in doc["pairs"]:
        diff = "n/a" if p["mean"] is None else _signed(p["mean"])
        if p.get("ci95"):
            diff += f" [{_bound(p['ci95'][0])}, {_bound(p['ci95'][1])}]"
        variant, base = _sides(p)
        out.append(f"| {p['setting']} | {variant} | {base} | {_score(rows.get((p['setting'], p['variant'])))} | "
                   f"{_score(rows.get((p['setting'], p['base'])))} | {diff} | {p['n']} | {reading(p)} |")
    out.append("")
    for a in doc.get("advice") or []:
        out.append(f"Validation picks **{a['method']}** for {a['setting']} (val mAP {_pts(a['val_map'])}).")
    if doc.get("advice"):
        out.append("")
    out.append(provenance(doc, source))
    return "\n".join(out)


def section(markdown: str, headings: list[str], source_dir: str, doc_dir: str) -> str:
    """The ``## heading`` sections of a results.md whose titles start with ``headings``, each as a bold title and
    its body; images are pointed at from the including page's folder."""
    parts = re.split(r"^## ", markdown, flags=re.M)[1:]
    found = []
    for want in headings:
        match = [p for p in parts if p.startswith(want)]
        if not match:
            raise ValueError(f"no section starting {want!r} in the results page; its sections: "
                             + ", ".join(repr(p.splitlines()[0]) for p in parts))
        title, _, body = match[0].partition("\n")

        def image(m: re.Match[str]) -> str:
            target = m.group(2)
            if "://" in target or target.startswith("/"):
                return m.group(0)
            return f"![{m.group(1)}]({os.path.relpath(os.path.join(source_dir, target), doc_dir)})"

        body = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", image, body.strip())
        if title.startswith("Paired differences"):
            body = _with_readings(body)
        found.append(f"**{title.strip()}**\n\n{body}")
    return "\n\n".join(found)


def _with_readings(body: str) -> str:
    """A results page's table of paired differences with the reading column: what its 95% interval allows."""
    lines = body.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("|") and "95% CI" in line), None)
    if header is None:
        return body
    column = [c.strip() for c in lines[header].strip("|").split("|")].index("95% CI")
    lines[header] += " reading |"
    lines[header + 1] += " --- |"
    for i in range(header + 2, len(lines)):
        if not lines[i].startswith("|"):
            break
        cell = [c.strip() for c in lines[i].strip("|").split("|")][column]
        bounds = re.fullmatch(r"\[(-?[\d.]+), (-?[\d.]+)\]", cell)
        pair = {"mean": 0.0, "ci95": [float(bounds.group(1)), float(bounds.group(2))] if bounds else None}
        lines[i] += f" {reading(pair)} |"
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ benches


def _table(head: list[str], rows: list[list[Any]], right: set[int] | None = None) -> str:
    right = set(range(1, len(head))) if right is None else right
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---:" if i in right else "---"
                                                            for i in range(len(head))) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def prefix_step(doc: dict[str, Any]) -> str:
    a = doc["args"]
    modes = {"full": "full fine-tune", "frozen": "frozen prefix", "frozen+shared": "frozen + shared with the teacher"}
    sizes = sorted({r["image_size"] for r in doc["rows"]})
    by = {(r["image_size"], r["mode"]): r for r in doc["rows"]}
    rows = [[size] + [f"{by[size, m]['img_s']:.1f} img/s ({by[size, m]['speedup_vs_full']:.2f}×)"
                      if (size, m) in by else "-" for m in modes] for size in sizes]
    return (_table(["px", *modes.values()], rows) + "\n\n"
            f"_{a['trunk']}, {doc['device']}, batch {a['batch']}, {a['precision']}, frozen stages N = "
            f"{a['frozen_stages']}, synthetic batches (the step alone), median of {a['repeats']} blocks of "
            f"{a['steps']} steps; one run._")


def views_run(doc: dict[str, Any]) -> str:
    c = doc["config"]
    rows = []
    for r in doc["rows"]:
        rows.append([r["mode"], f"{r['epochs']:g}", r["steps"], f"{r['build_s'] / 60:.1f}", f"{r['train_s'] / 60:.1f}",
                     f"{r['img_s']:.1f}",
                     f"{r['projected_run_s'] / 60:.1f}" if "projected_run_s" in r else "-",
                     f"{r['kb_per_view']:.1f}" if "kb_per_view" in r else "-",
                     f"{r['per_1m_images_gb_at_10_views']:.0f}" if "per_1m_images_gb_at_10_views" in r else "-",
                     f"{r['speedup_vs_online']:.2f}×" if "speedup_vs_online" in r else "-"])
    return (_table(["mode", "epochs", "steps", "cache build min", "train min", "img/s", "projected 30-epoch min",
                    "KB a view", "GB per 1M images at 10 views", "vs online"], rows, set(range(1, 10))) + "\n\n"
            f"_{c['image_size']} px, frozen stages N = {c['frozen_stages']}, {c['views']} views, {doc['cpus']} CPUs; "
            "the online row is measured over its epochs and projected to the run's length; one run._")


def probe_fit(doc: dict[str, Any]) -> str:
    fits = [r for r in doc["rows"] if "fit_s" in r]
    rows = [[f"{r['rows']:,}", f"{r['features_mb']:.0f}", f"{r['fit_s']:.0f}", r["iterations"],
             "yes" if r["converged"] else "no", f"{r['fit_peak_mb'] / 1024:.2f}"] for r in fits]
    text = _table(["rows fitted", "features MB", "fit s", "L-BFGS iterations", "converged", "fit peak GB"], rows)
    for r in doc["rows"]:
        if "keys_per_s" in r:
            text += (f"\n\nThe background sampler kept {r['kept']:,} of {r['keys']:,} keys (rate {r['rate']:g}) in "
                     f"{r['seconds']:.1f} s ({r['keys_per_s']:,.0f} keys/s).")
    fit = fits[0] if fits else {}
    return text + (f"\n\n_C {fit.get('C', 'n/a')}, class weight {fit.get('class_weight', 'n/a')}, "
                   f"{doc['machine']['cpus']} CPUs; one run each. Command: `{doc['command']}`._")


def probe_solver(doc: dict[str, Any]) -> str:
    c = doc["config"]
    rows = [[r["solver"], f"{r['C']:g}", f"{r['seconds']:.2f}", r["iterations"], "yes" if r["converged"] else "no",
             f"{r['grad_max']:.1e}", f"{r['max_prob_diff_vs_other_solver']:.1e}"] for r in doc["rows"]]
    return (_table(["solver", "C", "seconds", "iterations", "converged", "max gradient", "max probability difference "
                    "to the other solver"], rows, {1, 2, 3, 5, 6}) + "\n\n"
            f"_{c['n']:,} synthetic rows of {c['dim']} features, {c['per_rare']} positives a rare class, class weight "
            f"{c['class_weight']}, {c['threads']} thread; one run._")


def damaged_headers(doc: list[dict[str, Any]]) -> str:
    rows = [[r.get("read_as", "evaluation"), r.get("field", "any"), r["shards"], f"{r['samples']:,}", r["damaged"],
             f"{r['read']:,}", r["lost"], r["good_lost"], r.get("skip_counts", "-")] for r in doc]
    return (_table(["read as", "header field damaged", "shards", "samples", "damaged samples", "read", "lost",
                    "good samples lost", "skips counted"], rows, set(range(2, 9))) + "\n\n"
            "_One byte changed in one member header of one sample in each shard; the set read once, in evaluation "
            "order or as one training epoch (the first column); one run each._")


def loader_latency(doc: dict[str, Any]) -> str:
    c = doc["config"]
    return (doc["table"].strip() + "\n\n"
            f"_The table as `bench/loader.py` wrote it: {c['images']:,} synthetic ~0.3 MB photos, {c['shard_mb']:g} MB "
            f"shards, batch {c['batch_size']}, {c['image_size']} px, medians of {c['repeats']} sweeps of "
            f"{c['seconds']:g} s a cell, {doc['cpus']} CPUs shared with the S3 server and the latency proxy; S3 is "
            f"SeaweedFS on loopback, `S3 + {c['s3_latency_ms']:g} ms` holds back every answer's first byte. Local "
            "rows do not use read-ahead, so both read-ahead rows share their local figure._")


def own_data_loop(doc: list[dict[str, Any]], readme_commands: list[str] | None) -> str:
    """The own-data block as measured; whether the README's block is still that block is part of the render."""
    r = doc[0]
    compare = r["compare"]
    winner = ", ".join(r["winner"])
    steps = [["compare (`bgsplit experiment`)",
              "validation picks " + winner + "; test: " + "; ".join(
                  f"{m} {_score(row, seeds=True)}" for m, row in compare.items())],
             ["train the winner (v1)", f"{_pts(r['test_map_v1'])} (one training run)"],
             ["mine the pool, label the top 100 a class", "precision@100 " + ", ".join(
                 f"{c} {p:.2f}" for c, p in r["mined_precision_at_100"].items())],
             ["add the labels, retrain (v2)",
              f"{_pts(r['test_map_v2'])} ({_signed(r['test_map_v2'] - r['test_map_v1'])} on v1; one run each, "
              "no interval)"]]
    measured = [c["command"] for c in r["commands"]]
    if readme_commands is None:
        same = "The README has no own-data block to compare with the measured one."
    elif readme_commands == measured:
        same = "The commands measured are the README's own-data block as it stands."
    else:
        same = ("The README's own-data block has changed since this measurement: rerun "
                "`python bench/own_data_loop.py --json bench/results/own_data_loop/results.json`.")
    minutes = r["total_seconds"] / 60
    timed = [[f"`{' '.join(c['command'].split('#')[0].split())}`", f"{c['seconds']:.0f}"] for c in r["commands"]]
    told = next((c for c in r["commands"] if c.get("estimate_printed_s")), None)
    estimate = (f" Before its first run the experiment printed an estimate of {told['estimate_printed_s'] / 60:.0f} "
                f"min; it took {told['seconds'] / 60:.0f} min in all (sets checked, calibration and reports "
                "included)." if told else "")
    return (_table(["step", "result (test mAP points)"], [[s, v] for s, v in steps], set()) + "\n\n"
            + _table(["command", "seconds"], timed, {1}) + "\n\n"
            f"{same} The whole block took {minutes:.1f} min on this 2-core machine; test mAP is on the set built "
            f"from `photos-test/`.{estimate}")


def faults(doc: dict[str, Any]) -> str:
    rows = [[r["fault"], "yes" if r["survived"] else "no", r["steps_lost"], r["samples_skipped"],
             f"{r['throttled']} / {r['retries']}", f"{r['wall_s']:.1f} (+{r['wall_added_s']:.1f})", r.get("note", "")]
            for r in doc["rows"]]
    return (_table(["fault", "survived", "steps lost", "samples skipped", "throttled / retries", "wall s (added)",
                    "what was done"], rows, {2, 3, 4, 5}) + "\n\n"
            f"_One training run of {doc['steps']} steps over {doc['images']} images, a checkpoint every "
            f"{doc['checkpoint_every']} steps, per fault; one run each, so wall times are rough (about ±30%)._")


def teacher_report(doc: dict[str, Any]) -> str:
    from trainer.teacher_report import markdown

    return markdown(doc).strip() + f"\n\n_Command: `bgsplit teacher-report --data {doc['data']} --sizes " + \
        ",".join(str(r["image_size"]) for r in doc["rows"]) + f" --images {doc['rows'][0]['images']}`; one sample._"


def cold_start_loop(doc: dict[str, Any]) -> str:
    def found(t: dict[str, Any]) -> str:
        return f"{t['mean']:.1f} [{t['lo']:.1f}, {t['hi']:.1f}]" if t["n"] > 1 else f"{t['mean']:.1f} (one draw)"

    total = sum(doc["rare_in_pool"].values())
    rows = [[r["arm"], r["round"], found(r["found_total"]), f"{100 * r['recall']['mean']:.1f}%",
             ", ".join(f"{c} {sum(v) / len(v):.1f}" for c, v in r["found_per_class"].items())] for r in doc["rows"]]
    e = doc["embedding"]
    ratio = doc.get("round1_cold_over_random")
    ratio_text = (f" In round 1 the cold start found {min(ratio):.1f}× to {max(ratio):.1f}× what random review found "
                  "(per draw)." if ratio else "")
    rate = f"{e['images_per_s']:.1f} images/s" if e.get("images_per_s") else "not re-measured (rows reused)"
    return (_table(["arm", "after round", "positives found, mean [95% CI]", "recall", "per class (mean)"], rows,
                   {1, 2, 3}) + "\n\n"
            f"_A pool of {doc['pool_images']:,} Fashion-MNIST images holding {total} rare images "
            f"({', '.join(f'{n}' for n in doc['rare_in_pool'].values())} a class), {doc['top']} candidates reviewed a "
            f"class a round, {doc['draws']} draws of the 2 starting examples a class (intervals: t over draws)."
            f"{ratio_text}{_trained_against_cold(doc)} The pool's embedding pass at 224 px: {rate} on "
            f"{e['threads']} CPU thread(s); {e['bytes_per_image']:,.0f} bytes a stored image._")


def _trained_against_cold(doc: dict[str, Any]) -> str:
    """The trained arm's positives after the last round minus the cold start's, paired by draw (the same round 1)."""
    from cluster.experiment_stats import paired_difference

    last = max(r["round"] for r in doc["rows"])
    per_draw = {r["arm"]: {d: sum(v[d] for v in r["found_per_class"].values()) for d in range(r["draws"])}
                for r in doc["rows"] if r["round"] == last}
    if "trained" not in per_draw or "cold" not in per_draw:
        return ""
    diff = paired_difference(per_draw["trained"], per_draw["cold"])
    ci = f" [{diff['ci95'][0]:+.1f}, {diff['ci95'][1]:+.1f}]" if diff["ci95"] else " (one draw)"
    minutes = sum(doc["trained_seconds"]) / len(doc["trained_seconds"]) / 60
    return (f" After round {last} the trained arm found {diff['mean']:+.1f}{ci} positives against the cold start "
            f"(paired by draw); its training (cached views built, then {doc['trained_epochs']:g} epochs) took "
            f"{minutes:.0f} min a draw.")


def embed_memory(doc: list[dict[str, Any]]) -> str:
    rows = [[f"{r['pool_images']:,}", f"{r['images']:,}", f"{r['peak_rss_mb']:,.0f}", f"{r['images_per_s']:.0f}",
             f"{r['bytes_per_image']:,.0f}"] for r in doc]
    r = doc[-1]
    ten_m = 10_000_000 * r["bytes_per_image"] / 1e9
    return (_table(["pool (asked)", "images embedded", "peak RSS MB", "images/s", "bytes stored an image"], rows,
                   {0, 1, 2, 3, 4}) + "\n\n"
            f"_Each pool embedded by a fresh process (`EmbedPass`, as `bgsplit mine --positives` runs it) with "
            f"{r['threads']} thread at {r['image_size']} px; the peak is the process's whole resident memory, the "
            f"teacher and torch included. At 10M images the rows take {ten_m:,.1f} GB on disk beside the pool, "
            "and the pass holds the same 8 shards' rows at a time._")


BENCHES: dict[str, Callable[[Any], str]] = {
    "prefix_step": prefix_step, "views_run": views_run, "probe_fit": probe_fit, "probe_solver": probe_solver,
    "damaged_headers": damaged_headers, "loader_latency": loader_latency, "faults": faults,
    "teacher_report": teacher_report, "cold_start_loop": cold_start_loop, "embed_memory": embed_memory,
}
"""bench/results/<name>/results.json -> its table (own_data_loop also reads the README; cluster/docs.py)."""
