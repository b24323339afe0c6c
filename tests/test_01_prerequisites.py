"""Lesson 01: the bootstrap finds (or starts) PostgreSQL and main.py runs from anywhere."""

import subprocess
import sys

import psycopg
import pytest
from hardway import postgres
from harness import REPO_ROOT, lesson_dir, lesson_env, run_main

LESSON = "01-prerequisites"


def test_main_runs_from_repo_root_and_lesson_dir_and_reruns(pg_server_url):
    for cwd in (REPO_ROOT, lesson_dir(LESSON), REPO_ROOT):
        result = run_main(LESSON, pg_server_url, "t01_main", cwd=cwd)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        lines = result.stdout.splitlines()
        assert lines[0].startswith("database t01_main on ")
        assert lines[1].startswith("PostgreSQL ")
        assert "created note 3: 'The generated Querier has one typed method per query'" in lines[4]
        assert lines[-1] == "deleted 2 notes tagged 'postgres'"

    # Each run re-created the database: exactly one run's rows are left, ids start at 1 again.
    with psycopg.connect(postgres.database_url(pg_server_url, "t01_main")) as conn:
        assert conn.execute("SELECT id, tags FROM notes").fetchall() == [(3, ["sqlc"])]
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute("DROP DATABASE t01_main WITH (FORCE)")


def test_unreachable_database_url_gives_one_clear_message():
    env = lesson_env("postgresql://postgres@127.0.0.1:1/postgres")
    result = subprocess.run(
        [sys.executable, str(lesson_dir(LESSON) / "main.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(
        "error: could not connect to the PostgreSQL server given by DATABASE_URL"
    )
    assert "127.0.0.1" in result.stderr and "docker compose up -d" in result.stderr
    assert result.stdout == ""


def test_garbage_database_url_gives_one_clear_message():
    result = subprocess.run(
        [sys.executable, str(lesson_dir(LESSON) / "main.py")],
        env=lesson_env("not a url"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")


def test_without_database_url_the_embedded_server_is_used(pg_server_url):
    if str(postgres.EMBEDDED_DATA_DIR) not in pg_server_url:
        pytest.skip("the test server is not the embedded one")
    env = {k: v for k, v in lesson_env("", "t01_embedded").items() if k != "DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "main.py"],
        cwd=lesson_dir(LESSON),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert str(postgres.EMBEDDED_DATA_DIR) in result.stdout.splitlines()[0]
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute("DROP DATABASE t01_embedded WITH (FORCE)")


def test_database_names_follow_the_lesson_directory():
    assert postgres.lesson_dbname("02-simple-task-queue") == "lesson_02"
    assert postgres.lesson_dbname("07-durable-tasks") == "lesson_07"
