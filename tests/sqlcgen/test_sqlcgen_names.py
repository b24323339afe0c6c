"""The naming rules of sqlc-gen-psycopg (hardway.sqlcgen.names)."""

from __future__ import annotations

import pytest
from hardway.sqlcgen import names


@pytest.mark.parametrize(
    ("name", "snake", "camel"),
    [
        ("ClaimTask", "claim_task", "ClaimTask"),
        ("claim_task", "claim_task", "ClaimTask"),
        ("GetTaskByID", "get_task_by_id", "GetTaskByID"),
        ("HTTPStatus", "http_status", "HTTPStatus"),
        ("camelCase", "camel_case", "CamelCase"),
        ("in progress", "in_progress", "InProgress"),
        ("task2run", "task2run", "Task2run"),
        ("", "", ""),
    ],
)
def test_snake_and_camel(name: str, snake: str, camel: str) -> None:
    assert names.snake(name) == snake
    assert names.camel(name) == camel


@pytest.mark.parametrize(
    ("table", "class_name"),
    [
        ("tasks", "Task"),
        ("task_attempts", "TaskAttempt"),
        ("categories", "Category"),
        ("classes", "Class"),
        ("boxes", "Box"),
        ("batches", "Batch"),
        ("wishes", "Wish"),
        ("status", "Status"),
        ("statuses", "Status"),
        ("courses", "Course"),
        ("analysis", "Analysis"),
        ("address", "Address"),
        ("data", "Data"),
        ("task_status", "TaskStatus"),
    ],
)
def test_table_class_names(table: str, class_name: str) -> None:
    assert names.class_name(table, singularise=True) == class_name


def test_identifier() -> None:
    assert names.identifier("from", fallback="x") == "from_"
    assert names.identifier("", fallback="column_2") == "column_2"
    assert names.identifier("1st", fallback="x") == "_1st"
    assert names.identifier("row", fallback="x", reserved=frozenset({"row"})) == "row_"


def test_dedupe() -> None:
    assert names.dedupe(["id", "id", "name", "id"]) == ["id", "id_2", "name", "id_3"]
