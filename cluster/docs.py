"""`bgsplit docs`: every figure in README.md and docs/ is generated, so it cannot drift from what was measured.

A generated block sits between two markers on their own lines:

    <!-- begin generated: KIND ARG... -->
    (text written by `bgsplit docs`)
    <!-- end generated -->

KIND is one of

- ``verdicts PATH/results.json``: a study's paired differences, with what each interval allows one to say;
- ``section PATH/results.md HEADING... [pending=COMMAND]``: those ``## `` sections of a study's results page (the
  page `bgsplit experiment` writes beside its results.json), with a line naming the runs and code versions behind
  them. With ``pending=``, a page not committed yet renders as one line naming the command that makes it;
- ``bench NAME``: the table of bench/results/NAME/results.json (cluster.tables.BENCHES);
- ``own-data-loop``: bench/results/own_data_loop/results.json, and whether the README's block is the one measured;
- ``plan SHARDS SAMPLES_PER_SHARD WORLD LOADER_WORKERS BATCH``: what `bgsplit shards plan` prints for such a set
  (data/plan.py is a pure function of these);
- ``modules``: every module of data/, trainer/ and cluster/ with its docstring's first paragraph;
- ``config-reference`` / ``cli-reference``: every config key (trainer/config.py's dataclasses and their field
  docstrings) / every command and flag (cluster/cli.py's parsers).

`bgsplit docs` rewrites every block; `bgsplit docs --check` rewrites nothing and fails (exit 1, one line a problem)
on a block that differs from its render, a block whose source is not committed (``git ls-files``), and a
``bench/results/...`` path cited anywhere in the pages that is not committed. A ``pending=`` block whose source is
absent is reported as pending, and passes only while it holds nothing but its one line.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Collection, Mapping
from typing import Any

from cluster import tables

ROOT = Path(__file__).resolve().parents[1]
BEGIN = re.compile(r"^<!-- begin generated: (.+?) -->[ \t]*$", re.M)
END = "<!-- end generated -->"
RESULTS = "bench/results/"
CITED = re.compile(r"(?:\.\./)*bench/results/[^\s`'\")\]<>|,;*]*")
FIX = "run `bgsplit docs` (python -m cluster.cli docs) to rewrite it"


class DocsError(ValueError):
    """A marker or a source that cannot be rendered; one line naming the page, the line and the fix."""


def doc_files(root: Path = ROOT) -> list[str]:
    """The pages that may hold generated blocks: README.md and every Markdown page under docs/."""
    pages = ["README.md"] if (root / "README.md").is_file() else []
    return pages + sorted(str(p.relative_to(root)) for p in (root / "docs").rglob("*.md"))


@dataclass
class Block:
    page: str
    line: int
    directive: str
    start: int
    """Offset of the body (just after the begin marker's newline)."""
    end: int
    """Offset of the end marker."""


def blocks(text: str, page: str) -> list[Block]:
    found = []
    pos = 0
    while (m := BEGIN.search(text, pos)) is not None:
        line = text.count("\n", 0, m.start()) + 1
        end = text.find(END, m.end())
        nested = BEGIN.search(text, m.end())
        if end < 0 or (nested is not None and nested.start() < end):
            raise DocsError(f"{page}:{line}: generated block `{m.group(1)}` has no `{END}` before the next block: "
                            "add the end marker")
        found.append(Block(page, line, m.group(1).strip(), m.end() + 1, end))
        pos = end + len(END)
    stray = text.count(END) - len(found)
    if stray:
        raise DocsError(f"{page}: {stray} `{END}` marker(s) without a begin marker: remove them")
    return found


@dataclass
class Render:
    text: str
    sources: list[str] = field(default_factory=list)
    """Repo-relative files the text was made from (each must be committed)."""
    pending: str = ""
    """The command that makes an absent source (a ``pending=`` block rendered as its one line)."""


def pending_line(command: str) -> str:
    return (f"_Not measured yet: this table appears here once `{command}` has been run, its results committed, "
            "and `bgsplit docs` run._")


def _load(root: Path, path: str) -> Any:
    return json.loads((root / path).read_text())


def _absent(page: str, line: int, path: str) -> DocsError:
    return DocsError(f"{page}:{line}: the block's source {path} does not exist: run the command that writes it and "
                     "commit it, or remove the block")


def render(root: Path, page: str, line: int, directive: str) -> Render:
    try:
        words = shlex.split(directive)
    except ValueError as e:
        raise DocsError(f"{page}:{line}: cannot read the marker `{directive}` ({e}): quote headings with \"...\"")
    kind, args = words[0], [w for w in words[1:] if not w.startswith("pending=")]
    pending = next((w.split("=", 1)[1] for w in words[1:] if w.startswith("pending=")), "")
    page_dir = os.path.dirname(page)

    def need(n: int, usage: str) -> None:
        if len(args) < n:
            raise DocsError(f"{page}:{line}: `{kind}` needs {usage}")

    if kind == "verdicts":
        need(1, "a results.json path")
        if not (root / args[0]).is_file():
            raise _absent(page, line, args[0])
        return Render(tables.study_verdicts(_load(root, args[0]), args[0]), [args[0]])
    if kind == "section":
        need(2, "a results.md path and at least one heading")
        path = args[0]
        if not (root / path).is_file():
            if pending:
                return Render(pending_line(pending), [], pending)
            raise _absent(page, line, path)
        try:
            text = tables.section((root / path).read_text(), args[1:], os.path.dirname(path), page_dir)
        except ValueError as e:
            raise DocsError(f"{page}:{line}: {path}: {e}") from None
        sources = [path]
        study = os.path.join(os.path.dirname(path), "results.json")
        doc = _load(root, study) if (root / study).is_file() else None
        if isinstance(doc, dict) and "runs" in doc:
            text += "\n\n" + tables.provenance(doc, path)
            sources.append(study)
        else:  # a results page without its study's JSON beside it: its own count of runs per code version
            codes = re.search(r"Runs per code version: ([^\n]*?)\.?$", (root / path).read_text(), re.M)
            text += f"\n\n_Source: `{path}`" + (f"; runs per code version: {codes.group(1)}" if codes else "") + "._"
        return Render(text, sources)
    if kind == "bench":
        need(1, "a bench name (bench/results/NAME, or NAME/RUN for another run of that bench)")
        bench = args[0].split("/")[0]
        if bench not in tables.BENCHES:
            raise DocsError(f"{page}:{line}: no renderer for bench {bench!r}; known: {', '.join(tables.BENCHES)} "
                            "(cluster/tables.py BENCHES)")
        path = f"{RESULTS}{args[0]}/results.json"
        if not (root / path).is_file():
            raise _absent(page, line, path)
        try:
            return Render(tables.BENCHES[bench](_load(root, path)), [path])
        except (KeyError, TypeError, IndexError) as e:
            raise DocsError(f"{page}:{line}: {path} is not the shape cluster/tables.py's {bench} renderer reads "
                            f"({type(e).__name__}: {e}): update the renderer for the bench's new output") from None
    if kind == "own-data-loop":
        path = f"{RESULTS}own_data_loop/results.json"
        if not (root / path).is_file():
            raise _absent(page, line, path)
        return Render(tables.own_data_loop(_load(root, path), readme_own_data(root)), [path])
    if kind == "plan":
        need(5, "SHARDS SAMPLES_PER_SHARD WORLD LOADER_WORKERS BATCH")
        from data.plan import describe_plan, plan_summary

        shards, per, world, workers, batch = (int(a) for a in args[:5])
        summary = plan_summary([per] * shards, world=world, workers=workers, batch_size=batch, mode="exact",
                               policy="pad")
        return Render(f"```\n$ bgsplit shards plan --data SET --world {world} --loader-workers {workers} --batch-size "
                      f"{batch}     # SET: {shards:,} shards of {per:,} images\n{describe_plan(summary)}\n```")
    if kind == "modules":
        return Render(modules_table(root))
    if kind == "config-reference":
        return Render(config_reference())
    if kind == "cli-reference":
        if kind not in PROVIDED:
            raise DocsError(f"{page}:{line}: `cli-reference` is rendered by `bgsplit docs`, which provides the "
                            "CLI's parser: run it, not this module")
        return Render(PROVIDED[kind]())
    raise DocsError(f"{page}:{line}: unknown generated block kind {kind!r}: use verdicts, section, bench, "
                    "own-data-loop, plan, modules, config-reference or cli-reference")


OWN_DATA = "## Your own images, start to finish"


def readme_block(root: Path) -> list[str] | None:
    """The README's own-data section's first bash block as bench/own_data_loop.py runs it: a line a command (lines
    continued with a backslash joined), comment lines kept (one of them is the person reviewing)."""
    readme = root / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    if OWN_DATA not in text or "```bash\n" not in text.split(OWN_DATA, 1)[1]:
        return None
    body = text.split(OWN_DATA, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands, pending = [], ""
    for line in body.splitlines():
        pending += line[:-1] if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(pending)
            pending = ""
    return [c for c in commands if c.strip()]


def readme_own_data(root: Path) -> list[str] | None:
    """The block's commands, the review step (a person, not a command) left out."""
    block = readme_block(root)
    return None if block is None else [c for c in block if not c.lstrip().startswith("#")]


# ------------------------------------------------------------------------------------------------ references


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f"'{v}'" if v == "" or v.strip() != v else v
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return repr(v)


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass and of the dataclasses it extends (PEP 257 attribute
    docstrings: the string literal right after the annotated assignment)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        node = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0]
        body = getattr(node, "body", [])
        for stmt, after in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) \
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                    and isinstance(after.value.value, str):
                docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _class_doc(cls: type) -> str:
    node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    return inspect.cleandoc(ast.get_docstring(node) or "")


