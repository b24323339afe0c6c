-- name: EnqueueTask :one
-- Put one task in the queue; the database picks its id.
INSERT INTO tasks (name, input)
VALUES (sqlc.arg(name), sqlc.arg(input))
RETURNING id;

-- region: claim
-- name: ClaimTask :one
-- Take the oldest queued task this worker can run and mark it running, in one statement.
UPDATE tasks
SET status = 'running', worker = sqlc.arg(worker), started_at = now()
WHERE id = (
    SELECT id
    FROM tasks
    WHERE status = 'queued' AND name = ANY (sqlc.arg(task_names)::text[])
    ORDER BY id
    LIMIT 1
    -- Lock the row we picked; rows other workers have locked are skipped, not waited for.
    FOR UPDATE SKIP LOCKED
)
RETURNING *;
-- endregion

-- name: CompleteTask :execrows
-- Record a running task's return value; 0 rows means it was not running and nothing changed.
UPDATE tasks
SET status = 'completed', output = sqlc.arg(output), finished_at = now()
WHERE id = sqlc.arg(id) AND status = 'running';

-- name: FailTask :execrows
-- Record why a running task failed; 0 rows means it was not running and nothing changed.
UPDATE tasks
SET status = 'failed', error = sqlc.arg(error), finished_at = now()
WHERE id = sqlc.arg(id) AND status = 'running';

-- name: GetTask :one
-- One task, whatever its status.
SELECT *
FROM tasks
WHERE id = sqlc.arg(id);

-- name: ListTasks :many
-- Every task, oldest first (fine for a demo; a real dashboard would page through them).
SELECT *
FROM tasks
ORDER BY id;

-- name: CountTasksByStatus :many
-- How many tasks are in each status; a status no task is in does not appear.
SELECT status, count(*) AS tasks
FROM tasks
GROUP BY status
ORDER BY status;
