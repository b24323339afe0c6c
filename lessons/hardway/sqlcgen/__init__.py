"""The project's sqlc plugin, `sqlc-gen-psycopg`: psycopg 3 code from SQL queries.

See `plugin.py` for how sqlc runs it and what it generates.
"""
