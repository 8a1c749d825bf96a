//! Every Redis key and channel name Stem uses, and the escaping rule that
//! keeps them apart. The only place key strings are built.
//!
//! Names (namespaces, queues, unique keys, channels) are percent-encoded:
//! every byte outside `[A-Za-z0-9_.-]` becomes `%XX`. The encoding is
//! injective (`%` itself is encoded) and leaves no `:`, `{`, `}` or glob
//! character, so a raw `:` separates parts and the hash tag (between the
//! first `{` and the next `}`) is exactly what is put there:
//!
//! | slot (hash tag)       | keys |
//! |-----------------------|------|
//! | `{<ns>:q:<queue>}`    | `…:p0`..`:p9` streams, `:l0`..`:l9` lease sets, `:delayed`, `:timer`, `:dead`, `:deadidx`, `:u:<key>`, `:meta` |
//! | `{<ns>}`              | `:queues`, `:leader`, `:workers`, `:seen`, `:rv:<id>`, `:bc:<channel>` |
//! | `{<ns>:r:<task id>}`  | the task's record (hash) and its `:done` channel |
//! | `{<ns>:g:<group id>}` | `:meta`, `:members`, `:done` of a group |

use std::fmt::Write as _;

use stem_core::TaskId;

/// Number of priority levels (0..=9).
pub(crate) const LEVELS: usize = 10;

