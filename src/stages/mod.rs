//! The pipeline's stages: [`ingest`] (HTTP requests → events, for platforms that do not speak
//! Kafka), then, each a consumer group of its own, [`evaluate`] (events → tasks),
//! [`execute`] (tasks → calls → results) and [`record`] (results → PostgreSQL, and the next
//! steps of multi-step runs back to the action topics).

pub mod evaluate;
pub mod execute;
pub mod ingest;
pub mod record;
