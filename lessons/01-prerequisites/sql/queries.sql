-- name: ServerVersion :one
-- The version of the PostgreSQL server we are talking to.
SELECT current_setting('server_version')::text AS server_version;

-- name: CreateNote :one
-- Store a note and return the whole row, with the id and timestamp the database chose.
INSERT INTO notes (body, tags)
VALUES (sqlc.arg(body), sqlc.arg(tags))
RETURNING *;

-- name: NotesTagged :many
-- Every note carrying a tag, oldest first.
SELECT id, body, created_at
FROM notes
WHERE sqlc.arg(tag)::text = ANY (tags)
ORDER BY id;

-- name: DeleteNotesTagged :execrows
-- Delete every note carrying a tag; returns how many went.
DELETE FROM notes
WHERE sqlc.arg(tag)::text = ANY (tags);
