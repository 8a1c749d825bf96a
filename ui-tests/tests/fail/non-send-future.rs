use std::rc::Rc;

#[stem::task]
async fn send(to: String) {
    let shared = Rc::new(to);
    std::future::ready(()).await;
    let _ = shared;
}

fn main() {}
