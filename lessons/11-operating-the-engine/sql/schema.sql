-- A task queue that survives its workers (attempts, leases, retries, scheduling), the event log
-- of its durable tasks, their children, and what operators did to them.
-- A task moves (scheduled ->) queued -> running -> completed, failed or cancelled. A failed
-- attempt sends it back to scheduled, to wait out a backoff, until it runs out of attempts.
-- scheduled: waiting for its run_at; queued: claimable now. Two statuses, not one status and a
-- time, so that the claim's index holds only tasks it can take, and never steps over others.
-- suspended: a durable task waiting for its children, holding no worker and no
-- lease. The last of the children it waits for to finish makes it queued again.
-- Lesson 09: a durable task asleep (ctx.sleep_for) is scheduled too, until it wakes up: a row
-- with a time, like a task enqueued for later. So is one waiting for an event with a timeout:
-- the event or the time wakes it, whichever comes first. Waiting for an event with no timeout,
-- it is suspended: only the event wakes it (awaiting_event).
CREATE TYPE task_status AS ENUM (
    'scheduled', 'queued', 'running', 'suspended', 'completed', 'failed', 'cancelled'
);

-- An attempt is never queued: it starts running when a worker claims the task. An attempt
-- that ends because its durable task waits for children is suspended, not failed.
CREATE TYPE attempt_status AS ENUM ('running', 'suspended', 'completed', 'failed', 'cancelled');

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

-- region: clock
-- Lesson 09: the engine's clock. When a task may run (its run_at: a task scheduled for later, a
-- retry's backoff, a durable sleep, an event's timeout) is on clock_now(): the database's
-- now() plus an offset that only tests move (AdvanceClock), so that a test of "sleep for a
-- day" takes milliseconds, and moves every worker's idea of the time at once. In production
-- the offset stays 0. Leases are not on this clock: they measure real seconds between
-- heartbeats, and a test that moved the clock a day ahead must not expire them all.
CREATE TABLE clock (
    -- One row: its primary key can only be true.
    only_row boolean  PRIMARY KEY DEFAULT true CHECK (only_row),
    -- Forward only: a clock that went back would wake a sleeper before the time it recorded.
    skew     interval NOT NULL DEFAULT '0' CHECK (skew >= '0')
);
INSERT INTO clock DEFAULT VALUES;

