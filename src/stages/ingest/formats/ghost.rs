//! Ghost's webhooks. Ghost sends one webhook per event and target URL, with the event's
//! resource as the body (`{"member": {"current": …, "previous": …}}`, `{"post": …}`) and no
//! event name in the body or the headers, so the URL configured in Ghost names it:
//! `POST /ingest/<source>/<tenant>?event=member.added`. The signature is checked in `auth`.
//!
//! Ghost's event names become weir's: `added` → `created` and `edited` → `updated` (as the
//! sample workflows and the demo name them: `member.added` → `member.created`,
//! `post.published.edited` → `post.published.updated`); the others keep their names. The id
//! is derived from the signed request, so Ghost's own retries of a delivery (same body, same
//! signature) are one event.

use serde_json::Value as Json;

use super::Request;
use crate::{envelope::Event, stages::ingest::refusal::Refusal};

/// Every event Ghost sends webhooks for (`ghost/core/core/server/services/webhooks/listen.js`).
pub(crate) const EVENTS: [&str; 29] = [
    "site.changed",
    "post.added",
    "post.deleted",
    "post.edited",
    "post.published",
    "post.published.edited",
    "post.unpublished",
    "post.scheduled",
    "post.unscheduled",
    "post.rescheduled",
    "page.added",
    "page.deleted",
    "page.edited",
    "page.published",
    "page.published.edited",
    "page.unpublished",
    "page.scheduled",
    "page.unscheduled",
    "page.rescheduled",
    "tag.added",
    "tag.edited",
    "tag.deleted",
    "member.added",
    "member.deleted",
    "member.edited",
    "post.tag.attached",
    "post.tag.detached",
    "page.tag.attached",
    "page.tag.detached",
];

/// weir's name of a Ghost event.
pub(crate) fn weir_type(ghost: &str) -> String {
    let mut parts: Vec<&str> = ghost.split('.').collect();
    if let Some(last) = parts.last_mut() {
        *last = match *last {
            "added" => "created",
            "edited" => "updated",
            other => other,
        };
    }
    parts.join(".")
}

pub(super) fn parse(request: &Request<'_>) -> Result<Event, Refusal> {
    let event = request
        .query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("event="))
        .ok_or_else(|| Refusal::invalid("name the Ghost event in the URL: ?event=member.added"))?;
    if !EVENTS.contains(&event) {
        return Err(Refusal::invalid(format!("unknown Ghost event {event:?} (one of {})", EVENTS.join(", "))));
    }
    let data = request.json()?;
    let resource = event.split('.').next().unwrap_or_default();
    if resource != "site" && data.get(resource).is_none() {
        return Err(Refusal::invalid(format!("a Ghost {event} webhook's body holds a `{resource}` object")));
    }
    let subject = subject(resource, &data);
    Ok(Event { subject, ..request.event(request.derived_id(), weir_type(event), None, data) })
}

/// The subject of a Ghost webhook: its resource and the resource's id (`member/6543…`), from the
/// current state or, for a deletion, the previous one. A member's or post's calls then stay in
/// order while the site's others go on (a workflow's `order_by: subject`).
fn subject(resource: &str, data: &Json) -> Option<String> {
    let body = data.get(resource)?;
    let id = ["current", "previous"].iter().find_map(|state| body.get(state)?.get("id")?.as_str())?;
    Some(format!("{resource}/{id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ghost_names_become_weir_names() {
        assert_eq!(weir_type("member.added"), "member.created");
        assert_eq!(weir_type("member.edited"), "member.updated");
        assert_eq!(weir_type("post.published.edited"), "post.published.updated");
        assert_eq!(weir_type("post.tag.attached"), "post.tag.attached");
        assert_eq!(weir_type("site.changed"), "site.changed");
    }

    #[test]
    fn a_webhooks_subject_is_its_resource_and_id() {
        let current = serde_json::json!({"member": {"current": {"id": "6543a"}, "previous": {}}});
        assert_eq!(subject("member", &current).as_deref(), Some("member/6543a"));
        let deleted = serde_json::json!({"post": {"current": {}, "previous": {"id": "p-9"}}});
        assert_eq!(subject("post", &deleted).as_deref(), Some("post/p-9"));
        assert_eq!(subject("site", &serde_json::json!({})), None, "nothing to name: the tenant's order");
        assert_eq!(subject("member", &serde_json::json!({"member": {"current": {"id": 7}}})), None);
    }
}
