-- A step can end without a call: `expired` (past its `expires_after` when it would have been
-- called) or `cancelled` (its run was cancelled with `weir runs cancel` before it started).
alter table action_results drop constraint if exists action_results_status_check;
alter table action_results add constraint action_results_status_check
    check (status in ('succeeded', 'failed', 'skipped', 'expired', 'cancelled'));

-- A run cancelled by an operator. Kept apart from `workflow_runs.status`, which the coordinator
-- owns: `weir runs cancel` only inserts here, and the coordinator, deciding a run's next steps in
-- its transaction, records the steps it would have started as `cancelled` instead.
create table if not exists run_cancellations (
    run_id       text primary key,
    reason       text not null,
    cancelled_at timestamptz not null default now()
);

alter table workflow_runs drop constraint if exists workflow_runs_status_check;
alter table workflow_runs add constraint workflow_runs_status_check
    check (status in ('running', 'succeeded', 'failed', 'cancelled'));
