-- migrate:up

-- nexus_append_atomic (issue 16, the hot path): `nexus_append_batch` for a multi-stream
-- append that must be all or nothing, in one statement outside an explicit transaction.
-- The batch function reports a refused stream (wrong version, reused event ids) as a
-- row and goes on, as the group-commit writer needs; here the first refusal raises
-- SQLSTATE NX409 with the refused row as JSON in DETAIL, so the statement, and with it
-- every stream's insert and the notification, rolls back. One round trip instead of
-- BEGIN / append / COMMIT, and the global append lock (pg_advisory_xact_lock) is no
-- longer held across the client's COMMIT round trip.
CREATE OR REPLACE FUNCTION nexus_append_atomic(
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
    r       record;
    refused jsonb;
BEGIN
    FOR r IN SELECT * FROM nexus_append_batch(p_stream_ids, p_expected, p_counts,
                                              p_event_ids, p_types, p_data, p_metadata) LOOP
        IF r.status NOT IN ('ok', 'duplicate')
           AND (refused IS NULL OR r.idx < (refused ->> 'idx')::int) THEN
            refused := jsonb_build_object('idx', r.idx, 'status', r.status, 'actual', r.actual);
        END IF;
        idx := r.idx; status := r.status; first_position := r.first_position;
        last_position := r.last_position; last_version := r.last_version; actual := r.actual;
        RETURN NEXT;
    END LOOP;
    IF refused IS NOT NULL THEN
        RAISE EXCEPTION 'nexus append refused' USING ERRCODE = 'NX409', DETAIL = refused::text;
    END IF;
END;
$$;


-- migrate:down
DROP FUNCTION IF EXISTS nexus_append_atomic(text[], bigint[], int[], uuid[], text[], text[], text[]);
