"""Generated regions in the lesson READMEs: SQL diffs, code excerpts and real program output.

A lesson README is prose written by hand with a few regions that a program writes, so that what
the reader sees (the schema diff, a piece of code, the output of `python main.py`) cannot drift
from the code beside it. A region is delimited by two HTML comments, each alone on its line:

    <!-- begin generated: KIND ARGS... -->
    (generated Markdown, rewritten by `write`)
    <!-- end generated -->

GitHub does not render the comments, and the site (mkdocs) includes the README as it is, so the
same text serves both. Kinds:

`schema-diff` / `queries-diff`
    A unified diff of the lesson's `sql/schema.sql` / `sql/queries.sql` against the previous
    lesson's (the lesson directory with the next lower number). The first lesson, or a lesson
    whose predecessor lacks the file, shows the whole file instead. An optional argument names
    another lesson directory, relative to the Markdown file (`schema-diff ../lessons/02-...`).
    Attribute `context=N` sets the lines of context (default 3).

`code FILE#REGION` (or `code FILE` for the whole file)
    The lines of FILE (relative to the Markdown file) between `# region: REGION` and
    `# endregion` (`-- region: REGION` and `-- endregion` in SQL). Every marker line, including
    those of regions nested inside, is dropped, and the excerpt is dedented. Fenced with the
    language of the file's extension and a `title` naming the file, which GitHub ignores.
    In a Python file without such a region, REGION may name a function or class by its path
    from the top of the module (`worker.py#Worker.claim`, `main.py#main`), found with `ast`:
    its lines, decorators included. Only the full path: a bare method name could be any
    class's, and is often a region's name already (worker.py has a region `claim` and a
    method `Worker.claim`).

`code-diff FILE#REGION` (or `code-diff FILE` for the whole file)
    A unified diff of that same excerpt (a region, or a function or class) against the
    excerpt of the same name in the same file of the previous lesson (FILE's lesson directory
    with the next lower number): what changed in the Python since then. The header lines name
    both files with the excerpt (`--- 04-.../worker.py#Worker.context`), and the `@@` line
    numbers count lines of the excerpt, not of the file. An excerpt that the previous lesson
    does not have (nor the file) is new: the diff is the whole excerpt, every line `+`, from
    `/dev/null`. An unchanged excerpt gives one sentence saying so. Attribute `context=N` as
    for the SQL diffs.

`output [SCRIPT ARGS...]`
    What `python SCRIPT ARGS...` (default `python main.py`), run in SCRIPT's directory with a
    fresh database, printed on stdout and stderr combined, normalised (rules below). The marker
    records a hash of the sources the run depends on, `sources=<sha256, 12 hex digits>`: every
    file of the lesson directory except Markdown files, hidden files and `__pycache__/`, plus
    the shared bootstrap `hardway/postgres.py`, together with the command. `check` compares
    only that hash, because rerunning the concurrent demos is slow and their interleavings vary
    from run to run. Attributes:
    `exit=N` (expected exit status, default 0), `timeout=SECONDS` (default 300).

Every kind takes the attribute `fold`: the region is collapsed, showing one line that opens
it, by default what it holds and its length ("sql/schema.sql, diff against lesson 04 (62
lines)"), or the text given as `fold="..."`. It is an HTML `<details>` block with blank lines
around the Markdown inside: GitHub renders that Markdown, and so does the site, with the
`md_in_html` extension and the block's `markdown` attribute. A region of one sentence
("unchanged since ...") is not folded: hiding one line behind another would hide nothing.

Commands (from the repository root, with the virtual environment's Python):

    python -m hardway.docgen write [--lesson NAME]... [--rerun-output | --skip-output]
    python -m hardway.docgen check

`write` rewrites every region of the root README, every page of every lesson (its README and
any other Markdown file in the lesson directory) and every page under `docs/`. It reruns a
program only when the recorded hash no longer matches its sources (or always, with
`--rerun-output`). `check` recomputes the diffs and excerpts and compares them exactly, compares
the output hashes (and how each recorded output is folded), and exits 1 with a list of stale
regions.

The program runs with the environment as it is, so it uses `DATABASE_URL` when that is set and
the embedded server otherwise. `PYTHONUNBUFFERED=1` keeps stdout and stderr in the order a
terminal shows them; `NO_COLOR=1` and `TERM=dumb` ask for no colours.

Normalisation of program output, in this order, so that reruns on other machines differ only
where the program's behaviour differs:

1. ANSI escape sequences are removed, `\\r\\n` becomes `\\n`, trailing whitespace is stripped
   from every line and blank lines at the start and end are dropped.
2. The absolute path of the repository root becomes `/path/to/repo`, and `lib/python3.N/` in a
   path becomes `lib/python3.X/`.
3. UUIDs (`8-4-4-4-12` hex digits) become `<uuid-1>`, `<uuid-2>`, ... numbered in order of first
   appearance; the same UUID always gets the same number.
4. Date-times (`2025-01-31T12:34:56.789+00:00`, `2025-01-31 12:34:56,789`, with or without
   fraction and zone) become `<timestamp>`; times of day (`12:34:56`, `12:34:56.789`) `<time>`.
5. Durations written with a decimal point and a unit (`0.123s`, `12.3 ms`, `1.5 sec`,
   `2.0 seconds`, `250.0µs`) become `<duration>`. Whole numbers (`30 s`, `500 ms`) are kept:
   they are usually settings, not measurements.
6. Rates (`1234 tasks/s`, `56.7/s`, `8.1k jobs/sec`) become `<rate> tasks/s`, `<rate>/s`, ...
7. Process ids after `pid` (`pid 4242`, `pid=4242`, `PID: 4242`) become `<pid-1>`, ...
8. Hexadecimal ids: `0x7f3a9c` becomes `0x<hex-1>`; a bare word of 8 or more hex digits with at
   least one digit and one letter (`9f86d081884c`) becomes `<hex-1>`, numbered like UUIDs.

Why not cog (cogapp), the well-kept tool for generated regions? It would replace the parsing and
replacing of regions here (Spec, Region, parse_regions, replace_regions and the loops of write:
about 150 lines), not the rest, which is what its generators would call: the diffs, excerpts,
runs, normalisation and hashes. In exchange, every marker would hold Python (`<!-- [[[cog import
hardway.docgen as g; g.schema_diff()]]] -->` ... `<!-- [[[end]]] -->`) for authors to write and
readers of the raw Markdown to skip; cog finds its markers anywhere, fenced code included, so the
page that shows the syntax would be processed too; and `cog --check` reruns every generator, so
the slow demos, whose interleavings vary, would need their sources hash kept in their output and
generators that return `cog.previous` when it matches. One more dependency and noisier READMEs
to save 150 plain lines: the project keeps its own.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import html
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LESSON_GLOB = "lessons/[0-9][0-9]-*/"
DEFAULT_TIMEOUT = 300.0
REGENERATE_HINT = "run `make docs-generate`"

BEGIN_RE = re.compile(r"^(?P<indent>[ \t]*)<!-- begin generated: (?P<spec>.*?) -->[ \t]*$")
END_RE = re.compile(r"^[ \t]*<!-- end generated -->[ \t]*$")
FENCE_RE = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})")
# Attributes that may stand alone, without `=value`: `fold` means "fold, with the usual summary".
FLAGS = ("fold",)


class DocgenError(Exception):
    """A README, a marker or a source file is malformed, or a program failed."""


# --- lessons ---------------------------------------------------------------------------------


def discover_lessons(root: Path) -> list[Path]:
    """Every lesson directory (`lessons/NN-name/`), in order."""
    return sorted(path for path in Path(root).glob(LESSON_GLOB) if path.is_dir())


def is_lesson_dir(path: Path) -> bool:
    return path.parent.name == "lessons" and re.fullmatch(r"\d\d-.+", path.name) is not None


def previous_lesson(lesson: Path) -> Path | None:
    """The lesson directory just before `lesson`, or None for the first one."""
    lesson = lesson.resolve()
    earlier = [path.resolve() for path in discover_lessons(lesson.parents[1])]
    earlier = [path for path in earlier if path.name < lesson.name]
    return earlier[-1] if earlier else None


def enclosing_lesson(path: Path) -> Path | None:
    """The lesson directory that contains `path` (or is `path`), if any."""
    for candidate in [path, *path.parents]:
        if is_lesson_dir(candidate):
            return candidate
    return None


def lesson_pages(lesson: Path) -> list[Path]:
    """The Markdown pages of a lesson: its README, then the pages beside it, by file name.

    A lesson too long for one page goes on in more pages in its directory
    (`lessons/04-.../stopping-surviving-scheduling.md`): plain linked files on GitHub, pages
    listed under the lesson on the site (docs/hooks/lessons.py).
    """
    readme = lesson / "README.md"
    others = sorted(path for path in lesson.glob("*.md") if path != readme and path.is_file())
    return [readme, *others] if readme.is_file() else others


# --- parsing regions -------------------------------------------------------------------------


@dataclass
class Spec:
    """What a begin marker asks for: `code main.py#claim`, `output sources=abc123`, ..."""

    kind: str
    args: list[str] = field(default_factory=list)
    attrs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Spec:
        try:
            tokens = shlex.split(text)
        except ValueError as err:
            raise DocgenError(f"cannot parse region spec {text!r}: {err}") from None
        if not tokens:
            raise DocgenError("empty region spec")
        spec = cls(tokens[0])
        for token in tokens[1:]:
            key, sep, value = token.partition("=")
            if (sep and re.fullmatch(r"[a-z][a-z0-9_-]*", key)) or token in FLAGS:
                spec.attrs[key] = value
            else:
                spec.args.append(token)
        return spec

    def render(self) -> str:
        attrs = [
            key if key in FLAGS and not value else f"{key}={shlex.quote(value)}"
            for key, value in self.attrs.items()
        ]
        return " ".join([shlex.join([self.kind, *self.args]), *attrs])


@dataclass
class Region:
    """One generated region of a Markdown file. Line numbers are 0-based indices."""

    begin: int  # index of the begin marker line
    end: int  # index of the end marker line
    indent: str
    spec_text: str
    body: str  # the lines strictly between the markers, joined with "\n"

    @property
    def spec(self) -> Spec:
        return Spec.parse(self.spec_text)


def parse_regions(text: str, name: str = "<text>") -> list[Region]:
    """Find the generated regions of a Markdown text.

    Markers inside fenced code blocks outside any region are ignored (that is how a page can
    show the syntax), and inside a region an end marker counts only outside fences (so a
    generated excerpt may itself contain marker lines).
    """
    lines = text.split("\n")
    regions: list[Region] = []
    fence: str | None = None
    current: tuple[int, str, str] | None = None
    for index, line in enumerate(lines):
        fence_match = FENCE_RE.match(line)
        if fence is not None:
            if fence_match and _closes(fence, fence_match["fence"], line):
                fence = None
            continue
        if fence_match:
            fence = fence_match["fence"]
            continue
        begin = BEGIN_RE.match(line)
        if begin:
            if current is not None:
                raise DocgenError(
                    f"{name}:{index + 1}: begin marker inside the region opened at line "
                    f"{current[0] + 1} (regions do not nest)"
                )
            current = (index, begin["indent"], begin["spec"].strip())
        elif END_RE.match(line):
            if current is None:
                raise DocgenError(f"{name}:{index + 1}: end marker without a begin marker")
            start, indent, spec_text = current
            body = "\n".join(lines[start + 1 : index])
            regions.append(Region(start, index, indent, spec_text, body))
            current = None
    if current is not None:
        raise DocgenError(f"{name}:{current[0] + 1}: region has no end marker")
    for region in regions:
        try:
            region.spec  # noqa: B018 - parse now, so errors name the file and line
        except DocgenError as err:
            raise DocgenError(f"{name}:{region.begin + 1}: {err}") from None
    return regions


def _closes(opening: str, candidate: str, line: str) -> bool:
    return (
        candidate[0] == opening[0]
        and len(candidate) >= len(opening)
        and line.strip() == candidate.strip()
    )


def replace_regions(text: str, regions: list[Region], bodies: list[str]) -> str:
    """`text` with each region's body (and begin marker spec) replaced."""
    lines = text.split("\n")
    for region, body in sorted(zip(regions, bodies, strict=True), key=lambda rb: -rb[0].begin):
        begin_line = f"{region.indent}<!-- begin generated: {region.spec_text} -->"
        lines[region.begin : region.end] = [begin_line, *body.split("\n")] if body else [begin_line]
    return "\n".join(lines)


