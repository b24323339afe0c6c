-- The sample schema for the plugin's tests: every supported type appears at least once.

CREATE TYPE task_status AS ENUM ('queued', 'running', 'succeeded', 'failed', 'needs-review');

CREATE TABLE tasks (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    status public.task_status NOT NULL DEFAULT 'queued',
    payload jsonb NOT NULL,
    result jsonb,
    tags text[] NOT NULL DEFAULT '{}',
    priority integer NOT NULL DEFAULT 0,
    timeout interval,
    created_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE tasks IS 'Work to be done.';

-- No foreign key to tasks: the tests keep attempts of a deleted task, to get NULLs from a join.
CREATE TABLE task_attempts (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    task_id bigint NOT NULL,
    attempt smallint NOT NULL,
    succeeded boolean NOT NULL,
    cost numeric(10, 2),
    score double precision,
    ratio real,
    output bytea,
    worker varchar(64),
    code char(3),
    day date,
    at_time time,
    started_at timestamp,
    meta json,
    scores bigint[]
);
