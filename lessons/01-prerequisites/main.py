"""Lesson 01: PostgreSQL, sqlc and the shape of every lesson.

Run it (after `source .venv/bin/activate` at the repository root):

    cd lessons/01-prerequisites && python main.py
    # or, from the repository root: python lessons/01-prerequisites/main.py

You will see where PostgreSQL runs, its version, and a few rows written and read back through
the typed `Querier` that sqlc generated from `sql/queries.sql`.
"""

from pathlib import Path

import psycopg
from db.queries import Querier
from hardway.postgres import describe, lesson_database

LESSON_DIR = Path(__file__).resolve().parent


def main() -> None:
    # A fresh `lesson_01` database, loaded from sql/schema.sql: every run starts clean.
    url = lesson_database(LESSON_DIR)
    print(describe(url))

    # region: querier
    with psycopg.connect(url, autocommit=True) as conn:
        queries = Querier(conn)
        print(f"PostgreSQL {queries.server_version()}")

        for body, tags in [
            ("PostgreSQL is the only moving part", ["postgres"]),
            ("sqlc checks every query against schema.sql", ["sqlc", "postgres"]),
            ("The generated Querier has one typed method per query", ["sqlc"]),
        ]:
            note = queries.create_note(body=body, tags=tags)
            assert note is not None  # a `:one` method returns None when no row comes back
            print(f"created note {note.id}: {note.body!r} tags={note.tags}")

        print("notes tagged 'sqlc':")
        for row in queries.notes_tagged(tag="sqlc"):
            print(f"  {row.id}: {row.body}")

        deleted = queries.delete_notes_tagged(tag="postgres")
        print(f"deleted {deleted} notes tagged 'postgres'")
    # endregion


if __name__ == "__main__":
    main()
