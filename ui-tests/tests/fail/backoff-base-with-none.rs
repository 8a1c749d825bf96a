#[stem::task(backoff = none, backoff_base = "1s")]
async fn send(to: String) {
    let _ = to;
}

fn main() {}
