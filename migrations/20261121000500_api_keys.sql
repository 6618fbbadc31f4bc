-- migrate:up

-- Read model of the `api_keys` projection: who may call the API. Only SHA-256 hashes.
CREATE TABLE api_keys (
    key_id      text PRIMARY KEY,
    tenant      text        NOT NULL,
    name        text        NOT NULL,
    role        text        NOT NULL,
    key_hash    text        NOT NULL,
    created_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);
CREATE INDEX api_keys_tenant_idx ON api_keys (tenant, created_at);

-- Sessions' audit log is every event correlated with the session.
CREATE INDEX events_correlation_idx ON events ((metadata ->> 'correlation_id'), position);

-- migrate:down
DROP INDEX events_correlation_idx;
DROP TABLE api_keys;
