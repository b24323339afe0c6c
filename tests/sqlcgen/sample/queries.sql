-- name: CreateTask :one
-- Insert a task and return the whole row.
INSERT INTO tasks (name, payload, tags, priority, timeout)
VALUES (@name, @payload, @tags, @priority, sqlc.narg(timeout))
RETURNING *;

-- name: GetTask :one
SELECT * FROM public.tasks WHERE id = $1;

-- name: ClaimTask :one
-- Claim the oldest queued task,
-- skipping tasks that other workers hold.
UPDATE tasks SET status = 'running'
WHERE id = (
    SELECT q.id FROM tasks q WHERE q.status = 'queued' AND q.priority >= sqlc.arg(min_priority)
    ORDER BY q.id LIMIT 1 FOR UPDATE SKIP LOCKED
)
RETURNING id, name, payload, status;

-- name: FinishTask :execrows
UPDATE tasks SET status = @status, result = sqlc.narg(result)
WHERE id = @id AND status = 'running';

-- name: ListTasksByStatus :many
SELECT * FROM tasks WHERE status = ANY(@statuses::task_status[]) ORDER BY id;

-- name: ListTaskNames :many
SELECT name FROM tasks ORDER BY id;

-- name: CountTasks :one
SELECT count(*) FROM tasks;

-- name: CountTasksByStatus :many
SELECT status, count(*) AS tasks FROM tasks GROUP BY status ORDER BY status;

-- name: GetTaskStatus :one
SELECT status FROM tasks WHERE id = $1;

-- name: GetTaskPayload :one
SELECT payload FROM tasks WHERE id = $1;

-- name: DeleteTask :exec
DELETE FROM tasks WHERE id = $1;

-- name: NotifyTask :exec
SELECT pg_notify(@channel::text, @message::text);

-- name: RecordAttempt :one
INSERT INTO task_attempts (
    task_id, attempt, succeeded, cost, score, ratio, output, worker, code, day, at_time,
    started_at, meta, scores
) VALUES (
    @task_id, @attempt, @succeeded, sqlc.narg(cost), @score, @ratio, @output, @worker, @code,
    @day, @at_time, @started_at, @meta, @scores
)
RETURNING *;

-- name: ListAttempts :many
-- Attempts with their task's status; the status is NULL for an attempt whose task is gone.
SELECT a.id, a.attempt, a.cost, t.status AS task_status, t.created_at
FROM task_attempts a
LEFT JOIN tasks t ON t.id = a.task_id
WHERE a.task_id = ANY(@task_ids::bigint[])
ORDER BY a.attempt;

-- name: ListAttemptTaskStatuses :many
SELECT t.status FROM task_attempts a LEFT JOIN tasks t ON t.id = a.task_id ORDER BY a.attempt;

-- name: Echo :one
-- Parameters straight back: an unnamed one ($1) and named ones.
SELECT $1::int AS n, @label::text AS label, @since::timestamptz AS since, @wait::interval AS wait;
