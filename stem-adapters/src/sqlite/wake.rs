//! Wake-ups: local waiters sleep on a [`Notify`]; waiters in other
//! processes on the same file are woken by a one-byte Unix datagram.
//!
//! Every process that opens a database binds one datagram socket in a
//! directory named after the file (under the temp dir, to keep socket
//! paths short). A write that makes work ready, stores a result or sends a
//! broadcast notifies local waiters and sends one byte to every other
//! socket in that directory; each receiver turns the byte back into a
//! local notification. Sockets of dead processes are removed by the first
//! sender that gets `ECONNREFUSED`. Polling at the adapter's interval stays
//! as the fallback (a process that started less than a second ago, a full
//! socket buffer, a platform without Unix sockets), so a lost datagram
//! costs at most one poll interval, never correctness.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How long the list of peer sockets is trusted before the directory is
/// read again.
const PEERS_TTL: Duration = Duration::from_secs(1);

/// The local notifications.
#[derive(Default)]
pub(crate) struct Signals {
    /// Work became ready.
    pub(crate) jobs: Notify,
    /// A task record was written.
    pub(crate) results: Notify,
    /// A broadcast was sent.
    pub(crate) broadcast: Notify,
}

/// What changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Jobs,
    Results,
    Broadcast,
}

impl Kind {
    const fn byte(self) -> u8 {
        match self {
            Self::Jobs => b'j',
            Self::Results => b'r',
            Self::Broadcast => b'b',
        }
    }
}

impl Signals {
    fn local(&self, kind: Kind) {
        match kind {
            Kind::Jobs => self.jobs.notify_waiters(),
            Kind::Results => self.results.notify_waiters(),
            Kind::Broadcast => self.broadcast.notify_waiters(),
        }
    }

    fn on_byte(&self, b: u8) {
        match b {
            b'j' => self.local(Kind::Jobs),
            b'r' => self.local(Kind::Results),
            b'b' => self.local(Kind::Broadcast),
            _ => {}
        }
    }
}

struct Peers {
    list: Vec<PathBuf>,
    read_at: Option<Instant>,
}

/// Local and cross-process wake-ups for one database file.
pub(crate) struct Wake {
    pub(crate) signals: Arc<Signals>,
    remote: Option<Remote>,
}

struct Remote {
    dir: PathBuf,
    own: PathBuf,
    sender: std::os::unix::net::UnixDatagram,
    peers: Mutex<Peers>,
    receiver: tokio::task::JoinHandle<()>,
}

impl Wake {
    /// Sets up wake-ups for `db` (its canonical path). Cross-process
    /// wake-ups are skipped, with a debug log, when the socket cannot be
    /// made; polling still works.
    pub(crate) fn new(db: &Path) -> Self {
        let signals = Arc::new(Signals::default());
        let remote = match Remote::new(db, Arc::clone(&signals)) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!(error = %e, db = %db.display(), "cross-process wake-ups off; polling only");
                None
            }
        };
        Self { signals, remote }
    }

    /// Wakes local waiters and every other process on the file.
    pub(crate) fn signal(&self, kind: Kind) {
        self.signals.local(kind);
        if let Some(r) = &self.remote {
            r.send(kind);
        }
    }
}

fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Remote {
    fn new(db: &Path, signals: Arc<Signals>) -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "stem-wake-{:016x}",
            fnv64(db.as_os_str().as_encoded_bytes())
        ));
        std::fs::create_dir_all(&dir)?;
        let own = dir.join(format!("{}-{:08x}.sock", std::process::id(), rand_u32()));
        let socket = tokio::net::UnixDatagram::bind(&own)?;
        let sender = std::os::unix::net::UnixDatagram::unbound()?;
        sender.set_nonblocking(true)?;
        let receiver = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                match socket.recv(&mut buf).await {
                    Ok(n) => {
                        for b in &buf[..n] {
                            signals.on_byte(*b);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "wake-up socket read failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(Self {
            dir,
            own,
            sender,
            peers: Mutex::new(Peers {
                list: Vec::new(),
                read_at: None,
            }),
            receiver,
        })
    }

    fn send(&self, kind: Kind) {
        let mut peers = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if peers.read_at.is_none_or(|t| t.elapsed() > PEERS_TTL) {
            peers.list = std::fs::read_dir(&self.dir)
                .map(|rd| {
                    rd.filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|p| p != &self.own && p.extension().is_some_and(|x| x == "sock"))
                        .collect()
                })
                .unwrap_or_default();
            peers.read_at = Some(Instant::now());
        }
        let byte = [kind.byte()];
        peers
            .list
            .retain(|peer| match self.sender.send_to(&byte, peer) {
                Ok(_) => true,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    ) =>
                {
                    // A process that died without cleaning up.
                    let _ = std::fs::remove_file(peer);
                    false
                }
                // A full buffer means the peer has wake-ups pending anyway.
                Err(_) => true,
            });
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.receiver.abort();
        let _ = std::fs::remove_file(&self.own);
        // The last process out removes the directory (it fails while others use it).
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn rand_u32() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    nanos ^ std::process::id().rotate_left(16)
}
