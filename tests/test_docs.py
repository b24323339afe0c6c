"""The documentation: generated README regions (hardway.docgen), the site build, its rendering.

Fast tests use a small fake repository in a temporary directory; the others build the real site
with mkdocs, and the last opens the built pages in headless Chromium with no network, as a reader
offline would (skipped without /usr/bin/chromium or npm).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import html
import http.server
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hardway import docgen
from harness import REPO_ROOT
from mkdocs.exceptions import PluginError

MKDOCS = Path(sys.executable).parent / "mkdocs"
CHROMIUM = Path("/usr/bin/chromium")

# --- a fake repository -----------------------------------------------------------------------

SCHEMA_01 = "CREATE TABLE notes (\n    id bigint PRIMARY KEY,\n    body text NOT NULL\n);\n"
SCHEMA_02 = (
    "CREATE TABLE notes (\n    id bigint PRIMARY KEY,\n    body text NOT NULL\n);\n\n"
    "CREATE TABLE tasks (\n    id bigint PRIMARY KEY\n);\n"
)
QUERIES = "-- name: CreateNote :one\n-- region: create\nINSERT INTO notes DEFAULT VALUES;\n"
QUERIES += "-- endregion\n"
MAIN_PY = """\
import uuid


def main():
    # region: demo
    print("task", uuid.uuid4(), "claimed by pid 4242")
    print("took 0.123s")
    # endregion


main()
"""
WORKER_01 = """\
class Worker:
    def claim(self):
        # region: pick
        task = self.queue.pop()
        # endregion
        return task
"""
WORKER_02 = """\
import functools


class Worker:
    def claim(self):
        # region: pick
        task = self.queue.pop(0)
        # endregion
        self.claimed += 1
        return task

    @functools.cache
    def release(self, task):
        self.queue.append(task)
"""
README = """\
# Lesson {n}

Some prose, then the schema:

<!-- begin generated: schema-diff fold -->
<!-- end generated -->

<!-- begin generated: queries-diff fold -->
<!-- end generated -->

<!-- begin generated: code main.py#demo -->
<!-- end generated -->

<!-- begin generated: code-diff worker.py#Worker.claim -->
<!-- end generated -->

## Run

<!-- begin generated: output -->
<!-- end generated -->

