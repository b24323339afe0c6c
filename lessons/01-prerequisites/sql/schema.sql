-- One tiny table, just enough to see the whole loop
-- schema.sql -> sqlc -> typed Python -> PostgreSQL.
CREATE TABLE notes (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    body       text        NOT NULL,
    tags       text[]      NOT NULL DEFAULT '{}',
    -- Taken from the database clock, never the application's: later lessons rely on one clock.
    created_at timestamptz NOT NULL DEFAULT now()
);
