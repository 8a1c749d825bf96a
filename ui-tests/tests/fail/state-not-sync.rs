use std::cell::Cell;

#[stem::task]
async fn count(counter: stem::State<Cell<u32>>) {
    let _ = counter;
}

fn main() {}