Read [main.py](main.py), [the schema](sql/schema.sql), [the Makefile](../../Makefile) and
[lesson 01](../01-first/README.md#run). Next: [lesson 03](../03-third/README.md)
"""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def fake_repo(tmp_path: Path) -> Path:
    """Two lessons, each with a README holding one region of every kind."""
    for n, name, schema, worker in (
        ("01", "01-first", SCHEMA_01, WORKER_01),
        ("02", "02-second", SCHEMA_02, WORKER_02),
    ):
        lesson = tmp_path / "lessons" / name
        _write(lesson / "README.md", README.format(n=n))
        _write(lesson / "main.py", MAIN_PY)
        _write(lesson / "worker.py", worker)
        _write(lesson / "sql" / "schema.sql", schema)
        _write(lesson / "sql" / "queries.sql", QUERIES)
    _write(tmp_path / "README.md", "# Fake\n\n[First lesson](lessons/01-first/README.md)\n")
    _write(tmp_path / "Makefile", "all:\n")
    return tmp_path


def _quiet(_: str) -> None:
    pass


# --- parsing regions -------------------------------------------------------------------------


def test_parse_regions_reads_markers_and_ignores_examples_in_fences():
    text = "\n".join(
        [
            "# Title",
            "```markdown",
            "<!-- begin generated: output -->",
            "<!-- end generated -->",
            "```",
            "  <!-- begin generated: code main.py#claim -->",
            "  old body",
            "  ```text",
            "  <!-- end generated -->",
            "  ```",
            "  <!-- end generated -->",
            "after",
        ]
    )
    [region] = docgen.parse_regions(text)
    assert (region.begin, region.end, region.indent) == (5, 10, "  ")
    assert region.spec.kind == "code" and region.spec.args == ["main.py#claim"]
    assert "old body" in region.body and region.body.count("end generated") == 1

    replaced = docgen.replace_regions(text, [region], ["  new"])
    assert replaced.split("\n")[5:8] == [
        "  <!-- begin generated: code main.py#claim -->",
        "  new",
        "  <!-- end generated -->",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<!-- begin generated: output -->\ntext", "has no end marker"),
        ("text\n<!-- end generated -->", "end marker without a begin marker"),
        (
            "<!-- begin generated: output -->\n<!-- begin generated: output -->\n"
            "<!-- end generated -->",
            "regions do not nest",
        ),
        ("<!-- begin generated: code 'main.py -->\n<!-- end generated -->", "cannot parse"),
    ],
)
def test_parse_regions_rejects_malformed_markers(text, message):
    with pytest.raises(docgen.DocgenError, match=message):
        docgen.parse_regions(text, "README.md")


def test_spec_keeps_arguments_and_attributes():
    spec = docgen.Spec.parse("output demo.py --fast 'two words' sources=abc123 exit=1")
    assert spec.kind == "output"
    assert spec.args == ["demo.py", "--fast", "two words"]
    assert spec.attrs == {"sources": "abc123", "exit": "1"}
    assert docgen.Spec.parse(spec.render()) == spec


def test_fold_stands_alone_or_takes_a_quoted_summary():
    spec = docgen.Spec.parse("schema-diff fold context=5")
    assert (spec.args, spec.attrs) == ([], {"fold": "", "context": "5"})
    assert spec.render() == "schema-diff fold context=5"
    spec = docgen.Spec.parse('code-diff worker.py#claim fold="What the claim became"')
    assert spec.args == ["worker.py#claim"]
    assert spec.attrs == {"fold": "What the claim became"}
    assert spec.render().endswith(" fold='What the claim became'")
    assert docgen.Spec.parse(spec.render()) == spec


# --- diffs and code --------------------------------------------------------------------------


def test_schema_diff_against_the_previous_lesson(fake_repo):
    diff = docgen.sql_diff(fake_repo / "lessons" / "02-second", "sql/schema.sql")
    assert diff.label == "sql/schema.sql, diff against lesson 01"
    lines = diff.markdown.splitlines()
    assert lines[0] == '```diff title="sql/schema.sql"'
    assert lines[1:3] == ["--- 01-first/sql/schema.sql", "+++ 02-second/sql/schema.sql"]
    assert "+CREATE TABLE tasks (" in lines
    assert " CREATE TABLE notes (" not in lines  # beyond the 3 lines of context
    assert lines[-1] == "```"


def test_first_lesson_shows_the_whole_file_and_unchanged_files_say_so(fake_repo):
    first = docgen.sql_diff(fake_repo / "lessons" / "01-first", "sql/schema.sql")
    assert first.markdown == '```sql title="sql/schema.sql"\n' + SCHEMA_01 + "```"
    same = docgen.sql_diff(fake_repo / "lessons" / "02-second", "sql/queries.sql")
    assert same.markdown == "`sql/queries.sql` is unchanged since lesson 01-first."
    assert same.label is None  # one sentence: never folded


def test_code_regions_drop_markers_dedent_and_nest(tmp_path):
    source = _write(
        tmp_path / "worker.py",
        "def run():\n"
        "    # region: loop\n"
        "    while True:\n"
        "        # region: claim\n"
        "        task = claim()\n"
        "        # endregion\n"
        "        work(task)\n"
        "    # endregion\n",
    )
    assert docgen.extract_code(source, "loop") == "while True:\n    task = claim()\n    work(task)"
    assert docgen.extract_code(source, "claim") == "task = claim()"
    assert "region" not in docgen.extract_code(source, None)

    _write(tmp_path / "q.sql", "-- region: pick\nSELECT 1;\n-- endregion\nSELECT 2;\n")
    block = docgen.code_region(tmp_path, "q.sql#pick")
    assert block.markdown == '```sql title="q.sql"\nSELECT 1;\n```'
    assert block.label == "q.sql#pick"


def test_a_python_excerpt_may_name_a_function_or_class(fake_repo):
    worker = fake_repo / "lessons" / "02-second" / "worker.py"
    claim = docgen.extract_code(worker, "Worker.claim")
    assert claim.startswith("def claim(self):\n    task = self.queue.pop(0)\n")  # no markers
    assert claim.endswith("    return task")
    release = docgen.extract_code(worker, "Worker.release")
    assert release.splitlines()[0] == "@functools.cache"
    assert docgen.extract_code(worker, "Worker").startswith("class Worker:")
    # A region of that name wins; a method needs its class.
    assert docgen.extract_code(worker, "pick") == "task = self.queue.pop(0)"
    with pytest.raises(docgen.MissingExcerpt, match="nor a function or class"):
        docgen.extract_code(worker, "claim")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("# region: a\nx\n", "has no endregion"),
        ("x\n# endregion\n", "endregion without a region"),
        ("# region: a\nx\n# endregion\n# region: a\ny\n# endregion\n", "defined twice"),
        ("# region: b\nx\n# endregion\n", "no region 'a'"),
        ("# region: a\n\n# endregion\n", "is empty"),
    ],
)
def test_code_regions_reject_mistakes(tmp_path, source, message):
    path = _write(tmp_path / "main.py", source)
    with pytest.raises(docgen.DocgenError, match=message):
        docgen.extract_code(path, "a")


def test_code_diff_against_the_previous_lesson(fake_repo):
    second = fake_repo / "lessons" / "02-second"
    diff = docgen.code_diff(second, "worker.py#Worker.claim")
    assert diff.label == "worker.py#Worker.claim, diff against lesson 01"
    assert diff.markdown == "\n".join(
        [
            '```diff title="worker.py"',
            "--- 01-first/worker.py#Worker.claim",
            "+++ 02-second/worker.py#Worker.claim",
            "@@ -1,3 +1,4 @@",
            " def claim(self):",
            "-    task = self.queue.pop()",
            "+    task = self.queue.pop(0)",
            "+    self.claimed += 1",
            "     return task",
            "```",
        ]
    )
    region = docgen.code_diff(second, "worker.py#pick", context=0).markdown.splitlines()
    assert region[1:] == [
        "--- 01-first/worker.py#pick",
        "+++ 02-second/worker.py#pick",
        "@@ -1 +1 @@",
        "-task = self.queue.pop()",
        "+task = self.queue.pop(0)",
        "```",
    ]


def test_code_diff_of_an_excerpt_new_in_this_lesson_or_unchanged(fake_repo):
    new = docgen.code_diff(fake_repo / "lessons" / "02-second", "worker.py#Worker.release")
    assert new.label == "worker.py#Worker.release, new since lesson 01"
    assert new.markdown.splitlines()[1:-1] == [
        "--- /dev/null",
        "+++ 02-second/worker.py#Worker.release",
        "@@ -0,0 +1,3 @@",
        "+@functools.cache",
        "+def release(self, task):",
        "+    self.queue.append(task)",
    ]
    first = docgen.code_diff(fake_repo / "lessons" / "01-first", "worker.py#pick")
    assert first.label == "worker.py#pick, new"
    assert "--- /dev/null" in first.markdown and "+task = self.queue.pop()" in first.markdown

    _write(fake_repo / "lessons" / "02-second" / "main.py", MAIN_PY)
    same = docgen.code_diff(fake_repo / "lessons" / "02-second", "main.py#demo")
    assert same == docgen.Block("`main.py#demo` is unchanged since lesson 01-first.", None)
    with pytest.raises(docgen.DocgenError, match="not in a lesson directory"):
        docgen.code_diff(fake_repo, "Makefile")


def test_fold_wraps_the_markdown_in_details():
    block = docgen.Block('```diff title="x"\n+a\n+b\n```', "x, diff against lesson 01")
    assert docgen.folded(block) == "\n".join(
        [
            "<details markdown>",
            "<summary>x, diff against lesson 01 (2 lines)</summary>",
            "",
            '```diff title="x"',
            "+a",
            "+b",
            "```",
            "",
            "</details>",
        ]
    )
    assert "<summary>Tom &amp; Jerry</summary>" in docgen.folded(block, "Tom & Jerry")
    # What write puts in an indented region, and how an output's body is read back.
    body = docgen.wrap_body(docgen.folded(block), "  ")
    assert body.startswith("\n  <details markdown>\n  <summary>") and "\n\n  ```diff" in body
    assert docgen.unwrap_body(body, "  ") == block.markdown


def test_fence_outgrows_backticks_in_the_content():
    block = docgen.fenced("print('```')", "python")
    assert block.startswith("````python\n") and block.endswith("\n````")


# --- normalisation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\x1b[32mok\x1b[0m  \r\n\n", "ok"),
        ("/repo/lessons/x and /repo", "/path/to/repo/lessons/x and /path/to/repo"),
        (".venv/lib/python3.13/site-packages/x", ".venv/lib/python3.X/site-packages/x"),
        (
            "0b7e1c9e-3f3a-4c1e-9d5e-1a2b3c4d5e6f 11111111-2222-3333-4444-555555555555 "
            "0B7E1C9E-3F3A-4C1E-9D5E-1A2B3C4D5E6F",
            "<uuid-1> <uuid-2> <uuid-1>",
        ),
        ("at 2025-11-21T10:11:12.123456+00:00.", "at <timestamp>."),
        ("2025-11-21 10:11:12,345 INFO", "<timestamp> INFO"),
        ("woke at 10:11:12.5", "woke at <time>"),
        ("took 0.123s, 12.3 ms, 1.5 sec, 2.0 seconds", "took <duration>, <duration>, <duration>, "),
        ("lease 30 s, heartbeat every 500 ms", "lease 30 s, heartbeat every 500 ms"),
        (
            "1234 tasks/s and 56.7/s and 8.1k jobs/sec",
            "<rate> tasks/s and <rate>/s and <rate> jobs/sec",
        ),
        ("pid 4242, PID=77, pid: 4242", "pid <pid-1>, PID=<pid-2>, pid: <pid-1>"),
        ("at 0x7f3a9c0d1e20 id 9f86d081884c", "at 0x<hex-1> id <hex-2>"),
        ("deadbeef 12345678 version 18.1", "deadbeef 12345678 version 18.1"),
    ],
)
def test_normalise_output(raw, expected):
    if expected.endswith(", "):  # the last duration has no comma after it
        expected += "<duration>"
    assert docgen.normalise_output(raw, Path("/repo")) == expected


def test_sources_hash_follows_the_program_not_the_readme(fake_repo):
    lesson = fake_repo / "lessons" / "01-first"
    before = docgen.sources_hash(lesson, ["python", "main.py"])
    (lesson / "README.md").write_text("changed")
    _write(lesson / "__pycache__" / "main.cpython-311.pyc", "junk")
    assert docgen.sources_hash(lesson, ["python", "main.py"]) == before
    assert docgen.sources_hash(lesson, ["python", "main.py", "--fast"]) != before
    (lesson / "sql" / "schema.sql").write_text("-- changed\n")
    assert docgen.sources_hash(lesson, ["python", "main.py"]) != before


# --- write and check -------------------------------------------------------------------------


def test_write_then_check_round_trip(fake_repo, capsys):
    assert docgen.write(fake_repo, log=_quiet)
    readme = (fake_repo / "lessons" / "02-second" / "README.md").read_text()
    assert "+CREATE TABLE tasks (" in readme
    assert "`sql/queries.sql` is unchanged since lesson 01-first." in readme
    assert 'print("task", uuid.uuid4(), "claimed by pid 4242")' in readme
    assert "task <uuid-1> claimed by pid <pid-1>\ntook <duration>" in readme
    assert re.search(r"<!-- begin generated: output sources=[0-9a-f]{12} -->", readme)
    # Folded: the diffs and the whole first schema; not the sentence about unchanged queries.
    assert "<summary>sql/schema.sql, diff against lesson 01 (10 lines)</summary>" in readme
    assert readme.count("<details markdown>") == 1
    first = (fake_repo / "lessons" / "01-first" / "README.md").read_text()
    assert "<summary>sql/schema.sql (4 lines)</summary>" in first
    assert "<summary>sql/queries.sql (4 lines)</summary>" in first
    assert "+    self.claimed += 1" in readme
    assert docgen.check(fake_repo) == []
    assert docgen.write(fake_repo, log=_quiet) == []  # idempotent, no rerun needed

    # Change a source of lesson 01: its schema, its output and the diff of lesson 02 go stale.
    _write(fake_repo / "lessons" / "01-first" / "sql" / "schema.sql", SCHEMA_01 + "-- more\n")
    stale = [
        (item.path.parent.name, item.spec_text.split()[0], item.reason.split(" (")[0])
        for item in docgen.check(fake_repo)
    ]
    assert stale == [
        ("01-first", "schema-diff", "differs from what the sources generate"),
        ("01-first", "output", "sources changed since the output was recorded"),
        ("02-second", "schema-diff", "differs from what the sources generate"),
    ]

    assert docgen.main(["--root", str(fake_repo), "check"]) == 1
    assert "run `make docs-generate`" in capsys.readouterr().err
    docgen.write(fake_repo, log=_quiet)
    assert docgen.main(["--root", str(fake_repo), "check"]) == 0


def test_check_finds_a_stale_code_diff(fake_repo):
    docgen.write(fake_repo, output_policy="never", log=_quiet)
    worker = fake_repo / "lessons" / "01-first" / "worker.py"
    worker.write_text(WORKER_01.replace("return task", "return None"))
    stale = [
        (item.path.parent.name, item.spec_text, item.reason)
        for item in docgen.check(fake_repo)
        if item.spec_text.startswith("code-diff")
    ]
    assert stale == [
        ("01-first", "code-diff worker.py#Worker.claim", "differs from what the sources generate"),
        ("02-second", "code-diff worker.py#Worker.claim", "differs from what the sources generate"),
    ]
    docgen.write(fake_repo, output_policy="never", log=_quiet)
    readme = (fake_repo / "lessons" / "02-second" / "README.md").read_text()
    assert "-    return None\n+    task = self.queue.pop(0)\n+    self.claimed += 1\n" in readme
    assert not [item for item in docgen.check(fake_repo) if item.spec_text != "output"]


def test_folding_a_recorded_output_needs_no_rerun(fake_repo):
    docgen.write(fake_repo, ["02-second"], log=_quiet)
    readme = fake_repo / "lessons" / "02-second" / "README.md"
    unfolded = readme.read_text()
    marker = re.search(r"<!-- begin generated: output sources=\w+", unfolded)
    assert marker
    readme.write_text(unfolded.replace(marker[0], marker[0] + " fold"))
    [stale] = [item for item in docgen.check(fake_repo) if item.path == readme]
    assert stale.reason == "differs from what the sources generate"

    docgen.write(fake_repo, ["02-second"], output_policy="never", log=_quiet)
    folded = readme.read_text()
    assert "<summary>Output of python main.py (2 lines)</summary>" in folded
    assert "task <uuid-1> claimed by pid <pid-1>\ntook <duration>" in folded
    assert [item for item in docgen.check(fake_repo) if item.path == readme] == []
    # And back: the same output, unfolded.
    readme.write_text(folded.replace(marker[0] + " fold", marker[0]))
    docgen.write(fake_repo, ["02-second"], output_policy="never", log=_quiet)
    assert readme.read_text() == unfolded


def test_write_one_lesson_and_skip_output(fake_repo):
    changed = docgen.write(fake_repo, ["02-second"], output_policy="never", log=_quiet)
    assert changed == [fake_repo / "lessons" / "02-second" / "README.md"]
    stale = docgen.check(fake_repo)
    assert {item.path.parent.name for item in stale} == {"01-first", "02-second"}
    assert [item.reason for item in stale if item.path.parent.name == "02-second"] == [
        "never generated"
    ]


def test_a_failing_program_stops_write_with_its_output(fake_repo):
    program = "# region: demo\nprint('boom')\n# endregion\nraise SystemExit(3)\n"
    _write(fake_repo / "lessons" / "01-first" / "main.py", program)
    with pytest.raises(docgen.DocgenError, match=r"exited with status 3 \(expected 0\)[^$]*boom"):
        docgen.write(fake_repo, ["01-first"], log=_quiet)


def test_generated_regions_of_the_repository_are_up_to_date():
    stale = docgen.check(REPO_ROOT)
    assert not stale, "stale generated regions (run `make docs-generate`):\n" + "\n".join(
        item.describe(REPO_ROOT) for item in stale
    )


# --- the site --------------------------------------------------------------------------------


def build_site(root: Path, site_dir: Path, env: dict[str, str] | None = None) -> str:
    """`mkdocs build --strict` of the repository at `root`; returns its log."""
    result = subprocess.run(
        [str(MKDOCS), "build", "--strict", "-f", str(root / "mkdocs.yml"), "-d", str(site_dir)],
        cwd=root,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1", **(env or {})),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}"
    return result.stderr


def _lessons_on_site(root: Path) -> list[Path]:
    return [lesson for lesson in docgen.discover_lessons(root) if (lesson / "README.md").is_file()]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The real site, built once for the tests that only read it."""
    site_dir = tmp_path_factory.mktemp("site")
    build_site(REPO_ROOT, site_dir)
    return site_dir


def _site_page(markdown: Path) -> str:
    """Where a lesson's Markdown page is on the site: `lessons/NN-name/` or `.../more/`."""
    lesson = f"lessons/{markdown.parent.name}/"
    return lesson if markdown.name == "README.md" else f"{lesson}{markdown.stem}/"


def test_site_builds_strictly_with_a_page_per_lesson(site):
    assert (site / "index.html").is_file()
    for lesson in _lessons_on_site(REPO_ROOT):
        page = (site / "lessons" / lesson.name / "index.html").read_text()
        # Every source file of the lesson is a page of the site, linked from the lesson page.
        assert 'href="main.py/"' in page
        assert (site / "lessons" / lesson.name / "main.py" / "index.html").is_file()
        assert f"edit/main/lessons/{lesson.name}/README.md" in page
        for more in docgen.lesson_pages(lesson)[1:]:
            page = (site / _site_page(more) / "index.html").read_text()
            assert f"edit/main/lessons/{lesson.name}/{more.name}" in page


def _make_site_config(fake_repo: Path) -> None:
    """The repository's mkdocs.yml and hooks in the fake repository, with a nav of its own."""
    config = (REPO_ROOT / "mkdocs.yml").read_text()
    nav_start = config.index("\nnav:\n")
    nav_end = config.index("\ntheme:\n")
    config = config[:nav_start] + "\nnav:\n  - Home: index.md\n  - Lessons: []\n" + config[nav_end:]
    _write(fake_repo / "mkdocs.yml", config)
    shutil.copytree(REPO_ROOT / "docs" / "hooks", fake_repo / "docs" / "hooks")
    shutil.copy(REPO_ROOT / "docs" / "index.md", fake_repo / "docs" / "index.md")


def test_links_in_lesson_readmes_resolve_on_the_site(fake_repo, tmp_path):
    """The hook on a repository of its own: lesson pages, source pages, GitHub links."""
    _make_site_config(fake_repo)
    docgen.write(fake_repo, log=_quiet)

    log = build_site(fake_repo, tmp_path / "site")
    assert "links to lesson 03-third, which is not written yet" in log
    home = (tmp_path / "site" / "index.html").read_text()
    assert 'href="lessons/01-first/"' in home
    page = (tmp_path / "site" / "lessons" / "02-second" / "index.html").read_text()
    github = "https://github.com/durable-execution-the-hard-way/python"
    assert 'href="main.py/"' in page
    assert 'href="sql/schema.sql/"' in page
    assert 'href="../01-first/#run"' in page
    assert f'href="{github}/blob/main/Makefile"' in page
    assert f'href="{github}/blob/main/lessons/03-third/README.md"' in page
    assert f'href="{github}/edit/main/lessons/02-second/README.md"' in page
    assert "language-diff" in page and "task &lt;uuid-1&gt; claimed by pid" in page
    # A folded region: collapsed, its Markdown rendered inside (a highlighted code block).
    summary = "<summary>sql/schema.sql, diff against lesson 01 (10 lines)</summary>"
    assert re.search(re.escape(summary) + r'\s*<div class="language-diff highlight">', page)
    source = (tmp_path / "site" / "lessons" / "02-second" / "main.py" / "index.html").read_text()
    assert "uuid4" in source and 'href="../"' in source


def test_a_lesson_image_shows_on_its_page(fake_repo, tmp_path):
    _make_site_config(fake_repo)
    lesson = fake_repo / "lessons" / "02-second"
    png = bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000100ffff03000006000557bfab"
        "d40000000049454e44ae426082"
    )  # a 1x1 PNG
    (lesson / "shot.png").write_bytes(png)
    readme = lesson / "README.md"
    readme.write_text(readme.read_text() + "\n![A screenshot](shot.png)\n")
    docgen.write(fake_repo, log=_quiet)
    build_site(fake_repo, tmp_path / "site")
    site_lesson = tmp_path / "site" / "lessons" / "02-second"
    assert (site_lesson / "shot.png").read_bytes() == png
    page = (site_lesson / "index.html").read_text()
    assert '<img alt="A screenshot" src="shot.png"' in page
    assert 'href="shot.png"' in page  # in the list of the lesson's files


