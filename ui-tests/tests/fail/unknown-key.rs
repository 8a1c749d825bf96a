#[stem::task(queue = "emails", max_retries = 3)]
async fn send(to: String) {
    let _ = to;
}

fn main() {}
