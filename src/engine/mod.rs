//! The workflow engine: what a definition is and what it decides, with no I/O.
//!
//! - [`workflow`]: a definition, validated and compiled once.
//! - [`condition`]: CEL conditions; [`template`]: minijinja step inputs.
//! - [`definitions`]: the hot-reloading, cached set of compiled definitions.
//!
//! Definitions are written by tenants' authors, so nothing in them may take a worker down or hold
//! it up: compiling never panics, and evaluating is bounded ([`Bounds`], and the fixed limits on
//! the size and nesting of a condition in [`condition`]).

use std::{
    cell::Cell,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::Once,
};

use serde::{Deserialize, Serialize};

pub mod condition;
pub mod definitions;
pub mod template;
pub mod workflow;

/// How much work one template may do (the `engine:` section of weir.yaml).
///
/// Templates are evaluated inline by the stage that starts a step, so an expensive one would hold
/// up every tenant behind it: exceeding a bound fails that step's run with the reason instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Bounds {
    /// Instructions one template leaf may execute per render (minijinja's fuel). A loop over a
    /// 1,000-item list with a few expressions in its body takes about 10,000.
    pub template_fuel: u64,
    /// Bytes a step input may render to, all its leaves together (as JSON).
    pub max_render_bytes: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds { template_fuel: 1_000_000, max_render_bytes: 1 << 20 }
    }
}

impl Bounds {
    /// Refuses values that would disable the bounds or refuse every template.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1_000..=1_000_000_000).contains(&self.template_fuel) {
            anyhow::bail!("engine.template_fuel: {} is outside 1000..=1000000000", self.template_fuel);
        }
        if !(1_024..=64 << 20).contains(&self.max_render_bytes) {
            anyhow::bail!("engine.max_render_bytes: {} is outside 1024..=67108864", self.max_render_bytes);
        }
        Ok(())
    }
}

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