/// Number of hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// The cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (the
/// text between the first `{` and the next `}`, when not empty) or of the
/// whole key, modulo 16384, as Redis computes it (`CLUSTER KEYSLOT`).
pub(crate) fn slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|b| *b == b'}')
                .map(|close| &rest[..close])
        })
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for b in hashed {
        crc ^= u16::from(*b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

/// Percent-encodes `name` (see the module docs).
pub(crate) fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The keys of one namespace.
#[derive(Clone, Debug)]
pub(crate) struct NsKeys {
    /// `stem:{<ns>}`
    base: String,
    /// `<escaped ns>`
    ns: String,
}

impl NsKeys {
    pub(crate) fn new(namespace: &str) -> Self {
        let ns = escape(namespace);
        Self {
            base: format!("stem:{{{ns}}}"),
            ns,
        }
    }

    /// The two `SCAN` patterns that match every key of this namespace and
    /// nothing of another (`app` vs `app2`).
    pub(crate) fn patterns(&self) -> [String; 2] {
        [
            format!("stem:{{{}}}*", self.ns),
            format!("stem:{{{}:*", self.ns),
        ]
    }

    pub(crate) fn queues(&self) -> String {
        format!("{}:queues", self.base)
    }

    pub(crate) fn leader(&self) -> String {
        format!("{}:leader", self.base)
    }

    pub(crate) fn workers(&self) -> String {
        format!("{}:workers", self.base)
    }

    pub(crate) fn seen(&self) -> String {
        format!("{}:seen", self.base)
    }

    pub(crate) fn revoked(&self, id: TaskId) -> String {
        format!("{}:rv:{id}", self.base)
    }

    pub(crate) fn channel(&self, channel: &str) -> String {
        format!("{}:bc:{}", self.base, escape(channel))
    }

    pub(crate) fn queue(&self, queue: &str) -> QueueKeys {
        QueueKeys {
            base: format!("stem:{{{}:q:{}}}", self.ns, escape(queue)),
        }
    }

    /// The record of task `id`: a hash.
    pub(crate) fn record(&self, id: TaskId) -> String {
        format!("stem:{{{}:r:{id}}}", self.ns)
    }

    /// The shard channel announcing that task `id` reached a final state.
    pub(crate) fn record_done(&self, id: TaskId) -> String {
        format!("stem:{{{}:r:{id}}}:done", self.ns)
    }

    /// The keys of group `id`: meta hash, members list, done set.
    pub(crate) fn group(&self, id: TaskId) -> [String; 3] {
        let base = format!("stem:{{{}:g:{id}}}", self.ns);
        [
            format!("{base}:meta"),
            format!("{base}:members"),
            format!("{base}:done"),
        ]
    }
}

/// The keys of one queue, all in the queue's slot.
#[derive(Clone, Debug)]
pub(crate) struct QueueKeys {
    base: String,
}

impl QueueKeys {
    /// The stream of priority `level`.
    pub(crate) fn stream(&self, level: usize) -> String {
        format!("{}:p{level}", self.base)
    }

    /// The lease set of priority `level`.
    pub(crate) fn leases(&self, level: usize) -> String {
        format!("{}:l{level}", self.base)
    }

    pub(crate) fn delayed(&self) -> String {
        format!("{}:delayed", self.base)
    }

    pub(crate) fn timer(&self) -> String {
        format!("{}:timer", self.base)
    }

    pub(crate) fn dead(&self) -> String {
        format!("{}:dead", self.base)
    }

    pub(crate) fn dead_index(&self) -> String {
        format!("{}:deadidx", self.base)
    }

    pub(crate) fn meta(&self) -> String {
        format!("{}:meta", self.base)
    }

    /// The prefix of unique keys; scripts append the escaped key.
    pub(crate) fn unique_prefix(&self) -> String {
        format!("{}:u:", self.base)
    }

    /// The standard KEYS of a queue script: p0..p9, l0..l9, delayed,
    /// timer, dead, deadidx, meta (25 keys), then the unique prefix as
    /// ARGV[1] by convention of the scripts.
    pub(crate) fn all(&self) -> Vec<String> {
        let mut k = Vec::with_capacity(2 * LEVELS + 5);
        k.extend((0..LEVELS).map(|l| self.stream(l)));
        k.extend((0..LEVELS).map(|l| self.leases(l)));
        k.push(self.delayed());
        k.push(self.timer());
        k.push(self.dead());
        k.push(self.dead_index());
        k.push(self.meta());
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_injective_on_tricky_names() {
        let names = [
            "app",
            "app2",
            "app:jobs",
            "app.jobs",
            "app%3Ajobs",
            "{app}",
            "a b",
            "ünï",
            "*",
            "",
        ];
        let mut seen = std::collections::HashSet::new();
        for n in names {
            let e = escape(n);
            assert!(
                !e.contains([':', '{', '}', '*', '?', '[', ' ']),
                "{n} -> {e}"
            );
            assert!(seen.insert(e.clone()), "{n} collides as {e}");
        }
        assert_eq!(escape("jobs:high"), "jobs%3Ahigh");
    }

    #[test]
    fn namespaces_that_are_prefixes_do_not_share_keys() {
        let a = NsKeys::new("app");
        let b = NsKeys::new("app2");
        let qa = a.queue("x").stream(0);
        let qb = b.queue("x").stream(0);
        assert_ne!(qa, qb);
        let [p1, p2] = a.patterns();
        for k in [
            qb,
            b.queues(),
            b.leader(),
            b.record(TaskId::new()),
            b.channel("c"),
        ] {
            let m = |p: &str| k.starts_with(p.trim_end_matches('*'));
            assert!(!m(&p1) && !m(&p2), "{k} matched a pattern of app");
        }
        assert!(qa.starts_with(p2.trim_end_matches('*')));
        assert!(a.queues().starts_with(p1.trim_end_matches('*')));
        // (ns `app`, queue `jobs:high`) and (ns `app:jobs`, queue `high`).
        assert_ne!(
            NsKeys::new("app").queue("jobs:high").stream(0),
            NsKeys::new("app:jobs").queue("high").stream(0)
        );
    }

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` (Redis 7.0).
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        let q = NsKeys::new("n").queue("q");
        let s = slot(q.stream(0).as_bytes());
        assert!(q.all().iter().all(|k| slot(k.as_bytes()) == s));
        assert_eq!(slot(format!("{}abc", q.unique_prefix()).as_bytes()), s);
    }

    #[test]
    fn one_queue_one_hash_tag() {
        let q = NsKeys::new("n").queue("q{1}");
        let tag = |k: &str| {
            let s = k.find('{').unwrap();
            let e = s + k[s..].find('}').unwrap();
            k[s + 1..e].to_owned()
        };
        let keys = q.all();
        let t = tag(&keys[0]);
        assert!(keys.iter().all(|k| tag(k) == t), "{keys:?}");
        assert_eq!(tag(&format!("{}x", q.unique_prefix())), t);
    }
}
