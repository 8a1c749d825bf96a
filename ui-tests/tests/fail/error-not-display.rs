#[derive(Debug)]
struct MailError;

#[stem::task]
async fn send(to: String) -> Result<u64, MailError> {
    let _ = to;
    Err(MailError)
}

fn main() {}