-- STABLE: within one statement it returns one time, as now() does.
CREATE FUNCTION clock_now() RETURNS timestamptz
LANGUAGE sql STABLE
RETURN now() + (SELECT skew FROM clock);
-- endregion

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
    -- The name of the worker that claimed the latest attempt: for people reading this table.
    worker          text,
    -- All from the database clock, never the application's: workers on several machines
    -- compare these times, and only the database's clock is the same for all of them.
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- When the latest attempt started; every attempt's times are in task_attempts.
    started_at      timestamptz,
    finished_at     timestamptz,
    -- Higher runs first (among a key's tasks, and among tasks without a key).
    priority        integer     NOT NULL DEFAULT 0,
    -- Not before this time: a task scheduled for later, or a retry waiting out its backoff.
    -- The claim makes scheduled tasks queued once it has passed.
    run_at          timestamptz NOT NULL DEFAULT clock_now(),
    -- The retry policy, stored with the task so that every worker, including one that finds
    -- the task abandoned by a dead worker, applies the same rule.
    max_attempts    integer     NOT NULL DEFAULT 3,
    backoff_base    interval    NOT NULL DEFAULT '1 second',
    backoff_cap     interval    NOT NULL DEFAULT '5 minutes',
    -- How long one attempt may run before it is failed.
    timeout         interval    NOT NULL DEFAULT '5 minutes',
    -- How many attempts have started; while running, the number of the current one. Every
    -- write a worker makes names the attempt it owns: this number is the fencing token.
    -- Chosen by the producer (an order id, a request id), so that an enqueue is safe to
    -- repeat: a second enqueue with the key finds this task instead of creating another.
    idempotency_key text,
    attempts        integer     NOT NULL DEFAULT 0,
    -- While running: the worker owns the task until then, and its heartbeats push it forward.
    lease_expires_at timestamptz,
    -- How many times an operator replayed the task (engine.replay). A replay starts
    -- the task over with an empty event log: this is the number of its current history.
    replays         integer     NOT NULL DEFAULT 0 CHECK (replays >= 0),
    -- The durable task that spawned this one (a child); NULL for a task a client enqueued.
    -- Deleting a parent (the retention query) deletes its children.
    parent_id       bigint      REFERENCES tasks (id) ON DELETE CASCADE,
    -- While suspended: the children it waits for. It is queued again once all have finished.
    waiting_for     bigint[],
    -- How many of its attempts ended suspended. Waiting is not failing: the retry rule counts
    -- the attempts that were not suspensions, `attempts - suspensions`, against max_attempts.
    suspensions     integer     NOT NULL DEFAULT 0,
    -- Lesson 09: while it waits for an event (scheduled until its timeout, as run_at, or
    -- suspended if it has none): the event's name. Sending the event queues it (SendEvent).
    awaiting_event  text,
    -- Lesson 10: the task this one is a fork of (engine.fork), and the fork point: how many of
    -- its events were copied into this task's history. NULL: not a fork. Retention may delete
    -- the original since: then forked_from becomes NULL, and forked_at still says where.
    forked_from     bigint      REFERENCES tasks (id) ON DELETE SET NULL,
    forked_at       integer     CHECK (forked_at >= 0),
    -- Lesson 11: what the producer said about the task, to find it by later: {"customer": "42",
    -- "order": "A-17"} (Temporal's search attributes, Hatchet's additional metadata). Strings
    -- only, so that `tasks list --tag customer=42` means one thing. Searched through tasks_tags.
    tags            jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(tags) = 'object'),
    -- The table itself refuses a row that contradicts its status, whatever code wrote it.
    CONSTRAINT claimed_tasks_have_a_worker
        CHECK ((attempts = 0) = (worker IS NULL AND started_at IS NULL)),
    CONSTRAINT finished_tasks_have_a_finish_time
        CHECK ((status IN ('completed', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    CONSTRAINT failed_tasks_have_an_error
        CHECK ((status = 'failed') = (error IS NOT NULL)),
    CONSTRAINT running_tasks_hold_a_lease
        CHECK ((status = 'running') = (lease_expires_at IS NOT NULL)),
    CONSTRAINT attempts_within_the_limit
        CHECK (attempts - suspensions BETWEEN 0 AND max_attempts
               AND (status <> 'running' OR attempts > 0)),
    CONSTRAINT sane_retry_policy
        CHECK (max_attempts >= 1 AND backoff_base > '0' AND backoff_cap >= backoff_base
               AND timeout > '0'),
    -- Lesson 09: suspended for its children, or for an event; never for both, nor for nothing.
    CONSTRAINT suspended_tasks_wait_for_children_or_an_event
        CHECK (status <> 'suspended' OR (waiting_for IS NULL) <> (awaiting_event IS NULL)),
    CONSTRAINT only_suspended_tasks_wait_for_children
        CHECK (waiting_for IS NULL OR status = 'suspended'),
    CONSTRAINT only_waiting_tasks_await_events
        CHECK (awaiting_event IS NULL OR status IN ('scheduled', 'suspended')),
    CONSTRAINT forks_know_their_fork_point
        CHECK (forked_from IS NULL OR forked_at IS NOT NULL),
    -- A child is created after its parent, so its id is larger. Every transaction that waits
    -- for the locks of several tasks takes them in id order: parents before children. That is
    -- what keeps cancels, completions and heartbeats from deadlocking (queries.sql, LockTasks).
    CONSTRAINT children_come_after_their_parent
        CHECK (parent_id < id)
);

-- One row per try: who ran it, when, and how it ended. A task that failed three times keeps
-- all three errors here, not only the last one.
CREATE TABLE task_attempts (
    -- Deleting a task (the retention query) deletes its attempts.
    task_id     bigint         NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    attempt     integer        NOT NULL,
    worker      text           NOT NULL,
    status      attempt_status NOT NULL DEFAULT 'running',
    error       text,
    started_at  timestamptz    NOT NULL,
    finished_at timestamptz,
    PRIMARY KEY (task_id, attempt),
    CONSTRAINT finished_attempts_have_a_finish_time
        CHECK ((status = 'running') = (finished_at IS NULL)),
    CONSTRAINT failed_attempts_have_an_error
        CHECK ((status = 'failed') = (error IS NOT NULL))
);

-- region: backoff
-- How long a task waits before attempt n + 1, after attempt n failed: exponential, capped, and
-- with jitter. The delay doubles with every attempt (base, 2 base, 4 base...) up to the cap;
-- then a random factor between 0.5 and 1 spreads out tasks that failed together (say, when a
-- service they all call went down), so that they do not all come back in the same instant.
-- A function, so that the two queries that fail attempts share one rule, and tests can call it.
CREATE FUNCTION retry_delay(attempt integer, base interval, cap interval) RETURNS interval
LANGUAGE sql VOLATILE
RETURN least(cap, base * power(2, least(attempt - 1, 30))) * (0.5 + random() / 2);
-- endregion

-- region: indexes
-- The claim asks for "the most urgent queued tasks of this key" (or of no key). This partial
-- index holds only the queued rows, in claim order within each key, so the claim reads the
-- first entries of a small index however many finished tasks pile up in the table. (The key
-- comes first: a B-tree finds `concurrency_key IS NULL` as well as `concurrency_key = 'acme'`.)
-- Tasks waiting for their run_at are not in it: they are `scheduled`, in an index of their own.
CREATE INDEX tasks_queued ON tasks (concurrency_key, priority DESC, id) WHERE status = 'queued';

-- The claim counts a key's running tasks; this index holds only the running ones.
CREATE INDEX tasks_running ON tasks (concurrency_key) WHERE status = 'running';

-- The claim also makes due scheduled tasks queued, and takes back the running tasks whose
-- lease ran out: two more small indexes, each holding only the rows one of them looks for.
CREATE INDEX tasks_scheduled ON tasks (run_at) WHERE status = 'scheduled';
CREATE INDEX tasks_leased ON tasks (lease_expires_at) WHERE status = 'running';

-- One task per idempotency key; tasks without one are not in the index at all.
CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- The retention query deletes finished tasks by age.
CREATE INDEX tasks_finished ON tasks (finished_at)
    WHERE status IN ('completed', 'failed', 'cancelled');
-- endregion

-- region: events
-- The event log. A durable function's steps, in the order it took them: what each returned, or
-- what it raised. A retry runs the function again from the top, and each step already in the
-- log returns its recorded result instead of running again. And what the function read from the clock or a random source (value_recorded),
-- and which patches it took (patch_applied). A replay checks that the code asks for the same
-- things, in the same order, as the log recorded.
-- Which children the function spawned (child_spawned), and, where it waited for
-- them, how each ended (child_completed, child_failed).
CREATE TYPE event_kind AS ENUM (
    'step_completed', 'step_failed', 'value_recorded', 'patch_applied',
    'child_spawned', 'child_completed', 'child_failed',
    -- Lesson 09: a durable sleep, and when it ends (sleep_started); a wait for an event, and
    -- until when (event_awaited), then how it ended: the event's payload, or the timeout.
    'sleep_started', 'event_awaited', 'event_received', 'event_timed_out'
);

CREATE TABLE task_events (
    task_id     bigint      NOT NULL,
    -- The history the event belongs to: the task's `replays` when it was recorded.
    -- A replay starts history n + 1, empty; history n stays here, read-only, for the post-mortem.
    replay      integer     NOT NULL,
    -- The event's place in the task's log: 1, 2, 3... Every run of the function numbers its
    -- calls from 1, so the n-th call of a retry meets the n-th event of the runs before it.
    seq         integer     NOT NULL,
    -- The attempt that recorded the event. With task_id, a reference to its task_attempts row.
    attempt     integer     NOT NULL,
    kind        event_kind  NOT NULL,
    -- What the function asked for: the step's name, the value's source ('now', 'random',
    -- 'uuid4') or the patch's name. With the kind and the place, the event's identity: a
    -- replay that asks for something else at this place is stopped (NonDeterminismError).
    name        text        NOT NULL,
    -- For a step whose function asked for it (ctx.step(..., hash_input=True)), the SHA-256 of
    -- its arguments as canonical JSON, and for every spawn, of the child's input: a replay
    -- that passes other arguments, or spawns the child with another input, is stopped too.
    -- NULL: not asked for.
    input_hash  text,
    -- What the step returned (step_completed), or what it raised, "Type: message" (step_failed),
    -- or the value that was read (value_recorded).
    -- What the child returned (child_completed), or its error (child_failed).
    -- When the sleep ends (sleep_started) or the wait times out (event_awaited; null: never), on
    -- the engine's clock; the event's payload (event_received).
    result      jsonb,
    error       text,
    -- The child task that a child_* event is about.
    child_id    bigint      REFERENCES tasks (id) ON DELETE CASCADE,
    -- How long the step ran, as the worker timed it; when the log received it, by the database
    -- clock. (The step's start is their difference: no second clock enters the table.)
    duration    interval    NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, replay, seq),
    -- Deleting a task (the retention query) deletes its attempts, and they their events.
    FOREIGN KEY (task_id, attempt) REFERENCES task_attempts (task_id, attempt) ON DELETE CASCADE,
    CONSTRAINT failed_steps_have_an_error
        CHECK ((kind IN ('step_failed', 'child_failed')) = (error IS NOT NULL)),
    CONSTRAINT only_completed_steps_and_values_have_a_result
        CHECK (kind IN ('step_completed', 'value_recorded', 'child_completed', 'sleep_started',
                        'event_awaited', 'event_received') OR result IS NULL),
    CONSTRAINT child_events_name_their_child
        CHECK ((kind IN ('child_spawned', 'child_completed', 'child_failed'))
               = (child_id IS NOT NULL)),
    CONSTRAINT values_have_a_result
        CHECK (kind <> 'value_recorded' OR result IS NOT NULL),
    CONSTRAINT sleeps_have_an_end
        CHECK (kind <> 'sleep_started' OR result IS NOT NULL),
    CONSTRAINT only_steps_and_spawns_have_an_input_hash
        CHECK (input_hash IS NULL OR kind IN ('step_completed', 'step_failed', 'child_spawned')),
    CONSTRAINT events_are_numbered_from_1
        CHECK (seq >= 1)
);

-- Append-only: history that could be rewritten would replay differently from how it ran. The
-- queries only ever INSERT; this trigger makes the table itself refuse an UPDATE, from any
-- client. (DELETE stays possible: the retention query removes whole finished tasks.)
CREATE FUNCTION refuse_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: UPDATE refused', TG_TABLE_NAME;
END
$$;

CREATE TRIGGER task_events_are_append_only
    BEFORE UPDATE ON task_events
    FOR EACH ROW EXECUTE FUNCTION refuse_update();
-- endregion

-- region: operator_actions
-- What operators did to tasks. A retry (engine.retry) runs a failed task again on the history
-- it has; a replay (engine.replay) runs it again from an empty history, and sets the old one
-- aside. Either way, this row says when, and what the task was like before: its status and
-- error, its attempts, and the history kept or set aside.
-- Lesson 11: and a queued task moved up or down the queue (reprioritize).
CREATE TYPE operator_action_kind AS ENUM ('retry', 'replay', 'reprioritize');

CREATE TABLE operator_actions (
    id       bigint               GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id  bigint               NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    action   operator_action_kind NOT NULL,
    -- The task as the operator found it.
    status   task_status          NOT NULL,
    error    text,
    attempts integer              NOT NULL,
    -- The history the task had (task_events.replay) and how many events it held: kept by a
    -- retry, set aside by a replay.
    replay   integer              NOT NULL,
    events   integer              NOT NULL,
    at       timestamptz          NOT NULL DEFAULT now()
);
-- endregion

-- region: children
-- A task's children: for the cancel that cancels them with their parent, the
-- retention query that deletes them with it, and people. Only children are in it.
CREATE INDEX tasks_children ON tasks (parent_id) WHERE parent_id IS NOT NULL;

-- The children still running (or waiting), for the sweep that cancels those whose parent has
-- finished (CloseOrphans): a small index, however many children have ended.
CREATE INDEX tasks_unfinished_children ON tasks (parent_id)
    WHERE parent_id IS NOT NULL AND finished_at IS NULL;

-- One spawn event per child. The child's row and its spawn event are written by one
-- transaction (durable.py), so there is no child without its event; and the table refuses a
-- second spawn event naming the same child, whatever code wrote it.
CREATE UNIQUE INDEX task_events_one_spawn_per_child ON task_events (child_id)
    WHERE kind = 'child_spawned';
-- endregion

-- region: notify
-- Lesson 08: workers LISTEN on the channel `task_ready`, and whatever makes work claimable
-- NOTIFYs it. Claimable now: a task enqueued, a parent woken by its last child, a task retried
-- or replayed by an operator, a scheduled task made queued. Claimable later: a task scheduled,
-- or a retry waiting out its backoff (the workers learn the new earliest run_at, and set their
-- alarm). And room under a key's limit: a task with a concurrency key that stops running.
--
-- A trigger, not pg_notify() in each statement: every path that changes a task's status is
-- covered, those of later lessons and an operator's hand-written UPDATE included. A statement
-- that forgot to notify would not fail; its task would wait for the next safety poll, seconds
-- later, and nobody would know why. The WHEN conditions are evaluated before the function is
-- called: the updates that make nothing claimable (a claim, a heartbeat, a completion without
-- a key) cost no call.
--
-- The payload is the task's name: a worker that does not run it goes back to sleep. Empty for
-- room under a key, which any name sharing the key may take. PostgreSQL delivers notifications
-- at commit, never before (a rolled-back enqueue wakes no one), and folds identical ones sent
-- by one transaction into one: enqueue_many() of 1,000 tasks of one name sends one.
CREATE FUNCTION notify_task_ready() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('task_ready', CASE
        WHEN NEW.status IN ('queued', 'scheduled') THEN NEW.name
        ELSE ''
    END);
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_notify_enqueued
    AFTER INSERT ON tasks
    FOR EACH ROW
    WHEN (NEW.status IN ('queued', 'scheduled'))
    EXECUTE FUNCTION notify_task_ready();

CREATE TRIGGER tasks_notify_ready
    AFTER UPDATE ON tasks
    FOR EACH ROW
    WHEN (
        (NEW.status IN ('queued', 'scheduled')
            AND (OLD.status <> NEW.status OR OLD.run_at <> NEW.run_at))
        OR (OLD.status = 'running' AND NEW.status <> 'running'
            AND NEW.concurrency_key IS NOT NULL)
    )
    EXECUTE FUNCTION notify_task_ready();
-- endregion

-- region: sent_events
-- Lesson 09: the events sent (engine.send_event), by name. An event is a fact ("expense claim 7
-- was approved"), and every wait for its name receives it: a wait that started before it was
-- sent, and one that starts after (a late waiter does not miss it). The first send of a name
-- is the event; sending it again changes nothing, and says so: a decision, once made, stays
-- made, and a sender that is retried cannot send it twice.
CREATE TABLE sent_events (
    name    text        PRIMARY KEY CHECK (name <> ''),
    -- Any JSON value, null included (a JSON null, not SQL's NULL).
    payload jsonb       NOT NULL,
    sent_at timestamptz NOT NULL DEFAULT now()
);

-- The send queues the tasks waiting for its name: an index of the waiting tasks only.
CREATE INDEX tasks_awaiting_event ON tasks (awaiting_event) WHERE awaiting_event IS NOT NULL;

-- Moving the clock (a test) may make sleepers due: every worker hears of it (an empty payload
-- wakes them all, lesson 08), claims, and sets its alarm again.
CREATE FUNCTION notify_clock_moved() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('task_ready', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER clock_moved
    AFTER UPDATE ON clock
    FOR EACH STATEMENT
    EXECUTE FUNCTION notify_clock_moved();
-- endregion

-- region: forks
-- Lesson 10: a task's forks, for its inspection (both know of each other).
CREATE INDEX tasks_forks ON tasks (forked_from) WHERE forked_from IS NOT NULL;
-- endregion

-- region: tags
-- Lesson 11: "the tasks tagged customer=42" (SearchTasks: tags @> '{"customer": "42"}'). A GIN
-- index holds every key-value pair of every task's tags; jsonb_path_ops makes it smaller and
-- faster than the default, and it serves exactly the one operator we use, containment (@>).
CREATE INDEX tasks_tags ON tasks USING gin (tags jsonb_path_ops);
-- endregion
