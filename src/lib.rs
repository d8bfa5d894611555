//! weir: workflow automation for multi-tenant platforms on Kafka-compatible logs.
//!
//! # A tour of the layout
//!
//! An event travels through four stages, each a module with its own consumer group:
//!
//! ```text
//!  produce ──► events ──► evaluate ──► actions.<service> ──► execute ──► results ──► record ──► PostgreSQL
//!                            │                  ▲               │                     │ │
//!                            │                  └───────────────┼──── next steps ─────┘ │
//!                            └────────────── dlq ◄──────────────┴───────────────────────┘
//! ```
//!
//! - [`produce`]: the Rust API that puts events on the events topic, keyed by tenant.
//! - [`evaluate`]: matches each event against the [`workflow`] definitions and emits action tasks.
//! - [`execute`]: calls each external service and reports a result per task, through the
//!   service's [`connectors`] (webhook, Slack, OpenAI, no-op), which also guard the network.
//! - [`stages::record`]: records results in PostgreSQL in idempotent batches and advances
//!   multi-step runs in the same transaction, producing their next steps back to the action
//!   topics; [`engine::plan`] is the one planner, for first steps (evaluate) and later ones.
//!
//! The workflow engine: [`definitions`] keeps the compacted definitions topic as a cached,
//! hot-reloading set; [`workflow`] validates and compiles a definition; [`condition`] (CEL) and
//! [`template`] (minijinja) are what it compiles to.
//!
//! Shared pieces:
//! - [`source`]: the consumer loop every stage reads through: a polling thread, batches,
//!   pause-instead-of-buffer backpressure, and offsets stored only once work is durable
//!   ([`offsets`] does the bookkeeping, [`lanes`] keeps a tenant's tasks in order).
//! - [`envelope`]: the records (CloudEvents event, task, result) and their JSON/Avro encodings.
//! - [`kafka`]: how clients are configured; [`partitioner`]: Kafka's murmur2 key partitioning.
//! - [`dead_letter`]: where unprocessable records go, with the reason in headers; [`dlq`]: `weir dlq`.
//! - [`topics`]: topics as code (`topics/*.yaml`, `weir topics apply`).
//! - [`config`]: `weir.yaml`; [`telemetry`]: typed events that log and count in one place, and
//!   the Prometheus endpoint; [`shutdown`]: the broadcast signal every stage listens to.
//! - [`pipeline`]: starts and stops stages in one process; [`receiver`]: a real local HTTP server
//!   standing in for an external service in tests, the demo and the benchmark; [`demo`]: the
//!   README's walk-through; [`bench`]: `weir bench`, the stages measured beside a raw passthrough.

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
