//! The workflow engine: what a definition is and what it decides, with no I/O.
//!
//! - [`workflow`]: a definition, validated and compiled once.
//! - [`condition`]: CEL conditions; [`template`]: minijinja step inputs.
//! - [`definitions`]: the hot-reloading, cached set of compiled definitions.
//! - [`plan`]: which steps of a run start, for its first steps and its later ones alike.
//!
//! Definitions are written by tenants' authors, so nothing in them may take a worker down or hold
//! it up: compiling never panics, and evaluating is bounded ([`Bounds`], and the fixed limits on
//! the size and nesting of a condition in [`condition`]).

use std::{
    cell::Cell,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::Once,
};

pub mod condition;
pub mod definitions;
pub mod plan;
pub mod template;
pub mod workflow;

/// How much work one template may do: the `engine:` section of weir.yaml, defined with the rest
/// of the configuration.
pub use crate::config::EngineConfig as Bounds;

thread_local! {
    /// Set while [`contain`] runs on this thread: the panic hook stays quiet.
    static CONTAINED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, turning a panic into `Err` with the panic's message, without the panic hook printing
/// it: for the third-party parsers and interpreters a definition's text goes through, whose
/// panics on odd input are errors in that input, not crashes to report.
///
/// The hook is wrapped once (process-wide) to stay silent on a thread inside `contain`; panics
/// anywhere else are reported as before.
pub(crate) fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static QUIET_HOOK: Once = Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CONTAINED.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let outer = CONTAINED.with(|c| c.replace(true));
    let outcome = catch_unwind(AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(outer));
    outcome.map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown")
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contain_turns_a_panic_into_its_message() {
        assert_eq!(contain(|| 1), Ok(1));
        assert_eq!(contain(|| -> u8 { panic!("boom {}", 1) }), Err("boom 1".to_string()));
        // Nested: the inner one restores the outer state.
        assert_eq!(contain(|| contain(|| -> u8 { panic!("inner") }).unwrap_err()), Ok("inner".to_string()));
        assert!(!CONTAINED.with(Cell::get));
    }

    #[test]
    fn bounds_are_validated() {
        assert!(Bounds::default().validate().is_ok());
        let err = Bounds { template_fuel: 0, ..Bounds::default() }.validate().unwrap_err();
        assert!(err.to_string().starts_with("engine.template_fuel: 0 is outside"), "{err}");
        let err = Bounds { max_render_bytes: 10, ..Bounds::default() }.validate().unwrap_err();
        assert!(err.to_string().starts_with("engine.max_render_bytes: 10 is outside"), "{err}");
    }
}
