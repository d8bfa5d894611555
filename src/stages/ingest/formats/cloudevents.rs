//! The CloudEvents HTTP protocol binding (v1.0.2), all three modes:
//!
//! - *structured*: `Content-Type: application/cloudevents+json`, the body is one event;
//! - *batch*: `application/cloudevents-batch+json`, the body is a JSON array of events, produced
//!   in their order;
//! - *binary*: the attributes in `ce-*` headers (`ce-id`, `ce-source`, `ce-type`,
//!   `ce-specversion`, optional `ce-time`, `ce-tenant`), the body is the data and its
//!   `Content-Type` the `datacontenttype`. JSON data (`application/json`, `*+json`) is kept as
//!   JSON; `text/*` as a string; other media types are refused (415), since weir's events carry
//!   JSON.
//!
//! `tenant` is weir's extension attribute: absent, it is set to the credential's tenant; present,
//! it must be that tenant (403 otherwise).

use serde_json::{Map, Value as Json};

use super::{content_type, essence, Request};
use crate::{envelope::Event, stages::ingest::refusal::Refusal};

pub(super) const STRUCTURED: &str = "application/cloudevents+json";
pub(super) const BATCH: &str = "application/cloudevents-batch+json";

pub(super) fn parse(request: &Request<'_>) -> Result<Vec<Event>, Refusal> {
    let media = content_type(request.headers).map(essence).unwrap_or_default();
    if media == STRUCTURED {
        return Ok(vec![from_json(request, request.json()?, None)?]);
    }
    if media == BATCH {
        let Json::Array(items) = request.json()? else {
            return Err(Refusal::invalid("a cloudevents batch is a JSON array of events"));
        };
        if items.is_empty() {
            return Err(Refusal::invalid("the batch holds no event"));
        }
        return items.into_iter().enumerate().map(|(i, item)| from_json(request, item, Some(i))).collect();
    }
    if request.headers.contains_key("ce-specversion") {
        return Ok(vec![binary(request, &media)?]);
    }
    Err(Refusal::unsupported(format!(
        "a cloudevents source takes {STRUCTURED}, {BATCH}, or binary mode (ce-* headers); got Content-Type {media:?}"
    )))
}

/// One event of structured or batch mode.
fn from_json(request: &Request<'_>, value: Json, index: Option<usize>) -> Result<Event, Refusal> {
    let name = |what: String| match index {
        Some(i) => format!("event {i}: {what}"),
        None => what,
    };
    let Json::Object(mut attributes) = value else {
        return Err(Refusal::invalid(name("an event is a JSON object".into())));
    };
    request.check_tenant(attributes.get("tenant")).map_err(|r| Refusal { reason: name(r.reason), ..r })?;
    if attributes.contains_key("data_base64") {
        return Err(Refusal::unsupported(name("data_base64 is not supported: weir's events carry JSON data".into())));
    }
    match attributes.get("specversion") {
        Some(Json::String(v)) if v == "1.0" => {}
        _ => return Err(Refusal::invalid(name("specversion must be \"1.0\"".into()))),
    }
    attributes.insert("tenant".into(), Json::String(request.auth.tenant.clone()));
    serde_json::from_value(Json::Object(attributes))
        .map_err(|e| Refusal::invalid(name(format!("not a CloudEvent: {e}"))))
}

/// Binary mode: attributes from `ce-*` headers, the body as data.
fn binary(request: &Request<'_>, media: &str) -> Result<Event, Refusal> {
    let mut attributes = Map::new();
    for (name, value) in request.headers {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else { continue };
        let value = value.to_str().map_err(|_| Refusal::invalid(format!("header {name} is not ASCII")))?;
        attributes.insert(attribute.to_string(), Json::String(value.to_string()));
    }
    let data = if request.body.is_empty() {
        Json::Null
    } else if media == "application/json" || media.ends_with("+json") {
        request.json()?
    } else if media.starts_with("text/") {
        let text = std::str::from_utf8(request.body).map_err(|_| Refusal::invalid("text data is not UTF-8"))?;
        Json::String(text.to_string())
    } else {
        return Err(Refusal::unsupported(format!(
            "binary-mode data of Content-Type {media:?}: weir's events carry JSON or text"
        )));
    };
    if let Some(ct) = content_type(request.headers) {
        attributes.insert("datacontenttype".into(), Json::String(ct.to_string()));
    }
    attributes.insert("data".into(), data);
    from_json(request, Json::Object(attributes), None)
}
