"""`bgsplit docs`: every table in README.md and docs/ is its committed result file rendered, and the check says so.

Fast (seconds, no training): the renders read committed JSON and Markdown, the parsers and the config dataclasses.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cluster import docs, tables
from cluster.cli import build_parser, main
from trainer.config import JobConfig
from trainer.losses import MAIN_LOSSES

ROOT = Path(__file__).resolve().parents[1]
# as `bgsplit docs` does: the CLI hands the docs its parser (cluster/docs.py never imports the CLI)
docs.PROVIDED["cli-reference"] = lambda: docs.cli_reference(build_parser())


# ------------------------------------------------------------------------------------------------ this checkout


def test_every_generated_block_matches_its_committed_source():
    problems, pending = docs.check(ROOT)
    assert problems == [], "\n".join(problems)
    # a pending block is reported by name, never counted as a match
    for note in pending:
        assert "pending" in note and "bgsplit docs" in note


def test_the_pages_hold_generated_blocks_of_every_kind():
    kinds = {b.directive.split()[0] for page in docs.doc_files(ROOT)
             for b in docs.blocks((ROOT / page).read_text(), page)}
    assert {"verdicts", "section", "bench", "own-data-loop", "plan", "modules", "config-reference",
            "cli-reference"} <= kinds


def test_a_changed_number_in_the_readme_fails_the_check():
    text = (ROOT / "README.md").read_text()
    block = next(b for b in docs.blocks(text, "README.md") if b.directive.startswith("verdicts"))
    body = text[block.start:block.end]
    number = re.search(r"\d+\.\d", body)
    changed = body[:number.start()] + str((int(number.group(0)[0]) + 1) % 10) + body[number.start() + 1:]
    tampered = text[:block.start] + changed + text[block.end:]
    problems, _ = docs.check_page(ROOT, "README.md", tampered, docs.git_tracked(ROOT))
    assert len(problems) == 1 and problems[0].startswith(f"README.md:{block.line}: generated block `verdicts")
    assert "differs from its render" in problems[0] and "bgsplit docs" in problems[0]


def test_every_doc_page_names_the_command_it_documents():
    for page in docs.doc_files(ROOT):
        if page == "README.md":
            continue
        head = (ROOT / page).read_text().splitlines()[:6]
        assert any(line.startswith("Documents:") and "`" in line for line in head), page


def test_the_readme_is_short_and_its_recipes_come_first():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    headings = [i for i, line in enumerate(lines) if line.startswith("## ")]
    own = next(i for i in headings if lines[i] == docs.OWN_DATA)
    cluster = next(i for i in headings if lines[i].startswith("## On a cluster"))
    assert own < 60 and cluster < 60, (own, cluster)
    for command in ("./run.sh demo", "./run.sh test"):
        assert any(line.startswith(command) for line in lines), command
    # every page of docs/ is linked from the README
    text = "\n".join(lines)
    for page in docs.doc_files(ROOT)[1:]:
        assert f"({page})" in text, page


def test_every_file_of_this_repository_the_pages_name_exists():
    """A page naming `trainer/x.py` or configs/y.yaml that was renamed away sends a reader nowhere."""
    named = re.compile(r"(?<![\w/.-])((?:data|trainer|cluster|configs|bench|tests)/[\w/.-]*\.(?:py|yaml|sh|txt|png))")
    missing = [(page, path) for page in docs.doc_files(ROOT) for path in named.findall((ROOT / page).read_text())
               if not (ROOT / path).exists() and not path.startswith("bench/results/")
               and not re.search(r"/[A-Z]+\.", path)]  # a placeholder such as configs/X.yaml
    assert missing == []


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    heads = re.findall(r"^#+ (.*)$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_link_between_the_pages_lands_on_a_file_and_a_heading():
    broken = []
    for page in docs.doc_files(ROOT):
        text = re.sub(r"```.*?```", "", (ROOT / page).read_text(), flags=re.S)
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in link:
                continue
            path, _, anchor = link.partition("#")
            target = (ROOT / page).parent / path if path else ROOT / page
            if not target.exists() or (anchor and target.suffix == ".md" and anchor not in _anchors(target)):
                broken.append((page, link))
    assert broken == []


def test_the_own_data_block_is_the_one_the_bench_runs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("own_data_loop", ROOT / "bench" / "own_data_loop.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    commands = [c for c in bench.readme_block() if not c.startswith(bench.REVIEW_LINE)]
    assert commands == docs.readme_own_data(ROOT) and len(commands) >= 8


# ------------------------------------------------------------------------------------------------ the mechanism


def _study(path: Path, diff: float = 0.079, low: float = 0.057, codes: tuple[str, ...] = ("aaaa1111",)) -> None:
    runs = [{"phase": "final", "code": c, "setting": "s"} for c in codes] + [{"phase": "tune", "code": codes[0]}]
    doc = {"spec": {"seeds": [0, 1, 2, 3]}, "runs": runs, "advice": [{"setting": "s", "method": "bg", "val_map": 0.5}],
           "table": [{"setting": "s", "method": "ft", "mean": 0.378, "std": 0.008, "n": 4},
                     {"setting": "s", "method": "bg", "mean": 0.457, "std": 0.010, "n": 4}],
           "pairs": [{"setting": "s", "variant": "bg", "base": "ft", "why": "BG split", "n": 4, "mean": diff,
                      "ci95": [low, 0.102]}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _page(root: Path, page: str, directive: str) -> str:
    text = f"# p\n\n<!-- begin generated: {directive} -->\n<!-- end generated -->\n"
    (root / page).parent.mkdir(parents=True, exist_ok=True)
    (root / page).write_text(text)
    docs.rewrite(root)
    return (root / page).read_text()


def test_the_check_fails_on_a_changed_figure_and_on_a_changed_source(tmp_path):
    _study(tmp_path / "bench/results/x/results.json")
    text = _page(tmp_path, "docs/r.md", "verdicts bench/results/x/results.json")
    tracked = {"bench/results/x/results.json", "docs/r.md"}
    assert "+7.9 [5.7, 10.2]" in text and "ahead: the interval excludes 0" in text
    assert docs.check(tmp_path, tracked) == ([], [])
    # a number changed by hand in the page
    (tmp_path / "docs/r.md").write_text(text.replace("+7.9", "+8.9"))
    problems, _ = docs.check(tmp_path, tracked)
    assert len(problems) == 1 and problems[0].startswith("docs/r.md:3: generated block `verdicts")
    assert "+8.9" in problems[0] and "+7.9" in problems[0]  # what the page says, and what the result says
    # the result file re-measured: the page is stale until `bgsplit docs` runs
    (tmp_path / "docs/r.md").write_text(text)
    _study(tmp_path / "bench/results/x/results.json", diff=0.05)
    problems, _ = docs.check(tmp_path, tracked)
    assert len(problems) == 1 and "differs from its render" in problems[0]
    assert docs.rewrite(tmp_path) == ["docs/r.md"] and docs.check(tmp_path, tracked) == ([], [])
    assert "+5.0" in (tmp_path / "docs/r.md").read_text()


def test_a_source_or_a_cited_result_that_is_not_committed_fails(tmp_path):
    _study(tmp_path / "bench/results/x/results.json")
    text = _page(tmp_path, "README.md", "verdicts bench/results/x/results.json")
    problems, _ = docs.check(tmp_path, {"README.md"})  # the block reads it, and its provenance line cites it
    assert problems and all("bench/results/x/results.json" in p and "not committed" in p for p in problems)
    assert any("git add bench/results/x/results.json" in p for p in problems)
    tracked = {"README.md", "bench/results/x/results.json"}
    (tmp_path / "README.md").write_text(text + "\nSee `bench/results/loader_latency/cross_epoch.json`.\n"
                                               "A command's output folder: `bgsplit demo --out bench/results/demo`.\n"
                                               "[plot](bench/results/x/results.json), bench/results/x/.\n")
    problems, _ = docs.check(tmp_path, tracked)
    assert problems == [f"README.md:{len(text.splitlines()) + 2}: cites bench/results/loader_latency/cross_epoch.json, "
                        "which is not committed: commit the result or drop the figures that rest on it"]
    # from docs/, a relative link is resolved from the page's folder
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/a.md").write_text("![c](../bench/results/x/results.json) ![d](../bench/results/y/c.png)\n")
    problems, _ = docs.check(tmp_path, tracked | {"docs/a.md"})
    assert any(p.startswith("docs/a.md:1: cites bench/results/y/c.png") for p in problems)
    assert not any("bench/results/x/results.json, which" in p for p in problems)


def test_a_block_whose_source_is_absent_is_pending_and_holds_nothing_else(tmp_path):
    directive = 'section bench/results/demo/results.md "Test mAP" pending="bgsplit demo --out bench/results/demo"'
    text = _page(tmp_path, "README.md", directive)
    body = text.split(" -->\n", 1)[1].split(docs.END)[0].strip()
    assert body == docs.pending_line("bgsplit demo --out bench/results/demo")
    problems, pending = docs.check(tmp_path, {"README.md"})
    assert problems == [] and len(pending) == 1 and "README.md:3" in pending[0]
    # stale numbers left in a pending block are not a pass
    (tmp_path / "README.md").write_text(text.replace(body, "| fine-tune | 17.5 ± 1.0 |"))
    problems, _ = docs.check(tmp_path, {"README.md"})
    assert len(problems) == 1 and "differs from its render" in problems[0]
    # the demo run lands: the block becomes the table, and it must be committed
    page = tmp_path / "bench/results/demo/results.md"
    page.parent.mkdir(parents=True)
    page.write_text("# t\n\n## Test mAP (mean ± std over seeds)\n\n| a |\n| --- |\n| 1.0 |\n\n## Wall time\n\n1 s\n")
    docs.rewrite(tmp_path)
    assert "| 1.0 |" in (tmp_path / "README.md").read_text() and "Wall time" not in (tmp_path / "README.md").read_text()
    problems, pending = docs.check(tmp_path, {"README.md"})
    assert pending == [] and problems  # the block reads it and its source line cites it: both say so
    assert all("bench/results/demo/results.md" in p and "not committed" in p for p in problems)
    # without pending=, an absent source is an error naming the fix
    (tmp_path / "README.md").write_text('<!-- begin generated: section bench/results/no/results.md "T" -->\n'
                                        "<!-- end generated -->\n")
    problems, _ = docs.check(tmp_path, {"README.md"})
    assert problems == ["README.md:1: the block's source bench/results/no/results.md does not exist: run the command "
                        "that writes it and commit it, or remove the block"]


def test_markers_that_do_not_pair_are_one_line_errors(tmp_path):
    (tmp_path / "README.md").write_text("<!-- begin generated: bench probe_fit -->\ntext\n")
    problems, _ = docs.check(tmp_path, {"README.md"})
    assert problems == ["README.md:1: generated block `bench probe_fit` has no `<!-- end generated -->` before the "
                        "next block: add the end marker"]
    (tmp_path / "README.md").write_text("<!-- begin generated: wat x -->\n<!-- end generated -->\n")
    problems, _ = docs.check(tmp_path, {"README.md"})
    assert len(problems) == 1 and "unknown generated block kind 'wat'" in problems[0]


def test_a_results_page_table_of_differences_gets_its_reading():
    md = ("## Paired differences (x)\n\n| variant | base | mean diff | 95% CI | seeds |\n"
          "| --- | --- | ---: | ---: | ---: |\n| a | b | 4.1 | [-10.3, 18.4] | 3 |\n| a | c | 7.0 | [2.9, 11.0] | 3 |\n"
          "| a | d | 2.0 | n/a (one seed) | 1 |\n")
    lines = tables.section(md, ["Paired"], "r", "").splitlines()
    assert lines[2].endswith("| seeds | reading |") and lines[3].endswith("| --- |")
    assert [line.rsplit("|", 2)[1].strip() for line in lines[4:]] == [
        "not resolved: the interval includes 0", "ahead: the interval excludes 0",
        "one seed: no interval, not a result"]


def test_a_bench_file_of_a_new_shape_is_a_one_line_error_naming_the_renderer(tmp_path):
    (tmp_path / "bench/results/probe_fit/again").mkdir(parents=True)
    (tmp_path / "bench/results/probe_fit/again/results.json").write_text(json.dumps({"rows": [{"fit_s": 1}]}))
    (tmp_path / "README.md").write_text("<!-- begin generated: bench probe_fit/again -->\n<!-- end generated -->\n")
    problems, _ = docs.check(tmp_path, {"README.md", "bench/results/probe_fit/again/results.json"})
    assert len(problems) == 1 and "\n" not in problems[0]
    assert problems[0].startswith("README.md:1: bench/results/probe_fit/again/results.json is not the shape "
                                  "cluster/tables.py's probe_fit renderer reads (KeyError")


def test_section_points_images_at_the_including_page():
    md = "# t\n\n## Curves (x)\n\n| a |\n\n![curves](curves.png)\n\n## Other\n\nno\n"
    assert tables.section(md, ["Curves"], "bench/results/s", "docs") == \
        "**Curves (x)**\n\n| a |\n\n![curves](../bench/results/s/curves.png)"
    with pytest.raises(ValueError, match="no section starting 'Nope'"):
        tables.section(md, ["Nope"], "bench/results/s", "")


@pytest.mark.parametrize("ci, words", [([0.001, 0.02], "ahead"), ([-0.02, -0.001], "behind"),
                                       ([-0.01, 0.02], "not resolved"), (None, "one seed")])
def test_a_difference_is_called_ahead_or_behind_only_when_its_interval_excludes_0(ci, words):
    assert tables.reading({"mean": 0.01, "ci95": ci, "n": 1 if ci is None else 4}).startswith(words)


def test_a_study_of_several_code_versions_says_so(tmp_path):
    _study(tmp_path / "a.json", codes=("aaaa1111", "bbbb2222", "bbbb2222", "bbbb2222"))
    text = tables.study_verdicts(json.loads((tmp_path / "a.json").read_text()), "a.json")
    assert "from 2 code versions (bbbb2222: 3, aaaa1111: 2)" in text and "mixes code versions" in text
    _study(tmp_path / "b.json", low=0.0004)
    text = tables.study_verdicts(json.loads((tmp_path / "b.json").read_text()), "b.json")
    assert "[0.04, 10.2]" in text and "mixes" not in text  # a bound near 0 keeps its sign visible


# ------------------------------------------------------------------------------------------------ reference pages


def test_the_config_reference_has_every_key_with_its_default_and_doc():
    text = docs.config_reference()
    for section in dataclasses.fields(JobConfig):
        for f in dataclasses.fields(section.default_factory):
            assert f"| `{section.name}.{f.name}` |" in text, f"{section.name}.{f.name}"
    row = next(line for line in text.splitlines() if line.startswith("| `loss.aux_weight` |"))
    assert "| `0.1` |" in row and "lambda; 0 disables" in row
    row = next(line for line in text.splitlines() if line.startswith("| `loss.main` |"))
    assert f"One of: {', '.join(MAIN_LOSSES)}." in row and "ldam_drw" in MAIN_LOSSES  # the registry's keys
    assert "| `data.read_ahead_mb` | float | `32.0` |" in text  # a field of data.config.LoaderConfig, inherited


def test_the_cli_reference_has_every_command_and_flag():
    parser = build_parser()
    text = docs.cli_reference(parser)
    commands = [name for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)
                for name in a.choices]
    for name in commands:
        assert f"`bgsplit {name}" in text, name
    for flag in ("--positives", "--exclude", "--gpus-per-trial", "--holdout-positives-per-class", "--check"):
        assert f"`{flag}`" in text, flag
    # a default that depends on the machine is not written into the page
    assert str(ROOT) not in text
    row = next(line for line in text.splitlines() if line.startswith("| `--writers`"))
    assert "(see meaning)" in row


def test_bgsplit_docs_check_exits_1_with_one_line_a_problem(tmp_path, capsys):
    """The README alone in a fresh repository: every block's result file is missing there."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "README.md"], cwd=tmp_path, check=True)
    with pytest.raises(SystemExit) as done:
        main(["docs", "--check", "--root", str(tmp_path)])
    assert done.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith("bgsplit docs: README.md:") for line in err)


def test_every_page_section_a_shipped_config_points_to_exists():
    """Issue 36: configs/own_data.yaml sent readers to a README section that did not exist. A config's comment
    that names a page and a quoted section ("docs/results.md, "At the teacher's resolution"") must name a heading of
    that page; and every page a config names must exist."""
    cited = 0
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        comments = " ".join(line.lstrip("# ").rstrip() for line in path.read_text().splitlines()
                            if line.lstrip().startswith("#"))
        for page in re.findall(r"\b((?:docs/[\w./-]+|README)\.md)\b", comments):
            assert (ROOT / page).is_file(), (path.name, page)
        for page, section in re.findall(r"\b(docs/[\w./-]+\.md|README(?:\.md)?),\s*\"([^\"]+)\"", comments):
            page = "README.md" if page.startswith("README") else page
            headings = [line.lstrip("#").strip() for line in (ROOT / page).read_text().splitlines()
                        if line.startswith("#")]
            assert any(section in h for h in headings), (path.name, page, section)
            cited += 1
    assert cited >= 1  # own_data.yaml's pointer is among them
