//! The `#[stem::task]` attribute macro. Use it through the `stem` crate.

use proc_macro::TokenStream;

/// Turns an `async fn` into a Stem task (see the `stem` crate's docs).
#[proc_macro_attribute]
pub fn task(_attr: TokenStream, item: TokenStream) -> TokenStream {
    item
}
