#[stem::task]
async fn send(to: &str, count: u32) {
    let _ = (to, count);
}

async fn producer() {
    let _ = send::enqueue("a@b", 1).await;
}

fn main() {
    let _ = producer;
}
