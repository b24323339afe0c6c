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
-- Put one task in the queue, with its options; the database picks its id, and its run_at.
-- No row: a task with this idempotency key exists already, and nothing was written.
INSERT INTO tasks (
    name, input, concurrency_key, idempotency_key, tags,
    status, priority, run_at, max_attempts, backoff_base, backoff_cap, timeout
)
SELECT
    sqlc.arg(name)::text, sqlc.arg(input)::jsonb, sqlc.narg(concurrency_key)::text,
    sqlc.narg(idempotency_key)::text, sqlc.arg(tags)::jsonb,
    -- Due now, or later: then it waits as `scheduled` until a claim makes it `queued`.
    CASE WHEN due.run_at > clock_now() THEN 'scheduled' ELSE 'queued' END::task_status,
    sqlc.arg(priority)::integer, due.run_at,
    sqlc.arg(max_attempts)::integer, sqlc.arg(backoff_base)::interval,
    sqlc.arg(backoff_cap)::interval, sqlc.arg(timeout)::interval
-- "In 2 seconds" means 2 seconds on the database's clock, the one the claim compares with
-- (lesson 09: the engine's clock, clock_now(), which tests can move).
FROM (
    SELECT coalesce(sqlc.narg(run_at)::timestamptz, clock_now() + sqlc.arg(delay)::interval) AS run_at
) AS due
-- The unique index on the key decides, even between two enqueues at the same instant: the
-- second waits for the first to commit, then inserts nothing.
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id;
-- endregion

-- name: GetTaskByIdempotencyKey :one
-- The task an earlier enqueue created with this idempotency key.
SELECT *
FROM tasks
WHERE idempotency_key = sqlc.arg(idempotency_key)::text;

-- region: enqueue_many
-- name: EnqueueTasks :many
-- Put many tasks of one name in the queue with one statement: one round trip, one commit.
INSERT INTO tasks (
    name, input, concurrency_key, tags,
    status, priority, run_at, max_attempts, backoff_base, backoff_cap, timeout
)
SELECT
    sqlc.arg(name)::text, batch.input, sqlc.narg(concurrency_key)::text, sqlc.arg(tags)::jsonb,
    CASE WHEN due.run_at > clock_now() THEN 'scheduled' ELSE 'queued' END::task_status,
    sqlc.arg(priority)::integer, due.run_at,
    sqlc.arg(max_attempts)::integer, sqlc.arg(backoff_base)::interval,
    sqlc.arg(backoff_cap)::interval, sqlc.arg(timeout)::interval
FROM (
    SELECT coalesce(sqlc.narg(run_at)::timestamptz, clock_now() + sqlc.arg(delay)::interval) AS run_at
) AS due,
    -- The inputs arrive as one JSON array; WITH ORDINALITY keeps their order, and so their ids.
    jsonb_array_elements(sqlc.arg(inputs)::jsonb) WITH ORDINALITY AS batch (input, n)
ORDER BY batch.n
RETURNING id;
-- endregion

-- region: promote
-- name: PromoteDueTasks :execrows
-- Make a batch of scheduled tasks whose run_at has come queued, that is, claimable.
-- Lesson 09: sleepers whose sleep is over, and waiters whose timeout has come, among them.
UPDATE tasks
SET status = 'queued', awaiting_event = NULL
WHERE id IN (
    SELECT id
    FROM tasks
    WHERE status = 'scheduled' AND run_at <= clock_now()
    ORDER BY run_at
    -- Bounded like the reclaim below; SKIP LOCKED, so that claimers never wait for each other.
    LIMIT sqlc.arg(max_tasks)
    FOR UPDATE SKIP LOCKED
);
-- endregion

-- region: reclaim
-- name: ReclaimExpiredLeases :many
-- Fail the current attempt of a few tasks whose lease ran out (their worker is presumed dead).
WITH expired AS (
    -- The retry rule, decided once for the UPDATE below, and the same as FailAttempt's: an
    -- expired lease is a failed attempt, so a task that kills its worker every time stops
    -- after max_attempts. Its tries are its attempts, except those that ended suspended:
    -- waiting for children is not failing.
    SELECT id, parent_id, attempts - suspensions AS tries,
        attempts - suspensions < max_attempts AS retry
    FROM tasks
    WHERE status = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    -- Bounded, so that a claim after a mass crash stays a short statement; the next claims
    -- take the rest. Locked and skipped like the claim: two workers never reclaim one task.
    LIMIT sqlc.arg(max_tasks)
    FOR UPDATE SKIP LOCKED
),
-- A child that fails for good here wakes its parent (WakeParents, in the same
-- transaction), which needs the parent's row locked. Skipped if someone else holds it, like the
-- rest: this statement never waits for a lock, so it cannot deadlock, whatever order it takes
-- them in. A child whose parent is busy is left for the next claim.
parent AS (
    SELECT id
    FROM tasks
    WHERE id IN (SELECT parent_id FROM expired)
    FOR NO KEY UPDATE SKIP LOCKED
),
task AS (
    UPDATE tasks AS t
    SET status = CASE WHEN expired.retry THEN 'scheduled' ELSE 'failed' END::task_status,
        run_at = CASE WHEN expired.retry
            THEN clock_now() + retry_delay(expired.tries, t.backoff_base, t.backoff_cap) ELSE t.run_at END,
        error = CASE WHEN expired.retry THEN NULL ELSE 'lease expired (worker presumed dead)' END,
        finished_at = CASE WHEN expired.retry THEN NULL ELSE now() END,
        lease_expires_at = NULL
    FROM expired
    WHERE t.id = expired.id
        AND (expired.parent_id IS NULL OR expired.parent_id IN (SELECT id FROM parent))
    RETURNING t.id, t.name, t.attempts, t.status, t.worker, t.parent_id
),
attempt AS (
    UPDATE task_attempts AS a
    SET status = 'failed', error = 'lease expired (worker presumed dead)', finished_at = now()
    FROM task
    WHERE a.task_id = task.id AND a.attempt = task.attempts
)
SELECT id, name, attempts, status, worker, parent_id
FROM task
ORDER BY id;
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
    SELECT id, attempts + 1 AS attempt
    FROM tasks
    WHERE concurrency_key = sqlc.arg(key)
        AND status = 'queued'
        AND name = ANY (sqlc.arg(task_names)::text[])
    ORDER BY priority DESC, id
    -- greatest(0, ...): a limit lowered below what is running leaves nothing to claim.
    LIMIT greatest(0, least(sqlc.arg(max_tasks)::integer, (SELECT free FROM capacity)))
    FOR UPDATE SKIP LOCKED
),
-- The key goes to the back of the line, if it got anything.
turn_taken AS (
    UPDATE concurrency_keys
    SET last_claimed_at = clock_timestamp()
    WHERE key = sqlc.arg(key) AND EXISTS (SELECT 1 FROM picked)
),
attempt AS (
    -- Each claimed task starts a new attempt, and the attempt's row is written by the same
    -- statement: a running task without one cannot exist.
    INSERT INTO task_attempts (task_id, attempt, worker, started_at)
    SELECT id, attempt, sqlc.arg(worker), clock_timestamp()
    FROM picked
)
-- clock_timestamp(), not now(): now() is when the transaction began, before it waited for
-- anything; the audit compares start and finish times across workers, and needs the real moment.
UPDATE tasks
SET status = 'running', worker = sqlc.arg(worker), started_at = clock_timestamp(),
    attempts = picked.attempt,
    -- The lease: the task is this worker's until then, and its heartbeats push it forward.
    lease_expires_at = clock_timestamp() + sqlc.arg(lease)::interval
