//! Broker and result-backend adapters for Stem, one module per adapter,
//! each behind its cargo feature. Applications use them through the `stem`
//! facade: `stem::connect("sqlite://stem.db")`.

#[cfg(feature = "sqlite")]
pub mod sqlite;

/// Referenced by the `stem` facade (from every generated task handler) so
/// the linker keeps this crate, and with it the adapters' URL
/// registrations, in every binary that uses Stem.
#[inline(never)]
#[must_use]
pub fn link() -> usize {
    #[cfg(feature = "sqlite")]
    {
        std::hint::black_box(sqlite::link())
    }
    #[cfg(not(feature = "sqlite"))]
    {
        0
    }
}
