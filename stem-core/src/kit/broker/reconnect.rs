//! Reconnection (B15).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::{LONG_LEASE, fetch_n, job, next_message, publish, req};
use crate::envelope::TaskId;
use crate::kit::ops::BrokerOps;
use crate::kit::{AdapterFactory, KitOptions, guarded, skip};

/// B15: through an outage (the factory's [`disrupt`]: a restart or a
/// connection kill), a publish returns an error or stores the envelope,
/// never a false Ok; a blocking fetch and a broadcast subscription that
/// were open when the connection dropped go on working; and the same client
/// resumes by itself, losing nothing published before the drop.
///
/// [`disrupt`]: AdapterFactory::disrupt
pub async fn b15_reconnect(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b15");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        let caps = b.capabilities();
        if !caps.reconnect {
            return skip(f, "B15", "no reconnect", "reconnect");
        }
        let ids: Vec<TaskId> = (0..5).map(|_| TaskId::new()).collect();
        for (n, id) in ids.iter().enumerate() {
            let mut e = job("reconnect", n as u64);
            e.id = *id;
            publish(&*b, e).await;
        }

        // Open before the drop: a blocking fetch and a subscription.
        let waiter = f.broker(&o).await;
        let in_flight_wait = Duration::from_secs(20);
        let in_flight = {
            let waiter = waiter.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let r = req(&["reconnect-wait"], 1, LONG_LEASE).wait(in_flight_wait);
                (waiter.fetch(&r).await, started.elapsed())
            })
        };
        let mut sub = if caps.broadcast {
            Some(b.subscribe("kit-b15").await.expect("subscribe"))
        } else {
            None
        };
        tokio::time::sleep(Duration::from_millis(100)).await;

        // Publishes while the outage lasts.
        let outage = tokio::spawn({
            let publisher = f.broker(&o).await;
            async move {
                let mut answers = Vec::new();
                for n in 0..50_u64 {
                    let e = job("reconnect-during", n);
                    let id = e.id;
                    let answer =
                        tokio::time::timeout(Duration::from_secs(30), publisher.publish(e))
                            .await
                            .map_err(|_| format!("publish {n} hung for 30 s during the outage"));
                    answers.push((id, answer));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                answers
            }
        });
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

        // Every Ok a publish answered during the outage is a stored envelope.
        let answers = outage.await.expect("publisher task");
        let mut stored = HashSet::new();
        for (id, answer) in &answers {
            match answer {
                Err(hung) => panic!("{hung}"),
                Ok(Ok(p)) => {
                    assert_eq!(p.id(), *id, "a publish answered with another id");
                    stored.insert(*id);
                }
                Ok(Err(e)) => tracing::debug!("B15: publish during the outage: {e}"),
            }
        }
        let mut delivered = HashSet::new();
        let until = Instant::now() + Duration::from_secs(10);
        while delivered.len() < stored.len() && Instant::now() < until {
            let r = req(&["reconnect-during"], 50, LONG_LEASE).wait(Duration::from_millis(500));
            if let Ok(ds) = b.fetch(&r).await {
                delivered.extend(ds.into_iter().map(|d| d.envelope.id));
            }
        }
        let lost: Vec<&TaskId> = stored.difference(&delivered).collect();
        assert!(
            lost.is_empty(),
            "publish answered Ok during the outage but these envelopes were never stored: {lost:?}"
        );

        // What was open before the drop still works.
        let late = publish(&*b, job("reconnect-wait", 7)).await;
        let (first, took) = in_flight.await.expect("in-flight fetch task");
        assert!(
            took <= in_flight_wait + Duration::from_secs(5),
            "a blocking fetch open during the outage hung for {took:?}"
        );
        let first = match first {
            Ok(ds) => {
                assert!(
                    !ds.is_empty() || took + Duration::from_secs(1) >= in_flight_wait,
                    "a blocking fetch open during the outage returned nothing after {took:?} \
                     of its {in_flight_wait:?}, with an envelope ready"
                );
                ds
            }
            Err(e) => {
                tracing::debug!("B15: the in-flight fetch ended with: {e}");
                Vec::new()
            }
        };
        let got = if first.is_empty() {
            fetch_n(
                &*waiter,
                &["reconnect-wait"],
                1,
                LONG_LEASE,
                Duration::from_secs(5),
            )
            .await
        } else {
            first
        };
        assert_eq!(
            got.first().map(|d| d.envelope.id),
            Some(late),
            "the consumer that was waiting during the outage receives what came after"
        );
        if let Some(sub) = sub.as_mut() {
            let mut heard = None;
            let until = Instant::now() + Duration::from_secs(10);
            while heard.is_none() && Instant::now() < until {
                if let Err(e) = b.broadcast_send("kit-b15", "after-the-drop").await {
                    tracing::debug!("B15: broadcast after the drop: {e}");
                }
                heard = next_message(sub, Duration::from_millis(500)).await;
            }
            assert_eq!(
                heard.as_deref(),
                Some("after-the-drop"),
                "a subscription open during the outage hears broadcasts sent after it"
            );
        }

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
