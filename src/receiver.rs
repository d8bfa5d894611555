//! A real local HTTP server that stands in for an external service in tests, the demo and the
//! benchmark: it records every call (time, tenant, `Idempotency-Key`, body) and can be told to
//! add latency or to answer with an error status (429, 5xx) until told otherwise.
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

    /// Calls answered with 2xx.
    pub fn succeeded(&self) -> usize {
        self.inner.calls.lock().expect("calls lock").iter().filter(|c| c.status < 300).count()
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
    let mode = inner.mode.lock().expect("mode lock").clone();
    if !mode.latency.is_zero() {
        tokio::time::sleep(mode.latency).await;
    }
    let status = mode.fail_with.unwrap_or(200);
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    inner.calls.lock().expect("calls lock").push(Call {
        at,
        tenant: header("x-weir-tenant"),
        idempotency_key: header("idempotency-key"),
        body,
        status,
    });
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, Json(serde_json::json!({"ok": code.is_success()})))
}
