-- migrate:up

-- The append functions' rows with `recorded_at` (issue 16, session creation): when the
-- stream's last event of the append was recorded (for a duplicate, the stored one), so
-- a caller that answers from the event it appended (a new session's `created_at`) needs
-- no read-back of the stream. New functions wrapping the existing ones, which stay as
-- they are for callers that do not need it (an older process during an upgrade). The
-- timestamp is read in a statement after the wrapped call: a statement sees the rows
-- the call inserted (a join in the calling statement would not, its snapshot is older).
CREATE OR REPLACE FUNCTION nexus_append_groups_at(
    p_groups      int[],
    p_stream_ids  text[],
    p_expected    bigint[],
    p_counts      int[],
    p_event_ids   uuid[],
    p_types       text[],
    p_data        text[],
    p_metadata    text[]
) RETURNS TABLE (idx int, status text, first_position bigint, last_position bigint,
                 last_version bigint, actual bigint, recorded_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT * FROM nexus_append_groups(p_groups, p_stream_ids, p_expected, p_counts,
                                               p_event_ids, p_types, p_data, p_metadata) LOOP
        idx := r.idx; status := r.status; first_position := r.first_position;
        last_position := r.last_position; last_version := r.last_version; actual := r.actual;
        recorded_at := NULL;
        IF r.last_position IS NOT NULL THEN
            SELECT e.recorded_at INTO recorded_at FROM events e WHERE e.position = r.last_position;
        END IF;
        RETURN NEXT;
    END LOOP;
END;
$$;

CREATE OR REPLACE FUNCTION nexus_append_atomic_at(
    p_stream_ids  text[],
    p_expected    bigint[],
    p_counts      int[],
    p_event_ids   uuid[],
    p_types       text[],
    p_data        text[],
    p_metadata    text[]
) RETURNS TABLE (idx int, status text, first_position bigint, last_position bigint,
                 last_version bigint, actual bigint, recorded_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    -- nexus_append_atomic raises NX409 on a refusal: the whole statement rolls back
    FOR r IN SELECT * FROM nexus_append_atomic(p_stream_ids, p_expected, p_counts,
                                               p_event_ids, p_types, p_data, p_metadata) LOOP
        idx := r.idx; status := r.status; first_position := r.first_position;
        last_position := r.last_position; last_version := r.last_version; actual := r.actual;
        recorded_at := NULL;
        IF r.last_position IS NOT NULL THEN
            SELECT e.recorded_at INTO recorded_at FROM events e WHERE e.position = r.last_position;
        END IF;
        RETURN NEXT;
    END LOOP;
END;
$$;


-- migrate:down
DROP FUNCTION IF EXISTS nexus_append_atomic_at(text[], bigint[], int[], uuid[], text[], text[], text[]);
DROP FUNCTION IF EXISTS nexus_append_groups_at(int[], text[], bigint[], int[], uuid[], text[], text[], text[]);
