"""mkdocs hook: the site draws its mermaid diagrams with a copy of mermaid it serves itself.

The theme, left alone, loads mermaid from a CDN the first time a page shows a diagram: without
internet every diagram stays raw text. So the build fetches one pinned release of the `mermaid`
package from the npm registry (`npm pack`, which honours the reader's npm configuration and
cache), checks it against the checksum below, and keeps `dist/mermaid.min.js` in the virtual
environment, beside the Python packages the build uses: fetched once per `.venv`, never
committed (3.5 MB of minified JavaScript), gone with `make clean`. Each page with a diagram then
loads that copy; the theme finds `mermaid` already defined and never asks its CDN.

Without npm, the build says so and the pages fall back to the theme's CDN.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page
from mkdocs.utils import get_relative_url

log = logging.getLogger("mkdocs.hooks.mermaid")

# The theme loads mermaid 11 (`mermaid@11`) from its CDN: the same major version, pinned.
# To upgrade: change the version, run `make docs`, and copy the checksum the error prints.
MERMAID_VERSION = "11.17.2"
MERMAID_SHA256 = "581ed7d74bd9048d0e3a91363927d72ef22942d7722546b27f7cc29e35390eb8"
MERMAID_URI = "assets/javascripts/mermaid.min.js"
DIAGRAM_MARKER = '<pre class="mermaid">'


def cached_mermaid() -> Path:
    """Where this virtual environment keeps its copy of mermaid."""
    return Path(sys.prefix) / "share" / "hardway-docs" / f"mermaid-{MERMAID_VERSION}.min.js"


def fetch_mermaid(target: Path, npm: str) -> None:
    """Download the pinned mermaid with npm, check it, and write its mermaid.min.js to target."""
    log.info(f"fetching mermaid {MERMAID_VERSION} from the npm registry (once per .venv)")
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run(
            [npm, "pack", f"mermaid@{MERMAID_VERSION}", "--prefer-offline", "--silent"],
            cwd=scratch,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise PluginError(
                f"`npm pack mermaid@{MERMAID_VERSION}` failed, so the site cannot draw its "
                f"diagrams offline:\n{result.stderr.strip()[-1000:]}"
            )
        tarball = Path(scratch) / f"mermaid-{MERMAID_VERSION}.tgz"
        with tarfile.open(tarball) as archive:
            member = archive.extractfile("package/dist/mermaid.min.js")
            if member is None:
                raise PluginError(f"{tarball.name} has no package/dist/mermaid.min.js")
            script = member.read()
    digest = hashlib.sha256(script).hexdigest()
    if digest != MERMAID_SHA256:
        raise PluginError(
            f"mermaid {MERMAID_VERSION} from the npm registry has SHA-256 {digest}, "
            f"not the pinned {MERMAID_SHA256}"
        )
    # Written under another name, then renamed: two builds at once (the tests run in parallel)
    # never read half a file.
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    partial.write_bytes(script)
    partial.replace(target)


class _Mermaid:
    """The local copy for the current build, or None when pages fall back to the CDN."""

    path: Path | None = None


MERMAID = _Mermaid()


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    target = cached_mermaid()
    MERMAID.path = target
    if target.is_file():
        return config
    npm = shutil.which("npm")
    if npm is None:
        log.info("npm is not installed: the pages load mermaid from a CDN (diagrams need internet)")
        MERMAID.path = None
        return config
    fetch_mermaid(target, npm)
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    if MERMAID.path is not None:
        files.append(File.generated(config, MERMAID_URI, abs_src_path=str(MERMAID.path)))
    return files


def on_post_page(output: str, page: Page, config: MkDocsConfig) -> str:
    """Load mermaid on the pages that have a diagram, as the theme does, and on no other."""
    if MERMAID.path is None or DIAGRAM_MARKER not in output:
        return output
    src = get_relative_url(MERMAID_URI, page.url)
    # After the theme's own script, like `extra_javascript`: still before the theme draws.
    return output.replace("</body>", f'<script src="{src}"></script>\n</body>', 1)
