//! A task in `fixture_tasks::a::b` (another crate, nested modules) is used
//! through its generated module.

use fixture_tasks::a::b;

async fn producer() -> Result<(), stem::StemError> {
    let _: stem::TaskHandle<u64> = b::send_welcome::enqueue(
        b::Welcome { user_id: 1, locale: "en".into() },
        std::collections::BTreeMap::new(),
    )
    .await?;
    let _: stem::TaskHandle<()> = b::cleanup::with()
        .delay(std::time::Duration::from_secs(1))
        .enqueue(std::time::Duration::from_secs(86_400))
        .await?;
    let _: stem::TaskHandle<u32> = fixture_tasks::cleanup::enqueue(7).await?;
    Ok(())
}

fn main() {
    assert_eq!(b::cleanup::NAME, "fixture_tasks::a::b::cleanup");
    assert_eq!(b::send_welcome::NAME, "fixture.send_welcome");
    let _ = producer;
}
