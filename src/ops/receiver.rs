//! A real local HTTP server that stands in for an external service in tests, the demo and the
//! benchmark: it records every call (time, tenant, `Idempotency-Key`, body) and can be told to
//! add latency or to answer with an error status (429, 5xx) until told otherwise.
//!
//! Like a real idempotent API (Stripe's `Idempotency-Key`), a repeated key whose first call
//! succeeded is answered with the stored response and recorded as `replayed` instead of being
//! executed again. Its response echoes the task's step and input, so a later step's input can
//! show which outputs it received.
//!
//! Like a rate-limited API, it can enforce its own limit ([`Mode::rate_limit`]): a request over
//! it is answered 429 with `Retry-After`. It can follow a script of failures
//! ([`Receiver::fail_for`]: e.g. 429 for 2 s, then 503 for 3 s, then normal again), and reports
//! `usage.total_tokens` (the task input's `tokens`) like an OpenAI-style API, for cost limits.
//! A task input's `respond_bytes` pads the answer to about that size, like a service whose
//! response is far bigger than its request.
//!
//! It is a real server on a real socket (port 0), so the executor's HTTP client, timeouts and
//! error handling are exercised exactly as against a remote service. Like a remote service, it
//! finishes (and records) a call whose client went away mid-request (a caller killed with
//! SIGKILL): the server would otherwise drop the handler with the connection, and a call that
//! arrived would be missing from [`Receiver::calls`] although a real service would have acted on it.
//!
//! Paths ending in `chat/completions` answer like OpenAI's chat completions (with `usage`
//! derived from the request: prompt characters ÷ 4 rounded up, and half of `max_tokens`), and
//! paths under `slack/` answer `ok` as text like a Slack incoming webhook. Every other path echoes.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri, Version},
    response::{IntoResponse, Response},
    routing::any,
    Json, Router,
};
use bytes::Bytes;
use serde_json::Value;

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Call {
    pub at: Instant,
    pub tenant: Option<String>,
    pub idempotency_key: Option<String>,
    /// The body as JSON, or as a string if it is not JSON.
    pub body: Value,
    /// The body as received, e.g. to check a signature.
    pub raw: Bytes,
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    /// What the receiver answered.
    pub status: u16,
    /// A repeat of a key that had already succeeded: answered from the stored response.
    pub replayed: bool,
    /// The HTTP version the call came over (`HTTP/1.1`, `HTTP/2.0`).
    pub version: String,
}

/// How the receiver answers.
#[derive(Debug, Clone, Default)]
pub struct Mode {
    /// Delay before answering.
    pub latency: Duration,
    /// Added to or taken off `latency` at random (uniform), per request.
    pub jitter: Duration,
    /// Answer with this status instead of 200 (e.g. 429, 503).
    pub fail_with: Option<u16>,
    /// Sent as `Retry-After` (whole seconds) with failures.
    pub retry_after: Option<Duration>,
    /// Requests accepted per second at most, counted over the last second at each arrival;
    /// over it the answer is 429 with `Retry-After: 1`.
    pub rate_limit: Option<usize>,
}

#[derive(Default)]
struct Inner {
    calls: Mutex<Vec<Call>>,
    mode: Mutex<Mode>,
    /// Requests received, answered or not.
    arrived: std::sync::atomic::AtomicUsize,
    /// Responses of succeeded calls by idempotency key.
    done: Mutex<std::collections::HashMap<String, Value>>,
    /// Scripted failures: (until, status), in order; see [`Receiver::fail_for`].
    script: Mutex<Vec<(Instant, u16)>>,
    /// Arrival times of accepted requests in the last second, for `rate_limit`.
    recent: Mutex<std::collections::VecDeque<Instant>>,
    /// Per tenant (`x-weir-tenant`): requests being answered now, and the most there ever were.
    open: Mutex<std::collections::HashMap<String, (usize, usize)>>,
    /// All requests being answered now, and the most there ever were.
    in_flight: std::sync::atomic::AtomicUsize,
    most_in_flight: std::sync::atomic::AtomicUsize,
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
        let app = Router::new().route("/{*path}", any(handle)).with_state(inner.clone());
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