PART_2 = """\
# Lesson 02, part 2: More

Back to [the first part](README.md#run), on to [main.py](main.py) and
[lesson 01](../01-first/README.md).

<!-- begin generated: code main.py#demo -->
<!-- end generated -->

## Details
"""


def test_a_lesson_may_go_on_in_more_pages(fake_repo, tmp_path):
    """A Markdown file beside a lesson's README: regions written and checked, a page of its own."""
    lesson = fake_repo / "lessons" / "02-second"
    part_2 = _write(lesson / "part-2.md", PART_2)
    readme = lesson / "README.md"
    readme.write_text(readme.read_text() + "\nContinue: [part 2](part-2.md#details)\n")

    changed = docgen.write(fake_repo, ["02-second"], output_policy="never", log=_quiet)
    assert changed == [readme, part_2]
    assert 'print("task", uuid.uuid4(), "claimed by pid 4242")' in part_2.read_text()
    part_2.write_text(PART_2)
    assert [(item.path, item.spec_text) for item in docgen.check(fake_repo)][-1] == (
        part_2,
        "code main.py#demo",
    )
    docgen.write(fake_repo, log=_quiet)
    assert docgen.check(fake_repo) == []

    _make_site_config(fake_repo)
    site = tmp_path / "site"
    build_site(fake_repo, site)
    page = (site / "lessons" / "02-second" / "part-2" / "index.html").read_text()
    github = "https://github.com/durable-execution-the-hard-way/python"
    # Its links rewritten as the README's are, and its edit button on the file itself.
    assert 'href="../#run"' in page
    assert 'href="../main.py/"' in page
    assert 'href="../../01-first/"' in page
    assert f'href="{github}/edit/main/lessons/02-second/part-2.md"' in page
    assert "claimed by pid 4242" in page
    readme_page = (site / "lessons" / "02-second" / "index.html").read_text()
    assert 'href="part-2/#details"' in readme_page
    # A page, not a source file: no page of its text, not in the lesson's list of files.
    assert not (site / "lessons" / "02-second" / "part-2.md").exists()
    assert "part-2.md" not in readme_page.replace(f"{github}/edit/main/lessons/02-second/", "")
    # In the navigation right after its lesson's page (seen from lesson 01's: home, 01, 02...).
    first = (site / "lessons" / "01-first" / "index.html").read_text()
    nav = re.findall(r'<a href="([^"#]*)" class="md-nav__link', first)
    assert nav == ["../..", "./", "../02-second/", "../02-second/part-2/"]