# --- rendering -------------------------------------------------------------------------------

LANGUAGES = {
    ".py": "python",
    ".sql": "sql",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".toml": "toml",
    ".json": "json",
    ".sh": "bash",
    ".md": "markdown",
    ".txt": "text",
    ".cfg": "ini",
    ".ini": "ini",
}


def language_for(path: str | Path) -> str:
    path = Path(path)
    if path.name == "Makefile":
        return "make"
    if path.name == "Dockerfile":
        return "docker"
    return LANGUAGES.get(path.suffix.lower(), "text")


def fenced(content: str, language: str, title: str | None = None, options: str = "") -> str:
    """A fenced code block for `content`, long enough that no backtick run inside closes it.

    `title` and `options` (such as `linenums="1"`) are for the site; GitHub reads only the
    language.
    """
    longest = max((len(run) for run in re.findall(r"`+", content)), default=0)
    fence = "`" * max(3, longest + 1)
    info = language + (f' title="{title}"' if title else "") + (f" {options}" if options else "")
    return f"{fence}{info}\n{content.rstrip(chr(10))}\n{fence}"


def wrap_body(markdown: str, indent: str) -> str:
    """A region body: the Markdown between blank lines, each line indented like the marker."""
    lines = ["", *markdown.split("\n"), ""]
    return "\n".join(indent + line if line else "" for line in lines)


