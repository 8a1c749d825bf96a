//! Broker and result-backend adapters for Stem, one module per adapter,
//! each behind its cargo feature. Applications use them through the `stem`
//! facade: `stem::connect("sqlite://stem.db")`, `stem::connect("redis://127.0.0.1:6379")`,
//! `stem::connect("postgres://postgres@127.0.0.1:5432/app")`.

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;

/// Referenced by the `stem` facade (from every generated task handler) so
/// the linker keeps this crate, and with it the adapters' URL
/// registrations, in every binary that uses Stem.
#[inline(never)]
#[must_use]
pub fn link() -> usize {
    let mut n = 0;
    #[cfg(feature = "sqlite")]
    {
        n += std::hint::black_box(sqlite::link());
    }
    #[cfg(feature = "redis")]
    {
        n += std::hint::black_box(redis::link());
    }
    #[cfg(feature = "postgres")]
    {
        n += std::hint::black_box(postgres::link());
    }
    n
}
