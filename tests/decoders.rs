//! The decoders of src/envelope.rs meet whatever a producer puts on a topic: arbitrary bytes,
//! arbitrary JSON, Avro that is almost right. Whatever it is, they return a value or an error,
//! never panic (a panic in a stage is an exit for every tenant of the process).

use proptest::prelude::*;
use serde_json::{json, Value as Json};
use weir::envelope::{
    self, decode, decode_event, decode_unparsed_event, encode, ActionResult, ActionTask, Event, Format, Record,
};

/// Content-type headers a record may carry: none, the ones weir knows, and arbitrary bytes.
fn content_type() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        Just(None),
        Just(Some(b"application/json".to_vec())),
        Just(Some(b"application/cloudevents+json; charset=utf-8".to_vec())),
        Just(Some(b"application/avro".to_vec())),
        Just(Some(b"avro/binary".to_vec())),
        Just(Some(Vec::new())),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Some),
    ]
}

/// Arbitrary JSON, nested a few levels.
fn json_value() -> impl Strategy<Value = Json> {
    json_value_with(any::<f64>().prop_map(Json::from).boxed()) // NaN and infinities become null
}

/// Arbitrary JSON whose numbers are integers: serde_json's default float parsing is not exact to
/// the last bit, so only these compare equal after a round trip.
fn exact_json_value() -> impl Strategy<Value = Json> {
    json_value_with(any::<i32>().prop_map(Json::from).boxed())
}

fn json_value_with(number: BoxedStrategy<Json>) -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::from),
        any::<i64>().prop_map(Json::from),
        any::<u64>().prop_map(Json::from),
        number,
        ".*".prop_map(Json::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Json::from),
            proptest::collection::btree_map(".*", inner, 0..6).prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

/// Every field name of the three records.
const FIELDS: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "tenant",
    "datacontenttype",
    "data",
    "task_id",
    "run_id",
    "event_id",
    "event_type",
    "workflow_id",
    "workflow_version",
    "step_id",
    "service",
    "attempt",
    "created_at",
    "input",
    "event",
    "status",
    "attempts",
    "latency_ms",
    "http_status",
    "cost",
    "error",
    "finished_at",
    "output",
];

/// An object with the records' field names and arbitrary values: what gets past "is it JSON" and
/// into the field-by-field checks.
fn record_like() -> impl Strategy<Value = Json> {
    let value = prop_oneof![
        json_value(),
        ".*".prop_map(Json::from),
        Just(Json::from("succeeded")),
        Just(Json::from("failed")),
        any::<i32>().prop_map(Json::from),
    ];
    proptest::collection::btree_map(proptest::sample::select(FIELDS), value, 0..FIELDS.len())
        .prop_map(|m| Json::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

/// Decodes `payload` under `content_type` with every decoder; any outcome but a panic is fine.
fn decode_all(payload: &[u8], content_type: Option<&[u8]>) {
    let _ = decode::<Event>(payload, content_type);
    let _ = decode::<ActionTask>(payload, content_type);
    let _ = decode::<ActionResult>(payload, content_type);
    let _ = decode_event(payload, content_type, 1 << 20);
    if let Ok(event) = decode_unparsed_event(payload, content_type, 1 << 20) {
        let _ = event.map_data(|body| body.parse(|text| serde_json::from_str(text)));
    }
    let _ = Format::from_content_type(content_type);
}

/// The single-object header (marker and schema fingerprint) of `T`: bytes after it are read as
/// a datum of `T`'s schema, which is where a decoder meets lengths and unions it must not trust.
fn avro_header<T: Record>(sample: &T) -> Vec<u8> {
    encode(sample, Format::Avro).unwrap()[..10].to_vec()
}

fn sample_event() -> Event {
    serde_json::from_value(json!({"id": "e", "source": "/s", "type": "t", "tenant": "a", "data": {"x": [1, "y"]}}))
        .unwrap()
}

fn sample_task() -> ActionTask {
    serde_json::from_value(json!({"task_id": "k", "run_id": "r", "event_id": "e", "event_type": "t", "tenant": "a",
        "workflow_id": "w", "workflow_version": 1, "step_id": "s", "service": "webhook", "attempt": 1,
        "created_at": "2026-11-23T10:00:00Z", "input": {"a": 1}, "event": {"id": "e"}}))
    .unwrap()
}

fn sample_result() -> ActionResult {
    serde_json::from_value(json!({"task_id": "k", "run_id": "r", "event_id": "e", "tenant": "a", "workflow_id": "w",
        "workflow_version": 1, "step_id": "s", "service": "webhook", "status": "failed", "attempts": 2,
        "latency_ms": 1.5, "http_status": 503, "cost": 3, "error": "no", "finished_at": "2026-11-23T10:00:01Z",
        "output": {"b": [true]}, "event": {"id": "e"}}))
    .unwrap()
}

/// The three samples, Avro-encoded.
fn valid_avro() -> Vec<Vec<u8>> {
    vec![
        encode(&sample_event(), Format::Avro).unwrap(),
        encode(&sample_task(), Format::Avro).unwrap(),
        encode(&sample_result(), Format::Avro).unwrap(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_under_any_content_type(
        payload in proptest::collection::vec(any::<u8>(), 0..1024),
        ct in content_type(),
    ) {
        decode_all(&payload, ct.as_deref());
    }

    #[test]
    fn arbitrary_json_under_any_content_type(value in json_value(), ct in content_type()) {
        decode_all(&serde_json::to_vec(&value).unwrap(), ct.as_deref());
    }

    #[test]
    fn objects_with_the_records_fields_and_arbitrary_values(value in record_like(), ct in content_type()) {
        let payload = serde_json::to_vec(&value).unwrap();
        decode_all(&payload, ct.as_deref());
    }

    /// A correct single-object header followed by arbitrary bytes: the Avro reader then trusts
    /// lengths and union indexes from the input.
    #[test]
    fn avro_datum_of_arbitrary_bytes(which in 0..3usize, datum in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut payload = match which {
            0 => avro_header(&sample_event()),
            1 => avro_header(&sample_task()),
            _ => avro_header(&sample_result()),
        };
        payload.extend_from_slice(&datum);
        decode_all(&payload, Some(envelope::AVRO.as_bytes()));
    }

    /// Valid Avro records truncated and with bytes overwritten.
    #[test]
    fn avro_records_mutated(
        which in 0..3usize,
        cut in any::<proptest::sample::Index>(),
        flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..8),
    ) {
        let mut payload = valid_avro().swap_remove(which);
        for (at, byte) in flips {
            let i = at.index(payload.len());
            payload[i] = byte;
        }
        payload.truncate(cut.index(payload.len() + 1));
        decode_all(&payload, Some(envelope::AVRO.as_bytes()));
    }

    /// Events with arbitrary attributes (control characters, any length, empty) and bodies come
    /// back equal from both encodings; validating them gives an answer, never a panic.
    #[test]
    fn arbitrary_events_round_trip_through_both_encodings(
        id in ".*", source in ".*", kind in ".*", tenant in ".*", subject in proptest::option::of(".*"),
        data in exact_json_value(), avro in any::<bool>(),
    ) {
        let event: Event = Event { specversion: "1.0".into(), id, source, kind, time: None, tenant, subject,
            datacontenttype: None, data };
        let format = if avro { Format::Avro } else { Format::Json };
        let bytes = encode(&event, format).unwrap();
        let back: Event = decode(&bytes, Some(format.content_type().as_bytes())).unwrap();
        prop_assert_eq!(&back, &event);
        let _ = decode_event(&bytes, Some(format.content_type().as_bytes()), 1 << 20);
    }
}
