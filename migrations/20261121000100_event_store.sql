-- migrate:up

-- The event store: one append-only table. `position` is the global order readers
-- follow; (stream_id, stream_version) gives optimistic concurrency per stream.
CREATE TABLE events (
    position        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL,
    stream_id       text        NOT NULL,
    stream_version  bigint      NOT NULL CHECK (stream_version > 0),
    type            text        NOT NULL,
    data            jsonb       NOT NULL,
    metadata        jsonb       NOT NULL,
    recorded_at     timestamptz NOT NULL,
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version)
);

CREATE INDEX events_trace_id_idx ON events ((metadata ->> 'trace_id'));
CREATE INDEX events_type_idx ON events (type, position);

-- Projections record how far they got in the same transaction as their read model.
CREATE TABLE projection_checkpoints (
    name        text PRIMARY KEY,
    position    bigint      NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- nexus_append: the only way events get in.
--
-- Ordering: a reader following `position` must never skip an event that commits
-- late with a lower position. Identity values are handed out in call order but
-- transactions commit in any order, so we take a transaction-scoped advisory lock
-- before the position is assigned and hold it to commit: appends (of any stream)
-- commit one at a time, in position order, and a reader that has seen position N
-- can never later find a committed position below N. This is the approach of
-- pyeventsourcing's Postgres recorder (it locks the table); see docs/ARCHITECTURE.md.
--
-- p_expected_version: NULL = any version, 0 = the stream must not exist yet,
-- n = the stream's last version must be n.
-- Idempotency: if the events' ids are already stored (an exact retry), the stored
-- positions are returned with duplicate = true and nothing is written.
CREATE FUNCTION nexus_append(
    p_stream_id         text,
    p_expected_version  bigint,
    p_event_ids         uuid[],
    p_types             text[],
    p_data              text[],
    p_metadata          text[]
) RETURNS TABLE (out_position bigint, out_version bigint, out_duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_count    int := coalesce(array_length(p_event_ids, 1), 0);
    v_current  bigint;
    v_existing int;
    v_now      timestamptz;
BEGIN
    IF v_count = 0 THEN
        RAISE EXCEPTION 'nothing to append to stream %', p_stream_id USING ERRCODE = 'NX400';
    END IF;

    PERFORM pg_advisory_xact_lock(7400001);

    SELECT count(*) INTO v_existing FROM events WHERE event_id = ANY (p_event_ids);
    IF v_existing > 0 THEN
        IF v_existing = v_count AND NOT EXISTS (
            SELECT 1 FROM events WHERE event_id = ANY (p_event_ids) AND stream_id <> p_stream_id
        ) THEN
            RETURN QUERY
                SELECT e.position, e.stream_version, true FROM events e
                WHERE e.event_id = ANY (p_event_ids) ORDER BY e.position;
            RETURN;
        END IF;
        RAISE EXCEPTION 'event ids already used: % of % events in this append to stream % were stored before (a retry must resend the same events)',
            v_existing, v_count, p_stream_id
            USING ERRCODE = 'NX422';
    END IF;

    SELECT coalesce(max(stream_version), 0) INTO v_current FROM events WHERE stream_id = p_stream_id;
    IF p_expected_version IS NOT NULL AND v_current <> p_expected_version THEN
        RAISE EXCEPTION 'wrong expected version for stream %: expected %, current %',
            p_stream_id, p_expected_version, v_current
            USING ERRCODE = 'NX409', DETAIL = v_current::text;
    END IF;

    v_now := clock_timestamp();
    RETURN QUERY
        INSERT INTO events (event_id, stream_id, stream_version, type, data, metadata, recorded_at)
        SELECT u.id, p_stream_id, v_current + u.ord, u.typ, u.dat::jsonb, u.meta::jsonb, v_now
        FROM unnest(p_event_ids, p_types, p_data, p_metadata) WITH ORDINALITY
             AS u(id, typ, dat, meta, ord)
        ORDER BY u.ord
        RETURNING position, stream_version, false;

    PERFORM pg_notify('nexus_events', (SELECT max(position) FROM events)::text);
END;
$$;

-- migrate:down
DROP FUNCTION nexus_append(text, bigint, uuid[], text[], text[], text[]);
DROP TABLE projection_checkpoints;
DROP TABLE events;
