//! Every producer function type-checks with the expected types.
#![deny(warnings)]

use std::time::{Duration, SystemTime};

use stem::{Signature, Stem, StemError, TaskHandle};

#[stem::task(queue = "emails")]
async fn send_email(to: String, body: String) -> Result<u64, std::io::Error> {
    Ok((to.len() + body.len()) as u64)
}

async fn producer(client: &Stem, ctx: &stem::Context) -> Result<(), StemError> {
    let h: TaskHandle<u64> = send_email::enqueue("a@b".into(), "hi".into()).await?;
    let _ = h.id();
    let _: TaskHandle<u64> = send_email::enqueue_on(client, "a@b".into(), "hi".into()).await?;
    let _: TaskHandle<u64> = send_email::with()
        .delay(Duration::from_secs(5))
        .eta(SystemTime::now())
        .expires_in(Duration::from_secs(60))
        .priority(3)
        .queue("urgent")
        .retries(1)
        .unique_for(Duration::from_secs(30))
        .unique_until_finished()
        .header("trace", String::from("abc"))
        .parent(ctx)
        .result_ttl(Duration::from_secs(3600))
        .on(client)
        .enqueue("a@b".into(), "hi".into())
        .await?;
    let many: Vec<TaskHandle<u64>> = send_email::enqueue_many([
        send_email::Args { to: "x".into(), body: "1".into() },
        send_email::Args { to: "y".into(), body: "2".into() },
    ])
    .await?;
    let _ = many.len();
    let _: Vec<TaskHandle<u64>> = send_email::with()
        .on(client)
        .enqueue_many(vec![send_email::Args { to: "z".into(), body: "3".into() }])
        .await?;
    let sig: Signature<u64> = send_email::signature("a@b".into(), "hi".into());
    let _: TaskHandle<u64> = sig.enqueue().await?;
    let _: Signature<u64> = send_email::with().priority(1).signature("c".into(), "d".into());
    // `with()` is the core builder itself: every option of `TaskBuilder`
    // is there, and generic code can take it.
    let b: stem::TaskBuilder<send_email::Task> = send_email::with();
    let _: send_email::Builder = b.eta(chrono_free_eta());
    Ok(())
}

fn chrono_free_eta() -> SystemTime {
    SystemTime::now() + Duration::from_secs(1)
}

fn main() {
    let _ = producer;
}
