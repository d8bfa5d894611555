//! Stage 0, `weir run --stage ingest`: platforms that do not speak Kafka post their events over
//! HTTP, and each request becomes events on the events topic, keyed by tenant, answered 202
//! only once the broker acknowledged them (docs/ingest.md).
//!
//! `POST /ingest/<source>` and `POST /ingest/<source>/<tenant>`; a request goes through, in
//! this order (each step's refusal is its own status, so the sender knows what to do):
//!
//! 1. [`backpressure`]: a place among the requests in flight, the evaluator not too far behind
//!    (503 + `Retry-After`); the body read up to `ingest.max_body_bytes` (413);
//! 2. [`auth`]: the credential decides the tenant (401 / 403);
//! 3. a replayed `webhook-id` ([`dedup`]) is answered 202 at once, produced nothing;
//! 4. [`formats`]: the body becomes events (400, 403 for a body naming another tenant, 415);
//! 5. the tenant's rate (429 + `Retry-After`);
//! 6. [`ack`]: produced and acknowledged (202), or not (503, 413 for a record too large).
//!
//! Every answer is reported by one telemetry event (`weir_ingest_*`).

pub mod ack;
pub mod auth;
pub mod backpressure;
pub mod dedup;
pub mod formats;
pub mod refusal;

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use tokio_util::sync::CancellationToken;

use self::{
    ack::Acknowledger,
    auth::{Authenticated, SourceAuth},
    backpressure::Gate,
    dedup::Seen,
    refusal::Refusal,
};
use crate::{
    config::{Config, SourceConfig},
    telemetry,
};

/// What every request handler shares.
struct Ingest {
    config: Arc<Config>,
    sources: HashMap<String, (SourceConfig, SourceAuth)>,
    gate: Arc<Gate>,
    seen: Seen,
    ack: Acknowledger,
}

/// A request's outcome: accepted, or refused with what was known of it by then.
struct Answer {
    outcome: Result<Accepted, Refusal>,
    class: &'static str,
    bytes: usize,
}

struct Accepted {
    ids: Vec<String>,
    ack: Option<Duration>,
}

/// Binds `ingest.listen` and serves until `stop`; returns the bound address (port 0 picks one)
/// and the server's task. Credentials are resolved first: a missing secret stops the stage here.
pub async fn start(
    config: Arc<Config>,
    stop: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let mut sources = HashMap::new();
    for (name, source) in &config.ingest.sources {
        sources.insert(name.clone(), (source.clone(), SourceAuth::new(name, source)?));
    }
    let gate = Arc::new(Gate::new(&config));
    tokio::spawn(gate.clone().watch(config.clone(), stop.child_token()));
    let state = Arc::new(Ingest {
        seen: Seen::new(config.ingest.tolerance),
        ack: Acknowledger::new(&config)?,
        config: config.clone(),
        sources,
        gate,
    });
    let app = Router::new()
        .route("/ingest/{source}", post(untenanted))
        .route("/ingest/{source}/{tenant}", post(tenanted))
        .with_state(state);
    let listen = config.ingest.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("ingest.listen {listen}: cannot listen"))?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await.context("ingest server")
    });
    Ok((addr, task))
}

/// The stage as `weir run --stage ingest` runs it: serves until `stop`, then finishes the
/// requests in flight (each waits for its acknowledgements, at most `ingest.ack_timeout`).
pub async fn run(config: Arc<Config>, stop: CancellationToken) -> anyhow::Result<()> {
    let (addr, task) = start(config.clone(), stop).await?;
    tracing::info!(sources = config.ingest.sources.len(), "ingest: listening on http://{addr}/ingest/<source>");
    task.await.context("ingest server panicked")?
}

async fn untenanted(
    State(state): State<Arc<Ingest>>,
    Path(source): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    state.answer(&source, None, &uri, &headers, body).await
}