FROM picked
WHERE tasks.id = picked.id
RETURNING tasks.*;
-- endregion

-- region: claim_unkeyed
-- name: ClaimUnkeyedTasks :many
-- Claim the most urgent tasks without a key, up to max_tasks: no limit, no lock but their own rows.
WITH picked AS MATERIALIZED (
    SELECT id, attempts + 1 AS attempt
    FROM tasks
    WHERE concurrency_key IS NULL
        AND status = 'queued'
        AND name = ANY (sqlc.arg(task_names)::text[])
    -- concurrency_key first, though it is NULL in every row here: the planner does not take
    -- `IS NULL` as fixing the column, so without it, it would sort all the unkeyed queued tasks
    -- for every claim, instead of reading the first few entries of tasks_queued in order.
    ORDER BY concurrency_key, priority DESC, id
    LIMIT sqlc.arg(max_tasks)::integer
    FOR UPDATE SKIP LOCKED
),
attempt AS (
    INSERT INTO task_attempts (task_id, attempt, worker, started_at)
    SELECT id, attempt, sqlc.arg(worker), clock_timestamp()
    FROM picked
)
UPDATE tasks
SET status = 'running', worker = sqlc.arg(worker), started_at = clock_timestamp(),
    attempts = picked.attempt, lease_expires_at = clock_timestamp() + sqlc.arg(lease)::interval
FROM picked
WHERE tasks.id = picked.id
RETURNING tasks.*;
-- endregion

-- region: record_and_claim
-- name: RecordAndClaimUnkeyed :many
-- Lesson 08: a turn in one statement: record the riders' outputs, claim unkeyed tasks.
-- The common case (no keyed work waiting, no chores due) in one round trip and one commit,
-- where the full claim takes five round trips. Returns the claimed tasks (running) and the
-- recorded ones (completed): a rider missing from them was refused by the fence.
WITH done AS (
    SELECT
        (d ->> 'id')::bigint AS id,
        (d ->> 'attempt')::integer AS attempt,
        nullif(d -> 'output', 'null') AS output
    FROM jsonb_array_elements(sqlc.arg(done)::jsonb) AS d
),
recorded AS (
    -- CompleteTasks, fence and all.
    UPDATE tasks
    SET status = 'completed', output = done.output, finished_at = now(), lease_expires_at = NULL
    FROM done
    WHERE tasks.id = done.id AND tasks.attempts = done.attempt AND tasks.status = 'running'
    RETURNING tasks.*
),
recorded_attempt AS (
    UPDATE task_attempts AS a
    SET status = 'completed', finished_at = now()
    FROM recorded
    WHERE a.task_id = recorded.id AND a.attempt = recorded.attempts
),
picked AS MATERIALIZED (
    -- ClaimUnkeyedTasks, unless a task with a key waits: keys come first (ClaimKeyTasks), so
    -- then this claims nothing, and the worker makes the full claim, which serves the keys,
    -- then these. (A key at its limit also sends the worker there: the fast way is for
    -- queues without keys.)
    SELECT id, attempts + 1 AS attempt
    FROM tasks
    WHERE concurrency_key IS NULL
        AND status = 'queued'
        AND name = ANY (sqlc.arg(task_names)::text[])
        AND NOT EXISTS (
            SELECT 1
            FROM tasks AS keyed
            WHERE keyed.concurrency_key IS NOT NULL
                AND keyed.status = 'queued'
                AND keyed.name = ANY (sqlc.arg(task_names)::text[])
        )
    ORDER BY concurrency_key, priority DESC, id
    LIMIT sqlc.arg(max_tasks)::integer
    FOR UPDATE SKIP LOCKED
),
attempt AS (
    INSERT INTO task_attempts (task_id, attempt, worker, started_at)
    SELECT id, attempt, sqlc.arg(worker), clock_timestamp()
    FROM picked
),
claimed AS (
    UPDATE tasks
    SET status = 'running', worker = sqlc.arg(worker), started_at = clock_timestamp(),
        attempts = picked.attempt,
        lease_expires_at = clock_timestamp() + sqlc.arg(lease)::interval
    FROM picked
    WHERE tasks.id = picked.id
    RETURNING tasks.*
)
SELECT * FROM claimed
UNION ALL
SELECT * FROM recorded;
-- endregion

-- name: QueuedTaskExists :one
-- Whether a task this worker could run is queued or scheduled, claimable right now or not.
SELECT EXISTS (
    SELECT 1
    FROM tasks
    WHERE status IN ('scheduled', 'queued') AND name = ANY (sqlc.arg(task_names)::text[])
) AS queued;

-- region: next_due
-- name: NextDue :one
-- Lesson 08: seconds until something becomes claimable that no notification will announce.
-- The earliest run_at of a scheduled task this worker could run (a task scheduled for later, a
-- retry waiting out its backoff), or the earliest lease to run out (a worker that died). The
-- worker sets its alarm for then, instead of polling until then. Infinity: nothing is due.
-- Both read the first entry of a small partial index (tasks_scheduled, tasks_leased).
-- Lesson 09: a run_at is on the engine's clock, a lease on the real one.
SELECT coalesce(least(
    extract(epoch FROM (SELECT min(run_at) FROM tasks
        WHERE status = 'scheduled' AND name = ANY (sqlc.arg(task_names)::text[]))
        - (clock_timestamp() + (SELECT skew FROM clock))),
    extract(epoch FROM (SELECT min(lease_expires_at) FROM tasks WHERE status = 'running')
        - clock_timestamp())
)::float8, 'Infinity')::float8 AS seconds;
-- endregion

