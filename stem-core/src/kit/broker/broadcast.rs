//! Broadcast (B11).

use std::time::Duration;

use super::next_message;
use crate::kit::ops::BrokerOps;
use crate::kit::{AdapterFactory, KitOptions, guarded, skip};

/// B11: a broadcast reaches every live subscriber of the channel once,
/// and nobody else.
pub async fn b11_broadcast(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b11");
    guarded(f, &[&o], async {
        let sender = f.broker(&o).await;
        if !sender.capabilities().broadcast {
            return skip(f, "B11", "no broadcast channels", "broadcast");
        }
        let a = f.broker(&o).await;
        let c = f.broker(&o).await;
        let mut sub_a = a.subscribe("kit-control").await.expect("subscribe");
        let mut sub_b = c.subscribe("kit-control").await.expect("subscribe");
        let mut other = c.subscribe("kit-other").await.expect("subscribe");

        sender
            .broadcast_send("kit-control", "m1")
            .await
            .expect("broadcast");
        sender
            .broadcast_send("kit-control", r#"{"cmd":"m2"}"#)
            .await
            .expect("broadcast");
        let wait = Duration::from_secs(3);
        for (name, sub) in [("first", &mut sub_a), ("second", &mut sub_b)] {
            assert_eq!(
                next_message(sub, wait).await.as_deref(),
                Some("m1"),
                "{name} subscriber gets m1"
            );
            assert_eq!(
                next_message(sub, wait).await.as_deref(),
                Some(r#"{"cmd":"m2"}"#),
                "{name} subscriber gets m2, in order"
            );
            assert_eq!(
                next_message(sub, Duration::from_millis(300)).await,
                None,
                "{name}: once each"
            );
        }
        assert_eq!(
            next_message(&mut other, Duration::from_millis(200)).await,
            None,
            "other channels hear nothing"
        );

        // A late subscriber gets only what is sent after it subscribed; a
        // dropped one does not disturb the others.
        drop(sub_b);
        let mut late = a.subscribe("kit-control").await.expect("subscribe");
        sender
            .broadcast_send("kit-control", "m3")
            .await
            .expect("broadcast");
        assert_eq!(next_message(&mut late, wait).await.as_deref(), Some("m3"));
        assert_eq!(next_message(&mut sub_a, wait).await.as_deref(), Some("m3"));
        assert_eq!(
            next_message(&mut late, Duration::from_millis(200)).await,
            None
        );

        // Broadcasting with nobody listening is not an error.
        sender
            .broadcast_send("kit-nobody", "x")
            .await
            .expect("broadcast to no subscriber");
    })
    .await;
}
