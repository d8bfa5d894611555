//! What travels on weir's topics: events, action tasks and results, and their two encodings.
//!
//! Every record carries a `content-type` header (the CloudEvents Kafka binding's name for it).
//! JSON is the default and what internal topics use; Avro is accepted wherever JSON is, encoded
//! with Avro's *single-object encoding* (a two-byte marker and the schema fingerprint before the
//! datum), so a record names its own schema without a registry. The schemas are the files in
//! `schemas/`, compiled into the binary.
//!
//! One codec serves all three types: a value is turned into JSON, its JSON-valued fields (event
//! `data`, task `input`, result `output`) become JSON text as the schemas declare, and apache-avro
//! checks the result against the schema while converting it. That keeps the serde structs the
//! single definition of each record.

use std::sync::OnceLock;

use apache_avro::{GenericSingleObjectReader, GenericSingleObjectWriter, Schema};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value as Json;

use crate::config::Priority;

/// Header naming the encoding of the payload.
pub const CONTENT_TYPE: &str = "content-type";
pub const JSON: &str = "application/json";
pub(crate) const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";
pub const AVRO: &str = "application/avro";

/// How a payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Json,
    Avro,
}

impl Format {
    /// Reads the `content-type` header; a missing header means JSON.
    pub fn from_content_type(value: Option<&[u8]>) -> Result<Self, DecodeError> {
        let Some(raw) = value else { return Ok(Format::Json) };
        let text = std::str::from_utf8(raw).map_err(|_| DecodeError::ContentType("<not UTF-8>".into()))?;
        let essence = text.split(';').next().unwrap_or("").trim();
        match essence {
            JSON | CLOUDEVENTS_JSON | "" => Ok(Format::Json),
            AVRO | "application/cloudevents+avro" | "avro/binary" => Ok(Format::Avro),
            other => Err(DecodeError::ContentType(other.to_string())),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => JSON,
            Format::Avro => AVRO,
        }
    }
}

/// Why a payload could not be decoded. Never retryable: the same bytes fail the same way, so the
/// record goes to the dead-letter topic.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported content-type {0:?} (expected application/json or application/avro)")]
    ContentType(String),
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid Avro: {0}")]
    Avro(String),
    #[error("invalid event: {0}")]
    Invalid(String),
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
}

/// A domain event: CloudEvents 1.0 attributes plus the `tenant` extension.
///
/// `D` is how the body is held: parsed JSON everywhere but in the evaluator, which first decodes
/// an [`UnparsedEvent`] and parses only the parts of the body its workflows read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event<D = Json> {
    #[serde(default = "spec_version")]
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    pub tenant: String,
    /// What the event is about within its tenant (CloudEvents `subject`: a member, a post, an
    /// order). A workflow's calls for one subject stay in order while the tenant's other subjects
    /// go on (`order_by`, docs/executor.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    #[serde(default)]
    pub data: D,
}

fn spec_version() -> String {
    "1.0".to_string()
}

/// An event whose body is still JSON text (`None` when absent or null), or, from Avro, already
/// parsed: the attributes are enough to find the candidate workflows, and most events need
/// little or nothing of a body that is most of their bytes.
pub(crate) type UnparsedEvent<'a> = Event<Body<'a>>;

/// See [`UnparsedEvent`].
#[derive(Debug, Clone)]
pub enum Body<'a> {
    /// Borrowed from the payload: the text is checked, not copied.
    Text(Option<&'a serde_json::value::RawValue>),
    Parsed(Json),
}

impl<D> Event<D> {
    /// The same attributes with the body turned into another form.
    pub fn map_data<E, F>(self, f: impl FnOnce(D) -> Result<E, F>) -> Result<Event<E>, F> {
        Ok(Event {
            specversion: self.specversion,
            id: self.id,
            source: self.source,
            kind: self.kind,
            time: self.time,
            tenant: self.tenant,
            subject: self.subject,
            datacontenttype: self.datacontenttype,
            data: f(self.data)?,
        })
    }

    /// Checks the attributes the pipeline relies on, with the default attribute length limit.
    pub fn validate(&self) -> Result<(), DecodeError> {
        self.validate_within(MAX_ATTRIBUTE_BYTES)
    }

