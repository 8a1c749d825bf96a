#[stem::task(queue = "emails", priority = 1, queue = "sms")]
async fn send(to: String) {
    let _ = to;
}

fn main() {}
