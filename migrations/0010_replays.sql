-- `weir replay` (src/ops/replay/): one row per replay, so that a replay can be listed and resumed
-- after an interrupt. `positions` (per events partition, the next offset to read) and `tally`
-- (what was sent so far) are updated together, after the tasks of everything before `positions`
-- were acknowledged by the broker; `checkpoint_at` is when, so that a resume knows how far back
-- the action topics may hold tasks sent after it (it reads them, and sends none twice).
-- (Numbered 0010, not 0004: other migrations may be added in between without renumbering.)
create table if not exists replays (
    id            text primary key,
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now(),
    state         text not null check (state in ('running', 'finished', 'failed')),
    selection     jsonb not null,
    bounds        jsonb not null,
    positions     jsonb not null,
    tally         jsonb not null,
    checkpoint_at timestamptz not null default now(),
    error         text
);

-- The default replay mode looks up, per event it reads, what its runs already did: by event id,
-- because a run's id depends on the workflow version, which a fixed definition changes.
create index if not exists action_results_event on action_results (event_id);