    /// Checks the attributes the pipeline relies on. `id`, `tenant`, `type` and `source` become
    /// Kafka keys, HTTP header values and PostgreSQL text, where a control character breaks
    /// things far from here (PostgreSQL refuses NUL, an HTTP header CR and LF), so they are
    /// refused at the boundary, as is one longer than `max_attribute_bytes`. The reason names the
    /// attribute and the character's position but never quotes the value: it goes into a header.
    pub(crate) fn validate_within(&self, max_attribute_bytes: usize) -> Result<(), DecodeError> {
        for (name, value) in
            [("id", &self.id), ("source", &self.source), ("type", &self.kind), ("tenant", &self.tenant)]
        {
            if value.trim().is_empty() {
                return Err(DecodeError::Invalid(format!("attribute '{name}' is empty")));
            }
            if value.len() > max_attribute_bytes {
                return Err(DecodeError::Invalid(format!(
                    "attribute '{name}' is {} bytes, over the limit of {max_attribute_bytes} (limits.max_attribute_bytes)",
                    value.len()
                )));
            }
        }
        if let Some(subject) = self.subject.as_ref().filter(|s| s.len() > max_attribute_bytes) {
            return Err(DecodeError::Invalid(format!(
                "attribute 'subject' is {} bytes, over the limit of {max_attribute_bytes} (limits.max_attribute_bytes)",
                subject.len()
            )));
        }
        let optional = [("specversion", Some(&self.specversion)), ("time", self.time.as_ref())];
        for (name, value) in [("id", Some(&self.id)), ("source", Some(&self.source)), ("type", Some(&self.kind))]
            .into_iter()
            .chain([("tenant", Some(&self.tenant)), ("datacontenttype", self.datacontenttype.as_ref())])
            .chain([("subject", self.subject.as_ref())])
            .chain(optional)
        {
            let Some(value) = value else { continue };
            if let Some((at, c)) = value.char_indices().find(|(_, c)| c.is_control()) {
                return Err(DecodeError::Invalid(format!(
                    "attribute '{name}' holds the control character U+{:04X} at byte {at}; control characters \
                     (NUL, CR, LF, ...) are not allowed in event attributes",
                    c as u32
                )));
            }
        }
        Ok(())
    }
}

/// Default longest `id`, `tenant`, `type` and `source` of an event, in bytes
/// (`limits.max_attribute_bytes`).
pub const MAX_ATTRIBUTE_BYTES: usize = 512;

/// One step of a workflow run for an executor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionTask {
    pub task_id: String,
    pub run_id: String,
    pub event_id: String,
    pub event_type: String,
    pub tenant: String,
    pub workflow_id: String,
    pub workflow_version: i64,
    pub step_id: String,
    pub service: String,
    #[serde(default = "first_attempt")]
    pub attempt: i32,
    pub created_at: String,
    pub input: Json,
    /// The triggering event, carried through multi-step runs so later steps can render their
    /// input from it; null for single-step workflows.
    #[serde(default, skip_serializing_if = "Json::is_null")]
    pub event: Json,
    /// The step's own per-call timeout (`timeout_ms`), honoured up to the service's timeout;
    /// absent: the service's. Absent from tasks written before it existed, which decode as such.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// The step's own `retry`, honoured within the service's retry policy; absent: the service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<TaskRetry>,
    /// When the task stops being worth calling (`expires_after`): past it, the executor records
    /// an `expired` result instead of calling. Absent: it never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Its workflow's `priority`, which picks its action topic (`actions.<service>.high`…);
    /// absent: normal (as in tasks written before priorities existed). See [`Self::priority`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// Calls of the tenant with the same order key are made one at a time, in task order; tasks
    /// with different keys run side by side (up to the service's `tenant_concurrency`). Set from
    /// the workflow's `order_by`: the event's subject, or the run. Absent: the tenant is the key,
    /// all its calls in order (as in tasks written before order keys existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_key: Option<String>,
    /// When its run started, as the record stage partitions its rows by (`run_at`, see
    /// `sink.retention` in docs/operations.md): the Kafka timestamp of the event record that
    /// started the run, the same for every step of the run and on every redelivery, retry and
    /// replay, so that a result written twice lands in the same partition and conflicts. Absent
    /// from tasks written before it existed: their results fall back to `finished_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl ActionTask {
    /// Its priority: normal unless its workflow said otherwise.
    pub fn priority(&self) -> Priority {
        self.priority.unwrap_or_default()
    }
}

