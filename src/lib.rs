//! weir: workflow automation for multi-tenant platforms on Kafka-compatible logs.
//!
//! # A tour of the tree
//!
//! One event's path, stage by stage. Each stage is a consumer group of its own, so each scales
//! by starting more processes (`weir run --stage …`):
//!
//! ```text
//!                    ┌─ stages::ingest ◄─ HTTP (platforms that do not speak Kafka)
//!                    ▼
//!  ops::produce ─► events ─► stages::evaluate ─► actions.<service> ─► stages::execute ─► results ─► stages::record ─► PostgreSQL
//!                                 │                      ▲                  │                              │
//!                                 │                      └──── next steps of multi-step runs ◄────────────┤
//!                                 └──────────────────────────► dlq (reason + origin in headers) ◄─────────┘
//! ```
//!
//! - [`stages`]: the three stages, and the HTTP door in front of them.
//!   - [`stages::ingest`] (only with `--stage ingest`) takes events over HTTP from platforms that
//!     do not speak Kafka (CloudEvents, Ghost and Standard Webhooks), the tenant decided by the
//!     credential, and answers 202 once the broker acknowledged them, 503/429 when saturated.
//!   - [`stages::evaluate`] matches each event against the workflow definitions and produces
//!     the first steps' tasks on `actions.<service>`.
//!   - [`stages::execute`] (one per service) calls the service through its connector, within
//!     the service's limits, retrying through delay topics and dead-lettering what cannot
//!     succeed, and produces a result per task.
//!   - [`stages::record`] writes results into PostgreSQL in idempotent batches and, in the same
//!     transaction, advances multi-step runs: the next steps' tasks go back to the action
//!     topics. That loop is why a run's later steps appear on `actions.<service>` without an
//!     event.
//! - [`engine`]: what a workflow is and decides, with no I/O: [`engine::workflow`] (a
//!   definition, validated and compiled), [`engine::plan`] (the one planner: which steps of a
//!   run start, for the evaluator's first steps and the record stage's later ones alike),
//!   [`engine::condition`] (CEL), [`engine::template`] (minijinja), [`engine::definitions`] (the
//!   cached, hot-reloading set the evaluator matches against).
//! - [`kafka`]: the plumbing every stage reads and writes through, knowing no stage or workflow:
//!   client settings, [`kafka::source`] (the consumer loop: batches, pause-instead-of-buffer
//!   backpressure, offsets stored only once the work is durable, with [`kafka::offsets`]),
//!   [`kafka::dead_letter`], [`kafka::topics`] (topics as code), [`kafka::compacted`] (a
//!   compacted topic read as a table), [`kafka::partitioner`] (Java's murmur2).
//! - [`connectors`]: how a service is called (webhook, Slack, OpenAI, no-op), and the network
//!   policy that guards every call.
//! - [`ops`]: what operators run: [`ops::produce`], [`ops::workflows`], [`ops::dlq`],
//!   [`ops::replay`], [`ops::status`], [`ops::demo`], [`ops::bench`], and [`ops::receiver`] (a real local HTTP server standing in
//!   for an external service in tests, the demo and the benchmark).
//!
//! At the top, what everything shares: [`config`] (`weir.yaml`), [`envelope`] (the records and
//! their JSON/Avro encodings), [`telemetry`] (typed events that log and count in one place, and
//! the Prometheus endpoint), [`shutdown`] (how everything stops: one `CancellationToken` tree, cancelled by Ctrl-C or SIGTERM) and [`pipeline`] (starts the
//! stages of one process). `tests/layout.rs` keeps the layers honest: the engine knows no Kafka,
//! config knows nothing else, connectors know no stage, and no modules refer to each other in a
//! circle.

pub mod config;
pub mod connectors;
pub mod engine;
pub mod envelope;
pub mod kafka;
pub mod ops;
pub mod pipeline;
pub mod shutdown;
pub mod stages;
pub mod telemetry;
