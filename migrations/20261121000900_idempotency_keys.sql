-- migrate:up

-- Requests made with an `Idempotency-Key` (services/orchestrator/idempotency.py owns
-- this table). Not events: technical state that makes a retry return the first answer
-- instead of running (and spending) again. A record is claimed by exactly one request
-- (`running`, leased until `locked_until`) and then holds its response (`completed`).
-- Only a hash of the key is kept; records are purged after a day.
CREATE TABLE idempotency_keys (
    tenant        text        NOT NULL,
    route         text        NOT NULL,  -- method and path, e.g. "POST /v1/chat/completions"
    key_hash      text        NOT NULL,  -- sha256 of the Idempotency-Key
    request_hash  text        NOT NULL,  -- sha256 of what the request asked (body, session)
    state         text        NOT NULL,  -- 'running' or 'completed'
    owner         uuid        NOT NULL,  -- the attempt holding a running record
    locked_until  timestamptz NOT NULL,  -- a running record past this was abandoned
    status        int,
    headers       jsonb,
    media_type    text,
    body          bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz,
    PRIMARY KEY (tenant, route, key_hash)
);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);

-- migrate:down
DROP TABLE idempotency_keys;
