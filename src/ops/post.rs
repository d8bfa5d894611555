//! A client of the ingest stage (`stages::ingest`), posting events as the platforms would: in
//! the three CloudEvents modes, as Ghost's signed webhooks, and per Standard Webhooks. The demo,
//! `weir bench --scenario ingest` and the tests post through it; each call is one HTTP request
//! on a keep-alive connection of a shared `reqwest` client.

use std::time::Duration;

use reqwest::{header, RequestBuilder, Response};
use serde_json::Value as Json;

use crate::{connectors::signature, envelope::Event};

/// Where an ingest stage listens, and the connections to it.
#[derive(Clone)]
pub struct Poster {
    http: reqwest::Client,
    base: String,
}

/// How a CloudEvent is posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Structured,
    Binary,
}

impl Poster {
    /// A client of the ingest stage at `addr` (`host:port`).
    pub fn new(addr: impl std::fmt::Display) -> Poster {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1_024)
            .build()
            .expect("a reqwest client builds with these settings");
        Poster { http, base: format!("http://{addr}") }
    }

    /// `POST /ingest/<source>[/<tenant>][?<query>]`.
    pub fn request(&self, source: &str, tenant: Option<&str>, query: Option<&str>) -> RequestBuilder {
        let mut url = format!("{}/ingest/{source}", self.base);
        if let Some(tenant) = tenant {
            url = format!("{url}/{tenant}");
        }
        if let Some(query) = query {
            url = format!("{url}?{query}");
        }
        self.http.post(url)
    }

    /// One CloudEvent, with a bearer token, in structured or binary mode. The event's `tenant`
    /// travels as the `tenant` extension (the stage checks it against the token's).
    pub async fn cloudevent(&self, source: &str, token: &str, event: &Event, mode: Mode) -> reqwest::Result<Response> {
        let request = self.request(source, None, None).bearer_auth(token);
        match mode {
            Mode::Structured => {
                let body = serde_json::to_vec(event).expect("an event serializes");
                request.header(header::CONTENT_TYPE, "application/cloudevents+json").body(body).send().await
            }
            Mode::Binary => {
                let mut request = request
                    .header("ce-specversion", "1.0")
                    .header("ce-id", &event.id)
                    .header("ce-source", &event.source)
                    .header("ce-type", &event.kind)
                    .header("ce-tenant", &event.tenant)
                    .header(header::CONTENT_TYPE, event.datacontenttype.as_deref().unwrap_or("application/json"));
                if let Some(time) = &event.time {
                    request = request.header("ce-time", time);
                }
                request.body(serde_json::to_vec(&event.data).expect("JSON serializes")).send().await
            }
        }
    }

    /// CloudEvents batch mode: the events in one request, produced in their order.
    pub async fn batch(&self, source: &str, token: &str, events: &[Event]) -> reqwest::Result<Response> {
        let body = serde_json::to_vec(events).expect("events serialize");
        self.request(source, None, None)
            .bearer_auth(token)
            .header(header::CONTENT_TYPE, "application/cloudevents-batch+json")
            .body(body)
            .send()
            .await
    }

    /// A Ghost webhook of `event` (Ghost's name, e.g. `member.added`) for `tenant`, signed as
    /// Ghost signs: `X-Ghost-Signature: sha256=<hex>, t=<ms>`.
    pub async fn ghost(
        &self,
        source: &str,
        tenant: &str,
        secret: &str,
        event: &str,
        body: &Json,
    ) -> reqwest::Result<Response> {
        let body = serde_json::to_vec(body).expect("JSON serializes");
        let signature = signature::ghost_header(secret, &body, chrono::Utc::now().timestamp_millis());
        self.request(source, Some(tenant), Some(&format!("event={event}")))
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-ghost-signature", signature)
            .body(body)
            .send()
            .await
    }

    /// A Standard Webhooks delivery `{"type", "timestamp", "data"}` signed now with `secret`
    /// (`whsec_…`) under `id`.
    pub async fn standard(
        &self,
        source: &str,
        tenant: &str,
        secret: &str,
        id: &str,
        kind: &str,
        data: &Json,
    ) -> anyhow::Result<Response> {
        let body = serde_json::json!({"type": kind, "timestamp": chrono::Utc::now().to_rfc3339(), "data": data});
        self.signed(source, tenant, secret, id, &serde_json::to_vec(&body)?).await
    }

    /// `body` as it is, signed per Standard Webhooks (for the standard and generic formats).
    pub async fn signed(
        &self,
        source: &str,
        tenant: &str,
        secret: &str,
        id: &str,
        body: &[u8],
    ) -> anyhow::Result<Response> {
        let mut request = self.request(source, Some(tenant), None).header(header::CONTENT_TYPE, "application/json");
        for (name, value) in signature::standard_headers(secret, id, body)? {
            request = request.header(name, value);
        }
        Ok(request.body(body.to_vec()).send().await?)
    }
}
