-- A task queue in one table.
-- A task moves queued -> running -> completed or failed, and never back.
CREATE TYPE task_status AS ENUM ('queued', 'running', 'completed', 'failed');

CREATE TABLE tasks (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Which registered function runs the task, and its argument (any JSON value).
    name        text        NOT NULL,
    input       jsonb       NOT NULL,
    status      task_status NOT NULL DEFAULT 'queued',
    -- What the function returned (completed), or what it raised, "Type: message" (failed).
    output      jsonb,
    error       text,
    -- The name of the worker that claimed the task: for people reading this table.
    worker      text,
    -- All three from the database clock, never the application's: later lessons rely on one clock.
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz,
    -- The table itself refuses a row that contradicts its status, whatever code wrote it.
    CONSTRAINT claimed_tasks_have_a_worker
        CHECK ((status = 'queued') = (worker IS NULL AND started_at IS NULL)),
    CONSTRAINT finished_tasks_have_a_finish_time
        CHECK ((status IN ('completed', 'failed')) = (finished_at IS NOT NULL)),
    CONSTRAINT failed_tasks_have_an_error
        CHECK ((status = 'failed') = (error IS NOT NULL))
);

-- The claim asks for "the oldest queued task". This partial index holds only the queued rows, in
-- id order, so the claim reads the first entries of a small index however many finished tasks
-- pile up in the table. (An index on (status, id) would work too, but would also carry every
-- finished row forever.)
CREATE INDEX tasks_queued ON tasks (id) WHERE status = 'queued';
