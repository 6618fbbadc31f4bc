-- migrate:up

-- Per-minute call/token counters for policy rate limits. Not events: short-lived
-- technical state, shared by every orchestrator process (increments are atomic).
CREATE TABLE rate_windows (
    scope         text        NOT NULL,  -- "tenant", "key" or "session"
    subject       text        NOT NULL,  -- tenant name, key id or session id
    window_start  timestamptz NOT NULL,
    calls         int         NOT NULL DEFAULT 0,
    tokens        bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, subject, window_start)
);
CREATE INDEX rate_windows_start_idx ON rate_windows (window_start);

-- migrate:down
DROP TABLE rate_windows;