-- region: heartbeat
-- name: ExtendLeases :many
-- Heartbeat: push forward the leases of the attempts this worker still owns; returns their ids.
WITH held AS (
    -- Two arrays, zipped into (id, attempt) pairs: one statement for every task the worker holds.
    SELECT unnest(sqlc.arg(ids)::bigint[]) AS id, unnest(sqlc.arg(attempts)::integer[]) AS attempt
),
-- The rows are locked in id order, then updated. A worker may run a parent and its
-- children at once, and a cancel locks a parent, then its children (see LockTasks): in another
-- order, each could hold a row the other waits for.
locked AS (
    SELECT t.id
    FROM tasks AS t
    JOIN held ON t.id = held.id AND t.attempts = held.attempt
    WHERE t.status = 'running'
    ORDER BY t.id
    FOR NO KEY UPDATE OF t
)
UPDATE tasks AS t
SET lease_expires_at = now() + sqlc.arg(lease)::interval
FROM locked
WHERE t.id = locked.id AND t.status = 'running'
RETURNING t.id;
-- endregion

-- region: complete
-- name: CompleteTasks :many
-- Record the outputs of attempts this worker owns, all in one statement; returns the ids recorded.
WITH done AS (
    -- One JSON array of {"id", "attempt", "output"}: as many results as have finished, one
    -- round trip and one commit for all of them.
    SELECT
        (d ->> 'id')::bigint AS id,
        (d ->> 'attempt')::integer AS attempt,
        nullif(d -> 'output', 'null') AS output
    FROM jsonb_array_elements(sqlc.arg(done)::jsonb) AS d
),
task AS (
    UPDATE tasks
    SET status = 'completed', output = done.output, finished_at = now(), lease_expires_at = NULL
    FROM done
    -- The fence: this task, this attempt, still running. A worker whose lease was taken over
    -- names an attempt that is no longer the current one, and changes nothing: its id is
    -- missing from what this statement returns.
    WHERE tasks.id = done.id AND tasks.attempts = done.attempt AND tasks.status = 'running'
    RETURNING tasks.id, tasks.attempts
),
attempt AS (
    UPDATE task_attempts AS a
    SET status = 'completed', finished_at = now()
    FROM task
    WHERE a.task_id = task.id AND a.attempt = task.attempts
)
SELECT id
FROM task;
-- endregion

-- region: fail
-- name: FailAttempt :one
-- Record why the attempt this worker owns failed: retry after a backoff, or fail the task.
-- `retryable` false fails the task for good, whatever attempts it has left: the function
-- raised NonRetryableError, or it diverged from its history (it would diverge again, the same
-- way, on every retry).
WITH failing AS (
    -- The retry rule, decided once for the UPDATE below (ReclaimExpiredLeases has the same):
    -- attempts that ended suspended are not tries.
    SELECT id, attempts - suspensions AS tries,
        sqlc.arg(retryable)::boolean AND attempts - suspensions < max_attempts AS retry
    FROM tasks
    WHERE tasks.id = sqlc.arg(id) AND tasks.attempts = sqlc.arg(attempt) AND status = 'running'
    FOR NO KEY UPDATE
),
task AS (
    UPDATE tasks AS t
    SET status = CASE WHEN failing.retry THEN 'scheduled' ELSE 'failed' END::task_status,
        run_at = CASE WHEN failing.retry
            THEN clock_now() + retry_delay(failing.tries, t.backoff_base, t.backoff_cap) ELSE t.run_at END,
        error = CASE WHEN failing.retry THEN NULL ELSE sqlc.arg(error)::text END,
        finished_at = CASE WHEN failing.retry THEN NULL ELSE now() END,
        lease_expires_at = NULL
    FROM failing
    WHERE t.id = failing.id
    RETURNING t.id, t.attempts, t.status, t.run_at
),
attempt AS (
    UPDATE task_attempts AS a
    SET status = 'failed', error = sqlc.arg(error)::text, finished_at = now()
    FROM task
    WHERE a.task_id = task.id AND a.attempt = task.attempts
)
SELECT status, run_at, (run_at - clock_now())::interval AS retry_in
FROM task;
-- endregion

-- region: cancel
-- name: CancelTask :one
-- Cancel a task that has not finished; returns the status it had. No row: it had finished.
WITH target AS (
    SELECT tasks.id, tasks.parent_id, tasks.status, tasks.attempts
    FROM tasks
    -- Suspended tasks too: they hold no worker, and will never be woken.
    WHERE tasks.id = sqlc.arg(id) AND tasks.status IN ('scheduled', 'queued', 'running', 'suspended')
    FOR UPDATE
),
task AS (
    UPDATE tasks AS t
    SET status = 'cancelled', finished_at = now(), lease_expires_at = NULL, waiting_for = NULL,
        awaiting_event = NULL
    FROM target
    WHERE t.id = target.id
    RETURNING t.id, t.attempts
),
attempt AS (
    -- A running task's attempt ends here too: its worker's next heartbeat finds the lease gone.
    UPDATE task_attempts AS a
    SET status = 'cancelled', finished_at = now()
    FROM task
    WHERE a.task_id = task.id AND a.attempt = task.attempts AND a.status = 'running'
)
SELECT id, parent_id, status
FROM target;
-- endregion

-- region: close_children
-- name: CloseChildren :many
-- Cancel the unfinished children of those of these tasks that have finished; returns their ids.
-- The parent close policy: children never outlive their parent. A parent that completed,
-- failed for good or was cancelled will never wait for them again, and a replay of it spawns
-- new ones: children left running would only do work that goes nowhere, twice.
WITH child AS (
    SELECT c.id
    FROM tasks AS c
    JOIN tasks AS p ON p.id = c.parent_id
    WHERE c.parent_id = ANY (sqlc.arg(ids)::bigint[])
        AND p.finished_at IS NOT NULL AND c.finished_at IS NULL
    -- The locking rule: the callers hold the parents' rows already; children come after.
    ORDER BY c.id
    FOR NO KEY UPDATE OF c
),
task AS (
    UPDATE tasks AS t
    SET status = 'cancelled', finished_at = now(), lease_expires_at = NULL, waiting_for = NULL,
        -- Lesson 10: a durable child may be waiting for an event (lesson 09).
        awaiting_event = NULL
    FROM child
    WHERE t.id = child.id
    RETURNING t.id, t.attempts
),
attempt AS (
    UPDATE task_attempts AS a
    SET status = 'cancelled', finished_at = now()
    FROM task
    WHERE a.task_id = task.id AND a.attempt = task.attempts AND a.status = 'running'
)
SELECT id
FROM task
ORDER BY id;
-- endregion

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

-- name: ListAttempts :many
-- Every attempt of one task, first to last.
SELECT *
FROM task_attempts
WHERE task_id = sqlc.arg(task_id)
ORDER BY attempt;

-- name: CountTasksByStatus :many
-- How many tasks are in each status; a status no task is in does not appear.
SELECT status, count(*) AS tasks
FROM tasks
GROUP BY status
ORDER BY status;

