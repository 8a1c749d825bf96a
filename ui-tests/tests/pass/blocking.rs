//! `blocking = true` (and the bare `blocking` flag) runs on the blocking pool.
#![deny(warnings)]

#[stem::task(blocking = true)]
async fn hash(data: Vec<u8>) -> u64 {
    data.iter().map(|b| u64::from(*b)).sum()
}

#[stem::task(blocking)]
async fn resize(width: u32, height: u32) -> u32 {
    width * height
}

fn main() {
    assert!(hash::OPTIONS.blocking);
    assert!(resize::OPTIONS.blocking);
}