PACKAGES = ("data", "data/sources", "trainer", "cluster")


def modules_table(root: Path) -> str:
    """Each module of the packages, floor by floor, with the first line of its docstring."""
    rows = ["| module | what it is (its docstring's first paragraph) |", "| --- | --- |"]
    for package in PACKAGES:
        for path in sorted((root / package).glob("*.py")):
            if path.name == "__init__.py" and package != "data/sources":
                doc = ast.get_docstring(ast.parse(path.read_text())) or ""
                rows.append(f"| **`{package}/`** | {_cell(doc.split(chr(10) + chr(10))[0])} |")
                continue
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            rows.append(f"| `{package}/{path.name}` | {_cell(doc.split(chr(10) + chr(10))[0])} |")
    return "\n".join(rows)


def config_reference() -> str:
    """Every key of a training config, section by section, from trainer/config.py's JobConfig."""
    from data.settings import allowed, hints
    from trainer.config import JobConfig

    out = []
    for section in dataclasses.fields(JobConfig):
        cls = section.default_factory  # type: ignore[misc]
        out.append(f"### `{section.name}`")
        out.append("")
        about = _class_doc(cls)
        if about:
            out += [" ".join(about.split()), ""]
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        docs, types = _field_docs(cls), hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            meaning = docs.get(f.name, "")
            key = f"{section.name}.{f.name}"
            values = allowed(f, types[f.name])
            if values is not None:
                meaning += " " + _choices(values)
            kind = f.type if typing.get_origin(types[f.name]) is not typing.Literal else type(default).__name__
            out.append(f"| `{key}` | {_cell(kind)} | `{_cell(_value(default))}` | {_cell(meaning)} |")
        out.append("")
    return "\n".join(out).rstrip()


