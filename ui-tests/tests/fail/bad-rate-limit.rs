#[stem::task(rate_limit = "100 per second")]
async fn send(to: String) {
    let _ = to;
}

fn main() {}