MERMAID_HOOK = REPO_ROOT / "docs" / "hooks" / "mermaid.py"
MERMAID_SCRIPT_RE = re.compile(r'<script src="(?:\.\./)*assets/javascripts/mermaid\.min\.js">')
needs_npm = pytest.mark.skipif(
    shutil.which("npm") is None, reason="needs npm, to fetch mermaid from the npm registry"
)


@needs_npm
def test_site_serves_the_pinned_mermaid_on_pages_with_diagrams(site):
    """No CDN: the site carries the mermaid that docs/hooks/mermaid.py pins, checksum included."""
    pinned = re.search(r'MERMAID_SHA256 = "([0-9a-f]{64})"', MERMAID_HOOK.read_text())
    assert pinned, "docs/hooks/mermaid.py pins no checksum"
    served = site / "assets" / "javascripts" / "mermaid.min.js"
    assert hashlib.sha256(served.read_bytes()).hexdigest() == pinned[1]

    with_diagrams = 0
    for page in site.rglob("index.html"):
        text = page.read_text()
        has_diagram = '<pre class="mermaid">' in text
        with_diagrams += has_diagram
        loads_mermaid = len(MERMAID_SCRIPT_RE.findall(text))
        assert loads_mermaid == has_diagram, f"{page.relative_to(site)}: {loads_mermaid} scripts"
    assert with_diagrams >= 3  # the concepts page and lesson pages have diagrams


