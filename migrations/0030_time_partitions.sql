-- Retention (sink.retention, src/stages/record/retention.rs): `action_results` and
-- `workflow_runs` become tables partitioned by RANGE on `run_at`, when their run started (the
-- Kafka timestamp of the event record that started it, carried on every task and result of the
-- run). Old rows then leave by dropping whole partitions, never by a DELETE over the table.
--
-- A unique key of a partitioned table must include the partition key, so the keys become
-- (task_id, run_at) and (run_id, run_at). Idempotency holds because `run_at` is the same on every
-- redelivery, retry and replay of a task's result: a result written twice has the same key and
-- conflicts, in the same partition.
--
-- How rows move: each table is renamed aside (its indexes too: index names are per schema), the
-- partitioned table is made with the old name, a DEFAULT partition (a row whose time has no
-- partition is never refused) and one daily partition per UTC day the old rows cover, the rows
-- are copied (`run_at` = `finished_at` for a result, `started_at` for a run: the best time an old
-- row has), and the old table is dropped. One transaction, like every migration: an upgrade that
-- fails leaves the old tables as they were. It takes as long as copying the tables; the record
-- stage runs migrations before it writes.
--
-- `run_steps_started` stays one table: its key (run_id, step_id) is what guarantees that a step
-- starts once per run whatever partition the run's rows are in. It is narrow; the retention
-- deletes its rows older than the retention by `started_at`, in batches.

-- action_results ---------------------------------------------------------------------------
alter table action_results rename to action_results_unpartitioned;
alter index action_results_pkey rename to action_results_unpartitioned_pkey;
alter index action_results_tenant_finished rename to action_results_unpartitioned_tenant_finished;
alter index action_results_run rename to action_results_unpartitioned_run;
alter index action_results_event rename to action_results_unpartitioned_event;

create table action_results (
    task_id          text not null,
    run_id           text not null,
    event_id         text not null,
    tenant           text not null,
    workflow_id      text not null,
    workflow_version bigint not null,
    step_id          text not null,
    service          text not null,
    status           text not null,
    attempts         integer not null,
    latency_ms       double precision not null,
    http_status      integer,
    error            text,
    output           jsonb,
    finished_at      timestamptz not null,
    recorded_at      timestamptz not null default now(),
    cost             double precision,
    run_at           timestamptz not null,
    constraint action_results_status_check
        check (status in ('succeeded', 'failed', 'skipped', 'expired', 'cancelled')),
    primary key (task_id, run_at)
) partition by range (run_at);
create table action_results_default partition of action_results default;
create index action_results_tenant_finished on action_results (tenant, finished_at);
create index action_results_run on action_results (run_id);
create index action_results_event on action_results (event_id);

-- workflow_runs ----------------------------------------------------------------------------
alter table workflow_runs rename to workflow_runs_unpartitioned;
alter index workflow_runs_pkey rename to workflow_runs_unpartitioned_pkey;
alter index workflow_runs_running rename to workflow_runs_unpartitioned_running;

create table workflow_runs (
    run_id           text not null,
    tenant           text not null,
    workflow_id      text not null,
    workflow_version bigint not null,
    event_id         text not null,
    event            jsonb not null,
    status           text not null,
    error            text,
    started_at       timestamptz not null default now(),
    deadline         timestamptz not null,
    finished_at      timestamptz,
    run_at           timestamptz not null,
    constraint workflow_runs_status_check check (status in ('running', 'succeeded', 'failed', 'cancelled')),
    primary key (run_id, run_at)
) partition by range (run_at);
create table workflow_runs_default partition of workflow_runs default;
create index workflow_runs_running on workflow_runs (deadline) where status = 'running';

-- A daily partition per UTC day the old rows cover, so that they do not all sit in the default
-- partition (whose old rows the retention deletes row by row rather than dropping).
do $$
declare
    t text;
    day timestamptz;
begin
    for t, day in
        select 'action_results', date_trunc('day', finished_at at time zone 'UTC') at time zone 'UTC'
            from action_results_unpartitioned
        union
        select 'workflow_runs', date_trunc('day', started_at at time zone 'UTC') at time zone 'UTC'
            from workflow_runs_unpartitioned
    loop
        execute format('create table %I partition of %I for values from (%L) to (%L)',
            t || '_p' || to_char(day at time zone 'UTC', 'YYYYMMDD"_"HH24MISS'), t, day, day + interval '1 day');
    end loop;
end $$;

insert into action_results (task_id, run_id, event_id, tenant, workflow_id, workflow_version, step_id, service,
        status, attempts, latency_ms, http_status, error, output, finished_at, recorded_at, cost, run_at)
    select task_id, run_id, event_id, tenant, workflow_id, workflow_version, step_id, service,
        status, attempts, latency_ms, http_status, error, output, finished_at, recorded_at, cost, finished_at
    from action_results_unpartitioned;
drop table action_results_unpartitioned;

insert into workflow_runs (run_id, tenant, workflow_id, workflow_version, event_id, event, status, error,
        started_at, deadline, finished_at, run_at)
    select run_id, tenant, workflow_id, workflow_version, event_id, event, status, error,
        started_at, deadline, finished_at, started_at
    from workflow_runs_unpartitioned;
drop table workflow_runs_unpartitioned;

-- run_steps_started and run_cancellations: kept whole, their old rows deleted by the retention.
alter table run_steps_started add column if not exists started_at timestamptz not null default now();
create index if not exists run_steps_started_at on run_steps_started (started_at);
create index if not exists run_cancellations_at on run_cancellations (cancelled_at);
