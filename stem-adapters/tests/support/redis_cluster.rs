//! A three-master Redis Cluster of one test binary, on free loopback
//! ports, started on first use and shared by every case of the binary.
//!
//! libtest has no global teardown, so each `redis-server` runs under a
//! small shell wrapper that kills it (and removes its directory) when its
//! stdin closes; the test process holds the write ends of those pipes in a
//! static and never closes them, so the servers go when the process exits,
//! however it exits (a panic, SIGKILL, or the end of the run).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Masters of the test cluster.
const MASTERS: usize = 3;

/// A running test cluster.
#[derive(Debug)]
pub(crate) struct TestCluster {
    /// The masters' ports on 127.0.0.1.
    pub(crate) ports: Vec<u16>,
    /// Where the nodes keep their files (removed by the wrappers at exit).
    _dir: PathBuf,
    /// Write ends of the wrappers' stdin: closed when the process exits,
    /// which stops the servers.
    _lifelines: Mutex<Vec<ChildStdin>>,
}

/// Whether `bin --version` runs.
fn runs(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Why the cluster cannot be started here (`redis-server` or `redis-cli`
/// missing), or `None`.
pub(crate) fn missing() -> Option<String> {
    (!runs("redis-server") || !runs("redis-cli"))
        .then(|| String::from("redis-server or redis-cli not on PATH"))
}

/// The binary's cluster, started on the first call.
///
/// # Panics
/// When the cluster does not come up (after a few attempts on new ports).
pub(crate) fn cluster() -> &'static TestCluster {
    static CLUSTER: OnceLock<Result<TestCluster, String>> = OnceLock::new();
    match CLUSTER.get_or_init(|| {
        let mut last = String::new();
        for _ in 0..3 {
            match start() {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(last)
    }) {
        Ok(c) => c,
        Err(e) => panic!("the test Redis Cluster did not start: {e}"),
    }
}

/// A free port below 55535 whose cluster bus port (+10000) is free too.
fn free_port(taken: &[u16]) -> Result<u16, String> {
    for _ in 0..200 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        let port = l.local_addr().map_err(|e| format!("addr: {e}"))?.port();
        if port >= 55535 || taken.contains(&port) || taken.contains(&(port + 10000)) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return Ok(port);
        }
    }
    Err(String::from("no free port pair below 55535"))
}

fn cli(port: u16, args: &[&str]) -> Result<String, String> {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("redis-cli: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "redis-cli {args:?}: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> Result<(), String> {
    let until = Instant::now() + within;
    while !ok() {
        if Instant::now() > until {
            return Err(format!("{what} within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn start() -> Result<TestCluster, String> {
    let dir = std::env::temp_dir().join(format!(
        "stem-redis-cluster-{}-{:08x}",
        std::process::id(),
        rand_u32()
    ));
    let mut ports = Vec::new();
    let mut lifelines = Vec::new();
    for _ in 0..MASTERS {
        let mut taken = ports.clone();
        taken.extend(ports.iter().map(|p| p + 10000));
        let port = free_port(&taken)?;
        let node_dir = dir.join(port.to_string());
        std::fs::create_dir_all(&node_dir).map_err(|e| format!("mkdir: {e}"))?;
        // The server dies with this wrapper's stdin: `read` returns at EOF.
        let script = format!(
            "redis-server --port {port} --bind 127.0.0.1 --cluster-enabled yes \
             --cluster-config-file nodes-{port}.conf --cluster-node-timeout 2000 \
             --dir '{d}' --save '' --appendonly no --logfile '{d}/log' & pid=$!; \
             read line; kill $pid; wait $pid; rm -rf '{d}'; rmdir '{top}' 2>/dev/null",
            d = node_dir.display(),
            top = dir.display()
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("sh: {e}"))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| String::from("no stdin pipe"))?;
        lifelines.push(stdin);
        // Dropping the handle neither kills nor waits: the wrapper lives
        // on until its stdin closes.
        drop(child);
        ports.push(port);
    }
    let stop = |lifelines: Vec<ChildStdin>| {
        for mut l in lifelines {
            let _ = l.write_all(b"\n");
        }
    };
    for &p in &ports {
        if let Err(e) = wait_for(
            &format!("redis-server on {p} answers PING"),
            Duration::from_secs(10),
            || cli(p, &["ping"]).is_ok_and(|o| o.contains("PONG")),
        ) {
            stop(lifelines);
            return Err(e);
        }
    }
    let mut create = vec![String::from("--cluster"), String::from("create")];
    create.extend(ports.iter().map(|p| format!("127.0.0.1:{p}")));
    create.extend(["--cluster-replicas", "0", "--cluster-yes"].map(String::from));
    let args: Vec<&str> = create.iter().map(String::as_str).collect();
    if let Err(e) = cli(ports[0], &args) {
        stop(lifelines);
        return Err(e);
    }
    for &p in &ports {
        if let Err(e) = wait_for(
            &format!("node {p} reports cluster_state:ok"),
            Duration::from_secs(30),
            || cli(p, &["cluster", "info"]).is_ok_and(|o| o.contains("cluster_state:ok")),
        ) {
            stop(lifelines);
            return Err(e);
        }
    }
    Ok(TestCluster {
        ports,
        _dir: dir,
        _lifelines: Mutex::new(lifelines),
    })
}

/// A little randomness for the directory name (no extra crate).
fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    u32::try_from(h.finish() >> 32).unwrap_or(0)
}
