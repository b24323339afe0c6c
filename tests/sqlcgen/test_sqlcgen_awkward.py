"""Awkward input for sqlc-gen-psycopg: long names, odd identifiers, SQL that is hard to quote.

The generated code must still be valid, already formatted as ruff formats it, lint clean, and
carry the SQL text unchanged.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlcgen_support import forget_generated, import_generated, ruff, run_sqlc

PACKAGE = "sqlcgen_awkward_db"

SCHEMA = r"""
CREATE TYPE workflow_run_lifecycle_status AS ENUM (
    'in progress', '1st', '', 'class', 'IN_PROGRESS', 'say "hi"', 'back\slash'
);
COMMENT ON TYPE workflow_run_lifecycle_status IS 'Where a run is.';
CREATE SCHEMA other;
CREATE TYPE other.color AS ENUM ('red');
CREATE TABLE other.things (id int PRIMARY KEY, c other.color);
CREATE TABLE categories (id int PRIMARY KEY);
CREATE TABLE boxes (id int PRIMARY KEY);
CREATE TABLE analysis (id int PRIMARY KEY);
CREATE TABLE "1sts" ("1st" int PRIMARY KEY, label text);
CREATE TABLE workflow_runs (
    id bigserial PRIMARY KEY,
    "from" text,
    "class" int,
    "camelCase" text,
    "self" text,
    workflow_run_lifecycle_status_value workflow_run_lifecycle_status,
    workflow_definition_payload_document jsonb,
    statuses workflow_run_lifecycle_status[],
    labels citext[]
);
"""

# The SQL of ListRows as sqlc passes it on: without the `-- name:` and comment lines and
# without the final semicolon, but with trailing spaces, a tab, a backslash and three quotes.
LIST_ROWS_SQL = (
    'SELECT id, "from", "class", "camelCase", "self", workflow_run_lifecycle_status_value, id\n'
    "FROM workflow_runs   \n"
    'WHERE "from" = \'a"""b\\n\'\tAND "class" = $1 AND "self" = $2'
)

QUERIES = f"""
-- name: GetWorkflowRunLifecycleStatusValueByIdentifierForTheDashboard :one
SELECT workflow_run_lifecycle_status_value FROM workflow_runs WHERE id = $1;

-- name: ListWorkflowRunLifecycleStatusValuesForTheDashboardPage :many
SELECT workflow_run_lifecycle_status_value FROM workflow_runs;

-- name: ListWorkflowRunLifecycleStatusValuesForTheDashboardPageAgainAndAgain :many
SELECT workflow_run_lifecycle_status_value FROM workflow_runs;

-- name: ListWorkflowRunLifecycleStatusValuesWithIdentifiersForTheDashboard :many
SELECT id, workflow_run_lifecycle_status_value FROM workflow_runs;

-- name: ListRows :many
-- A "docstring" with \\backslash and \"\"\"triple\"\"\" quotes	and a tab.
--
--     an indented line
-- ends with "quote"
{LIST_ROWS_SQL};

-- name: Quoted :exec
-- "Quoted" at both ends "
SELECT 1;

-- name: UpdatePayload :exec
UPDATE workflow_runs
SET workflow_definition_payload_document = sqlc.narg(workflow_definition_payload_document_new)
WHERE id = @row AND "from" = @cur;

-- name: Other :many
SELECT * FROM other.things WHERE c = $1;

-- name: First :one
SELECT * FROM "1sts" WHERE "1st" = $1;

-- name: class :one
SELECT id, id FROM workflow_runs WHERE id > $1 AND id < $2;

-- name: Statuses :many
SELECT statuses::text[] AS statuses FROM workflow_runs
WHERE statuses && @wanted::workflow_run_lifecycle_status[];
"""

