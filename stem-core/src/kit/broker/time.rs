//! Time: delays (B8) and the server clock (B18).

use std::time::Duration;

use chrono::{TimeDelta, Utc};

use super::{LONG_LEASE, assert_nothing, fetch, fetch_n, job, n_of, publish, req, stats};
use crate::kit::{AdapterFactory, KitOptions, guarded, skip};

/// B8: an envelope is not delivered before `not_before`, and is delivered
/// within a tick of it.
pub async fn b08_delay(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b08");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        if !b.capabilities().delay {
            return skip(f, "B08", "no delayed delivery", "delay");
        }
        let delay = TimeDelta::milliseconds(600);
        let mut late = job("delay", 2);
        late.not_before = Some(Utc::now() + delay * 2);
        let mut soon = job("delay", 1);
        soon.not_before = Some(Utc::now() + delay);
        let mut past = job("delay", 0);
        past.not_before = Some(Utc::now() - TimeDelta::seconds(5));
        let late_at = late.not_before;
        let soon_at = soon.not_before;
        publish(&*b, late).await;
        publish(&*b, soon).await;
        publish(&*b, past).await;

        let now = fetch(&*b, &req(&["delay"], 10, LONG_LEASE)).await;
        assert_eq!(
            now.len(),
            1,
            "only the envelope whose time has passed is ready"
        );
        assert_eq!(n_of(&now[0].envelope), 0);
        let s = stats(&*b, "delay").await;
        assert_eq!((s.ready, s.delayed), (0, 2), "{s:?}");

        let slack = f.tick() + Duration::from_millis(300);
        for (n, at) in [(1, soon_at), (2, late_at)] {
            let at = at.unwrap_or_else(Utc::now);
            let got = fetch(
                &*b,
                &req(&["delay"], 10, LONG_LEASE).wait(Duration::from_secs(5)),
            )
            .await;
            let received = Utc::now();
            assert_eq!(got.len(), 1, "one delayed envelope at a time");
            assert_eq!(
                n_of(&got[0].envelope),
                n,
                "delayed envelopes come in time order"
            );
            assert!(
                received + TimeDelta::milliseconds(20) >= at,
                "delivered at {received}, before not_before {at}"
            );
            let lateness = (received - at).to_std().unwrap_or_default();
            assert!(
                lateness <= slack,
                "delivered {lateness:?} after not_before; a tick is {:?}",
                f.tick()
            );
        }
    })
    .await;
}

/// B18: delays and leases are judged by the server's clock, so a client
/// whose clock is off neither runs delayed work early nor steals live
/// leases. Needs [`AdapterFactory::skewed_broker`] for the skewed half.
pub async fn b18_server_time(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b18");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        if !b.capabilities().server_time {
            return skip(f, "B18", "no server clock", "server_time");
        }
        let mut delayed = job("clock", 1);
        delayed.not_before = Some(Utc::now() + TimeDelta::seconds(2));
        let delayed_id = publish(&*b, delayed).await;
        let leased_id = publish(&*b, job("clock-lease", 2)).await;
        let held = fetch(&*b, &req(&["clock-lease"], 1, Duration::from_secs(5))).await;
        assert_eq!(held[0].envelope.id, leased_id);

        let Some(skewed) = f.skewed_broker(&o, TimeDelta::minutes(10)).await else {
            assert_nothing(
                &*b,
                &["clock", "clock-lease"],
                Duration::from_millis(300),
                "nothing is due yet",
            )
            .await;
            return;
        };
        assert_nothing(
            &*skewed,
            &["clock"],
            Duration::from_millis(300),
            "a fast clock runs delayed work early",
        )
        .await;
        assert_nothing(
            &*skewed,
            &["clock-lease"],
            Duration::from_millis(300),
            "a fast clock steals a live lease",
        )
        .await;
        let due = fetch_n(&*skewed, &["clock"], 1, LONG_LEASE, Duration::from_secs(5)).await;
        assert_eq!(
            due.first().map(|d| d.envelope.id),
            Some(delayed_id),
            "delivered once due by the server clock"
        );
        b.ack(&held[0].receipt)
            .await
            .expect("the live lease is intact");
    })
    .await;
}
