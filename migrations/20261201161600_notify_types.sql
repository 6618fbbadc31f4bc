-- migrate:up

-- nexus_append_batch, unchanged but for its notification (issue 16, the hot path): the
-- payload names the event types the batch wrote, "<last position> <Type>,<Type>,...",
-- so a follower (projection runner, the fleet's and the models' followers) wakes only
-- when an event it handles was appended, instead of on every append of every stream.
-- A payload of a bare position (the previous form, or too many types) wakes everyone.
CREATE OR REPLACE FUNCTION nexus_append_batch(
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
    v_types    text[] := '{}';
    v_payload  text;
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
                v_types := v_types || p_types[v_offset + 1 : v_offset + v_n];
                RETURN QUERY SELECT i, 'ok'::text, v_first, v_last, v_current + v_n, NULL::bigint;
            END IF;
        END IF;
        v_offset := v_offset + v_n;
    END LOOP;
    IF v_wrote THEN
        -- "<last position> <Type>,<Type>,...": a follower wakes only for the types it
        -- handles; a payload too long for NOTIFY names no types (everyone wakes)
        v_payload := v_last::text || ' ' || array_to_string(
            ARRAY(SELECT DISTINCT t FROM unnest(v_types) AS t ORDER BY t), ',');
        IF length(v_payload) > 7900 THEN
            v_payload := v_last::text;
        END IF;
        PERFORM pg_notify('nexus_events', v_payload);
    END IF;
END;
$$;


-- migrate:down
CREATE OR REPLACE FUNCTION nexus_append_batch(
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