def unwrap_body(body: str, indent: str) -> str:
    """The Markdown of a region body that wrap_body wrote, without the fold around it, if any."""
    markdown = "\n".join(line.removeprefix(indent) for line in body.split("\n")).strip("\n")
    if markdown.startswith("<details"):
        # <details markdown>, <summary>...</summary>, blank, the Markdown, blank, </details>
        markdown = "\n".join(markdown.split("\n")[3:-2])
    return markdown


@dataclass
class Block:
    """The Markdown of one region, and what it holds, in a few words (for `fold`)."""

    markdown: str
    # "sql/schema.sql, diff against lesson 04": a folded region shows it with its length.
    # None when the Markdown is one sentence, which is never folded.
    label: str | None


def folded(block: Block, summary: str | None = None) -> str:
    """The block's Markdown collapsed under one line: `summary`, or its label and length."""
    if summary is None:
        length = block.markdown.count("\n") - 1  # the lines between the fences
        summary = f"{block.label} ({length} line{'s' if length != 1 else ''})"
    heading = f"<summary>{html.escape(summary, quote=False)}</summary>"
    # The blank lines make GitHub render the Markdown inside; `markdown` makes the site do it.
    return "\n".join(["<details markdown>", heading, "", block.markdown, "", "</details>"])


def lesson_number(lesson: Path) -> str:
    return lesson.name.split("-", 1)[0]


