#[stem::task(priority = 10)]
async fn send(to: String) {
    let _ = to;
}

fn main() {}
