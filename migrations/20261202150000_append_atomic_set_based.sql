-- migrate:up

-- nexus_append_atomic_at, set-based (issue 16, the hot path): a call's settle appends 7
-- events on 4 streams in one statement, the biggest statement of a call. The previous
-- form ran per stream a duplicate check, a version read, an insert and a row of three
-- nested PL/pgSQL functions, then read each stream's last event back for `recorded_at`:
-- 17 statements. Now, on every first try (no event id stored already or given twice,
-- no stream named twice), it is one duplicate check, one version read for every
-- stream, one insert for every event and the notification. Anything else (a retry: an
-- event id already stored, 'duplicate', or reused, 'conflict'; a stream named twice; an
-- id given twice) takes the per-stream form (renamed, unchanged). Same rows, same refusal
-- (NX409, the lowest refused stream in DETAIL), same notification payload, same
-- positions: the events are inserted in their order under the append lock.

-- The per-stream forms stay, under new names, for what the set-based forms hand over.
ALTER FUNCTION nexus_append_atomic_at(text[], bigint[], int[], uuid[], text[], text[], text[]) RENAME TO nexus_append_atomic_per_stream_at;
ALTER FUNCTION nexus_append_groups_at(int[], text[], bigint[], int[], uuid[], text[], text[], text[]) RENAME TO nexus_append_groups_per_stream_at;

CREATE FUNCTION nexus_append_atomic_at(
    p_stream_ids  text[],
    p_expected    bigint[],
    p_counts      int[],
    p_event_ids   uuid[],
    p_types       text[],
    p_data        text[],
    p_metadata    text[]
) RETURNS TABLE (idx int, status text, first_position bigint, last_position bigint,
                 last_version bigint, actual bigint, recorded_at timestamptz)
LANGUAGE plpgsql
-- Every lookup here has its index (event_id, (stream_id, stream_version), position).
-- PL/pgSQL keeps a generic plan per connection, chosen on its first calls; on a young
-- events table that was a sequential scan, kept as the table grew (one per settle,
-- 0.5 ms at 1,000 events, measured). Index scans are never wrong here.
SET enable_seqscan = off
AS $$
DECLARE
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
       OR coalesce(cardinality(p_event_ids), 0) <> (SELECT count(DISTINCT u) FROM unnest(p_event_ids) AS u)
       OR EXISTS (SELECT 1 FROM events e WHERE e.event_id = ANY (p_event_ids)) THEN
        -- the per-stream form: duplicates and conflicts reported as rows
        RETURN QUERY SELECT * FROM nexus_append_atomic_per_stream_at(
            p_stream_ids, p_expected, p_counts, p_event_ids, p_types, p_data, p_metadata);
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