# --- schema-diff / queries-diff --------------------------------------------------------------


def sql_diff(lesson: Path, relpath: str, context: int = 3) -> Block:
    """Markdown showing how `lesson/relpath` differs from the previous lesson's file."""
    current_file = lesson / relpath
    if not current_file.is_file():
        raise DocgenError(f"{current_file} does not exist")
    current = current_file.read_text()
    previous = previous_lesson(lesson)
    if previous is None or not (previous / relpath).is_file():
        return Block(fenced(current, language_for(relpath), title=relpath), relpath)
    before = (previous / relpath).read_text()
    if before == current:
        return Block(f"`{relpath}` is unchanged since lesson {previous.name}.", None)
    diff = difflib.unified_diff(
        before.splitlines(),
        current.splitlines(),
        fromfile=f"{previous.name}/{relpath}",
        tofile=f"{lesson.name}/{relpath}",
        n=context,
        lineterm="",
    )
    label = f"{relpath}, diff against lesson {lesson_number(previous)}"
    return Block(fenced("\n".join(diff), "diff", title=relpath), label)


# --- code ------------------------------------------------------------------------------------

REGION_MARKER_RE = re.compile(r"^\s*(?:#|--)\s*(?:region:\s*(?P<name>\S+)|(?P<end>endregion))\b")


class MissingExcerpt(DocgenError):
    """A file has no region (nor, in Python, function or class) of the name asked for."""


