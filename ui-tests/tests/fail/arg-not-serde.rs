struct Email {
    to: String,
}

#[stem::task]
async fn send(count: u32, email: Email) {
    let _ = (count, email.to);
}

fn main() {}
