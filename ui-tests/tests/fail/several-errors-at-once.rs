struct NotSerde;

#[stem::task(queue = "a b", priority = 12, retries = -1, colour = "red", timeout = "soon")]
async fn send(to: String, extra: NotSerde) {
    let _ = (to, extra);
}

fn main() {}