def _load_mermaid_hook():
    spec = importlib.util.spec_from_file_location("mermaid_hook", MERMAID_HOOK)
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    return hook


def test_mermaid_hook_keeps_only_the_pinned_release(tmp_path, monkeypatch):
    """A stand-in for npm packs a tarball; the hook keeps its script only if the checksum holds."""
    hook = _load_mermaid_hook()
    script = b"window.mermaid = {};"
    fake_npm = _write(
        tmp_path / "npm",
        f"""#!{sys.executable}
import io, tarfile
name = "mermaid-{hook.MERMAID_VERSION}.tgz"
with tarfile.open(name, "w:gz") as archive:
    info = tarfile.TarInfo("package/dist/mermaid.min.js")
    info.size = {len(script)}
    archive.addfile(info, io.BytesIO({script!r}))
""",
    )
    fake_npm.chmod(0o755)
    target = tmp_path / "share" / "mermaid.min.js"

    with pytest.raises(PluginError, match="not the pinned"):
        hook.fetch_mermaid(target, str(fake_npm))
    assert not target.parent.exists()  # nothing kept

    monkeypatch.setattr(hook, "MERMAID_SHA256", hashlib.sha256(script).hexdigest())
    hook.fetch_mermaid(target, str(fake_npm))
    assert target.read_bytes() == script
    assert [path.name for path in target.parent.iterdir()] == ["mermaid.min.js"]


