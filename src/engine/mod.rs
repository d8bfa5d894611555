//! The workflow engine: what a definition is and what it decides, with no I/O.
//!
//! - [`workflow`]: a definition, validated and compiled once.
//! - [`plan`]: which steps of a run start, for its first steps and its later ones alike.
//! - [`condition`]: CEL conditions; [`template`]: minijinja step inputs.
//! - [`definitions`]: the hot-reloading, cached set of compiled definitions.

pub mod condition;
pub mod definitions;
pub mod plan;
pub mod template;
pub mod workflow;
