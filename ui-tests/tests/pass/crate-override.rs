//! `crate = "..."` replaces `::stem` in generated code.
#![deny(warnings)]

extern crate stem as renamed_stem;

#[stem::task(crate = "::renamed_stem", queue = "q")]
async fn work(n: u32) -> u32 {
    n
}

fn main() {
    assert_eq!(work::OPTIONS.queue, "q");
}