# --- rendering in a browser ------------------------------------------------------------------

# The theme draws each mermaid diagram into a *closed* shadow root, which --dump-dom cannot see.
# Served to the browser in this test only: handing the theme the element itself instead puts
# the SVG into the document, where the test can count it.
EXPOSE_SHADOW_DOM = (
    b"<script>Element.prototype.attachShadow = function () { return this; };</script>"
)


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def send_head(self):  # noqa: ANN201 - the standard library's signature
        path = Path(self.translate_path(self.path))
        if path.is_dir():
            path = path / "index.html"
        if path.suffix != ".html" or not path.is_file():
            return super().send_head()
        body = path.read_bytes().replace(b"<head>", b"<head>" + EXPOSE_SHADOW_DOM, 1)
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return _BytesFile(body)


class _BytesFile:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def read(self, *_) -> bytes:
        body, self.body = self.body, b""
        return body

    def close(self) -> None:
        pass


@pytest.fixture
def served_site(site) -> Iterator[tuple[str, Path]]:
    handler = functools.partial(_Handler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", site
    finally:
        server.shutdown()
        server.server_close()


def chromium(*args: str, profile: Path, timeout: float = 90) -> str:
    """Run headless Chromium as this machine allows (root); return its stdout.

    Offline, wherever it runs: every host name but 127.0.0.1 fails to resolve, so a page that
    needs the internet (a script from a CDN) fails here as it would for a reader without it.
    """
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        *args,
    ]
    # Its own process group: on a timeout, its renderer and helper processes go too.
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError(f"chromium did not finish within {timeout} s: {command}") from None
    assert process.returncode == 0, f"chromium failed: {stderr[-2000:]}"
    return stdout


