//! The attribute's keys (`#[stem::task(queue = "emails", ...)]`): parsing
//! `key = value` pairs and turning each value into a typed option, with an
//! error on the offending token for every mistake.

use std::time::Duration;

use proc_macro2::{Span, TokenStream};
use syn::ext::IdentExt as _;
use syn::parse::{ParseStream, Parser as _};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned as _;
use syn::{Expr, Ident, Lit, LitStr, Token};

use crate::check::Errors;
use crate::rules;

/// The attribute keys, as written by the user.
pub(crate) mod key {
    /// Default queue.
    pub(crate) const QUEUE: &str = "queue";
    /// Default priority, 0..=9.
    pub(crate) const PRIORITY: &str = "priority";
    /// Retries after the first attempt.
    pub(crate) const RETRIES: &str = "retries";
    /// `exponential` | `fixed` | `none`.
    pub(crate) const BACKOFF: &str = "backoff";
    /// First (or fixed) backoff delay.
    pub(crate) const BACKOFF_BASE: &str = "backoff_base";
    /// Cap of the exponential backoff.
    pub(crate) const BACKOFF_MAX: &str = "backoff_max";
    /// Time limit per attempt.
    pub(crate) const TIMEOUT: &str = "timeout";
    /// Visibility timeout.
    pub(crate) const LEASE: &str = "lease";
    /// `at_least_once` | `at_most_once`.
    pub(crate) const DELIVERY: &str = "delivery";
    /// `"100/s"` and friends.
    pub(crate) const RATE_LIMIT: &str = "rate_limit";
    /// The registered name.
    pub(crate) const NAME: &str = "name";
    /// Run on the blocking pool.
    pub(crate) const BLOCKING: &str = "blocking";
    /// Path of the `stem` crate.
    pub(crate) const CRATE: &str = "crate";

    /// Every key, in the order the docs list them.
    pub(crate) const ALL: [&str; 13] = [
        QUEUE,
        PRIORITY,
        RETRIES,
        BACKOFF,
        BACKOFF_BASE,
        BACKOFF_MAX,
        TIMEOUT,
        LEASE,
        DELIVERY,
        RATE_LIMIT,
        NAME,
        BLOCKING,
        CRATE,
    ];
}

/// One `key` or `key = value` as written.
pub(crate) struct Entry {
    /// The key (any identifier, keywords included, so `crate` parses).
    pub(crate) key: Ident,
    /// The value, if any.
    pub(crate) value: Option<Expr>,
}

fn parse_entry(input: ParseStream<'_>) -> syn::Result<Entry> {
    let key = Ident::parse_any(input)?;
    let value = if input.peek(Token![=]) {
        input.parse::<Token![=]>()?;
        Some(input.parse::<Expr>()?)
    } else {
        None
    };
    Ok(Entry { key, value })
}

/// Parses the attribute's tokens; a syntax error is recorded and yields no
/// entries (the rest of the macro still runs with the defaults).
pub(crate) fn parse(tokens: TokenStream, errors: &mut Errors) -> Vec<Entry> {
    let parser = |input: ParseStream<'_>| {
        Punctuated::<Entry, Token![,]>::parse_terminated_with(input, parse_entry)
    };
    match parser.parse2(tokens) {
        Ok(list) => list.into_iter().collect(),
        Err(e) => {
            errors.push_error(e);
            Vec::new()
        }
    }
}

/// A value with the span of the key that set it.
#[derive(Clone, Copy)]
pub(crate) struct Keyed<T> {
    /// The value.
    pub(crate) value: T,
    /// The key's span.
    pub(crate) key: Span,
}

/// The `backoff` kinds.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum BackoffKind {
    /// `exponential`.
    Exponential,
    /// `fixed`.
    Fixed,
    /// `none`.
    None,
}

/// The `delivery` modes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// `at_least_once`.
    AtLeastOnce,
    /// `at_most_once`.
    AtMostOnce,
}

/// The options the user declared; `None` means "not given, or given with
/// an invalid value" (the error is recorded).
#[derive(Default)]
pub(crate) struct Options {
    /// `queue`.
    pub(crate) queue: Option<String>,
    /// `priority`.
    pub(crate) priority: Option<u8>,
    /// `retries`.
    pub(crate) retries: Option<u32>,
    /// `backoff`.
    pub(crate) backoff: Option<Keyed<BackoffKind>>,
    /// `backoff_base`.
    pub(crate) backoff_base: Option<Keyed<Duration>>,
    /// `backoff_max`.
    pub(crate) backoff_max: Option<Keyed<Duration>>,
    /// `timeout`.
    pub(crate) timeout: Option<Duration>,
    /// `lease`.
    pub(crate) lease: Option<Duration>,
    /// `delivery`.
    pub(crate) delivery: Option<Delivery>,
    /// `rate_limit`: count per window.
    pub(crate) rate_limit: Option<(u32, Duration)>,
    /// `name`.
    pub(crate) name: Option<LitStr>,
    /// `blocking`.
    pub(crate) blocking: bool,
    /// `crate`.
    pub(crate) krate: Option<syn::Path>,
}

