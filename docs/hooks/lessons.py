"""mkdocs hook: lesson pages, lesson source files and repository links, with nothing to commit.

The lesson READMEs are the single source of the lesson text: they must read well on GitHub,
where their links are plain relative paths (`main.py`, `../02-simple-task-queue/README.md`,
`../../Makefile`). This hook makes the same text work on the site:

- one page per lesson directory (`lessons/NN-name/README.md` -> `lessons/NN-name/`), created at
  build time and listed under "Lessons" in the navigation, so a new lesson needs no stub;
- one page more for each other Markdown file of a lesson directory, for a lesson too long for
  one page (`lessons/NN-name/more.md` -> `lessons/NN-name/more/`), listed right after the
  lesson's page, by file name;
- one page per source file of every lesson and of `lessons/hardway/` (`lessons/02-.../main.py`
  -> `lessons/02-.../main.py/`, highlighted, with line numbers), so links to code work offline;
- a lesson's images (`lessons/11-.../dashboard.png`) copied as they are, beside its page, so
  that `![...](dashboard.png)` in a README shows the image on the site too;
- links that leave `docs/` are resolved against the repository and pointed at those pages, at
  the home page (root README) or, for any other repository file, at GitHub;
- the edit button opens the file the text really lives in (the README, not a stub).
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from pathlib import Path
from urllib.parse import quote

from hardway.docgen import discover_lessons, fenced, language_for, lesson_pages
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files, InclusionLevel
from mkdocs.structure.pages import Page

log = logging.getLogger("mkdocs.hooks.lessons")

SKIPPED_PARTS = {"__pycache__", "node_modules"}
SKIPPED_SUFFIXES = {".pyc", ".pyo", ".so"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"}


class _Site:
    """What the hook learned about the repository for the current build."""

    root: Path = Path()
    lessons: list[Path] = []
    # repository path (posix, relative) -> page src_uri inside the docs
    pages: dict[str, str] = {}
    blob_url: str = ""
    tree_url: str = ""


SITE = _Site()


def _lessons_with_readme(root: Path) -> list[Path]:
    return [lesson for lesson in discover_lessons(root) if (lesson / "README.md").is_file()]


def _extra_pages(lesson: Path) -> list[Path]:
    """The Markdown pages of a lesson beside its README."""
    return lesson_pages(lesson)[1:]


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    SITE.root = Path(config.config_file_path).resolve().parent
    SITE.lessons = _lessons_with_readme(SITE.root)
    repo = (config.repo_url or "").rstrip("/")
    match = re.match(r"(?:edit|blob)/([^/]+)/", config.edit_uri or "")
    branch = match[1] if match else "main"
    SITE.blob_url = f"{repo}/blob/{branch}/"
    SITE.tree_url = f"{repo}/tree/{branch}/"

    # A lesson's other pages follow its page in the list, not in a section of their own: a
    # section would show the lesson's title twice (as the section's, and as its README's).
    # Their titles say which lesson they continue ("Lesson 04, part 2: ...").
    lessons_nav = [
        f"lessons/{lesson.name}/{page}"
        for lesson in SITE.lessons
        for page in ["index.md", *(path.name for path in _extra_pages(lesson))]
    ]
    for entry in config.nav or []:
        if isinstance(entry, dict) and "Lessons" in entry:
            entry["Lessons"] = lessons_nav
    return config


def _embedded_files(root: Path) -> list[Path]:
    """Source files the site shows as pages: every lesson's files and the shared package's."""
    dirs = [*SITE.lessons, root / "lessons" / "hardway"]
    # A lesson's Markdown pages are pages of their own, not source files.
    pages = {page for lesson in SITE.lessons for page in lesson_pages(lesson)}
    found = []
    for directory in dirs:
        for path in sorted(directory.rglob("*")):
            parts = path.relative_to(root).parts
            if not path.is_file() or SKIPPED_PARTS.intersection(parts):
                continue
            if any(part.startswith(".") or part.endswith(".egg-info") for part in parts):
                continue
            if path.suffix in SKIPPED_SUFFIXES or path in pages:
                continue
            found.append(path)
    return found


def _image(config: MkDocsConfig, path: Path) -> File:
    """A lesson's image, copied to the same path in the site: the README's relative link to it
    works from the lesson's page, which is that directory's index."""
    relative = path.relative_to(SITE.root).as_posix()
    file = File(relative, str(SITE.root), config.site_dir, config.use_directory_urls)
    file.inclusion = InclusionLevel.NOT_IN_NAV
    SITE.pages[relative] = relative
    return file


def _source_page(config: MkDocsConfig, path: Path) -> File | None:
    relative = path.relative_to(SITE.root).as_posix()
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    lesson = next((les for les in SITE.lessons if path.is_relative_to(les)), None)
    back = ""
    if lesson is not None:
        back_link = posixpath.relpath(
            f"lessons/{lesson.name}/index.md", posixpath.dirname(relative + ".md")
        )
        back = f"From [lesson {lesson.name}]({back_link}). "
    content = "\n".join(
        [
            "---",
            "search:",
            "  exclude: true",
            "hide:",
            "  - toc",
            "---",
            "",
            f"# {relative}",
            "",
            f"{back}[View on GitHub]({SITE.blob_url}{quote(relative)}).",
            "",
            fenced(text, language_for(path), options='linenums="1"'),
            "",
        ]
    )
    file = File.generated(config, relative + ".md", content=content)
    file.inclusion = InclusionLevel.NOT_IN_NAV
    file.edit_uri = relative
    SITE.pages[relative] = relative + ".md"
    return file


def _lesson_page(config: MkDocsConfig, lesson: Path, sources: list[Path]) -> File:
    src_uri = f"lessons/{lesson.name}/index.md"
    listing = [
        f"    - [{name}]({name if path.suffix in IMAGE_SUFFIXES else name + '.md'})"
        for path in sources
        if path.is_relative_to(lesson)
        for name in [path.relative_to(lesson).as_posix()]
    ]
    content = "\n".join(
        [
            # An absolute path: the page's own directory does not exist on disk, so the
            # plugin could not resolve "../" through it.
            f'{{% include-markdown "{lesson / "README.md"}" %}}',
            "",
            '??? abstract "Every file of this lesson"',
            "",
            *listing,
            "",
        ]
    )
    file = File.generated(config, src_uri, content=content)
    # The include plugin rewrites the README's relative links as seen from this path.
    file.abs_src_path = str(Path(config.docs_dir) / src_uri)
    file.edit_uri = f"lessons/{lesson.name}/README.md"
    SITE.pages[f"lessons/{lesson.name}/README.md"] = src_uri
    SITE.pages[f"lessons/{lesson.name}"] = src_uri
    return file


def _extra_page(config: MkDocsConfig, path: Path) -> File:
    """The page of a lesson's Markdown file other than its README, at the same path."""
    relative = path.relative_to(SITE.root).as_posix()
    content = f'{{% include-markdown "{path}" %}}\n'
    file = File.generated(config, relative, content=content)
    # As for the lesson page: the include plugin rewrites links as seen from this path.
    file.abs_src_path = str(Path(config.docs_dir) / relative)
    file.edit_uri = relative
    SITE.pages[relative] = relative
    return file