/// A step's own retry policy, carried on its tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRetry {
    /// Attempts in all, including the first.
    pub attempts: u32,
    /// The first backoff; later ones grow as the service's retry policy says.
    pub backoff_ms: u64,
}

fn first_attempt() -> i32 {
    1
}

/// Outcome of an action task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Succeeded,
    Failed,
    /// The step's `if` was false, or a step it needs was skipped.
    Skipped,
    /// The task was past its `expires_after` when it would have been called: no call was made.
    Expired,
    /// The run was cancelled (`weir runs cancel`) before this step started: no call was made.
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
            Status::Expired => "expired",
            Status::Cancelled => "cancelled",
        }
    }
}

/// Key of the object that stands in for a result's `output` that was not kept whole: an answer
/// longer than its service's `max_response_bytes` (the connectors), or an output that would
/// make the result's record too big (`limits.max_record_bytes`).
pub(crate) const TRUNCATED: &str = "weir.truncated";

/// What an executor reports for a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionResult {
    pub task_id: String,
    pub run_id: String,
    pub event_id: String,
    pub tenant: String,
    pub workflow_id: String,
    pub workflow_version: i64,
    pub step_id: String,
    pub service: String,
    pub status: Status,
    pub attempts: i32,
    pub latency_ms: f64,
    #[serde(default)]
    pub http_status: Option<i32>,
    /// What the call cost in the service's weighted unit (tokens, …): reported, else estimated.
    #[serde(default)]
    pub cost: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
    pub finished_at: String,
    #[serde(default)]
    pub output: Option<Json>,
    /// The task's `event`, passed on for the run coordinator (null for single-step workflows).
    #[serde(default, skip_serializing_if = "Json::is_null")]
    pub event: Json,
    /// The task's `run_at`: the time the record stage partitions the row by (see [`ActionTask`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl ActionResult {
    /// The outcome of calling the service for `task`, finished now. The task's fields move into
    /// the result; the call's details (`http_status`, `cost`, `error`, `output`) start empty, to
    /// be set with struct update syntax.
    pub(crate) fn from_task(task: ActionTask, status: Status, latency: std::time::Duration) -> ActionResult {
        ActionResult {
            task_id: task.task_id,
            run_id: task.run_id,
            event_id: task.event_id,
            tenant: task.tenant,
            workflow_id: task.workflow_id,
            workflow_version: task.workflow_version,
            step_id: task.step_id,
            service: task.service,
            status,
            attempts: task.attempt,
            latency_ms: latency.as_secs_f64() * 1e3,
            http_status: None,
            cost: None,
            error: None,
            finished_at: chrono::Utc::now().to_rfc3339(),
            output: None,
            event: task.event,
            run_at: task.run_at,
        }
    }

    /// A result decided without calling the service (no attempt, no latency): a step skipped,
    /// or a run or step that failed before its call, `error` saying why.
    pub(crate) fn decided(
        run: &RunRef<'_>,
        task_id: String,
        step: &str,
        service: &str,
        status: Status,
        error: Option<String>,
    ) -> Self {
        ActionResult {
            task_id,
            run_id: run.run_id.to_string(),
            event_id: run.event_id.to_string(),
            tenant: run.tenant.to_string(),
            workflow_id: run.workflow_id.to_string(),
            workflow_version: run.workflow_version,
            step_id: step.to_string(),
            service: service.to_string(),
            status,
            attempts: 0,
            latency_ms: 0.0,
            http_status: None,
            cost: None,
            error,
            finished_at: run.now.to_string(),
            output: None,
            event: Json::Null,
            run_at: None,
        }
    }
}

