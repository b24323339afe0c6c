"""The `hardway` command: the latest lesson's command line (its cli.py), from any directory.

    hardway tasks list --status failed
    hardway queues stats

A lesson is a directory of plain top-level modules (`engine`, `worker`, `db`...), not a
package: its scripts import each other by those names, from their own directory, which Python
puts first on sys.path when it runs `python cli.py`. A console script runs from wherever the
operator is, so it does what `python cli.py` would: put the lesson's directory first on
sys.path, then import cli and run it. (Making each lesson a package instead would mean
relative imports in every lesson, whose scripts would then no longer run as `python main.py`.)

The latest lesson: the highest-numbered lesson directory that has a cli.py, because each
lesson is a complete snapshot of the engine, and the newest is the one to operate.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

LESSONS_DIR = Path(__file__).resolve().parents[1]


def main() -> None:
    scripts = sorted(LESSONS_DIR.glob("[0-9][0-9]-*/cli.py"))
    if not scripts:
        raise SystemExit(f"error: no lesson in {LESSONS_DIR} has a cli.py")
    sys.path.insert(0, str(scripts[-1].parent))
    importlib.import_module("cli").main()
