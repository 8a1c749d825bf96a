//! Bad input: oversized envelopes and garbage in storage (B16).

use std::collections::HashSet;
use std::time::Duration;

use super::{LONG_LEASE, assert_nothing, fetch_n, job, job_with_payload, publish, stats};
use crate::envelope::TaskId;
use crate::error::BrokerError;
use crate::kit::ops::BrokerOps;
use crate::kit::{AdapterFactory, KitOptions, guarded};

/// B16: oversized envelopes are refused at publish with a clear error;
/// garbage in storage is dead-lettered with a reason while the consumer
/// keeps going.
pub async fn b16_bad_input(f: &dyn AdapterFactory) {
    let o = KitOptions::new(f.name(), "b16");
    guarded(f, &[&o], async {
        let b = f.broker(&o).await;
        let limit = o.max_envelope_bytes;

        // Too large: refused, typed, nothing stored.
        let big = job_with_payload("big", limit);
        let big_id = big.id;
        match b.publish(big).await {
            Err(BrokerError::TooLarge {
                task_id,
                size,
                limit: l,
            }) => {
                assert_eq!(task_id, big_id);
                assert_eq!(l, limit, "the error names the configured limit");
                assert!(size > limit, "the error names the size: {size}");
            }
            other => panic!(
                "an envelope over {limit} bytes must be refused with TooLarge, got {other:?}"
            ),
        }
        let err = b
            .publish(job_with_payload("big", limit * 2))
            .await
            .expect_err("too large");
        assert!(
            err.to_string().contains(&limit.to_string()),
            "a clear message: {err}"
        );
        // Just under the limit is fine.
        let fits = job_with_payload("big", limit - 2048);
        assert!(fits.encode().map(|v| v.len()).unwrap_or(usize::MAX) <= limit);
        publish(&*b, fits).await;
        assert_eq!(
            stats(&*b, "big").await.ready,
            1,
            "only the envelope that fits is stored"
        );

        // Garbage between good envelopes.
        let good1 = publish(&*b, job("garbage", 1)).await;
        f.insert_garbage(&o, "garbage", b"{this is not an envelope")
            .await;
        f.insert_garbage(&o, "garbage", &[0xff, 0xfe, 0x00, 0x01])
            .await;
        f.insert_garbage(&o, "garbage", br#"{"v":1,"id":"not-a-uuid"}"#)
            .await;
        let good2 = publish(&*b, job("garbage", 2)).await;
        let got = fetch_n(&*b, &["garbage"], 2, LONG_LEASE, Duration::from_secs(5)).await;
        let ids: Vec<TaskId> = got.iter().map(|d| d.envelope.id).collect();
        assert_eq!(
            ids,
            [good1, good2],
            "the consumer gets the good envelopes and never the garbage"
        );
        assert_nothing(
            &*b,
            &["garbage"],
            Duration::from_millis(200),
            "garbage is never delivered",
        )
        .await;
        let dead = b.list_dead("garbage", 10).await.expect("dead_letters");
        assert_eq!(
            dead.len(),
            3,
            "each garbage entry is dead-lettered: {dead:?}"
        );
        for d in &dead {
            assert!(d.envelope.is_none(), "garbage has no envelope");
            assert!(
                !d.reason.trim().is_empty(),
                "garbage is dead-lettered with a reason"
            );
            assert_eq!(d.queue, "garbage");
        }
        assert!(
            dead.iter().any(|d| d
                .raw
                .as_deref()
                .is_some_and(|r| r.contains("this is not an envelope"))),
            "the raw bytes are kept for inspection: {dead:?}"
        );
        let dead_ids: HashSet<TaskId> = dead.iter().map(|d| d.id).collect();
        assert_eq!(
            dead_ids.len(),
            3,
            "each dead-lettered garbage entry has its own id"
        );
        assert_eq!(stats(&*b, "garbage").await.dead, 3);
    })
    .await;
}
