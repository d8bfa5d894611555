//! How a request's body (and headers) become events, per source format. Each format knows its
//! own shape; what they share is here: the request as the formats see it, the checks every
//! event passes (a body naming another tenant than the credential's is refused, attributes are
//! validated as the evaluator would), and the ids generated for formats that carry none.

pub(super) mod cloudevents;
pub(super) mod generic;
pub(super) mod ghost;
pub(super) mod standard_webhooks;

use axum::http::HeaderMap;
use serde_json::Value as Json;

use super::{auth::Authenticated, refusal::Refusal};
use crate::{
    config::{SourceConfig, SourceFormat},
    envelope::Event,
};

/// A verified request, as the formats read it.
pub(super) struct Request<'a> {
    pub source_name: &'a str,
    pub source: &'a SourceConfig,
    pub auth: &'a Authenticated,
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    pub body: &'a [u8],
    pub max_attribute_bytes: usize,
}

/// The events of `request`, in order, or why it is refused.
pub(super) fn parse(request: &Request<'_>) -> Result<Vec<Event>, Refusal> {
    let events = match request.source.format {
        SourceFormat::Cloudevents => cloudevents::parse(request)?,
        SourceFormat::Ghost => vec![ghost::parse(request)?],
        SourceFormat::StandardWebhooks => vec![standard_webhooks::parse(request)?],
        SourceFormat::Generic => vec![generic::parse(request)?],
    };
    for (i, event) in events.iter().enumerate() {
        event.validate_within(request.max_attribute_bytes).map_err(|e| Refusal::invalid(at(&events, i, e)))?;
    }
    Ok(events)
}

/// `event <i>: <what>` in a batch, `<what>` alone otherwise.
fn at(events: &[Event], i: usize, what: impl std::fmt::Display) -> String {
    if events.len() > 1 {
        format!("event {i}: {what}")
    } else {
        what.to_string()
    }
}

impl Request<'_> {
    /// The body as JSON; not JSON is a 400 naming the parser's complaint.
    fn json(&self) -> Result<Json, Refusal> {
        serde_json::from_slice(self.body).map_err(|e| Refusal::invalid(format!("the body is not valid JSON: {e}")))
    }

    /// The `source` attribute of events whose format has none.
    fn event_source(&self) -> String {
        self.source.event_source.clone().unwrap_or_else(|| format!("/ingest/{}", self.source_name))
    }

    /// Refuses a body that names a tenant other than the credential's (403); `named` is the
    /// tenant the body names, if it names one.
    fn check_tenant(&self, named: Option<&Json>) -> Result<(), Refusal> {
        match named {
            None | Some(Json::Null) => Ok(()),
            Some(Json::String(t)) if *t == self.auth.tenant => Ok(()),
            Some(_) => Err(Refusal::forbidden(format!(
                "the body names another tenant than the credential's ({})",
                self.auth.tenant
            ))),
        }
    }

    /// An id for an event whose format carries none: the same for the same signed request (a
    /// sender's retry of it gets the same id, and the pipeline's task ids, derived from it,
    /// make the retry harmless), random for an unsigned one.
    fn derived_id(&self) -> String {
        match (&self.auth.webhook_id, self.auth.signed_at_ms) {
            (Some(id), _) => id.clone(),
            (None, Some(at)) => {
                let name = format!(
                    "{}\n{}\n{at}\n{}",
                    self.source_name,
                    self.auth.tenant,
                    crate::kafka::limits::sha256_hex(self.body)
                );
                uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, name.as_bytes()).to_string()
            }
            (None, None) => uuid::Uuid::new_v4().to_string(),
        }
    }

    /// The time of an event whose format carries none: when it was signed, else now.
    fn time(&self) -> String {
        let at =
            self.auth.signed_at_ms.and_then(chrono::DateTime::from_timestamp_millis).unwrap_or_else(chrono::Utc::now);
        at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }

    /// An event of `kind` carrying `data`, for the formats that map a body into one.
    fn event(&self, id: String, kind: String, time: Option<String>, data: Json) -> Event {
        Event {
            specversion: "1.0".into(),
            id,
            source: self.event_source(),
            kind,
            time: Some(time.unwrap_or_else(|| self.time())),
            tenant: self.auth.tenant.clone(),
            subject: None,
            datacontenttype: Some(content_type(self.headers).unwrap_or(crate::envelope::JSON).to_string()),
            data,
        }
    }
}

/// The request's `Content-Type`, as sent.
fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok())
}

/// The media type of a `Content-Type` value, lowercase, without its parameters.
fn essence(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}
