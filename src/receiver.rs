//! A real local HTTP server that stands in for an external service in tests, the demo and the
//! benchmark: it records every call (time, tenant, `Idempotency-Key`, body) and can be told to
//! add latency or to answer with an error status (429, 5xx) until told otherwise.
//!
//! Like a real idempotent API (Stripe's `Idempotency-Key`), a repeated key whose first call
//! succeeded is answered with the stored response and recorded as `replayed` instead of being
//! executed again. Its response echoes the task's step and input, so a later step's input can
//! show which outputs it received.
//!
//! It is a real server on a real socket (port 0), so the executor's HTTP client, timeouts and
//! error handling are exercised exactly as against a remote service.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
    Json, Router,
};
use serde_json::Value;

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Call {
    pub at: Instant,
    pub tenant: Option<String>,
    pub idempotency_key: Option<String>,
    pub body: Value,
    /// What the receiver answered.
    pub status: u16,
    /// A repeat of a key that had already succeeded: answered from the stored response.
    pub replayed: bool,
}

/// How the receiver answers.
#[derive(Debug, Clone, Default)]
pub struct Mode {
    /// Delay before answering.
    pub latency: Duration,
    /// Answer with this status instead of 200 (e.g. 429, 503).
    pub fail_with: Option<u16>,
}

#[derive(Default)]
struct Inner {
    calls: Mutex<Vec<Call>>,
    mode: Mutex<Mode>,
    /// Requests received, answered or not.
    arrived: std::sync::atomic::AtomicUsize,
    /// Responses of succeeded calls by idempotency key.
    done: Mutex<std::collections::HashMap<String, Value>>,
}

pub struct Receiver {
    addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Starts on 127.0.0.1 with an OS-chosen port.
    pub async fn start() -> std::io::Result<Receiver> {
        let inner = Arc::new(Inner::default());
        let app = Router::new().route("/{*path}", post(handle)).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Receiver { addr, inner, task })
    }

    /// URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.inner.mode.lock().expect("mode lock") = mode;
    }

    /// Every call so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.calls.lock().expect("calls lock").clone()
    }

    /// Requests received so far, including those still waiting for their answer.
    pub fn arrived(&self) -> usize {
        self.inner.arrived.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Calls answered with 2xx (replays included).
    pub fn succeeded(&self) -> usize {
        self.inner.calls.lock().expect("calls lock").iter().filter(|c| c.status < 300).count()
    }

    /// Takes the calls recorded so far and forgets the stored responses, so a long run (the
    /// benchmark) keeps memory flat. Keys taken this way are no longer recognized as replays.
    pub fn drain(&self) -> Vec<Call> {
        self.inner.done.lock().expect("done lock").clear();
        std::mem::take(&mut *self.inner.calls.lock().expect("calls lock"))
    }

    /// Calls executed successfully, replays of an already succeeded key excluded.
    pub fn executed(&self) -> usize {
        self.inner.calls.lock().expect("calls lock").iter().filter(|c| c.status < 300 && !c.replayed).count()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let at = Instant::now();
    inner.arrived.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mode = inner.mode.lock().expect("mode lock").clone();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let key = header("idempotency-key");
    let stored = key.as_ref().and_then(|k| inner.done.lock().expect("done lock").get(k).cloned());
    if !mode.latency.is_zero() && stored.is_none() {
        tokio::time::sleep(mode.latency).await;
    }
    let status = if stored.is_some() { 200 } else { mode.fail_with.unwrap_or(200) };
    let response = stored
        .clone()
        .unwrap_or_else(|| serde_json::json!({"ok": status < 300, "step": body["step_id"], "input": body["input"]}));
    if let (Some(k), true, None) = (&key, status < 300, &stored) {
        inner.done.lock().expect("done lock").insert(k.clone(), response.clone());
    }
    inner.calls.lock().expect("calls lock").push(Call {
        at,
        tenant: header("x-weir-tenant"),
        idempotency_key: key,
        body,
        status,
        replayed: stored.is_some(),
    });
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, Json(response))
}
