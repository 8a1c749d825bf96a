#[stem::task(delivery = exactly_once)]
async fn send(to: String) {
    let _ = to;
}

fn main() {}