def extract_code(path: Path, region: str | None) -> str:
    """The lines of `path` in region `region` (all of it if None), markers dropped, dedented.

    In a Python file without that region, `region` may name a function or class instead.
    """
    if not path.is_file():
        raise DocgenError(f"{path} does not exist")
    text = path.read_text()
    stack: list[str] = []
    seen: set[str] = set()
    picked: list[str] = []
    state, depth = "before", 0  # before -> inside -> after the wanted region
    for number, line in enumerate(text.splitlines(), start=1):
        marker = REGION_MARKER_RE.match(line)
        if marker and marker["name"]:
            name = marker["name"]
            if name in seen:
                raise DocgenError(f"{path}:{number}: region {name!r} is defined twice")
            seen.add(name)
            stack.append(name)
            if name == region:
                state, depth = "inside", len(stack)
        elif marker:
            if not stack:
                raise DocgenError(f"{path}:{number}: endregion without a region")
            if state == "inside" and len(stack) == depth:
                state = "after"
            stack.pop()
        elif region is None or state == "inside":
            picked.append(line)
    if stack:
        raise DocgenError(f"{path}: region {stack[-1]!r} has no endregion")
    if region is not None and state == "before":
        span = definition_span(path, text, region) if path.suffix == ".py" else None
        if span is None:
            hint = ", nor a function or class of that name" if path.suffix == ".py" else ""
            raise MissingExcerpt(
                f"{path}: no region {region!r} (mark it with `# region: {region}`){hint}"
            )
        first, last = span
        lines = text.splitlines()[first - 1 : last]
        picked = [line for line in lines if not REGION_MARKER_RE.match(line)]
    result = textwrap.dedent("\n".join(picked)).strip("\n")
    if not result:
        raise DocgenError(f"{path}: region {region!r} is empty")
    return result


DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def definition_span(path: Path, text: str, qualname: str) -> tuple[int, int] | None:
    """The first and last line (from 1) of function or class `qualname` (`Worker.claim`) in
    the Python `text`, decorators included, or None. If a name is defined twice, the first."""
    try:
        body = ast.parse(text, str(path)).body
    except SyntaxError as err:
        raise DocgenError(f"{path}: cannot parse: {err}") from None
    found: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | None = None
    for name in qualname.split("."):
        found = next(
            (node for node in body if isinstance(node, DEFINITIONS) and node.name == name), None
        )
        if found is None:
            return None
        body = found.body
    assert found is not None
    first = min([found.lineno, *(decorator.lineno for decorator in found.decorator_list)])
    return first, found.end_lineno or found.lineno


def code_title(base: Path, file_part: str, root: Path | None) -> str:
    """FILE relative to `base` when it is inside it (`main.py`), otherwise relative to the
    repository `root` (`lessons/01-prerequisites/main.py`)."""
    resolved = (base / file_part).resolve()
    if root is not None and not resolved.is_relative_to(base.resolve()):
        if resolved.is_relative_to(root.resolve()):
            return resolved.relative_to(root.resolve()).as_posix()
    return file_part


def code_region(base: Path, target: str, root: Path | None = None) -> Block:
    """Markdown for `code FILE#REGION`, FILE relative to `base`."""
    file_part, _, region = target.partition("#")
    content = extract_code(base / file_part, region or None)
    title = code_title(base, file_part, root)
    label = f"{title}#{region}" if region else title
    return Block(fenced(content, language_for(file_part), title=title), label)


def code_diff(base: Path, target: str, context: int = 3, root: Path | None = None) -> Block:
    """Markdown for `code-diff FILE#REGION`: the excerpt against the previous lesson's."""
    file_part, _, region = target.partition("#")
    path = (base / file_part).resolve()
    lesson = enclosing_lesson(path)
    if lesson is None:
        raise DocgenError(f"code-diff: {path} is not in a lesson directory")
    current = extract_code(path, region or None)
    relpath = path.relative_to(lesson).as_posix()
    excerpt = f"{relpath}#{region}" if region else relpath
    previous = previous_lesson(lesson)
    before = None
    if previous is not None and (previous / relpath).is_file():
        try:
            before = extract_code(previous / relpath, region or None)
        except MissingExcerpt:
            pass  # new in this lesson
    if previous is None or before is None:
        since = f" since lesson {lesson_number(previous)}" if previous else ""
        old_lines, fromfile, label = [], "/dev/null", f"{excerpt}, new{since}"
    elif before == current:
        return Block(f"`{excerpt}` is unchanged since lesson {previous.name}.", None)
    else:
        old_lines, fromfile = before.splitlines(), f"{previous.name}/{excerpt}"
        label = f"{excerpt}, diff against lesson {lesson_number(previous)}"
    diff = difflib.unified_diff(
        old_lines,
        current.splitlines(),
        fromfile=fromfile,
        tofile=f"{lesson.name}/{excerpt}",
        n=context,
        lineterm="",
    )
    markdown = fenced("\n".join(diff), "diff", title=code_title(base, file_part, root))
    return Block(markdown, label)


