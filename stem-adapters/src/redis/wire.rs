//! What travels between Rust and the scripts: the receipt of a Redis
//! delivery and the decoding of script replies.

use std::sync::Arc;

use redis::Value;
use stem_core::Envelope;

/// The adapter's proof of a lease, behind `ReceiptHandle::Opaque`: the
/// stream entry, its level and the fence (how many times the entry was
/// handed out). The lease set member `<entry>|<fence>` exists exactly while
/// this delivery holds the lease.
#[derive(Debug)]
pub(crate) struct RedisReceipt {
    pub(crate) level: u8,
    pub(crate) entry: String,
    pub(crate) fence: u64,
    /// Hand-outs so far, this one included (`Delivery::deliveries`): the
    /// base count a retried or released copy carries on.
    pub(crate) deliveries: u32,
    pub(crate) consumer: Arc<str>,
    /// The delivered envelope (the same allocation as the delivery's), so
    /// a retry can charge it without reading it back.
    pub(crate) envelope: Arc<Envelope>,
}

/// A reply value as text (bulk or simple strings, integers).
pub(crate) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// A reply value as raw bytes.
pub(crate) fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// A reply value as an integer (Lua numbers arrive as integers; numeric
/// strings are accepted too).
pub(crate) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// A reply value as an array (`Nil` is an empty one).
pub(crate) fn array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) => Some(a),
        Value::Nil => Some(&[]),
        _ => None,
    }
}

/// The millisecond part of a stream entry id `ms-seq`.
pub(crate) fn entry_ms(id: &str) -> Option<i64> {
    id.split('-').next()?.parse().ok()
}

/// The fields of a stream entry's flat field list.
pub(crate) fn field<'a>(flat: &'a [Value], name: &str) -> Option<&'a Value> {
    flat.chunks_exact(2)
        .find(|kv| bytes(&kv[0]) == Some(name.as_bytes()))
        .map(|kv| &kv[1])
}
