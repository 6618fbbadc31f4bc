-- migrate:up

-- `skills` projection: the current version of each tenant's skills (SkillDefined).
CREATE TABLE skills (
    tenant      text        NOT NULL,
    name        text        NOT NULL,
    version     int         NOT NULL,
    spec        jsonb       NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (tenant, name)
);

-- `routing_stats` projection: each routed call (ModelRouted, its cost from
-- LLMCallCompleted, its feedback from CallFeedback) and what is learned per
-- (tenant, cluster, model): discounted feedback (Beta) and mean cost per call.
CREATE TABLE routed_calls (
    call_id         text PRIMARY KEY,
    tenant          text        NOT NULL,
    session_id      text        NOT NULL,
    skill           text        NOT NULL,
    cluster         text        NOT NULL,
    pick            text        NOT NULL,
    routed_at       timestamptz NOT NULL,
    cost_micro_usd  bigint,
    latency_ms      double precision,
    feedback        double precision
);
CREATE INDEX routed_calls_tenant_time_idx ON routed_calls (tenant, routed_at);

CREATE TABLE routing_stats (
    tenant      text             NOT NULL,
    cluster     text             NOT NULL,
    model       text             NOT NULL,
    skill_counts jsonb           NOT NULL DEFAULT '{}'::jsonb,
    alpha       double precision NOT NULL DEFAULT 0,
    beta        double precision NOT NULL DEFAULT 0,
    feedback_n  int              NOT NULL DEFAULT 0,
    cost_n      int              NOT NULL DEFAULT 0,
    cost_mean   double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, cluster, model)
);

-- migrate:down
DROP TABLE routing_stats;
DROP TABLE routed_calls;
DROP TABLE skills;
