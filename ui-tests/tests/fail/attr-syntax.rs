#[stem::task(queue "emails")]
async fn send(to: String) {
    let _ = to;
}

fn main() {}
