#[stem::task(priority = "high")]
async fn send(to: String) {
    let _ = to;
}

fn main() {}
