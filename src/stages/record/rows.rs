//! Results as rows of `action_results`: decoding a result record, holding a batch column by
//! column, and writing it with one statement.
//!
//! ## U+0000 in body data
//! PostgreSQL's `text` and `jsonb` cannot hold the character U+0000 (NUL), which JSON allows
//! (`"\u0000"`): a row holding one is refused (SQLSTATE 22021 or 22P05). Body data — a result's
//! `output` and `error`, a run's event — is stored with every U+0000 replaced by U+FFFD (the
//! Unicode replacement character), in strings and object keys alike, so that a service answering
//! with a NUL does not lose its result or stop its run. Later steps read earlier outputs from
//! these rows, so they see U+FFFD too. The identifying columns (tenant, ids, step, service) are
//! not rewritten: a NUL there makes the row a data error, which the record stage dead-letters
//! with the SQLSTATE (see the stage's docs).

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde_json::Value as Json;
use sqlx::{postgres::PgArguments, Arguments as _};

use crate::envelope::{self, ActionResult, Status};

/// What U+0000 is stored as in body data.
pub(crate) const NUL_REPLACEMENT: char = '\u{FFFD}';

/// How many columns a batch binds: one array per column of `action_results` that the sink writes.
pub const COLUMNS: usize = 17;

/// Rows of one batch, column by column, as UNNEST wants them.
#[derive(Default)]
pub struct Columns {
    task_id: Vec<String>,
    run_id: Vec<String>,
    event_id: Vec<String>,
    tenant: Vec<String>,
    workflow_id: Vec<String>,
    workflow_version: Vec<i64>,
    step_id: Vec<String>,
    service: Vec<String>,
    status: Vec<String>,
    attempts: Vec<i32>,
    latency_ms: Vec<f64>,
    http_status: Vec<Option<i32>>,
    cost: Vec<Option<f64>>,
    error: Vec<Option<String>>,
    output: Vec<Option<String>>,
    finished_at: Vec<DateTime<Utc>>,
    run_at: Vec<DateTime<Utc>>,
}

impl Columns {
    pub fn push(&mut self, r: ActionResult, finished_at: DateTime<Utc>) {
        self.run_at.push(run_at(&r, finished_at));
        self.task_id.push(r.task_id);
        self.run_id.push(r.run_id);
        self.event_id.push(r.event_id);
        self.tenant.push(r.tenant);
        self.workflow_id.push(r.workflow_id);
        self.workflow_version.push(r.workflow_version);
        self.step_id.push(r.step_id);
        self.service.push(r.service);
        self.status.push(r.status.as_str().to_string());
        self.attempts.push(r.attempts);
        self.latency_ms.push(r.latency_ms);
        self.http_status.push(r.http_status);
        // A u64 count of the service's units; double precision holds it exactly up to 2^53.
        self.cost.push(r.cost.map(|c| c as f64));
        self.error.push(r.error.map(|e| storable_text(&e).into_owned()));
        self.output.push(r.output.as_ref().map(storable_json_text));
        self.finished_at.push(finished_at);
    }

    pub fn len(&self) -> usize {
        self.task_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.task_id.is_empty()
    }

    /// The batch as the bind arguments of [`INSERT`]: one array per column.
    pub fn arguments(&self) -> Result<PgArguments, sqlx::error::BoxDynError> {
        let mut args = PgArguments::default();
        args.add(&self.task_id)?;
        args.add(&self.run_id)?;
        args.add(&self.event_id)?;
        args.add(&self.tenant)?;
        args.add(&self.workflow_id)?;
        args.add(&self.workflow_version)?;
        args.add(&self.step_id)?;
        args.add(&self.service)?;
        args.add(&self.status)?;
        args.add(&self.attempts)?;
        args.add(&self.latency_ms)?;
        args.add(&self.http_status)?;
        args.add(&self.error)?;
        args.add(&self.output)?;
        args.add(&self.finished_at)?;
        args.add(&self.cost)?;
        args.add(&self.run_at)?;
        Ok(args)
    }

