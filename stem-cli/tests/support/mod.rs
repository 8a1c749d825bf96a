//! What the `stem` binary's test files share: running the binary, reading
//! its output, pinning JSON shapes, and finding the test servers.

#![allow(dead_code)] // each test file uses its own part

use std::process::{Command, Output, Stdio};

use serde_json::Value;

pub(crate) fn say(line: &str) {
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{line}\n").as_bytes());
}

/// What one run of `stem` gave.
pub(crate) struct Run {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Run {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON document ({e}):\n{}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }

    /// Exits `code` with exactly one `error: ...` line on stderr and no
    /// panic or Debug dump.
    pub(crate) fn fails_with(&self, code: i32, contains: &str) {
        assert_eq!(
            self.code, code,
            "exit code; stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line on stderr, got {:?}", self.stderr);
        assert!(
            lines[0].starts_with("error: "),
            "starts with `error: `: {}",
            lines[0]
        );
        assert!(
            lines[0].contains(contains),
            "`{}` mentions `{contains}`",
            lines[0]
        );
        // A panic, or a Debug dump of an error (`Unavailable { adapter: ..`).
        let debug_dump = lines[0].split(" { ").skip(1).any(|rest| {
            rest.split(": ")
                .next()
                .is_some_and(|f| f.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        });
        // ... or of an enum (`Stem(Broker(..))`).
        let message = &lines[0]["error: ".len()..];
        let head: String = message
            .chars()
            .take_while(char::is_ascii_alphanumeric)
            .collect();
        let variant = head.starts_with(|c: char| c.is_ascii_uppercase())
            && message[head.len()..].starts_with('(');
        assert!(!debug_dump && !variant, "a Debug dump in `{}`", lines[0]);
        for bad in ["panicked", "RUST_BACKTRACE", "Some(", "Err(", "Error {"] {
            assert!(!lines[0].contains(bad), "no `{bad}` in `{}`", lines[0]);
        }
    }

    pub(crate) fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "stem failed; stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs `stem --broker-url URL --namespace NS ARGS...` with stdin closed
/// (not a terminal) and no `STEM_*` variable of the caller's.
pub(crate) fn stem_at(url: &str, ns: &str, args: &[&str]) -> Run {
    stem_at_env(url, ns, &[], args)
}

/// [`stem_at`] with these variables set.
pub(crate) fn stem_at_env(url: &str, ns: &str, env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stem"));
    for var in [
        "STEM_BROKER_URL",
        "STEM_RESULT_BACKEND_URL",
        "STEM_NAMESPACE",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied())
        .args(["--broker-url", url, "--namespace", ns])
        .args(args)
        .stdin(Stdio::null());
    raw(cmd)
}

pub(crate) fn raw(mut cmd: Command) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("the stem binary runs");
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// A JSON value's type, for shape pins.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_u64() => "uint",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Asserts `v` is an object with exactly these keys, each of one of the
/// `|`-separated types (`string|null`).
pub(crate) fn assert_shape(v: &Value, what: &str, shape: &[(&str, &str)]) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{what}: an object, got {v}"));
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    let mut want: Vec<&str> = shape.iter().map(|(k, _)| *k).collect();
    want.sort_unstable();
    let mut got = keys.clone();
    got.sort_unstable();
    assert_eq!(got, want, "{what}: keys");
    for (k, types) in shape {
        let t = kind(&obj[*k]);
        assert!(
            types.split('|').any(|x| x == t),
            "{what}.{k}: {t} is not {types} ({})",
            obj[*k]
        );
    }
}

pub(crate) fn server_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("STEM_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "{var} is unset and STEM_REQUIRE_SERVICES=1 requires it"
            );
            say(&format!("SKIP stem-cli server case: {var} is unset"));
            None
        }
    }
}