async fn tenanted(
    State(state): State<Arc<Ingest>>,
    Path((source, tenant)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    state.answer(&source, Some(&tenant), &uri, &headers, body).await
}

impl Ingest {
    async fn answer(
        &self,
        source_name: &str,
        tenant: Option<&str>,
        uri: &Uri,
        headers: &HeaderMap,
        body: Body,
    ) -> Response {
        let Some((source, auth)) = self.sources.get(source_name) else {
            let refusal = Refusal::not_found("no such source in ingest.sources");
            report("unknown", &Err(refusal.clone()), "none", 0);
            return refusal.into_response();
        };
        let route = source.format.as_str();
        let Answer { outcome, class, bytes } = self.accept(source_name, source, auth, tenant, uri, headers, body).await;
        report(route, &outcome, class, bytes);
        match outcome {
            Ok(accepted) => (
                StatusCode::ACCEPTED,
                Json(serde_json::json!({"accepted": accepted.ids.len(), "ids": accepted.ids,
                    "duplicate": accepted.ack.is_none()})),
            )
                .into_response(),
            Err(refusal) => refusal.into_response(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn accept(
        &self,
        source_name: &str,
        source: &SourceConfig,
        auth: &SourceAuth,
        tenant: Option<&str>,
        uri: &Uri,
        headers: &HeaderMap,
        body: Body,
    ) -> Answer {
        let refused = |refusal, class, bytes| Answer { outcome: Err(refusal), class, bytes };
        let _permit = match self.gate.enter() {
            Ok(permit) => permit,
            Err(refusal) => return refused(refusal, "none", 0),
        };
        let body = match self.read(headers, body).await {
            Ok(body) => body,
            Err(refusal) => return refused(refusal, "none", 0),
        };
        let bytes = body.len();
        let now = chrono::Utc::now().timestamp_millis();
        let tolerance = self.config.ingest.tolerance.as_millis() as i64;
        let who = match auth.authenticate(tenant, headers, &body, now, tolerance) {
            Ok(who) => who,
            Err(refusal) => return refused(refusal, "none", bytes),
        };
        let class = who.class.as_str();
        let outcome = self.accept_as(source_name, source, &who, uri, headers, &body).await;
        Answer { outcome, class, bytes }
    }

    async fn accept_as(
        &self,
        source_name: &str,
        source: &SourceConfig,
        who: &Authenticated,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Accepted, Refusal> {
        if let Some(id) = &who.webhook_id {
            if self.seen.contains(source_name, &who.tenant, id) {
                return Ok(Accepted { ids: vec![id.clone()], ack: None });
            }
        }
        let request = formats::Request {
            source_name,
            source,
            auth: who,
            headers,
            query: uri.query(),
            body,
            max_attribute_bytes: self.config.limits.max_attribute_bytes,
        };
        let events = formats::parse(&request)?;
        self.gate.admit(&who.tenant, events.len())?;
        let ack = self.ack.produce(&events).await?;
        if let Some(id) = &who.webhook_id {
            self.seen.insert(source_name, &who.tenant, id);
        }
        Ok(Accepted { ids: events.into_iter().map(|e| e.id).collect(), ack: Some(ack) })
    }

    /// The body, up to `ingest.max_body_bytes` (413 beyond: refused by its `Content-Length`
    /// before anything is read, else as soon as the limit is passed).
    async fn read(&self, headers: &HeaderMap, body: Body) -> Result<bytes::Bytes, Refusal> {
        let max = self.config.ingest.max_body_bytes;
        let over = || Refusal::too_large(format!("the body is over ingest.max_body_bytes ({max} bytes)"));
        let declared =
            headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(over());
        }
        axum::body::to_bytes(body, max).await.map_err(|e| {
            if e.to_string().contains("length limit") {
                over()
            } else {
                Refusal::invalid(format!("reading the body: {e}"))
            }
        })
    }
}

fn report(route: &'static str, outcome: &Result<Accepted, Refusal>, class: &'static str, bytes: usize) {
    let event = match outcome {
        Ok(accepted) => telemetry::Event::IngestAnswered {
            route,
            status: 202,
            class,
            bytes,
            events: if accepted.ack.is_some() { accepted.ids.len() } else { 0 },
            ack: accepted.ack,
            reason: None,
        },
        Err(refusal) => telemetry::Event::IngestAnswered {
            route,
            status: refusal.status.as_u16(),
            class,
            bytes,
            events: 0,
            ack: None,
            reason: Some(&refusal.reason),
        },
    };
    event.emit();
}
