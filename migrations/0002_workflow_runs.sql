-- Multi-step runs. State lives in PostgreSQL, beside the results it is derived from, so that
-- storing a batch of results and deciding which steps start next is one transaction: a sink that
-- dies mid-batch leaves neither half, and its replacement redoes the batch from Kafka.
alter table action_results drop constraint if exists action_results_status_check;
alter table action_results add constraint action_results_status_check
    check (status in ('succeeded', 'failed', 'skipped'));

create table if not exists workflow_runs (
    run_id           text primary key,
    tenant           text not null,
    workflow_id      text not null,
    workflow_version bigint not null,
    event_id         text not null,
    event            jsonb not null,
    status           text not null check (status in ('running', 'succeeded', 'failed')),
    error            text,
    started_at       timestamptz not null default now(),
    deadline         timestamptz not null,
    finished_at      timestamptz
);
create index if not exists workflow_runs_running on workflow_runs (deadline) where status = 'running';

-- A later step is started at most once per run: the coordinator emits its task only when this
-- insert succeeds.
create table if not exists run_steps_started (
    run_id  text not null,
    step_id text not null,
    primary key (run_id, step_id)
);
