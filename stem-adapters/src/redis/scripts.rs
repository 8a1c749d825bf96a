//! The Lua scripts, one `.lua` file each under `lua/`, built once per
//! process. Queue scripts get `common.lua` (the time, the key layout and
//! shared helpers) prepended, and take a queue's 25 keys
//! ([`QueueKeys::all`](super::keys::QueueKeys::all)) with the queue's
//! unique-key prefix as `ARGV[1]`.
//!
//! Conventions: a script reads `TIME` once, checks every precondition
//! before its first write (Redis does not roll a failed script back), loops
//! instead of `unpack`ing tables, and touches only keys of one slot.

use std::sync::LazyLock;

use redis::Script;

const COMMON: &str = include_str!("lua/common.lua");

fn queue_script(body: &str) -> Script {
    Script::new(&format!("{COMMON}\n{body}"))
}

pub(crate) static PUBLISH: LazyLock<Script> =
    LazyLock::new(|| queue_script(include_str!("lua/publish.lua")));
pub(crate) static FETCH: LazyLock<Script> =
    LazyLock::new(|| queue_script(include_str!("lua/fetch.lua")));
pub(crate) static EXTEND: LazyLock<Script> =
    LazyLock::new(|| queue_script(include_str!("lua/extend.lua")));
pub(crate) static SETTLE: LazyLock<Script> =
    LazyLock::new(|| queue_script(include_str!("lua/settle.lua")));
pub(crate) static STATS: LazyLock<Script> =
    LazyLock::new(|| queue_script(include_str!("lua/stats.lua")));
pub(crate) static PURGE: LazyLock<Script> =
    LazyLock::new(|| queue_script(include_str!("lua/purge.lua")));
pub(crate) static DEAD_LIST: LazyLock<Script> =
    LazyLock::new(|| queue_script(include_str!("lua/dead_list.lua")));
pub(crate) static DEAD_GET: LazyLock<Script> =
    LazyLock::new(|| queue_script(include_str!("lua/dead_get.lua")));
pub(crate) static REPLAY: LazyLock<Script> =
    LazyLock::new(|| queue_script(include_str!("lua/replay.lua")));
pub(crate) static REAP: LazyLock<Script> =
    LazyLock::new(|| queue_script(include_str!("lua/reap.lua")));
pub(crate) static LEAD: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/lead.lua")));
pub(crate) static BROADCAST: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/broadcast.lua")));
