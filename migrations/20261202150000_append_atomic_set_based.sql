-- migrate:up

-- The per-stream forms stay, under new names: the set-based form hands retries to the
-- groups one; the atomic one is kept only so that the down migration is a rename.
ALTER FUNCTION nexus_append_atomic_at(text[], bigint[], int[], uuid[], text[], text[], text[]) RENAME TO nexus_append_atomic_per_stream_at;
ALTER FUNCTION nexus_append_groups_at(int[], text[], bigint[], int[], uuid[], text[], text[], text[]) RENAME TO nexus_append_groups_per_stream_at;

-- nexus_append_groups_at, set-based (issue 16, the hot path): the group-commit writer's
-- statement (appends that overlap in time, each group all or nothing), and through
-- nexus_append_atomic_at below a call's settle alone (7 events on 4 streams, the
-- biggest statement of a call). The per-stream form ran per stream a duplicate check, a
-- version read and an insert through three nested PL/pgSQL functions, every group in a
-- subtransaction, then read each stream's last event back for `recorded_at`. Now, on
-- every first try (no event id stored already or given twice), the versions are read
-- once, each group is decided before anything is written (a stream named in several
-- groups, or twice in one, sees the versions the groups before it leave: no
-- subtransaction), and the accepted groups' events go in with one insert, in their
-- order, under the append lock. A refused group writes nothing, so it leaves no gap in
-- the positions either. Anything else (a retry: an id stored already, 'duplicate', or
-- reused, 'conflict'; an id given twice) takes the per-stream form, renamed, unchanged.
-- Same rows, same notification payload.
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

-- nexus_append_atomic_at: the set-based form above, the whole append one group; its
-- first refused stream (the lowest: 'version' or 'conflict', not the 'aborted' others)
-- raises NX409 with that row in DETAIL, as the per-stream form did, so the statement
-- rolls back (nothing of a refused group was written anyway).
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
LANGUAGE plpgsql AS $$
DECLARE
    r       record;
    refused jsonb;
BEGIN
    FOR r IN SELECT * FROM nexus_append_groups_at(
            array_fill(1, ARRAY[coalesce(cardinality(p_stream_ids), 0)]), p_stream_ids,
            p_expected, p_counts, p_event_ids, p_types, p_data, p_metadata) LOOP
        IF r.status IN ('version', 'conflict') AND refused IS NULL THEN
            refused := jsonb_build_object('idx', r.idx, 'status', r.status, 'actual', r.actual);
        END IF;
        idx := r.idx; status := r.status; first_position := r.first_position;
        last_position := r.last_position; last_version := r.last_version; actual := r.actual;
        recorded_at := r.recorded_at;
        RETURN NEXT;
    END LOOP;
    IF refused IS NOT NULL THEN
        RAISE EXCEPTION 'nexus append refused' USING ERRCODE = 'NX409', DETAIL = refused::text;
    END IF;
END;
$$;


-- migrate:down
DROP FUNCTION nexus_append_atomic_at(text[], bigint[], int[], uuid[], text[], text[], text[]);
DROP FUNCTION nexus_append_groups_at(int[], text[], bigint[], int[], uuid[], text[], text[], text[]);
ALTER FUNCTION nexus_append_atomic_per_stream_at(text[], bigint[], int[], uuid[], text[], text[], text[]) RENAME TO nexus_append_atomic_at;
ALTER FUNCTION nexus_append_groups_per_stream_at(int[], text[], bigint[], int[], uuid[], text[], text[], text[]) RENAME TO nexus_append_groups_at;