    /// Inserts the rows whose tasks have none yet; returns how many were inserted (fewer than
    /// [`len`](Self::len) when some tasks already had a row: replays, or later outcomes).
    pub async fn insert(&self, db: &mut sqlx::PgConnection) -> Result<u64, sqlx::Error> {
        let args = self.arguments().map_err(sqlx::Error::Encode)?;
        sqlx::query_with(INSERT, args).execute(db).await.map(|r| r.rows_affected())
    }

    /// Replaces `failed` and `expired` rows by the `succeeded` outcomes of the same tasks in this
    /// batch (a redrive or a replay that succeeded after the task was dead-lettered, or a
    /// `weir replay --ignore-expiry` of a task that had expired); never the reverse, and a
    /// `skipped` or `cancelled` row stays as it is. Returns the run ids of the rows replaced.
    pub async fn repair(&self, db: &mut sqlx::PgConnection) -> Result<Vec<String>, sqlx::Error> {
        let mut args = self.arguments().map_err(sqlx::Error::Encode)?;
        args.add(Status::Failed.as_str()).map_err(sqlx::Error::Encode)?;
        args.add(Status::Succeeded.as_str()).map_err(sqlx::Error::Encode)?;
        args.add(Status::Expired.as_str()).map_err(sqlx::Error::Encode)?;
        sqlx::query_scalar_with(REPAIR, args).fetch_all(db).await
    }
}

/// One statement per batch: the columns unnested back into rows, duplicates (replays) ignored;
/// a later outcome that must replace a row is [`REPAIR`]'s.
const INSERT: &str = "insert into action_results (task_id, run_id, event_id, tenant, workflow_id, workflow_version,
        step_id, service, status, attempts, latency_ms, http_status, error, output, finished_at, cost, run_at)
    select t, r, e, te, w, wv, s, sv, st, a, l, h, er, o::jsonb, f, c, ra
    from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[],
        $8::text[], $9::text[], $10::int[], $11::float8[], $12::int[], $13::text[], $14::text[],
        $15::timestamptz[], $16::float8[], $17::timestamptz[])
        as x(t, r, e, te, w, wv, s, sv, st, a, l, h, er, o, f, c, ra)
    on conflict (task_id, run_at) do nothing";

/// The later outcome of a task whose row says `failed` ($18) or `expired` ($20) replaces it when it
/// `succeeded` ($19): an operator repaired what failed (or replayed what expired, overriding the
/// expiry), and the row must say so. Nothing else is replaced, so a
/// replayed old failure never overwrites a success. Several successes of one task in a batch
/// update the row once. The row is the one of the same `run_at` (the same partition), as for
/// the INSERT's conflict.
const REPAIR: &str = "update action_results a set status = x.st, attempts = x.a, latency_ms = x.l, http_status = x.h,
        error = x.er, output = x.o::jsonb, finished_at = x.f, cost = x.c
    from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[],
        $8::text[], $9::text[], $10::int[], $11::float8[], $12::int[], $13::text[], $14::text[],
        $15::timestamptz[], $16::float8[], $17::timestamptz[])
        as x(t, r, e, te, w, wv, s, sv, st, a, l, h, er, o, f, c, ra)
    where a.task_id = x.t and a.run_at = x.ra and a.status in ($18, $20) and x.st = $19
    returning a.run_id";

/// Decodes one result record into what [`Columns::push`] takes; the error is the dead-letter reason.
pub fn decode_row(payload: &[u8], content_type: Option<&[u8]>) -> Result<(ActionResult, DateTime<Utc>), String> {
    let r = envelope::decode::<ActionResult>(payload, content_type).map_err(|e| format!("undecodable result: {e}"))?;
    match DateTime::parse_from_rfc3339(&r.finished_at) {
        Ok(t) => Ok((r, t.with_timezone(&Utc))),
        Err(e) => Err(format!("finished_at {:?}: {e}", r.finished_at)),
    }
}

/// The row's partition key (see `retention`): the result's `run_at`, or for a result from before
/// it existed, its `finished_at`.
pub fn run_at(result: &ActionResult, finished_at: DateTime<Utc>) -> DateTime<Utc> {
    result.run_at.unwrap_or(finished_at)
}