# --- output ----------------------------------------------------------------------------------

ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
UUID_RE = re.compile(r"\b[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}\b")
DATETIME_RE = re.compile(
    r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}(?::?\d{2})?)?(?![\d:])"
)
TIME_RE = re.compile(r"(?<![\d:])\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?![\d:])")
DURATION_RE = re.compile(
    r"(?<![\w.])\d+\.\d+ ?(?:seconds|second|secs|sec|ms|µs|us|ns|s|min|m|h)(?![\w/])"
)
RATE_RE = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?[kKM]?(?P<unit> ?[a-zA-Z]*/(?:s|sec)\b)")
PID_RE = re.compile(r"(?P<label>\bpid\b\s*[:=]?\s*)(?P<pid>\d+)\b", re.IGNORECASE)
HEX_PREFIXED_RE = re.compile(r"\b0x(?P<hex>[0-9a-fA-F]+)\b")
HEX_WORD_RE = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b")
PYTHON_VERSION_DIR_RE = re.compile(r"lib/python3\.\d+/")


class _Numbering:
    """Stable placeholders: the same original value always maps to the same `<kind-N>`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.seen: dict[str, str] = {}

    def __call__(self, value: str) -> str:
        if value not in self.seen:
            self.seen[value] = f"<{self.kind}-{len(self.seen) + 1}>"
        return self.seen[value]


def normalise_output(text: str, root: Path | None = None) -> str:
    """Replace what varies from run to run by placeholders (the rules in the module docstring)."""
    text = ANSI_RE.sub("", text).replace("\r\n", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines).strip("\n")

    if root is not None:
        for variant in sorted({str(root), str(Path(root).resolve())}, key=len, reverse=True):
            text = text.replace(variant, "/path/to/repo")
    text = PYTHON_VERSION_DIR_RE.sub("lib/python3.X/", text)

    uuids = _Numbering("uuid")
    text = UUID_RE.sub(lambda m: uuids(m[0].lower()), text)
    text = DATETIME_RE.sub("<timestamp>", text)
    text = TIME_RE.sub("<time>", text)
    text = DURATION_RE.sub("<duration>", text)
    text = RATE_RE.sub(lambda m: "<rate>" + m["unit"], text)
    pids = _Numbering("pid")
    text = PID_RE.sub(lambda m: m["label"] + pids(m["pid"]), text)
    hexes = _Numbering("hex")
    text = HEX_PREFIXED_RE.sub(lambda m: "0x" + hexes(m["hex"].lower()), text)
    text = HEX_WORD_RE.sub(lambda m: hexes(m[0]), text)
    return text


def _hashed_files(lesson: Path) -> Iterable[Path]:
    for path in sorted(lesson.rglob("*")):
        relative = path.relative_to(lesson)
        if not path.is_file() or path.suffix == ".md" or path.suffix == ".pyc":
            continue
        if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        yield path


SHARED_BOOTSTRAP = Path(__file__).with_name("postgres.py")


def sources_hash(source_dir: Path, command: list[str]) -> str:
    """12 hex digits of sha256 over the command and every file a run depends on."""
    digest = hashlib.sha256()
    digest.update(("command\0" + shlex.join(command) + "\0").encode())
    for path in _hashed_files(source_dir):
        digest.update(path.relative_to(source_dir).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    # Every lesson imports the shared bootstrap, and prints what it describes.
    digest.update(b"hardway/postgres.py\0" + SHARED_BOOTSTRAP.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@dataclass
class OutputRun:
    script: Path
    args: list[str]
    source_dir: Path
    exit_status: int
    timeout: float

    @classmethod
    def from_spec(cls, base: Path, spec: Spec) -> OutputRun:
        script_arg, *args = spec.args or ["main.py"]
        script = (base / script_arg).resolve()
        if not script.is_file():
            raise DocgenError(f"output: no program {script}")
        lesson = enclosing_lesson(script)
        try:
            exit_status = int(spec.attrs.get("exit", "0"))
            timeout = float(spec.attrs.get("timeout", DEFAULT_TIMEOUT))
        except ValueError as err:
            raise DocgenError(f"output: bad attribute: {err}") from None
        return cls(script, args, lesson or script.parent, exit_status, timeout)

    @property
    def command(self) -> list[str]:
        """The command as a reader types it in the script's directory."""
        return ["python", self.script.name, *self.args]

    def sources_hash(self) -> str:
        return sources_hash(self.source_dir, self.command)

    def run(self) -> str:
        """Run the program and return its raw combined output; raise if it fails."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", NO_COLOR="1", TERM="dumb")
        where = self.script.parent
        print(f"running `{shlex.join(self.command)}` in {where} ...", file=sys.stderr, flush=True)
        process = subprocess.Popen(
            [sys.executable, self.script.name, *self.args],
            cwd=where,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Its own process group, so a timeout also ends the workers main.py started.
            start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            raise DocgenError(
                f"`{shlex.join(self.command)}` in {where} did not finish within "
                f"{self.timeout:g} s; its last output:\n{_tail(output)}"
            ) from None
        if process.returncode != self.exit_status:
            raise DocgenError(
                f"`{shlex.join(self.command)}` in {where} exited with status "
                f"{process.returncode} (expected {self.exit_status}); its last output:\n"
                f"{_tail(output)}"
            )
        return output


def _tail(output: str, lines: int = 40) -> str:
    return textwrap.indent("\n".join(output.rstrip().splitlines()[-lines:]), "    ")


# --- processing files ------------------------------------------------------------------------


@dataclass
class Stale:
    path: Path
    line: int  # 1-based
    spec_text: str
    reason: str

    def describe(self, root: Path) -> str:
        try:
            shown = self.path.relative_to(root)
        except ValueError:
            shown = self.path
        return f"{shown}:{self.line}: {self.spec_text}: {self.reason}"


OUTPUT_POLICIES = ("stale", "always", "never")


def render(path: Path, root: Path, region: Region, output_policy: str) -> tuple[str, Block]:
    """(new spec text, generated Markdown) for one region, before any fold."""
    spec = region.spec
    base = path.parent
    if spec.kind in ("schema-diff", "queries-diff"):
        lesson = (base / spec.args[0]).resolve() if spec.args else base.resolve()
        if not is_lesson_dir(lesson):
            raise DocgenError(f"{spec.kind}: {lesson} is not a lesson directory")
        relpath = "sql/schema.sql" if spec.kind == "schema-diff" else "sql/queries.sql"
        return region.spec_text, sql_diff(lesson, relpath, _context(spec))
    if spec.kind in ("code", "code-diff"):
        if len(spec.args) != 1:
            raise DocgenError(f"{spec.kind} takes exactly one FILE#REGION argument")
        if spec.kind == "code":
            return region.spec_text, code_region(base, spec.args[0], root)
        return region.spec_text, code_diff(base, spec.args[0], _context(spec), root)
    if spec.kind == "output":
        run = OutputRun.from_spec(base, spec)
        label = f"Output of {shlex.join(run.command)}"
        digest = run.sources_hash()
        up_to_date = spec.attrs.get("sources") == digest and region.body.strip()
        if output_policy == "never" or (output_policy == "stale" and up_to_date):
            # The output recorded last time; unwrapped, so that a fold added since applies.
            return region.spec_text, Block(unwrap_body(region.body, region.indent), label)
        output = normalise_output(run.run(), root)
        spec.attrs["sources"] = digest
        return spec.render(), Block(fenced(output, "text"), label)
    kinds = "schema-diff, queries-diff, code, code-diff, output"
    raise DocgenError(f"unknown region kind {spec.kind!r} (one of: {kinds})")


def _context(spec: Spec) -> int:
    try:
        return int(spec.attrs.get("context", "3"))
    except ValueError:
        raise DocgenError(f"{spec.kind}: context must be a number") from None


def generate(path: Path, root: Path, region: Region, output_policy: str) -> tuple[str, str]:
    """(new spec text, new body) for one region."""
    spec_text, block = render(path, root, region, output_policy)
    if not block.markdown:  # an output never recorded, and not run now
        return spec_text, region.body
    fold = region.spec.attrs.get("fold")
    if fold is None or block.label is None:
        return spec_text, wrap_body(block.markdown, region.indent)
    return spec_text, wrap_body(folded(block, fold or None), region.indent)


def process_file(path: Path, root: Path, output_policy: str = "stale") -> str:
    """The text of Markdown file `path` with every region regenerated."""
    text = path.read_text()
    regions = parse_regions(text, str(path))
    specs, bodies = [], []
    for region in regions:
        try:
            spec_text, body = generate(path, root, region, output_policy)
        except DocgenError as err:
            raise DocgenError(f"{path}:{region.begin + 1}: {err}") from None
        specs.append(spec_text)
        bodies.append(body)
    for region, spec_text in zip(regions, specs, strict=True):
        region.spec_text = spec_text
    return replace_regions(text, regions, bodies)


def check_file(path: Path, root: Path) -> list[Stale]:
    """The regions of `path` that `write` would change (outputs: by their sources hash)."""
    text = path.read_text()
    stale: list[Stale] = []
    for region in parse_regions(text, str(path)):
        spec = region.spec
        try:
            reason = None
            if spec.kind == "output":
                run = OutputRun.from_spec(path.parent, spec)
                recorded = spec.attrs.get("sources")
                if not recorded or not region.body.strip():
                    reason = "never generated"
                elif recorded != run.sources_hash():
                    reason = "sources changed since the output was recorded"
            if reason is None:
                # An output is not rerun: this compares the recorded one, and how it is folded.
                _, body = generate(path, root, region, "never")
                if body == region.body:
                    continue
                reason = "differs from what the sources generate"
        except DocgenError as err:
            reason = f"error: {err}"
        stale.append(Stale(path, region.begin + 1, region.spec_text, reason))
    return stale


def markdown_files(root: Path, lessons: list[str] | None = None) -> list[Path]:
    """The Markdown files that may hold regions: root README, lesson pages, docs pages."""
    if lessons:
        found = []
        for name in lessons:
            readme = root / "lessons" / name / "README.md"
            if not readme.is_file():
                raise DocgenError(f"no lesson README {readme}")
            found += lesson_pages(readme.parent)
        return found
    candidates = [root / "README.md"]
    candidates += [page for lesson in discover_lessons(root) for page in lesson_pages(lesson)]
    docs = root / "docs"
    candidates += sorted(p for p in docs.rglob("*.md") if "hooks" not in p.relative_to(docs).parts)
    return [path for path in candidates if path.is_file()]


def write(
    root: Path,
    lessons: list[str] | None = None,
    output_policy: str = "stale",
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Regenerate every region; return the files whose text changed."""
    changed = []
    for path in markdown_files(root, lessons):
        before = path.read_text()
        after = process_file(path, root, output_policy)
        if after != before:
            path.write_text(after)
            changed.append(path)
            log(f"updated {path.relative_to(root)}")
    return changed