/// The run a decided result belongs to, and when the decision is made.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunRef<'a> {
    pub run_id: &'a str,
    pub event_id: &'a str,
    pub tenant: &'a str,
    pub workflow_id: &'a str,
    pub workflow_version: i64,
    /// RFC 3339: the decided result's `finished_at`.
    pub now: &'a str,
}

/// A record type with an Avro schema in `schemas/`.
pub trait Record: Serialize + DeserializeOwned {
    /// The fields that hold arbitrary JSON, carried as JSON text in Avro.
    const JSON_FIELDS: &'static [&'static str];
    fn schema() -> &'static Schema;
    /// The single-object readers of the schema and of its earlier versions (`schemas/history/`),
    /// built once: building one per record (it copies the schema and fingerprints it) cost 8×
    /// the JSON decode. A single-object record names its writer's schema by fingerprint, so a
    /// record written before a field was added is read with the schema it was written with; the
    /// added fields are optional and take their defaults.
    fn readers() -> &'static [GenericSingleObjectReader];
}

macro_rules! record_schema {
    ($ty:ty, $file:literal, [$($field:literal),*], history: [$($old:literal),*]) => {
        impl Record for $ty {
            const JSON_FIELDS: &'static [&'static str] = &[$($field),*];
            fn schema() -> &'static Schema {
                static SCHEMA: OnceLock<Schema> = OnceLock::new();
                SCHEMA.get_or_init(|| {
                    Schema::parse_str(include_str!(concat!("../schemas/", $file)))
                        .expect(concat!("schemas/", $file, " is a valid Avro schema"))
                })
            }
            fn readers() -> &'static [GenericSingleObjectReader] {
                static READERS: OnceLock<Vec<GenericSingleObjectReader>> = OnceLock::new();
                READERS.get_or_init(|| {
                    let older = [$(include_str!(concat!("../schemas/history/", $old))),*].into_iter().map(|text| {
                        Schema::parse_str(text).expect(concat!("the history of schemas/", $file, " is valid Avro"))
                    });
                    std::iter::once(Self::schema().clone())
                        .chain(older)
                        .map(|schema| {
                            GenericSingleObjectReader::new(schema)
                                .expect(concat!("schemas/", $file, " has a single-object reader"))
                        })
                        .collect()
                })
            }
        }
    };
}

record_schema!(Event, "event.avsc", ["data"], history: ["event.1.avsc"]);
record_schema!(ActionTask, "action_task.avsc", ["input", "event"], history: ["action_task.2.avsc", "action_task.1.avsc"]);
record_schema!(ActionResult, "action_result.avsc", ["output", "event"], history: ["action_result.1.avsc"]);

