-- region: enqueue
-- name: UpsertConcurrencyKey :exec
-- Create a key with its limit, or change an existing key's limit; an unchanged limit writes nothing.
WITH created AS (
    INSERT INTO concurrency_keys (key, max_running)
    SELECT sqlc.arg(key), sqlc.arg(max_running)
    -- Not even an attempt when the key exists: an INSERT that meets the key's row while a
    -- claim has just updated it (last_claimed_at) must wait for that claim to commit.
    WHERE NOT EXISTS (SELECT 1 FROM concurrency_keys WHERE key = sqlc.arg(key))
    ON CONFLICT (key) DO NOTHING
)
-- Not `ON CONFLICT DO UPDATE` either: that locks the row even when nothing changes. This
-- UPDATE matches no row, and so locks none, unless the limit really changes. (It cannot see a
-- row `created` just inserted: the whole statement reads one snapshot.)
UPDATE concurrency_keys AS k
SET max_running = sqlc.arg(max_running)
WHERE k.key = sqlc.arg(key) AND k.max_running <> sqlc.arg(max_running);

-- name: EnqueueTask :one
-- Put one task in the queue, with or without a concurrency key; the database picks its id.
INSERT INTO tasks (name, input, concurrency_key)
VALUES (sqlc.arg(name), sqlc.arg(input), sqlc.narg(concurrency_key))
RETURNING id;
-- endregion

-- region: lock_key
-- name: LockNextKey :one
-- Claim, statement 1: lock the key that has waited longest among those with work for us.
SELECT k.key
FROM concurrency_keys AS k
WHERE k.key <> ALL (sqlc.arg(tried)::text[])
    AND EXISTS (
        SELECT 1
        FROM tasks AS t
        WHERE t.concurrency_key = k.key
            AND t.status = 'queued'
            AND t.name = ANY (sqlc.arg(task_names)::text[])
    )
    -- Passes over keys that look full. Only a hint: this count may be stale; statement 2's is not.
    AND (
        SELECT count(*)
        FROM tasks AS t
        WHERE t.concurrency_key = k.key AND t.status = 'running'
    ) < k.max_running
-- Round robin: never-served keys first, then the one served longest ago.
ORDER BY k.last_claimed_at NULLS FIRST, k.key
LIMIT 1
-- A key another claimer holds is skipped, not waited for: we try the next one. NO KEY UPDATE
-- rather than UPDATE: it does not conflict with the KEY SHARE lock that the foreign key check
-- of a concurrent enqueue takes, so an enqueue and a claim do not wait for each other.
FOR NO KEY UPDATE OF k SKIP LOCKED;
-- endregion

-- region: claim_key
-- name: ClaimKeyTasks :many
-- Claim, statement 2, with the key locked: count its running tasks, claim up to its limit.
WITH capacity AS (
    SELECT k.max_running - (
        SELECT count(*)
        FROM tasks AS t
        WHERE t.concurrency_key = k.key AND t.status = 'running'
    ) AS free
    FROM concurrency_keys AS k
    WHERE k.key = sqlc.arg(key)
),
picked AS MATERIALIZED (
    SELECT id
    FROM tasks
    WHERE concurrency_key = sqlc.arg(key)
        AND status = 'queued'
        AND name = ANY (sqlc.arg(task_names)::text[])
    ORDER BY id
    -- greatest(0, ...): a limit lowered below what is running leaves nothing to claim.
    LIMIT greatest(0, least(sqlc.arg(max_tasks)::integer, (SELECT free FROM capacity)))
    FOR UPDATE SKIP LOCKED
),
-- The key goes to the back of the line, if it got anything.
turn_taken AS (
    UPDATE concurrency_keys
    SET last_claimed_at = clock_timestamp()
    WHERE key = sqlc.arg(key) AND EXISTS (SELECT 1 FROM picked)
)
-- clock_timestamp(), not now(): now() is when the transaction began, before it waited for
-- anything; the audit compares start and finish times across workers, and needs the real moment.
UPDATE tasks
SET status = 'running', worker = sqlc.arg(worker), started_at = clock_timestamp()
WHERE id IN (SELECT id FROM picked)
RETURNING *;
-- endregion

-- region: claim_unkeyed
-- name: ClaimUnkeyedTasks :many
-- Claim the oldest tasks without a key, up to max_tasks: no limit, no lock but their own rows.
WITH picked AS MATERIALIZED (
    SELECT id
    FROM tasks
    WHERE concurrency_key IS NULL
        AND status = 'queued'
        AND name = ANY (sqlc.arg(task_names)::text[])
    -- concurrency_key first, though it is NULL in every row here: the planner does not take
    -- `IS NULL` as fixing the column, so without it, it would sort all the unkeyed queued tasks
    -- for every claim, instead of reading the first few entries of tasks_queued in order.
    ORDER BY concurrency_key, id
    LIMIT sqlc.arg(max_tasks)::integer
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks
SET status = 'running', worker = sqlc.arg(worker), started_at = clock_timestamp()
WHERE id IN (SELECT id FROM picked)
RETURNING *;
-- endregion

-- name: QueuedTaskExists :one
-- Whether a task this worker could run is queued, claimable right now or not.
SELECT EXISTS (
    SELECT 1
    FROM tasks
    WHERE status = 'queued' AND name = ANY (sqlc.arg(task_names)::text[])
) AS queued;

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

-- region: audit
-- name: MostRunningPerKey :many
-- The audit: per key, the most of its tasks ever running at the same moment, from the table.
WITH changes AS (
    -- +1 when a task started, -1 when it finished; a task still running never ends.
    SELECT concurrency_key, started_at AS at, 1 AS change FROM tasks WHERE started_at IS NOT NULL
    UNION ALL
    SELECT concurrency_key, finished_at, -1 FROM tasks WHERE finished_at IS NOT NULL
),
running AS (
    -- A running total in time order. At equal times the -1 comes first: a task that starts
    -- the moment another finishes does not overlap it.
    SELECT
        concurrency_key,
        sum(change) OVER (
            PARTITION BY concurrency_key ORDER BY at, change ROWS UNBOUNDED PRECEDING
        ) AS running
    FROM changes
)
SELECT concurrency_key, max(running)::integer AS most_at_once
FROM running
GROUP BY concurrency_key
ORDER BY concurrency_key NULLS LAST;
-- endregion

-- name: MostRunningPerWorker :many
-- The same audit per worker: the most tasks one worker ever ran at once (never above its slots).
WITH changes AS (
    SELECT worker, started_at AS at, 1 AS change FROM tasks WHERE started_at IS NOT NULL
    UNION ALL
    SELECT worker, finished_at, -1 FROM tasks WHERE finished_at IS NOT NULL
),
running AS (
    SELECT
        worker,
        sum(change) OVER (PARTITION BY worker ORDER BY at, change ROWS UNBOUNDED PRECEDING)
            AS running
    FROM changes
)
SELECT worker, max(running)::integer AS most_at_once
FROM running
GROUP BY worker
ORDER BY worker;
