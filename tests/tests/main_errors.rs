//! What a binary prints when `main` returns one of Stem's errors: Rust
//! prints `Error: {err:?}`, so their `Debug` must be the readable message
//! chain, not the enum structure (`Stem(Config(UnknownScheme { .. }))`).

use std::process::{Command, Output};

/// Runs `bin` with a broker URL whose scheme no adapter handles.
fn run_with_unknown_scheme(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env("STEM_BROKER_URL", "nosuch://user:hunter2@host/0")
        .env_remove("STEM_RESULT_BACKEND_URL")
        .env_remove("STEM_NAMESPACE")
        .env("RUST_LOG", "off")
        .output()
        .expect("the binary runs")
}

fn assert_readable(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exited with success: {stderr}");
    assert!(
        stderr.contains("Error: no adapter for URL `nosuch://user:***@host/0`: known schemes are "),
        "stderr does not start with the readable message:\n{stderr}"
    );
    assert!(stderr.contains("memory://"), "{stderr}");
    for structural in ["UnknownScheme", "Config(", "Stem(", "url:", "known:"] {
        assert!(
            !stderr.contains(structural),
            "stderr shows `{structural}`:\n{stderr}"
        );
    }
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn main_returning_worker_error_prints_readable_message() {
    // `main() -> Result<(), WorkerError>` around `stem::worker::run()`.
    let out = run_with_unknown_scheme(env!("CARGO_BIN_EXE_e2e-worker"), &[]);
    assert_readable(&out);
}

#[test]
fn main_returning_boxed_stem_error_prints_readable_message() {
    // `main() -> Result<(), Box<dyn Error>>`, failing in the default
    // client's `stem::connect` on the first enqueue.
    let out = run_with_unknown_scheme(env!("CARGO_BIN_EXE_e2e-producer"), &["1"]);
    assert_readable(&out);
}
