#[stem::task]
fn send(to: String) {
    let _ = to;
}

async fn producer() {
    // No second error here: the generated module still exists.
    let _ = send::enqueue(String::new()).await;
}

fn main() {
    let _ = producer;
}
