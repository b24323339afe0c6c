"""sqlc-gen-psycopg: a sqlc plugin that writes plain psycopg 3 code for PostgreSQL queries.

sqlc parses the schema and the queries, checks every query against the schema, and works out
the type of each result column and parameter. Writing code from that is a plugin's job. A
*process* plugin is any executable named in `sqlc.yaml`:

    plugins:
      - name: psycopg
        process:
          cmd: sqlc-gen-psycopg
          format: json

sqlc runs it once per `codegen` entry, writes a `CodeGenRequest` (sqlc's protobuf message, as
JSON with the .proto field names: `settings`, `catalog`, `queries`, `sqlc_version`,
`plugin_options`, ...) to its stdin, and reads the files to write from its stdout:

    {"files": [{"name": "queries.py", "contents": "<base64>"}]}

Names are relative to the entry's `out` directory. On failure the plugin prints the problems to
stderr and exits non-zero; sqlc shows that text after "error generating code: process: error
running command" and writes no files.

Why not the official sqlc-gen-python? It emits SQLAlchemy code, and sqlc downloads it as a WASM
module when generating. This project talks to PostgreSQL with psycopg only, and must generate
code on a machine without network access, so it carries this small plugin instead.

What is generated, into `out`:

- `__init__.py`, so that `out` is a package;
- `models.py`: an `enum.StrEnum` per PostgreSQL enum, a dataclass per table;
- one module per queries file (`queries.sql` -> `queries.py`): the SQL as constants, a `...Row`
  dataclass for each result that is not a whole table, one function per dataclass that makes a
  row into it (`_task(row)`, shared by every query returning a Task), and `class Querier` with
  one method per query. Supported commands: `:one`, `:many`, `:exec`, `:execrows`.

A type admits None where sqlc says the value may be NULL (`not_null` in the request): sqlc
reports a `NOT NULL` column and `count(*)` as not null, so they come out `int`. A `:one` method
returns None when there is no row, so it adds `| None` to any type: `SELECT count(*)` as `:one`
is `int | None`, as sqlc does not say which queries always return a row. (sqlc reports `sum()`,
`max()` and the other aggregates not null too, though they are NULL over no rows.)
"""

from __future__ import annotations

import base64
import json
import sys
from collections import defaultdict
from typing import Any

from hardway.sqlcgen import names, render
from hardway.sqlcgen.pgtypes import Catalog, GenerationError


def generate(request: dict[str, Any]) -> dict[str, str]:
    """File name -> contents, for one CodeGenRequest (already decoded from JSON)."""
    settings = request.get("settings") or {}
    if settings.get("engine") != "postgresql":
        raise GenerationError(
            f"engine {settings.get('engine')!r} is not supported: only postgresql is"
        )
    _check_options(request.get("plugin_options") or "")
    version = request.get("sqlc_version") or "unknown"
    catalog = Catalog(request.get("catalog") or {})

    files = {"__init__.py": render.init_module(version)}
    errors = []
    try:
        files["models.py"] = render.models_module(catalog, version)
    except GenerationError as err:
        errors.append(str(err))

    by_file: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for query in request.get("queries") or []:
        by_file[query.get("filename", "queries.sql")].append(query)
    for filename in sorted(by_file):
        module = names.snake(filename.rsplit("/", 1)[-1].removesuffix(".sql"))
        module = names.identifier(module, fallback="queries") + ".py"
        if module in files:
            errors.append(f"{filename}: would be written to {module}, which is already taken")
            continue
        try:
            files[module] = render.queries_module(filename, by_file[filename], catalog, version)
        except GenerationError as err:
            errors.append(str(err))
    if errors:
        raise GenerationError("\n".join(errors))
    return files


def _check_options(encoded: str) -> None:
    """`options:` from sqlc.yaml arrive as base64-encoded JSON; none are defined yet."""
    options = json.loads(base64.b64decode(encoded) or b"{}")
    if options:
        raise GenerationError(
            f"unknown option(s) {', '.join(sorted(options))}: sqlc-gen-psycopg takes no options"
        )


def main() -> None:
    if sys.stdin.isatty():
        sys.exit("sqlc-gen-psycopg is a sqlc plugin: run `sqlc generate`, which starts it.")
    try:
        request = json.load(sys.stdin.buffer)
    except ValueError:
        # Without `format: json`, sqlc sends the request as binary protobuf.
        sys.exit("sqlc-gen-psycopg: expected JSON: set `format: json` for it in sqlc.yaml")
    try:
        files = generate(request)
    except GenerationError as err:
        # sqlc prints this after "error running command ", so it starts with our name.
        print(f"sqlc-gen-psycopg: cannot generate code:\n{err}", file=sys.stderr)
        sys.exit(1)
    response = {
        "files": [
            {"name": name, "contents": base64.b64encode(contents.encode()).decode()}
            for name, contents in files.items()
        ]
    }
    json.dump(response, sys.stdout)


if __name__ == "__main__":
    main()
