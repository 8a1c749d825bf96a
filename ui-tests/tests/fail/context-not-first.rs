#[stem::task]
async fn send(to: String, ctx: stem::Context) {
    let _ = (to, ctx);
}

fn main() {}
