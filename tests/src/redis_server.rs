//! A `redis-server` of one test, on a loopback port of its own, keeping its
//! files in a directory of the test's: killed (SIGKILL) and restarted from
//! its AOF by the tests that need a Redis they can break, killed when
//! dropped.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::Proc;

/// A free loopback port: bind port 0 and let it go.
///
/// # Panics
/// If no loopback port can be bound (the machine is broken).
#[must_use]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind port 0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A running (or killed, until [`RedisServer::restart`]) `redis-server`.
pub struct RedisServer {
    proc: Option<Proc>,
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
}

impl RedisServer {
    /// Starts a server with `args` on a free port (another free port if
    /// the first is taken meanwhile), keeping its files in `dir`.
    ///
    /// # Panics
    /// If it does not start in five tries.
    #[must_use]
    pub fn start(dir: &Path, args: &[&str]) -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            let mut s = Self {
                proc: None,
                port: free_port(),
                dir: dir.to_owned(),
                args: args.iter().map(|a| (*a).to_owned()).collect(),
            };
            match s.spawn() {
                Ok(()) => return s,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = self.dir.join("redis.log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .args(["--daemonize", "no", "--save", ""])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawning redis-server: {e}"))?;
        let mut proc = Proc(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = proc.0.try_wait().expect("wait") {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("redis-server exited with {status}: {log}"));
            }
            if self.pong() {
                self.proc = Some(proc);
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(String::from("no PONG within 30 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `PING` answers `PONG` (not `-LOADING`: the AOF is loaded).
    #[must_use]
    pub fn pong(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 64];
        s.write_all(b"PING\r\n").is_ok()
            && s.read(&mut buf)
                .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }

    /// Its port.
    #[must_use]
    pub const fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no shutdown, nothing written beyond what the AOF has.
    pub fn kill(&mut self) {
        drop(self.proc.take());
    }

    /// Starts it again on the same port and directory (AOF reload).
    ///
    /// # Panics
    /// If it is still running, or does not start again.
    pub fn restart(&mut self) {
        assert!(self.proc.is_none(), "kill it first");
        self.spawn()
            .unwrap_or_else(|e| panic!("restart on port {}: {e}", self.port));
    }

    /// `redis-cli` on this server; its raw output (one value per line).
    ///
    /// # Panics
    /// If `redis-cli` cannot run or fails.
    #[must_use]
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        assert!(out.status.success(), "redis-cli {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