-- region: cleanup
-- name: DeleteFinishedTasks :execrows
-- Retention: delete up to `batch` tasks (with their attempts) finished more than `older_than` ago.
DELETE FROM tasks
WHERE id IN (
    SELECT id
    FROM tasks
    WHERE status IN ('completed', 'failed', 'cancelled')
        AND finished_at < now() - sqlc.arg(older_than)::interval
        -- Children go with their parent (ON DELETE CASCADE), never on their own: a
        -- parent that has yet to record a child's outcome needs its row. And a parent goes
        -- only once all its children have finished.
        AND parent_id IS NULL
        AND NOT EXISTS (
            SELECT 1 FROM tasks AS c WHERE c.parent_id = tasks.id AND c.finished_at IS NULL
        )
    ORDER BY finished_at
    -- A bounded batch: a short transaction that holds few locks and leaves vacuum a little to
    -- do at a time, instead of one huge DELETE. The caller repeats until none is left.
    LIMIT sqlc.arg(batch)
    FOR UPDATE SKIP LOCKED
);
-- endregion

-- region: audit
-- name: MostRunningPerKey :many
-- The audit: per key, the most of its tasks ever running at the same moment, from the attempts.
WITH changes AS (
    -- +1 when an attempt started, -1 when it finished; an attempt still running never ends.
    -- Attempts, not tasks: a retried task runs several times, and tasks keeps only the latest.
    SELECT t.concurrency_key, a.started_at AS at, 1 AS change
    FROM task_attempts AS a JOIN tasks AS t ON t.id = a.task_id
    UNION ALL
    SELECT t.concurrency_key, a.finished_at, -1
    FROM task_attempts AS a JOIN tasks AS t ON t.id = a.task_id
    WHERE a.finished_at IS NOT NULL
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
    SELECT worker, started_at AS at, 1 AS change FROM task_attempts
    UNION ALL
    SELECT worker, finished_at, -1 FROM task_attempts WHERE finished_at IS NOT NULL
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

-- region: history
-- name: LoadHistory :many
-- The events the task's earlier attempts recorded, in order: what a retry replays.
SELECT *
FROM task_events
WHERE task_id = sqlc.arg(task_id)
    -- The task's current history only; the ones a replay set aside are not replayed.
    AND replay = (SELECT replays FROM tasks WHERE id = sqlc.arg(task_id))
    -- Only earlier attempts: a worker that lost its lease never replays what its successor did.
    AND attempt < sqlc.arg(attempt)
ORDER BY seq;
-- endregion

-- region: append
-- name: AppendEvent :one
-- Record one event of the attempt this worker owns; no row: it owns it no longer, nothing written.
WITH owner AS (
    SELECT id, replays
    FROM tasks
    -- The same fence as CompleteTasks, and the lease must not have run out: this task, this
    -- attempt, still running, still leased.
    WHERE id = sqlc.arg(task_id) AND attempts = sqlc.arg(attempt) AND status = 'running'
        AND lease_expires_at > now()
    -- Every statement that ends an attempt (reclaim, cancel, fail, complete, a timeout) first
    -- locks the task's row; so does this one. So an append and the end of its attempt happen
    -- one after the other, never interleaved: if the attempt ended first, this statement
    -- waits, re-reads the row, no longer matches, and inserts nothing.
    FOR SHARE
)
INSERT INTO task_events (task_id, replay, seq, attempt, kind, name, input_hash, result, error,
                         child_id, duration)
SELECT
    -- The history is the task's current one, as the database has it, not as the worker thinks.
    owner.id, owner.replays, sqlc.arg(seq), sqlc.arg(attempt), sqlc.arg(kind), sqlc.arg(name),
    sqlc.narg(input_hash), sqlc.narg(result), sqlc.narg(error), sqlc.narg(child_id),
    sqlc.arg(duration)
FROM owner
-- The result as the log holds it (jsonb: tuples became lists, keys sorted): the caller
-- returns this, so the first run of a step returns exactly what a replay will.
RETURNING seq, result;
-- endregion

-- name: GetEvent :one
-- The event at `seq` if this attempt appended it: after a connection broke, did the append land?
SELECT *
FROM task_events
WHERE task_id = sqlc.arg(task_id) AND seq = sqlc.arg(seq) AND attempt = sqlc.arg(attempt);

-- name: ListEventsFrom :many
-- The events this attempt appended from `seq` on: after a connection broke, did its appends land?
SELECT *
FROM task_events
WHERE task_id = sqlc.arg(task_id) AND attempt = sqlc.arg(attempt) AND seq >= sqlc.arg(seq)
ORDER BY seq;

-- name: ListEvents :many
-- A task's whole log, every history, first event to last: for people, the demo and the tests.
SELECT *
FROM task_events
WHERE task_id = sqlc.arg(task_id)
ORDER BY replay, seq;

-- region: requeue
-- name: RequeueTask :one
-- Operator: run a failed or cancelled task again, on its history (retry) or a new one (replay).
-- A completed task can be replayed too (run again from scratch, with new children). Children
-- are not requeued on their own: their outcome belongs to their parent's history.
-- (RECURSIVE: `unended`, below, walks the tree.)
WITH RECURSIVE target AS (
    SELECT tasks.id, tasks.status, tasks.error, tasks.attempts, tasks.suspensions, tasks.replays
    FROM tasks
    WHERE tasks.id = sqlc.arg(id)
        AND tasks.parent_id IS NULL
        AND (tasks.status IN ('failed', 'cancelled')
             OR (tasks.status = 'completed' AND sqlc.arg(action)::operator_action_kind = 'replay'))
    -- Two operators who retry the same task at once: the second waits, re-reads the row, finds
    -- it queued, and changes nothing. A zombie worker still running the task is fenced as
    -- before: its attempt is over, and the next claim starts attempt n + 1. The retention
    -- query skips a row locked here: what this statement requeues is never deleted.
    FOR UPDATE
),
task AS (
    UPDATE tasks AS t
    SET status = 'queued', run_at = clock_now(), output = NULL, error = NULL, finished_at = NULL,
        -- `more_attempts` more tries (the attempts that did not end suspended) than it had.
        max_attempts = t.attempts - t.suspensions + sqlc.arg(more_attempts)::integer,
        -- The one difference between the two actions: a replay starts a new, empty history.
        replays = t.replays
            + CASE sqlc.arg(action)::operator_action_kind WHEN 'replay' THEN 1 ELSE 0 END
    FROM target
    WHERE t.id = target.id
),
-- A retry goes on from the history the task has, which may be waiting for children that were
-- cancelled with it (by the cancel, or by the close policy when it failed): they run again,
-- with a try more if they had none left, so that the retry can go on. A child whose end the
-- history recorded already keeps it: the retry replays that. A replay spawns new children.
-- Lesson 10: down the tree: a durable child queued again goes on from its own history,
-- which may be waiting for children of its own, cancelled with it.
unended AS (
    SELECT c.id, c.replays
    FROM tasks AS c, target
    WHERE sqlc.arg(action)::operator_action_kind = 'retry'
        AND c.parent_id = target.id AND c.status = 'cancelled'
        AND NOT EXISTS (
            SELECT 1
            FROM task_events AS e
            WHERE e.task_id = target.id AND e.replay = target.replays AND e.child_id = c.id
                AND e.kind IN ('child_completed', 'child_failed')
        )
    UNION ALL
    SELECT c.id, c.replays
    FROM tasks AS c
    JOIN unended AS p ON c.parent_id = p.id
    WHERE c.status = 'cancelled'
        AND NOT EXISTS (
            SELECT 1
            FROM task_events AS e
            WHERE e.task_id = p.id AND e.replay = p.replays AND e.child_id = c.id
                AND e.kind IN ('child_completed', 'child_failed')
        )
),
children AS (
    UPDATE tasks AS c
    SET status = 'queued', run_at = clock_now(), finished_at = NULL,
        max_attempts = greatest(c.max_attempts, c.attempts - c.suspensions + 1)
    WHERE c.id IN (SELECT unended.id FROM unended)
)
-- The audit: what the task was like, and the history that was kept or set aside.
INSERT INTO operator_actions (task_id, action, status, error, attempts, replay, events)
SELECT
    target.id, sqlc.arg(action)::operator_action_kind, target.status, target.error,
    target.attempts, target.replays,
    (SELECT count(*) FROM task_events AS e
     WHERE e.task_id = target.id AND e.replay = target.replays)
FROM target
RETURNING *;
-- endregion

-- name: ListOperatorActions :many
-- What operators did to one task, first to last.
SELECT *
FROM operator_actions
WHERE task_id = sqlc.arg(task_id)
ORDER BY id;

-- region: spawn
-- name: SpawnTask :one
-- Create a child of the attempt this worker owns; no row: it owns it no longer.
WITH owner AS (
    -- AppendEvent's fence: this task, this attempt, still running, still leased.
    SELECT p.id
    FROM tasks AS p
    WHERE p.id = sqlc.arg(parent_id) AND p.attempts = sqlc.arg(attempt) AND p.status = 'running'
        AND p.lease_expires_at > now()
    FOR SHARE
)
INSERT INTO tasks (
    name, input, parent_id, priority, max_attempts, backoff_base, backoff_cap, timeout
)
SELECT
    sqlc.arg(name)::text, sqlc.arg(input)::jsonb, owner.id, sqlc.arg(priority)::integer,
    sqlc.arg(max_attempts)::integer, sqlc.arg(backoff_base)::interval,
    sqlc.arg(backoff_cap)::interval, sqlc.arg(timeout)::interval
FROM owner
RETURNING id;
-- endregion

-- region: outcomes
-- name: RecordChildOutcomes :many
-- The wait: if every child in the list has finished, append how each ended, in list order.
WITH owner AS (
    -- AppendEvent's fence, again.
    SELECT p.id, p.replays
    FROM tasks AS p
    WHERE p.id = sqlc.arg(task_id) AND p.attempts = sqlc.arg(attempt) AND p.status = 'running'
        AND p.lease_expires_at > now()
    FOR SHARE
),
child AS (
    SELECT c.id, c.name, c.status, c.output, c.error, c.created_at, c.finished_at, w.n
    FROM unnest(sqlc.arg(children)::bigint[]) WITH ORDINALITY AS w (id, n)
    JOIN tasks AS c ON c.id = w.id AND c.parent_id = sqlc.arg(task_id)
)
INSERT INTO task_events (
    task_id, replay, seq, attempt, kind, name, result, error, child_id, duration
)
SELECT
    owner.id, owner.replays, sqlc.arg(seq)::integer + child.n::integer - 1,
    sqlc.arg(attempt)::integer,
    CASE WHEN child.status = 'completed'
        THEN 'child_completed' ELSE 'child_failed' END::event_kind,
    child.name, child.output,
    CASE child.status WHEN 'failed' THEN child.error WHEN 'cancelled' THEN 'cancelled' END,
    -- How long the child took, from its spawn to its end: queueing and retries included.
    child.id, child.finished_at - child.created_at
FROM owner, child
-- All or nothing: while a child is unfinished, nothing is written, and the task suspends.
WHERE NOT EXISTS (SELECT 1 FROM child WHERE child.finished_at IS NULL)
ORDER BY child.n
-- As AppendEvent: what the log holds, so the first run sees exactly what a replay will.
RETURNING seq, kind, name, result, error, child_id;
-- endregion

-- region: suspend
-- name: LockRunningTask :one
-- Suspend, statement 1: lock the task's row, if this worker still owns the attempt.
SELECT t.id
FROM tasks AS t
WHERE t.id = sqlc.arg(id) AND t.attempts = sqlc.arg(attempt) AND t.status = 'running'
    AND t.lease_expires_at > now()
-- The lock a child's end takes on its parent's row too (LockTasks): one of them waits.
FOR NO KEY UPDATE;

-- name: SuspendTask :one
-- Suspend, statement 2: end the attempt as suspended, if some child in the list is unfinished.
WITH task AS (
    UPDATE tasks AS t
    SET status = 'suspended', waiting_for = sqlc.arg(children)::bigint[],
        suspensions = t.suspensions + 1, lease_expires_at = NULL
    WHERE t.id = sqlc.arg(id) AND t.attempts = sqlc.arg(attempt) AND t.status = 'running'
        -- A NEW statement, so a new snapshot, taken with the row locked. A child that ended
        -- before we got the lock is seen as ended: it locked this row too, and held the lock
        -- until it committed. A child that ends after waits for our commit, then finds this
        -- task suspended, and wakes it (WakeParents). Either way, no wake-up is lost.
        AND EXISTS (
            SELECT 1
            FROM tasks AS c
            WHERE c.id = ANY (sqlc.arg(children)::bigint[]) AND c.finished_at IS NULL
        )
    RETURNING t.id, t.attempts
),
attempt AS (
    UPDATE task_attempts AS a
    SET status = 'suspended', finished_at = now()
    FROM task
    WHERE a.task_id = task.id AND a.attempt = task.attempts
)
SELECT id
FROM task;
-- endregion

-- region: wake
-- name: LockTasks :many
-- Lock these tasks' rows, and the unfinished descendants of `families`, in id order, parents first:
-- before a child's end wakes its parent, and a parent's end cancels its children.
-- Lesson 10: descendants, not only children: a durable child has children of its own, and
-- the close policy cancels them too (CloseChildren, level by level). All locked first, in
-- one order, rather than level by level: a grandchild's id may be smaller than an uncle's.
WITH RECURSIVE descendant AS (
    SELECT c.id
    FROM tasks AS c
    WHERE c.parent_id = ANY (sqlc.arg(families)::bigint[]) AND c.finished_at IS NULL
    UNION ALL
    SELECT c.id
    FROM tasks AS c
    JOIN descendant AS d ON c.parent_id = d.id
    WHERE c.finished_at IS NULL
)
SELECT id
FROM tasks
WHERE id = ANY (sqlc.arg(ids)::bigint[])
    OR id IN (SELECT descendant.id FROM descendant)
-- The locking rule. A child's end locks the child and its parent; a cancel locks a parent and
-- its children; a heartbeat, every task its worker runs. Two transactions that lock two rows in
-- opposite orders can each wait for the other forever (a deadlock: PostgreSQL aborts one). So
-- every transaction that waits for several task locks takes them in id order, and a child's id
-- is larger than its parent's (constraint children_come_after_their_parent): parents first.
ORDER BY id
FOR NO KEY UPDATE;

-- name: WakeParents :many
-- Queue the suspended parents among these whose awaited children have all finished.
UPDATE tasks AS p
SET status = 'queued', waiting_for = NULL
WHERE p.id = ANY (sqlc.arg(ids)::bigint[]) AND p.status = 'suspended'
    -- Lesson 09: suspended for its children, not for an event.
    AND p.waiting_for IS NOT NULL
    -- A new statement, after LockTasks: its snapshot holds every child that ended before.
    AND NOT EXISTS (
        SELECT 1
        FROM tasks AS c
        WHERE c.id = ANY (p.waiting_for) AND c.finished_at IS NULL
    )
RETURNING p.id;
-- endregion

-- name: LockFamily :many
-- Cancel, statement 1: lock a task, its parent and its descendants, in id order (parents first).
WITH RECURSIVE descendant AS (
    SELECT c.id
    FROM tasks AS c
    WHERE c.parent_id = sqlc.arg(id)
    UNION ALL
    SELECT c.id
    FROM tasks AS c
    JOIN descendant AS d ON c.parent_id = d.id
)
SELECT f.id
FROM tasks AS f
WHERE f.id = sqlc.arg(id)
    OR f.id IN (SELECT descendant.id FROM descendant)
    OR f.id = (SELECT t.parent_id FROM tasks AS t WHERE t.id = sqlc.arg(id))
ORDER BY f.id
FOR NO KEY UPDATE;

-- name: ListChildren :many
-- A task's children, first spawned first: for people, the demo and the tests.
SELECT *
FROM tasks
WHERE parent_id = sqlc.arg(parent_id)::bigint
ORDER BY id;

-- region: deadline
-- name: AppendDeadline :one
-- Lesson 09: record when a sleep ends, or an event wait times out: computed once, on the engine's clock.
-- `at`, or `after` from now; neither: never (an event wait with no timeout), a JSON null.
WITH owner AS (
    -- AppendEvent's fence.
    SELECT id, replays
    FROM tasks
    WHERE id = sqlc.arg(task_id) AND attempts = sqlc.arg(attempt) AND status = 'running'
        AND lease_expires_at > now()
    FOR SHARE
)
INSERT INTO task_events (task_id, replay, seq, attempt, kind, name, result, duration)
SELECT
    owner.id, owner.replays, sqlc.arg(seq), sqlc.arg(attempt), sqlc.arg(kind), sqlc.arg(name),
    -- Recorded, and never computed again: a replay after a crash sleeps until the same moment,
    -- that is, only what is left of the sleep, or not at all.
    to_jsonb(coalesce(sqlc.narg(at)::timestamptz, clock_now() + sqlc.narg(after)::interval)),
    interval '0'
FROM owner
RETURNING seq, kind, result;
-- endregion

-- region: suspend_until
-- name: SuspendUntil :one
-- Lesson 09: end the attempt as suspended until `until`, unless that time has come.
-- The caller holds the task's row (LockRunningTask). With `awaiting_event`, the event's send
-- ends the suspension too (SendEvent), and `until` may be null: no timeout. No row: the time
-- has come, go on.
WITH task AS (
    UPDATE tasks AS t
    -- Scheduled: a row with a time, woken by the claim's promote when the time comes, and by
    -- the alarm of a worker (NextDue), like a task enqueued for later. Without a time (an
    -- event with no timeout), suspended: only the event wakes it. Either way it holds no
    -- worker, no slot, no lease and no connection, however long it waits.
    SET status = CASE WHEN sqlc.narg(until)::timestamptz IS NULL
            THEN 'suspended' ELSE 'scheduled' END::task_status,
        run_at = coalesce(sqlc.narg(until)::timestamptz, t.run_at),
        awaiting_event = sqlc.narg(awaiting_event), suspensions = t.suspensions + 1,
        lease_expires_at = NULL
    WHERE t.id = sqlc.arg(id) AND t.attempts = sqlc.arg(attempt) AND t.status = 'running'
        AND (sqlc.narg(until)::timestamptz IS NULL OR sqlc.narg(until)::timestamptz > clock_now())
    RETURNING t.id, t.attempts
),
attempt AS (
    UPDATE task_attempts AS a
    SET status = 'suspended', finished_at = now()
    FROM task
    WHERE a.task_id = task.id AND a.attempt = task.attempts
)
SELECT id
FROM task;
-- endregion

-- region: event_lock
-- name: LockEventName :exec
-- Lesson 09: lock an event's name, until the transaction ends: a send, and a wait about to suspend.
-- A lock on a name, not on a row: the event's row does not exist before it is sent, and a
-- wait must not miss a send that commits while it decides to suspend (see SendEvent). Two
-- names that hash alike only take turns, for nothing worse.
SELECT pg_advisory_xact_lock(hashtextextended(sqlc.arg(name)::text, 0));
-- endregion

-- region: outcome
-- name: RecordEventOutcome :one
-- Lesson 09: a wait's outcome, if it has one: the event if it was sent, else the timeout if it has come.
-- No row: neither yet (or this worker no longer owns the attempt: AppendEvent's fence).
WITH owner AS (
    SELECT id, replays
    FROM tasks
    WHERE id = sqlc.arg(task_id) AND attempts = sqlc.arg(attempt) AND status = 'running'
        AND lease_expires_at > now()
    FOR SHARE
),
sent AS (
    SELECT payload
    FROM sent_events
    WHERE name = sqlc.arg(name)::text
)
INSERT INTO task_events (task_id, replay, seq, attempt, kind, name, result, duration)
SELECT
    owner.id, owner.replays, sqlc.arg(seq)::integer, sqlc.arg(attempt)::integer,
    -- ONE outcome, chosen by this statement, from what it sees: an event that has been sent
    -- wins, even over a timeout that has come too (the worker may have been slow to look); else
    -- the timeout. The log holds one event at this place (its primary key), and the replays
    -- return it: an event sent later changes nothing for this wait.
    CASE WHEN EXISTS (SELECT 1 FROM sent)
        THEN 'event_received' ELSE 'event_timed_out' END::event_kind,
    sqlc.arg(name)::text, (SELECT payload FROM sent),
    -- How long the wait took, from its event_awaited, by the database's clock.
    now() - (
        SELECT e.recorded_at
        FROM task_events AS e
        WHERE e.task_id = owner.id AND e.replay = owner.replays
            AND e.seq = sqlc.arg(seq)::integer - 1
    )
FROM owner
WHERE EXISTS (SELECT 1 FROM sent) OR sqlc.narg(deadline)::timestamptz <= clock_now()
RETURNING seq, kind, result;
-- endregion

-- region: send
-- name: SendEvent :one
-- Lesson 09: send an event (the first of its name), and queue the tasks waiting for it. After LockEventName.
-- `sent` false: an event of this name was sent before; this one changed nothing.
WITH sent AS (
    INSERT INTO sent_events (name, payload)
    VALUES (sqlc.arg(name)::text, sqlc.arg(payload)::jsonb)
    -- The primary key decides between two sends at the same instant: the second waits for
    -- the first to commit, then inserts nothing.
    ON CONFLICT (name) DO NOTHING
    RETURNING name
),
woken AS (
    -- The waiters that suspended before we took the name's lock: they held it while they
    -- suspended, and committed before we got it, so this statement (which started after)
    -- sees them. A wait that comes after us takes the lock, then looks, and finds the event.
    UPDATE tasks AS t
    SET status = 'queued', run_at = clock_now(), awaiting_event = NULL
    FROM sent
    WHERE t.awaiting_event = sent.name AND t.status IN ('scheduled', 'suspended')
    RETURNING t.id
)
SELECT
    EXISTS (SELECT 1 FROM sent) AS sent,
    coalesce((SELECT array_agg(id ORDER BY id) FROM woken), '{}')::bigint[] AS woken;
-- endregion

-- name: GetSentEvent :one
-- The event sent under this name, if any.
SELECT *
FROM sent_events
WHERE name = sqlc.arg(name)::text;

-- name: AdvanceClock :one
-- Tests: move the engine's clock forward (clock_now()); every worker hears of it (clock_moved).
UPDATE clock
SET skew = skew + sqlc.arg(by)::interval
RETURNING (now() + skew)::timestamptz AS now;

-- region: fork
-- name: LockTaskToFork :one
-- Lesson 10: fork, statement 1: the task to fork, locked against an operator's retry meanwhile.
-- (FOR SHARE: RequeueTask's FOR UPDATE waits for our commit, and so does the retention's
-- DELETE; two forks of one task may run at once.)
SELECT *
FROM tasks
WHERE id = sqlc.arg(id)
FOR SHARE;

-- name: ForkTask :one
-- Lesson 10: fork, statement 2: the new task, queued, a copy of the original up to its attempt `attempts`.
-- Its attempts go on from there: the copied events name attempts 1..`attempts`, which are
-- copied too (CopyAttempts), and its first own attempt is the next one, so that LoadHistory
-- (events of earlier attempts) gives its run the copied history.
WITH copied AS (
    SELECT
        count(*) FILTER (WHERE status = 'suspended') AS suspensions,
        (array_agg(worker ORDER BY attempt DESC))[1] AS worker,
        max(started_at) AS started_at
    FROM task_attempts
    WHERE task_id = sqlc.arg(id) AND attempt <= sqlc.arg(attempts)::integer
)
INSERT INTO tasks (
    name, input, concurrency_key, priority, max_attempts, backoff_base, backoff_cap, timeout,
    attempts, suspensions, worker, started_at, forked_from, forked_at, tags
)
SELECT
    o.name, o.input, o.concurrency_key, o.priority,
    -- The tries it copied, and then as many as the original had.
    sqlc.arg(attempts)::integer - copied.suspensions::integer + o.max_attempts,
    o.backoff_base, o.backoff_cap, o.timeout,
    sqlc.arg(attempts)::integer, copied.suspensions::integer, copied.worker, copied.started_at,
    o.id, sqlc.arg(at)::integer, o.tags
FROM tasks AS o, copied
WHERE o.id = sqlc.arg(id)
RETURNING id;

-- name: CopyAttempts :exec
-- Lesson 10: fork, statement 3: the attempts that recorded the copied events, as they were.
INSERT INTO task_attempts (task_id, attempt, worker, status, error, started_at, finished_at)
SELECT sqlc.arg(fork_id), a.attempt, a.worker, a.status, a.error, a.started_at, a.finished_at
FROM task_attempts AS a
WHERE a.task_id = sqlc.arg(id) AND a.attempt <= sqlc.arg(attempts)::integer;

-- name: CopyChild :one
-- Lesson 10: fork, statement 4: the fork's own copy of a child the copied history spawned.
-- `finished`: the copied history recorded its outcome; the copy keeps it, and never runs.
-- Otherwise a new child, queued, with the same input: it runs (again), with the code of now,
-- and the fork waits for it as the original did.
INSERT INTO tasks (
    name, input, concurrency_key, priority, max_attempts, backoff_base, backoff_cap, timeout,
    parent_id, forked_from, forked_at,
    status, output, error, attempts, suspensions, worker, started_at, finished_at
)
SELECT
    c.name, c.input, c.concurrency_key, c.priority, c.max_attempts, c.backoff_base,
    c.backoff_cap, c.timeout, sqlc.arg(parent_id)::bigint, c.id, 0,
    CASE WHEN sqlc.arg(finished)::boolean THEN c.status ELSE 'queued' END::task_status,
    CASE WHEN sqlc.arg(finished)::boolean THEN c.output END,
    CASE WHEN sqlc.arg(finished)::boolean THEN c.error END,
    CASE WHEN sqlc.arg(finished)::boolean THEN c.attempts ELSE 0 END,
    CASE WHEN sqlc.arg(finished)::boolean THEN c.suspensions ELSE 0 END,
    CASE WHEN sqlc.arg(finished)::boolean THEN c.worker END,
    CASE WHEN sqlc.arg(finished)::boolean THEN c.started_at END,
    CASE WHEN sqlc.arg(finished)::boolean THEN c.finished_at END
FROM tasks AS c
WHERE c.id = sqlc.arg(id)
RETURNING id;

-- name: CopyEvents :execrows
-- Lesson 10: fork, statement 5: the original's first `at` events, as the fork's history 0.
-- Copied, not shared: the original's history stays as it is, and the fork's grows on its own.
-- A child event names the fork's copy of the child (`children` -> `copies`).
INSERT INTO task_events (
    task_id, replay, seq, attempt, kind, name, input_hash, result, error, child_id, duration,
    recorded_at
)
SELECT
    sqlc.arg(fork_id), 0, e.seq, e.attempt, e.kind, e.name, e.input_hash, e.result, e.error,
    (sqlc.arg(copies)::bigint[])[array_position(sqlc.arg(children)::bigint[], e.child_id)],
    e.duration, e.recorded_at
FROM task_events AS e
JOIN tasks AS o ON o.id = e.task_id AND e.replay = o.replays
WHERE e.task_id = sqlc.arg(id) AND e.seq <= sqlc.arg(at)::integer
ORDER BY e.seq;
-- endregion

-- name: ListForks :many
-- Lesson 10: the tasks forked from this one, first forked first.
SELECT *
FROM tasks
WHERE forked_from = sqlc.arg(id)
ORDER BY id;

-- name: LoadWholeHistory :many
-- Lesson 10: a task's current history, every event: what a fork copies, a diff shows and a check replays.
SELECT e.*
FROM task_events AS e
JOIN tasks AS t ON t.id = e.task_id AND e.replay = t.replays
WHERE e.task_id = sqlc.arg(task_id)
ORDER BY e.seq;

-- name: ListTasksToCheck :many
-- Lesson 10: the tasks check_histories.py replays: these names, created since, finished or not.
SELECT *
FROM tasks
WHERE name = ANY (sqlc.arg(task_names)::text[])
    AND (sqlc.arg(finished)::boolean OR finished_at IS NULL)
    AND (sqlc.narg(since)::interval IS NULL OR created_at >= now() - sqlc.narg(since)::interval)
ORDER BY id;

-- region: orphans
-- name: CloseOrphans :many
-- The close policy, as a chore: cancel a few unfinished children whose parent has finished.
-- A parent's end and its children's cancel commit together (worker.ending, engine.cancel),
-- except after the reclaim: a parent that failed for good there has its children closed in a
-- transaction of its own, and a worker that dies between the two leaves them running, for
-- nothing. This sweep finds them (lesson 10: at any depth, since a child it cancels is a
-- finished parent for the next sweep). It never waits (SKIP LOCKED), and holds the parent's row
-- too, so that an operator's retry of the parent (RequeueTask, FOR UPDATE) cannot commit in
-- between: a child whose parent is running again is not an orphan (the lock re-reads the
-- parent, and skips it).
WITH orphan AS (
    SELECT c.id
    FROM tasks AS c
    JOIN tasks AS p ON p.id = c.parent_id
    WHERE c.parent_id IS NOT NULL AND c.finished_at IS NULL AND p.finished_at IS NOT NULL
    ORDER BY c.id
    LIMIT sqlc.arg(max_tasks)
    FOR NO KEY UPDATE OF c SKIP LOCKED
    FOR SHARE OF p SKIP LOCKED
),
task AS (
    UPDATE tasks AS t
    SET status = 'cancelled', finished_at = now(), lease_expires_at = NULL, waiting_for = NULL,
        -- Lesson 10: a durable child may be waiting for an event (lesson 09).
        awaiting_event = NULL
    FROM orphan
    WHERE t.id = orphan.id
    RETURNING t.id, t.attempts
),
attempt AS (
    UPDATE task_attempts AS a
    SET status = 'cancelled', finished_at = now()
    FROM task
    WHERE a.task_id = task.id AND a.attempt = task.attempts AND a.status = 'running'
)
SELECT id
FROM task
ORDER BY id;
-- endregion

-- region: operate
-- name: SearchTasks :many
-- Lesson 11: the tasks an operator asks for (`tasks list`), newest first.
-- Every filter is optional: NULL matches everything, and so do the empty tags '{}'. Tags are
-- matched by containment, through the GIN index tasks_tags.
SELECT *
FROM tasks
WHERE (sqlc.narg(status)::task_status IS NULL OR status = sqlc.narg(status)::task_status)
    AND (sqlc.narg(name)::text IS NULL OR name = sqlc.narg(name)::text)
    AND (sqlc.narg(concurrency_key)::text IS NULL
         OR concurrency_key = sqlc.narg(concurrency_key)::text)
    AND (sqlc.narg(older_than)::interval IS NULL
         OR created_at < now() - sqlc.narg(older_than)::interval)
    AND tags @> sqlc.arg(tags)::jsonb
ORDER BY id DESC
LIMIT sqlc.arg(max_tasks);

-- name: ReprioritizeTask :one
-- Lesson 11: move a queued (or scheduled) task up or down its queue; no row: it is not waiting.
-- The claim reads `priority` from the row, so the next claim sees the new one. Audited like a
-- retry.
WITH target AS (
    SELECT tasks.id, tasks.status, tasks.error, tasks.attempts, tasks.replays
    FROM tasks
    WHERE tasks.id = sqlc.arg(id) AND tasks.status IN ('queued', 'scheduled')
    -- The claim locks the rows it takes: a task being claimed right now is either claimed
    -- first (and then no longer queued: no row here) or reprioritized first.
    FOR NO KEY UPDATE
),
recorded AS (
    INSERT INTO operator_actions (task_id, action, status, error, attempts, replay, events)
    SELECT
        target.id, 'reprioritize', target.status, target.error, target.attempts, target.replays,
        (SELECT count(*) FROM task_events AS e
         WHERE e.task_id = target.id AND e.replay = target.replays)
    FROM target
)
UPDATE tasks AS t
SET priority = sqlc.arg(priority)::integer
FROM target
WHERE t.id = target.id
RETURNING t.*;

-- name: QueueStats :many
-- Lesson 11: per task name, what waits, what runs, what ended lately (`queues stats`, /metrics).
-- Finished tasks older than an hour are not read at all: the unfinished ones, plus an hour of
-- finished ones (tasks_finished), however long the table has grown.
SELECT
    name,
    count(*) FILTER (WHERE status = 'queued') AS queued,
    count(*) FILTER (WHERE status = 'scheduled') AS scheduled,
    count(*) FILTER (WHERE status = 'running') AS running,
    count(*) FILTER (WHERE status = 'suspended') AS suspended,
    -- Running on a lease that ran out: its worker is presumed dead, and the next claim's
    -- chores will take it back. More than a few for long means no worker is claiming.
    count(*) FILTER (WHERE status = 'running' AND lease_expires_at < now()) AS leases_expired,
    count(*) FILTER (WHERE status = 'completed' AND finished_at > now() - interval '1 minute')
        AS completed_last_minute,
    count(*) FILTER (WHERE status = 'completed') AS completed_last_hour,
    count(*) FILTER (WHERE status = 'failed') AS failed_last_hour,
    -- How long the oldest queued task has waited since it became due: a queue nobody serves.
    coalesce(
        extract(epoch FROM clock_now() - min(run_at) FILTER (WHERE status = 'queued')), 0
    )::float8 AS oldest_queued_seconds
FROM tasks
WHERE status IN ('scheduled', 'queued', 'running', 'suspended')
    OR (status IN ('completed', 'failed', 'cancelled') AND finished_at > now() - interval '1 hour')
GROUP BY name
ORDER BY name;
-- endregion