/// `text` as PostgreSQL can store it: U+0000 replaced by [`NUL_REPLACEMENT`].
pub(crate) fn storable_text(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', NUL_REPLACEMENT.encode_utf8(&mut [0; 4])))
    } else {
        Cow::Borrowed(text)
    }
}

/// `value` as `jsonb` can store it: U+0000 replaced by [`NUL_REPLACEMENT`] in every string and
/// object key. Borrowed (no copy) when there is none, which is almost always.
pub(crate) fn storable(value: &Json) -> Cow<'_, Json> {
    if holds_nul(value) {
        let mut value = value.clone();
        replace_nul(&mut value);
        Cow::Owned(value)
    } else {
        Cow::Borrowed(value)
    }
}

/// `value` as JSON text `jsonb` accepts (see [`storable`]).
fn storable_json_text(value: &Json) -> String {
    let text = value.to_string();
    // serde_json writes U+0000 only as the escape `\u0000`: without that text there is none, and
    // the text is written once. (With it, the text may also be an escaped backslash followed by
    // "u0000": the value itself says.)
    if text.contains("\\u0000") && holds_nul(value) {
        storable(value).to_string()
    } else {
        text
    }
}

fn holds_nul(value: &Json) -> bool {
    match value {
        Json::String(s) => s.contains('\0'),
        Json::Array(items) => items.iter().any(holds_nul),
        Json::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        Json::Null | Json::Bool(_) | Json::Number(_) => false,
    }
}

fn replace_nul(value: &mut Json) {
    match value {
        Json::String(s) => {
            if let Cow::Owned(replaced) = storable_text(s) {
                *s = replaced;
            }
        }
        Json::Array(items) => items.iter_mut().for_each(replace_nul),
        Json::Object(map) => {
            *map = std::mem::take(map)
                .into_iter()
                .map(|(k, mut v)| {
                    replace_nul(&mut v);
                    (storable_text(&k).into_owned(), v)
                })
                .collect();
        }
        Json::Null | Json::Bool(_) | Json::Number(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_statements_bind_one_array_per_column() {
        // INSERT binds exactly the columns; REPAIR binds them and three statuses after them.
        let highest = |sql: &str| (1..=40).rev().find(|n| sql.contains(&format!("${n}::"))).unwrap();
        assert_eq!(highest(INSERT), COLUMNS);
        let mut columns = Columns::default();
        let result: ActionResult = serde_json::from_value(json!({"task_id": "k", "run_id": "r", "event_id": "e",
            "tenant": "t", "workflow_id": "w", "workflow_version": 1, "step_id": "s", "service": "webhook",
            "status": "succeeded", "attempts": 1, "latency_ms": 1.0, "finished_at": "2026-12-07T10:00:00Z"}))
        .unwrap();
        columns.push(result, Utc::now());
        assert_eq!(columns.arguments().unwrap().len(), COLUMNS);
    }

    #[test]
    fn nul_in_body_data_is_replaced_everywhere_and_nothing_else_changes() {
        let value = json!({"a\u{0}b": ["x\u{0}", {"k": "\u{0}\u{0}"}], "n": 1, "s": "plain", "bs": "\\u0000"});
        let stored = storable(&value);
        assert_eq!(
            *stored,
            json!({"a\u{FFFD}b": ["x\u{FFFD}", {"k": "\u{FFFD}\u{FFFD}"}], "n": 1, "s": "plain", "bs": "\\u0000"})
        );
        assert_eq!(serde_json::from_str::<Json>(&storable_json_text(&value)).unwrap(), *stored);
        // A backslash followed by "u0000" is text, not a NUL: kept as written.
        let text_only = json!({"bs": "\\u0000"});
        assert!(matches!(storable(&text_only), Cow::Borrowed(_)));
        assert_eq!(storable_json_text(&text_only), text_only.to_string());
        assert_eq!(storable_text("a\u{0}"), "a\u{FFFD}");
        assert!(matches!(storable_text("clean"), Cow::Borrowed(_)));
    }
}
