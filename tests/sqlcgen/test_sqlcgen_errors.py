"""What a user sees when sqlc-gen-psycopg cannot generate code: sqlc's error, with our message.

Each case runs the real `sqlc generate`, so the test shows both what sqlc rejects on its own
and what reaches the plugin and is rejected there. Nothing is written when generation fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlcgen_support import run_sqlc

SCHEMA = """
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE places (
    id int PRIMARY KEY,
    name text NOT NULL,
    moods mood[] NOT NULL DEFAULT '{}'
);
"""

CONFIG = """
version: "2"
plugins:
  - name: psycopg
    process:
      cmd: sqlc-gen-psycopg
      format: json
sql:
  - engine: postgresql
    schema: schema.sql
    queries: queries.sql
    codegen:
      - plugin: psycopg
        out: db
        options: {options}
"""


def generate(tmp_path: Path, queries: str, *, schema: str = SCHEMA, options: str = "{}") -> str:
    """Run `sqlc generate` on these files; it must fail. Returns its stderr."""
    (tmp_path / "schema.sql").write_text(schema)
    (tmp_path / "queries.sql").write_text(queries)
    (tmp_path / "sqlc.yaml").write_text(CONFIG.replace("{options}", options))
    result = run_sqlc(tmp_path, "generate")
    assert result.returncode != 0, "sqlc generate should have failed"
    assert not (tmp_path / "db").exists()
    return result.stderr


@pytest.mark.parametrize(
    ("command", "sql"),
    [
        (":copyfrom", "INSERT INTO places (id, name) VALUES ($1, $2)"),
        (":batchexec", "UPDATE places SET name = $1 WHERE id = $2"),
        (":batchone", "UPDATE places SET name = $1 WHERE id = $2 RETURNING id"),
        (":execresult", "DELETE FROM places"),
        (":execlastid", "INSERT INTO places (id, name) VALUES ($1, $2)"),
    ],
)
def test_unsupported_command(tmp_path: Path, command: str, sql: str) -> None:
    stderr = generate(tmp_path, f"-- name: Change {command}\n{sql};\n")
    assert (
        "error running command sqlc-gen-psycopg: cannot generate code:\n"
        f'queries.sql: query "Change": command "{command}" is not supported '
        "(use one of :one, :many, :exec, :execrows)"
    ) in stderr


@pytest.mark.parametrize("command", [":one", ":many", ":batchone", ":batchmany"])
def test_sqlc_itself_rejects_a_result_command_without_returning(
    tmp_path: Path, command: str
) -> None:
    stderr = generate(tmp_path, f"-- name: Rename {command}\nUPDATE places SET name = $1;\n")
    assert f'specifies parameter "{command}" without containing a RETURNING clause' in stderr
    assert "sqlc-gen-psycopg" not in stderr


def test_unsupported_type(tmp_path: Path) -> None:
    schema = SCHEMA + "CREATE TABLE shapes (id int PRIMARY KEY, geom geometry NOT NULL);\n"
    queries = """
-- name: ClaimTask :one
SELECT id, geom FROM shapes WHERE id = $1;

-- name: FindShape :many
SELECT id FROM shapes WHERE geom = $1;
"""
    stderr = generate(tmp_path, queries, schema=schema)
    # Every problem is listed, the table's own included.
    assert 'table "shapes": column "geom" has unsupported PostgreSQL type "geometry"' in stderr
    assert (
        'queries.sql: query "ClaimTask": column "geom" has unsupported PostgreSQL type "geometry"'
    ) in stderr
    assert (
        'queries.sql: query "FindShape": parameter $1 (geom) has unsupported PostgreSQL type '
        '"geometry"'
    ) in stderr


@pytest.mark.parametrize(
    ("queries", "message"),
    [
        (
            "-- name: Untyped :one\nSELECT NULL AS nothing, id FROM places;\n",
            'query "Untyped": column "nothing" has a type sqlc cannot infer: add a cast',
        ),
        (
            "-- name: Plus :many\nSELECT id FROM places WHERE id = 1 + $1;\n",
            'query "Plus": parameter $1 (dollar_1) has a type sqlc cannot infer: add a cast',
        ),
        (
            "-- name: Moods :many\nSELECT moods FROM places;\n",
            'query "Moods": column "moods" is an array of "mood", which psycopg would return as '
            "one string: cast it to text[]",
        ),
        (
            "-- name: Ping :one\nSELECT pg_notify('channel', 'payload');\n",
            'query "Ping": column "pg_notify" has type void, which carries no value: use :exec',
        ),
    ],
    ids=["untyped-column", "untyped-parameter", "enum-array-result", "void-result"],
)
def test_values_psycopg_cannot_return_correctly(tmp_path: Path, queries: str, message: str) -> None:
    assert f"queries.sql: {message}" in generate(tmp_path, queries)


def test_unknown_option(tmp_path: Path) -> None:
    queries = "-- name: CountPlaces :one\nSELECT count(*) FROM places;\n"
    stderr = generate(tmp_path, queries, options="{package: db}")
    assert "unknown option(s) package: sqlc-gen-psycopg takes no options" in stderr


def test_class_name_clash(tmp_path: Path) -> None:
    schema = SCHEMA + "CREATE TYPE place AS ENUM ('here');\n"
    stderr = generate(
        tmp_path, "-- name: CountPlaces :one\nSELECT count(*) FROM places;\n", schema=schema
    )
    assert (
        'enum "place" and table "places" would both become class Place in models.py: '
        "rename one of them"
    ) in stderr