/// Reads a single-object Avro record with the first of `T`'s readers whose schema wrote it (the
/// current one, or an earlier version's); the current reader's error if none did.
fn read_avro<T: Record>(payload: &[u8]) -> Result<apache_avro::types::Value, DecodeError> {
    let mut first = None;
    for reader in T::readers() {
        match reader.read_value(&mut &payload[..]) {
            Ok(value) => return Ok(value),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    Err(DecodeError::Avro(first.map(|e| e.to_string()).unwrap_or_default()))
}

/// Encodes `value` in `format`.
pub fn encode<T: Record>(value: &T, format: Format) -> Result<Vec<u8>, DecodeError> {
    match format {
        Format::Json => Ok(serde_json::to_vec(value)?),
        Format::Avro => {
            let mut json = serde_json::to_value(value)?;
            if let Json::Object(map) = &mut json {
                for field in T::JSON_FIELDS {
                    if let Some(v) = map.get_mut(*field) {
                        if !v.is_null() {
                            *v = Json::String(v.to_string());
                        }
                    }
                }
            }
            let avro = apache_avro::types::Value::from(json)
                .resolve(T::schema())
                .map_err(|e| DecodeError::Avro(e.to_string()))?;
            let mut writer = GenericSingleObjectWriter::new_with_capacity(T::schema(), 1024)
                .map_err(|e| DecodeError::Avro(e.to_string()))?;
            let mut out = Vec::with_capacity(256);
            writer.write_value(avro, &mut out).map_err(|e| DecodeError::Avro(e.to_string()))?;
            Ok(out)
        }
    }
}

/// Decodes a payload whose encoding the `content-type` header names.
pub fn decode<T: Record>(payload: &[u8], content_type: Option<&[u8]>) -> Result<T, DecodeError> {
    match Format::from_content_type(content_type)? {
        Format::Json => Ok(serde_json::from_slice(payload)?),
        Format::Avro => {
            let value = read_avro::<T>(payload)?;
            let mut json = Json::try_from(value).map_err(|e| DecodeError::Avro(e.to_string()))?;
            if let Json::Object(map) = &mut json {
                for field in T::JSON_FIELDS {
                    if let Some(v) = map.get_mut(*field) {
                        if let Json::String(text) = v {
                            *v = serde_json::from_str(text)?;
                        }
                    }
                }
            }
            Ok(serde_json::from_value(json)?)
        }
    }
}

/// Decodes and validates an event, refusing payloads over `max_bytes`.
pub fn decode_event(payload: &[u8], content_type: Option<&[u8]>, max_bytes: usize) -> Result<Event, DecodeError> {
    decode_unparsed_event(payload, content_type, max_bytes)?
        .map_data(|body| body.parse(|text| serde_json::from_str(text)))
}

/// Like [`decode_event`], leaving a JSON body as text: it is checked to be well-formed JSON, but
/// not turned into values. [`Body::parse`] does that, for what is read.
pub fn decode_unparsed_event<'a>(
    payload: &'a [u8],
    content_type: Option<&[u8]>,
    max_bytes: usize,
) -> Result<UnparsedEvent<'a>, DecodeError> {
    decode_unparsed_event_within(payload, content_type, max_bytes, MAX_ATTRIBUTE_BYTES)
}

/// [`decode_unparsed_event`] with an attribute length limit (see [`Event::validate_within`]).
pub(crate) fn decode_unparsed_event_within<'a>(
    payload: &'a [u8],
    content_type: Option<&[u8]>,
    max_bytes: usize,
    max_attribute_bytes: usize,
) -> Result<UnparsedEvent<'a>, DecodeError> {
    if payload.len() > max_bytes {
        return Err(DecodeError::TooLarge { size: payload.len(), limit: max_bytes });
    }
    let event = match Format::from_content_type(content_type)? {
        Format::Json => {
            let event: Event<Option<&serde_json::value::RawValue>> = serde_json::from_slice(payload)?;
            event.map_data(|text| Ok::<_, DecodeError>(Body::Text(text)))?
        }
        Format::Avro => {
            let event: Event = decode(payload, content_type)?;
            event.map_data(|json| Ok::<_, DecodeError>(Body::Parsed(json)))?
        }
    };
    event.validate_within(max_attribute_bytes)?;
    Ok(event)
}