def _choices(allowed: Collection[Any]) -> str:
    """The values a config key accepts; a registry's (a mapping to entries with a ``help``) then say what each is."""
    text = f"One of: {', '.join(map(str, allowed))}."
    if isinstance(allowed, Mapping):
        text += " " + "; ".join(f"{name}: {entry.help}" for name, entry in allowed.items()) + "."
    return text


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return out


def _flag_row(a: argparse.Action) -> str:
    name = ", ".join(f"`{o}`" for o in a.option_strings) or f"`{a.metavar or a.dest}`" + (
        " ..." if a.nargs in ("*", "+") else "")
    help_text = a.help or ""
    if not a.option_strings and a.nargs in ("*", "?"):
        default = "none"
    elif a.required:
        default = "required"
    elif isinstance(a, argparse._StoreTrueAction):
        default = "off"
    elif "default" in help_text.lower():
        default = "(see meaning)"  # the help states its own default (some depend on the machine: --writers)
    elif a.default in (None, "", []):
        default = "none"
    else:
        default = f"`{_value(a.default)}`"
    if a.choices:
        base = help_text.rstrip()
        help_text = (base + ("." if base and not base.endswith(".") else "")
                     + f" One of: {', '.join(map(str, a.choices))}.").strip()
    return f"| {name} | {default} | {_cell(help_text)} |"


PROVIDED: dict[str, Callable[[], str]] = {}
"""Blocks whose render a caller provides: `bgsplit docs` (cluster/cli.py) gives its own reference, so this module,
which the CLI runs, never imports the CLI back."""


def cli_reference(root: argparse.ArgumentParser) -> str:
    """Every `bgsplit` command and its flags, from the CLI's parser (``root``)."""
    out: list[str] = []

    def walk(parser: argparse.ArgumentParser, prog: str, help_text: str) -> None:
        subs = _subcommands(parser)
        rows = [_flag_row(a) for a in _actions(parser)]
        if rows or not subs:
            out.extend([f"### `{prog}`", "", _cell(help_text), "", "| argument | default | meaning |",
                        "| --- | --- | --- |", *rows, ""])
        for name, sub_help, sub in subs:
            walk(sub, f"{prog} {name}", sub_help)

    for name, sub_help, sub in _subcommands(root):
        walk(sub, f"bgsplit {name}", sub_help)
    return "\n".join(out).rstrip()


