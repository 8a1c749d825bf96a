// Serialize but not Deserialize: still one error, on the type.
#[derive(serde::Serialize)]
struct Email {
    to: String,
}

#[stem::task]
async fn send(email: Email) {
    let _ = email.to;
}

fn main() {}