impl Options {
    /// Interprets every entry, recording an error on the offending token for
    /// unknown keys, duplicates (on the second one) and bad values.
    pub(crate) fn from_args(entries: &[Entry], errors: &mut Errors) -> Self {
        let mut opts = Self::default();
        let mut seen: Vec<String> = Vec::new();
        for entry in entries {
            let key = entry.key.unraw().to_string();
            if !key::ALL.contains(&key.as_str()) {
                errors.push(
                    entry.key.span(),
                    format!(
                        "unknown attribute key `{key}`; the keys are: {}",
                        key::ALL.map(|k| format!("`{k}`")).join(", ")
                    ),
                );
                continue;
            }
            if seen.contains(&key) {
                errors.push(
                    entry.key.span(),
                    format!("duplicate key `{key}`: it is already set above"),
                );
                continue;
            }
            seen.push(key.clone());
            opts.apply(&key, entry, errors);
        }
        opts
    }

    fn apply(&mut self, key: &str, entry: &Entry, errors: &mut Errors) {
        // `blocking` alone means `blocking = true`.
        if key == key::BLOCKING && entry.value.is_none() {
            self.blocking = true;
            return;
        }
        let Some(value) = &entry.value else {
            errors.push(
                entry.key.span(),
                format!("`{key}` needs a value: `{key} = ...`"),
            );
            return;
        };
        let value = strip_groups(value);
        let key_span = entry.key.span();
        match key {
            key::QUEUE => self.queue = queue(value, errors),
            key::PRIORITY => self.priority = priority(value, errors),
            key::RETRIES => {
                self.retries = int(key, value, errors).and_then(|(v, lit)| {
                    u32::try_from(v)
                        .map_err(|_| {
                            errors.push(lit, format!("`retries` must fit in a u32, found {v}"));
                        })
                        .ok()
                });
            }
            key::BACKOFF => {
                self.backoff = word(
                    key,
                    value,
                    &[
                        ("exponential", BackoffKind::Exponential),
                        ("fixed", BackoffKind::Fixed),
                        ("none", BackoffKind::None),
                    ],
                    errors,
                )
                .map(|value| Keyed {
                    value,
                    key: key_span,
                });
            }
            key::BACKOFF_BASE => {
                self.backoff_base = duration(key, value, false, errors).map(|value| Keyed {
                    value,
                    key: key_span,
                });
            }
            key::BACKOFF_MAX => {
                self.backoff_max = duration(key, value, true, errors).map(|value| Keyed {
                    value,
                    key: key_span,
                });
            }
            key::TIMEOUT => self.timeout = duration(key, value, true, errors),
            key::LEASE => self.lease = duration(key, value, true, errors),
            key::DELIVERY => {
                self.delivery = word(
                    key,
                    value,
                    &[
                        ("at_least_once", Delivery::AtLeastOnce),
                        ("at_most_once", Delivery::AtMostOnce),
                    ],
                    errors,
                );
            }
            key::RATE_LIMIT => self.rate_limit = rate_limit(value, errors),
            key::NAME => {
                self.name = string(key, value, errors).filter(|lit| {
                    let ok = !lit.value().trim().is_empty();
                    if !ok {
                        errors.push(lit.span(), "the task name must not be empty");
                    }
                    ok
                });
            }
            key::BLOCKING => self.blocking = boolean(key, value, errors).unwrap_or(false),
            key::CRATE => {
                self.krate = string(key, value, errors).and_then(|lit| {
                    lit.parse::<syn::Path>()
                        .map_err(|_| {
                            errors.push(
                                lit.span(),
                                format!(
                                    "`crate` must be a path such as \"::stem\", found {:?}",
                                    lit.value()
                                ),
                            );
                        })
                        .ok()
                });
            }
            _ => unreachable!("every key in key::ALL is handled"),
        }
    }
}

fn strip_groups(mut expr: &Expr) -> &Expr {
    while let Expr::Group(g) = expr {
        expr = &g.expr;
    }
    expr
}

/// What a value is, for "expected X, found Y" messages.
fn describe(expr: &Expr) -> &'static str {
    match expr {
        Expr::Lit(lit) => match &lit.lit {
            Lit::Str(_) => "a string",
            Lit::Int(_) => "an integer",
            Lit::Float(_) => "a float",
            Lit::Bool(_) => "a boolean",
            _ => "a literal",
        },
        Expr::Path(_) => "a name",
        Expr::Unary(syn::ExprUnary {
            op: syn::UnOp::Neg(_),
            expr,
            ..
        }) if matches!(&**expr, Expr::Lit(_)) => "a negative number",
        _ => "an expression",
    }
}

