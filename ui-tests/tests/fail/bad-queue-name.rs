#[stem::task(queue = "high priority")]
async fn send(to: String) {
    let _ = to;
}

fn main() {}
