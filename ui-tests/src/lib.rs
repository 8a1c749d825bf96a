//! Compile-time tests of `#[stem::task]`: `tests/ui.rs` runs the trybuild
//! cases in `tests/pass/` and `tests/fail/`; `tests/registry.rs` checks what
//! the generated code registers. This library is empty on purpose.