def on_files(files: Files, config: MkDocsConfig) -> Files:
    SITE.pages = {"README.md": "index.md"}
    # Hand-written pages live in docs/: their edit button must say so.
    for file in files.documentation_pages():
        if file.generated_by is None:
            file.edit_uri = f"docs/{file.src_uri}"
    if files.get_file_from_path("index.md") is not None:
        files.get_file_from_path("index.md").edit_uri = "README.md"

    sources = _embedded_files(SITE.root)
    for path in sources:
        if path.suffix in IMAGE_SUFFIXES:
            files.append(_image(config, path))
            continue
        page = _source_page(config, path)
        if page is not None:
            files.append(page)
    for lesson in SITE.lessons:
        files.append(_lesson_page(config, lesson, sources))
        for path in _extra_pages(lesson):
            files.append(_extra_page(config, path))
    return files


# --- links -----------------------------------------------------------------------------------

FENCE_RE = re.compile(r"^\s*(`{3,}|~{3,})")
INLINE_CODE_RE = re.compile(r"(`+)(?:.*?[^`])?\1(?!`)")
LINK_RE = re.compile(r"(?P<head>\]\(\s*<?)(?P<url>[^)\s>]+)(?P<tail>>?(?:\s+\"[^\"]*\")?\s*\))")
REFERENCE_RE = re.compile(r"^(?P<head>\s{0,3}\[[^\]]+\]:\s*<?)(?P<url>[^\s>]+)(?P<tail>.*)$")
SCHEME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def map_url(url: str, page_src_uri: str, docs_dir: Path) -> str:
    """Where a relative link written on page `page_src_uri` should point on the site."""
    if not url or url.startswith(("#", "/")) or SCHEME_RE.match(url):
        return url
    path, sep, fragment = url.partition("#")
    if not path:
        return url
    page_dir = docs_dir / posixpath.dirname(page_src_uri)
    target = Path(os.path.normpath(page_dir / path))
    if target.is_relative_to(docs_dir) or not target.is_relative_to(SITE.root):
        return url  # a page of the docs (mkdocs checks it) or something we cannot know
    relative = target.relative_to(SITE.root).as_posix()
    suffix = sep + fragment

    mapped = SITE.pages.get(relative)
    if mapped is not None:
        return posixpath.relpath(mapped, posixpath.dirname(page_src_uri)) + suffix
    if target.is_file():
        return SITE.blob_url + quote(relative) + suffix
    if target.is_dir():
        return SITE.tree_url + quote(relative) + suffix
    lesson = re.match(r"lessons/(\d\d-[^/]+)", relative)
    if lesson and f"lessons/{lesson[1]}" not in SITE.pages:
        # The "Next:" link of the newest lesson, before the next lesson has its README.
        log.info(f"{page_src_uri}: links to lesson {lesson[1]}, which is not written yet")
        return SITE.blob_url + quote(relative) + suffix
    log.warning(f"{page_src_uri}: link to '{url}' points at {relative}, which does not exist")
    return url


def rewrite_links(markdown: str, page_src_uri: str, docs_dir: Path) -> str:
    """Apply `map_url` to every inline and reference link outside code."""

    def sub_link(match: re.Match[str]) -> str:
        url = map_url(match["url"], page_src_uri, docs_dir)
        return match["head"] + url + match["tail"]

    def outside_code(text: str) -> str:
        pieces, last = [], 0
        for code in INLINE_CODE_RE.finditer(text):
            pieces.append(LINK_RE.sub(sub_link, text[last : code.start()]))
            pieces.append(code[0])
            last = code.end()
        pieces.append(LINK_RE.sub(sub_link, text[last:]))
        return "".join(pieces)

    lines = markdown.split("\n")
    fence: str | None = None
    for index, line in enumerate(lines):
        opening = FENCE_RE.match(line)
        if fence is not None:
            if opening and opening[1][0] == fence[0] and len(opening[1]) >= len(fence):
                fence = None
            continue
        if opening:
            fence = opening[1]
            continue
        line = REFERENCE_RE.sub(sub_link, line)
        lines[index] = outside_code(line)
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    return rewrite_links(markdown, page.file.src_uri, Path(config.docs_dir).resolve())
