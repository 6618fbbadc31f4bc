-- migrate:up

-- nexus_append_atomic_at, set-based (issue 16, the hot path): a call's settle appends 7
-- events on 4 streams in one statement, the biggest statement of a call. The previous
-- form ran per stream a duplicate check, a version read, an insert and a row of three
-- nested PL/pgSQL functions, then read each stream's last event back for `recorded_at`:
-- 17 statements. Now, when no event id is already stored and no stream is named twice
-- (every first try), it is one duplicate check, one version read for every stream, one
-- insert for every event and the notification. A retry (an event id already stored:
-- 'duplicate', or reused: 'conflict') or a stream named twice takes the previous form,
-- unchanged, below. Same rows, same refusal (NX409, the lowest refused stream in
-- DETAIL), same notification payload, same positions: the events are inserted in their
-- order under the append lock.
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
    r          record;
    v_streams  int := coalesce(cardinality(p_stream_ids), 0);
    v_current  bigint[];
    v_sids     text[] := '{}';
    v_versions bigint[] := '{}';
    v_pos      bigint[];
    v_offset   int := 0;
    v_now      timestamptz;
    v_payload  text;
BEGIN
    PERFORM pg_advisory_xact_lock(7400001);
    IF v_streams <> (SELECT count(DISTINCT s) FROM unnest(p_stream_ids) AS s)
       OR EXISTS (SELECT 1 FROM events e WHERE e.event_id = ANY (p_event_ids)) THEN
        -- the previous form: per stream, duplicates and conflicts reported as rows
        FOR r IN SELECT * FROM nexus_append_atomic(p_stream_ids, p_expected, p_counts,
                                                   p_event_ids, p_types, p_data, p_metadata) LOOP
            idx := r.idx; status := r.status; first_position := r.first_position;
            last_position := r.last_position; last_version := r.last_version;
            actual := r.actual; recorded_at := NULL;
            IF r.last_position IS NOT NULL THEN
                SELECT e.recorded_at INTO recorded_at FROM events e
                    WHERE e.position = r.last_position;
            END IF;
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;
    SELECT array_agg(coalesce((SELECT max(e.stream_version) FROM events e
                               WHERE e.stream_id = s.sid), 0) ORDER BY s.i)
        INTO v_current FROM unnest(p_stream_ids) WITH ORDINALITY AS s(sid, i);
    FOR i IN 1 .. v_streams LOOP
        IF p_expected[i] IS NOT NULL AND v_current[i] <> p_expected[i] THEN
            RAISE EXCEPTION 'nexus append refused' USING ERRCODE = 'NX409',
                DETAIL = jsonb_build_object('idx', i, 'status', 'version',
                                            'actual', v_current[i])::text;
        END IF;
        FOR k IN 1 .. p_counts[i] LOOP
            v_sids := v_sids || p_stream_ids[i];
            v_versions := v_versions || (v_current[i] + k);
        END LOOP;
    END LOOP;
    v_now := clock_timestamp();
    IF cardinality(p_event_ids) > 0 THEN
        WITH inserted AS (
            INSERT INTO events (event_id, stream_id, stream_version, type, data, metadata,
                                recorded_at)
            SELECT u.id, u.sid, u.ver, u.typ, u.dat::jsonb, u.meta::jsonb, v_now
            FROM unnest(p_event_ids, v_sids, v_versions, p_types, p_data, p_metadata)
                 WITH ORDINALITY AS u(id, sid, ver, typ, dat, meta, ord)
            ORDER BY u.ord
            RETURNING events.position
        )
        SELECT array_agg(position ORDER BY position) INTO v_pos FROM inserted;
    END IF;
    FOR i IN 1 .. v_streams LOOP
        idx := i; status := 'ok'; actual := NULL;
        last_version := v_current[i] + p_counts[i];
        IF p_counts[i] > 0 THEN
            first_position := v_pos[v_offset + 1];
            last_position := v_pos[v_offset + p_counts[i]];
            recorded_at := v_now;
        ELSE
            first_position := NULL; last_position := NULL; recorded_at := NULL;
        END IF;
        v_offset := v_offset + p_counts[i];
        RETURN NEXT;
    END LOOP;
    IF cardinality(v_pos) > 0 THEN
        -- as nexus_append_batch: "<last position> <Type>,<Type>,...", or the bare position
        v_payload := v_pos[cardinality(v_pos)]::text || ' ' || array_to_string(
            ARRAY(SELECT DISTINCT t FROM unnest(p_types) AS t ORDER BY t), ',');
        IF length(v_payload) > 7900 THEN
            v_payload := v_pos[cardinality(v_pos)]::text;
        END IF;
        PERFORM pg_notify('nexus_events', v_payload);
    END IF;
END;
$$;


-- migrate:down
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
