-- migrate:up

-- nexus_append_groups (issue 16, the hot path): group commit for atomic appends too.
-- The group-commit writer sends every append that overlaps in time in one statement;
-- `p_groups` numbers them (consecutive requests with the same number are one group).
-- A group of several streams is all or nothing: it runs in a subtransaction (a plpgsql
-- block with an exception handler), and its first refused stream (wrong version,
-- reused event ids) rolls back the whole group, whose other rows then say 'aborted'.
-- Other groups of the batch are not affected. One advisory lock, one commit and one
-- notification (naming the types of the groups written) for the whole batch, as
-- nexus_append_batch does for single appends.
CREATE OR REPLACE FUNCTION nexus_append_groups(
    p_groups      int[],
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
    v_total    int := coalesce(array_length(p_stream_ids, 1), 0);
    v_offsets  int[] := '{}';
    v_off      int := 0;
    g_start    int := 1;
    g_end      int;
    v_n        int;
    v_ids      uuid[];
    v_existing int;
    v_current  bigint;
    v_now      timestamptz;
    v_first    bigint;
    v_last     bigint;
    v_max      bigint;
    v_types    text[] := '{}';
    g_types    text[];
    g_max      bigint;
    g_refused  boolean;
    b_idx      int[];
    b_status   text[];
    b_first    bigint[];
    b_last     bigint[];
    b_version  bigint[];
    b_actual   bigint[];
    v_payload  text;
BEGIN
    PERFORM pg_advisory_xact_lock(7400001);
    v_now := clock_timestamp();
    FOR i IN 1 .. v_total LOOP
        v_offsets := v_offsets || v_off;
        v_off := v_off + p_counts[i];
    END LOOP;
    WHILE g_start <= v_total LOOP
        g_end := g_start;
        WHILE g_end < v_total AND p_groups[g_end + 1] = p_groups[g_start] LOOP
            g_end := g_end + 1;
        END LOOP;
        b_idx := '{}'; b_status := '{}'; b_first := '{}'; b_last := '{}';
        b_version := '{}'; b_actual := '{}';
        g_types := '{}'; g_max := NULL; g_refused := false;
        BEGIN
            FOR i IN g_start .. g_end LOOP
                v_n := p_counts[i];
                v_ids := p_event_ids[v_offsets[i] + 1 : v_offsets[i] + v_n];
                v_first := NULL; v_last := NULL; v_current := NULL;
                SELECT count(*) INTO v_existing FROM events WHERE event_id = ANY (v_ids);
                IF v_existing > 0 THEN
                    IF v_existing = v_n AND NOT EXISTS (
                        SELECT 1 FROM events WHERE event_id = ANY (v_ids)
                                               AND stream_id <> p_stream_ids[i]
                    ) THEN
                        SELECT min(e.position), max(e.position), max(e.stream_version)
                            INTO v_first, v_last, v_current
                            FROM events e WHERE e.event_id = ANY (v_ids);
                        b_status := b_status || 'duplicate'::text;
                        b_actual := b_actual || NULL::bigint;
                    ELSE
                        b_status := b_status || 'conflict'::text;
                        b_actual := b_actual || v_existing::bigint;
                        g_refused := true;
                    END IF;
                ELSE
                    SELECT coalesce(max(stream_version), 0) INTO v_current
                        FROM events WHERE stream_id = p_stream_ids[i];
                    IF p_expected[i] IS NOT NULL AND v_current <> p_expected[i] THEN
                        b_status := b_status || 'version'::text;
                        b_actual := b_actual || v_current;
                        v_current := NULL;
                        g_refused := true;
                    ELSE
                        WITH inserted AS (
                            INSERT INTO events (event_id, stream_id, stream_version, type, data,
                                                metadata, recorded_at)
                            SELECT u.id, p_stream_ids[i], v_current + u.ord, u.typ, u.dat::jsonb,
                                   u.meta::jsonb, v_now
                            FROM unnest(v_ids,
                                        p_types[v_offsets[i] + 1 : v_offsets[i] + v_n],
                                        p_data[v_offsets[i] + 1 : v_offsets[i] + v_n],
                                        p_metadata[v_offsets[i] + 1 : v_offsets[i] + v_n])
                                 WITH ORDINALITY AS u(id, typ, dat, meta, ord)
                            ORDER BY u.ord
                            RETURNING position
                        )
                        SELECT min(position), max(position) INTO v_first, v_last FROM inserted;
                        v_current := v_current + v_n;
                        g_types := g_types || p_types[v_offsets[i] + 1 : v_offsets[i] + v_n];
                        g_max := greatest(g_max, v_last);
                        b_status := b_status || 'ok'::text;
                        b_actual := b_actual || NULL::bigint;
                    END IF;
                END IF;
                b_idx := b_idx || i;
                b_first := b_first || v_first;
                b_last := b_last || v_last;
                b_version := b_version || v_current;
            END LOOP;
            IF g_refused AND g_end > g_start THEN
                RAISE EXCEPTION 'nexus append refused' USING ERRCODE = 'NX409';
            END IF;
        EXCEPTION WHEN SQLSTATE 'NX409' THEN
            -- the group's inserts are undone (plpgsql variables keep their values): the
            -- refused streams say why, the others that they were not written
            FOR k IN 1 .. coalesce(array_length(b_idx, 1), 0) LOOP
                IF b_status[k] IN ('ok', 'duplicate') THEN
                    b_status[k] := 'aborted';
                    b_first[k] := NULL; b_last[k] := NULL; b_version[k] := NULL;
                END IF;
            END LOOP;
            g_types := '{}';
            g_max := NULL;
        END;
        v_types := v_types || g_types;
        v_max := greatest(v_max, g_max);
        RETURN QUERY SELECT * FROM unnest(b_idx, b_status, b_first, b_last, b_version, b_actual);
        g_start := g_end + 1;
    END LOOP;
    IF v_max IS NOT NULL THEN
        -- "<last position> <Type>,<Type>,...", as nexus_append_batch notifies
        v_payload := v_max::text || ' ' || array_to_string(
            ARRAY(SELECT DISTINCT t FROM unnest(v_types) AS t ORDER BY t), ',');
        IF length(v_payload) > 7900 THEN
            v_payload := v_max::text;
        END IF;
        PERFORM pg_notify('nexus_events', v_payload);
    END IF;
END;
$$;


-- migrate:down
DROP FUNCTION IF EXISTS nexus_append_groups(int[], text[], bigint[], int[], uuid[], text[], text[], text[]);
