struct Receipt;

#[stem::task]
async fn send(to: String) -> Receipt {
    let _ = to;
    Receipt
}

fn main() {}
