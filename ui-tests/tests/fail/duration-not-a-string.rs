#[stem::task(timeout = 30)]
async fn send(to: String) {
    let _ = to;
}

fn main() {}
