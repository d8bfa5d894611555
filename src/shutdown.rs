//! Stopping: one mechanism, a [`CancellationToken`], for everything that runs until told to stop.
//!
//! As in mini-redis, stopping is two separate things: *telling* every part to stop, and *waiting*
//! for each to finish what it started (a stage stores the offsets of work that became durable,
//! then leaves its consumer group, so a restart repeats nothing that was done). A token only
//! tells; waiting stays with whoever started the part, through its `JoinHandle` or future, so an
//! error a part returns on its way out is not lost.
//!
//! Tokens form a tree, and cancelling one cancels everything below it:
//!
//! - `weir run` has a root token, cancelled by the first Ctrl-C or SIGTERM ([`on_signal`]; this
//!   is the only place that turns signals into cancellation). A second signal exits at once,
//!   without finishing in-flight work, for when a graceful stop takes too long.
//! - A `Pipeline` hands each stage its token; the metrics server
//!   has its own.
//! - A stage hands *child* tokens to its own parts: the executor to its calls waiting for a
//!   permit, the sink to its database lanes. When the stage's loop ends for a reason of its own
//!   (its source closed, an error), it cancels the child and the parts stop too, while the
//!   parent's other children are untouched.
//! - The polling thread of a `kafka::source::Source` is an OS thread: it reads
//!   the token with `is_cancelled()` between polls instead of awaiting it.
//!
//! Dropping a token does not cancel it. An owner whose early return must stop what it started
//! (the pipeline, the demo's metrics server) holds a [`DropGuard`](tokio_util::sync::DropGuard).

pub use tokio_util::sync::CancellationToken;

/// A token cancelled by the first Ctrl-C or SIGTERM (what systemd, Kubernetes and `docker stop`
/// send). A second signal of either kind exits the process at once. Needs a tokio runtime.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        // Registered once, before the first wait: a SIGTERM between the two waits still counts.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let (first, _) = signal(&mut term).await;
        tracing::info!("{first}: stopping after in-flight work (Ctrl-C or SIGTERM again to exit at once)");
        cancel.cancel();
        let (second, code) = signal(&mut term).await;
        tracing::warn!("{second} again: exiting without finishing in-flight work; unfinished tasks run again");
        std::process::exit(code);
    });
    token
}

/// The next Ctrl-C or SIGTERM: its name and the exit code a process killed by it reports.
async fn signal(term: &mut Option<tokio::signal::unix::Signal>) -> (&'static str, i32) {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => ("SIGINT", 130),
        Some(_) = async { term.as_mut()?.recv().await } => ("SIGTERM", 143),
    }
}
