//! Standard Webhooks (standardwebhooks.com): the body is `{"type", "timestamp", "data"}`, the
//! event id the `webhook-id` header (the same across the sender's retries), the signature
//! checked in `auth`. A body with a top-level `tenant` must name the credential's tenant.

use serde_json::Value as Json;

use super::Request;
use crate::{envelope::Event, stages::ingest::refusal::Refusal};

pub(super) fn parse(request: &Request<'_>) -> Result<Event, Refusal> {
    let Json::Object(mut body) = request.json()? else {
        return Err(Refusal::invalid("a Standard Webhooks body is a JSON object {\"type\", \"timestamp\", \"data\"}"));
    };
    request.check_tenant(body.get("tenant"))?;
    let kind = match body.remove("type") {
        Some(Json::String(kind)) => kind,
        _ => return Err(Refusal::invalid("the body's `type` (a string) names the event type")),
    };
    let time = match body.remove("timestamp") {
        Some(Json::String(t)) => Some(t),
        _ => None,
    };
    let data = body.remove("data").unwrap_or(Json::Null);
    Ok(request.event(request.derived_id(), kind, time, data))
}
