-- Several engines (README: "Running several engines"). Each partition of a scope (the streams'
-- base name, nats.stream) is held through a PostgreSQL advisory lock on the holder's own
-- session; this row carries its fencing token, bumped at each acquisition, which every save of
-- the partition's user states checks in its own transaction. Partition -1 is the whole,
-- unpartitioned stream pair.
CREATE TABLE IF NOT EXISTS engine_lease (
    scope       TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    token       BIGINT NOT NULL,
    holder      TEXT NOT NULL,
    acquired_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (scope, partition)
);

-- Engines by name (a member is alive while its session holds its member lock), and when each
-- last opened its lease session.
CREATE TABLE IF NOT EXISTS engine_member (
    scope   TEXT NOT NULL,
    member  TEXT NOT NULL,
    seen_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (scope, member)
);