-- nexus_append_groups_at, set-based in the same way (the group-commit writer: appends
-- that overlap in time, one statement, each group all or nothing). The previous form
-- ran every group in a subtransaction and undid a refused one; now, on every first try
-- (no event id stored already or given twice), the versions are read once, each group
-- is decided before anything is written (a stream named in several groups, or twice in
-- one, sees the versions the groups before it leave), and the accepted groups' events
-- go in with one insert, in their order. A refused group writes nothing, so it leaves
-- no gap in the positions either. Anything else takes the per-stream form.
CREATE FUNCTION nexus_append_groups_at(
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
LANGUAGE plpgsql
-- Every lookup here has its index (event_id, (stream_id, stream_version), position).
-- PL/pgSQL keeps a generic plan per connection, chosen on its first calls; on a young
-- events table that was a sequential scan, kept as the table grew (one per settle,
-- 0.5 ms at 1,000 events, measured). Index scans are never wrong here.
SET enable_seqscan = off
AS $$
DECLARE
    v_total    int := coalesce(cardinality(p_stream_ids), 0);
    v_names    text[];    -- the distinct streams
    v_vers     bigint[];  -- their versions as the groups decided so far leave them
    v_saved    bigint[];
    v_offsets  int[] := '{}';
    v_off      int := 0;
    v_status   text[] := '{}';
    v_version  bigint[] := '{}';
    v_actual   bigint[] := '{}';
    v_ord      int[] := '{}';     -- the accepted events: their index in p_event_ids,
    v_sids     text[] := '{}';    -- stream
    v_evers    bigint[] := '{}';  -- and version
    v_pos      bigint[];
    g_start    int := 1;
    g_end      int;
    g_refused  boolean;
    k          int;
    m          int := 0;
    v_cur      bigint;
    v_now      timestamptz;
    v_payload  text;
BEGIN
    PERFORM pg_advisory_xact_lock(7400001);
    IF coalesce(cardinality(p_event_ids), 0) <> (SELECT count(DISTINCT u) FROM unnest(p_event_ids) AS u)
       OR EXISTS (SELECT 1 FROM events e WHERE e.event_id = ANY (p_event_ids)) THEN
        -- the per-stream form: a subtransaction per group, duplicates and conflicts as rows
        RETURN QUERY SELECT * FROM nexus_append_groups_per_stream_at(
            p_groups, p_stream_ids, p_expected, p_counts, p_event_ids, p_types, p_data,
            p_metadata);
        RETURN;
    END IF;
    SELECT array_agg(d.s), array_agg(coalesce((SELECT max(e.stream_version) FROM events e
                                               WHERE e.stream_id = d.s), 0))
        INTO v_names, v_vers FROM (SELECT DISTINCT s FROM unnest(p_stream_ids) AS s) AS d;
    FOR i IN 1 .. v_total LOOP
        v_offsets := v_offsets || v_off;
        v_off := v_off + p_counts[i];
        v_status := v_status || NULL::text;
        v_version := v_version || NULL::bigint;
        v_actual := v_actual || NULL::bigint;
    END LOOP;
    WHILE g_start <= v_total LOOP
        g_end := g_start;
        WHILE g_end < v_total AND p_groups[g_end + 1] = p_groups[g_start] LOOP
            g_end := g_end + 1;
        END LOOP;
        v_saved := v_vers;
        g_refused := false;
        FOR i IN g_start .. g_end LOOP
            k := array_position(v_names, p_stream_ids[i]);
            v_cur := v_vers[k];
            IF p_expected[i] IS NOT NULL AND v_cur <> p_expected[i] THEN
                v_status[i] := 'version';
                v_actual[i] := v_cur;
                g_refused := true;
            ELSE
                v_status[i] := 'ok';
                v_version[i] := v_cur + p_counts[i];
                v_vers[k] := v_cur + p_counts[i];
            END IF;
        END LOOP;
        IF g_refused THEN  -- nothing of the group is written; the others say so
            v_vers := v_saved;
            FOR i IN g_start .. g_end LOOP
                IF v_status[i] = 'ok' THEN
                    v_status[i] := 'aborted';
                    v_version[i] := NULL;
                END IF;
            END LOOP;
        ELSE
            FOR i IN g_start .. g_end LOOP
                FOR j IN 1 .. p_counts[i] LOOP
                    v_ord := v_ord || (v_offsets[i] + j);
                    v_sids := v_sids || p_stream_ids[i];
                    v_evers := v_evers || (v_version[i] - p_counts[i] + j);
                END LOOP;
            END LOOP;
        END IF;
        g_start := g_end + 1;
    END LOOP;
    v_now := clock_timestamp();
    IF cardinality(v_ord) > 0 THEN
        WITH inserted AS (
            INSERT INTO events (event_id, stream_id, stream_version, type, data, metadata,
                                recorded_at)
            SELECT p_event_ids[u.o], u.sid, u.ver, p_types[u.o], p_data[u.o]::jsonb,
                   p_metadata[u.o]::jsonb, v_now
            FROM unnest(v_ord, v_sids, v_evers) WITH ORDINALITY AS u(o, sid, ver, n)
            ORDER BY u.n
            RETURNING events.position
        )
        SELECT array_agg(position ORDER BY position) INTO v_pos FROM inserted;
    END IF;
    FOR i IN 1 .. v_total LOOP
        idx := i; status := v_status[i]; last_version := v_version[i]; actual := v_actual[i];
        first_position := NULL; last_position := NULL; recorded_at := NULL;
        IF v_status[i] = 'ok' AND p_counts[i] > 0 THEN
            first_position := v_pos[m + 1];
            last_position := v_pos[m + p_counts[i]];
            recorded_at := v_now;
            m := m + p_counts[i];
        END IF;
        RETURN NEXT;
    END LOOP;
    IF cardinality(v_pos) > 0 THEN
        v_payload := v_pos[cardinality(v_pos)]::text || ' ' || array_to_string(
            ARRAY(SELECT DISTINCT p_types[o] FROM unnest(v_ord) AS o ORDER BY 1), ',');
        IF length(v_payload) > 7900 THEN
            v_payload := v_pos[cardinality(v_pos)]::text;
        END IF;
        PERFORM pg_notify('nexus_events', v_payload);
    END IF;
END;
$$;


-- migrate:down
DROP FUNCTION nexus_append_atomic_at(text[], bigint[], int[], uuid[], text[], text[], text[]);
DROP FUNCTION nexus_append_groups_at(int[], text[], bigint[], int[], uuid[], text[], text[], text[]);
ALTER FUNCTION nexus_append_atomic_per_stream_at(text[], bigint[], int[], uuid[], text[], text[], text[]) RENAME TO nexus_append_atomic_at;
ALTER FUNCTION nexus_append_groups_per_stream_at(int[], text[], bigint[], int[], uuid[], text[], text[], text[]) RENAME TO nexus_append_groups_at;
