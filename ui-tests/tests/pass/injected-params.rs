//! `Context` first, `State<T>` anywhere, unit output; only the payload is in `Args`.
#![deny(warnings)]

use stem::{Context, State};

struct Db {
    url: String,
}

#[stem::task]
async fn import(ctx: Context, rows: Vec<String>, db: State<Db>, batch: u32) {
    let _ = (ctx.id(), rows.len(), db.url.len(), batch);
}

#[stem::task]
async fn only_state(db: stem::State<Db>) -> usize {
    db.url.len()
}

#[stem::task]
async fn only_context(_ctx: stem::Context) {}

fn main() {
    let args = import::Args {
        rows: vec![String::from("a")],
        batch: 2,
    };
    let _ = (args.rows, args.batch);
    let _: only_state::Args = only_state::Args {};
    let _: only_context::Output = ();
}
