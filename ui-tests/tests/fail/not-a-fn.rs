#[stem::task]
struct Send {
    to: String,
}

fn main() {}
