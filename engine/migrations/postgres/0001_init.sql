-- Per-user sync state: the canonical user with field stamps, tombstone, and per side what it
-- holds (JSON, see actors::sync::SyncState).
CREATE TABLE IF NOT EXISTS user_state (
    user_key   TEXT PRIMARY KEY NOT NULL,
    state      TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS dead_letters (
    id          BIGSERIAL PRIMARY KEY,
    subject     TEXT NOT NULL,
    raw         BYTEA NOT NULL,
    reason      TEXT NOT NULL,
    event_id    TEXT,
    sink        TEXT,
    attempts    INTEGER NOT NULL,
    last_error  TEXT,
    received_at BIGINT NOT NULL
);
