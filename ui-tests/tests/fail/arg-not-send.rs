// Serde but not `Send`: one error, on the type.
use std::rc::Rc;

#[derive(serde::Serialize, serde::Deserialize)]
struct Email {
    to: String,
    #[serde(skip)]
    seen: Rc<()>,
}

#[stem::task]
async fn send(email: Email) {
    let _ = (email.to, email.seen);
}

fn main() {}
