//! `State<T>` on the real worker loop: it derefs to `T` and exposes no
//! field of its own, so a user type's `.0` is the user's field.

use std::sync::Arc;
use std::time::Duration;

use stem::State;
use stem::worker::Worker;
use stem_tests::isolated_client;

/// A user type whose own field is `.0`.
#[derive(Debug)]
struct Prefix(&'static str);

#[stem::task(queue = "state_dot_zero")]
async fn prefixed(prefix: State<Prefix>, name: String) -> String {
    // `prefix.0` is `Prefix`'s field, not the `Arc` inside `State`.
    let field: &'static str = prefix.0;
    format!("{field}{name}")
}

#[stem::task(queue = "state_arc")]
async fn arc_is_shared(prefix: State<Prefix>) -> usize {
    let arc: Arc<Prefix> = Arc::clone(prefix.arc());
    let inner: Arc<Prefix> = prefix.into_inner();
    assert!(Arc::ptr_eq(&arc, &inner));
    inner.0.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_dot_zero_is_the_users_field() {
    let stem = isolated_client("state_dot_zero").await;
    let worker = Worker::builder()
        .client(&stem)
        .state(Prefix("hello, "))
        .queues(["state_dot_zero", "state_arc"])
        .poll_interval(Duration::from_millis(50))
        .build()
        .await
        .expect("worker builds")
        .start();
    let greeting = prefixed::enqueue_on(&stem, "Ada".to_owned())
        .await
        .unwrap()
        .wait(Duration::from_secs(10))
        .await
        .expect("the task runs");
    assert_eq!(greeting, "hello, Ada");
    let len = arc_is_shared::enqueue_on(&stem)
        .await
        .unwrap()
        .wait(Duration::from_secs(10))
        .await
        .expect("the task runs");
    assert_eq!(len, "hello, ".len());
    worker.shutdown();
    let report = worker.join().await;
    assert_eq!(report.succeeded, 2);
}