def check(root: Path) -> list[Stale]:
    stale: list[Stale] = []
    for path in markdown_files(root):
        try:
            stale += check_file(path, root)
        except DocgenError as err:
            stale.append(Stale(path, 0, "-", str(err)))
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hardway.docgen",
        description="Regenerate or check the generated regions of the READMEs and docs pages.",
    )
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root")
    commands = parser.add_subparsers(dest="command", required=True)
    write_parser = commands.add_parser("write", help="rewrite every generated region")
    write_parser.add_argument(
        "--lesson", action="append", metavar="NAME", help="only this lesson (repeatable)"
    )
    runs = write_parser.add_mutually_exclusive_group()
    runs.add_argument(
        "--rerun-output", action="store_true", help="rerun every program, even if unchanged"
    )
    runs.add_argument("--skip-output", action="store_true", help="run no program")
    commands.add_parser("check", help="fail if any generated region is stale")
    options = parser.parse_args(argv)
    root = options.root.resolve()

    try:
        if options.command == "write":
            policy = (
                "always" if options.rerun_output else "never" if options.skip_output else "stale"
            )
            changed = write(root, options.lesson, policy)
            print(f"{len(changed)} file(s) updated")
            return 0
        stale = check(root)
    except DocgenError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if stale:
        print("stale generated regions:", file=sys.stderr)
        for item in stale:
            print(f"  {item.describe(root)}", file=sys.stderr)
        print(REGENERATE_HINT, file=sys.stderr)
        return 1
    print("generated regions are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
