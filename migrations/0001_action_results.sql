-- One row per action task outcome. task_id is the primary key, so a result replayed after a
-- crash (at-least-once delivery) is ignored by the sink's ON CONFLICT DO NOTHING.
create table if not exists action_results (
    task_id          text primary key,
    run_id           text not null,
    event_id         text not null,
    tenant           text not null,
    workflow_id      text not null,
    workflow_version bigint not null,
    step_id          text not null,
    service          text not null,
    status           text not null check (status in ('succeeded', 'failed')),
    attempts         integer not null,
    latency_ms       double precision not null,
    http_status      integer,
    error            text,
    output           jsonb,
    finished_at      timestamptz not null,
    recorded_at      timestamptz not null default now()
);

create index if not exists action_results_tenant_finished on action_results (tenant, finished_at);
create index if not exists action_results_run on action_results (run_id);
