"""Shared by the sqlc-gen-psycopg tests: running sqlc as the Makefile does."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

BIN = Path(sys.executable).parent  # the virtualenv's bin: sqlc, ruff and sqlc-gen-psycopg
REPO_ROOT = Path(__file__).resolve().parents[2]


def run_sqlc(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run sqlc in `workdir` with the virtualenv's bin first on PATH, as the Makefile does."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(
        [str(BIN / "sqlc"), *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ruff(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ruff in `workdir` with the project's settings (line length, rules)."""
    config = str(REPO_ROOT / "pyproject.toml")
    return subprocess.run(
        [str(BIN / "ruff"), *args, "--no-cache", "--config", config],
        cwd=workdir,
        capture_output=True,
        text=True,
    )


def import_generated(workdir: Path, package: str) -> types.SimpleNamespace:
    """Import `package` (generated into `workdir`): `.models` and `.queries`."""
    sys.path.insert(0, str(workdir))
    try:
        return types.SimpleNamespace(
            models=importlib.import_module(f"{package}.models"),
            queries=importlib.import_module(f"{package}.queries"),
        )
    finally:
        sys.path.remove(str(workdir))


def forget_generated(package: str) -> None:
    for name in [name for name in sys.modules if name.split(".")[0] == package]:
        del sys.modules[name]
