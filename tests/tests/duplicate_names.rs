//! Two tasks registering one name are caught when the registry is first
//! read, with both source locations in the message.

mod billing {
    #[stem::task(name = "shared::charge")]
    pub(crate) async fn charge(cents: u64) -> u64 {
        cents
    }
}

mod refunds {
    #[stem::task(name = "shared::charge")]
    pub(crate) async fn charge(cents: u64) -> u64 {
        cents
    }
}

#[test]
fn registry_check_names_both_locations() {
    let err = stem::registry::check().unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("duplicate task name `shared::charge`"),
        "{msg}"
    );
    assert!(
        msg.contains("billing::charge") && msg.contains("refunds::charge"),
        "{msg}"
    );
    assert_eq!(msg.matches("duplicate_names.rs:").count(), 2, "{msg}");
    // The generated names are still distinct modules.
    assert_eq!(billing::charge::NAME, refunds::charge::NAME);
}

#[tokio::test]
async fn a_worker_refuses_to_start() {
    let stem = stem_tests::isolated_client("dup").await;
    let err = stem::worker::Worker::builder()
        .client(&stem)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        stem::worker::WorkerError::Registry(stem::registry::RegistryError::DuplicateName { .. })
    ));
}