    /// From now on, answers each phase's status for its duration, one phase after the other,
    /// then answers normally again: `fail_for(&[(429, 2s), (503, 3s)])` is a 5-second outage.
    pub fn fail_for(&self, phases: &[(u16, Duration)]) {
        let mut until = Instant::now();
        *self.inner.script.lock().expect("script lock") = phases
            .iter()
            .map(|(status, length)| {
                until += *length;
                (until, *status)
            })
            .collect();
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

    /// The most requests of `tenant` (its `x-weir-tenant` header) the receiver was answering at
    /// once: 1 when its calls were made one at a time.
    pub fn most_at_once(&self, tenant: &str) -> usize {
        self.inner.open.lock().expect("open lock").get(tenant).map_or(0, |(_, most)| *most)
    }

    /// The most requests, of all tenants, the receiver was answering at once.
    pub fn most_in_flight(&self) -> usize {
        self.inner.most_in_flight.load(std::sync::atomic::Ordering::SeqCst)
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

/// What a handler got of a request.
struct Request {
    method: Method,
    version: Version,
    uri: Uri,
    headers: HeaderMap,
    raw: Bytes,
}

/// Runs [`answer_call`] in a task of its own, so it completes when the client disconnects.
async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    version: Version,
    uri: Uri,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    // The arrival, before the spawned task waits for a runtime thread: on a busy runtime that
    // wait (milliseconds) would be counted as the caller's latency.
    let at = Instant::now();
    match tokio::spawn(answer_call(inner, at, Request { method, version, uri, headers, raw })).await {
        Ok(response) => response,
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("the receiver's handler failed: {e}")).into_response(),
    }
}

async fn answer_call(inner: Arc<Inner>, at: Instant, request: Request) -> Response {
    let Request { method, version, uri, headers, raw } = request;
    use std::sync::atomic::Ordering::SeqCst;
    let now = inner.in_flight.fetch_add(1, SeqCst) + 1;
    inner.most_in_flight.fetch_max(now, SeqCst);
    let body = serde_json::from_slice(&raw).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into()));
    inner.arrived.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mode = inner.mode.lock().expect("mode lock").clone();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let key = header("idempotency-key");
    let tenant = header("x-weir-tenant");
    if let Some(t) = &tenant {
        let mut open = inner.open.lock().expect("open lock");
        let (now, most) = open.entry(t.clone()).or_default();
        *now += 1;
        *most = (*most).max(*now);
    }
    let stored = key.as_ref().and_then(|k| inner.done.lock().expect("done lock").get(k).cloned());
    if !(mode.latency.is_zero() && mode.jitter.is_zero()) && stored.is_none() {
        let spread = mode.jitter.as_secs_f64() * (2.0 * fastrand::f64() - 1.0);
        tokio::time::sleep(Duration::from_secs_f64((mode.latency.as_secs_f64() + spread).max(0.0))).await;
    }
    let scripted = inner.script.lock().expect("script lock").iter().find(|(until, _)| *until > at).map(|(_, s)| *s);
    let over_limit = mode.rate_limit.is_some_and(|limit| {
        let mut recent = inner.recent.lock().expect("recent lock");
        while recent.front().is_some_and(|t| at.duration_since(*t) >= Duration::from_secs(1)) {
            recent.pop_front();
        }
        let over = recent.len() >= limit;
        if !over {
            recent.push_back(at);
        }
        over
    });
    let status = match (over_limit, &stored, scripted) {
        (true, _, _) => 429,
        (false, Some(_), _) => 200,
        (false, None, Some(s)) => s,
        (false, None, None) => mode.fail_with.unwrap_or(200),
    };
    let response = stored.clone().unwrap_or_else(|| answer(uri.path(), status, &body));
    if let (Some(k), true, None) = (&key, status < 300, &stored) {
        inner.done.lock().expect("done lock").insert(k.clone(), response.clone());
    }
    if let Some(t) = &tenant {
        inner.open.lock().expect("open lock").entry(t.clone()).or_default().0 -= 1;
    }
    inner.in_flight.fetch_sub(1, SeqCst);
    inner.calls.lock().expect("calls lock").push(Call {
        at,
        tenant,
        idempotency_key: key,
        body,
        raw,
        method: method.to_string(),
        path: uri.path().to_string(),
        headers,
        status,
        replayed: stored.is_some(),
        version: format!("{version:?}"),
    });
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut reply = match response {
        Value::String(text) => (code, text).into_response(),
        json => (code, Json(json)).into_response(),
    };
    // A 429 always says when to come back, like real rate-limited APIs.
    let retry_after = mode.retry_after.or((status == 429).then_some(Duration::from_secs(1)));
    if let (Some(after), true) = (retry_after, status >= 300) {
        reply.headers_mut().insert("retry-after", after.as_secs().into());
    }
    reply
}

/// The answer of a call that was not answered before, shaped by the path.
fn answer(path: &str, status: u16, body: &Value) -> Value {
    let ok = status < 300;
    if path.ends_with("chat/completions") {
        if !ok {
            return serde_json::json!({"error": {"message": format!("status {status}"), "type": "server_error"}});
        }
        let chars = |c: &Value| c.as_str().map_or(0, |s| s.chars().count() as u64);
        let messages = body["messages"].as_array().map(Vec::as_slice).unwrap_or_default();
        let prompt_tokens = messages.iter().map(|m| chars(&m["content"])).sum::<u64>().div_ceil(4);
        let completion_tokens = (body["max_tokens"].as_u64().unwrap_or(16) / 2).max(1);
        let last = messages.last().map(|m| m["content"].clone()).unwrap_or_default();
        serde_json::json!({
            "id": "chatcmpl-receiver", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": format!("echo: {}", last.as_str().unwrap_or_default())}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens},
        })
    } else if path.starts_with("/slack/") {
        Value::String(if ok { "ok" } else { "rate_limited" }.into())
    } else {
        let mut echo = serde_json::json!({"ok": ok, "step": body["step_id"], "input": body["input"]});
        if let Some(tokens) = body["input"]["tokens"].as_u64() {
            echo["usage"] = serde_json::json!({"total_tokens": tokens});
        }
        // A service answering with far more than it was sent (tests of bounded results).
        if let Some(bytes) = body["input"]["respond_bytes"].as_u64() {
            echo["pad"] = Value::String("r".repeat(bytes.min(16 << 20) as usize));
        }
        echo
    }
}
