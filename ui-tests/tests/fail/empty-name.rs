#[stem::task(name = "")]
async fn send(to: String) {
    let _ = to;
}

fn main() {}
