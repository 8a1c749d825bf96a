#[stem::task]
async fn send(ctx: stem::Context, to: String, again: stem::Context) {
    let _ = (ctx, to, again);
}

fn main() {}
