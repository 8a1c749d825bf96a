//! The trybuild runner: every file in `pass/` compiles, every file in
//! `fail/` fails with exactly the committed `.stderr` (rustc 1.95 output).
//!
//! To accept new output after a deliberate change, run with
//! `TRYBUILD=overwrite` and review the diff of each `.stderr`.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/pass/*.rs");
    t.compile_fail("tests/fail/*.rs");
}
