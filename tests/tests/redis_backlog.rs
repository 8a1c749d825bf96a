//! A 50,000-task backlog on Redis: 45,000 ready across every priority and
//! 5,000 delayed by 1 to 3 s at the highest priority, published in batches of 500 while no worker
//! runs, then drained by one in-process worker. Every task runs exactly
//! once and no delayed task runs before it is due. The delayed set holds
//! 5,000 members due within two seconds of each other, so a script that
//! `unpack`ed every due member at once would hit Lua's limit (about 8,000
//! values) here; promotion moves at most 256 per fetch.
//!
//! Needs the Redis at `STEM_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`); without one it prints a SKIP line and passes,
//! except under `STEM_REQUIRE_SERVICES=1`.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use stem::adapters::redis::{RedisBroker, RedisOptions};
use stem::worker::Worker;

const READY: u64 = 45_000;
const DELAYED: u64 = 5_000;
const BATCH: u64 = 500;

/// seq -> (runs, first run in Unix ms).
fn ledger() -> &'static Mutex<HashMap<u64, (u32, i64)>> {
    static L: OnceLock<Mutex<HashMap<u64, (u32, i64)>>> = OnceLock::new();
    L.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Records one run of `seq`.
#[stem::task(queue = "backlog")]
async fn backlog_task(seq: u64) {
    let now = now_ms();
    let mut l = ledger().lock().expect("ledger");
    let e = l.entry(seq).or_insert((0, now));
    e.0 += 1;
}

fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn url() -> String {
    std::env::var("STEM_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| String::from("redis://127.0.0.1:6379"))
}

fn no_server() -> bool {
    let hp = url()
        .split_once("://")
        .map(|(_, r)| {
            r.rsplit_once('@')
                .map_or(r, |(_, h)| h)
                .split(['/', '?'])
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    let up = std::net::ToSocketAddrs::to_socket_addrs(&hp)
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| {
            std::net::TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok()
        });
    if up {
        return false;
    }
    assert!(
        std::env::var("STEM_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "no Redis at {hp}, and STEM_REQUIRE_SERVICES=1 requires it"
    );
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "SKIP redis backlog: no Redis at {hp} (start one, or set STEM_TEST_REDIS_URL)"
    );
    true
}

/// Deletes a namespace's keys when dropped, so a failing test leaves
/// nothing behind either (on a thread of its own: a drop cannot await).
struct DeleteOnDrop {
    url: String,
    namespace: String,
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        let (url, ns) = (self.url.clone(), self.namespace.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let b = RedisBroker::connect(&url, RedisOptions::default())
                    .await
                    .ok()?;
                b.delete_namespace(&ns).await.ok()
            })
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backlog_of_50000_drains_exactly_once_and_never_early() {
    if no_server() {
        return;
    }
    let ns = format!(
        "backlog_{}",
        stem::TaskId::new().to_string().replace('-', "")
    );
    let _cleanup = DeleteOnDrop {
        url: url(),
        namespace: ns.clone(),
    };
    let stem = stem::connect_with(&url(), None, &ns)
        .await
        .expect("connect");

    // Publish while no worker runs: ready ones across priorities, then the
    // delayed ones, each delayed batch due at its own time in 1..3 s.
    let t0 = Instant::now();
    let mut due_ms: HashMap<u64, i64> = HashMap::new();
    let mut seq = 0;
    while seq < READY {
        let priority = u8::try_from((seq / BATCH) % 10).expect("priority");
        backlog_task::with()
            .on(&stem)
            .priority(priority)
            .enqueue_many((seq..seq + BATCH).map(|s| backlog_task::Args { seq: s }))
            .await
            .expect("enqueue_many");
        seq += BATCH;
    }
    while seq < READY + DELAYED {
        let delay = Duration::from_millis(1000 + (seq * 7) % 2000);
        let published = now_ms();
        // Priority 9: once due they run ahead of the ready backlog, so one
        // handed out early would also run early.
        backlog_task::with()
            .on(&stem)
            .priority(9)
            .delay(delay)
            .enqueue_many((seq..seq + BATCH).map(|s| backlog_task::Args { seq: s }))
            .await
            .expect("enqueue_many");
        for s in seq..seq + BATCH {
            due_ms.insert(s, published + i64::try_from(delay.as_millis()).expect("ms"));
        }
        seq += BATCH;
    }
    let published = t0.elapsed();
    let st = stem.stats("backlog").await.expect("stats");
    assert_eq!(st.ready + st.delayed, READY + DELAYED, "{st:?}");

    let t1 = Instant::now();
    let worker = Worker::builder()
        .client(&stem)
        .queues(["backlog"])
        .build()
        .await
        .expect("worker")
        .start();
    let total = usize::try_from(READY + DELAYED).expect("total");
    loop {
        let n = ledger().lock().expect("ledger").len();
        if n >= total {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(120),
            "only {n} of {total} tasks ran in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained = t1.elapsed();
    // Let a duplicate, if any, show up before judging.
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker.shutdown();
    worker.join().await;

    let l = ledger().lock().expect("ledger").clone();
    let twice: Vec<_> = l.iter().filter(|(_, (n, _))| *n != 1).collect();
    assert!(
        twice.is_empty(),
        "tasks run more than once: {:?}",
        &twice[..twice.len().min(5)]
    );
    assert_eq!(l.len(), total, "every task ran");
    // Redis judges due times by its clock; this host is Redis's host, so
    // the two clocks agree to well under the 50 ms allowed here.
    let early: Vec<_> = due_ms
        .iter()
        .filter(|(s, due)| l[*s].1 + 50 < **due)
        .map(|(s, due)| (*s, due - l[s].1))
        .collect();
    assert!(
        early.is_empty(),
        "delayed tasks ran early (seq, ms early): {:?}",
        &early[..early.len().min(5)]
    );
    let st = stem.stats("backlog").await.expect("stats");
    assert_eq!((st.ready, st.delayed, st.leased), (0, 0, 0), "{st:?}");

    let b = RedisBroker::connect(&url(), RedisOptions::default())
        .await
        .expect("connect");
    b.delete_namespace(&ns).await.expect("cleanup");
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("backlog: published {total} in {published:?}, drained in {drained:?}\n").as_bytes(),
    );
}