def _text(dom: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", dom))


def _expected_blocks(readme: str) -> list[tuple[str, str]]:
    """(language, a line of its content) for each generated code block of a README."""
    blocks = []
    for region in docgen.parse_regions(readme):
        match = re.search(r"^\s*`{3,}(\w+)[^\n]*\n(?P<content>.*?)\n\s*`{3,}", region.body, re.S)
        if match:
            line = next(line for line in match["content"].splitlines() if line.strip())
            blocks.append((match[1], line.strip()))
    return blocks


# A diagram left as text: its source in a <pre>, where the theme would have put an SVG.
RAW_DIAGRAM_RE = re.compile(
    r"<pre[^>]*>\s*<code>\s*(?:sequenceDiagram|stateDiagram|flowchart|graph)\b"
)


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"
)
@needs_npm
@pytest.mark.timeout(600)
def test_pages_render_in_a_browser(served_site, tmp_path):
    """Offline, diagrams become SVG, and each lesson page shows its diffs, code and output."""
    url, site = served_site
    pages = ["", "concepts/", "postgres/", "sqlc/", "comparison/", "contributing-docs/"]
    # Every page of every lesson: its README's, and the other pages it goes on in, if any.
    lesson_pages = {
        _site_page(markdown): markdown
        for lesson in _lessons_on_site(REPO_ROOT)
        for markdown in docgen.lesson_pages(lesson)
    }
    pages += list(lesson_pages)

    def dump(page: str) -> str:
        profile = tmp_path / f"profile-{pages.index(page)}"
        return chromium("--virtual-time-budget=20000", "--dump-dom", url + page, profile=profile)

    # Two browsers at a time: one page takes about a second, mostly start-up.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        doms = dict(zip(pages, pool.map(dump, pages), strict=True))

    all_diagrams = 0
    for page, dom in doms.items():
        built = (site / page / "index.html").read_text()
        diagrams = built.count('<pre class="mermaid">')
        all_diagrams += diagrams
        rendered = re.findall(r'<div class="mermaid"><svg[^>]*>(.*?)</svg>', dom, re.S)
        assert len(rendered) == diagrams, f"{page}: {len(rendered)} of {diagrams} diagrams rendered"
        assert all("<g" in svg for svg in rendered), f"{page}: an empty diagram"
        assert not RAW_DIAGRAM_RE.search(dom), f"{page}: a diagram shows as raw text"
        assert "Syntax error" not in dom, f"{page}: mermaid could not parse a diagram"

        markdown = lesson_pages.get(page)
        if markdown is not None:
            text = _text(dom)
            for language, line in _expected_blocks(markdown.read_text()):
                assert f"language-{language}" in dom, f"{page}: no {language} block"
                assert line in text, f"{page}: missing generated line {line!r}"
    assert all_diagrams >= 3, f"only {all_diagrams} diagrams on the pages checked"
