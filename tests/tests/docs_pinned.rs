//! What the docs promise, pinned: `Stem::default_client` falls back to the
//! embedded SQLite file when `STEM_BROKER_URL` is unset, and the README's
//! CI section names no test suite that does not exist.

use std::path::Path;
use std::process::Command;

const CHILD_VAR: &str = "STEM_TEST_DEFAULT_CLIENT_CHILD";

#[test]
fn default_client_without_broker_url_falls_back_to_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fallback.db");
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "default_client_child",
        "--ignored",
        "--nocapture",
    ]);
    for (key, _) in std::env::vars() {
        if key.starts_with("STEM_") {
            cmd.env_remove(key);
        }
    }
    let out = cmd
        .env(CHILD_VAR, "1")
        .env("STEM_SQLITE_PATH", &db)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(db.exists(), "no SQLite file at {}", db.display());
}

#[test]
#[ignore = "run in a child process by default_client_without_broker_url_falls_back_to_sqlite"]
fn default_client_child() {
    assert!(
        std::env::var_os(CHILD_VAR).is_some(),
        "run by the parent test"
    );
    assert!(std::env::var_os("STEM_BROKER_URL").is_none());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let stem = stem::Stem::default_client()
            .await
            .expect("falls back to the embedded SQLite default, no error");
        let described = stem.broker().describe();
        let path = std::env::var("STEM_SQLITE_PATH").unwrap();
        assert!(
            described.starts_with("sqlite://") && described.contains(&path),
            "{described}"
        );
        assert!(stem.backend().is_some(), "SQLite stores results too");
    });
}

/// Every `STEM_TEST_*` variable the README names is read by some source
/// file: the CI section may not describe suites that do not exist.
#[test]
fn readme_names_only_test_variables_that_some_test_reads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut sources = String::new();
    for dir in ["stem", "stem-core", "stem-adapters", "tests"] {
        collect_rs(&root.join(dir), &mut sources);
    }
    let this_file = include_str!("docs_pinned.rs");
    let sources = sources.replace(this_file, "");
    let mut named = Vec::new();
    for (i, _) in readme.match_indices("STEM_TEST_") {
        let var: String = readme[i..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == '_')
            .collect();
        named.push(var);
    }
    for var in named {
        assert!(
            sources.contains(&var),
            "README.md names `{var}`, but no test reads it"
        );
    }
    assert!(
        !readme.contains("server-backed suites"),
        "README.md promises server-backed suites"
    );
}

fn collect_rs(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}
