"""The documentation: generated README regions (hardway.docgen), the site build, its rendering.

Fast tests use a small fake repository in a temporary directory; two build the real site with
mkdocs; the last opens the built pages in headless Chromium, as a reader would, and is skipped
where /usr/bin/chromium is not installed.
"""

from __future__ import annotations

import concurrent.futures
import functools
import html
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hardway import docgen
from harness import REPO_ROOT

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
README = """\
# Lesson {n}

Some prose, then the schema:

<!-- begin generated: schema-diff -->
<!-- end generated -->

<!-- begin generated: queries-diff -->
<!-- end generated -->

<!-- begin generated: code main.py#demo -->
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
    for n, name, schema in (("01", "01-first", SCHEMA_01), ("02", "02-second", SCHEMA_02)):
        lesson = tmp_path / "lessons" / name
        _write(lesson / "README.md", README.format(n=n))
        _write(lesson / "main.py", MAIN_PY)
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


# --- diffs and code --------------------------------------------------------------------------


def test_schema_diff_against_the_previous_lesson(fake_repo):
    diff = docgen.sql_diff(fake_repo / "lessons" / "02-second", "sql/schema.sql")
    lines = diff.splitlines()
    assert lines[0] == '```diff title="sql/schema.sql"'
    assert lines[1:3] == ["--- 01-first/sql/schema.sql", "+++ 02-second/sql/schema.sql"]
    assert "+CREATE TABLE tasks (" in lines
    assert " CREATE TABLE notes (" not in lines  # beyond the 3 lines of context
    assert lines[-1] == "```"


def test_first_lesson_shows_the_whole_file_and_unchanged_files_say_so(fake_repo):
    first = docgen.sql_diff(fake_repo / "lessons" / "01-first", "sql/schema.sql")
    assert first == '```sql title="sql/schema.sql"\n' + SCHEMA_01 + "```"
    same = docgen.sql_diff(fake_repo / "lessons" / "02-second", "sql/queries.sql")
    assert same == "`sql/queries.sql` is unchanged since lesson 01-first."


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
    assert docgen.code_region(tmp_path, "q.sql#pick") == '```sql title="q.sql"\nSELECT 1;\n```'


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


def test_site_builds_strictly_with_a_page_per_lesson(tmp_path):
    site = tmp_path / "site"
    build_site(REPO_ROOT, site)
    assert (site / "index.html").is_file()
    for lesson in _lessons_on_site(REPO_ROOT):
        page = (site / "lessons" / lesson.name / "index.html").read_text()
        # Every source file of the lesson is a page of the site, linked from the lesson page.
        assert 'href="main.py/"' in page
        assert (site / "lessons" / lesson.name / "main.py" / "index.html").is_file()
        assert f"edit/main/lessons/{lesson.name}/README.md" in page


def test_links_in_lesson_readmes_resolve_on_the_site(fake_repo, tmp_path):
    """The hook on a repository of its own: lesson pages, source pages, GitHub links."""
    config = (REPO_ROOT / "mkdocs.yml").read_text()
    nav_start = config.index("\nnav:\n")
    nav_end = config.index("\ntheme:\n")
    config = config[:nav_start] + "\nnav:\n  - Home: index.md\n  - Lessons: []\n" + config[nav_end:]
    _write(fake_repo / "mkdocs.yml", config)
    shutil.copytree(REPO_ROOT / "docs" / "hooks", fake_repo / "docs" / "hooks")
    shutil.copy(REPO_ROOT / "docs" / "index.md", fake_repo / "docs" / "index.md")
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
    source = (tmp_path / "site" / "lessons" / "02-second" / "main.py" / "index.html").read_text()
    assert "uuid4" in source and 'href="../"' in source


# --- rendering in a browser ------------------------------------------------------------------

# The theme draws each mermaid diagram into a *closed* shadow root, which --dump-dom cannot see.
# Served to the browser in this test only: handing the theme the element itself instead puts
# the SVG into the document, where the test can count it.
EXPOSE_SHADOW_DOM = (
    b"<script>Element.prototype.attachShadow = function () { return this; };</script>"
)


@pytest.fixture(scope="session")
def mermaid_js(pytestconfig, tmp_path_factory) -> Path:
    """A local mermaid 11 (what the theme would load from its CDN), from the npm registry.

    Kept in pytest's cache directory, so it is fetched once per checkout.
    """
    if getattr(pytestconfig, "cache", None) is not None:
        cache = pytestconfig.cache.mkdir("mermaid")
    else:
        cache = tmp_path_factory.mktemp("mermaid")
    cached = sorted(cache.glob("mermaid-*.min.js"))
    if cached:
        return cached[-1]
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: no local mermaid to render diagrams with")
    result = subprocess.run(
        [npm, "pack", "mermaid@11", "--silent", "--pack-destination", str(cache)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    if result.returncode != 0:
        pytest.skip(f"`npm pack mermaid@11` failed: {result.stderr.strip()[-300:]}")
    tarball = cache / result.stdout.strip().splitlines()[-1]
    target = cache / tarball.name.replace(".tgz", ".min.js")
    with tarfile.open(tarball) as archive:
        member = archive.extractfile("package/dist/mermaid.min.js")
        assert member is not None
        target.write_bytes(member.read())
    tarball.unlink()
    return target


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
def served_site(tmp_path, mermaid_js) -> Iterator[tuple[str, Path]]:
    site = tmp_path / "site"
    build_site(REPO_ROOT, site, env={"HARDWAY_MERMAID_JS": str(mermaid_js)})
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
    """Run headless Chromium as this machine allows (root, no network); return its stdout."""
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
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


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"
)
@pytest.mark.timeout(600)
def test_pages_render_in_a_browser(served_site, tmp_path):
    """Diagrams become SVG, and each lesson page shows its diffs, code and output."""
    url, site = served_site
    pages = ["", "concepts/", "postgres/", "sqlc/", "comparison/", "contributing-docs/"]
    lessons = _lessons_on_site(REPO_ROOT)
    pages += [f"lessons/{lesson.name}/" for lesson in lessons]

    def dump(page: str) -> str:
        profile = tmp_path / f"profile-{pages.index(page)}"
        return chromium("--virtual-time-budget=20000", "--dump-dom", url + page, profile=profile)

    # Two browsers at a time: one page takes about a second, mostly start-up.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        doms = dict(zip(pages, pool.map(dump, pages), strict=True))

    for page, dom in doms.items():
        built = (site / page / "index.html").read_text()
        diagrams = built.count('<pre class="mermaid">')
        rendered = re.findall(r'<div class="mermaid"><svg[^>]*>(.*?)</svg>', dom, re.S)
        assert len(rendered) == diagrams, f"{page}: {len(rendered)} of {diagrams} diagrams rendered"
        assert all("<g" in svg for svg in rendered), f"{page}: an empty diagram"
        assert "Syntax error" not in dom, f"{page}: mermaid could not parse a diagram"

        lesson = next((les for les in lessons if page == f"lessons/{les.name}/"), None)
        if lesson is not None:
            text = _text(dom)
            for language, line in _expected_blocks((lesson / "README.md").read_text()):
                assert f"language-{language}" in dom, f"{page}: no {language} block"
                assert line in text, f"{page}: missing generated line {line!r}"