fn wrong_type(key: &str, expected: &str, expr: &Expr, errors: &mut Errors) {
    errors.push(
        expr.span(),
        format!("`{key}` expects {expected}, found {}", describe(expr)),
    );
}

fn string(key: &str, expr: &Expr, errors: &mut Errors) -> Option<LitStr> {
    if let Expr::Lit(syn::ExprLit {
        lit: Lit::Str(s), ..
    }) = expr
    {
        Some(s.clone())
    } else {
        wrong_type(key, "a string", expr, errors);
        None
    }
}

fn int(key: &str, expr: &Expr, errors: &mut Errors) -> Option<(u64, Span)> {
    if let Expr::Lit(syn::ExprLit {
        lit: Lit::Int(i), ..
    }) = expr
    {
        match i.base10_parse::<u64>() {
            Ok(v) => Some((v, i.span())),
            Err(e) => {
                errors.push(i.span(), format!("`{key}`: {e}"));
                None
            }
        }
    } else {
        wrong_type(key, "an integer", expr, errors);
        None
    }
}

fn boolean(key: &str, expr: &Expr, errors: &mut Errors) -> Option<bool> {
    if let Expr::Lit(syn::ExprLit {
        lit: Lit::Bool(b), ..
    }) = expr
    {
        Some(b.value)
    } else {
        wrong_type(key, "`true` or `false`", expr, errors);
        None
    }
}

/// A word from a fixed set, written as a name (`fixed`) or a string (`"fixed"`).
fn word<T: Copy>(key: &str, expr: &Expr, choices: &[(&str, T)], errors: &mut Errors) -> Option<T> {
    let expected = choices
        .iter()
        .map(|(w, _)| format!("`{w}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let (text, span) = match expr {
        Expr::Path(p) if p.qself.is_none() && p.path.get_ident().is_some() => {
            let ident = p.path.get_ident().map(|i| i.unraw().to_string());
            (ident.unwrap_or_default(), p.span())
        }
        Expr::Lit(syn::ExprLit {
            lit: Lit::Str(s), ..
        }) => (s.value(), s.span()),
        _ => {
            wrong_type(key, &format!("one of {expected}"), expr, errors);
            return None;
        }
    };
    let found = choices.iter().find(|(w, _)| *w == text).map(|(_, v)| *v);
    if found.is_none() {
        errors.push(
            span,
            format!("unknown `{key}` value `{text}`; expected one of {expected}"),
        );
    }
    found
}

fn queue(expr: &Expr, errors: &mut Errors) -> Option<String> {
    let lit = string(key::QUEUE, expr, errors)?;
    let q = lit.value();
    if rules::is_valid_queue_name(&q) {
        Some(q)
    } else {
        errors.push(
            lit.span(),
            format!("invalid queue name {q:?}: {}", rules::QUEUE_NAME_RULE),
        );
        None
    }
}

fn priority(expr: &Expr, errors: &mut Errors) -> Option<u8> {
    let (v, span) = int(key::PRIORITY, expr, errors)?;
    match u8::try_from(v) {
        Ok(p) if rules::is_valid_priority(v) => Some(p),
        _ => {
            errors.push(
                span,
                format!("`priority` must be in {}, found {v}", rules::PRIORITY_RULE),
            );
            None
        }
    }
}

const DURATION_FORM: &str =
    "write a number and a unit, such as \"30s\", \"5m\", \"250ms\" or \"1h 30m\"";

fn duration(key: &str, expr: &Expr, non_zero: bool, errors: &mut Errors) -> Option<Duration> {
    let lit = match expr {
        Expr::Lit(syn::ExprLit {
            lit: Lit::Str(s), ..
        }) => s,
        _ => {
            errors.push(
                expr.span(),
                format!(
                    "`{key}` expects a duration string, found {}; {DURATION_FORM}",
                    describe(expr)
                ),
            );
            return None;
        }
    };
    match humantime::parse_duration(lit.value().trim()) {
        Ok(d) if non_zero && d.is_zero() => {
            errors.push(lit.span(), format!("`{key}` must be longer than zero"));
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            errors.push(
                lit.span(),
                format!(
                    "invalid duration {:?} for `{key}`: {e}; {DURATION_FORM}",
                    lit.value()
                ),
            );
            None
        }
    }
}

fn rate_limit(expr: &Expr, errors: &mut Errors) -> Option<(u32, Duration)> {
    let lit = string(key::RATE_LIMIT, expr, errors)?;
    let s = lit.value();
    rules::parse_rate_limit(&s)
        .map_err(|e| errors.push(lit.span(), e.message(&s)))
        .ok()
}
