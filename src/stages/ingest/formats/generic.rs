//! Any signed (or token-carrying) JSON body, mapped by the source's `generic` section: the type
//! fixed or read at a JSON pointer, the id read at a pointer (else the `webhook-id`, else
//! derived), the data the whole body or the part at a pointer. A body holding a tenant at
//! `tenant_pointer` must name the credential's.

use serde_json::Value as Json;

use super::Request;
use crate::{envelope::Event, stages::ingest::refusal::Refusal};

pub(super) fn parse(request: &Request<'_>) -> Result<Event, Refusal> {
    let mapping = request.source.generic.as_ref().ok_or_else(|| Refusal::invalid("the source has no mapping"))?;
    let body = request.json()?;
    if let Some(pointer) = &mapping.tenant_pointer {
        request.check_tenant(body.pointer(pointer))?;
    }
    let kind = match (&mapping.event_type, &mapping.type_pointer) {
        (Some(kind), _) => kind.clone(),
        (None, Some(pointer)) => match body.pointer(pointer) {
            Some(Json::String(kind)) => kind.clone(),
            _ => return Err(Refusal::invalid(format!("the body holds no event type (a string) at {pointer}"))),
        },
        (None, None) => return Err(Refusal::invalid("the source's mapping names no event type")),
    };
    let id = match mapping.id_pointer.as_ref().map(|p| (p, body.pointer(p))) {
        Some((_, Some(Json::String(id)))) => id.clone(),
        Some((_, Some(Json::Number(n)))) => n.to_string(),
        Some((pointer, _)) => {
            return Err(Refusal::invalid(format!("the body holds no id (a string or number) at {pointer}")))
        }
        None => request.derived_id(),
    };
    let data = match &mapping.data_pointer {
        Some(pointer) => body.pointer(pointer).cloned().unwrap_or(Json::Null),
        None => body,
    };
    Ok(request.event(id, kind, None, data))
}