# ------------------------------------------------------------------------------------------------ rewrite and check


def git_tracked(root: Path = ROOT) -> set[str]:
    try:
        done = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise DocsError(f"git ls-files failed in {root} ({e}): the check needs a git checkout") from None
    return set(done.stdout.decode().split("\0")) - {""}


def rewrite_text(root: Path, page: str, text: str) -> str:
    out, pos = [], 0
    for b in blocks(text, page):
        out += [text[pos:b.start], render(root, page, b.line, b.directive).text, "\n"]
        pos = b.end
    return "".join(out) + text[pos:]


def rewrite(root: Path = ROOT) -> list[str]:
    """Rewrite every generated block from its sources; the pages that changed."""
    changed = []
    for page in doc_files(root):
        path = root / page
        text = path.read_text()
        new = rewrite_text(root, page, text)
        if new != text:
            path.write_text(new)
            changed.append(page)
    return changed


def _first_difference(have: str, want: str) -> str:
    for i, (a, b) in enumerate(zip(have.splitlines(), want.splitlines())):
        if a != b:
            at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            lo = max(0, at - 30)
            return f"line {i + 1} of the block reads {a[lo:at + 30]!r} where the render has {b[lo:at + 30]!r}"
    return f"the block has {len(have.splitlines())} lines, the render {len(want.splitlines())}"


def _is_tracked(path: str, tracked: set[str]) -> bool:
    path = path.rstrip("/")
    return path in tracked or any(t.startswith(path + "/") for t in tracked)


def cited_results(page: str, text: str) -> list[tuple[int, str]]:
    """(line, repo-relative path) of every bench/results path the page cites, markers aside; a directory named as
    a command's --out is where the command writes, not a claim, and is not counted; nor is a study's built set
    (bench/results/STUDY/data/...: ignored by design, the study rebuilds it byte-identical)."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        if BEGIN.match(line):
            continue
        for m in CITED.finditer(line):
            cited = m.group(0).rstrip(".:")
            if re.search(r"--out[ =]$", line[:m.start()]) and not os.path.splitext(cited)[1]:
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), cited)) if cited.startswith("../") else cited
            if re.match(r"bench/results/[^/]+/data(/|$)", path):  # a study's built sets: inputs it rebuilds
                continue
            found.append((n, path))
    return found


def check_page(root: Path, page: str, text: str, tracked: set[str]) -> tuple[list[str], list[str]]:
    """Problems (one line each, with the fix) and pending notes of one page's text."""
    problems, pending = [], []
    try:
        found = blocks(text, page)
    except DocsError as e:
        return [str(e)], []
    for b in found:
        try:
            r = render(root, page, b.line, b.directive)
        except DocsError as e:
            problems.append(str(e))
            continue
        have = text[b.start:b.end].strip("\n")
        if have != r.text:
            problems.append(f"{page}:{b.line}: generated block `{b.directive}` differs from its render "
                            f"({_first_difference(have, r.text)}): {FIX}")
        for source in r.sources:
            if source not in tracked:
                problems.append(f"{page}:{b.line}: the block's source {source} is not committed: `git add {source}` "
                                "(bench/results/.gitignore admits results.md and results.json), then `bgsplit docs`")
        if r.pending:
            pending.append(f"{page}:{b.line}: `{b.directive}` is pending: its source does not exist yet; "
                           f"`{r.pending}`, commit the results, then `bgsplit docs`")
    for n, path in cited_results(page, text):
        if not _is_tracked(path, tracked):
            problems.append(f"{page}:{n}: cites {path}, which is not committed: commit the result or drop the "
                            "figures that rest on it")
    return problems, pending


def check(root: Path = ROOT, tracked: set[str] | None = None) -> tuple[list[str], list[str]]:
    tracked = git_tracked(root) if tracked is None else tracked
    problems, pending = [], []
    for page in doc_files(root):
        p, w = check_page(root, page, (root / page).read_text(), tracked)
        problems += p
        pending += w
    return problems, pending


def docs_command(root: Path, check_only: bool) -> int:
    if not check_only:
        for page in rewrite(root):
            print(f"rewrote {page}")
    problems, pending = check(root)
    for line in pending:
        print(f"pending: {line}")
    for line in problems:
        print(f"bgsplit docs: {line}", file=sys.stderr)
    if not problems:
        print(f"bgsplit docs: {len(doc_files(root))} pages, every generated block matches its committed source")
    return 1 if problems else 0

