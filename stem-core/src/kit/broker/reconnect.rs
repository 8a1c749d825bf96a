//! Reconnection (B15).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::{LONG_LEASE, fetch_n, job, publish, req};
use crate::envelope::TaskId;
use crate::kit::{AdapterFactory, KitOptions, guarded, skip};

/// B15: after the server restarts, a consumer resumes by itself and loses
/// nothing published before the drop.
///
/// Needs [`AdapterFactory::disrupt`]; "a publish during the outage returns
/// an error" needs a window the kit cannot hold open generically, so adapter
/// suites test it with their own fault injection.
pub async fn b15_reconnect(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b15");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        if !b.capabilities().reconnect {
            return skip(f, "B15", "no reconnect", "reconnect");
        }
        let ids: Vec<TaskId> = (0..5).map(|_| TaskId::new()).collect();
        for (n, id) in ids.iter().enumerate() {
            let mut e = job("reconnect", n as u64);
            e.id = *id;
            publish(&*b, e).await;
        }
        assert!(
            f.disrupt(&o).await.is_some(),
            "{} declares `reconnect: true` but its factory cannot disrupt the server: \
             implement AdapterFactory::disrupt (a restart or a connection kill), or \
             declare `reconnect: false` and list b15_reconnect as unsupported",
            f.name()
        );
        // The same client resumes on its own; errors while it reconnects are
        // allowed, losing envelopes is not.
        let until = Instant::now() + Duration::from_secs(30);
        let mut got = HashSet::new();
        while got.len() < ids.len() && Instant::now() < until {
            match b
                .fetch(&req(&["reconnect"], 5, LONG_LEASE).wait(Duration::from_millis(500)))
                .await
            {
                Ok(ds) => got.extend(ds.into_iter().map(|d| d.envelope.id)),
                Err(e) => {
                    tracing::debug!("B15: fetch during reconnect: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        assert_eq!(
            got,
            ids.into_iter().collect::<HashSet<_>>(),
            "envelopes published before the drop are all delivered"
        );
        let after = publish(&*b, job("reconnect", 9)).await;
        let more = fetch_n(&*b, &["reconnect"], 1, LONG_LEASE, Duration::from_secs(5)).await;
        assert_eq!(
            more.first().map(|d| d.envelope.id),
            Some(after),
            "publishing works again"
        );
    })
    .await;
}
