-- migrate:up

-- The append functions' statements planned once per connection (issue 16, the hot path).
-- PL/pgSQL caches a plan per statement, but with plan_cache_mode = auto it compares the
-- generic plan's estimate with custom plans made for the actual values: with arrays as
-- parameters (unnest, = ANY) a custom plan knows their length and looks cheaper, so every
-- call planned each statement again: 0.12 to 0.15 ms of a call's settle (0.88 -> 0.74 ms
-- for 7 events on 4 streams, measured here). Every lookup in them has its index (and
-- `enable_seqscan = off` keeps the plan on it), so the generic plan is the right one.
ALTER FUNCTION nexus_append_groups_at(int[], text[], bigint[], int[], uuid[], text[], text[], text[]) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION nexus_append_atomic_at(text[], bigint[], int[], uuid[], text[], text[], text[]) SET plan_cache_mode = force_generic_plan;


-- migrate:down
ALTER FUNCTION nexus_append_groups_at(int[], text[], bigint[], int[], uuid[], text[], text[], text[]) RESET plan_cache_mode;
ALTER FUNCTION nexus_append_atomic_at(text[], bigint[], int[], uuid[], text[], text[], text[]) RESET plan_cache_mode;
