-- migrate:up

-- nexus_append_batch: several appends (to any streams) in one statement, one lock,
-- one commit. EventStore coalesces concurrent append() calls of a process into one
-- call (group commit); a single append is a batch of one. Each append is checked on
-- its own and reported in its own row instead of raising, so one conflict does not
-- fail its neighbours:
--   status 'ok'        written at first_position..last_position, stream now at last_version
--   status 'duplicate' all its event ids were stored before in this stream (exact retry)
--   status 'conflict'  some event ids were stored before, or in another stream
--   status 'version'   wrong expected version; `actual` is the stream's version
-- p_expected[i]: NULL = any, 0 = new stream, n = last version must be n.
-- The ordering argument of nexus_append holds unchanged: the advisory lock is taken
-- before any position is assigned and held to commit (docs/ARCHITECTURE.md).
CREATE FUNCTION nexus_append_batch(
    p_stream_ids  text[],
    p_expected    bigint[],
    p_counts      int[],
    p_event_ids   uuid[],
    p_types       text[],
    p_data        text[],
    p_metadata    text[]
) RETURNS TABLE (idx int, status text, first_position bigint, last_position bigint,
                 last_version bigint, actual bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_offset   int := 0;
    v_n        int;
    v_ids      uuid[];
    v_existing int;
    v_current  bigint;
    v_now      timestamptz;
    v_first    bigint;
    v_last     bigint;
    v_wrote    boolean := false;
BEGIN
    PERFORM pg_advisory_xact_lock(7400001);
    v_now := clock_timestamp();
    FOR i IN 1 .. coalesce(array_length(p_stream_ids, 1), 0) LOOP
        v_n := p_counts[i];
        v_ids := p_event_ids[v_offset + 1 : v_offset + v_n];
        SELECT count(*) INTO v_existing FROM events WHERE event_id = ANY (v_ids);
        IF v_existing > 0 THEN
            IF v_existing = v_n AND NOT EXISTS (
                SELECT 1 FROM events WHERE event_id = ANY (v_ids) AND stream_id <> p_stream_ids[i]
            ) THEN
                RETURN QUERY SELECT i, 'duplicate'::text, min(e.position), max(e.position),
                                    max(e.stream_version), NULL::bigint
                             FROM events e WHERE e.event_id = ANY (v_ids);
            ELSE
                RETURN QUERY SELECT i, 'conflict'::text, NULL::bigint, NULL::bigint,
                                    NULL::bigint, v_existing::bigint;
            END IF;
        ELSE
            SELECT coalesce(max(stream_version), 0) INTO v_current
                FROM events WHERE stream_id = p_stream_ids[i];
            IF p_expected[i] IS NOT NULL AND v_current <> p_expected[i] THEN
                RETURN QUERY SELECT i, 'version'::text, NULL::bigint, NULL::bigint,
                                    NULL::bigint, v_current;
            ELSE
                WITH inserted AS (
                    INSERT INTO events (event_id, stream_id, stream_version, type, data, metadata,
                                        recorded_at)
                    SELECT u.id, p_stream_ids[i], v_current + u.ord, u.typ, u.dat::jsonb,
                           u.meta::jsonb, v_now
                    FROM unnest(v_ids,
                                p_types[v_offset + 1 : v_offset + v_n],
                                p_data[v_offset + 1 : v_offset + v_n],
                                p_metadata[v_offset + 1 : v_offset + v_n]) WITH ORDINALITY
                         AS u(id, typ, dat, meta, ord)
                    ORDER BY u.ord
                    RETURNING position
                )
                SELECT min(position), max(position) INTO v_first, v_last FROM inserted;
                v_wrote := true;
                RETURN QUERY SELECT i, 'ok'::text, v_first, v_last, v_current + v_n, NULL::bigint;
            END IF;
        END IF;
        v_offset := v_offset + v_n;
    END LOOP;
    IF v_wrote THEN
        PERFORM pg_notify('nexus_events', v_last::text);
    END IF;
END;
$$;

DROP FUNCTION nexus_append(text, bigint, uuid[], text[], text[], text[]);

-- migrate:down
DROP FUNCTION nexus_append_batch(text[], bigint[], int[], uuid[], text[], text[], text[]);