impl Body<'_> {
    /// The body as JSON values; `parse` turns JSON text into them (all of it, or only what is
    /// read: see `engine::condition::FieldPaths::parse_selected`).
    pub fn parse(self, parse: impl FnOnce(&str) -> serde_json::Result<Json>) -> Result<Json, DecodeError> {
        match self {
            Body::Text(Some(text)) => Ok(parse(text.get())?),
            Body::Text(None) => Ok(Json::Null),
            Body::Parsed(json) => Ok(json),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> Event {
        Event {
            specversion: "1.0".into(),
            id: "e-1".into(),
            source: "/ghost/site-1".into(),
            kind: "member.created".into(),
            time: Some("2026-11-23T10:00:00Z".into()),
            tenant: "t-1".into(),
            subject: None,
            datacontenttype: Some(JSON.into()),
            data: json!({"member": {"email": "a@example.com", "paid": true, "n": 3}}),
        }
    }

    #[test]
    fn event_round_trips_in_both_formats() {
        for format in [Format::Json, Format::Avro] {
            let bytes = encode(&event(), format).unwrap();
            let back: Event = decode(&bytes, Some(format.content_type().as_bytes())).unwrap();
            assert_eq!(back, event(), "{format:?}");
        }
    }

    #[test]
    fn an_event_with_a_subject_round_trips_and_one_written_with_the_earlier_schema_still_decodes() {
        let with = Event { subject: Some("member/42".into()), ..event() };
        let back: Event = decode(&encode(&with, Format::Avro).unwrap(), Some(AVRO.as_bytes())).unwrap();
        assert_eq!(back, with);
        // A producer still on schemas/history/event.1.avsc (no subject): its fingerprint differs.
        let old = Schema::parse_str(include_str!("../schemas/history/event.1.avsc")).unwrap();
        let mut json = serde_json::to_value(event()).unwrap();
        json["data"] = Json::String(json["data"].to_string());
        json.as_object_mut().unwrap().remove("subject");
        let value = apache_avro::types::Value::from(json).resolve(&old).unwrap();
        let mut bytes = Vec::new();
        GenericSingleObjectWriter::new_with_capacity(&old, 1024).unwrap().write_value(value, &mut bytes).unwrap();
        assert_ne!(bytes, encode(&event(), Format::Avro).unwrap(), "written with another fingerprint");
        let back: Event = decode(&bytes, Some(AVRO.as_bytes())).unwrap();
        assert_eq!(back, event());
        // Garbage still fails, naming the current schema's complaint.
        assert!(matches!(decode::<Event>(b"\xc3\x01nonsense", Some(AVRO.as_bytes())), Err(DecodeError::Avro(_))));
    }

    #[test]
    fn a_result_written_before_run_at_existed_still_decodes_without_one() {
        let old = Schema::parse_str(include_str!("../schemas/history/action_result.1.avsc")).unwrap();
        let json = serde_json::json!({"task_id": "k", "run_id": "r", "event_id": "e", "tenant": "t",
            "workflow_id": "w", "workflow_version": 1, "step_id": "s", "service": "webhook", "status": "succeeded",
            "attempts": 1, "latency_ms": 1.0, "http_status": null, "cost": null, "error": null,
            "finished_at": "2026-11-23T10:00:00Z", "output": null, "event": null});
        let value = apache_avro::types::Value::from(json.clone()).resolve(&old).unwrap();
        let mut bytes = Vec::new();
        GenericSingleObjectWriter::new_with_capacity(&old, 1024).unwrap().write_value(value, &mut bytes).unwrap();
        let back: ActionResult = decode(&bytes, Some(AVRO.as_bytes())).unwrap();
        assert_eq!(back, serde_json::from_value::<ActionResult>(json).unwrap());
        assert_eq!(back.run_at, None);
    }

    #[test]
    fn a_subject_is_checked_like_the_other_attributes() {
        let long = Event { subject: Some("s".repeat(MAX_ATTRIBUTE_BYTES + 1)), ..event() };
        assert!(long.validate().unwrap_err().to_string().contains("'subject'"));
        let control = Event { subject: Some("a\nb".into()), ..event() };
        assert!(control.validate().unwrap_err().to_string().contains("'subject'"));
        assert!(Event { subject: Some("member/42".into()), ..event() }.validate().is_ok());
    }

    #[test]
    fn task_and_result_round_trip_through_their_avro_schemas() {
        let task = ActionTask {
            task_id: "k".into(),
            run_id: "r".into(),
            event_id: "e".into(),
            event_type: "member.created".into(),
            tenant: "t".into(),
            workflow_id: "w".into(),
            workflow_version: 2,
            step_id: "s".into(),
            service: "webhook".into(),
            attempt: 1,
            created_at: "2026-11-23T10:00:00Z".into(),
            input: json!({"a": [1, 2]}),
            event: json!({"id": "e"}),
            timeout_ms: Some(100),
            retry: Some(TaskRetry { attempts: 3, backoff_ms: 50 }),
            expires_at: Some("2026-11-24T10:00:00Z".parse().unwrap()),
            priority: Some(Priority::High),
            order_key: Some("subject:member/1".into()),
            run_at: Some("2026-11-23T09:59:59.123Z".parse().unwrap()),
        };
        let json = encode(&task, Format::Json).unwrap();
        assert_eq!(decode::<ActionTask>(&json, Some(b"application/json")).unwrap(), task);
        let bytes = encode(&task, Format::Avro).unwrap();
        assert_eq!(decode::<ActionTask>(&bytes, Some(AVRO.as_bytes())).unwrap(), task);
        let result = ActionResult {
            task_id: "k".into(),
            run_id: "r".into(),
            event_id: "e".into(),
            tenant: "t".into(),
            workflow_id: "w".into(),
            workflow_version: 2,
            step_id: "s".into(),
            service: "webhook".into(),
            status: Status::Failed,
            attempts: 3,
            latency_ms: 1.5,
            http_status: Some(503),
            cost: Some(7),
            error: Some("unavailable".into()),
            finished_at: "2026-11-23T10:00:01Z".into(),
            output: None,
            event: Json::Null,
            run_at: Some("2026-11-23T09:59:59.123Z".parse().unwrap()),
        };
        let bytes = encode(&result, Format::Avro).unwrap();
        assert_eq!(decode::<ActionResult>(&bytes, Some(AVRO.as_bytes())).unwrap(), result);
    }

    #[test]
    fn bad_payloads_name_what_is_wrong() {
        let err = decode_event(b"{not json", None, 1 << 20).unwrap_err();
        assert!(err.to_string().starts_with("invalid JSON"), "{err}");
        let err = decode_event(b"\xC3\x01garbage", Some(b"application/avro"), 1 << 20).unwrap_err();
        assert!(err.to_string().starts_with("invalid Avro"), "{err}");
        let err = decode_event(b"{}", Some(b"text/csv"), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("text/csv"), "{err}");
        let mut e = event();
        e.tenant = " ".into();
        let err = decode_event(&serde_json::to_vec(&e).unwrap(), None, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("tenant"), "{err}");
        let err = decode_event(&[b' '; 100], None, 10).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { size: 100, limit: 10 }));
    }

    #[test]
    fn control_characters_and_long_attributes_are_refused_naming_the_attribute() {
        for (name, set) in [
            ("tenant", (|e: &mut Event, v: String| e.tenant = v) as fn(&mut Event, String)),
            ("id", |e, v| e.id = v),
            ("type", |e, v| e.kind = v),
            ("source", |e, v| e.source = v),
        ] {
            for bad in ["nul\u{0}ten", "cr\rlf", "lf\nx", "tab\tx", "del\u{7f}x", "c1\u{85}x"] {
                let mut e = event();
                set(&mut e, bad.into());
                // Through the JSON the wire carries (`\u0000` is valid JSON) and through Avro.
                for format in [Format::Json, Format::Avro] {
                    let bytes = encode(&e, format).unwrap();
                    let err = decode_event(&bytes, Some(format.content_type().as_bytes()), 1 << 20).unwrap_err();
                    let text = err.to_string();
                    assert!(text.contains(&format!("'{name}'")) && text.contains("control character"), "{text}");
                    assert!(!text.contains(bad), "the reason must not quote the value: {text}");
                }
            }
            let mut e = event();
            set(&mut e, "x".repeat(513));
            let err = decode_event(&serde_json::to_vec(&e).unwrap(), None, 1 << 20).unwrap_err();
            assert!(err.to_string().contains(&format!("'{name}' is 513 bytes, over the limit of 512")), "{err}");
            let bytes = serde_json::to_vec(&e).unwrap();
            assert!(decode_unparsed_event_within(&bytes, None, 1 << 20, 1024).is_ok());
        }
        // Non-ASCII text is fine: it is valid in headers (as UTF-8 bytes), keys and columns.
        let mut e = event();
        e.tenant = "café-☕".into();
        decode_event(&serde_json::to_vec(&e).unwrap(), None, 1 << 20).unwrap();
        let raw = br#"{"id":"e","source":"/s","type":"a","tenant":"nul\u0000ten"}"#;
        assert!(decode_event(raw, None, 1 << 20).unwrap_err().to_string().contains("U+0000"));
    }

    proptest::proptest! {
        /// Arbitrary bytes under either content type give an error or an event, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512), avro in proptest::bool::ANY) {
            let ct: &[u8] = if avro { b"application/avro" } else { b"application/json" };
            let _ = decode_event(&bytes, Some(ct), 1 << 20);
        }
    }
}
