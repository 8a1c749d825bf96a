#[stem::task(backoff = linear)]
async fn send(to: String) {
    let _ = to;
}

fn main() {}
