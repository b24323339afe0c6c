-- A task queue in one table, with per-key concurrency limits.
-- A task moves queued -> running -> completed or failed, and never back.
CREATE TYPE task_status AS ENUM ('queued', 'running', 'completed', 'failed');

-- One row per concurrency key: whatever a set of tasks must share (a tenant, a customer's API
-- quota, a single printer). Enqueue creates the row; the claim locks it while it counts and
-- claims the key's tasks, and that lock is what makes the limit hold across every worker.
CREATE TABLE concurrency_keys (
    key             text        PRIMARY KEY CHECK (key <> ''),
    -- At most this many of the key's tasks run at any moment, across all workers.
    max_running     integer     NOT NULL CHECK (max_running > 0),
    -- When a claim last took tasks of this key; NULL if none ever did. Claims serve the key
    -- that has waited longest first, so keys take turns (round robin).
    last_claimed_at timestamptz
);

CREATE TABLE tasks (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Which registered function runs the task, and its argument (any JSON value).
    name            text        NOT NULL,
    input           jsonb       NOT NULL,
    -- The key whose limit this task counts against; NULL: no limit.
    concurrency_key text        REFERENCES concurrency_keys (key),
    status          task_status NOT NULL DEFAULT 'queued',
    -- What the function returned (completed), or what it raised, "Type: message" (failed).
    output          jsonb,
    error           text,
    -- The name of the worker that claimed the task: for people reading this table.
    worker          text,
    -- All three from the database clock, never the application's: later lessons rely on one clock.
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    -- The table itself refuses a row that contradicts its status, whatever code wrote it.
    CONSTRAINT claimed_tasks_have_a_worker
        CHECK ((status = 'queued') = (worker IS NULL AND started_at IS NULL)),
    CONSTRAINT finished_tasks_have_a_finish_time
        CHECK ((status IN ('completed', 'failed')) = (finished_at IS NOT NULL)),
    CONSTRAINT failed_tasks_have_an_error
        CHECK ((status = 'failed') = (error IS NOT NULL))
);

-- The claim asks for "the oldest queued tasks of this key" (or of no key). This partial index
-- holds only the queued rows, by key and then id, so the claim reads the first entries of a small
-- index however many finished tasks pile up in the table. (The key comes first: a B-tree finds
-- `concurrency_key IS NULL` as well as `concurrency_key = 'acme'`.)
CREATE INDEX tasks_queued ON tasks (concurrency_key, id) WHERE status = 'queued';

-- The claim counts a key's running tasks; this index holds only the running ones.
CREATE INDEX tasks_running ON tasks (concurrency_key) WHERE status = 'running';