CONFIG = f"""
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
        out: {PACKAGE}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlcgen-awkward")
    (path / "schema.sql").write_text(SCHEMA)
    (path / "queries.sql").write_text(QUERIES)
    (path / "sqlc.yaml").write_text(CONFIG)
    result = run_sqlc(path, "generate")
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def db(workdir: Path) -> Iterator[types.SimpleNamespace]:
    yield import_generated(workdir, PACKAGE)
    forget_generated(PACKAGE)


def test_formatted_and_lint_clean(workdir: Path) -> None:
    for command in (["format", "--check", "--diff"], ["check"]):
        result = ruff(workdir, *command, PACKAGE)
        assert result.returncode == 0, result.stdout + result.stderr


def test_sql_text_is_kept_exactly(db: types.SimpleNamespace, workdir: Path) -> None:
    assert db.queries.LIST_ROWS == f"-- name: ListRows :many\n{LIST_ROWS_SQL}\n"
    # Trailing spaces in the SQL are kept; the file tells ruff so.
    assert "# ruff: noqa: E501, W291\n" in (workdir / PACKAGE / "queries.py").read_text()


def test_docstring(db: types.SimpleNamespace) -> None:
    doc = db.queries.Querier.list_rows.__doc__
    assert doc.startswith('A "docstring" with \\backslash and """triple""" quotes and a tab.\n')
    assert '\n            an indented line\n        ends with "quote"\n' in doc


def test_docstring_in_quotes(db: types.SimpleNamespace) -> None:
    assert db.queries.Querier.quoted.__doc__ == ' "Quoted" at both ends " '


def test_names(db: types.SimpleNamespace) -> None:
    models, queries = db.models, db.queries
    status = models.WorkflowRunLifecycleStatus
    assert status.__doc__ == "Where a run is."
    assert [(member.name, member.value) for member in status] == [
        ("IN_PROGRESS", "in progress"),
        ("_1ST", "1st"),
        ("EMPTY", ""),
        ("CLASS", "class"),
        ("IN_PROGRESS_2", "IN_PROGRESS"),
        ("SAY_HI", 'say "hi"'),
        ("BACK_SLASH", "back\\slash"),
    ]
    assert models.OtherColor.RED == "red"
    for name in ("Category", "Box", "Analysis", "WorkflowRun", "OtherThing", "_1st"):
        assert hasattr(models, name)
    fields = list(models.WorkflowRun.__dataclass_fields__)
    assert fields[:5] == ["id", "from_", "class_", "camel_case", "self"]
    assert list(queries.ClassRow.__dataclass_fields__) == ["id", "id_2"]
    assert list(queries.ListRowsRow.__dataclass_fields__)[-1] == "id_2"
    # Keywords and the names the method bodies use get a trailing underscore.
    querier = queries.Querier
    assert hasattr(querier, "class_")
    code = querier.update_payload.__code__
    assert code.co_varnames[1 : code.co_kwonlyargcount + 1] == (
        "workflow_definition_payload_document_new",
        "row_",
        "cur_",
    )
    # Class `_1st` and a parameter `_1st`: the function making rows `_1st`s has another name.
    code = querier.first.__code__
    assert code.co_varnames[1 : code.co_kwonlyargcount + 1] == ("_1st",)
    assert "_row_1st" in code.co_names


def test_one_module_per_queries_file(tmp_path: Path) -> None:
    (tmp_path / "schema.sql").write_text("CREATE TABLE tasks (id bigint PRIMARY KEY);\n")
    (tmp_path / "queries").mkdir()
    (tmp_path / "queries" / "tasks.sql").write_text(
        "-- name: CountTasks :one\nSELECT count(*) FROM tasks;\n"
    )
    (tmp_path / "queries" / "task-admin.sql").write_text(
        "-- name: DeleteTasks :execrows\nDELETE FROM tasks;\n"
    )
    config = CONFIG.replace("queries: queries.sql", "queries: queries").replace(PACKAGE, "db")
    (tmp_path / "sqlc.yaml").write_text(config)
    result = run_sqlc(tmp_path, "generate")
    assert result.returncode == 0, result.stderr
    files = sorted(path.name for path in (tmp_path / "db").iterdir())
    assert files == ["__init__.py", "models.py", "task_admin.py", "tasks.py"]
    admin = (tmp_path / "db" / "task_admin.py").read_text()
    assert "# source: task-admin.sql\n" in admin
    assert "    def delete_tasks(self) -> int:\n" in admin
    assert "def count_tasks" in (tmp_path / "db" / "tasks.py").read_text()
