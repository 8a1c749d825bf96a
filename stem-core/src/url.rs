//! URLs: picking an adapter by scheme, and redacting secrets for logs.

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::backend::ResultBackend;
use crate::broker::Broker;
use crate::error::{ConfigError, StemError};

/// What an adapter gets when opened from a URL.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// The full URL (contains secrets: never log it, use [`redact`]).
    pub url: String,
    /// The namespace all keys, tables and channels live under.
    pub namespace: String,
}

/// Opens a broker from a URL.
pub type BrokerOpener =
    fn(ConnectOptions) -> BoxFuture<'static, Result<Arc<dyn Broker>, StemError>>;
/// Opens a result backend from a URL.
pub type BackendOpener =
    fn(ConnectOptions) -> BoxFuture<'static, Result<Arc<dyn ResultBackend>, StemError>>;

/// An adapter's URL scheme, registered with `inventory::submit!`.
#[derive(Debug)]
pub struct AdapterEntry {
    /// The scheme, without `://`.
    pub scheme: &'static str,
    /// Opens the broker.
    pub broker: Option<BrokerOpener>,
    /// Opens the result backend.
    pub backend: Option<BackendOpener>,
}

inventory::collect!(AdapterEntry);

/// The broker URL used when `STEM_BROKER_URL` is unset, registered by the
/// embedded adapter (SQLite) when it is compiled in.
#[derive(Debug)]
pub struct EmbeddedDefault {
    /// Returns the URL, e.g. `sqlite:///home/me/.local/share/stem/stem.db`.
    pub url: fn() -> String,
}

inventory::collect!(EmbeddedDefault);

/// The embedded default broker URL, if an adapter registered one.
#[must_use]
pub fn embedded_default_url() -> Option<String> {
    inventory::iter::<EmbeddedDefault>
        .into_iter()
        .next()
        .map(|d| (d.url)())
}

/// The scheme of a URL (`memory` for `memory://`).
///
/// # Errors
/// [`ConfigError::BadUrl`] when there is no `scheme://`.
pub fn scheme_of(url: &str) -> Result<&str, ConfigError> {
    match url.split_once("://") {
        Some((scheme, _))
            if !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')) =>
        {
            Ok(scheme)
        }
        _ => Err(ConfigError::BadUrl {
            url: redact(url),
            reason: String::from("expected `scheme://...`, e.g. `memory://` or `sqlite://stem.db`"),
        }),
    }
}

/// The registered adapter for `url`'s scheme.
///
/// # Errors
/// [`ConfigError::UnknownScheme`] listing the schemes this binary knows.
pub fn adapter_for(url: &str) -> Result<&'static AdapterEntry, ConfigError> {
    let scheme = scheme_of(url)?;
    inventory::iter::<AdapterEntry>
        .into_iter()
        .find(|a| a.scheme.eq_ignore_ascii_case(scheme))
        .ok_or_else(|| {
            let mut known: Vec<_> = inventory::iter::<AdapterEntry>
                .into_iter()
                .map(|a| format!("{}://", a.scheme))
                .collect();
            known.sort();
            ConfigError::UnknownScheme {
                url: redact(url),
                known: known.join(", "),
            }
        })
}

/// Replaces the password in a URL's userinfo (and any `password=` query
/// value) with `***`, for logs and errors.
///
/// ```
/// use stem_core::url::redact;
/// assert_eq!(redact("redis://user:hunter2@host:6379/0"), "redis://user:***@host:6379/0");
/// assert_eq!(redact("postgres://h/db?password=x&a=1"), "postgres://h/db?password=***&a=1");
/// assert_eq!(redact("memory://"), "memory://");
/// ```
#[must_use]
pub fn redact(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    if let Some(s) = scheme {
        out.push_str(s);
        out.push_str("://");
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                None => out.push_str(userinfo),
            }
            out.push('@');
            out.push_str(host);
        }
        None => out.push_str(authority),
    }
    match tail.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let parts: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _))
                        if k.eq_ignore_ascii_case("password")
                            || k.eq_ignore_ascii_case("pass")
                            || k.eq_ignore_ascii_case("secret")
                            || k.eq_ignore_ascii_case("token") =>
                    {
                        format!("{k}=***")
                    }
                    _ => kv.to_owned(),
                })
                .collect();
            out.push_str(&parts.join("&"));
        }
        None => out.push_str(tail),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_everywhere() {
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("redis://:s3cret@h"), "redis://:***@h");
        assert_eq!(redact("redis://user@h"), "redis://user@h");
        assert_eq!(redact("sqlite:///tmp/a.db"), "sqlite:///tmp/a.db");
        assert!(!redact("postgres://u:p%40ss@h/db").contains("p%40ss"));
    }

    #[test]
    fn scheme_errors_are_typed() {
        assert!(matches!(scheme_of("nope"), Err(ConfigError::BadUrl { .. })));
        let err = adapter_for("zzz://u:secret@h").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("memory://"), "{msg}");
        assert!(!msg.contains("secret"), "{msg}");
    }

    /// The cargo features of `stem` that add an adapter in this release.
    const ADAPTER_FEATURES: &[&str] = &["sqlite"];

    #[test]
    fn unknown_scheme_suggests_only_existing_features() {
        for url in ["redis://h", "postgres://h/db", "amqp://h", "zzz://h"] {
            let msg = adapter_for(url).unwrap_err().to_string();
            let mut rest = msg.as_str();
            let mut suggested = 0;
            while let Some(i) = rest.find("features = [") {
                let list = &rest[i + "features = [".len()..];
                let list = &list[..list.find(']').expect("closed list")];
                for feature in list.split(',') {
                    let feature = feature.trim().trim_matches('"');
                    assert!(
                        ADAPTER_FEATURES.contains(&feature),
                        "`{url}`: suggests feature `{feature}`, which does not exist: {msg}"
                    );
                    suggested += 1;
                }
                rest = &rest[i + 1..];
            }
            assert!(suggested > 0, "no feature suggested: {msg}");
        }
    }
}
