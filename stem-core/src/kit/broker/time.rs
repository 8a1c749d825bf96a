//! Time: delays (B8) and the server clock (B18).

use std::time::{Duration, Instant};

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

/// B8 for a consumer that polls (`wait` zero) instead of blocking: polls
/// every 50 ms from the publish on, and none of them gets the envelope
/// before its `not_before`.
pub async fn b08_polled_delay_is_not_early(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b08_poll");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        if !b.capabilities().delay {
            return skip(f, "B08", "no delayed delivery", "delay");
        }
        let mut e = job("polled", 1);
        let due = Utc::now() + TimeDelta::milliseconds(800);
        e.not_before = Some(due);
        let id = publish(&*b, e).await;
        let until = Instant::now() + Duration::from_secs(5);
        let got = loop {
            let got = fetch(&*b, &req(&["polled"], 1, LONG_LEASE)).await;
            if !got.is_empty() || Instant::now() > until {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let received = Utc::now();
        assert_eq!(
            got.first().map(|d| d.envelope.id),
            Some(id),
            "delivered once due"
        );
        assert!(
            received + TimeDelta::milliseconds(20) >= due,
            "a polling consumer got the envelope {} ms before its not_before",
            (due - received).num_milliseconds()
        );
    })
    .await;
}

/// B18: delays and leases are judged by the server's clock, so a client
/// whose clock is ten minutes fast ([`AdapterFactory::skewed_broker`])
/// neither runs delayed work early nor steals live leases, its own lease
/// and extension last what they ask on the server's clock, and a delay it
/// sets (`not_before - enqueued_at`, both by its clock) runs after that
/// long, not ten minutes early or late. An adapter that declares
/// `server_time` must offer the skewed client.
pub async fn b18_server_time(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b18");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        if !b.capabilities().server_time {
            return skip(f, "B18", "no server clock", "server_time");
        }
        let skew = TimeDelta::minutes(10);
        let Some(skewed) = f.skewed_broker(&o, skew).await else {
            panic!(
                "{} declares `server_time: true`, but its factory offers no skewed_broker: \
                 implement AdapterFactory::skewed_broker (a client whose clock is off) so B18 \
                 can test what it declares",
                f.name()
            );
        };
        let mut delayed = job("clock", 1);
        delayed.not_before = Some(Utc::now() + TimeDelta::seconds(2));
        let delayed_id = publish(&*b, delayed).await;
        let leased_id = publish(&*b, job("clock-lease", 2)).await;
        let held = fetch(&*b, &req(&["clock-lease"], 1, Duration::from_secs(5))).await;
        assert_eq!(held[0].envelope.id, leased_id);

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

        // The fast client's own lease and extension, on the server's clock.
        publish(&*b, job("clock-own", 3)).await;
        let own = fetch(
            &*skewed,
            &req(&["clock-own"], 1, Duration::from_millis(400)),
        )
        .await;
        assert_eq!(own.len(), 1, "the fast client leases");
        skewed
            .extend_lease(&own[0].receipt, Duration::from_secs(5))
            .await
            .expect("the fast client extends its live lease");
        assert_nothing(
            &*b,
            &["clock-own"],
            Duration::from_millis(700),
            "a fast client's extended lease ran out by its own clock",
        )
        .await;
        skewed
            .ack(&own[0].receipt)
            .await
            .expect("the fast client's lease is intact");

        // A delay the fast client sets by its own clock lasts what it says.
        let fast_now = Utc::now() + skew;
        let mut fast = job("clock-fast", 4);
        fast.enqueued_at = fast_now;
        fast.not_before = Some(fast_now + TimeDelta::seconds(1));
        let published = Instant::now();
        let fast_id = publish(&*skewed, fast).await;
        assert_nothing(
            &*b,
            &["clock-fast"],
            Duration::from_millis(400),
            "a 1 s delay set by a fast clock ran at once",
        )
        .await;
        let got = fetch_n(&*b, &["clock-fast"], 1, LONG_LEASE, Duration::from_secs(5)).await;
        assert_eq!(
            got.first().map(|d| d.envelope.id),
            Some(fast_id),
            "a 1 s delay set by a fast clock is delivered after about 1 s"
        );
        assert!(
            published.elapsed() >= Duration::from_millis(900),
            "a 1 s delay set by a fast clock ran after {:?}",
            published.elapsed()
        );

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
