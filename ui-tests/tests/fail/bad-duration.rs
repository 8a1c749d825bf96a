#[stem::task(timeout = "30 seconds-ish")]
async fn send(to: String) {
    let _ = to;
}

fn main() {}
