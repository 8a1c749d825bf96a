#[stem::task]
async fn send<T: serde::Serialize>(value: T) {
    let _ = value;
}

fn main() {}
