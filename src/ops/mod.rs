//! What operators run besides the pipeline: producing events, the dead-letter topic, replays, where
//! each stage stands (`weir status`), the demo and the benchmark harness (with the local HTTP receiver they share).

pub mod bench;
pub mod demo;
pub mod dlq;
pub mod post;
pub mod produce;
pub mod rebalances;
pub mod receiver;
pub mod replay;
pub mod runs;
pub mod status;
pub mod workflows;
