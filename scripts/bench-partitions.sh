#!/bin/bash
# Partitioned action_results (migration 0030) beside the unpartitioned one (migrations to 0020),
# in the same run, alternating: the record stage's INSERT of a 2,000-row batch, the same batch
# again (every row a conflict: a redelivery), and the coordinator's look-up of 2,000 runs by id,
# unbounded and bounded to the batch's run_at span (src/stages/record/runs.rs). Each table holds
# 600,000 rows over 30 days first; the partitioned one has 33 daily partitions and the default.
# Times are the server round trips psql reports (\timing), summed over 20 statements.
# Usage: scripts/bench-partitions.sh (after `. scripts/env.sh`); creates and drops two databases.
set -e
ADMIN=${DATABASE_URL:-postgres://weir:weir@127.0.0.1:5432/weir}
U=${ADMIN%/*}
cd "$(dirname "$0")/.."
for db in retm_before retm_after; do psql -q $ADMIN -c "drop database if exists $db" -c "create database $db"; done
for f in migrations/000*.sql migrations/001*.sql migrations/0020*.sql; do psql -q -v ON_ERROR_STOP=1 $U/retm_before -f $f; psql -q -v ON_ERROR_STOP=1 $U/retm_after -f $f; done
psql -q -v ON_ERROR_STOP=1 $U/retm_after -f migrations/0030_time_partitions.sql
psql -q $U/retm_after -c "do \$\$ declare d timestamptz; begin for i in -30..2 loop d := date_trunc('day', now() at time zone 'UTC') at time zone 'UTC' + i * interval '1 day'; execute format('create table %I partition of action_results for values from (%L) to (%L)', 'action_results_p' || to_char(d at time zone 'UTC', 'YYYYMMDD_HH24MISS'), d, d + interval '1 day'); end loop; end \$\$"
# 30 days of 20,000 rows each already there, so indexes have depth.
psql -q $U/retm_before -c "insert into action_results (task_id, run_id, event_id, tenant, workflow_id, workflow_version, step_id, service, status, attempts, latency_ms, finished_at) select 'old-' || n, 'run-old-' || n, 'e-old-' || n, 't' || (n % 50), 'w', 1, 's', 'webhook', 'succeeded', 1, 1.0, now() - (n % 30) * interval '1 day' from generate_series(1, 600000) n"
psql -q $U/retm_after -c "insert into action_results (task_id, run_id, event_id, tenant, workflow_id, workflow_version, step_id, service, status, attempts, latency_ms, finished_at, run_at) select 'old-' || n, 'run-old-' || n, 'e-old-' || n, 't' || (n % 50), 'w', 1, 's', 'webhook', 'succeeded', 1, 1.0, now() - (n % 30) * interval '1 day', now() - (n % 30) * interval '1 day' from generate_series(1, 600000) n"
for db in retm_before retm_after; do psql -q $U/$db -c "vacuum analyze action_results"; done
ins_before="insert into action_results (task_id, run_id, event_id, tenant, workflow_id, workflow_version, step_id, service, status, attempts, latency_ms, finished_at) select 'k' || :b || '-' || n, 'r' || :b || '-' || n, 'e', 't', 'w', 1, 's', 'webhook', 'succeeded', 1, 1.0, now() from generate_series(1, 2000) n on conflict (task_id) do nothing"
ins_after="insert into action_results (task_id, run_id, event_id, tenant, workflow_id, workflow_version, step_id, service, status, attempts, latency_ms, finished_at, run_at) select 'k' || :b || '-' || n, 'r' || :b || '-' || n, 'e', 't', 'w', 1, 's', 'webhook', 'succeeded', 1, 1.0, now(), date_trunc('hour', now()) from generate_series(1, 2000) n on conflict (task_id, run_at) do nothing"
look="select count(*) from action_results where run_id = any(array(select 'r' || :b || '-' || n from generate_series(1, 2000) n))"
# What the coordinator reads now: bounded to the batch's run_at span (margins of an hour or so).
bounded="select count(*) from action_results where run_id = any(array(select 'r' || :b || '-' || n from generate_series(1, 2000) n)) and run_at between date_trunc('hour', now()) - interval '2 hours' and date_trunc('hour', now()) + interval '2 hours'"
run() { # db sql batch -> ms measured by the server round trip (\timing), one session
  printf '\\set b %s\n\\timing on\n%s;\n' "$3" "$2" | psql -q $U/$1 2>&1 | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | head -1
}
declare -A tot
for round in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
  for side in before after; do
    if [ $side = before ]; then sql=$ins_before; else sql=$ins_after; fi
    tot[ins_$side]=$(echo "${tot[ins_$side]:-0} + $(run retm_$side "$sql" $round)" | bc)
    tot[dup_$side]=$(echo "${tot[dup_$side]:-0} + $(run retm_$side "$sql" $round)" | bc)
    tot[look_$side]=$(echo "${tot[look_$side]:-0} + $(run retm_$side "$look" $round)" | bc)
    if [ $side = after ]; then tot[bounded_after]=$(echo "${tot[bounded_after]:-0} + $(run retm_after "$bounded" $round)" | bc); fi
  done
done
echo "bounded look-up (after only): ${tot[bounded_after]} ms"
for k in ins dup look; do echo "$k: before ${tot[${k}_before]} ms, after ${tot[${k}_after]} ms (20 statements of 2000 rows each)"; done
psql -q $U/retm_after -c "select count(*) as rows_after, count(distinct task_id) from action_results where task_id like 'k%'"
psql -q $U/retm_before -c "select count(*) as rows_before from action_results where task_id like 'k%'"
for db in retm_before retm_after; do psql -q $ADMIN -c "drop database if exists $db"; done
