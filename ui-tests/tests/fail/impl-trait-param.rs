#[stem::task]
async fn send(to: impl Into<String>) {
    let _ = to.into();
}

fn main() {}
